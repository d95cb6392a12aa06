//! The proxy's Prometheus metrics, read back in text format after real traffic.

use std::net::SocketAddr;
use std::sync::Arc;

use keelson_routing::{Endpoint, Host, MemoryRouter, Proxy, ProxyConfig, Route, RouteChange, Router};
use keelson_testkit::http::{echo_server, get};
use prometheus_client::registry::Registry;

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
        .trim()
        .parse()
        .expect("number")
}

#[tokio::test]
async fn requests_retries_and_ejections_are_counted() {
    let (up, _task) = echo_server("up").await.expect("upstream");
    let dead: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let router = Arc::new(MemoryRouter::new());
    router
        .apply(vec![
            RouteChange::Upsert(Route::new(Host::new("m.test").expect("host"), vec![Endpoint::new("up", up)])),
            RouteChange::Upsert(Route::new(Host::new("dead.test").expect("host"), vec![Endpoint::new("dead", dead)])),
        ])
        .await
        .expect("apply");
    let proxy = Arc::new(Proxy::new(router, ProxyConfig::default()));
    let mut registry = Registry::default();
    proxy.register_metrics(&mut registry);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(proxy.clone().serve(listener, std::future::pending()));

    for (host, status) in [("m.test", 200), ("m.test", 200), ("elsewhere.test", 404), ("dead.test", 502)] {
        assert_eq!(get(addr, host, "/").await.expect("response").status, status, "{host}");
    }

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert_eq!(value(&text, r#"keelson_proxy_requests_total{route="m.test",code="2xx"}"#), 2.0);
    // Unrouted requests share one series: a client's Host must not create new ones.
    assert_eq!(value(&text, r#"keelson_proxy_requests_total{route="",code="4xx"}"#), 1.0);
    assert!(!text.contains("elsewhere.test"), "{text}");
    assert_eq!(value(&text, r#"keelson_proxy_requests_total{route="dead.test",code="5xx"}"#), 1.0);
    assert_eq!(value(&text, "keelson_proxy_response_seconds_count"), 4.0);
    assert!(value(&text, "keelson_proxy_ejections_total") >= 1.0, "{text}");
    // The GET to the dead endpoint is retryable: each further attempt is either a retry
    // or a retry the budget denied; ProxyConfig::default() allows two.
    let attempts = value(&text, "keelson_proxy_retries_total") + value(&text, "keelson_proxy_retries_denied_total");
    assert!(attempts >= 1.0, "{text}");
}
