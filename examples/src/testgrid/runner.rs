//! Running tests as one-off runs through a cluster store: at most `workers` at a time,
//! each from the suite's image with its time limit, its whole output read back from the
//! log server once its result is in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_scheduler::{ClusterStore, Error as SchedulerError, Resources, RunOutcome, RunSpec, TaskTemplate};
use serde::{Deserialize, Serialize};

use super::TestgridError;
use crate::logs_client::{fetch_records, LogQuery};

/// Where tests run and where their output is read back.
#[derive(Clone, Debug)]
pub struct Target {
    /// The cluster's store (its agents run the tests).
    pub store: ClusterStore,
    /// The log server the agents ship task output to (`http://host:port`).
    pub logd: String,
    /// Its bearer token.
    pub logd_token: Option<String>,
}

/// One test to run.
#[derive(Clone, Debug)]
pub struct TestCase {
    /// Its name (the module's, or `baseline`).
    pub name: String,
    /// The image.
    pub image: String,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Its time limit.
    pub time_limit: Duration,
    /// What it asks of its node.
    pub resources: Resources,
}

/// How a test ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    /// Exit code 0.
    Passed,
    /// Another exit code (none: killed by a signal, or it could not start).
    Failed {
        /// The exit code.
        code: Option<i32>,
    },
    /// Stopped at its time limit.
    TimedOut,
    /// Not run.
    Skipped {
        /// Why.
        reason: String,
    },
}

impl Status {
    /// The word the report shows.
    pub fn word(&self) -> &'static str {
        match self {
            Status::Passed => "passed",
            Status::Failed { .. } => "failed",
            Status::TimedOut => "timed out",
            Status::Skipped { .. } => "skipped",
        }
    }

    /// Whether it counts against the run.
    pub fn is_bad(&self) -> bool {
        matches!(self, Status::Failed { .. } | Status::TimedOut)
    }
}

/// One stream of a test's output.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Captured {
    /// The text, lines joined by newlines.
    pub text: String,
    /// How many lines.
    pub lines: usize,
}

/// A finished test.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestOutcome {
    /// Its name.
    pub name: String,
    /// How it ended.
    pub status: Status,
    /// From submission to result, in seconds.
    pub seconds: f64,
    /// The node it ran on.
    pub node: Option<String>,
    /// Its standard output, from the log server.
    pub stdout: Captured,
    /// Its standard error, from the log server.
    pub stderr: Captured,
    /// What is missing from the output, if anything (said in the report).
    pub truncation: Option<String>,
}

impl TestOutcome {
    /// A test that was not run.
    pub fn skipped(name: &str, reason: impl Into<String>) -> TestOutcome {
        TestOutcome {
            name: name.to_owned(),
            status: Status::Skipped { reason: reason.into() },
            seconds: 0.0,
            node: None,
            stdout: Captured::default(),
            stderr: Captured::default(),
            truncation: None,
        }
    }
}

/// What a live display learns as tests go.
pub trait Progress: Send + Sync {
    /// A test was placed on `node`.
    fn started(&self, name: &str, node: &str);
    /// A test ended.
    fn finished(&self, outcome: &TestOutcome);
}

/// How often a pending run's result is looked for.
const POLL: Duration = Duration::from_millis(150);

/// Runs `cases` under `job` (a fresh id per testgrid run), at most `workers` at a time,
/// and returns their outcomes in the order given.
pub async fn run_all(
    target: &Target,
    job: &str,
    cases: Vec<TestCase>,
    workers: usize,
    progress: Arc<dyn Progress>,
) -> Result<Vec<TestOutcome>, TestgridError> {
    let slots = Arc::new(tokio::sync::Semaphore::new(workers.max(1)));
    let mut running = tokio::task::JoinSet::new();
    let count = cases.len();
    for (index, case) in cases.into_iter().enumerate() {
        let permit = slots.clone().acquire_owned().await.map_err(|_| TestgridError::Interrupted)?;
        let (target, job, progress) = (target.clone(), job.to_owned(), progress.clone());
        running.spawn(async move {
            let outcome = run_one(&target, &job, &case, &*progress).await;
            drop(permit);
            (index, outcome)
        });
    }
    let mut outcomes: Vec<Option<TestOutcome>> = vec![None; count];
    while let Some(done) = running.join_next().await {
        let (index, outcome) = done.map_err(|e| TestgridError::Runner(format!("a test's task failed: {e}")))?;
        outcomes[index] = Some(outcome?);
    }
    Ok(outcomes.into_iter().flatten().collect())
}

/// Runs one test and reads its output back.
pub async fn run_one(target: &Target, job: &str, case: &TestCase, progress: &dyn Progress) -> Result<TestOutcome, TestgridError> {
    let id = format!("{job}-{}", case.name);
    let spec = RunSpec {
        id: id.clone(),
        job: job.to_owned(),
        task: TaskTemplate { image: Some(case.image.clone()), command: case.command.clone(), ..TaskTemplate::default() },
        resources: case.resources,
        time_limit: case.time_limit,
    };
    let started = Instant::now();
    // A full cluster places nothing now: wait for room rather than fail the test.
    let record = loop {
        match target.store.submit_run(&spec).await {
            Ok(record) => break record,
            Err(SchedulerError::Unplaced { .. }) => tokio::time::sleep(POLL).await,
            Err(e) if e.is_retryable() => tokio::time::sleep(POLL).await,
            Err(e) => return Err(e.into()),
        }
    };
    progress.started(&case.name, &record.node);
    let result = loop {
        match target.store.run_result(&id).await {
            Ok(Some(result)) => break result,
            Ok(None) => {}
            Err(e) if e.is_retryable() => {}
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(POLL).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    let status = match result.outcome {
        RunOutcome::Succeeded => Status::Passed,
        RunOutcome::Failed { code } => Status::Failed { code },
        RunOutcome::TimedOut => Status::TimedOut,
    };
    let query = LogQuery { service: job.to_owned(), instance: Some(id.clone()), ..LogQuery::default() };
    let records = fetch_records(&query, &target.logd, target.logd_token.as_deref()).await.map_err(TestgridError::Logs)?;
    let (mut stdout, mut stderr) = (Joiner::default(), Joiner::default());
    for r in &records {
        match r.stream {
            keelson_logship::Stream::Stderr => stderr.push(&r.line, r.partial),
            _ => stdout.push(&r.line, r.partial),
        }
    }
    let mut truncation = result_notes(&result.output, records.len());
    if records.is_empty() && !result.output.is_empty() {
        // Nothing reached the log server: show the run's own tail rather than nothing.
        for line in &result.output {
            match line.stream {
                keelson_scheduler::OutputStream::Stderr => stderr.push(&line.line, line.partial),
                keelson_scheduler::OutputStream::Stdout => stdout.push(&line.line, line.partial),
            }
        }
        truncation.get_or_insert_with(|| "the log server had none of this test's output; shown: the run's own tail".into());
    }
    let outcome = TestOutcome {
        name: case.name.clone(),
        status,
        seconds,
        node: Some(result.node),
        stdout: stdout.finish(),
        stderr: stderr.finish(),
        truncation,
    };
    progress.finished(&outcome);
    Ok(outcome)
}

/// What the run's result says about its output: lines the agent marks as cut (its own
/// tail is bounded, which tells the whole count) against what the log server returned,
/// and any note the agent added (output not confirmed delivered).
fn result_notes(output: &[keelson_scheduler::OutputLine], served: usize) -> Option<String> {
    let mut notes = Vec::new();
    let mut expected = output.len();
    for line in output.iter().filter(|l| l.line.starts_with("[keelson:")) {
        expected -= 1;
        if let Some(cut) = line.line.strip_prefix("[keelson: earlier output cut: ") {
            if let Some(n) = cut.split(' ').next().and_then(|n| n.parse::<usize>().ok()) {
                expected += n;
            }
        } else {
            notes.push(line.line.trim_start_matches("[keelson: ").trim_end_matches(']').to_owned());
        }
    }
    if served < expected {
        notes.push(format!("the log server returned {served} of the {expected} lines this test printed"));
    }
    (!notes.is_empty()).then(|| notes.join("; "))
}

/// Joins records into text, continuing a line after a partial record.
#[derive(Default)]
struct Joiner {
    text: String,
    lines: usize,
    open: bool,
}

impl Joiner {
    fn push(&mut self, line: &str, partial: bool) {
        if !self.open {
            if self.lines > 0 {
                self.text.push('\n');
            }
            self.lines += 1;
        }
        self.text.push_str(line);
        self.open = partial;
    }

    fn finish(self) -> Captured {
        Captured { text: self.text, lines: self.lines }
    }
}

impl From<SchedulerError> for TestgridError {
    fn from(e: SchedulerError) -> Self {
        TestgridError::Scheduler(e)
    }
}
