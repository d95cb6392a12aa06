//! HostNetwork passes the conformance suite and refuses what it cannot do.

use keelson_netplumb::conformance::{self, Fixture};
use keelson_netplumb::{EndpointSpec, Error, HostNetwork, NetworkDriver, NetworkSpec, PortMapping};

#[tokio::test]
async fn host_network_passes_conformance() {
    let fixture = Fixture { network: &|name, _| NetworkSpec::new(name), endpoint: &|net, id| EndpointSpec::new(net, id) };
    conformance::network_all(&HostNetwork::new(), &fixture).await;
}

#[tokio::test]
async fn host_network_refuses_port_mappings_and_namespaces() {
    let d = HostNetwork::new();
    d.create_network(NetworkSpec::new("h")).await.expect("create");
    let spec = EndpointSpec::new("h", "e").publish(PortMapping::tcp(8080, 80));
    assert!(matches!(d.attach(spec).await, Err(Error::Unsupported { backend: "host", .. })));
    let spec = EndpointSpec::new("h", "e").in_netns("/var/run/netns/x");
    assert!(matches!(d.attach(spec).await, Err(Error::InvalidInput { field: "endpoint netns", .. })));
    assert!(d.inspect("h").await.expect("inspect").endpoints.is_empty(), "nothing attached");
    assert!(matches!(d.create_network(NetworkSpec::new("s").with_subnet("10.1.0.0/16")).await, Err(Error::InvalidInput { .. })));
}
