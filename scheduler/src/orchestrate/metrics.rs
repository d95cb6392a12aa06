//! Orchestration metrics (prometheus-client), shared by clones: give one
//! [`OrchestrationMetrics`] to the node agent and the controller of a process and
//! register it once in the embedder's `Registry`.
//!
//! - `keelson_agent_tasks_started_total`, `keelson_agent_tasks_stopped_total`
//! - `keelson_agent_status_reports_total{status}`: allocation status changes reported
//! - `keelson_agent_sync_errors_total`, `keelson_agent_sync_seconds` (histogram)
//! - `keelson_runs_finished_total{outcome}`: one-off runs that ended on this node
//! - `keelson_controller_ticks_total`, `keelson_controller_tick_errors_total`
//! - `keelson_controller_deployments_ended_total{outcome}`
//! - `keelson_controller_lost_allocations_total`, `keelson_controller_placed_total`

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A label with one value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Outcome {
    outcome: String,
}

/// An allocation status label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Status {
    status: String,
}

/// Counters and timings of node agents and controllers.
#[derive(Clone, Debug)]
pub struct OrchestrationMetrics {
    pub(crate) started: Counter,
    pub(crate) stopped: Counter,
    pub(crate) reports: Family<Status, Counter>,
    pub(crate) sync_errors: Counter,
    pub(crate) store_unreachable: prometheus_client::metrics::gauge::Gauge,
    pub(crate) sync_seconds: Histogram,
    pub(crate) runs_finished: Family<Outcome, Counter>,
    pub(crate) runs_output_undelivered: Counter,
    pub(crate) ticks: Counter,
    pub(crate) tick_errors: Counter,
    pub(crate) deployments_ended: Family<Outcome, Counter>,
    pub(crate) lost: Counter,
    pub(crate) placed: Counter,
    pub(crate) leader: prometheus_client::metrics::gauge::Gauge,
    pub(crate) leadership_lost: Counter,
}

impl Default for OrchestrationMetrics {
    fn default() -> Self {
        OrchestrationMetrics {
            started: Counter::default(),
            stopped: Counter::default(),
            reports: Family::default(),
            sync_errors: Counter::default(),
            store_unreachable: Default::default(),
            // 1 ms to ~16 s.
            sync_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            runs_finished: Family::default(),
            runs_output_undelivered: Counter::default(),
            ticks: Counter::default(),
            tick_errors: Counter::default(),
            deployments_ended: Family::default(),
            lost: Counter::default(),
            placed: Counter::default(),
            leader: Default::default(),
            leadership_lost: Counter::default(),
        }
    }
}

impl OrchestrationMetrics {
    /// Fresh metrics, all zero.
    pub fn new() -> Self {
        OrchestrationMetrics::default()
    }

    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register("keelson_agent_tasks_started", "Tasks started by node agents", self.started.clone());
        registry.register("keelson_agent_tasks_stopped", "Tasks stopped and removed by node agents", self.stopped.clone());
        registry.register("keelson_agent_status_reports", "Allocation status changes reported, by new status", self.reports.clone());
        registry.register("keelson_agent_sync_errors", "Agent passes that failed (retried)", self.sync_errors.clone());
        registry.register(
            "keelson_agent_store_unreachable",
            "1 while the node agent's last pass could not reach the cluster store (etcd or Consul down or unreachable)",
            self.store_unreachable.clone(),
        );
        registry.register("keelson_agent_sync_seconds", "Duration of agent passes", self.sync_seconds.clone());
        registry.register("keelson_runs_finished", "One-off runs that ended, by outcome", self.runs_finished.clone());
        registry.register(
            "keelson_runs_output_undelivered",
            "One-off runs whose task was removed before the log shipper confirmed their whole output delivered (waited past the limit)",
            self.runs_output_undelivered.clone(),
        );
        registry.register("keelson_controller_ticks", "Controller passes that held the lock", self.ticks.clone());
        registry.register("keelson_controller_tick_errors", "Controller passes that failed (retried)", self.tick_errors.clone());
        registry.register("keelson_controller_deployments_ended", "Deployments ended, by outcome", self.deployments_ended.clone());
        registry.register("keelson_controller_lost_allocations", "Allocations replaced because their node was lost", self.lost.clone());
        registry.register("keelson_controller_placed", "Allocations placed by rescheduling", self.placed.clone());
        registry.register("keelson_controller_leader", "1 while this controller holds the controller lock", self.leader.clone());
        registry.register(
            "keelson_controller_leadership_lost",
            "Times this controller lost its lock while leading (paused past the TTL, or fenced off) and stepped down",
            self.leadership_lost.clone(),
        );
    }

    pub(crate) fn outcome(value: impl std::fmt::Debug) -> Outcome {
        // The variant name only (`RolledBack`, not its reason): labels stay few.
        let text = format!("{value:?}");
        let name = text.split([' ', '{', '(']).next().unwrap_or_default().to_owned();
        Outcome { outcome: name }
    }

    pub(crate) fn status(value: impl std::fmt::Debug) -> Status {
        Status { status: format!("{value:?}") }
    }
}
