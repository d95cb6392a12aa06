//! The platform a pipeline deploys to, started from the real binaries for a test or a
//! bench: etcd, keelson's registry (basic auth), logd (a token), one node agent on the
//! Docker Engine here, edge following the catalog, and `pipeline` watching a bare
//! repository, with a working copy of `examples/tests/fixtures/pipeline-app` to commit
//! from. Everything goes on drop (processes, the node's containers, the registry's images).

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

/// The node's containers, runs' containers and the registry's images, removed on drop.
struct Cleanup {
    node: String,
    registry: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        keelson_testkit::docker::remove_containers(&[&format!("label=keelson.node={}", self.node)]);
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

/// The running platform. Field order is drop order: the pipeline and the agent stop
/// before the servers they use.
pub struct Stack {
    _pipeline: Proc,
    _edge: Proc,
    _agent: Proc,
    _logd: Proc,
    _registry: Proc,
    _etcd: keelson_testkit::etcd::Etcd,
    _cleanup: Cleanup,
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
    /// The node agent's node.
    pub node: String,
    /// The registry (`127.0.0.1:port`).
    pub registry: String,
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
    pub fn start(bin: &dyn Fn(&str) -> PathBuf) -> Stack {
        let base = keelson_testkit::docker::busybox_image().expect("busybox image");
        let etcd = keelson_testkit::etcd::Etcd::start().expect("etcd");
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
        let node = format!("pipe-{}", std::process::id());
        let cleanup = Cleanup { node: node.clone(), registry: registry.clone() };
        let registry_proc = spawn(
            &bin("registry"),
            &["serve", "--root", &path(&dir.path().join("registry")), "--listen", &registry, "--htpasswd", &path(&htpasswd)],
            &logs.join("registry.log"),
        );
        let token = dir.path().join("logd.token");
        let logd_token = "pipeline-test-token".to_owned();
        std::fs::write(&token, format!("{logd_token}\n")).expect("token");
        let logd = format!("127.0.0.1:{}", keelson_testkit::free_port().expect("port"));
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
        let agent = spawn(
            &bin("node-agent"),
            &[
                "--etcd",
                &url,
                "--node",
                &node,
                "--cpu",
                "4000",
                "--memory",
                "4096",
                "--ttl",
                "3s",
                "--interval",
                "200ms",
                "--address",
                "127.0.0.1",
                "--ports",
                "27500-27549",
                "--registry-auth",
                &auth,
                "--logs-to",
                &logs_to,
                "--logs-token-file",
                &path(&token),
            ],
            &logs.join("agent.log"),
        );
        let edge: SocketAddr = format!("127.0.0.1:{}", keelson_testkit::free_port().expect("port")).parse().expect("addr");
        let edge_proc = spawn(&bin("edge"), &["--etcd", &url, "--listen", &edge.to_string()], &logs.join("edge.log"));
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
            _agent: agent,
            _logd: logd_proc,
            _registry: registry_proc,
            _etcd: etcd,
            _cleanup: cleanup,
            etcd_url: url,
            edge,
            status,
            logd,
            logd_token,
            logd_token_file: token,
            node,
            registry,
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
                std::fs::read_to_string(self.logs.join("agent.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
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
