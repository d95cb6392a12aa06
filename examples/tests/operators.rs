//! An operator's day on real etcd and Docker, through the real `node-agent` and
//! `keelson-ctl` binaries: nodes that describe themselves (labels, detected and
//! overridden attributes), placement that uses both, `plan` with its explanations and
//! exit codes, `deploy --wait` that succeeds and one that is rolled back, `scale`,
//! `jobs`, `allocs`, `deployments`, a drain, `stop`; and an agent's SIGTERM, which
//! leaves its tasks to the next start (adopted, none duplicated) or, with
//! `--drain-on-sigterm`, hands them to another node first. Containers of every node are
//! removed at the end, also when a test fails.
#![cfg(all(feature = "etcd", feature = "docker"))]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keelson_scheduler::NODE_LABEL;

/// An agent process, killed on drop with its node's containers.
struct Agent {
    node: String,
    child: Child,
}

impl Agent {
    fn start(etcd: &str, node: &str, ports: &str, extra: &[&str]) -> Agent {
        let child = Command::new(env!("CARGO_BIN_EXE_node-agent"))
            .args(["--etcd", etcd, "--node", node, "--cpu", "4000", "--memory", "4096", "--ttl", "3s", "--interval", "200ms"])
            .args(["--address", "127.0.0.1", "--ports", ports])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node-agent starts");
        Agent { node: node.to_owned(), child }
    }

    fn containers(&self) -> Vec<String> {
        let mut ids = keelson_testkit::docker::containers(&[&format!("label={NODE_LABEL}={}", self.node)]);
        ids.sort();
        ids
    }

    /// Sends SIGTERM and waits for the exit; returns its status and what it printed.
    fn terminate(&mut self, within: Duration) -> (std::process::ExitStatus, String) {
        use std::io::Read;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let status = keelson_testkit::wait_exit(&mut self.child, within).expect("the agent exits on SIGTERM");
        let mut out = String::new();
        self.child.stdout.take().expect("stdout").read_to_string(&mut out).expect("stdout");
        (status, out)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        keelson_testkit::docker::remove_containers(&[&format!("label={NODE_LABEL}={}", self.node)]);
    }
}

/// Runs keelson-ctl: (exit status, stdout, stderr).
fn ctl(etcd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keelson-ctl")).args(["--etcd", etcd]).args(args).output().expect("keelson-ctl runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn ctl_json(etcd: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = ctl(etcd, &all);
    assert_eq!(code, 0, "keelson-ctl {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("keelson-ctl {args:?} is not JSON ({e}): {out}"))
}

/// A deploy file: `count` busybox httpd allocations of `job`/web at `version`, with
/// `constraints` (JSON) and the given shell command (default: serve).
fn deploy_file(
    dir: &std::path::Path,
    image: &str,
    job: &str,
    version: u64,
    count: u32,
    constraints: serde_json::Value,
    command: &str,
) -> String {
    let body = serde_json::json!({
        "group": {
            "desired": {"job": job, "group": "web", "version": version, "count": count,
                        "resources": {"cpu_millis": 100, "memory_mb": 32}, "ports": 1, "constraints": constraints},
            "task": {"image": image, "command": ["/bin/sh", "-c", command]},
            "service": {"name": job, "port": 8080},
        },
        "strategy": {"kind": "rolling", "max_surge": 1, "max_unavailable": 0},
        "gates": {"min_healthy_time": "300ms", "healthy_deadline": "5s", "progress_deadline": "30s", "auto_rollback": true},
    });
    let path = dir.join(format!("{job}-v{version}.json"));
    std::fs::write(&path, body.to_string()).expect("write");
    path.display().to_string()
}

const SERVE: &str = "exec httpd -f -p 8080";

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The allocations of `job` as keelson-ctl lists them: (node, status) pairs.
fn allocs_of(etcd: &str, job: &str) -> Vec<(String, String)> {
    let v = ctl_json(etcd, &["allocs", "--job", job]);
    v.as_array()
        .expect("a list")
        .iter()
        .map(|a| (a["node"].as_str().unwrap_or("").to_owned(), a["status"].as_str().unwrap_or("").to_lowercase()))
        .collect()
}

#[test]
fn placement_uses_what_nodes_describe_and_operators_plan_wait_scale_drain_and_stop() {
    let image = keelson_testkit::docker::busybox_image().unwrap_or_else(|e| panic!("the busybox test image: {e}"));
    let etcd = keelson_testkit::etcd::Etcd::start().unwrap_or_else(|e| panic!("etcd for this test: {e}"));
    let url = etcd.client_url();
    let pid = std::process::id();
    let (a, b) = (format!("edge-{pid}"), format!("back-{pid}"));
    let _agent_a = Agent::start(&url, &a, "27700-27749", &["--label", "tier=edge", "--datacenter", "eu1"]);
    let _agent_b = Agent::start(&url, &b, "27750-27799", &["--label", "tier=back", "--attr", "os.name=plan9"]);
    wait_until("both nodes to join", Duration::from_secs(20), || ctl_json(&url, &["nodes"]).as_array().is_some_and(|n| n.len() == 2));

    // What the nodes say about themselves: detected attributes, an override, labels.
    let nodes = ctl_json(&url, &["nodes"]);
    let node = |id: &str| nodes.as_array().expect("list").iter().find(|n| n["id"] == id).expect("node")["node"].clone();
    let (na, nb) = (node(&a), node(&b));
    assert_eq!(na["attributes"]["kernel.name"], "linux", "{na}");
    assert_eq!(na["attributes"]["arch"], std::env::consts::ARCH, "{na}");
    assert!(na["attributes"]["cpu.cores"].as_str().is_some_and(|c| c.parse::<u32>().is_ok_and(|c| c >= 1)), "{na}");
    let detected_os = na["attributes"]["os.name"].as_str().expect("os.name detected").to_owned();
    assert_ne!(detected_os, "plan9");
    assert_eq!(nb["attributes"]["os.name"], "plan9", "--attr overrides what was detected: {nb}");
    assert_eq!((na["labels"]["tier"].as_str(), na["datacenter"].as_str()), (Some("edge"), Some("eu1")));
    assert_eq!(na["address"], "127.0.0.1");
    let beat = nodes.as_array().expect("list").iter().find(|n| n["id"] == a).expect("node")["since_heartbeat_ms"].as_u64();
    assert!(beat.is_some_and(|ms| ms <= 3_000), "renewed within the TTL (3s): {beat:?}");
    let (code, table, err) = ctl(&url, &["nodes"]);
    assert_eq!(code, 0, "{err}");
    assert!(table.starts_with("ID ") && table.contains("HEARTBEAT") && table.contains("tier=edge") && table.contains("eu1"), "{table}");
    let (code, detail, _) = ctl(&url, &["node", "status", &a]);
    assert!(code == 0 && detail.contains("kernel.name = linux"), "{detail}");

    // plan: a dry run that explains; exit 1 when something cannot be placed.
    let dir = tempfile::tempdir().expect("dir");
    let on_edge = serde_json::json!([{"target": "label.tier", "op": "=", "value": "edge"}]);
    let edge_v1 = deploy_file(dir.path(), &image, "edgeweb", 1, 2, on_edge.clone(), SERVE);
    let (code, plan, err) = ctl(&url, &["plan", &edge_v1]);
    assert_eq!(code, 0, "{err}");
    assert!(plan.contains(&format!("+ 2 on {a}")) && !plan.contains(&b), "{plan}");
    let nowhere = serde_json::json!([{"target": "label.tier", "op": "=", "value": "nowhere"}]);
    let (code, plan, err) = ctl(&url, &["plan", &deploy_file(dir.path(), &image, "lost", 1, 1, nowhere, SERVE)]);
    assert_eq!(code, 1, "an unplaceable plan exits 1: {plan}");
    assert!(plan.contains("2 filtered by constraint `label.tier = nowhere`"), "{plan}");
    assert!(err.contains("cannot be placed"), "{err}");
    assert!(ctl_json(&url, &["jobs"]).as_array().is_some_and(|j| j.is_empty()), "plan writes nothing");

    // deploy --wait: the label puts both on A; the detected attribute puts one on A too.
    let (code, _, err) = ctl(&url, &["deploy", &edge_v1, "--wait", "--wait-timeout", "90s"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("running everywhere"), "{err}");
    assert_eq!(allocs_of(&url, "edgeweb"), vec![(a.clone(), "running".to_owned()); 2]);
    let on_os = serde_json::json!([{"target": "attr.os.name", "op": "=", "value": detected_os}]);
    let (code, _, err) = ctl(&url, &["deploy", &deploy_file(dir.path(), &image, "osweb", 1, 1, on_os.clone(), SERVE), "--wait"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(allocs_of(&url, "osweb"), vec![(a.clone(), "running".to_owned())]);

    // A version that cannot stay up: --wait follows it to its rollback and exits 1.
    let broken = deploy_file(dir.path(), &image, "osweb", 2, 1, on_os, "exit 3");
    let (code, _, err) = ctl(&url, &["deploy", &broken, "--wait", "--wait-timeout", "90s"]);
    assert_eq!(code, 1, "a rolled-back deployment exits 1: {err}");
    assert!(err.contains("osweb/web v2"), "{err}");
    let deployments = ctl_json(&url, &["deployments", "osweb"]);
    let history = &deployments[0]["history"];
    assert!(
        history.as_array().is_some_and(|h| h.len() == 1 && h[0]["to"] == 2 && h[0]["outcome"].get("RolledBack").is_some()),
        "{deployments}"
    );
    let (code, table, _) = ctl(&url, &["deployments"]);
    assert!(code == 0 && table.contains("rolled back"), "{table}");

    // scale, and jobs shows it.
    let (code, _, err) = ctl(&url, &["scale", "edgeweb", "web", "3"]);
    assert_eq!(code, 0, "{err}");
    wait_until("a third edgeweb", Duration::from_secs(60), || {
        allocs_of(&url, "edgeweb").iter().filter(|(_, s)| s == "running").count() == 3
    });
    let (code, jobs, _) = ctl(&url, &["jobs"]);
    let row = jobs.lines().find(|l| l.starts_with("edgeweb")).unwrap_or_default().split_whitespace().collect::<Vec<_>>();
    assert!(code == 0 && row[..5] == ["edgeweb", "web", "v1", "3", "3"], "{jobs}");

    // An unconstrained job, then a drain of A: its work there moves to B; the
    // edge-only work has nowhere to go and stops.
    let (code, _, err) = ctl(&url, &["deploy", &deploy_file(dir.path(), &image, "anyweb", 1, 2, serde_json::json!([]), SERVE), "--wait"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = ctl(&url, &["node", "drain", &a]);
    assert_eq!(code, 0, "{err}");
    wait_until("node A to empty", Duration::from_secs(60), || {
        ctl_json(&url, &["allocs", "--node", &a]).as_array().is_some_and(|l| l.is_empty())
    });
    wait_until("anyweb on B", Duration::from_secs(60), || allocs_of(&url, "anyweb") == vec![(b.clone(), "running".to_owned()); 2]);
    let nodes = ctl_json(&url, &["nodes"]);
    assert!(nodes.as_array().expect("list").iter().any(|n| n["id"] == a && n["node"]["eligibility"] == "draining"), "{nodes}");
    let (code, _, err) = ctl(&url, &["node", "eligibility", &a, "eligible"]);
    assert_eq!(code, 0, "{err}");
    wait_until("edgeweb back on A", Duration::from_secs(60), || {
        allocs_of(&url, "edgeweb").iter().filter(|(_, s)| s == "running").count() == 3
    });

    // A task that exits now and then is restarted in place, and allocs counts it.
    let flaky = deploy_file(dir.path(), &image, "flaky", 1, 1, serde_json::json!([]), "sleep 1; exit 1");
    let mut body: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&flaky).expect("read")).expect("json");
    body["group"]["task"]["restart"] = serde_json::json!({"max_restarts": 100, "initial_backoff": "100ms", "max_backoff": "200ms"});
    std::fs::write(&flaky, body.to_string()).expect("write");
    let (code, _, err) = ctl(&url, &["deploy", &flaky]);
    assert_eq!(code, 0, "{err}");
    wait_until("a restart to be counted", Duration::from_secs(60), || {
        ctl_json(&url, &["allocs", "--job", "flaky"]).as_array().is_some_and(|l| l.len() == 1 && l[0]["restarts"].as_u64() >= Some(1))
    });
    let (code, table, _) = ctl(&url, &["allocs", "--job", "flaky"]);
    assert!(code == 0 && table.lines().next().is_some_and(|h| h.contains("RESTARTS")), "{table}");
    let (code, _, err) = ctl(&url, &["stop", "flaky"]);
    assert_eq!(code, 0, "{err}");

    // stop: count 0, every allocation stops.
    let (code, out, err) = ctl(&url, &["stop", "anyweb"]);
    assert!(code == 0 && out.contains("anyweb/web stopped"), "{out}{err}");
    wait_until("anyweb to stop", Duration::from_secs(60), || allocs_of(&url, "anyweb").is_empty());
    let (code, _, err) = ctl(&url, &["scale", "nope", "web", "1"]);
    assert!(code == 1 && err.starts_with("keelson-ctl: ") && err.contains("nope/web") && err.lines().count() == 1, "{err}");
}

#[test]
fn sigterm_leaves_tasks_for_the_next_start_and_drain_on_sigterm_hands_them_over() {
    let image = keelson_testkit::docker::busybox_image().unwrap_or_else(|e| panic!("the busybox test image: {e}"));
    let etcd = keelson_testkit::etcd::Etcd::start().unwrap_or_else(|e| panic!("etcd for this test: {e}"));
    let url = etcd.client_url();
    let pid = std::process::id();
    let (c, d) = (format!("stay-{pid}"), format!("other-{pid}"));
    let on_c = serde_json::json!([{"target": "node.id", "op": "=", "value": c}]);
    let mut agent = Agent::start(&url, &c, "27800-27849", &[]);
    wait_until("the node to join", Duration::from_secs(20), || ctl_json(&url, &["nodes"]).as_array().is_some_and(|n| n.len() == 1));
    let dir = tempfile::tempdir().expect("dir");
    let (code, _, err) = ctl(&url, &["deploy", &deploy_file(dir.path(), &image, "kept", 1, 2, on_c, SERVE), "--wait"]);
    assert_eq!(code, 0, "{err}");
    let before = agent.containers();
    assert_eq!(before.len(), 2);

    // SIGTERM: a clean exit, the tasks keep running.
    let (status, out) = agent.terminate(Duration::from_secs(15));
    assert!(status.success(), "{status}: {out}");
    assert!(out.contains("keep running"), "{out}");
    assert_eq!(agent.containers(), before, "the containers outlive the agent");
    // Back within the TTL: the same containers are adopted, none started again.
    let agent = Agent::start(&url, &c, "27800-27849", &["--drain-on-sigterm"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent.containers(), before, "adopted, none duplicated, none orphaned");
    assert_eq!(allocs_of(&url, "kept"), vec![(c.clone(), "running".to_owned()); 2]);

    // With --drain-on-sigterm the work moves to another node before the agent leaves.
    let other = Agent::start(&url, &d, "27850-27899", &[]);
    let spread = serde_json::json!([]);
    let (code, _, err) = ctl(&url, &["deploy", &deploy_file(dir.path(), &image, "moved", 1, 2, spread, SERVE), "--wait"]);
    assert_eq!(code, 0, "{err}");
    let mut agent = agent;
    let (status, out) = agent.terminate(Duration::from_secs(60));
    assert!(status.success() && out.contains("drained and left"), "{status}: {out}");
    wait_until("moved on the other node", Duration::from_secs(60), || {
        allocs_of(&url, "moved") == vec![(d.clone(), "running".to_owned()); 2]
    });
    assert!(agent.containers().is_empty(), "the drained node stopped its tasks: {:?}", agent.containers());
    let nodes = ctl_json(&url, &["nodes"]);
    let c_row = nodes.as_array().expect("list").iter().find(|n| n["id"] == c).cloned();
    assert!(c_row.is_none_or(|n| n["status"] == "lost"), "the drained node left: {nodes}");
    drop(other);
}

#[test]
fn a_saved_state_restored_after_its_loss_is_adopted_by_the_agents() {
    let image = keelson_testkit::docker::busybox_image().unwrap_or_else(|e| panic!("the busybox test image: {e}"));
    let etcd = keelson_testkit::etcd::Etcd::start().unwrap_or_else(|e| panic!("etcd for this test: {e}"));
    let url = etcd.client_url();
    let node = format!("snap-{}", std::process::id());
    let mut agent = Agent::start(&url, &node, "27900-27949", &[]);
    wait_until("the node to join", Duration::from_secs(20), || ctl_json(&url, &["nodes"]).as_array().is_some_and(|n| n.len() == 1));
    let dir = tempfile::tempdir().expect("dir");
    let (code, _, err) = ctl(&url, &["deploy", &deploy_file(dir.path(), &image, "saved", 1, 2, serde_json::json!([]), SERVE), "--wait"]);
    assert_eq!(code, 0, "{err}");
    let before = agent.containers();
    assert_eq!(before.len(), 2);
    let backup = dir.path().join("state.json");
    let (code, _, err) = ctl(&url, &["snapshot", "save", backup.to_str().expect("utf-8")]);
    assert!(code == 0 && err.contains("saved to"), "{err}");

    // The agent stops (its tasks run on), and the cluster state is lost.
    let (status, _) = agent.terminate(Duration::from_secs(15));
    assert!(status.success());
    let wiped = Command::new("etcdctl").env("ETCDCTL_API", "3").args(["--endpoints", &url, "del", "--prefix", "keelson/"]).output();
    assert!(wiped.as_ref().is_ok_and(|o| o.status.success()), "etcdctl del: {wiped:?} (apt-get install -y etcd-client)");
    assert!(ctl_json(&url, &["jobs"]).as_array().is_some_and(|j| j.is_empty()), "the state is gone");

    let (code, _, err) = ctl(&url, &["snapshot", "restore", backup.to_str().expect("utf-8")]);
    assert!(code == 0 && err.contains("restored"), "{err}");
    let (code, _, err) = ctl(&url, &["snapshot", "restore", backup.to_str().expect("utf-8")]);
    assert!(code == 1 && err.contains("not empty"), "a second restore over the first is refused: {err}");

    // The agent comes back: the same containers, adopted; none started, none left over.
    let agent = Agent::start(&url, &node, "27900-27949", &[]);
    wait_until("the allocations running again", Duration::from_secs(30), || {
        allocs_of(&url, "saved") == vec![(node.clone(), "running".to_owned()); 2]
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(agent.containers(), before, "adopted, none duplicated, none orphaned");
    let jobs = ctl_json(&url, &["jobs"]);
    assert_eq!(
        (jobs[0]["job"].as_str(), jobs[0]["count"].as_u64(), jobs[0]["running"].as_u64()),
        (Some("saved"), Some(2), Some(2)),
        "{jobs}"
    );
}
