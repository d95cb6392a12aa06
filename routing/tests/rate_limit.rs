//! Per-route rate limits through the real proxy: over the limit is 429 with Retry-After,
//! other routes are unaffected, and bad limits are typed errors.

use std::sync::Arc;

use keelson_routing::{Endpoint, Error, Host, MemoryRouter, Proxy, ProxyConfig, RateLimit, Route, RouteChange, Router, RoutesFile};
use keelson_testkit::http::{echo_server, get};

#[tokio::test]
async fn over_the_limit_is_429_and_other_routes_are_unaffected() {
    let (up, _t) = echo_server("up").await.expect("echo");
    let router = Arc::new(MemoryRouter::new());
    // One token a second: nothing refills while the test runs.
    let limited = Route::new(Host::new("limited.test").expect("host"), vec![Endpoint::new("u", up)])
        .with_rate_limit(RateLimit { per_second: 1, burst: 2 });
    let free = Route::new(Host::new("free.test").expect("host"), vec![Endpoint::new("u", up)]);
    router.apply(vec![RouteChange::Upsert(limited.clone()), RouteChange::Upsert(free)]).await.expect("apply");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(Arc::new(Proxy::new(router.clone(), ProxyConfig::default())).serve(listener, std::future::pending()));

    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(get(addr, "limited.test", "/").await.expect("get").status);
    }
    assert_eq!(statuses, vec![200, 200, 429, 429]);
    let over = get(addr, "limited.test", "/").await.expect("get");
    assert_eq!(over.headers.get("retry-after").map(String::as_str), Some("1"));
    for _ in 0..5 {
        assert_eq!(get(addr, "free.test", "/").await.expect("get").status, 200);
    }
    // Re-applying the same limit keeps the (empty) bucket: an update is not a refill.
    router.apply(vec![RouteChange::Upsert(limited.with_path(keelson_routing::PathPrefix::root()))]).await.expect("apply");
    assert_eq!(get(addr, "limited.test", "/").await.expect("get").status, 429);
}

#[tokio::test]
async fn zero_limits_are_rejected_in_code_and_in_files() {
    let router = MemoryRouter::new();
    let route = Route::new(Host::new("x.test").expect("host"), vec![]).with_rate_limit(RateLimit { per_second: 0, burst: 5 });
    assert!(matches!(router.apply(vec![RouteChange::Upsert(route)]).await, Err(Error::InvalidInput { .. })));
    let file = r#"{"routes": [{"host": "x.test", "endpoints": [], "rate_limit": {"per_second": 10, "burst": 20}}]}"#;
    assert_eq!(RoutesFile::parse(file).expect("parses").routes[0].rate_limit, Some(RateLimit { per_second: 10, burst: 20 }));
    let typo = r#"{"routes": [{"host": "x.test", "endpoints": [], "rate_limit": {"per_sec": 10, "burst": 20}}]}"#;
    assert!(matches!(RoutesFile::parse(typo), Err(Error::InvalidInput { .. })), "unknown keys are rejected");
}
