//! Conformance scenarios every `Router` passes (feature `conformance`).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use crate::{Endpoint, Error, Host, Route, RouteChange, Router};

fn host(h: &str) -> Host {
    Host::new(h).unwrap()
}

fn ep(id: &str, port: u16) -> Endpoint {
    Endpoint::new(id, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Every router scenario. Expects an empty router.
pub async fn router_all(r: &dyn Router) {
    router_applies_and_versions(r).await;
    router_batches_are_atomic(r).await;
    router_snapshots_are_immutable(r).await;
    router_round_robin_skips_unhealthy(r).await;
}

/// Upserts and removals apply, and each batch bumps the version.
pub async fn router_applies_and_versions(r: &dyn Router) {
    let v0 = r.snapshot().version();
    let v1 = r.apply(vec![RouteChange::Upsert(Route::new(host("a.test"), vec![ep("a1", 1)]))]).await.unwrap();
    assert_eq!(v1, v0 + 1);
    assert_eq!(r.snapshot().lookup("a.test").unwrap().route().endpoints, vec![ep("a1", 1)]);
    let v2 = r.apply(vec![RouteChange::Upsert(Route::new(host("A.Test"), vec![ep("a2", 2)]))]).await.unwrap();
    assert!(v2 > v1);
    assert_eq!(r.snapshot().lookup("a.test").unwrap().route().endpoints, vec![ep("a2", 2)], "upsert replaces; hosts are case-insensitive");
    r.apply(vec![RouteChange::Remove(host("a.test"))]).await.unwrap();
    assert!(r.snapshot().lookup("a.test").is_none());
}

/// A batch with any bad change applies nothing.
pub async fn router_batches_are_atomic(r: &dyn Router) {
    let before = r.snapshot();
    let dup = vec![RouteChange::Upsert(Route::new(host("b.test"), vec![])), RouteChange::Upsert(Route::new(host("b.test"), vec![]))];
    match r.apply(dup).await {
        Err(Error::InvalidInput { field: "route", value, .. }) => assert_eq!(value, "b.test"),
        other => panic!("duplicate host must be rejected, got {other:?}"),
    }
    let missing = vec![RouteChange::Upsert(Route::new(host("c.test"), vec![])), RouteChange::Remove(host("absent.test"))];
    assert!(matches!(r.apply(missing).await, Err(Error::NotFound { .. })));
    let dup_ep = vec![RouteChange::Upsert(Route::new(host("d.test"), vec![ep("x", 1), ep("x", 2)]))];
    assert!(matches!(r.apply(dup_ep).await, Err(Error::InvalidInput { field: "endpoint id", .. })));
    let after = r.snapshot();
    assert_eq!(after.version(), before.version(), "nothing applied");
    assert!(after.lookup("c.test").is_none() && after.lookup("b.test").is_none());
    for bad in ["", "a..b", "host:80", "http://x", "a b", "-a.test"] {
        assert!(matches!(Host::new(bad), Err(Error::InvalidInput { field: "route host", .. })), "{bad:?}");
    }
}

/// A snapshot taken before a change never sees it.
pub async fn router_snapshots_are_immutable(r: &dyn Router) {
    r.apply(vec![RouteChange::Upsert(Route::new(host("snap.test"), vec![ep("s1", 1)]))]).await.unwrap();
    let old = r.snapshot();
    r.apply(vec![RouteChange::Remove(host("snap.test"))]).await.unwrap();
    assert!(old.lookup("snap.test").is_some(), "old snapshot unchanged");
    assert!(r.snapshot().lookup("snap.test").is_none());
}

/// Round robin visits every healthy endpoint equally, never an unhealthy one, and its
/// position survives an update of the route.
pub async fn router_round_robin_skips_unhealthy(r: &dyn Router) {
    let mut down = ep("down", 2);
    down.healthy = false;
    r.apply(vec![RouteChange::Upsert(Route::new(host("rr.test"), vec![ep("e1", 1), down.clone(), ep("e3", 3)]))]).await.unwrap();
    let snap = r.snapshot();
    let entry = snap.lookup("rr.test").unwrap();
    let picks: Vec<String> = (0..6).map(|_| entry.pick().unwrap().id.clone()).collect();
    assert_eq!(picks.iter().filter(|p| *p == "e1").count(), picks.iter().filter(|p| *p == "e3").count(), "{picks:?}");
    assert!(!picks.contains(&"down".to_owned()), "{picks:?}");
    let mut all_down = vec![down.clone()];
    all_down[0].id = "only".into();
    r.apply(vec![RouteChange::Upsert(Route::new(host("rr.test"), all_down))]).await.unwrap();
    assert!(r.snapshot().lookup("rr.test").unwrap().pick().is_none(), "no healthy endpoint, no pick");
    r.apply(vec![RouteChange::Remove(host("rr.test"))]).await.unwrap();
}
