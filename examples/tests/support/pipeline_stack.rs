//! The platform a pipeline deploys to, started from the real binaries for a test or a
//! bench: etcd, keelson's registry (basic auth), logd (a token), node agents on the
//! Docker Engine here, edge following the catalog, and `pipeline` watching a bare
//! repository, with a working copy of `examples/tests/fixtures/pipeline-app` to commit
//! from. Everything goes on drop (processes, the nodes' containers, the registry's
//! images, the hosts' namespaces).
//!
//! Two layouts: [`Hosts::Loopback`], one agent on the host's own network (the bench), and
//! [`Hosts::Overlay`], agents in network namespaces acting as hosts on one underlay,
//! their tasks on keelson's overlay, with edge on the first host (the end-to-end test).
//! etcd and logd then listen on the root namespace's underlay address; the registry stays
//! on loopback, since the Docker Engine that pulls from it runs in the root namespace.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tests/fixtures/pipeline-app");

pub struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where the node agents run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(dead_code)] // the bench uses one layout, the test the other
pub enum Hosts {
    /// One agent on the host's network, tasks publishing ports on loopback.
    Loopback,
    /// This many agents, each in a namespace acting as a host, tasks on the overlay.
    Overlay(usize),
}

/// The nodes' containers, runs' containers and the registry's images, removed on drop.
struct Cleanup {
    nodes: Vec<String>,
    registry: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for node in &self.nodes {
            keelson_testkit::docker::remove_containers(&[&format!("label=keelson.node={node}")]);
        }
        for id in keelson_testkit::docker::containers(&["label=keelson.run"]) {
            let _ = Command::new("docker").args(["rm", "-f", &id]).output();
        }
        if let Ok(out) = Command::new("docker").args(["images", "--format", "{{.Repository}}:{{.Tag}}"]).output() {
            for image in
                String::from_utf8_lossy(&out.stdout).lines().filter(|i| i.starts_with(&self.registry) || i.starts_with("testgrid-suite:"))
            {
                let _ = Command::new("docker").args(["rmi", "-f", image]).output();
            }
        }
    }
}

fn spawn(bin: &Path, args: &[&str], log: &Path) -> Proc {
    Proc(
        Command::new(bin)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display())),
    )
}

pub fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.email=dev@keelson.test", "-c", "user.name=dev"])
        .args(args)
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Keeps every process's log when the test fails: copied out of the temporary folder
/// (which goes on drop) to one named on stderr.
struct KeepLogsOnFailure(PathBuf);

impl Drop for KeepLogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept = std::env::temp_dir().join(format!("keelson-pipeline-logs-{}", std::process::id()));
            if keelson_testkit::copy_dir(&self.0, &kept).is_ok() {
                eprintln!("the platform's logs are kept in {}", kept.display());
            }
        }
    }
}

/// The running platform. Field order is drop order: the pipeline and the agents stop
/// before the servers they use, the containers go before the hosts' namespaces.
pub struct Stack {
    _pipeline: Proc,
    _edge: Proc,
    _agents: Vec<Proc>,
    _logd: Proc,
    _registry: Proc,
    _etcd: keelson_testkit::etcd::Etcd,
    _cleanup: Cleanup,
    _underlay: Option<keelson_testkit::netns::Underlay>,
    _keep_logs: KeepLogsOnFailure,
    /// etcd's client URL.
    pub etcd_url: String,
    /// edge.
    pub edge: SocketAddr,
    /// The pipeline's status endpoint.
    pub status: SocketAddr,
    /// logd (`127.0.0.1:port`), its token and the file holding it.
    pub logd: String,
    pub logd_token: String,
    pub logd_token_file: PathBuf,
    /// The node agents' nodes.
    pub nodes: Vec<String>,
    /// The registry (`127.0.0.1:port`).
    pub registry: String,
    /// The file holding the registry's credentials (`ci:ci-pw`).
    pub registry_creds: PathBuf,
    /// The working copy commits are made in (the fixture app, on branch main).
    pub work: PathBuf,
    /// The bare repository the pipeline watches.
    pub bare: PathBuf,
    /// Every process's stderr.
    pub logs: PathBuf,
    _dir: tempfile::TempDir,
}

impl Stack {
    /// Starts it all; `bin` finds a keelson-examples binary by name.
    pub fn start(bin: &dyn Fn(&str) -> PathBuf, hosts: Hosts) -> Stack {
        let base = keelson_testkit::docker::busybox_image().expect("busybox image");
        let (mut underlay, servers_at) = match hosts {
            Hosts::Loopback => (None, std::net::Ipv4Addr::LOCALHOST),
            Hosts::Overlay(n) => {
                let mut ul = keelson_testkit::netns::Underlay::create(n, "198.18.71").expect("underlay");
                let root = ul.join_root().expect("the test on the underlay");
                (Some(ul), root)
            }
        };
        let etcd = match hosts {
            Hosts::Loopback => keelson_testkit::etcd::Etcd::start(),
            Hosts::Overlay(_) => keelson_testkit::etcd::Etcd::start_on(servers_at, &[]),
        }
        .expect("etcd");
        let url = etcd.client_url();
        let dir = tempfile::tempdir().expect("dir");
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).expect("logs");
        let path = |p: &Path| p.to_str().expect("utf8").to_owned();
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, format!("ci:{}\n", bcrypt::hash("ci-pw", 4).expect("hash"))).expect("htpasswd");
        let creds = dir.path().join("registry.creds");
        std::fs::write(&creds, "ci:ci-pw\n").expect("creds");
        let registry = format!("127.0.0.1:{}", keelson_testkit::free_port().expect("port"));
        let nodes: Vec<String> = match hosts {
            Hosts::Loopback => vec![format!("pipe-{}", std::process::id())],
            Hosts::Overlay(n) => (1..=n).map(|i| format!("pipe{i}-{}", std::process::id())).collect(),
        };
        let cleanup = Cleanup { nodes: nodes.clone(), registry: registry.clone() };
        let registry_proc = spawn(
            &bin("registry"),
            &["serve", "--root", &path(&dir.path().join("registry")), "--listen", &registry, "--htpasswd", &path(&htpasswd)],
            &logs.join("registry.log"),
        );
        let token = dir.path().join("logd.token");
        let logd_token = "pipeline-test-token".to_owned();
        std::fs::write(&token, format!("{logd_token}\n")).expect("token");
        let logd = format!("{servers_at}:{}", keelson_testkit::free_port().expect("port"));
        let logd_proc = spawn(
            &bin("logd"),
            &["--dir", &path(&dir.path().join("logd")), "--listen", &logd, "--token-file", &path(&token)],
            &logs.join("logd.log"),
        );
        for addr in [&registry, &logd] {
            keelson_testkit::wait_for_tcp(addr.parse().expect("addr"), Duration::from_secs(20)).expect("server up");
        }
        let auth = format!("{registry}={}", creds.display());
        let logs_to = format!("http://{logd}/v1/push");
        let agent_args = |node: &str, address: &str, ports: &str| -> Vec<String> {
            [
                "--etcd",
                &url,
                "--node",
                node,
                "--cpu",
                "4000",
                "--memory",
                "4096",
                "--ttl",
                "3s",
                "--interval",
                "200ms",
                "--address",
                address,
                "--ports",
                ports,
                "--registry-auth",
                &auth,
                "--logs-to",
                &logs_to,
                "--logs-token-file",
                &path(&token),
            ]
            .map(str::to_owned)
            .to_vec()
        };
        let (agents, edge, edge_proc) = match &underlay {
            None => {
                let args = agent_args(&nodes[0], "127.0.0.1", "27500-27549");
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let agent = spawn(&bin("node-agent"), &args, &logs.join("agent0.log"));
                let edge: SocketAddr = format!("127.0.0.1:{}", keelson_testkit::free_port().expect("port")).parse().expect("addr");
                let edge_proc = spawn(&bin("edge"), &["--etcd", &url, "--listen", &edge.to_string()], &logs.join("edge.log"));
                (vec![agent], edge, edge_proc)
            }
            Some(ul) => {
                let mut agents = Vec::new();
                for (i, host) in ul.hosts.iter().enumerate() {
                    let addr = ul.addresses[i].to_string();
                    let mut args = agent_args(&nodes[i], &addr, "27500-27549");
                    let state = path(&dir.path().join(format!("netplumb{i}")));
                    for a in ["--network", "overlay", "--network-subnet", "10.247.0.0/16", "--network-name", "pipe"] {
                        args.push(a.to_owned());
                    }
                    args.extend(["--network-state-dir".to_owned(), state]);
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let child = host.spawn(&bin("node-agent"), &args, &logs.join(format!("agent{i}.log"))).expect("node agent");
                    agents.push(Proc(child));
                }
                // Edge on the first host: it reaches every task over the overlay.
                let edge = SocketAddr::from((ul.addresses[0], 8088));
                let child = ul.hosts[0].spawn(&bin("edge"), &["--etcd", &url, "--listen", &edge.to_string()], &logs.join("edge.log"));
                (agents, edge, Proc(child.expect("edge")))
            }
        };
        let work = dir.path().join("work");
        let bare = dir.path().join("shop.git");
        git(dir.path(), &["init", "-q", "--bare", &path(&bare)]);
        let status: SocketAddr = format!("127.0.0.1:{}", keelson_testkit::free_port().expect("port")).parse().expect("addr");
        let pipeline = spawn(
            &bin("pipeline"),
            &[
                "--repo",
                &path(&bare),
                "--branch",
                "main",
                "--registry",
                &registry,
                "--registry-auth-file",
                &path(&creds),
                "--etcd",
                &url,
                "--logd",
                &format!("http://{logd}"),
                "--logd-token-file",
                &path(&token),
                "--listen",
                &status.to_string(),
                "--poll",
                "200ms",
                "--deploy-timeout",
                "2m",
            ],
            &logs.join("pipeline.log"),
        );
        keelson_testkit::copy_dir(Path::new(FIXTURE), &work).expect("fixture");
        let dockerfile = std::fs::read_to_string(work.join("Dockerfile")).expect("Dockerfile").replace("@BUSYBOX@", &base);
        std::fs::write(work.join("Dockerfile"), dockerfile).expect("Dockerfile");
        git(&work, &["init", "-q", "-b", "main"]);
        Stack {
            _pipeline: pipeline,
            _edge: edge_proc,
            _agents: agents,
            _logd: logd_proc,
            _registry: registry_proc,
            _etcd: etcd,
            _cleanup: cleanup,
            _underlay: underlay.take(),
            _keep_logs: KeepLogsOnFailure(logs.clone()),
            etcd_url: url,
            edge,
            status,
            logd,
            logd_token,
            logd_token_file: token,
            nodes,
            registry,
            registry_creds: creds,
            work,
            bare,
            logs,
            _dir: dir,
        }
    }

    /// Commits everything in the working copy and pushes it to the bare repository.
    pub fn push(&self, message: &str) {
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-qm", message]);
        git(&self.work, &["push", "-q", self.bare.to_str().expect("utf8"), "main"]);
    }

    /// What edge serves for `shop.test`, if it answers 200.
    pub async fn served(&self) -> Option<String> {
        match keelson_testkit::http::get(self.edge, "shop.test", "/").await {
            Ok(r) if r.status == 200 => Some(r.body.trim().to_owned()),
            _ => None,
        }
    }

    /// Every run the status endpoint lists.
    pub async fn runs(&self) -> Vec<serde_json::Value> {
        match keelson_testkit::http::get(self.status, "127.0.0.1", "/v1/runs").await {
            Ok(r) if r.status == 200 => serde_json::from_str(&r.body).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Waits until run `id` has ended; returns it.
    pub async fn ended(&self, id: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(run) = self.runs().await.into_iter().find(|r| r["id"] == id && r["outcome"] != "running") {
                return run;
            }
            assert!(
                Instant::now() < deadline,
                "run {id} never ended: {:?}\npipeline: {}\nagent: {}",
                self.runs().await,
                std::fs::read_to_string(self.logs.join("pipeline.log")).unwrap_or_default(),
                self.agent_logs()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Every agent's stderr.
    pub fn agent_logs(&self) -> String {
        (0..self.nodes.len())
            .map(|i| std::fs::read_to_string(self.logs.join(format!("agent{i}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    /// Waits until edge serves `body`, for at most `limit`.
    pub async fn until_served(&self, body: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.served().await.as_deref() != Some(body) {
            assert!(
                Instant::now() < deadline,
                "edge never served {body:?}\nedge: {}",
                std::fs::read_to_string(self.logs.join("edge.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
