//! Active health checks against real upstreams: a stopped upstream leaves rotation before
//! any client request fails on it, and comes back when it listens again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keelson_routing::{
    spawn_active_health, ActiveProbe, CheckConfig, Endpoint, Error, Host, MemoryRouter, Proxy, ProxyConfig, Route, RouteChange, Router,
};
use keelson_testkit::http::{echo_server, get};

fn fast() -> CheckConfig {
    {
        let mut built = CheckConfig::default();
        built.interval = Duration::from_millis(50);
        built.timeout = Duration::from_millis(500);
        built.rise = 2;
        built.fall = 2;
        built
    }
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An echo server on a fixed address, answering `/healthz` like every path.
async fn echo_on(addr: SocketAddr, id: &'static str) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
    let (probe_addr, task) = echo_server(id).await.expect("echo");
    // Forward raw bytes from the fixed address to a fresh echo server.
    tokio::spawn(async move {
        let _keep = task;
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(probe_addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_upstream_leaves_rotation_before_clients_see_it_fail() {
    let (stable, _t) = echo_server("stable").await.expect("echo");
    let flaky_addr: SocketAddr = ([127, 0, 0, 1], keelson_testkit::free_port().expect("port")).into();
    let flaky = echo_on(flaky_addr, "flaky").await;
    let router = Arc::new(MemoryRouter::new());
    let route =
        Route::new(Host::new("checked.test").expect("host"), vec![Endpoint::new("stable", stable), Endpoint::new("flaky", flaky_addr)]);
    router.apply(vec![RouteChange::Upsert(route)]).await.expect("apply");
    let _checks = spawn_active_health(router.clone(), ActiveProbe::Http { path: "/healthz".into() }, fast()).expect("checks");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy = listener.local_addr().expect("addr");
    let config = {
        let mut built = ProxyConfig::default();
        built.max_retries = 0;
        built
    };
    tokio::spawn(Arc::new(Proxy::new(router.clone(), config)).serve(listener, std::future::pending()));
    let stats = |id: &str| router.snapshot().lookup("checked.test").and_then(|r| r.stats(id).cloned()).expect("stats");

    flaky.abort();
    until("the stopped upstream is probed down", || stats("flaky").is_probe_down()).await;
    // Retries are off: a request sent to the stopped upstream would fail. None is.
    for _ in 0..10 {
        let r = get(proxy, "checked.test", "/").await.expect("get");
        assert_eq!((r.status, r.body.lines().next()), (200, Some("stable")), "{}", r.body);
    }
    assert_eq!(stats("flaky").failures_total(), 0, "no client request reached the stopped upstream");

    let _back = echo_on(flaky_addr, "flaky").await;
    until("the upstream is back in rotation", || !stats("flaky").is_probe_down()).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(get(proxy, "checked.test", "/").await.expect("get").body.lines().next().unwrap_or_default().to_owned());
    }
    assert!(seen.iter().any(|s| s == "flaky"), "re-admitted upstream gets traffic: {seen:?}");
}

#[tokio::test]
async fn bad_check_settings_are_typed_errors() {
    let router = Arc::new(MemoryRouter::new());
    let zero = {
        let mut built = CheckConfig::default();
        built.interval = Duration::ZERO;
        built
    };
    assert!(matches!(spawn_active_health(router.clone(), ActiveProbe::Tcp, zero), Err(Error::InvalidInput { .. })));
    let path = ActiveProbe::Http { path: "healthz".into() };
    assert!(matches!(spawn_active_health(router, path, CheckConfig::default()), Err(Error::InvalidInput { .. })));
}
