//! One-off runs through the cluster: submit a task with a time limit, the placement
//! engine picks a node, that node's agent runs it once, stops it at the limit, and keeps
//! its outcome and output in the cluster store after the task itself is removed.
//!
//! Layout under the store's root: `runs/<node>/<id>` holds a [`RunRecord`] while the run
//! is pending or running (the [`OneOffRun`] state machine inside it is saved after every
//! step, so a restarted agent neither starts it twice nor forgets its time limit);
//! `run-results/<id>` holds the [`RunResult`] once it has ended.

use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::agent::{TaskTemplate, NODE_LABEL};
use crate::cluster_store::{decode, encode, kv_err, wall_clock_ms, ClusterStore};
use crate::driver::{Driver, OutputLine};
use crate::error::{validate_id, Error, Result};
use crate::model::{Allocation, ClusterSnapshot, Job, Resources, TaskGroup};
use crate::oneoff::{OneOffRun, RunAction, RunObserved, RunOutcome};
use crate::placement::{PlacementEngine, Scheduler};
use crate::process::OUTPUT_TAIL;

/// Label on a run's task (its id), which the allocation loop of an agent leaves alone.
pub const RUN_LABEL: &str = "keelson.run";

/// A one-off task to run once somewhere in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    #[serde(with = "crate::strategy::humantime_serde_compat")]
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
    /// The last [`OUTPUT_TAIL`] lines of stdout and stderr.
    pub output: Vec<OutputLine>,
    /// When it ended (ms since the Unix epoch).
    pub finished_ms: u64,
}

impl ClusterStore {
    /// Places `spec` on a node (the placement engine, counting every allocation and
    /// run) and records it for that node's agent. [`Error::Conflict`] if a run with this
    /// id exists or has a result; [`Error::Unplaced`] if no node can take it now.
    pub async fn submit_run(&self, spec: &RunSpec) -> Result<RunRecord> {
        validate_id("run id", &spec.id)?;
        validate_id("job id", &spec.job)?;
        if spec.time_limit.is_zero() {
            return Err(Error::invalid("time limit", "0s", "a run needs time to run"));
        }
        for _ in 0..5 {
            if self.run_result(&spec.id).await?.is_some() {
                return Err(Error::Conflict { kind: "run", name: spec.id.clone() });
            }
            let view = self.view().await?;
            let runs = self.all_runs().await?;
            if runs.iter().any(|r| r.spec.id == spec.id) {
                return Err(Error::Conflict { kind: "run", name: spec.id.clone() });
            }
            let lost = view.lost_nodes();
            let mut snapshot = ClusterSnapshot { nodes: view.nodes.clone(), volumes: view.volumes.clone(), ..ClusterSnapshot::default() };
            // Allocation resources are not recorded per allocation; runs' are.
            snapshot.allocations = runs
                .iter()
                .filter(|r| !lost.contains(&r.node))
                .map(|r| Allocation::new(r.spec.id.clone(), r.node.clone(), r.spec.job.clone(), "run", r.spec.resources))
                .collect();
            let job = Job::new(spec.job.clone(), vec![TaskGroup::new("run", 1, spec.resources)]);
            let plan = PlacementEngine::new().plan(&snapshot, &job)?;
            let Some(placement) = plan.placements.first() else {
                let reason = plan.unplaced.first().map_or_else(|| "no node".to_owned(), |u| format!("{:?}", u.explanation));
                return Err(Error::Unplaced { what: format!("run {}", spec.id), reason });
            };
            let record = RunRecord {
                spec: spec.clone(),
                node: placement.node.clone(),
                run: OneOffRun::new(spec.time_limit),
                submitted_ms: wall_clock_ms(),
            };
            let mut commit = view.plan();
            commit.put_run(record.clone());
            match self.commit(&commit).await {
                Ok(_) => return Ok(record),
                Err(Error::Conflict { kind: "plan for node" | "plan", .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict { kind: "plan", name: format!("run {} (5 attempts)", spec.id) })
    }

    async fn all_runs(&self) -> Result<Vec<RunRecord>> {
        let list = self.kv.list(&self.key(&["runs", ""])).await.map_err(kv_err)?;
        list.entries.iter().map(|e| decode(&e.key, &e.value)).collect()
    }

    /// The runs placed on `node` that have not ended.
    pub async fn runs_on(&self, node: &str) -> Result<Vec<RunRecord>> {
        let list = self.kv.list(&self.key(&["runs", node, ""])).await.map_err(kv_err)?;
        list.entries.iter().map(|e| decode(&e.key, &e.value)).collect()
    }

    /// A run's result, once it has ended.
    pub async fn run_result(&self, id: &str) -> Result<Option<RunResult>> {
        let key = self.key(&["run-results", id]);
        self.kv.get(&key).await.map_err(kv_err)?.map(|e| decode(&key, &e.value)).transpose()
    }

    async fn save_run(&self, record: &RunRecord) -> Result<()> {
        self.kv.put(&self.key(&["runs", &record.node, &record.spec.id]), encode(record)?, None).await.map_err(kv_err)?;
        Ok(())
    }

    /// Keeps the result first, then drops the pending record: a crash in between leaves
    /// a record whose result exists, which the next pass just clears.
    async fn finish_run(&self, record: &RunRecord, result: &RunResult) -> Result<()> {
        self.kv.put(&self.key(&["run-results", &result.id]), encode(result)?, None).await.map_err(kv_err)?;
        self.forget_run(&record.node, &record.spec.id).await
    }

    async fn forget_run(&self, node: &str, id: &str) -> Result<()> {
        self.kv.delete(&self.key(&["runs", node, id])).await.map_err(kv_err)?;
        Ok(())
    }
}

impl crate::cluster_store::PlanCommit {
    /// Adds a placed run.
    pub(crate) fn put_run(&mut self, record: RunRecord) {
        self.touch(&record.node);
        self.runs.push(record);
    }
}

fn millis(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// The last lines of a task's output (its stream ends once the task has exited).
async fn collect_output(driver: &dyn Driver, id: &str) -> Vec<OutputLine> {
    let Ok(stream) = driver.output(id).await else { return Vec::new() };
    let mut lines = std::collections::VecDeque::new();
    let read = stream.for_each(|line| {
        if lines.len() == OUTPUT_TAIL {
            lines.pop_front();
        }
        lines.push_back(line);
        futures::future::ready(())
    });
    // A stream that does not end (a grandchild holding the pipe) is cut off.
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    lines.into()
}

/// One agent pass over its node's runs: start, stop at the limit, keep what ended.
pub(crate) async fn sync_runs(
    store: &ClusterStore,
    driver: &dyn Driver,
    node: &str,
    stop_grace: Duration,
) -> Result<Vec<(String, RunOutcome)>> {
    let mut finished = Vec::new();
    for mut record in store.runs_on(node).await? {
        let id = record.spec.id.clone();
        if store.run_result(&id).await?.is_some() {
            // Ended, and the agent stopped between keeping the result and clearing this.
            store.forget_run(node, &id).await?;
            continue;
        }
        let observed = match driver.inspect(&id).await {
            Ok(s) => match s.state {
                crate::driver::TaskState::Exited { code, .. } => RunObserved::Exited { code },
                crate::driver::TaskState::Running => RunObserved::Running { since: millis(s.started_at) },
            },
            Err(Error::NotFound { .. }) => RunObserved::Absent,
            Err(e) => return Err(e),
        };
        let before = record.run.clone();
        let action = record.run.step(observed, wall_clock_ms());
        let mut failure_line = None;
        match action {
            Some(RunAction::Start) => {
                // Saved before starting: a crash after the start adopts the task, never
                // starts a second one.
                store.save_run(&record).await?;
                let spec = record
                    .spec
                    .task
                    .to_spec(id.clone())
                    .with_label(NODE_LABEL, node)
                    .with_label(RUN_LABEL, id.clone())
                    .with_label("keelson.job", record.spec.job.clone());
                match driver.start(spec).await {
                    Ok(_) => tracing::info!(run = %id, %node, "run started"),
                    Err(e) if e.is_retryable() => return Err(e),
                    Err(e) => {
                        // It cannot start (bad command, missing image): that is its outcome.
                        tracing::warn!(run = %id, error = %e, "run failed to start");
                        failure_line = Some(e.to_string());
                        record.run.step(RunObserved::Exited { code: None }, wall_clock_ms());
                    }
                }
            }
            Some(RunAction::Stop) => {
                tracing::info!(run = %id, limit = ?record.spec.time_limit, "run over its time limit; stopping");
                match driver.stop(&id, stop_grace).await {
                    Ok(_) | Err(Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            None => {}
        }
        if let Some(outcome) = record.run.outcome() {
            let mut output = collect_output(driver, &id).await;
            if let Some(line) = failure_line {
                output.push(OutputLine { stream: crate::driver::OutputStream::Stderr, line, timestamp: std::time::SystemTime::now() });
            }
            let result = RunResult {
                id: id.clone(),
                job: record.spec.job.clone(),
                node: node.to_owned(),
                outcome,
                output,
                finished_ms: wall_clock_ms(),
            };
            store.finish_run(&record, &result).await?;
            match driver.remove(&id).await {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => tracing::warn!(run = %id, error = %e, "removing a finished run's task"),
            }
            tracing::info!(run = %id, ?outcome, "run ended");
            finished.push((id, outcome));
        } else if record.run != before {
            store.save_run(&record).await?;
        }
    }
    Ok(finished)
}
