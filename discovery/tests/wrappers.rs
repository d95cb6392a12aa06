//! Retry and metrics decorators: they pass the conformance suite around the memory
//! backend, retry only retryable errors, and count what happened.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keelson_discovery::{
    conformance, Discovery, DiscoveryCapabilities, Error, Health, Instance, MemoryDiscovery, MetricsDiscovery, Query, Registration,
    RegistrationHandle, RetryDiscovery, RetryPolicy, ServiceName, SnapshotStream,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stacked_wrappers_pass_discovery_conformance() {
    let mut registry = prometheus_client::registry::Registry::default();
    let metered: Arc<dyn Discovery> = Arc::new(MetricsDiscovery::new(Arc::new(MemoryDiscovery::memory()), &mut registry));
    let d = RetryDiscovery::new(metered, RetryPolicy::default()).expect("policy");
    conformance::discovery_all(&d).await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(text.contains("keelson_discovery_calls_total{backend=\"memory\",op=\"register\",outcome=\"ok\"}"), "{text}");
    assert!(text.contains("outcome=\"invalid_input\""), "bad registrations are counted: {text}");
    assert!(text.contains("keelson_discovery_call_seconds_bucket"), "{text}");
}

/// Fails `instances` with `error()` for the first `failures` calls.
#[derive(Debug)]
struct Flaky {
    inner: MemoryDiscovery,
    failures: u32,
    calls: AtomicU32,
    retryable: bool,
}

#[async_trait]
impl Discovery for Flaky {
    fn backend(&self) -> &'static str {
        "flaky"
    }
    fn capabilities(&self) -> DiscoveryCapabilities {
        self.inner.capabilities()
    }
    async fn register(&self, r: Registration) -> keelson_discovery::Result<RegistrationHandle> {
        self.inner.register(r).await
    }
    async fn deregister(&self, s: &ServiceName, id: &str) -> keelson_discovery::Result<()> {
        self.inner.deregister(s, id).await
    }
    async fn set_health(&self, s: &ServiceName, id: &str, h: Health) -> keelson_discovery::Result<()> {
        self.inner.set_health(s, id, h).await
    }
    async fn instances(&self, q: &Query) -> keelson_discovery::Result<Vec<Instance>> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
            return Err(if self.retryable {
                Error::Unavailable { backend: "flaky", reason: "down".into() }
            } else {
                Error::InvalidInput { field: "query", value: String::new(), reason: "bad".into() }
            });
        }
        self.inner.instances(q).await
    }
    async fn services(&self) -> keelson_discovery::Result<Vec<ServiceName>> {
        self.inner.services().await
    }
    async fn watch(&self, q: Query) -> keelson_discovery::Result<SnapshotStream> {
        self.inner.watch(q).await
    }
}

fn fast(attempts: u32) -> RetryPolicy {
    RetryPolicy { attempts, initial_backoff: Duration::from_millis(1), max_backoff: Duration::from_millis(5) }
}

#[tokio::test]
async fn retries_only_retryable_errors_and_gives_up_after_the_budget() {
    let flaky = Arc::new(Flaky { inner: MemoryDiscovery::memory(), failures: 2, calls: AtomicU32::new(0), retryable: true });
    let d = RetryDiscovery::new(flaky.clone(), fast(3)).expect("policy");
    assert!(d.instances(&Query::all()).await.is_ok(), "third attempt succeeds");
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);

    let down = Arc::new(Flaky { inner: MemoryDiscovery::memory(), failures: 100, calls: AtomicU32::new(0), retryable: true });
    let d = RetryDiscovery::new(down.clone(), fast(3)).expect("policy");
    assert!(matches!(d.instances(&Query::all()).await, Err(Error::Unavailable { .. })));
    assert_eq!(down.calls.load(Ordering::SeqCst), 3, "gives up after 3 attempts");

    let bad = Arc::new(Flaky { inner: MemoryDiscovery::memory(), failures: 100, calls: AtomicU32::new(0), retryable: false });
    let d = RetryDiscovery::new(bad.clone(), fast(3)).expect("policy");
    assert!(matches!(d.instances(&Query::all()).await, Err(Error::InvalidInput { .. })));
    assert_eq!(bad.calls.load(Ordering::SeqCst), 1, "a non-retryable error is returned at once");

    assert!(matches!(RetryDiscovery::new(bad, fast(0)), Err(Error::InvalidInput { .. })));
}
