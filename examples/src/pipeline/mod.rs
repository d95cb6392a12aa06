//! `pipeline`: push → build → test → registry → rolling deploy → served by name.
//!
//! It watches a branch of a git repository. For each new commit it builds the image from
//! the commit's Dockerfile ([`git_build`](crate::git_build)), runs the commit's testgrid
//! suite against that image ([`testgrid`](crate::testgrid), `--image`), pushes the image
//! to the registry, and deploys it as the next version of the group that the commit's
//! `keelson.json` describes (a `keelson-ctl deploy` file: the group, the strategy, the
//! gates), through the cluster store the node agents follow. The agents register the new
//! instances in discovery, and edge routes to them by the service's host tag. A failing
//! test stops the run before any push; a version failing its health gates is rolled back
//! by the controller (`auto_rollback`), and the run says so.
//!
//! Every run is kept in the cluster's `KeyValue` ([`pipeline_runs`](crate::pipeline_runs)) and its log shipped to
//! logd; the status endpoint ([`status`]) serves both as JSON.
//!
//! ```no_run
//! # async fn demo(kv: std::sync::Arc<dyn keelson_discovery::KeyValue>) -> Result<(), Box<dyn std::error::Error>> {
//! use keelson_examples::pipeline::Pipeline;
//! use keelson_examples::pipeline_runs::RunLog;
//! let pipeline = Pipeline {
//!     repo: "/srv/git/shop.git".into(),
//!     branch: "main".into(),
//!     registry: "127.0.0.1:5000".into(),
//!     registry_auth: None,
//!     store: keelson_scheduler::ClusterStore::new(kv.clone(), "keelson/cluster"),
//!     runs: RunLog::new(kv, "keelson/cluster", None),
//!     images: keelson_scheduler::DockerImages::connect().await?,
//!     deploy_timeout: std::time::Duration::from_secs(300),
//! };
//! let head = pipeline.head()?;
//! let run = pipeline.run_commit(&head, 1).await;
//! println!("{}: {:?}", run.id, run.outcome);
//! # Ok(())
//! # }
//! ```

pub mod status;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keelson_logship::Stream;
use keelson_scheduler::{AllocStatus, ClusterStore, DockerImages, Gates, GroupSpec, Phase, RegistryAuth, Strategy};
use serde::{Deserialize, Serialize};

use crate::git_build::{build_commit, push_build, CommitBuild};
use crate::pipeline_runs::{Outcome, PipelineRun, RunLog, Step, StepState};

/// The file at the top of a commit that says what to deploy.
pub const DEPLOY_FILE: &str = "keelson.json";

/// `keelson.json`: a `keelson-ctl deploy` file (the group's `version` and its task's
/// `image` are the pipeline's to set), and where the tests are.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct DeployFile {
    /// The group.
    pub group: GroupSpec,
    /// How to roll it out (default: rolling, one surge).
    #[serde(default)]
    pub strategy: Strategy,
    /// Health gates (set `auto_rollback` to have a failing version rolled back).
    #[serde(default)]
    pub gates: Gates,
    /// The testgrid suite, relative to the commit's top (none: no tests).
    #[serde(default)]
    pub tests: Option<TestSettings>,
}

/// Where the commit's tests are.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct TestSettings {
    /// The suite's folder.
    pub suite: PathBuf,
    /// Tests at once (default 2).
    #[serde(default = "default_workers")]
    pub workers: usize,
}

fn default_workers() -> usize {
    2
}

/// What a pipeline works with.
#[derive(Clone, Debug)]
pub struct Pipeline {
    /// The repository watched (bare or not).
    pub repo: PathBuf,
    /// The branch.
    pub branch: String,
    /// The registry images are pushed to (`127.0.0.1:5000`).
    pub registry: String,
    /// Its credentials.
    pub registry_auth: Option<RegistryAuth>,
    /// The cluster.
    pub store: ClusterStore,
    /// Where runs are kept and logged.
    pub runs: RunLog,
    /// The engine that builds.
    pub images: DockerImages,
    /// How long a deployment may take to end.
    pub deploy_timeout: Duration,
}

/// A run under way: its record, saved and logged as it changes.
struct Running<'a> {
    pipeline: &'a Pipeline,
    run: PipelineRun,
    started: Instant,
}

impl Running<'_> {
    async fn step(&mut self, name: &str) {
        self.run.steps.push(Step { name: name.into(), state: StepState::Running, seconds: 0.0, message: String::new() });
        self.save().await;
    }

    async fn end_step(&mut self, state: StepState, message: impl Into<String>, began: Instant) {
        let message = message.into();
        if let Some(step) = self.run.steps.last_mut() {
            step.state = state;
            step.seconds = began.elapsed().as_secs_f64();
            step.message = message.clone();
        }
        let name = self.run.steps.last().map(|s| s.name.clone()).unwrap_or_default();
        self.log(vec![format!("{name}: {message}")]).await;
        self.save().await;
    }

    async fn finish(mut self, outcome: Outcome) -> PipelineRun {
        self.run.outcome = outcome;
        self.log(vec![format!("run {}: {:?} after {:.1} s", self.run.id, self.run.outcome, self.started.elapsed().as_secs_f64())]).await;
        self.save().await;
        self.run
    }

    async fn save(&self) {
        if let Err(e) = self.pipeline.runs.save(&self.run).await {
            tracing::warn!(error = %e, "keeping the run's record");
        }
    }

    async fn log(&mut self, lines: Vec<String>) {
        if let Err(e) = self.pipeline.runs.ship(&self.run.job, &self.run.id, &lines, Stream::Stdout).await {
            tracing::warn!(error = %e, "a run's log lines are lost");
            self.run.log_lines_undelivered += lines.len() as u64;
        }
    }
}

impl Pipeline {
    /// The commit the branch points at now.
    pub fn head(&self) -> Result<String, String> {
        crate::git_build::resolve(&self.repo, &format!("refs/heads/{}", self.branch)).map_err(|e| e.to_string())
    }

    /// Builds, tests, pushes and deploys `commit`; returns how it went (also kept in the
    /// run log). `n` numbers the run.
    pub async fn run_commit(&self, commit: &str, n: u64) -> PipelineRun {
        let tree = tempfile::tempdir();
        let deploy = match tree.as_ref().map_err(|e| e.to_string()).and_then(|t| read_deploy_file(&self.repo, commit, t.path())) {
            Ok(d) => d,
            Err(e) => {
                // Nothing to name the run after: it goes under job `unknown`.
                let run = new_run("unknown", commit, n);
                let mut running = Running { pipeline: self, run, started: Instant::now() };
                running.step("read keelson.json").await;
                running.end_step(StepState::Failed, e, Instant::now()).await;
                return running.finish(Outcome::Failed).await;
            }
        };
        let job = deploy.group.desired.job.clone();
        let mut running = Running { pipeline: self, run: new_run(&job, commit, n), started: Instant::now() };

        // Build.
        running.step("build").await;
        let began = Instant::now();
        let mut build = CommitBuild::new(&self.repo, commit, format!("{}/{job}", self.registry));
        build.auth = self.registry_auth.clone();
        let mut lines = Vec::new();
        let local = match build_commit(&self.images, &build, &mut |l| lines.push(l.to_owned())).await {
            Ok(local) => local,
            Err(e) => {
                running.log(lines).await;
                running.end_step(StepState::Failed, e.to_string(), began).await;
                return running.finish(Outcome::Failed).await;
            }
        };
        running.log(lines).await;
        running.run.image = Some(local.image.clone());
        running.end_step(StepState::Passed, local.image.clone(), began).await;

        // Test, from the image just built.
        if let Some(tests) = &deploy.tests {
            running.step("test").await;
            let began = Instant::now();
            let mut options = crate::testgrid::Options::new(local.tree.path().join(&tests.suite), crate::testgrid::Mode::Full)
                .with_workers(tests.workers);
            options.image = Some(local.image.clone());
            match crate::testgrid::run(&options, None).await {
                Ok(report) => {
                    let c = report.counts();
                    let summary = format!("{} passed, {} failed, {} timed out", c.passed, c.failed, c.timed_out);
                    let mut lines = Vec::new();
                    for t in report.tests.iter().chain(&report.baseline) {
                        lines.push(format!("test {}: {} ({:.1} s)", t.name, t.status.word(), t.seconds));
                        if t.status.is_bad() {
                            lines.extend(
                                t.stderr.text.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().map(|l| format!("  {l}")),
                            );
                        }
                    }
                    running.log(lines).await;
                    if !report.passed() {
                        running.end_step(StepState::Failed, summary, began).await;
                        return running.finish(Outcome::TestsFailed).await;
                    }
                    running.end_step(StepState::Passed, summary, began).await;
                }
                Err(e) => {
                    running.end_step(StepState::Failed, e.to_string(), began).await;
                    return running.finish(Outcome::Failed).await;
                }
            }
        }

        // Push.
        running.step("push").await;
        let began = Instant::now();
        let mut lines = Vec::new();
        let pushed = push_build(&self.images, &local, self.registry_auth.as_ref(), &mut |l| lines.push(l.to_owned())).await;
        running.log(lines).await;
        if let Err(e) = pushed {
            running.end_step(StepState::Failed, e.to_string(), began).await;
            return running.finish(Outcome::Failed).await;
        }
        running.end_step(StepState::Passed, local.image.clone(), began).await;

        // Deploy, and follow it to its end.
        running.step("deploy").await;
        let began = Instant::now();
        let (outcome, message) = self.deploy(deploy, &local.image, &mut running.run).await;
        let state = if outcome == Outcome::Deployed { StepState::Passed } else { StepState::Failed };
        if outcome == Outcome::Deployed {
            running.run.deployed_after = Some(running.started.elapsed().as_secs_f64());
        }
        running.end_step(state, message, began).await;
        running.finish(outcome).await
    }

    async fn deploy(&self, deploy: DeployFile, image: &str, run: &mut PipelineRun) -> (Outcome, String) {
        let mut group = deploy.group;
        let (job, name) = (group.desired.job.clone(), group.desired.group.clone());
        let version = match self.store.group_state(&job, &name).await {
            Ok(Some(state)) => state.stable.max(state.history.iter().map(|h| h.to).max().unwrap_or(0)) + 1,
            Ok(None) => 1,
            Err(e) => return (Outcome::Failed, format!("reading {job}/{name}: {e}")),
        };
        group.desired.version = version;
        group.task.image = Some(image.to_owned());
        run.version = Some(version);
        if let Err(e) = self.store.deploy(&group, deploy.strategy, deploy.gates).await {
            return (Outcome::Failed, format!("deploying {job}/{name} v{version}: {e}"));
        }
        let deadline = Instant::now() + self.deploy_timeout;
        loop {
            let state = match self.store.group_state(&job, &name).await {
                Ok(Some(s)) => s,
                Ok(None) => return (Outcome::Failed, format!("{job}/{name} is gone")),
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "reading the deployment; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                Err(e) => return (Outcome::Failed, e.to_string()),
            };
            if state.deployment.is_none() {
                if state.stable == version {
                    // A first version is stable at once: it counts once its instances run.
                    if self.running(&job, &name, version).await >= state.count {
                        return (Outcome::Deployed, format!("{job}/{name} v{version} runs everywhere"));
                    }
                } else {
                    return match state.history.iter().rev().find(|h| h.to == version).map(|h| &h.outcome) {
                        Some(Phase::RolledBack { reason }) => (Outcome::RolledBack, format!("v{version} rolled back: {reason}")),
                        Some(Phase::Failed { reason }) => (Outcome::Failed, format!("v{version}: {reason}")),
                        _ => (Outcome::Failed, format!("v{version}: the group runs v{}", state.stable)),
                    };
                }
            }
            if Instant::now() >= deadline {
                return (Outcome::Failed, format!("v{version} still deploying after {}", humantime::format_duration(self.deploy_timeout)));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// How many allocations of `version` of the group run.
    async fn running(&self, job: &str, group: &str, version: u64) -> u32 {
        let Ok(view) = self.store.view().await else { return 0 };
        let running = view
            .allocations
            .iter()
            .filter(|a| a.job == job && a.group == group && a.version == version && a.status == AllocStatus::Running);
        u32::try_from(running.count()).unwrap_or(u32::MAX)
    }

    /// Runs the pipeline for every new commit of the branch, looking every `poll`, until
    /// `stop` resolves. The branch's commit at start counts as done if the run log has
    /// a run of it.
    pub async fn watch(&self, poll: Duration, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let known = self.runs.list(None).await.unwrap_or_default();
        let mut n = known.len() as u64;
        let mut last: Option<String> = known.last().map(|r| r.commit.clone());
        loop {
            match self.head() {
                Ok(head) if last.as_deref() != Some(head.as_str()) => {
                    n += 1;
                    tracing::info!(commit = %head, "new commit");
                    let run = self.run_commit(&head, n).await;
                    tracing::info!(run = %run.id, outcome = ?run.outcome, "run ended");
                    last = Some(head);
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "no commit on the branch yet"),
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }
}

fn new_run(job: &str, commit: &str, n: u64) -> PipelineRun {
    PipelineRun {
        id: format!("{job}-{n}"),
        job: job.to_owned(),
        commit: commit.to_owned(),
        started_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        outcome: Outcome::Running,
        image: None,
        version: None,
        steps: Vec::new(),
        deployed_after: None,
        log_lines_undelivered: 0,
    }
}

/// Reads `keelson.json` of `commit` (strictly: an unknown field is a typo).
fn read_deploy_file(repo: &std::path::Path, commit: &str, tree: &std::path::Path) -> Result<DeployFile, String> {
    crate::git_build::export_commit(repo, commit, tree).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(tree.join(DEPLOY_FILE)).map_err(|e| format!("{DEPLOY_FILE} of {commit}: {e}"))?;
    keelson_scheduler::parse_strict("keelson.json", &text).map_err(|e| format!("{DEPLOY_FILE} of {commit}: {e}"))
}
