//! HostNetwork passes the conformance suite and refuses what it cannot do.

use keelson_netplumb::{conformance, EndpointSpec, Error, HostNetwork, NetworkDriver, NetworkSpec, PortMapping, Protocol};

#[tokio::test]
async fn host_network_passes_conformance() {
    conformance::network_all(&HostNetwork::new(), &|net, id| EndpointSpec::new(net, id)).await;
}

#[tokio::test]
async fn host_network_refuses_port_mappings_and_namespaces() {
    let d = HostNetwork::new();
    d.create_network(NetworkSpec::new("h")).await.expect("create");
    let mut spec = EndpointSpec::new("h", "e");
    spec.port_mappings.push(PortMapping { host_port: 8080, container_port: 80, protocol: Protocol::Tcp });
    assert!(matches!(d.attach(spec).await, Err(Error::Unsupported { backend: "host", .. })));
    let mut spec = EndpointSpec::new("h", "e");
    spec.netns = Some("/var/run/netns/x".into());
    assert!(matches!(d.attach(spec).await, Err(Error::InvalidInput { field: "endpoint netns", .. })));
    assert!(d.inspect("h").await.expect("inspect").endpoints.is_empty(), "nothing attached");
    let mut with_subnet = NetworkSpec::new("s");
    with_subnet.subnet = Some("10.1.0.0/16".into());
    assert!(matches!(d.create_network(with_subnet).await, Err(Error::InvalidInput { .. })));
}
