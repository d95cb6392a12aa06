//! `testgrid`: functional tests in containers from a baseline snapshot, in parallel over
//! the scheduler's one-off runs, with an HTML report and JUnit XML.
//!
//! A suite is a folder: `testgrid.toml` names the baseline recipe (a Dockerfile, or a
//! setup command run in a container and committed) and its own test; `modules/<name>/`
//! holds each module's test (`test.sh` by default). `full` builds the snapshot, tests
//! it, then tests every module in a container of its own spawned from it; `quick`
//! reuses the snapshot whose inputs hash the same and fails clearly if there is none.
//! Every test is a [`RunSpec`](keelson_scheduler::RunSpec) placed by the cluster's
//! scheduler and run by a node agent, stopped at its time limit; its whole output is
//! read from the log server the agents ship to (the agent keeps a run's result back
//! until its output is delivered, so the report never races the logs).
//!
//! ```no_run
//! # async fn demo() -> Result<(), keelson_examples::testgrid::TestgridError> {
//! use keelson_examples::testgrid::{run, Mode, Options};
//! let options = Options::new("tests/suite", Mode::Full).with_workers(4);
//! let report = run(&options, None).await?;
//! println!("{} passed", report.counts().passed);
//! # Ok(())
//! # }
//! ```

pub mod changed;
pub mod local;
pub mod progress;
pub mod report;
pub mod runner;
pub mod snapshot;
pub mod suite;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use keelson_scheduler::{DockerImages, Resources};

use self::report::RunReport;
use self::runner::{Status, Target, TestCase, TestOutcome};
use self::snapshot::BaselineRecord;
use self::suite::{Suite, MODULES_IN_IMAGE};

/// Why a testgrid run could not be made (as opposed to tests that failed).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestgridError {
    /// A manifest is wrong.
    #[error("{}: {reason}", path.display())]
    Manifest {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `quick` found no snapshot made from the recipe as it is now.
    #[error("quick mode: no baseline snapshot {tag} on this engine (the recipe changed since the last full run, or none ran here); run `testgrid full` first")]
    NoSnapshot {
        /// The tag looked for.
        tag: String,
    },
    /// The scheduler, the driver or the image builder failed.
    #[error(transparent)]
    Scheduler(keelson_scheduler::Error),
    /// git could not say what changed.
    #[error("changed-only run: {reason}")]
    Git {
        /// What git said.
        reason: String,
    },
    /// The log server could not be read.
    #[error("reading test output from the log server: {0}")]
    Logs(String),
    /// Running the tests failed.
    #[error("running tests: {0}")]
    Runner(String),
    /// A file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The run was interrupted.
    #[error("interrupted")]
    Interrupted,
}

/// Build the snapshot, or reuse it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Build and test the baseline, snapshot it, then test the modules.
    Full,
    /// Reuse the snapshot whose inputs match; fail if there is none.
    Quick,
}

/// Which modules run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Every module.
    All,
    /// Modules changed since a git ref.
    ChangedSince(String),
    /// Modules changed since the last run in which everything passed.
    ChangedSinceLastSuccess,
}

/// A testgrid run's settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// The suite's folder.
    pub suite: PathBuf,
    /// Full or quick.
    pub mode: Mode,
    /// Tests at once (default 4).
    pub workers: usize,
    /// Which modules.
    pub selection: Selection,
    /// Where the report goes (default `<suite>/.testgrid/report`).
    pub report_dir: Option<PathBuf>,
    /// Where snapshot records and the last success live (default `<suite>/.testgrid`).
    pub state_dir: Option<PathBuf>,
    /// Test this image instead of the suite's baseline recipe (a pipeline's fresh build).
    pub image: Option<String>,
    /// Push the images tests run from to this registry, and run them from there: for a
    /// cluster whose nodes have engines of their own. None: nodes share this engine.
    pub push_to: Option<PushTo>,
}

/// A registry the snapshot and suite images are pushed to, so every node can pull them.
#[derive(Clone, Debug)]
pub struct PushTo {
    /// `host:port` (the node agents need its credentials too: their `--registry-auth`).
    pub registry: String,
    /// Credentials for it, if it asks for them.
    pub auth: Option<keelson_scheduler::RegistryAuth>,
}

impl Options {
    /// Defaults for `suite`.
    pub fn new(suite: impl Into<PathBuf>, mode: Mode) -> Self {
        Options {
            suite: suite.into(),
            mode,
            workers: 4,
            selection: Selection::All,
            report_dir: None,
            state_dir: None,
            image: None,
            push_to: None,
        }
    }

    /// Runs `workers` tests at once.
    pub fn with_workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Where state is kept for the suite in folder `root`.
    pub fn state_dir_for(&self, root: &std::path::Path) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| root.join(".testgrid"))
    }

    /// Where the report is written for the suite in folder `root`.
    pub fn report_dir_for(&self, root: &std::path::Path) -> PathBuf {
        self.report_dir.clone().unwrap_or_else(|| self.state_dir_for(root).join("report"))
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Runs the suite: on `target` when given (a cluster whose agents ship task output to
/// its log server), else on a cluster of one on the local Docker Engine. Writes the
/// report and returns it; [`RunReport::passed`] says whether to exit 0.
pub async fn run(options: &Options, target: Option<Target>) -> Result<RunReport, TestgridError> {
    let started = Instant::now();
    let started_at = now_rfc3339();
    let mut suite = Suite::load(&options.suite)?;
    if let Some(image) = &options.image {
        suite.baseline.recipe = suite::Recipe::Image { image: image.clone() };
    }
    let state_dir = options.state_dir_for(&suite.root);
    let show = progress::Live::new();
    let images = DockerImages::connect().await?;
    let tag = snapshot::snapshot_tag(&suite)?;

    // Which modules: all, or those git says changed.
    let (modules, selection) = select(&suite, &options.selection, &state_dir)?;
    let per_test = Resources::new(suite.cpu, suite.memory_mb);
    let (target, local) = match target {
        Some(t) => (t, None),
        None => {
            let local = local::LocalCluster::start(options.workers, per_test).await?;
            (local.target().clone(), Some(local))
        }
    };
    let job = format!("testgrid-{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis()));
    let result = run_on(
        &RunContext { options, suite: &suite, state_dir: &state_dir, images: &images, target: &target, job: &job, show: &show },
        &tag,
        modules,
    )
    .await;
    if let Some(local) = local {
        local.stop().await;
    }
    let (snapshot_note, baseline, tests) = result?;
    show.finish();
    let report = RunReport {
        suite: suite.root.display().to_string(),
        mode: match options.mode {
            Mode::Full => "full".into(),
            Mode::Quick => "quick".into(),
        },
        job,
        started_at,
        seconds: started.elapsed().as_secs_f64(),
        snapshot: tag,
        snapshot_note,
        baseline,
        selection,
        tests,
    };
    report.write(&options.report_dir_for(&suite.root))?;
    if report.passed() {
        if let Ok(commit) = changed::head(&suite) {
            changed::record_success(&state_dir, &commit)?;
        }
    }
    Ok(report)
}

struct RunContext<'a> {
    options: &'a Options,
    suite: &'a Suite,
    state_dir: &'a std::path::Path,
    images: &'a DockerImages,
    target: &'a Target,
    job: &'a str,
    show: &'a Arc<progress::Live>,
}

type Outcomes = (String, Option<TestOutcome>, Vec<TestOutcome>);

async fn run_on(cx: &RunContext<'_>, tag: &str, modules: Vec<suite::Module>) -> Result<Outcomes, TestgridError> {
    let per_test = Resources::new(cx.suite.cpu, cx.suite.memory_mb);
    let (snapshot_id, snapshot_note, baseline) = match cx.options.mode {
        Mode::Full => {
            let building = Instant::now();
            cx.show.phase(&format!("making the baseline snapshot {tag}"));
            let id = snapshot::build_snapshot(cx.images, cx.suite, tag, &mut |line| cx.show.build_line(line)).await?;
            let build_seconds = building.elapsed().as_secs_f64();
            let baseline = match &cx.suite.baseline.test {
                Some(command) => {
                    cx.show.phase("testing the baseline");
                    let case = TestCase {
                        name: "baseline".into(),
                        image: publish(cx, tag, "testgrid-baseline").await?,
                        command: command.clone(),
                        time_limit: cx.suite.baseline.time_limit,
                        resources: per_test,
                    };
                    Some(runner::run_one(cx.target, cx.job, &case, &**cx.show).await?)
                }
                None => None,
            };
            let record = BaselineRecord {
                tag: tag.to_owned(),
                image_id: id.clone(),
                built_at: now_rfc3339(),
                build_seconds,
                test: baseline.clone(),
            };
            record.save(cx.state_dir)?;
            let note = match &cx.suite.baseline.recipe {
                suite::Recipe::Image { .. } => "the given image, used as it is".to_owned(),
                _ => format!("built in {build_seconds:.1} s for this run"),
            };
            (id, note, baseline)
        }
        Mode::Quick => {
            let id = cx.images.id_of(tag).await?.ok_or_else(|| TestgridError::NoSnapshot { tag: tag.to_owned() })?;
            let record = BaselineRecord::load(cx.state_dir, tag);
            let note = match &record {
                Some(r) => {
                    format!("reused: built {} in {:.1} s; the baseline's result below is from that run", r.built_at, r.build_seconds)
                }
                None => "reused: made elsewhere (no record of its own test here)".to_owned(),
            };
            (id, note, record.and_then(|r| r.test))
        }
    };
    if baseline.as_ref().is_some_and(|b| b.status != Status::Passed) {
        let tests = modules.iter().map(|m| TestOutcome::skipped(&m.name, "the baseline failed its own test")).collect();
        return Ok((snapshot_note, baseline, tests));
    }
    cx.show.phase("building the suite layer");
    let image = snapshot::suite_image(cx.images, cx.suite, tag, &snapshot_id, &mut |line| cx.show.build_line(line)).await?;
    let image = publish(cx, &image, "testgrid-suite").await?;
    let cases: Vec<TestCase> = modules
        .iter()
        .map(|m| {
            // Each test starts in its module's folder, with its arguments as given.
            let mut command =
                vec!["/bin/sh".into(), "-c".into(), "cd \"$0\" && exec \"$@\"".into(), format!("{MODULES_IN_IMAGE}/{}", m.name)];
            command.extend(m.command.iter().cloned());
            TestCase { name: m.name.clone(), image: image.clone(), command, time_limit: m.time_limit, resources: per_test }
        })
        .collect();
    cx.show.tests(cases.len());
    let tests = runner::run_all(cx.target, cx.job, cases, cx.options.workers, cx.show.clone()).await?;
    Ok((snapshot_note, baseline, tests))
}

/// The name tests run `image` by: itself, or with `--push-to`, its copy in that registry
/// (`<registry>/<repository>:<the image's tag>`), tagged and pushed first.
async fn publish(cx: &RunContext<'_>, image: &str, repository: &str) -> Result<String, TestgridError> {
    let Some(push) = &cx.options.push_to else { return Ok(image.to_owned()) };
    let tag = image.rsplit_once(':').map_or("latest", |(_, t)| t);
    let target = format!("{}/{repository}:{tag}", push.registry);
    cx.show.phase(&format!("pushing {target}"));
    cx.images.tag(image, &target).await?;
    cx.images.push(&target, push.auth.as_ref(), &mut |line| cx.show.build_line(line)).await?;
    Ok(target)
}

/// The modules to run, and a sentence saying how they were chosen (when not all).
fn select(
    suite: &Suite,
    selection: &Selection,
    state_dir: &std::path::Path,
) -> Result<(Vec<suite::Module>, Option<String>), TestgridError> {
    let since = match selection {
        Selection::All => return Ok((suite.modules.clone(), None)),
        Selection::ChangedSince(r) => r.clone(),
        Selection::ChangedSinceLastSuccess => match changed::last_success(state_dir) {
            Some(r) => r,
            None => {
                return Ok((suite.modules.clone(), Some("every module: no earlier run passed whole, so nothing to compare with".into())))
            }
        },
    };
    match changed::changed_modules(suite, &since)? {
        None => Ok((suite.modules.clone(), Some(format!("every module: the baseline or the manifest changed since {since}")))),
        Some(names) => {
            let chosen: Vec<_> = suite.modules.iter().filter(|m| names.contains(&m.name)).cloned().collect();
            let note = format!("{} of {} modules changed since {since}", chosen.len(), suite.modules.len());
            Ok((chosen, Some(note)))
        }
    }
}
