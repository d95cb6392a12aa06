//! Runs one-off runs on this node: the agent's pass over the runs the cluster store
//! placed here (start, stop at the time limit, keep the outcome and the end of the output
//! in the store, remove the task). Placement and records are orchestration's
//! ([`RunSpec`](crate::RunSpec)); this is the node's half.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;

use crate::error::{Error, Result};
use crate::orchestrate::cluster_store::{wall_clock_ms, ClusterStore};
use crate::orchestrate::metrics::OrchestrationMetrics;
use crate::orchestrate::oneoff::{RunAction, RunObserved, RunOutcome};
use crate::orchestrate::runs::{RunRecord, RunResult, RESULT_OUTPUT_BYTES, RUN_LABEL};
use crate::orchestrate::spec::NODE_LABEL;
use crate::records::Origin;
use crate::runtime::driver::Driver;
use crate::runtime::process::OUTPUT_TAIL;
use crate::runtime::task_logs::ShippedOutputs;
use crate::task::OutputLine;

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
            out.insert(0, OutputLine { stream: crate::task::OutputStream::Stderr, line: note, timestamp, partial: false });
        }
        out
    }
}

/// A finished run waits for its output to reach the log sink before its result is kept
/// and its task removed, for at most `limit`.
#[derive(Debug)]
pub(crate) struct RunOutputWait {
    shipped: ShippedOutputs,
    limit: Duration,
    /// When each run was first seen ended and not delivered.
    since: std::sync::Mutex<HashMap<String, Instant>>,
}

enum Delivery {
    Delivered,
    Waiting,
    GaveUp(Duration),
}

impl RunOutputWait {
    pub(crate) fn new(shipped: ShippedOutputs, limit: Duration) -> Self {
        RunOutputWait { shipped, limit, since: std::sync::Mutex::new(HashMap::new()) }
    }

    fn check(&self, id: &str, started: SystemTime) -> Delivery {
        let Ok(mut since) = self.since.lock() else { return Delivery::GaveUp(Duration::ZERO) };
        if self.shipped.is_delivered(id, started) {
            since.remove(id);
            return Delivery::Delivered;
        }
        let waited = since.entry(id.to_owned()).or_insert_with(Instant::now).elapsed();
        if waited >= self.limit {
            since.remove(id);
            return Delivery::GaveUp(waited);
        }
        self.shipped.look_now();
        Delivery::Waiting
    }
}

/// What a pass over the node's runs works with.
pub(crate) struct RunPass<'a> {
    pub(crate) store: &'a ClusterStore,
    pub(crate) driver: &'a dyn Driver,
    pub(crate) node: &'a str,
    pub(crate) stop_grace: Duration,
    pub(crate) output_wait: Option<&'a RunOutputWait>,
    pub(crate) metrics: &'a OrchestrationMetrics,
}

/// One agent pass over its node's runs: start, stop at the limit, keep what ended.
pub(crate) async fn sync_runs(pass: &RunPass<'_>) -> Result<Vec<(String, RunOutcome)>> {
    let mut finished = Vec::new();
    let mut failed = None;
    for (record, origin) in pass.store.runs_on_stored(pass.node).await? {
        let id = record.spec.id.clone();
        match step_run(pass, record, &origin).await {
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
async fn step_run(pass: &RunPass<'_>, mut record: RunRecord, origin: &Origin) -> Result<Option<RunOutcome>> {
    let RunPass { store, driver, node, stop_grace, .. } = *pass;
    let id = record.spec.id.clone();
    if store.run_result(&id).await?.is_some() {
        // Ended, and the agent stopped between keeping the result and clearing this.
        store.forget_run(node, &id).await?;
        return Ok(None);
    }
    let mut started_at = None;
    let observed = match driver.inspect(&id).await {
        Ok(s) => match s.state {
            crate::task::TaskState::Exited { code, .. } => {
                started_at = Some(s.started_at);
                RunObserved::Exited { code }
            }
            crate::task::TaskState::Running => RunObserved::Running { since: millis(s.started_at) },
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
        let mut undelivered = None;
        if let (Some(wait), Some(started)) = (pass.output_wait, started_at) {
            match wait.check(&id, started) {
                Delivery::Delivered => {}
                Delivery::Waiting => {
                    // Kept as it is (the outcome saved) until the shipper has it all.
                    if record.run != before {
                        store.save_run(&record, origin).await?;
                    }
                    return Ok(None);
                }
                Delivery::GaveUp(waited) => {
                    pass.metrics.runs_output_undelivered.inc();
                    tracing::warn!(run = %id, ?waited, "a run's output did not reach the log sink in time; its task is removed anyway");
                    undelivered = Some(format!(
                        "[keelson: this run's output was not confirmed delivered to the log sink after {}; the log server may miss lines]",
                        humantime::format_duration(Duration::from_secs(waited.as_secs()))
                    ));
                }
            }
        }
        let mut output = collect_output(driver, &id).await;
        for line in failure_line.into_iter().chain(undelivered) {
            output.push(OutputLine {
                stream: crate::task::OutputStream::Stderr,
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
