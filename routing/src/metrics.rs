//! The proxy's Prometheus metrics. Created with every [`Proxy`](crate::Proxy) (counters
//! are a few atomics, cheap enough to keep on) and exposed by registering them in the
//! embedder's registry with [`Proxy::register_metrics`](crate::Proxy::register_metrics).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::proxy::{ProxyHooks, RequestSummary};

/// Labels of `keelson_proxy_requests_total`. `route` is the matched route's host, or
/// empty when no route matched: labelling by the client's Host would let any client
/// create unbounded series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: RouteLabel,
    code: &'static str,
}

/// A route's name as a label value, shared with the route table: counting a request
/// copies a pointer, not the name.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct RouteLabel(Option<Arc<str>>);

impl EncodeLabelValue for RouteLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(self.0.as_deref().unwrap_or(""))
    }
}

/// The proxy's counters and histograms.
#[derive(Clone, Debug)]
pub(crate) struct ProxyMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Histogram,
    retries: Counter,
    retries_denied: Counter,
    ejections: Counter,
    parked: Gauge,
}

/// Counts a parked connection until dropped.
#[derive(Debug)]
pub(crate) struct ParkedConnection(Gauge);

impl Drop for ParkedConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        ProxyMetrics {
            requests: Family::default(),
            // 100 µs to ~26 s.
            duration: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            retries: Counter::default(),
            retries_denied: Counter::default(),
            ejections: Counter::default(),
            parked: Gauge::default(),
        }
    }
}

fn code_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl ProxyMetrics {
    /// Registers clones (they share the same atomics) in `registry`.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register("keelson_proxy_requests", "Requests by matched route and status class", self.requests.clone());
        registry.register(
            "keelson_proxy_response_seconds",
            "Time from request head to response head, including retries",
            self.duration.clone(),
        );
        registry.register("keelson_proxy_retries", "Upstream attempts retried after a connect failure", self.retries.clone());
        registry.register(
            "keelson_proxy_retries_denied",
            "Retryable failures not retried because the retry budget was empty",
            self.retries_denied.clone(),
        );
        registry.register("keelson_proxy_ejections", "Endpoints ejected by passive health checks", self.ejections.clone());
        registry.register(
            "keelson_proxy_connections_parked",
            "Idle client connections held without HTTP buffers until their next request",
            self.parked.clone(),
        );
    }

    /// Counts one more parked connection, until the guard is dropped.
    pub(crate) fn parked(&self) -> ParkedConnection {
        self.parked.inc();
        ParkedConnection(self.parked.clone())
    }

    fn request(&self, route: Option<&Arc<str>>, status: u16, took: Duration) {
        self.requests.get_or_create(&RequestLabels { route: RouteLabel(route.cloned()), code: code_class(status) }).inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub(crate) fn retry(&self) {
        self.retries.inc();
    }

    pub(crate) fn retry_denied(&self) {
        self.retries_denied.inc();
    }

    pub(crate) fn ejection(&self) {
        self.ejections.inc();
    }
}

/// Requests by route and status class, and response times: the metrics are a hook like
/// any other.
impl ProxyHooks for ProxyMetrics {
    fn logging(&self, summary: &RequestSummary<'_>) {
        self.request(summary.ctx.route_shared(), summary.status.as_u16(), summary.duration);
    }
}
