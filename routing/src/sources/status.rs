//! Whether a route source is current, as metrics.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Whether a route source is current, as metrics: `keelson_route_source_stale` (1 while
/// the source fails and the last good routes are served), `keelson_route_source_errors_total`
/// and `keelson_route_source_last_success_seconds` (Unix time). Clones share the values.
#[derive(Debug, Clone, Default)]
pub struct SourceStatus {
    stale: Gauge,
    errors: Counter,
    last_success: Gauge<f64, AtomicU64>,
}

impl SourceStatus {
    /// A status that is not stale and has seen no success yet.
    pub fn new() -> Self {
        SourceStatus::default()
    }

    /// Whether the source is failing now.
    pub fn is_stale(&self) -> bool {
        self.stale.get() == 1
    }

    /// Failures seen (outages, each reported once by the watch).
    pub fn errors(&self) -> u64 {
        self.errors.get()
    }

    /// Registers the three metrics in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "keelson_route_source_stale",
            "1 while the route source fails and the last good routes are served",
            self.stale.clone(),
        );
        registry.register("keelson_route_source_errors", "Route source failures", self.errors.clone());
        registry.register(
            "keelson_route_source_last_success_seconds",
            "When the route source last answered, Unix time",
            self.last_success.clone(),
        );
    }

    pub(crate) fn succeeded(&self) {
        self.stale.set(0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.last_success.set(now);
    }

    pub(crate) fn failed(&self) {
        self.stale.set(1);
        self.errors.inc();
    }
}
