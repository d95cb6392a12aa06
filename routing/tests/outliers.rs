//! Passive health and retries against real backends (busybox httpd processes): a backend
//! killed with SIGKILL under load costs the client nothing, is ejected after one failed
//! attempt, and comes back once it recovers.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use keelson_routing::{Endpoint, Host, MemoryRouter, OutlierPolicy, Proxy, ProxyConfig, Route, RouteChange, Router};

/// `busybox httpd` serving `body` on a free port, in the foreground.
fn httpd(body: &str, port: u16, dir: &std::path::Path) -> Child {
    let busybox = keelson_testkit::require("busybox", "busybox-static").expect("busybox");
    let root = dir.join(body);
    std::fs::create_dir_all(&root).expect("dir");
    std::fs::write(root.join("index.html"), body).expect("index");
    let child = Command::new(busybox)
        .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
        .arg(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("httpd starts");
    keelson_testkit::wait_for_tcp(SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(5)).expect("httpd listens");
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_is_ejected_after_one_failure_and_readmitted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = keelson_testkit::free_ports(4).expect("ports");
    let mut backends: Vec<Child> = ports.iter().enumerate().map(|(i, p)| httpd(&format!("up{i}"), *p, dir.path())).collect();
    let router = Arc::new(MemoryRouter::new());
    let endpoints =
        ports.iter().enumerate().map(|(i, p)| Endpoint::new(format!("up{i}"), SocketAddr::from(([127, 0, 0, 1], *p)))).collect();
    router.apply(vec![RouteChange::Upsert(Route::new(Host::new("k.test").expect("host"), endpoints))]).await.expect("apply");
    let config = {
        let mut built = ProxyConfig::default();
        built.outlier = {
            let mut built = OutlierPolicy::default();
            built.consecutive_failures = 1;
            built.base_ejection = Duration::from_secs(1);
            built.max_ejection = Duration::from_secs(4);
            built
        };
        built
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(Arc::new(Proxy::new(router.clone(), config)).serve(listener, std::future::pending()));

    let get = || async move { keelson_testkit::http::get(addr, "k.test", "/index.html").await.expect("response") };
    for _ in 0..20 {
        assert_eq!(get().await.status, 200);
    }
    // SIGKILL one backend while requests keep coming.
    let _ = backends[2].kill();
    let _ = backends[2].wait();
    let mut failed = 0;
    for _ in 0..100 {
        let r = get().await;
        if r.status != 200 {
            failed += 1;
        }
        assert!(r.body.trim() != "up2" || r.status != 200);
    }
    assert_eq!(failed, 0, "the client saw failures");
    let table = router.snapshot();
    let stats = table.lookup("k.test").expect("route").stats("up2").expect("stats").clone();
    drop(table);
    assert!(stats.failures_total() >= 1, "the dead backend was tried");
    assert!(stats.failures_total() <= 2, "ejected after one failure (plus at most one re-admission probe), got {}", stats.failures_total());

    // It recovers: after its ejection it gets traffic again.
    backends[2] = httpd("up2", ports[2], dir.path());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if get().await.body.trim() == "up2" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "recovered backend was not re-admitted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for mut b in backends {
        let _ = b.kill();
        let _ = b.wait();
    }
}

#[tokio::test]
async fn requests_with_bodies_are_not_retried() {
    // Nothing listens on the only endpoint: a POST fails once with 502, it is not retried
    // (the retry counter stays at one failure).
    let dead = keelson_testkit::free_port().expect("port");
    let router = Arc::new(MemoryRouter::new());
    router
        .apply(vec![RouteChange::Upsert(Route::new(
            Host::new("p.test").expect("host"),
            vec![Endpoint::new("d", SocketAddr::from(([127, 0, 0, 1], dead)))],
        ))])
        .await
        .expect("apply");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(Arc::new(Proxy::new(router.clone(), ProxyConfig::default())).serve(listener, std::future::pending()));
    let r = keelson_testkit::http::request(addr, "POST", "p.test", "/", &[("content-length", "0")]).await.expect("response");
    assert_eq!(r.status, 502);
    let table = router.snapshot();
    assert_eq!(table.lookup("p.test").expect("route").stats("d").expect("stats").failures_total(), 1, "one attempt only");
}
