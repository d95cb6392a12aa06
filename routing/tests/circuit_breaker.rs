//! Max-in-flight circuit breaking: once a route has its limit of requests in flight
//! (here to an upstream that accepts and never answers), the next request gets 503 at
//! once, other routes are unaffected, and the route serves again once load drains.

use std::sync::Arc;
use std::time::Duration;

use keelson_routing::{Endpoint, Host, MemoryRouter, Proxy, ProxyConfig, Route, RouteChange, Router};
use keelson_testkit::http::{echo_server, get};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_at_its_in_flight_limit_sheds_load_with_503() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    // Accept and hold connections, so requests stay in flight until the upstream timeout.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            held.push(c);
        }
    });
    let (ok, _task) = echo_server("ok").await.expect("upstream");
    let router = Arc::new(MemoryRouter::new());
    router
        .apply(vec![
            RouteChange::Upsert(Route::new(Host::new("stuck.test").expect("host"), vec![Endpoint::new("stuck", silent_addr)])),
            RouteChange::Upsert(Route::new(Host::new("fine.test").expect("host"), vec![Endpoint::new("fine", ok)])),
        ])
        .await
        .expect("apply");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = {
        let mut built = ProxyConfig::default();
        built.max_in_flight_per_route = 2;
        built.upstream_timeout = Duration::from_millis(1500);
        built
    };
    tokio::spawn(Arc::new(Proxy::new(router.clone(), config)).serve(listener, std::future::pending()));

    let stuck: Vec<_> = (0..2).map(|_| tokio::spawn(async move { get(addr, "stuck.test", "/").await.expect("response").status })).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while router.snapshot().lookup("stuck.test").expect("route").in_flight() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the two requests never got in flight");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let shed = get(addr, "stuck.test", "/").await.expect("response");
    assert_eq!(shed.status, 503, "{}", shed.body);
    assert!(shed.body.contains("2 requests in flight, the limit is 2"), "{}", shed.body);
    assert_eq!(get(addr, "fine.test", "/").await.expect("response").status, 200, "other routes are unaffected");

    // The held requests end with the upstream timeout; then the route admits again.
    for s in stuck {
        assert_eq!(s.await.expect("task"), 504);
    }
    assert_eq!(router.snapshot().lookup("stuck.test").expect("route").in_flight(), 0);
    router
        .apply(vec![RouteChange::Upsert(Route::new(Host::new("stuck.test").expect("host"), vec![Endpoint::new("fine", ok)]))])
        .await
        .expect("apply");
    assert_eq!(get(addr, "stuck.test", "/").await.expect("response").status, 200);
}
