//! Prometheus metrics of shipping.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// Counters a [`crate::Shipper`] keeps up to date (see [`crate::Shipper::with_metrics`]).
/// Clones share the counters.
#[derive(Clone, Debug, Default)]
pub struct ShipMetrics {
    records: Counter,
    bytes: Counter,
    batches: Counter,
    retries: Counter,
    ack_errors: Counter,
}

impl ShipMetrics {
    /// Counters registered in `registry` as `keelson_logship_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = ShipMetrics::default();
        registry.register("keelson_logship_records", "Records the sink acknowledged", m.records.clone());
        registry.register("keelson_logship_bytes", "Bytes of lines the sink acknowledged", m.bytes.clone());
        registry.register("keelson_logship_batches", "Batches the sink acknowledged", m.batches.clone());
        registry.register("keelson_logship_retries", "Sends retried after a sink error", m.retries.clone());
        registry.register(
            "keelson_logship_ack_errors",
            "Acknowledgements a source could not record (re-sent after a restart)",
            m.ack_errors.clone(),
        );
        m
    }

    pub(crate) fn delivered(&self, records: u64, bytes: u64) {
        self.records.inc_by(records);
        self.bytes.inc_by(bytes);
        self.batches.inc();
    }

    pub(crate) fn retried(&self) {
        self.retries.inc();
    }

    pub(crate) fn ack_failed(&self) {
        self.ack_errors.inc();
    }
}
