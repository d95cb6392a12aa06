//! `pipeline` end to end with the real binaries: etcd, keelson's registry (basic auth),
//! logd, a node agent on the Docker Engine here, edge following the catalog, and the
//! pipeline watching a bare repository. An application (`tests/fixtures/pipeline-app`:
//! busybox httpd serving a page, a testgrid suite, `keelson.json`) is pushed commit by
//! commit: v1 is built, tested, pushed, deployed and served through edge by name; v2
//! rolls out while a client calls through edge the whole time and sees no failed
//! request; a commit whose test fails deploys nothing; a commit whose health check fails
//! is rolled back by the controller. The status endpoint and logd show every run.
//! Processes, containers and images go at the end, also when the test fails.
#![cfg(all(feature = "etcd", feature = "docker"))]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pipeline-app");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The node's containers and every image of the registry used here, removed on drop.
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

fn spawn(bin: &str, args: &[&str], log: &Path) -> Proc {
    Proc(
        Command::new(bin)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("{bin}: {e}")),
    )
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.email=dev@keelson.test", "-c", "user.name=dev"])
        .args(args)
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read fixture") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Commits everything in `work` and pushes it to the bare repository.
fn push(work: &Path, bare: &Path, message: &str) {
    git(work, &["add", "-A"]);
    git(work, &["commit", "-qm", message]);
    git(work, &["push", "-q", bare.to_str().expect("utf8"), "main"]);
}

async fn served(edge: std::net::SocketAddr) -> Option<String> {
    match keelson_testkit::http::get(edge, "shop.test", "/").await {
        Ok(r) if r.status == 200 => Some(r.body.trim().to_owned()),
        _ => None,
    }
}

async fn runs(status: std::net::SocketAddr) -> Vec<Value> {
    match keelson_testkit::http::get(status, "127.0.0.1", "/v1/runs").await {
        Ok(r) if r.status == 200 => serde_json::from_str(&r.body).unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Waits until run `id` has ended; returns it.
async fn ended(status: std::net::SocketAddr, id: &str, logs: &Path) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(run) = runs(status).await.into_iter().find(|r| r["id"] == id && r["outcome"] != "running") {
            return run;
        }
        assert!(
            Instant::now() < deadline,
            "run {id} never ended: {:?}\npipeline: {}\nagent: {}",
            runs(status).await,
            std::fs::read_to_string(logs.join("pipeline.log")).unwrap_or_default(),
            std::fs::read_to_string(logs.join("agent.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_built_tested_pushed_deployed_and_served_and_bad_ones_stop_or_roll_back() {
    let base = keelson_testkit::docker::busybox_image().expect("busybox image");
    let etcd = keelson_testkit::etcd::Etcd::start().expect("etcd");
    let url = etcd.client_url();
    let dir = tempfile::tempdir().expect("dir");
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).expect("logs");
    let path = |p: &Path| p.to_str().expect("utf8").to_owned();

    // The registry with basic auth, logd with a token.
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("ci:{}\n", bcrypt::hash("ci-pw", 4).expect("hash"))).expect("htpasswd");
    let creds = dir.path().join("registry.creds");
    std::fs::write(&creds, "ci:ci-pw\n").expect("creds");
    let registry = format!("127.0.0.1:{}", keelson_testkit::free_port().expect("port"));
    let node = format!("pipe-{}", std::process::id());
    let _cleanup = Cleanup { node: node.clone(), registry: registry.clone() };
    let _registry = spawn(
        env!("CARGO_BIN_EXE_registry"),
        &["serve", "--root", &path(&dir.path().join("registry")), "--listen", &registry, "--htpasswd", &path(&htpasswd)],
        &logs.join("registry.log"),
    );
    let token = dir.path().join("logd.token");
    std::fs::write(&token, "pipeline-test-token\n").expect("token");
    let logd = format!("127.0.0.1:{}", keelson_testkit::free_port().expect("port"));
    let _logd = spawn(
        env!("CARGO_BIN_EXE_logd"),
        &["--dir", &path(&dir.path().join("logd")), "--listen", &logd, "--token-file", &path(&token)],
        &logs.join("logd.log"),
    );
    for addr in [&registry, &logd] {
        keelson_testkit::wait_for_tcp(addr.parse().expect("addr"), Duration::from_secs(20)).expect("server up");
    }

    // One node, the proxy, the pipeline.
    let auth = format!("{registry}={}", creds.display());
    let logs_to = format!("http://{logd}/v1/push");
    let _agent = spawn(
        env!("CARGO_BIN_EXE_node-agent"),
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
    let edge: std::net::SocketAddr = format!("127.0.0.1:{}", keelson_testkit::free_port().expect("port")).parse().expect("addr");
    let _edge = spawn(env!("CARGO_BIN_EXE_edge"), &["--etcd", &url, "--listen", &edge.to_string()], &logs.join("edge.log"));
    let work = dir.path().join("work");
    let bare = dir.path().join("shop.git");
    git(dir.path(), &["init", "-q", "--bare", &path(&bare)]);
    let status: std::net::SocketAddr = format!("127.0.0.1:{}", keelson_testkit::free_port().expect("port")).parse().expect("addr");
    let _pipeline = spawn(
        env!("CARGO_BIN_EXE_pipeline"),
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

    // v1: built, tested, pushed, deployed, served by name.
    copy_dir(Path::new(FIXTURE), &work);
    let dockerfile = std::fs::read_to_string(work.join("Dockerfile")).expect("Dockerfile").replace("@BUSYBOX@", &base);
    std::fs::write(work.join("Dockerfile"), dockerfile).expect("Dockerfile");
    git(&work, &["init", "-q", "-b", "main"]);
    let pushed = Instant::now();
    push(&work, &bare, "v1");
    let run = ended(status, "shop-1", &logs).await;
    assert_eq!(run["outcome"], "deployed", "{run}");
    let steps: Vec<&str> = run["steps"].as_array().expect("steps").iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(steps, ["build", "test", "push", "deploy"]);
    assert!(run["image"].as_str().expect("image").starts_with(&format!("{registry}/shop:")));
    let deadline = Instant::now() + Duration::from_secs(60);
    while served(edge).await.as_deref() != Some("v1") {
        assert!(
            Instant::now() < deadline,
            "edge never served v1\nedge: {}",
            std::fs::read_to_string(logs.join("edge.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("v1 served {:.1} s after the push", pushed.elapsed().as_secs_f64());

    // A client through edge from here on: no request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = tokio::spawn({
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                match served(edge).await {
                    Some(_) => ok.fetch_add(1, Ordering::Relaxed),
                    None => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });

    // v2 rolls out.
    std::fs::write(work.join("www/index.html"), "v2\n").expect("v2");
    push(&work, &bare, "v2");
    let run = ended(status, "shop-2", &logs).await;
    assert_eq!(run["outcome"], "deployed", "{run}");
    assert_eq!(run["version"], 2);
    let deadline = Instant::now() + Duration::from_secs(30);
    while served(edge).await.as_deref() != Some("v2") {
        assert!(Instant::now() < deadline, "edge never served v2");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A failing test: nothing is pushed or deployed.
    std::fs::write(work.join("www/index.html"), "broken page\n").expect("v3");
    push(&work, &bare, "v3 breaks the content test");
    let run = ended(status, "shop-3", &logs).await;
    assert_eq!(run["outcome"], "tests_failed", "{run}");
    let steps: Vec<&str> = run["steps"].as_array().expect("steps").iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(steps, ["build", "test"], "no push, no deploy");
    assert!(run["version"].is_null());
    assert_eq!(served(edge).await.as_deref(), Some("v2"));

    // A failing health check: deployed, then rolled back by the controller.
    std::fs::write(work.join("www/index.html"), "v4\n").expect("v4");
    std::fs::remove_file(work.join("www/health")).expect("no health");
    push(&work, &bare, "v4 has no health endpoint");
    let run = ended(status, "shop-4", &logs).await;
    assert_eq!(run["outcome"], "rolled_back", "{run}");
    assert_eq!(run["version"], 3, "the version after the stable one: the failed test deployed nothing");
    assert_eq!(served(edge).await.as_deref(), Some("v2"));

    stop.store(true, Ordering::Relaxed);
    client.await.expect("client");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 100, "the client kept calling: {ok}");
    assert_eq!(failed, 0, "{failed} of {} requests through edge failed during the rollouts", ok + failed);

    // Every run's log is in logd.
    let query =
        keelson_examples::logs_client::LogQuery { service: "pipeline.shop".into(), instance: Some("shop-3".into()), ..Default::default() };
    let lines =
        keelson_examples::logs_client::fetch_records(&query, &format!("http://{logd}"), Some("pipeline-test-token")).await.expect("logd");
    let text: Vec<String> = lines.iter().map(|r| r.line.clone()).collect();
    assert!(text.iter().any(|l| l.contains("test content: failed")), "{text:?}");
    assert!(!std::fs::read_to_string(logs.join("pipeline.log")).unwrap_or_default().contains("ci-pw"), "the password stays out of logs");
}
