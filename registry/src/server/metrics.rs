//! The server's Prometheus metrics.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use tokio::io::{AsyncRead, ReadBuf};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    status: u16,
}

/// Requests by method and status, their latency, bytes received, failed authentications.
#[derive(Debug)]
pub struct ServerMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Histogram,
    /// Upload bytes received.
    pub bytes_received: Counter,
    /// Requests refused for missing, wrong or insufficient credentials.
    pub auth_failures: Counter,
    gc_runs: Counter,
    gc_blobs_removed: Counter,
    gc_bytes_removed: Counter,
    gc_uploads_removed: Counter,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics {
            requests: Family::default(),
            latency: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16)),
            bytes_received: Counter::default(),
            auth_failures: Counter::default(),
            gc_runs: Counter::default(),
            gc_blobs_removed: Counter::default(),
            gc_bytes_removed: Counter::default(),
            gc_uploads_removed: Counter::default(),
        }
    }
}

impl ServerMetrics {
    pub(crate) fn observe(&self, method: &http::Method, status: http::StatusCode, took: Duration) {
        self.requests.get_or_create(&RequestLabels { method: method.to_string(), status: status.as_u16() }).inc();
        self.latency.observe(took.as_secs_f64());
    }

    /// Counts what a garbage collection removed on purpose, so it shows in metrics.
    pub fn observe_gc(&self, report: &crate::GcReport) {
        self.gc_runs.inc();
        self.gc_blobs_removed.inc_by(report.blobs_removed as u64);
        self.gc_bytes_removed.inc_by(report.bytes_removed);
        self.gc_uploads_removed.inc_by(report.uploads_removed as u64);
    }

    /// Registers every metric under `registry_`.
    pub fn register(self: &Arc<Self>, registry: &mut prometheus_client::registry::Registry) {
        let sub = registry.sub_registry_with_prefix("registry");
        sub.register("requests", "Requests answered, by method and status", self.requests.clone());
        sub.register("request_seconds", "Time to the response head", self.latency.clone());
        sub.register("upload_bytes", "Blob bytes received", self.bytes_received.clone());
        sub.register("auth_failures", "Requests refused by authentication or authorization", self.auth_failures.clone());
        sub.register("gc_runs", "Garbage collections run", self.gc_runs.clone());
        sub.register("gc_blobs_removed", "Unreferenced blobs removed by garbage collection", self.gc_blobs_removed.clone());
        sub.register("gc_removed_bytes", "Bytes freed by garbage collection", self.gc_bytes_removed.clone());
        sub.register("gc_uploads_removed", "Idle upload sessions ended by garbage collection", self.gc_uploads_removed.clone());
    }
}

/// Counts bytes read through it into `bytes_received`.
pub(crate) struct CountingReader {
    inner: crate::store::BlobReader,
    metrics: Arc<ServerMetrics>,
}

impl CountingReader {
    pub(crate) fn new(inner: crate::store::BlobReader, metrics: Arc<ServerMetrics>) -> Self {
        CountingReader { inner, metrics }
    }
}

impl AsyncRead for CountingReader {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.metrics.bytes_received.inc_by(n as u64);
        }
        r
    }
}
