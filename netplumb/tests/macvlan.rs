//! The macvlan driver on a veth parent in a namespace that plays the host.

#![cfg(feature = "netlink")]

mod support;

use keelson_netplumb::conformance::{self, Fixture};
use keelson_netplumb::{EndpointSpec, Error, MacvlanNetwork, NetworkDriver, NetworkSpec, PortMapping};
use support::{call, serve, snapshot, Endpoints, HostWithOutside};

fn on_parent(name: &str, subnet: &str) -> NetworkSpec {
    let mut spec = NetworkSpec::new(name).with_subnet(subnet);
    spec.parent = Some("par0".into());
    spec
}

fn host_with_parent() -> HostWithOutside {
    let h = HostWithOutside::new();
    // A veth end as the parent (this kernel may have no dummy driver).
    h.host.exec("ip", &["link", "add", "par0", "type", "veth", "peer", "name", "par1"]).expect("veth");
    h.host.exec("ip", &["link", "set", "par0", "up"]).expect("up");
    h.host.exec("ip", &["link", "set", "par1", "up"]).expect("up");
    h
}

#[tokio::test]
async fn macvlan_passes_conformance_and_endpoints_share_the_segment() {
    let h = host_with_parent();
    let eps = Endpoints::default();
    let d = MacvlanNetwork::open(h.config()).expect("open");
    let before = snapshot(&h.host);
    let network = |name: &str, n: u8| on_parent(name, &format!("10.214.{n}.0/24"));
    let endpoint = |net: &str, id: &str| EndpointSpec::new(net, id).in_netns(eps.path(&id.replace(' ', "_")));
    conformance::network_all(&d, &Fixture { network: &network, endpoint: &endpoint }).await;

    d.create_network(on_parent("seg", "10.215.0.0/24")).await.expect("create");
    let m1 = d.attach(EndpointSpec::new("seg", "m1").in_netns(eps.path("m1"))).await.expect("m1");
    let m2 = d.attach(EndpointSpec::new("seg", "m2").in_netns(eps.path("m2"))).await.expect("m2");
    assert_eq!(m1.interfaces.len(), 1, "no host-side link: {m1:?}");
    serve(&eps.path("m2"), "0.0.0.0:8080", "m2");
    let ip2 = m2.ipv4().expect("v4");
    assert_eq!(call(&eps.path("m1"), &format!("{ip2}:8080")).expect("m1 -> m2"), format!("m2 {}", m1.ipv4().expect("v4")));
    for a in [&m1, &m2] {
        d.detach(&a.key()).await.expect("detach");
    }
    assert_eq!(eps.link_count("m1"), 1, "the macvlan went with detach");
    d.delete_network("seg").await.expect("delete");
    assert_eq!(snapshot(&h.host), before);
}

#[tokio::test]
async fn macvlan_refuses_what_it_cannot_do() {
    let h = host_with_parent();
    let eps = Endpoints::default();
    let d = MacvlanNetwork::open(h.config()).expect("open");
    let mut no_parent = NetworkSpec::new("x").with_subnet("10.216.0.0/24");
    assert!(matches!(d.create_network(no_parent.clone()).await, Err(Error::InvalidInput { field: "parent", .. })));
    no_parent.parent = Some("nosuch0".into());
    assert!(matches!(d.create_network(no_parent).await, Err(Error::NotFound { kind: "parent interface", .. })));
    assert!(matches!(d.create_network(on_parent("x", "10.216.0.0/24").with_masquerade()).await, Err(Error::Unsupported { .. })));
    d.create_network(on_parent("x", "10.216.0.0/24")).await.expect("create");
    let ported = EndpointSpec::new("x", "p").in_netns(eps.path("p")).publish(PortMapping::tcp(18400, 80));
    assert!(matches!(d.attach(ported).await, Err(Error::Unsupported { .. })));
    assert!(d.inspect("x").await.expect("inspect").endpoints.is_empty());
    d.delete_network("x").await.expect("delete");
}
