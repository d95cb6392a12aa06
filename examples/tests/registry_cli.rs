//! The `registry` binary: serve with basic auth, push and pull an OCI layout with the
//! CLI (credentials from a file, never a flag), then, with the server stopped, `gc`
//! and `fsck` offline; `fsck` finds a corrupted blob and exits 1.

use std::process::{Command, Stdio};
use std::time::Duration;

struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_registry")).args(args).output().expect("registry runs")
}

#[test]
fn serve_push_pull_then_gc_and_fsck_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("ci:{}\n", bcrypt::hash("ci-secret-pw", 4).expect("hash"))).expect("htpasswd");
    let creds = dir.path().join("creds");
    std::fs::write(&creds, "ci:ci-secret-pw\n").expect("creds");
    let port = keelson_testkit::free_port().expect("port");
    let listen = format!("127.0.0.1:{port}");
    let metrics_addr = format!("127.0.0.1:{}", keelson_testkit::free_port().expect("port"));
    let log = dir.path().join("serve.log");
    let server = Serve(
        Command::new(env!("CARGO_BIN_EXE_registry"))
            .args(["serve", "--root", root.to_str().expect("utf8"), "--listen", &listen, "--htpasswd", htpasswd.to_str().expect("utf8")])
            .args(["--gc-interval", "300ms", "--metrics-listen", &metrics_addr])
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("serve"),
    );
    keelson_testkit::wait_for_tcp(listen.parse().expect("addr"), Duration::from_secs(20)).expect("listening");

    let layout = dir.path().join("layout");
    let top = keelson_testkit::oci::write_layout(&layout, "v1", &[("linux", "amd64"), ("linux", "arm64")], &[200_000, 30_000], 5)
        .expect("layout");
    let url = format!("http://{listen}");
    let out = cli(&["push", "--registry", &url, "--quiet", "--oci-layout", layout.to_str().expect("utf8"), "team/app:v1"]);
    assert!(!out.status.success(), "no credentials: refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&[
        "push",
        "--registry",
        &url,
        "--quiet",
        "--credentials-file",
        creds.to_str().expect("utf8"),
        "--oci-layout",
        layout.to_str().expect("utf8"),
        "team/app:v1",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&top));
    let pulled = dir.path().join("pulled");
    let out = cli(&[
        "pull",
        "--registry",
        &url,
        "--quiet",
        "--credentials-file",
        creds.to_str().expect("utf8"),
        "team/app:v1",
        "--oci-layout",
        pulled.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(keelson_testkit::oci::blobs(&pulled).expect("pulled"), keelson_testkit::oci::blobs(&layout).expect("layout"));
    // Garbage collection runs on its interval and what it removes is counted in metrics.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let m = rt
            .block_on(keelson_testkit::http::get_when_up(metrics_addr.parse().expect("addr"), "m", "/metrics", Duration::from_secs(5)))
            .expect("metrics");
        if !m.body.contains("registry_gc_runs_total 0") || std::time::Instant::now() > deadline {
            break m.body;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for name in
        ["registry_gc_runs_total", "registry_gc_blobs_removed_total", "registry_gc_uploads_removed_total", "registry_upload_bytes_total"]
    {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    assert!(!metrics.contains("registry_gc_runs_total 0"), "no GC ran:\n{metrics}");
    drop(server);
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(!logged.contains("ci-secret-pw"), "the password reached the log");

    let root = root.to_str().expect("utf8");
    let out = cli(&["gc", "--root", root, "--gc-grace", "0s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("removed 0 blobs"),
        "everything is referenced: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = cli(&["fsck", "--root", root]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // Flip a byte of a layer: fsck names it and fails.
    let (name, _) = keelson_testkit::oci::blobs(&layout)
        .expect("blobs")
        .into_iter()
        .max_by_key(|(n, _)| std::fs::metadata(layout.join("blobs/sha256").join(n)).map(|m| m.len()).unwrap_or(0))
        .expect("a blob");
    let stored = std::path::Path::new(root).join("blobs/sha256").join(&name[..2]).join(&name);
    let mut bytes = std::fs::read(&stored).expect("stored blob");
    bytes[1000] ^= 0xff;
    std::fs::write(&stored, bytes).expect("corrupt");
    let out = cli(&["fsck", "--root", root]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("corrupt blob sha256:{name}")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn bad_arguments_are_named() {
    let out = cli(&["serve", "--root", "/nonexistent-keelson/x", "--htpasswd", "/nonexistent-keelson/htpasswd"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent-keelson"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["push", "--registry", "ftp://x", "--oci-layout", "/tmp", "a:b"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("registry URL"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["pull", "Bad/Name:v1", "--oci-layout", "/tmp/x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Bad/Name"), "{}", String::from_utf8_lossy(&out.stderr));
}
