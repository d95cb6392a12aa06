//! localcloud as its user meets it, with the real programs: `localcloud up` (three
//! network-namespace hosts, a 3-member etcd, overlay agents on the Docker Engine, edge,
//! keelson's DNS server, a LAN machine with unbound), names resolved with `dig` from this
//! machine and called by name from the LAN machine, a host killed (its agent SIGKILLed,
//! its containers `docker kill`ed, its namespace deleted) and its work moving to the
//! others, the minipaas CLI working on the cloud (its roles are a minipaas app), `reset`
//! wiping the data and bringing the same cloud back, and `down`, after
//! which the machine is as before. The refusals need no cloud.
#![cfg(all(feature = "etcd", feature = "docker"))]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keelson_examples::localcloud::state::CloudState;
use keelson_testkit::machine::MachineState;

const LOCALCLOUD: &str = env!("CARGO_BIN_EXE_localcloud");
/// What localcloud runs: none may outlive `down`.
const PROGRAMS: &[&str] = &["etcd", "node-agent", "edge", "dns-catalog", "unbound", "localcloud"];
/// A subnet reserved for benchmarking (RFC 2544), which no real network here uses.
const UNDERLAY: &str = "198.18.94.0/24";

/// The tests run one at a time: the machine-state diff would see the other's processes.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn localcloud(dir: &Path, args: &[&str]) -> Output {
    Command::new(LOCALCLOUD).arg("--state-dir").arg(dir).args(args).output().expect("localcloud runs")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A cloud that is taken down when dropped, also when the test fails (with its logs).
struct Cloud {
    name: &'static str,
    dir: PathBuf,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for entry in std::fs::read_dir(self.dir.join("logs")).into_iter().flatten().flatten() {
                let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!("--- {} (last lines)\n{}", entry.path().display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
            eprintln!("--- supervisor\n{}", std::fs::read_to_string(self.dir.join("localcloud.log")).unwrap_or_default());
        }
        if self.dir.join("localcloud.json").exists() {
            let out = localcloud(&self.dir, &["--name", self.name, "down"]);
            if !out.status.success() {
                eprintln!("localcloud down: {}", text(&out));
            }
        }
    }
}

fn dig(server: std::net::IpAddr, name: &str) -> Vec<String> {
    let out = Command::new("dig").arg(format!("@{server}")).args(["+short", "+time=2", "+tries=1", name, "A"]).output().expect("dig");
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

/// `curl` from the LAN machine, by name: its body, or None.
fn from_lan(state: &CloudState, url: &str) -> Option<String> {
    let out = Command::new("ip").args(["netns", "exec", &state.lan_netns, "curl", "-sf", "--max-time", "2", url]).output().expect("curl");
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The running containers of the `node` role, by host node.
fn node_role_containers() -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "--filter",
            "label=keelson.job=cloud",
            "--filter",
            "label=keelson.group=node",
            "--format",
            "{{.Label \"keelson.node\"}}",
        ])
        .output()
        .expect("docker ps");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    v.sort();
    v
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_cloud_answers_by_name_survives_a_lost_host_resets_and_goes_down_leaving_nothing() {
    let _serial = one_at_a_time();
    // The roles' image is built once and kept (like a build cache): not part of the diff.
    keelson_examples::localcloud::roles::ensure_image().expect("image");
    let before = MachineState::read(PROGRAMS);
    let dir = tempfile::tempdir().expect("dir");
    let cloud = Cloud { name: "lct", dir: dir.path().join("state") };

    let t0 = Instant::now();
    let out = localcloud(&cloud.dir, &["--name", cloud.name, "up", "--underlay", UNDERLAY]);
    assert!(out.status.success(), "up: {}", text(&out));
    eprintln!("up returned in {:?}: {}", t0.elapsed(), text(&out));
    let state = CloudState::read(&cloud.dir).expect("state");
    assert!(state.ready && state.generation == 1, "{state:?}");
    assert_eq!(state.hosts.len(), 3);
    let lb = state.edge.ip();

    // From this machine, `dig` at the cloud's DNS server: the cloud's name and every
    // role's are the load balancer; the catalog's name has the node role's three tasks.
    for name in ["lct.test", "lb.lct.test", "master.lct.test", "node.lct.test"] {
        assert_eq!(dig(state.dns.ip(), name), vec![lb.to_string()], "{name}");
    }
    assert_eq!(dig(state.dns.ip(), "cloud-node.service.lct.test").len(), 3, "the node role's tasks in the catalog");
    // This machine's resolver configuration is not the cloud's business.
    assert!(!std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default().contains(&lb.to_string()));

    // From a machine on the LAN, by name, through its own resolver and the load balancer.
    assert!(from_lan(&state, "http://master.lct.test/").is_some_and(|b| b.starts_with("master on")), "master by name");
    assert!(from_lan(&state, "http://node.lct.test/").is_some_and(|b| b.starts_with("node on")), "node by name");
    assert!(from_lan(&state, "http://lct.test:9100/readyz").is_some(), "the load balancer by the cloud's name");
    assert_eq!(from_lan(&state, "http://nothing.lct.test/"), None, "an unknown name does not resolve");

    // The roles are a minipaas app: the minipaas CLI works on the cloud, across its hosts.
    let minipaas = |state: &CloudState, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_minipaas"))
            .args(["--controller", &state.controller, "--token-file"])
            .arg(&state.token_file)
            .args(["--app", "cloud"])
            .args(args)
            .output()
            .expect("minipaas");
        assert!(out.status.success(), "minipaas {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ps = minipaas(&state, &["ps"]);
    for host in &state.hosts {
        assert!(ps.contains(&host.node), "an instance on every host: {ps}");
    }
    assert!(minipaas(&state, &["releases"]).contains("localcloud"), "the roles' release, by localcloud");

    // The node role spreads over the hosts; kill the third host with its share.
    let spread = node_role_containers();
    let lost = &state.hosts[2];
    assert!(spread.contains(&lost.node) && spread.len() == 3, "one node task per host: {spread:?}");
    let pids = Command::new("ip").args(["netns", "pids", &lost.netns]).output().expect("pids");
    let pids: Vec<i32> = String::from_utf8_lossy(&pids.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect();
    let comm = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_owned();
    let agent = pids.iter().copied().find(|&p| comm(p) == "node-agent").expect("the lost host's agent");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), nix::sys::signal::Signal::SIGKILL).expect("SIGKILL the agent");
    let ids = Command::new("docker").args(["ps", "-q", "--filter", &format!("label=keelson.node={}", lost.node)]).output().expect("ps");
    let ids: Vec<String> = String::from_utf8_lossy(&ids.stdout).split_whitespace().map(str::to_owned).collect();
    assert!(!ids.is_empty());
    assert!(Command::new("docker").arg("kill").args(&ids).output().expect("docker kill").status.success());
    // The rest of the host (its etcd member) dies with it, then the machine is gone.
    for pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    let sw = format!("lc-{}-sw", cloud.name);
    assert!(Command::new("ip").args(["-n", &sw, "link", "del", "h3"]).status().expect("ip").success());
    assert!(Command::new("ip").args(["netns", "del", &lost.netns]).status().expect("ip").success());
    // Its work moves to the other hosts (its node is lost after the agents' 3 s TTL),
    // and the role answers by name on two of three etcd members.
    wait_until("the lost host's task placed elsewhere", Duration::from_secs(60), || {
        let now = node_role_containers();
        now.len() == 3 && !now.contains(&lost.node)
    });
    wait_until("the node role answering after the loss", Duration::from_secs(30), || {
        from_lan(&state, "http://node.lct.test/").is_some_and(|b| b.starts_with("node on"))
    });

    // Reset: all data wiped (a key put in etcd is gone), the same cloud back, all hosts.
    let etcdctl = |args: &[&str]| {
        Command::new("etcdctl").env("ETCDCTL_API", "3").args(["--endpoints", &state.etcd[0]]).args(args).output().expect("etcdctl")
    };
    assert!(etcdctl(&["put", "marker", "before-reset"]).status.success());
    let out = localcloud(&cloud.dir, &["--name", cloud.name, "reset"]);
    assert!(out.status.success(), "reset: {}", text(&out));
    assert!(text(&out).contains("was reset in"), "{}", text(&out));
    let after = CloudState::read(&cloud.dir).expect("state");
    assert!(after.ready && after.generation == 2, "{after:?}");
    assert!(String::from_utf8_lossy(&etcdctl(&["get", "marker"]).stdout).trim().is_empty(), "etcd's data was wiped");
    assert!(Path::new("/run/netns").join(&lost.netns).exists(), "the lost host is back");
    assert_eq!(node_role_containers().len(), 3);
    assert!(from_lan(&after, "http://master.lct.test/").is_some_and(|b| b.starts_with("master on")));

    // Scaled through the controller of the new generation: a second master.
    minipaas(&after, &["scale", "master=2"]);
    wait_until("two masters", Duration::from_secs(30), || {
        let out = Command::new("docker")
            .args(["ps", "-q", "--filter", "label=keelson.job=cloud", "--filter", "label=keelson.group=master"])
            .output()
            .expect("docker ps");
        String::from_utf8_lossy(&out.stdout).lines().count() == 2
    });

    // Down: nothing left, the state folder included.
    let out = localcloud(&cloud.dir, &["--name", cloud.name, "down"]);
    assert!(out.status.success(), "down: {}", text(&out));
    assert!(!cloud.dir.exists(), "the state folder is removed");
    assert_eq!(MachineState::read(PROGRAMS), before, "the machine after down differs from before up");
}

#[test]
fn bad_requests_are_refused_with_the_bad_value_named() {
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("state");
    let refused = |args: &[&str], says: &str| {
        let out = localcloud(&state, args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(text(&out).contains(says), "{args:?}: {}", text(&out));
    };
    refused(&["--name", "Bad_Name", "up"], "\"Bad_Name\"");
    refused(&["--name", "ok", "up", "--hosts", "2"], "--hosts 2");
    refused(&["--name", "ok", "up", "--underlay", "10.9.0.0/16"], "10.9.0.0/16");
    // Loopback is routed here: an underlay over it is refused before anything is made.
    refused(&["--name", "ok", "up", "--underlay", "127.0.0.0/24", "--foreground"], "overlaps");
    let roles = dir.path().join("roles.toml");
    std::fs::write(&roles, "[services.web]\nport = 80\nreplica = 2\n").expect("roles");
    refused(&["--name", "ok", "up", "--roles", &roles.display().to_string(), "--foreground"], "replica");
    refused(&["up"], "--name");
    refused(&["--name", "ok", "reset"], "is the cloud up?");
    refused(&["--name", "ok", "down"], "is the cloud up?");
    assert!(!Path::new("/run/netns/lc-ok-sw").exists(), "a refused start makes nothing");
}
