//! A failing backend never empties a watcher's view: the last good snapshot is sent
//! again with the error, the metric counts it, and the watch recovers by itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use keelson_discovery::{
    Discovery, Error, Expect, KeyValue, KvCapabilities, KvDiscovery, KvEntry, KvList, KvWatch, LeaseId, MemoryKv, MetricsDiscovery, Query,
    Registration, ServiceName,
};

/// A MemoryKv whose reads of change streams fail while `down` is set (writes still work,
/// as with a watch connection lost to a member that is still serving writes elsewhere).
#[derive(Debug, Default)]
struct Switchable {
    inner: MemoryKv,
    down: Arc<AtomicBool>,
}

fn unavailable() -> Error {
    Error::Unavailable { backend: "switchable", reason: "switched off".into() }
}

#[async_trait]
impl KeyValue for Switchable {
    fn backend(&self) -> &'static str {
        "switchable"
    }
    fn capabilities(&self) -> KvCapabilities {
        self.inner.capabilities()
    }
    async fn get(&self, key: &str) -> keelson_discovery::Result<Option<KvEntry>> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> keelson_discovery::Result<u64> {
        self.inner.put(key, value, lease).await
    }
    async fn compare_and_swap(&self, key: &str, expect: Expect, value: Vec<u8>, lease: Option<LeaseId>) -> keelson_discovery::Result<u64> {
        self.inner.compare_and_swap(key, expect, value, lease).await
    }
    async fn delete(&self, key: &str) -> keelson_discovery::Result<bool> {
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> keelson_discovery::Result<KvList> {
        if self.down.load(Ordering::SeqCst) {
            return Err(unavailable());
        }
        self.inner.list(prefix).await
    }
    async fn watch(&self, prefix: &str, from: Option<u64>) -> keelson_discovery::Result<KvWatch> {
        if self.down.load(Ordering::SeqCst) {
            return Err(unavailable());
        }
        let down = self.down.clone();
        let inner = self.inner.watch(prefix, from).await?;
        // While down, the stream's next item is an error, and the stream ends.
        Ok(inner
            .map(move |ev| if down.load(Ordering::SeqCst) { Err(unavailable()) } else { ev })
            .take_while(|r| futures::future::ready(r.is_ok()))
            .chain(futures::stream::once(async { Err(unavailable()) }))
            .boxed())
    }
    async fn grant_lease(&self, ttl: Duration) -> keelson_discovery::Result<LeaseId> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> keelson_discovery::Result<()> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> keelson_discovery::Result<()> {
        self.inner.revoke_lease(lease).await
    }
}

async fn next(w: &mut keelson_discovery::SnapshotStream) -> keelson_discovery::Snapshot {
    tokio::time::timeout(Duration::from_secs(5), w.next()).await.expect("snapshot in time").expect("open")
}

#[tokio::test]
async fn outage_keeps_the_last_view_reports_it_and_recovers() {
    let kv = Arc::new(Switchable::default());
    let mut registry = prometheus_client::registry::Registry::default();
    let d = MetricsDiscovery::new(Arc::new(KvDiscovery::new(kv.clone())), &mut registry);
    let svc = ServiceName::new("web").expect("name");
    let _a = d.register(Registration::new(svc.clone(), "a", "127.0.0.1", 1)).await.expect("register");
    let mut w = d.watch(Query::service(svc.clone())).await.expect("watch");
    let s0 = next(&mut w).await;
    assert_eq!((s0.instances.len(), s0.error.is_none()), (1, true));

    kv.down.store(true, Ordering::SeqCst);
    let _b = d.register(Registration::new(svc.clone(), "b", "127.0.0.1", 2)).await.expect("writes still work");
    let stale = next(&mut w).await;
    assert_eq!(stale.instances.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), vec!["a"], "the last good view, not an empty one");
    assert!(stale.error.as_deref().is_some_and(|e| e.contains("switched off")), "{stale:?}");

    kv.down.store(false, Ordering::SeqCst);
    let fresh = next(&mut w).await;
    assert_eq!(fresh.instances.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), vec!["a", "b"]);
    assert!(fresh.error.is_none());

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(text.contains("keelson_discovery_watch_errors_total{backend=\"switchable\"} 1"), "{text}");
}
