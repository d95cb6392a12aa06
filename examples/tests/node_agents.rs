//! Two `node-agent` processes (different node ids, one Docker engine) on a real etcd; one
//! is killed with SIGKILL and the controller in the surviving agent re-places its work
//! there within the lease TTL + 2 s, where that agent starts it. Nothing but the two
//! agent processes acts on the cluster after the setup. Then `keelson-ctl` against an
//! agent: deploy, a rolling update, status, a one-off run and its result, bad input. Every container of both nodes is removed at
//! the end, also when the test fails.
#![cfg(all(feature = "etcd", feature = "docker"))]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_discovery::{EtcdConfig, EtcdKv, KeyValue};
use keelson_scheduler::{
    AllocRecord, AllocStatus, ClusterStore, DesiredGroup, GroupSpec, Resources, ServiceSpec, TaskTemplate, NODE_LABEL,
};

/// An agent process, killed on drop; its node's containers are removed on drop too.
struct Agent {
    node: String,
    child: Child,
}

impl Agent {
    /// `ports`: the node's host ports (each test its own, as tests share one Docker host).
    fn start(etcd: &str, node: &str, ports: &str) -> Agent {
        Agent::start_with(etcd, node, ports, &[])
    }

    fn start_with(etcd: &str, node: &str, ports: &str, extra: &[&str]) -> Agent {
        let child = Command::new(env!("CARGO_BIN_EXE_node-agent"))
            .args(extra)
            .args([
                "--etcd",
                etcd,
                "--node",
                node,
                "--cpu",
                "8000",
                "--memory",
                "8192",
                "--ttl",
                "2s",
                "--interval",
                "200ms",
                "--address",
                "127.0.0.1",
            ])
            .args(["--ports", ports])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("node-agent starts");
        Agent { node: node.to_owned(), child }
    }

    fn containers(&self) -> Vec<String> {
        keelson_testkit::docker::containers(&[&format!("label={NODE_LABEL}={}", self.node)])
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        keelson_testkit::docker::remove_containers(&[&format!("label={NODE_LABEL}={}", self.node)]);
    }
}

fn web(image: &str) -> GroupSpec {
    GroupSpec {
        desired: DesiredGroup {
            job: "web".into(),
            group: "http".into(),
            version: 1,
            count: 4,
            resources: Resources::new(500, 64),
            ports: 1,
            volumes: Vec::new(),
            ..DesiredGroup::default()
        },
        task: TaskTemplate {
            image: Some(image.to_owned()),
            command: vec!["httpd".into(), "-f".into(), "-p".into(), "8080".into()],
            ..TaskTemplate::default()
        },
        service: Some(ServiceSpec { name: "web".into(), port: 8080, tags: Vec::new(), http_check: None }),
        release: None,
    }
}

async fn running_on(store: &ClusterStore, node: &str) -> usize {
    store.allocations_on(node).await.expect("allocations").iter().filter(|a| a.status == AllocStatus::Running).count()
}

async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, limit: Duration, mut done: impl FnMut() -> F) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_work_is_replaced_on_the_other_node_within_ttl_plus_2s() {
    let image = keelson_testkit::docker::busybox_image().unwrap_or_else(|e| panic!("the busybox test image: {e}"));
    let etcd = keelson_testkit::etcd::Etcd::start().unwrap_or_else(|e| panic!("etcd for this test: {e}"));
    let kv: Arc<dyn KeyValue> = Arc::new(EtcdKv::connect(EtcdConfig::new([etcd.client_url()])).await.expect("etcd"));
    let store = ClusterStore::new(kv, "keelson/cluster");
    let spec = web(&image);
    store.put_group(&spec).await.expect("group");
    let pid = std::process::id();
    let (a, b) = (format!("doomed-{pid}"), format!("survivor-{pid}"));
    let mut doomed = Agent::start(&etcd.client_url(), &a, "26000-26099");
    let survivor = Agent::start(&etcd.client_url(), &b, "26100-26199");
    wait_for("both nodes to join", Duration::from_secs(20), || async { store.view().await.map(|v| v.nodes.len() == 2).unwrap_or(false) })
        .await;

    // Two allocations on each node, placed by hand so the doomed node surely has work.
    let ports = keelson_testkit::free_ports(4).expect("ports");
    let view = store.view().await.expect("view");
    let mut plan = view.plan();
    for (i, port) in ports.iter().enumerate() {
        let node = if i < 2 { &a } else { &b };
        plan.put(AllocRecord {
            id: format!("web-{pid}-{i}"),
            job: "web".into(),
            group: "http".into(),
            version: 1,
            node: node.clone(),
            status: AllocStatus::Pending,
            ports: vec![*port],
            since_ms: 0,
            volumes: Vec::new(),
            resources: Default::default(),
            restarts: 0,
            slot: None,
            address: None,
            prefer_address: None,
        });
    }
    store.commit(&plan).await.expect("commit");
    // The controllers in the agents keep the group at four from now on.
    let rolling = keelson_scheduler::Strategy::Rolling { max_surge: 1, max_unavailable: 0 };
    store.deploy(&spec, rolling, keelson_scheduler::Gates::default()).await.expect("group state");
    wait_for("four running allocations", Duration::from_secs(60), || async {
        running_on(&store, &a).await == 2 && running_on(&store, &b).await == 2
    })
    .await;

    doomed.child.kill().expect("SIGKILL the doomed agent");
    let killed = Instant::now();
    let bound = Duration::from_secs(2) + Duration::from_secs(2);
    // Re-placed: the lost node's records gone, four allocations on the survivor.
    loop {
        let view = store.view().await.expect("view");
        if !view.allocations.iter().any(|x| x.node == a) && view.allocations.iter().filter(|x| x.node == b).count() == 4 {
            break;
        }
        assert!(killed.elapsed() <= bound, "the lost node's work was not re-placed within TTL + 2 s: {:?}", view.allocations);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = killed.elapsed();
    assert!(took <= bound, "re-placed after {took:?}");
    wait_for("the survivor to run all four", Duration::from_secs(60), || async { running_on(&store, &b).await == 4 }).await;
    assert_eq!(survivor.containers().len(), 4);
    eprintln!("lost node's work re-placed {took:?} after SIGKILL (lease TTL 2 s)");
}

/// Runs `keelson-ctl` with `args`: (exit code, stdout, stderr).
fn ctl(etcd: &str, args: &[&str]) -> (i32, String, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_keelson-ctl")).args(["--etcd", etcd, "--json"]).args(args).output().expect("keelson-ctl runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn status(etcd: &str) -> serde_json::Value {
    let (code, out, err) = ctl(etcd, &["status", "web", "http"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("status is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keelson_ctl_deploys_updates_and_runs_one_off_jobs_on_an_agent() {
    let image = keelson_testkit::docker::busybox_image().unwrap_or_else(|e| panic!("the busybox test image: {e}"));
    let etcd = keelson_testkit::etcd::Etcd::start().unwrap_or_else(|e| panic!("etcd for this test: {e}"));
    let url = etcd.client_url();
    let kv: Arc<dyn KeyValue> = Arc::new(EtcdKv::connect(EtcdConfig::new([url.clone()])).await.expect("etcd"));
    let store = ClusterStore::new(kv, "keelson/cluster");
    let node = format!("ctl-{}", std::process::id());
    let metrics_port = keelson_testkit::free_ports(1).expect("port")[0];
    let metrics_addr = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let agent = Agent::start_with(&url, &node, "27000-27099", &["--metrics-listen", &metrics_addr.to_string()]);
    let dir = tempfile::tempdir().expect("dir");
    let deploy_file = |version: u64| {
        let mut spec = web(&image);
        spec.desired.version = version;
        spec.desired.count = 2;
        spec.task.command = vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("mkdir -p /www && echo v{version} > /www/index.html && exec httpd -f -p 8080 -h /www"),
        ];
        let gates =
            serde_json::json!({"min_healthy_time": "500ms", "healthy_deadline": "20s", "progress_deadline": "60s", "auto_rollback": true});
        let body =
            serde_json::json!({"group": spec, "strategy": {"kind": "rolling", "max_surge": 1, "max_unavailable": 0}, "gates": gates});
        let path = dir.path().join(format!("v{version}.json"));
        std::fs::write(&path, body.to_string()).expect("write");
        path.display().to_string()
    };

    let (code, _, err) = ctl(&url, &["deploy", &deploy_file(1)]);
    assert_eq!(code, 0, "{err}");
    wait_for("v1 running", Duration::from_secs(60), || async { running_on(&store, &node).await == 2 }).await;
    let (code, _, err) = ctl(&url, &["deploy", &deploy_file(2)]);
    assert_eq!(code, 0, "{err}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = status(&url);
        if s["deployment"].is_null() {
            assert_eq!(s["stable"], 2, "{s}");
            assert_eq!(s["last_outcome"], "Succeeded", "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "deployment did not finish: {s}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_for("v2 running", Duration::from_secs(60), || async {
        let allocs = store.allocations_on(&node).await.expect("allocs");
        allocs.len() == 2 && allocs.iter().all(|a| a.version == 2 && a.status == AllocStatus::Running)
    })
    .await;
    let port = store.allocations_on(&node).await.expect("allocs")[0].ports[0];
    let served = keelson_testkit::http::get(std::net::SocketAddr::from(([127, 0, 0, 1], port)), "web", "/").await.expect("GET");
    assert_eq!(served.body, "v2\n");
    let metrics = keelson_testkit::http::get_when_up(metrics_addr, "agent", "/metrics", Duration::from_secs(5)).await.expect("metrics");
    let started = metrics.body.lines().find(|l| l.starts_with("keelson_agent_tasks_started_total")).expect("started counter");
    assert!(started.ends_with(" 4"), "v1 and v2, two each: {started}");
    assert!(metrics.body.contains("keelson_controller_deployments_ended_total{outcome=\"Succeeded\"} 1"), "{}", metrics.body);

    // A one-off run: submitted, run once by the agent, its output kept.
    let run = serde_json::json!({
        "id": format!("hello-{}", std::process::id()),
        "job": "adhoc",
        "task": {"image": image, "command": ["/bin/sh", "-c", "echo hello from a run"]},
        "resources": {"cpu_millis": 100, "memory_mb": 16},
        "time_limit": "30s",
    });
    let run_path = dir.path().join("run.json");
    std::fs::write(&run_path, run.to_string()).expect("write");
    let (code, _, err) = ctl(&url, &["run", &run_path.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    let id = run["id"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        let (code, out, err) = ctl(&url, &["result", &id]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        if !v.is_null() {
            break v;
        }
        assert!(Instant::now() < deadline, "the run never ended");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(result["outcome"], "Succeeded", "{result}");
    assert!(result["output"].as_array().expect("lines").iter().any(|l| l["line"] == "hello from a run"), "{result}");

    // Bad input: a file that is not a deploy file, an unknown group, promote with no
    // deployment. Each fails with a message and status 1.
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, "{\"group\": 3}").expect("write");
    let (code, _, err) = ctl(&url, &["deploy", &junk.display().to_string()]);
    assert_eq!(code, 1);
    assert!(err.contains("junk.json"), "{err}");
    let (code, _, err) = ctl(&url, &["status", "nope", "nope"]);
    assert!(code == 1 && err.contains("no group nope/nope"), "{err}");
    let (code, _, err) = ctl(&url, &["promote", "web", "http"]);
    assert!(code == 1 && err.contains("not found"), "{err}");
    drop(agent);
}

/// Environment variables for a binary.
type Env = Vec<(&'static str, String)>;

/// The etcd settings of a secured etcd, as environment variables for the binaries.
fn secure_env(etcd: &keelson_testkit::etcd_secure::SecureEtcd, password_file: &std::path::Path) -> Env {
    let (cert, key) = etcd.client_files();
    vec![
        ("KEELSON_ETCD_ENDPOINTS", etcd.client_url()),
        ("KEELSON_ETCD_CA", etcd.ca_file().display().to_string()),
        ("KEELSON_ETCD_CERT", cert.display().to_string()),
        ("KEELSON_ETCD_KEY", key.display().to_string()),
        ("KEELSON_ETCD_USER", keelson_testkit::etcd_secure::USER.to_owned()),
        ("KEELSON_ETCD_PASSWORD_FILE", password_file.display().to_string()),
    ]
}

fn ctl_env(env: &[(&'static str, String)], args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keelson-ctl"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .arg("--json")
        .args(args)
        .output()
        .expect("keelson-ctl runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A node agent configured by `env` (no etcd flags), killed on drop with its containers.
fn agent_with_env(env: &Env, node: &str, cpu: &str, ports: &str, extra: &[&str]) -> Agent {
    let child = Command::new(env!("CARGO_BIN_EXE_node-agent"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args([
            "--node",
            node,
            "--cpu",
            cpu,
            "--memory",
            "8192",
            "--ttl",
            "2s",
            "--interval",
            "200ms",
            "--address",
            "127.0.0.1",
            "--ports",
            ports,
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("node-agent starts");
    Agent { node: node.to_owned(), child }
}

/// Deploys one `web` allocation with keelson-ctl configured by `env`.
fn deploy_one_web(env: &Env, image: &str) {
    let dir = tempfile::tempdir().expect("dir");
    let mut spec = web(image);
    spec.desired.count = 1;
    let deploy = dir.path().join("web.json");
    std::fs::write(&deploy, serde_json::json!({"group": spec}).to_string()).expect("write");
    let (code, _, err) = ctl_env(env, &["deploy", &deploy.display().to_string()]);
    assert_eq!(code, 0, "deploy: {err}");
}

/// A file in the secured etcd's directory holding `secret` (as an operator stores it).
fn secret_file(etcd: &keelson_testkit::etcd_secure::SecureEtcd, name: &str, secret: &str) -> std::path::PathBuf {
    let path = etcd.dir().join(name);
    std::fs::write(&path, format!("{secret}\n")).expect("secret file");
    path
}

/// A library connection to the secured etcd as `user`.
async fn connect_as(etcd: &keelson_testkit::etcd_secure::SecureEtcd, user: &str, password: &str) -> EtcdKv {
    let (cert, key) = etcd.client_files();
    let config = {
        let mut built = EtcdConfig::new([etcd.client_url()]);
        built.credentials = Some((user.into(), password.into()));
        built.tls = Some(keelson_discovery::EtcdTls::from_files(&etcd.ca_file(), Some(&cert), Some(&key)).expect("tls"));
        built
    };
    EtcdKv::connect(config).await.expect("etcd")
}

/// On an etcd with TLS, client certificates and a role limited to `keelson/`: a node
/// agent and keelson-ctl given the right CA, certificate, user and password (all from the
/// environment, the password from a file) deploy and run work; keelson-ctl with a wrong
/// CA, no client certificate, a wrong password, or a root outside the role's prefix
/// exits non-zero naming the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_secured_etcd_the_right_credentials_deploy_and_each_wrong_one_is_named() {
    use keelson_testkit::etcd_secure::{SecureEtcd, PASSWORD};
    let image = keelson_testkit::docker::busybox_image().unwrap_or_else(|e| panic!("the busybox test image: {e}"));
    let etcd = tokio::task::spawn_blocking(SecureEtcd::start).await.expect("join").expect("secured etcd");
    let env = secure_env(&etcd, &secret_file(&etcd, "password", PASSWORD));
    let node = format!("secure-{}", std::process::id());
    let _agent = agent_with_env(&env, &node, "8000", "27400-27499", &[]);
    deploy_one_web(&env, &image);
    let kv: Arc<dyn KeyValue> = Arc::new(connect_as(&etcd, keelson_testkit::etcd_secure::USER, PASSWORD).await);
    let store = ClusterStore::new(kv, "keelson/cluster");
    wait_for("the deployed allocation running", Duration::from_secs(60), || async { running_on(&store, &node).await == 1 }).await;

    let with = |name: &'static str, value: String| {
        let mut e: Env = env.iter().filter(|(k, _)| *k != name).cloned().collect();
        e.push((name, value));
        e
    };
    let other_ca = keelson_testkit::tls::TestCa::new("not etcd's CA").expect("ca");
    let other_ca_file = etcd.dir().join("other-ca.pem");
    std::fs::write(&other_ca_file, &other_ca.cert_pem).expect("write");
    let wrong_password = etcd.dir().join("wrong-password");
    std::fs::write(&wrong_password, "not-it\n").expect("write");
    let no_cert: Env = env.iter().filter(|(k, _)| !k.ends_with("_CERT") && !k.ends_with("_KEY")).cloned().collect();
    let cases: [(&str, Env, &[&str], &str); 4] = [
        ("a wrong CA", with("KEELSON_ETCD_CA", other_ca_file.display().to_string()), &["status", "web", "http"], "TLS with etcd failed"),
        ("no client certificate", no_cert, &["status", "web", "http"], "TLS with etcd failed"),
        (
            "a wrong password",
            with("KEELSON_ETCD_PASSWORD_FILE", wrong_password.display().to_string()),
            &["status", "web", "http"],
            "refused the credentials",
        ),
        ("a root outside the role's prefix", env.clone(), &["--root", "other/cluster", "status", "web", "http"], "denied"),
    ];
    for (what, env, args, says) in cases {
        let (code, _, err) = ctl_env(&env, args);
        assert_ne!(code, 0, "{what}: keelson-ctl must fail");
        assert!(err.contains(says), "{what}: the message names the cause ({says:?}): {err}");
        assert!(!err.contains(PASSWORD), "{what}: no secret in the message: {err}");
    }
}

/// Least privilege: an agent run with `--no-controller` under an etcd role that reads the
/// cluster but writes only its own node's keys (its node record, its allocations' status,
/// forgetting its finished work, its runs), run results and the catalog still runs the
/// work placed on it; with that credential, writing another node's allocations or the
/// desired state is refused by etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_under_a_node_scoped_role_runs_its_work_and_cannot_touch_others() {
    use keelson_testkit::etcd_secure::{SecureEtcd, PASSWORD};
    let image = keelson_testkit::docker::busybox_image().unwrap_or_else(|e| panic!("the busybox test image: {e}"));
    let etcd = tokio::task::spawn_blocking(SecureEtcd::start).await.expect("join").expect("secured etcd");
    let worker = format!("scoped-{}", std::process::id());
    let role = "node-role";
    let c = "keelson/cluster";
    let etcdctl = |args: &[&str]| etcd.etcdctl(args).expect("etcdctl");
    etcdctl(&["role", "add", role]);
    etcdctl(&["role", "grant-permission", role, "--prefix=true", "read", "keelson/"]);
    etcdctl(&["role", "grant-permission", role, "readwrite", &format!("{c}/nodes/{worker}")]);
    let writable = [
        format!("{c}/status/{worker}/"),
        format!("{c}/allocs/{worker}/"),
        format!("{c}/runs/{worker}/"),
        format!("{c}/run-results/"),
        "keelson/services/".to_owned(),
    ];
    for prefix in &writable {
        etcdctl(&["role", "grant-permission", role, "--prefix=true", "readwrite", prefix]);
    }
    etcdctl(&["user", "add", &format!("{worker}:node-pw")]);
    etcdctl(&["user", "grant-role", &worker, role]);
    let full_env = secure_env(&etcd, &secret_file(&etcd, "password", PASSWORD));
    let mut node_env: Env =
        secure_env(&etcd, &secret_file(&etcd, "node-password", "node-pw")).into_iter().filter(|(k, _)| *k != "KEELSON_ETCD_USER").collect();
    node_env.push(("KEELSON_ETCD_USER", worker.clone()));

    // The controller: an agent with the full role, too small to take the work itself.
    let leader = format!("leader-{}", std::process::id());
    let _leader = agent_with_env(&full_env, &leader, "100", "27500-27549", &[]);
    let _worker = agent_with_env(&node_env, &worker, "8000", "27550-27599", &["--no-controller"]);
    deploy_one_web(&full_env, &image);
    let full: Arc<dyn KeyValue> = Arc::new(connect_as(&etcd, keelson_testkit::etcd_secure::USER, PASSWORD).await);
    let store = ClusterStore::new(full, c);
    wait_for("the work running on the scoped node", Duration::from_secs(60), || async { running_on(&store, &worker).await == 1 }).await;

    let scoped = connect_as(&etcd, &worker, "node-pw").await;
    for key in [format!("{c}/allocs/{leader}/forged"), format!("{c}/desired/web/http"), format!("{c}/journal/head")] {
        let r = scoped.put(&key, b"{}".to_vec(), None).await;
        assert!(matches!(r, Err(keelson_discovery::Error::PermissionDenied { .. })), "{key}: {r:?}");
    }
    scoped.get(&format!("{c}/desired/web/http")).await.expect("it reads the desired state");
}
