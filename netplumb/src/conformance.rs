//! Conformance scenarios every `NetworkDriver` passes (feature `conformance`).

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{AttachmentKey, EndpointSpec, Error, NetworkDriver, NetworkSpec};

fn unique(base: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{base}{}-{}", std::process::id() % 10_000, N.fetch_add(1, Ordering::Relaxed))
}

/// How a test makes what the driver needs: a network spec for a name (with a subnet for
/// drivers with IPAM), and an attachable endpoint (with a fresh namespace for isolating
/// drivers).
#[allow(missing_debug_implementations)] // holds closures
pub struct Fixture<'a> {
    /// A network spec named `name`; `n` numbers the networks of one scenario, so that
    /// a driver with IPAM can give each its own subnet.
    pub network: &'a (dyn Fn(&str, u8) -> NetworkSpec + Sync),
    /// An endpoint `id` on `network`.
    pub endpoint: &'a (dyn Fn(&str, &str) -> EndpointSpec + Sync),
}

/// Every scenario.
pub async fn network_all(d: &dyn NetworkDriver, f: &Fixture<'_>) {
    network_lifecycle(d, f).await;
    network_gc_keeps_only_valid(d, f).await;
    network_rejects_bad_input(d, f).await;
    network_gives_a_preferred_address_when_free(d, f).await;
    let report = d.gc(&[]).await.unwrap();
    assert!(report.removed.is_empty(), "gc after every scenario cleaned up removes nothing: {report:?}");
}

/// Create, attach, check, inspect, detach (twice), delete, with conflicts along the way.
pub async fn network_lifecycle(d: &dyn NetworkDriver, f: &Fixture<'_>) {
    let net = unique("n");
    d.create_network((f.network)(&net, 0)).await.unwrap();
    assert!(matches!(d.create_network((f.network)(&net, 0)).await, Err(Error::Conflict { .. })));
    let ep = d.attach((f.endpoint)(&net, "ep1")).await.unwrap();
    assert!(!ep.addresses().is_empty(), "an attached endpoint has an address");
    assert!(ep.ips.iter().all(|ip| ip.interface < ep.interfaces.len()), "every address names one of the interfaces: {ep:?}");
    assert!(matches!(d.attach((f.endpoint)(&net, "ep1")).await, Err(Error::Conflict { .. })), "same endpoint twice");
    let ep2 = d.attach((f.endpoint)(&net, "ep2")).await.unwrap();
    if d.capabilities().isolated_endpoints {
        let a: HashSet<_> = ep.addresses().into_iter().collect();
        assert!(ep2.addresses().iter().all(|x| !a.contains(x)), "isolated endpoints get addresses of their own");
    }
    assert_eq!(d.check(&ep.key()).await.unwrap(), ep, "check returns the attachment as attached");
    let mut listed = d.inspect(&net).await.unwrap().endpoints;
    listed.sort_by_key(|a| a.key());
    let mut expected = vec![ep.clone(), ep2.clone()];
    expected.sort_by_key(|a| a.key());
    assert_eq!(listed, expected);
    assert!(d.list().await.unwrap().iter().any(|n| n.spec.name == net));
    assert!(matches!(d.delete_network(&net).await, Err(Error::Conflict { .. })), "network in use");
    d.detach(&ep.key()).await.unwrap();
    d.detach(&ep.key()).await.unwrap();
    assert!(matches!(d.check(&ep.key()).await, Err(Error::NotFound { .. })), "a detached endpoint is not found");
    d.detach(&ep2.key()).await.unwrap();
    d.delete_network(&net).await.unwrap();
    assert!(matches!(d.inspect(&net).await, Err(Error::NotFound { .. })));
    assert!(matches!(d.attach((f.endpoint)(&net, "ep3")).await, Err(Error::NotFound { .. })), "attach to a deleted network");
    d.detach(&AttachmentKey::new(&net, "ep3", "eth0")).await.unwrap();
}

/// `gc(valid)` detaches everything else, reports it, and then has nothing left to do.
pub async fn network_gc_keeps_only_valid(d: &dyn NetworkDriver, f: &Fixture<'_>) {
    let net = unique("g");
    d.create_network((f.network)(&net, 1)).await.unwrap();
    let keep = d.attach((f.endpoint)(&net, "keep")).await.unwrap();
    let lose = d.attach((f.endpoint)(&net, "lose")).await.unwrap();
    let report = d.gc(&[keep.key()]).await.unwrap();
    assert!(report.removed.iter().any(|r| r.contains(&lose.key().to_string())), "gc names what it removed: {report:?}");
    assert_eq!(d.inspect(&net).await.unwrap().endpoints, vec![keep.clone()]);
    assert!(d.gc(&[keep.key()]).await.unwrap().removed.is_empty(), "a second gc finds nothing");
    // The freed attachment can come back.
    let again = d.attach((f.endpoint)(&net, "lose")).await.unwrap();
    d.detach(&again.key()).await.unwrap();
    d.detach(&keep.key()).await.unwrap();
    d.delete_network(&net).await.unwrap();
}

/// An endpoint asking for the address another had before it left gets it back (a task
/// replaced in place keeps its address); one asking for an address in use gets another.
pub async fn network_gives_a_preferred_address_when_free(d: &dyn NetworkDriver, f: &Fixture<'_>) {
    if !d.capabilities().isolated_endpoints {
        // Endpoints share the host's addresses: there is nothing to prefer.
        return;
    }
    let net = unique("p");
    d.create_network((f.network)(&net, 2)).await.unwrap();
    let first = d.attach((f.endpoint)(&net, "old")).await.unwrap();
    let other = d.attach((f.endpoint)(&net, "other")).await.unwrap();
    let had = first.addresses()[0];
    d.detach(&first.key()).await.unwrap();
    let back = d.attach((f.endpoint)(&net, "new").preferring(Some(had))).await.unwrap();
    assert_eq!(back.addresses(), vec![had], "the replacement gets the address it asked for");
    let taken = other.addresses()[0];
    let next = d.attach((f.endpoint)(&net, "next").preferring(Some(taken))).await.unwrap();
    assert!(!next.addresses().contains(&taken), "an address in use is not given twice: {next:?}");
    let v6 = (f.endpoint)(&net, "v6").preferring(Some("fd00::5".parse().unwrap()));
    assert!(matches!(d.attach(v6).await, Err(Error::InvalidInput { field: "address", .. })), "pools are IPv4");
    for ep in [&back, &other, &next] {
        d.detach(&ep.key()).await.unwrap();
    }
    d.delete_network(&net).await.unwrap();
}

/// Bad names are typed errors and create nothing.
pub async fn network_rejects_bad_input(d: &dyn NetworkDriver, f: &Fixture<'_>) {
    for bad in ["", "-x", "a/b", "x y", &"n".repeat(65)] {
        let mut spec = (f.network)("placeholder", 2);
        spec.name = bad.to_owned();
        assert!(matches!(d.create_network(spec).await, Err(Error::InvalidInput { field: "network name", .. })), "{bad:?}");
    }
    assert!(d.list().await.unwrap().iter().all(|n| !n.spec.name.is_empty()));
    let net = unique("b");
    d.create_network((f.network)(&net, 2)).await.unwrap();
    for (field, spec) in [
        ("interface name", (f.endpoint)(&net, "e").with_ifname("a-name-too-long-for-linux")),
        ("endpoint id", (f.endpoint)(&net, "bad id")),
    ] {
        match d.attach(spec).await {
            Err(Error::InvalidInput { field: got, .. }) => assert_eq!(got, field),
            other => panic!("bad {field}: {other:?}"),
        }
    }
    assert!(d.inspect(&net).await.unwrap().endpoints.is_empty(), "nothing half-attached");
    d.delete_network(&net).await.unwrap();
}
