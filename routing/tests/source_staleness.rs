//! A failing route source keeps the last good routes, raises the staleness metric, and
//! clears it when the source answers again. The source here is a scripted `Discovery`
//! whose watch yields exactly the snapshots the test pushes, errors included, as the
//! real backends do during an outage (see `Snapshot::error`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keelson_discovery::{
    Discovery, DiscoveryCapabilities, Error as DiscoveryError, Health, Instance, Query, Registration, RegistrationHandle, ServiceName,
    Snapshot, SnapshotStream,
};
use keelson_routing::{follow_discovery_with, MemoryRouter, Router, SourceStatus};
use tokio::sync::{mpsc, Mutex};

#[derive(Debug)]
struct Scripted(Mutex<Option<mpsc::UnboundedReceiver<Snapshot>>>);

fn unsupported<T>(operation: &'static str) -> keelson_discovery::Result<T> {
    Err(DiscoveryError::Unsupported { operation, backend: "scripted" })
}

#[async_trait::async_trait]
impl Discovery for Scripted {
    fn backend(&self) -> &'static str {
        "scripted"
    }
    fn capabilities(&self) -> DiscoveryCapabilities {
        DiscoveryCapabilities::new(false, false, true)
    }
    async fn register(&self, _: Registration) -> keelson_discovery::Result<RegistrationHandle> {
        unsupported("register")
    }
    async fn deregister(&self, _: &ServiceName, _: &str) -> keelson_discovery::Result<()> {
        unsupported("deregister")
    }
    async fn set_health(&self, _: &ServiceName, _: &str, _: Health) -> keelson_discovery::Result<()> {
        unsupported("set_health")
    }
    async fn instances(&self, _: &Query) -> keelson_discovery::Result<Vec<Instance>> {
        unsupported("instances")
    }
    async fn services(&self) -> keelson_discovery::Result<Vec<ServiceName>> {
        unsupported("services")
    }
    async fn watch(&self, _: Query) -> keelson_discovery::Result<SnapshotStream> {
        let rx = self.0.lock().await.take().ok_or(DiscoveryError::Unsupported { operation: "second watch", backend: "scripted" })?;
        Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed())
    }
}

fn instance(id: &str, port: u16) -> Instance {
    Instance {
        service: ServiceName::new("web").expect("name"),
        id: id.into(),
        address: "127.0.0.1".into(),
        port,
        tags: vec!["keelson.http.host=web.test".into()],
        meta: Default::default(),
        health: Health::Passing,
    }
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_outage_keeps_routes_and_raises_staleness_until_recovery() {
    let (tx, rx) = mpsc::unbounded_channel();
    let router = Arc::new(MemoryRouter::new());
    let status = SourceStatus::new();
    let mut registry = prometheus_client::registry::Registry::default();
    status.register(&mut registry);
    let _follow = follow_discovery_with(Arc::new(Scripted(Mutex::new(Some(rx)))), router.clone(), status.clone()).await.expect("follow");
    let endpoints = |r: &MemoryRouter| r.snapshot().lookup("web.test").map(|e| e.route().endpoints.len());

    tx.send(Snapshot { version: 1, instances: vec![instance("a", 9001), instance("b", 9002)], error: None }).expect("send");
    until("routes from the first snapshot", || endpoints(&router) == Some(2)).await;
    assert!(!status.is_stale());

    // The outage: the snapshot carries the last good view and the error.
    tx.send(Snapshot { version: 1, instances: vec![], error: Some("connection refused".into()) }).expect("send");
    until("staleness", || status.is_stale()).await;
    assert_eq!(endpoints(&router), Some(2), "an error never removes routes");
    assert_eq!(status.errors(), 1);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(text.contains("keelson_route_source_stale 1"), "{text}");
    assert!(text.contains("keelson_route_source_errors_total 1"), "{text}");

    // Recovery: the next good snapshot clears staleness and applies what changed.
    tx.send(Snapshot { version: 2, instances: vec![instance("a", 9001)], error: None }).expect("send");
    until("recovery", || !status.is_stale() && endpoints(&router) == Some(1)).await;
}
