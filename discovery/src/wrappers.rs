//! Decorators that implement [`Discovery`] around any other: [`RetryDiscovery`] retries
//! retryable errors with backoff, [`MetricsDiscovery`] counts and times every call in
//! Prometheus metrics. They stack (`Retry(Metrics(etcd))`) and pass the same
//! conformance suite as the backends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::discovery::{Discovery, DiscoveryCapabilities, Health, Instance, Query, Registration, RegistrationHandle, SnapshotStream};
use crate::error::{Error, Result};
use crate::name::ServiceName;

/// How [`RetryDiscovery`] retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per call, the first included (default 4).
    pub attempts: u32,
    /// Delay before the first retry; doubles each time, with jitter (default 50 ms).
    pub initial_backoff: Duration,
    /// Largest delay between attempts (default 1 s).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 4, initial_backoff: Duration::from_millis(50), max_backoff: Duration::from_secs(1) }
    }
}

/// Retries calls that fail with a retryable error ([`Error::is_retryable`]:
/// unavailable, timeout); other errors return at once. Every `Discovery` call is safe to
/// repeat: registering replaces, deregistering and setting health converge.
#[derive(Debug)]
pub struct RetryDiscovery {
    inner: Arc<dyn Discovery>,
    policy: RetryPolicy,
}

impl RetryDiscovery {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Discovery>, policy: RetryPolicy) -> Result<Self> {
        if policy.attempts == 0 {
            return Err(Error::InvalidInput { field: "retry attempts", value: "0".into(), reason: "must be at least 1".into() });
        }
        Ok(RetryDiscovery { inner, policy })
    }

    async fn retry<T, F, Fut>(&self, op: &'static str, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut + Send,
        Fut: std::future::Future<Output = Result<T>> + Send,
        T: Send,
    {
        let mut pauses = crate::retry_pauses(self.policy.initial_backoff, self.policy.max_backoff);
        let mut attempt = 1;
        loop {
            match call().await {
                Err(e) if e.is_retryable() && attempt < self.policy.attempts => {
                    tracing::debug!(op, attempt, error = %e, "retrying");
                    tokio::time::sleep(pauses.next().unwrap_or_default()).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl Discovery for RetryDiscovery {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn capabilities(&self) -> DiscoveryCapabilities {
        self.inner.capabilities()
    }

    async fn register(&self, registration: Registration) -> Result<RegistrationHandle> {
        self.retry("register", || self.inner.register(registration.clone())).await
    }

    async fn deregister(&self, service: &ServiceName, id: &str) -> Result<()> {
        self.retry("deregister", || self.inner.deregister(service, id)).await
    }

    async fn set_health(&self, service: &ServiceName, id: &str, health: Health) -> Result<()> {
        self.retry("set_health", || self.inner.set_health(service, id, health)).await
    }

    async fn instances(&self, query: &Query) -> Result<Vec<Instance>> {
        self.retry("instances", || self.inner.instances(query)).await
    }

    async fn services(&self) -> Result<Vec<ServiceName>> {
        self.retry("services", || self.inner.services()).await
    }

    async fn watch(&self, query: Query) -> Result<SnapshotStream> {
        self.retry("watch", || self.inner.watch(query.clone())).await
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    backend: String,
    op: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    backend: String,
    op: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~26 s.
    Histogram::new(exponential_buckets(0.0001, 4.0, 10))
}

/// Counts calls by outcome and times them:
/// `keelson_discovery_calls_total{backend,op,outcome}` (outcome `ok` or the error kind),
/// `keelson_discovery_call_seconds{backend,op}`, and
/// `keelson_discovery_watch_errors_total{backend}` (snapshots that report a backend error).
#[derive(Debug)]
pub struct MetricsDiscovery {
    inner: Arc<dyn Discovery>,
    calls: Family<CallLabels, Counter>,
    latency: Family<OpLabels, Histogram, fn() -> Histogram>,
    watch_errors: Family<BackendLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

fn outcome<T>(r: &Result<T>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(Error::InvalidInput { .. }) => "invalid_input",
        Err(Error::NotFound { .. }) => "not_found",
        Err(Error::VersionMismatch { .. }) => "conflict",
        Err(Error::Fenced { .. }) => "fenced",
        Err(Error::TxnTooLarge { .. }) => "txn_too_large",
        Err(Error::ResponseTooLarge { .. }) => "response_too_large",
        Err(Error::Compacted { .. }) => "compacted",
        Err(Error::Unsupported { .. }) => "unsupported",
        Err(Error::Tls { .. }) => "tls",
        Err(Error::Unauthenticated { .. }) => "unauthenticated",
        Err(Error::PermissionDenied { .. }) => "permission_denied",
        Err(Error::Unavailable { .. }) => "unavailable",
        Err(Error::Timeout { .. }) => "timeout",
        Err(Error::Backend { .. }) => "backend",
    }
}

impl MetricsDiscovery {
    /// Wraps `inner`, registering its metrics in `registry`.
    pub fn new(inner: Arc<dyn Discovery>, registry: &mut Registry) -> Self {
        let calls = Family::<CallLabels, Counter>::default();
        let latency = Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register("keelson_discovery_calls", "Discovery calls by backend, operation and outcome", calls.clone());
        registry.register("keelson_discovery_call_seconds", "Discovery call latency by backend and operation", latency.clone());
        let watch_errors = Family::<BackendLabels, Counter>::default();
        registry.register(
            "keelson_discovery_watch_errors",
            "Watch snapshots reporting a backend error (last good view kept)",
            watch_errors.clone(),
        );
        MetricsDiscovery { inner, calls, latency, watch_errors }
    }

    fn record<T>(&self, op: &str, started: Instant, r: &Result<T>) {
        let backend = self.inner.backend().to_owned();
        self.calls.get_or_create(&CallLabels { backend: backend.clone(), op: op.to_owned(), outcome: outcome(r).to_owned() }).inc();
        self.latency.get_or_create(&OpLabels { backend, op: op.to_owned() }).observe(started.elapsed().as_secs_f64());
    }
}

macro_rules! measured {
    ($self:ident, $op:literal, $call:expr) => {{
        let started = Instant::now();
        let r = $call.await;
        $self.record($op, started, &r);
        r
    }};
}

#[async_trait]
impl Discovery for MetricsDiscovery {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn capabilities(&self) -> DiscoveryCapabilities {
        self.inner.capabilities()
    }

    async fn register(&self, registration: Registration) -> Result<RegistrationHandle> {
        measured!(self, "register", self.inner.register(registration))
    }

    async fn deregister(&self, service: &ServiceName, id: &str) -> Result<()> {
        measured!(self, "deregister", self.inner.deregister(service, id))
    }

    async fn set_health(&self, service: &ServiceName, id: &str, health: Health) -> Result<()> {
        measured!(self, "set_health", self.inner.set_health(service, id, health))
    }

    async fn instances(&self, query: &Query) -> Result<Vec<Instance>> {
        measured!(self, "instances", self.inner.instances(query))
    }

    async fn services(&self) -> Result<Vec<ServiceName>> {
        measured!(self, "services", self.inner.services())
    }

    async fn watch(&self, query: Query) -> Result<SnapshotStream> {
        let stream = measured!(self, "watch", self.inner.watch(query))?;
        let errors = self.watch_errors.get_or_create(&BackendLabels { backend: self.inner.backend().to_owned() }).clone();
        Ok(futures::StreamExt::boxed(futures::StreamExt::inspect(stream, move |snapshot| {
            if snapshot.error.is_some() {
                errors.inc();
            }
        })))
    }
}
