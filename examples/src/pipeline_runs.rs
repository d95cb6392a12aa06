//! What a pipeline run went through, kept in the cluster's `KeyValue` under
//! `<root>/pipeline/<job>/<run id>` (written after every step, so `keelson-ctl` and the
//! status endpoint see a run while it goes), and what it logged, shipped to logd as
//! service `pipeline.<job>`, instance `<run id>`.

use std::sync::Arc;
use std::time::SystemTime;

use keelson_discovery::KeyValue;
use keelson_logship::{Labels, Record, Sink, Stream};
use serde::{Deserialize, Serialize};

/// A step's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Under way.
    Running,
    /// Done.
    Passed,
    /// Did not work; the run stops.
    Failed,
}

/// One step of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// build, test, push, deploy.
    pub name: String,
    /// Its state.
    pub state: StepState,
    /// How long it took (so far), in seconds.
    pub seconds: f64,
    /// What it said last (an error, the image, the version).
    pub message: String,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Still going.
    Running,
    /// The new version is served.
    Deployed,
    /// A test failed: nothing was pushed or deployed.
    TestsFailed,
    /// Deployed, failed its health gates, and rolled back to the version before.
    RolledBack,
    /// Another step failed (the build, the push, the deployment's wait).
    Failed,
}

/// A pipeline run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineRun {
    /// Run id: `<job>-<n>`.
    pub id: String,
    /// The job it deploys.
    pub job: String,
    /// The commit.
    pub commit: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// How it ended.
    pub outcome: Outcome,
    /// The image, once built.
    pub image: Option<String>,
    /// The group version it deployed.
    pub version: Option<u64>,
    /// Its steps, in order.
    pub steps: Vec<Step>,
    /// When the deployment ended with every instance of the new version running, in
    /// seconds from the start (edge serves the new version from its first healthy
    /// instance, earlier).
    pub deployed_after: Option<f64>,
    /// Lines of this run's log that logd did not take (it was down or refused them):
    /// they are gone, and said so here rather than silently.
    #[serde(default)]
    pub log_lines_undelivered: u64,
}

/// Where runs are kept and their logs sent.
#[derive(Clone, Debug)]
pub struct RunLog {
    kv: Arc<dyn KeyValue>,
    root: String,
    sink: Option<Arc<dyn Sink>>,
}

impl RunLog {
    /// Runs under `<root>/pipeline/` in `kv`; lines to `sink` when given.
    pub fn new(kv: Arc<dyn KeyValue>, root: &str, sink: Option<Arc<dyn Sink>>) -> Self {
        RunLog { kv, root: format!("{}/pipeline", root.trim_end_matches('/')), sink }
    }

    fn key(&self, job: &str, id: &str) -> String {
        format!("{}/{job}/{id}", self.root)
    }

    /// Saves `run` (its latest state).
    pub async fn save(&self, run: &PipelineRun) -> Result<(), String> {
        let value = serde_json::to_vec(run).map_err(|e| e.to_string())?;
        self.kv.put(&self.key(&run.job, &run.id), value, None).await.map_err(|e| format!("saving run {}: {e}", run.id))?;
        Ok(())
    }

    /// Every run of `job` (every job when `None`), oldest first.
    pub async fn list(&self, job: Option<&str>) -> Result<Vec<PipelineRun>, String> {
        let prefix = match job {
            Some(j) => format!("{}/{j}/", self.root),
            None => format!("{}/", self.root),
        };
        let listed = self.kv.list(&prefix).await.map_err(|e| format!("listing runs: {e}"))?;
        let mut runs: Vec<PipelineRun> = listed.entries.iter().filter_map(|e| serde_json::from_slice(&e.value).ok()).collect();
        runs.sort_by(|a, b| a.started_at.cmp(&b.started_at).then_with(|| a.id.cmp(&b.id)));
        Ok(runs)
    }

    /// Ships `lines` of run `id` of `job`. A log server that is down costs the lines,
    /// never the run: the error says how many, for the run's record.
    pub async fn ship(&self, job: &str, id: &str, lines: &[String], stream: Stream) -> Result<(), String> {
        let Some(sink) = &self.sink else { return Ok(()) };
        if lines.is_empty() {
            return Ok(());
        }
        let labels = Arc::new(Labels::new(format!("pipeline.{job}"), id.to_owned()));
        let records: Vec<Record> =
            lines.iter().map(|l| Record { timestamp: SystemTime::now(), ..Record::new(labels.clone(), stream, l.clone()) }).collect();
        match sink.send(&records).await {
            Ok(()) => sink.flush().await,
            Err(e) => Err(e),
        }
        .map_err(|e| format!("{} lines of run {id} not delivered to logd: {e}", lines.len()))
    }
}

/// Runs as a table for people: id, commit, outcome, version, each step with its time.
pub fn runs_table(runs: &[PipelineRun]) -> String {
    let mut table = crate::ctl::table::Table::new(&["run", "commit", "outcome", "version", "steps", "deployed after"]);
    for r in runs {
        let steps: Vec<String> = r
            .steps
            .iter()
            .map(|s| {
                let mark = match s.state {
                    StepState::Running => "…",
                    StepState::Passed => "ok",
                    StepState::Failed => "FAILED",
                };
                format!("{} {mark} {:.1}s", s.name, s.seconds)
            })
            .collect();
        table.row(vec![
            r.id.clone(),
            r.commit.chars().take(12).collect(),
            serde_json::to_value(&r.outcome).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
            r.version.map(|v| format!("v{v}")).unwrap_or_default(),
            steps.join(", "),
            r.deployed_after.map(|s| format!("{s:.1}s")).unwrap_or_default(),
        ]);
    }
    table.render()
}
