//! Conformance scenarios every `NetworkDriver` passes (feature `conformance`).

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, Ordering};

use crate::{EndpointSpec, Error, NetworkDriver, NetworkSpec};

fn unique(base: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{base}{}-{}", std::process::id() % 10_000, N.fetch_add(1, Ordering::Relaxed))
}

/// Every scenario. `endpoint` makes an attachable spec for this driver (with a netns
/// for isolating drivers).
pub async fn network_all(d: &dyn NetworkDriver, endpoint: &(dyn Fn(&str, &str) -> EndpointSpec + Sync)) {
    network_lifecycle(d, endpoint).await;
    network_rejects_bad_input(d).await;
    let report = d.gc().await.unwrap();
    assert!(report.removed.is_empty(), "gc on a clean driver removes nothing: {report:?}");
}

/// Create, attach, inspect, detach, delete, with conflicts along the way.
pub async fn network_lifecycle(d: &dyn NetworkDriver, endpoint: &(dyn Fn(&str, &str) -> EndpointSpec + Sync)) {
    let net = unique("n");
    d.create_network(NetworkSpec::new(&net)).await.unwrap();
    assert!(matches!(d.create_network(NetworkSpec::new(&net)).await, Err(Error::Conflict { .. })));
    let ep = d.attach(endpoint(&net, "ep1")).await.unwrap();
    assert!(!ep.addresses.is_empty(), "an attached endpoint has an address");
    assert!(matches!(d.attach(endpoint(&net, "ep1")).await, Err(Error::Conflict { .. })), "same endpoint twice");
    assert_eq!(d.inspect(&net).await.unwrap().endpoints, vec![ep]);
    assert!(d.list().await.unwrap().iter().any(|n| n.spec.name == net));
    assert!(matches!(d.delete_network(&net).await, Err(Error::Conflict { .. })), "network in use");
    d.detach(&net, "ep1").await.unwrap();
    assert!(matches!(d.detach(&net, "ep1").await, Err(Error::NotFound { .. })));
    d.delete_network(&net).await.unwrap();
    assert!(matches!(d.inspect(&net).await, Err(Error::NotFound { .. })));
    assert!(matches!(d.attach(endpoint(&net, "ep2")).await, Err(Error::NotFound { .. })), "attach to a deleted network");
}

/// Bad names are typed errors and create nothing.
pub async fn network_rejects_bad_input(d: &dyn NetworkDriver) {
    for bad in ["", "-x", "a/b", "x y", &"n".repeat(65)] {
        assert!(matches!(d.create_network(NetworkSpec::new(bad)).await, Err(Error::InvalidInput { field: "network name", .. })), "{bad:?}");
    }
    assert!(d.list().await.unwrap().iter().all(|n| !n.spec.name.is_empty()));
}
