//! Balancing policies: their distributions, their use of live endpoint state, state that
//! survives route updates, and Peak-EWMA steering real traffic away from a slow upstream.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keelson_routing::{
    Balancer, Endpoint, Error, Host, InFlight, MemoryRouter, Proxy, ProxyConfig, Route, RouteChange, Router, RoutesFile,
};

fn ep(id: &str, port: u16, weight: u32) -> Endpoint {
    Endpoint { weight, ..Endpoint::new(id, SocketAddr::from(([127, 0, 0, 1], port))) }
}

async fn router_with(balancer: Balancer, endpoints: Vec<Endpoint>) -> MemoryRouter {
    let r = MemoryRouter::new();
    r.apply(vec![RouteChange::Upsert(Route::new(Host::new("b.test").expect("host"), endpoints).with_balancer(balancer))])
        .await
        .expect("apply");
    r
}

fn counts(r: &MemoryRouter, n: usize, key: Option<&[u8]>) -> BTreeMap<String, usize> {
    let table = r.snapshot();
    let entry = table.lookup("b.test").expect("route");
    let mut c = BTreeMap::new();
    for _ in 0..n {
        *c.entry(entry.pick_for(key).expect("pick").endpoint.id.clone()).or_default() += 1;
    }
    c
}

#[tokio::test]
async fn weighted_follows_weights_smoothly() {
    let r = router_with(Balancer::Weighted, vec![ep("a", 1, 1), ep("b", 2, 2), ep("c", 3, 3)]).await;
    let c = counts(&r, 600, None);
    assert_eq!((c["a"], c["b"], c["c"]), (100, 200, 300));
    // Smooth: the heaviest endpoint never gets its whole share in one burst.
    let table = r.snapshot();
    let entry = table.lookup("b.test").expect("route");
    let seq: Vec<String> = (0..6).map(|_| entry.pick().expect("pick").id.clone()).collect();
    assert!(seq.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])), "{seq:?}");
}

#[tokio::test]
async fn least_requests_avoids_the_busy_endpoint() {
    let r = router_with(Balancer::LeastRequests, vec![ep("a", 1, 1), ep("b", 2, 1), ep("c", 3, 1)]).await;
    let table = r.snapshot();
    let entry = table.lookup("b.test").expect("route");
    let busy: Vec<InFlight> = (0..5).map(|_| InFlight::start(entry.stats("a").expect("stats").clone())).collect();
    let c = counts(&r, 200, None);
    assert_eq!(c.get("a"), None, "two choices: the busy one always loses: {c:?}");
    assert!(c["b"] > 50 && c["c"] > 50, "{c:?}");
    drop(busy);
    assert_eq!(entry.stats("a").expect("stats").in_flight(), 0, "the guard counts down");
}

#[tokio::test]
async fn peak_ewma_avoids_the_slow_endpoint_and_forgives_it() {
    let r = router_with(Balancer::PeakEwma, vec![ep("a", 1, 1), ep("b", 2, 1), ep("c", 3, 1)]).await;
    let table = r.snapshot();
    let entry = table.lookup("b.test").expect("route");
    entry.stats("a").expect("stats").observe(Duration::from_millis(50));
    assert_eq!(entry.stats("a").expect("stats").ewma(), Duration::from_millis(50), "a slower answer is the new peak at once");
    let c = counts(&r, 200, None);
    assert_eq!(c.get("a"), None, "{c:?}");
}

#[tokio::test]
async fn consistent_hash_sticks_spreads_moves_little_and_bounds_load() {
    let endpoints: Vec<Endpoint> = (0..5).map(|i| ep(&format!("e{i}"), 10 + i, 1)).collect();
    let balancer = Balancer::ConsistentHash { header: "x-user".into() };
    let r = router_with(balancer.clone(), endpoints.clone()).await;
    assert_eq!(counts(&r, 50, Some(b"alice")).len(), 1, "the same key, the same endpoint");
    let owner = |r: &MemoryRouter, key: &str| {
        r.snapshot().lookup("b.test").expect("route").pick_for(Some(key.as_bytes())).expect("pick").endpoint.id.clone()
    };
    let keys: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
    let before: Vec<String> = keys.iter().map(|k| owner(&r, k)).collect();
    let mut spread: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &before {
        *spread.entry(o.as_str()).or_default() += 1;
    }
    assert_eq!(spread.len(), 5);
    assert!(spread.values().all(|n| *n > 100 && *n < 320), "{spread:?}");
    // Remove e4: only its keys move.
    r.apply(vec![RouteChange::Upsert(Route::new(Host::new("b.test").expect("host"), endpoints[..4].to_vec()).with_balancer(balancer))])
        .await
        .expect("apply");
    for (k, was) in keys.iter().zip(&before) {
        if was != "e4" {
            assert_eq!(&owner(&r, k), was, "key {k} moved though its endpoint stayed");
        }
    }
    // Bounded load: an overloaded owner passes the key on.
    let table = r.snapshot();
    let entry = table.lookup("b.test").expect("route");
    let home = entry.pick_for(Some(b"alice")).expect("pick").endpoint.id.clone();
    let _load: Vec<InFlight> = (0..10).map(|_| InFlight::start(entry.stats(&home).expect("stats").clone())).collect();
    assert_ne!(
        entry.pick_for(Some(b"alice")).expect("pick").endpoint.id,
        home,
        "over 1.25x its share, the next endpoint on the ring takes it"
    );
}

#[tokio::test]
async fn endpoint_state_survives_route_updates() {
    let r = router_with(Balancer::PeakEwma, vec![ep("a", 1, 1), ep("b", 2, 1)]).await;
    let a_before = r.snapshot().lookup("b.test").expect("route").stats("a").expect("stats").clone();
    a_before.observe(Duration::from_millis(40));
    r.apply(vec![RouteChange::Upsert(
        Route::new(Host::new("b.test").expect("host"), vec![ep("a", 1, 1), ep("c", 3, 1)]).with_balancer(Balancer::PeakEwma),
    )])
    .await
    .expect("apply");
    let table = r.snapshot();
    let a_after = table.lookup("b.test").expect("route").stats("a").expect("stats");
    assert!(Arc::ptr_eq(&a_before, a_after), "same state object");
    assert_eq!(a_after.ewma(), Duration::from_millis(40));
}

#[tokio::test]
async fn a_delta_shares_untouched_routes_and_leaves_old_snapshots_intact() {
    let r = MemoryRouter::new();
    let hosts: Vec<Host> = (0..500).map(|i| Host::new(format!("s{i}.test")).expect("host")).collect();
    r.apply(hosts.iter().map(|h| RouteChange::Upsert(Route::new(h.clone(), vec![ep("a", 1, 1)]))).collect()).await.expect("apply");
    let before = r.snapshot();
    r.apply(vec![RouteChange::Upsert(Route::new(hosts[7].clone(), vec![ep("b", 2, 1)])), RouteChange::Remove(hosts[8].clone())])
        .await
        .expect("apply");
    let after = r.snapshot();
    assert_eq!((before.len(), after.len()), (500, 499));
    assert_eq!(after.version(), before.version() + 1);
    // Untouched entries are the same objects, not copies: that is what keeps a delta's
    // cost independent of the table size (measured in benches: "one-endpoint delta").
    for h in hosts.iter().filter(|h| !["s7.test", "s8.test"].contains(&h.as_str())) {
        assert!(std::ptr::eq(before.lookup(h.as_str()).expect("before"), after.lookup(h.as_str()).expect("after")), "{h} was copied");
    }
    // The old snapshot, as an in-flight request holds it, is unchanged.
    assert_eq!(before.lookup("s7.test").expect("old").pick().expect("pick").id, "a");
    assert!(before.lookup("s8.test").is_some());
    assert_eq!(after.lookup("s7.test").expect("new").pick().expect("pick").id, "b");
    assert!(after.lookup("s8.test").is_none());
}

#[tokio::test]
async fn bad_weights_and_balancer_specs_are_typed_errors() {
    let r = MemoryRouter::new();
    for w in [0, 101] {
        let route = Route::new(Host::new("w.test").expect("host"), vec![ep("a", 1, w)]);
        assert!(
            matches!(r.apply(vec![RouteChange::Upsert(route)]).await, Err(Error::InvalidInput { field: "endpoint weight", .. })),
            "{w}"
        );
    }
    let good = r#"{"routes":[{"host":"a.test","balancer":{"kind":"consistent_hash","header":"x-user"},"endpoints":[{"id":"1","addr":"127.0.0.1:80","weight":3}]}]}"#;
    let parsed = RoutesFile::parse(good).expect("parses");
    assert_eq!(parsed.routes[0].balancer, Balancer::ConsistentHash { header: "x-user".into() });
    for bad in [
        r#"{"routes":[{"host":"a.test","balancer":{"kind":"random"},"endpoints":[]}]}"#,
        r#"{"routes":[{"host":"a.test","balancer":{"kind":"weighted","x":1},"endpoints":[]}]}"#,
    ] {
        assert!(matches!(RoutesFile::parse(bad), Err(Error::InvalidInput { .. })), "{bad}");
    }
}

/// An upstream that answers after `delay`.
/// The two tests that drive real traffic through a proxy measure which upstream answers
/// faster, so they must not share the two cores with each other: they take turns.
async fn alone() -> tokio::sync::MutexGuard<'static, ()> {
    static LOAD: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    LOAD.get_or_init(|| tokio::sync::Mutex::new(())).lock().await
}

async fn upstream(id: &'static str, delay: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(id))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(s), svc).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_steers_real_traffic_away_from_a_slow_upstream() {
    let _alone = alone().await;
    let fast = upstream("fast", Duration::ZERO).await;
    // Far slower than any hiccup of the fast one on a loaded CI machine: a peak-sensitive
    // EWMA remembers a fast upstream's 30 ms stall for seconds, which once made a 30 ms
    // "slow" upstream look no worse and this test flaky.
    let slow = upstream("slow", Duration::from_millis(150)).await;
    let router = Arc::new(MemoryRouter::new());
    let route = Route::new(Host::new("p.test").expect("host"), vec![Endpoint::new("fast", fast), Endpoint::new("slow", slow)])
        .with_balancer(Balancer::PeakEwma);
    router.apply(vec![RouteChange::Upsert(route)]).await.expect("apply");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(Arc::new(Proxy::new(router, ProxyConfig::default())).serve(listener, std::future::pending()));
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..60 {
        let r = keelson_testkit::http::get(addr, "p.test", "/").await.expect("response");
        assert_eq!(r.status, 200);
        *got.entry(r.body).or_default() += 1;
    }
    assert!(got.get("slow").copied().unwrap_or(0) <= 5, "the slow upstream kept getting traffic: {got:?}");
}

/// The issue's tail case through the proxy with real upstreams: four upstreams, one
/// answering 5 ms late; Peak-EWMA keeps the slow one below its fair share (25%). Only
/// that much holds on a shared 2-core test machine, where a CPU stall of a fast
/// upstream's task looks just like 5 ms of latency (shares of 0.1–15% were seen, by
/// load). The 1% share and the p99 it buys are speed targets, judged by the
/// `balancer-tail` bench on pinned cores; the test that tells Peak-EWMA from least
/// requests with latencies fed in, no clock involved, is in `src/balance.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_keeps_a_5ms_slow_upstream_of_four_below_its_share_through_the_proxy() {
    let _alone = alone().await;
    let mut endpoints = Vec::new();
    for (id, delay) in [("f0", 0), ("f1", 0), ("f2", 0), ("slow", 5)] {
        endpoints.push(Endpoint::new(id, upstream(id, Duration::from_millis(delay)).await));
    }
    let router = Arc::new(MemoryRouter::new());
    let route = Route::new(Host::new("p.test").expect("host"), endpoints).with_balancer(Balancer::PeakEwma);
    router.apply(vec![RouteChange::Upsert(route)]).await.expect("apply");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(Arc::new(Proxy::new(router, ProxyConfig::default())).serve(listener, std::future::pending()));
    let client = |n: usize| async move {
        let mut got: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..n {
            let r = keelson_testkit::http::get(addr, "p.test", "/").await.expect("response");
            assert_eq!(r.status, 200);
            *got.entry(r.body).or_default() += 1;
        }
        got
    };
    let run = |per_client: usize| async move {
        let clients: Vec<_> = (0..2).map(|_| tokio::spawn(client(per_client))).collect();
        let mut got: BTreeMap<String, usize> = BTreeMap::new();
        for c in clients {
            for (id, n) in c.await.expect("client") {
                *got.entry(id).or_default() += n;
            }
        }
        got
    };
    // Warm-up at the same concurrency: every endpoint starts at the default estimate
    // until its first answer, and the upstream pools open their connections (a first
    // connect is a latency peak of its own).
    run(50).await;
    let got = run(1000).await;
    assert_eq!(got.values().sum::<usize>(), 2000);
    let slow = got.get("slow").copied().unwrap_or(0);
    assert!(slow < 400, "the 5 ms upstream got {slow} of 2000 requests (≥ 20%, its fair share is 25%): {got:?}");
    assert!(["f0", "f1", "f2"].iter().all(|f| got.get(*f).copied().unwrap_or(0) > 200), "the fast ones share the load: {got:?}");
}
