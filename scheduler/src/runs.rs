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
use crate::cluster_store::{decode, encode, encode_over, kv_err, wall_clock_ms, ClusterStore};
use crate::driver::{Driver, OutputLine};
use crate::error::{validate_id, Error, Result};
use crate::model::{Allocation, ClusterSnapshot, Job, Resources, TaskGroup};
use crate::oneoff::{OneOffRun, RunAction, RunObserved, RunOutcome};
use crate::placement::{PlacementEngine, Scheduler};
use crate::process::OUTPUT_TAIL;
use crate::records::Origin;

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
    /// The last [`OUTPUT_TAIL`] lines of stdout and stderr, at most [`RESULT_OUTPUT_BYTES`]
    /// in all; when lines were cut, the first line says how many.
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
            // What runs and live allocations hold (older allocation records carry no
            // resources and count as zero).
            snapshot.allocations = runs
                .iter()
                .filter(|r| !lost.contains(&r.node))
                .map(|r| Allocation::new(r.spec.id.clone(), r.node.clone(), r.spec.job.clone(), "run", r.spec.resources))
                .chain(
                    view.allocations
                        .iter()
                        .filter(|a| !lost.contains(&a.node) && a.status != crate::reconcile::AllocStatus::Failed)
                        .map(|a| Allocation::new(a.id.clone(), a.node.clone(), a.job.clone(), a.group.clone(), a.resources)),
                )
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

    /// The runs placed on `node`, with where each was read from (for write-backs).
    async fn runs_on_stored(&self, node: &str) -> Result<Vec<(RunRecord, Origin)>> {
        let list = self.kv.list(&self.key(&["runs", node, ""])).await.map_err(kv_err)?;
        list.entries.iter().map(|e| Ok((decode(&e.key, &e.value)?, Origin::of(e)))).collect()
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

    /// Saves a run's state over the record it was read from (only its agent writes it
    /// after placement), keeping fields this version does not know.
    async fn save_run(&self, record: &RunRecord, origin: &Origin) -> Result<()> {
        let value = encode_over(Some(&origin.bytes), record)?;
        self.kv.put(&self.key(&["runs", &record.node, &record.spec.id]), value, None).await.map_err(kv_err)?;
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

/// The last lines of a task's output (its stream ends once the task has exited), at most
/// [`OUTPUT_TAIL`] lines and [`RESULT_OUTPUT_BYTES`] bytes; a first line says what was cut.
async fn collect_output(driver: &dyn Driver, id: &str) -> Vec<OutputLine> {
    let Ok(stream) = driver.output(id).await else { return Vec::new() };
    let mut tail = OutputTail::default();
    let read = stream.for_each(|line| {
        tail.push(line);
        futures::future::ready(())
    });
    // A stream that does not end (a grandchild holding the pipe) is cut off.
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    tail.finish()
}

/// The end of a task's output, bounded in lines and bytes as it streams by.
#[derive(Default)]
struct OutputTail {
    lines: std::collections::VecDeque<OutputLine>,
    bytes: usize,
    cut_lines: u64,
    cut_bytes: u64,
}

impl OutputTail {
    fn push(&mut self, mut line: OutputLine) {
        if line.line.len() > RESULT_OUTPUT_BYTES {
            // One line longer than the whole budget: keep its end, on a char boundary.
            let mut start = line.line.len() - RESULT_OUTPUT_BYTES;
            while !line.line.is_char_boundary(start) {
                start += 1;
            }
            self.cut_bytes += start as u64;
            line.line.drain(..start);
        }
        self.bytes += line.line.len();
        self.lines.push_back(line);
        while self.lines.len() > OUTPUT_TAIL || self.bytes > RESULT_OUTPUT_BYTES {
            let Some(old) = self.lines.pop_front() else { break };
            self.bytes -= old.line.len();
            self.cut_lines += 1;
            self.cut_bytes += old.line.len() as u64;
        }
    }

    fn finish(self) -> Vec<OutputLine> {
        let mut out: Vec<OutputLine> = self.lines.into();
        if self.cut_bytes > 0 {
            let note = format!("[keelson: earlier output cut: {} lines, {} bytes]", self.cut_lines, self.cut_bytes);
            let timestamp = out.first().map_or_else(std::time::SystemTime::now, |l| l.timestamp);
            out.insert(0, OutputLine { stream: crate::driver::OutputStream::Stderr, line: note, timestamp, partial: false });
        }
        out
    }
}

/// One agent pass over its node's runs: start, stop at the limit, keep what ended.
pub(crate) async fn sync_runs(
    store: &ClusterStore,
    driver: &dyn Driver,
    node: &str,
    stop_grace: Duration,
) -> Result<Vec<(String, RunOutcome)>> {
    let mut finished = Vec::new();
    let mut failed = None;
    for (record, origin) in store.runs_on_stored(node).await? {
        let id = record.spec.id.clone();
        match step_run(store, driver, node, stop_grace, record, &origin).await {
            Ok(Some(outcome)) => finished.push((id, outcome)),
            Ok(None) => {}
            // The store is away: no other run can be saved either.
            Err(e) if e.is_retryable() => return Err(e),
            // One run that cannot be saved must not hold up the runs after it.
            Err(e) => {
                tracing::warn!(run = %id, error = %e, "run step failed; going on with the other runs");
                failed.get_or_insert(e);
            }
        }
    }
    match failed {
        Some(e) if finished.is_empty() => Err(e),
        _ => Ok(finished),
    }
}

/// One step of one run; its outcome when it ended in this step.
async fn step_run(
    store: &ClusterStore,
    driver: &dyn Driver,
    node: &str,
    stop_grace: Duration,
    mut record: RunRecord,
    origin: &Origin,
) -> Result<Option<RunOutcome>> {
    let id = record.spec.id.clone();
    if store.run_result(&id).await?.is_some() {
        // Ended, and the agent stopped between keeping the result and clearing this.
        store.forget_run(node, &id).await?;
        return Ok(None);
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
            store.save_run(&record, origin).await?;
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
            output.push(OutputLine {
                stream: crate::driver::OutputStream::Stderr,
                line,
                timestamp: std::time::SystemTime::now(),
                partial: false,
            });
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
        return Ok(Some(outcome));
    } else if record.run != before {
        store.save_run(&record, origin).await?;
    }
    Ok(None)
}
