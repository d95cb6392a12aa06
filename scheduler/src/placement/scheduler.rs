//! The `Scheduler` trait and `PlacementEngine`, the embedded default.

use crate::error::Result;
use crate::placement::engine::EngineConfig;
use crate::placement::model::{ClusterSnapshot, Job, Plan};
use crate::placement::state::ClusterState;

/// What a scheduler supports.
///
/// A backend outside this crate starts from `default()` (nothing supported) and sets
/// the fields it supports: `let mut caps = SchedulerCapabilities::default(); caps.constraints = true;`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SchedulerCapabilities {
    /// Honours every constraint operator (`=`, `!=`, ordering, version, regexp, sets,
    /// presence, distinct hosts and properties).
    pub constraints: bool,
    /// Honours affinities and spread.
    pub affinities_and_spread: bool,
    /// Places around volumes (locality, single writer).
    pub volumes: bool,
    /// Static and dynamic ports.
    pub ports: bool,
    /// Preempts lower-priority work.
    pub preemption: bool,
}

/// Decides where tasks run. Pure and synchronous: the same snapshot and job give the same
/// plan, and nothing is read or written besides the arguments.
pub trait Scheduler: Send + Sync + std::fmt::Debug {
    /// The scheduler's name.
    fn name(&self) -> &'static str;

    /// What it supports.
    fn capabilities(&self) -> SchedulerCapabilities;

    /// Places every task of `job` on `snapshot`, on top of its existing allocations.
    /// Tasks that fit nowhere are listed in [`Plan::unplaced`] with an explanation; a job
    /// that could never fit (bad input, a task larger than any node) is an error.
    fn plan(&self, snapshot: &ClusterSnapshot, job: &Job) -> Result<Plan>;

    /// Places `job` in an indexed `state` and applies the plan to it (evictions removed,
    /// placements added as allocations), so the next job placed sees them. Orchestration
    /// places through this. The default plans on [`ClusterState::to_snapshot`] and
    /// applies the result with [`ClusterState::apply`] (a cost of the cluster's size per
    /// call); [`PlacementEngine`] places in the state directly.
    fn place_in(&self, state: &mut ClusterState, job: &Job) -> Result<Plan> {
        let plan = self.plan(&state.to_snapshot(), job)?;
        state.apply(job, &plan)?;
        Ok(plan)
    }
}

/// The placement engine behind the [`Scheduler`] trait. For many jobs against one
/// cluster, build a [`ClusterState`] once and call [`ClusterState::place`] instead: this
/// method indexes the snapshot on every call.
#[derive(Clone, Debug, Default)]
pub struct PlacementEngine {
    config: EngineConfig,
}

impl PlacementEngine {
    /// An engine with default limits.
    pub fn new() -> Self {
        PlacementEngine::default()
    }

    /// An engine with `config`.
    pub fn with_config(config: EngineConfig) -> Self {
        PlacementEngine { config }
    }

    /// The engine's limits.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }
}

impl Scheduler for PlacementEngine {
    fn name(&self) -> &'static str {
        "keelson"
    }

    fn capabilities(&self) -> SchedulerCapabilities {
        SchedulerCapabilities {
            constraints: true,
            affinities_and_spread: true,
            volumes: true,
            ports: true,
            preemption: self.config.preemption,
        }
    }

    fn plan(&self, snapshot: &ClusterSnapshot, job: &Job) -> Result<Plan> {
        ClusterState::from_snapshot(snapshot)?.place(job, &self.config)
    }

    fn place_in(&self, state: &mut ClusterState, job: &Job) -> Result<Plan> {
        state.place(job, &self.config)
    }
}

impl Job {
    /// Parses a job from JSON; unknown keys, negative numbers and wrong types are
    /// [`Error::InvalidInput`] naming the problem and its line.
    pub fn from_json(text: &str) -> Result<Job> {
        crate::records::parse_strict("job file", text)
    }
}
