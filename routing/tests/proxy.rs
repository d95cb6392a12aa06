//! The proxy against real upstream servers and a real HTTP client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::{Discovery, Health, MemoryDiscovery, Registration, ServiceName};
use keelson_routing::{follow_discovery, Endpoint, Error, Host, MemoryRouter, Proxy, ProxyConfig, Route, RouteChange, Router, RoutesFile};
use keelson_testkit::http::{echo_server, get, request};

async fn start_proxy(
    router: Arc<dyn Router>,
    config: ProxyConfig,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(Arc::new(Proxy::new(router, config)).serve(listener, async move {
        let _ = stopped.await;
    }));
    (addr, stop, task)
}

async fn route(router: &MemoryRouter, host: &str, endpoints: Vec<Endpoint>) {
    router.apply(vec![RouteChange::Upsert(Route::new(Host::new(host).expect("host"), endpoints))]).await.expect("apply");
}

#[tokio::test]
async fn round_robin_over_healthy_upstreams_with_forwarding_headers() {
    let (a, _ta) = echo_server("up-a").await.expect("a");
    let (b, _tb) = echo_server("up-b").await.expect("b");
    let router = Arc::new(MemoryRouter::new());
    route(&router, "app.test", vec![Endpoint::new("a", a), Endpoint::new("b", b)]).await;
    let (proxy, _stop, _task) = start_proxy(router.clone(), ProxyConfig::default()).await;

    let mut seen = Vec::new();
    for _ in 0..4 {
        let r = request(
            proxy,
            "GET",
            "App.Test:8080",
            "/x?y=1",
            &[
                ("x-forwarded-for", "203.0.113.9"),
                ("connection", "close, x-secret"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
            ],
        )
        .await
        .expect("response");
        assert_eq!(r.status, 200);
        let mut lines = r.body.lines();
        seen.push(lines.next().expect("id line").to_owned());
        let headers: Vec<&str> = lines.collect();
        assert!(headers.contains(&"x-forwarded-for: 203.0.113.9, 127.0.0.1"), "{headers:?}");
        assert!(headers.contains(&"x-forwarded-host: app.test"), "{headers:?}");
        assert!(headers.contains(&"x-forwarded-proto: http"), "{headers:?}");
        assert!(headers.contains(&"host: App.Test:8080"), "Host passes through: {headers:?}");
        for hop in ["x-secret", "keep-alive", "te", "upgrade", "proxy-connection"] {
            assert!(!headers.iter().any(|h| h.starts_with(&format!("{hop}:"))), "{hop} reached upstream: {headers:?}");
        }
    }
    assert_eq!(seen, vec!["up-a", "up-b", "up-a", "up-b"]);
}

#[tokio::test]
async fn errors_have_the_right_status_and_a_clear_body() {
    let router = Arc::new(MemoryRouter::new());
    // A port with nothing listening: bind, read the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let mut down = Endpoint::new("down", dead);
    down.healthy = false;
    route(&router, "dead.test", vec![Endpoint::new("dead", dead)]).await;
    route(&router, "down.test", vec![down]).await;
    // An upstream that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    route(&router, "slow.test", vec![Endpoint::new("slow", silent.local_addr().expect("addr"))]).await;
    let config = {
        let mut built = ProxyConfig::default();
        built.upstream_timeout = Duration::from_millis(300);
        built
    };
    let (proxy, _stop, _task) = start_proxy(router, config).await;

    for (host, status, text) in [
        ("nowhere.test", 404, "no route for host nowhere.test"),
        ("down.test", 503, "no healthy endpoint for host down.test"),
        ("dead.test", 502, "is unreachable"),
        ("slow.test", 504, "did not answer within 300ms"),
    ] {
        let r = get(proxy, host, "/").await.expect("response");
        assert_eq!(r.status, status, "{host}: {}", r.body);
        assert!(r.body.starts_with("keelson: ") && r.body.contains(text), "{host}: {}", r.body);
        assert_eq!(r.headers.get("content-type").map(String::as_str), Some("text/plain; charset=utf-8"));
    }
    let r = request(proxy, "GET", "bad host!", "/", &[]).await.expect("response");
    assert_eq!(r.status, 400, "{}", r.body);
    drop(silent);
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    // Count upstream TCP connections: keep-alive means 20 requests use far fewer than 20.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { return };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(s), svc).await;
            });
        }
    });
    let router = Arc::new(MemoryRouter::new());
    route(&router, "ka.test", vec![Endpoint::new("k", addr)]).await;
    let (proxy, _stop, _task) = start_proxy(router, ProxyConfig::default()).await;
    for _ in 0..20 {
        assert_eq!(get(proxy, "ka.test", "/").await.expect("response").status, 200);
    }
    let n = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(n <= 2, "20 sequential requests opened {n} upstream connections");
}

#[tokio::test]
async fn routes_follow_discovery_tags_and_health() {
    let (a, _ta) = echo_server("inst-a").await.expect("a");
    let (b, _tb) = echo_server("inst-b").await.expect("b");
    let discovery = Arc::new(MemoryDiscovery::memory());
    let router = Arc::new(MemoryRouter::new());
    let _follow = follow_discovery(discovery.clone(), router.clone()).await.expect("follow");
    let web = ServiceName::new("web").expect("name");
    let reg =
        |id: &str, addr: SocketAddr| Registration::new(web.clone(), id, "127.0.0.1", addr.port()).with_tag("keelson.http.host=web.test");
    let _ha = discovery.register(reg("a", a)).await.expect("register a");
    let _hb = discovery.register(reg("b", b)).await.expect("register b");
    let _untagged = discovery.register(Registration::new(ServiceName::new("db").expect("name"), "d", "127.0.0.1", 5432)).await.expect("db");
    let (proxy, _stop, _task) = start_proxy(router.clone(), ProxyConfig::default()).await;

    let bodies = |n| async move {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(get(proxy, "web.test", "/").await.expect("response").body.lines().next().unwrap_or_default().to_owned());
        }
        v.sort();
        v.dedup();
        v
    };
    wait_until(|| router.snapshot().lookup("web.test").is_some_and(|r| r.route().endpoints.len() == 2)).await;
    assert_eq!(router.snapshot().len(), 1, "untagged services get no route");
    assert_eq!(bodies(4).await, vec!["inst-a", "inst-b"]);
    discovery.set_health(&web, "a", Health::Critical).await.expect("health");
    wait_until(|| router.snapshot().lookup("web.test").is_some_and(|r| r.route().endpoints.iter().filter(|e| e.healthy).count() == 1))
        .await;
    assert_eq!(bodies(4).await, vec!["inst-b"], "critical instance gets no traffic");
    discovery.deregister(&web, "a").await.expect("dereg a");
    discovery.deregister(&web, "b").await.expect("dereg b");
    wait_until(|| router.snapshot().lookup("web.test").is_none()).await;
}

#[tokio::test]
async fn shutdown_stops_accepting() {
    let (proxy, stop, task) = start_proxy(Arc::new(MemoryRouter::new()), ProxyConfig::default()).await;
    assert_eq!(get(proxy, "x.test", "/").await.expect("response").status, 404);
    stop.send(()).expect("stop");
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("serve returns").expect("no panic");
    assert!(tokio::net::TcpStream::connect(proxy).await.is_err(), "listener closed");
}

#[test]
fn routes_file_rejects_unknown_keys_and_duplicates() {
    let good = r#"{"routes":[{"host":"a.test","endpoints":[{"id":"1","addr":"127.0.0.1:80"}]}]}"#;
    assert_eq!(RoutesFile::parse(good).expect("parses").routes.len(), 1);
    let unknown = r#"{"routes":[{"host":"a.test","endpoints":[],"weight":3}]}"#;
    match RoutesFile::parse(unknown) {
        Err(Error::InvalidInput { value, .. }) => assert!(value.contains("weight"), "{value}"),
        other => panic!("unknown key must be rejected, got {other:?}"),
    }
    let dup = r#"{"routes":[{"host":"a.test","endpoints":[]},{"host":"A.test","endpoints":[]}]}"#;
    assert!(matches!(RoutesFile::parse(dup), Err(Error::InvalidInput { field: "route", .. })), "same host and path twice");
    let empty_host = r#"{"routes":[{"host":"","endpoints":[]}]}"#;
    assert!(matches!(RoutesFile::parse(empty_host), Err(Error::InvalidInput { .. })));
}

async fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "condition not met within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn path_prefixes_and_wildcard_hosts_route_through_the_proxy() {
    use keelson_routing::PathPrefix;
    let (root, _t1) = echo_server("root").await.expect("root");
    let (api, _t2) = echo_server("api").await.expect("api");
    let (wild, _t3) = echo_server("wild").await.expect("wild");
    let router = Arc::new(MemoryRouter::new());
    let prefix = |p: &str| PathPrefix::new(p).expect("prefix");
    router
        .apply(vec![
            RouteChange::Upsert(Route::new(Host::new("site.test").expect("host"), vec![Endpoint::new("r", root)])),
            RouteChange::Upsert(Route::new(Host::new("site.test").expect("host"), vec![Endpoint::new("a", api)]).with_path(prefix("/api"))),
            RouteChange::Upsert(Route::new(Host::new("*.apps.test").expect("host"), vec![Endpoint::new("w", wild)])),
        ])
        .await
        .expect("apply");
    let (proxy, _stop, _task) = start_proxy(router.clone(), ProxyConfig::default()).await;
    let first_line = |r: keelson_testkit::http::Reply| (r.status, r.body.lines().next().unwrap_or_default().to_owned());
    assert_eq!(first_line(get(proxy, "site.test", "/").await.expect("get")), (200, "root".into()));
    assert_eq!(first_line(get(proxy, "site.test", "/api/users?id=1").await.expect("get")), (200, "api".into()));
    assert_eq!(first_line(get(proxy, "site.test", "/apis").await.expect("get")), (200, "root".into()));
    assert_eq!(first_line(get(proxy, "Shop.Apps.Test:8080", "/x").await.expect("get")), (200, "wild".into()));
    assert_eq!(get(proxy, "a.b.apps.test", "/").await.expect("get").status, 404);

    // Discovery instances choose their prefix with a tag.
    let discovery = Arc::new(MemoryDiscovery::memory());
    let _follow = follow_discovery(discovery.clone(), router.clone()).await.expect("follow");
    let reg = Registration::new(ServiceName::new("admin").expect("name"), "a1", "127.0.0.1", api.port())
        .with_tag("keelson.http.host=tagged.test")
        .with_tag("keelson.http.path=/admin/");
    let _h = discovery.register(reg).await.expect("register");
    wait_until(|| router.snapshot().lookup_path("tagged.test", "/admin/x").is_some()).await;
    assert!(router.snapshot().lookup("tagged.test").is_none(), "only /admin is routed");
    assert_eq!(first_line(get(proxy, "tagged.test", "/admin/panel").await.expect("get")), (200, "api".into()));
    assert_eq!(get(proxy, "tagged.test", "/").await.expect("get").status, 404);
}
