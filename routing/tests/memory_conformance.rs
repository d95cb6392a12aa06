//! The embedded router passes every conformance scenario.

#[tokio::test]
async fn memory_router_passes_router_conformance() {
    keelson_routing::conformance::router_all(&keelson_routing::MemoryRouter::new()).await;
}
