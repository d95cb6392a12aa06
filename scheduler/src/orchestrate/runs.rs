//! One-off runs through the cluster: submit a task with a time limit, the store's
//! scheduler picks a node, that node's agent runs it once, stops it at the limit, and keeps
//! its outcome and output in the cluster store after the task itself is removed.
//!
//! Layout under the store's root: `runs/<node>/<id>` holds a [`RunRecord`] while the run
//! is pending or running (the [`OneOffRun`] state machine inside it is saved after every
//! step, so a restarted agent neither starts it twice nor forgets its time limit);
//! `run-results/<id>` holds the [`RunResult`] once it has ended.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::orchestrate::oneoff::{OneOffRun, RunOutcome};
use crate::orchestrate::spec::TaskTemplate;
use crate::placement::model::Resources;
use crate::task::OutputLine;

/// The most output bytes a run's result keeps, so that a result is always small enough to
/// store (every backend takes a value of 512 KiB; the rest of the record needs room).
/// The whole output belongs in the log pipeline; this is the tail for a quick look.
pub const RESULT_OUTPUT_BYTES: usize = 256 * 1024;

/// Label on a run's task (its id), which the allocation loop of an agent leaves alone.
pub const RUN_LABEL: &str = "keelson.run";

/// A one-off task to run once somewhere in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Run id, unique in the cluster (also the task id on its node).
    pub id: String,
    /// The job it belongs to (for placement accounting and listing).
    pub job: String,
    /// What to run.
    pub task: TaskTemplate,
    /// What it needs.
    pub resources: Resources,
    /// It is stopped (and counts as timed out) after running this long.
    #[serde(with = "crate::records::humantime_serde_compat")]
    pub time_limit: Duration,
}

/// A placed run, pending or running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// What to run.
    pub spec: RunSpec,
    /// Where.
    pub node: String,
    /// Its state machine.
    pub run: OneOffRun,
    /// When it was submitted (ms since the Unix epoch).
    pub submitted_ms: u64,
}

/// How a run ended, kept after its task is gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResult {
    /// Run id.
    pub id: String,
    /// Its job.
    pub job: String,
    /// The node it ran on.
    pub node: String,
    /// Succeeded, failed (with the exit code) or timed out.
    pub outcome: RunOutcome,
    /// The last [`OUTPUT_TAIL`] lines of stdout and stderr, at most [`RESULT_OUTPUT_BYTES`]
    /// in all; when lines were cut, the first line says how many.
    pub output: Vec<OutputLine>,
    /// When it ended (ms since the Unix epoch).
    pub finished_ms: u64,
}
