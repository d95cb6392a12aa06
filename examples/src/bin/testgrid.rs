//! `testgrid`: a suite's functional tests in containers spawned from a baseline snapshot,
//! in parallel, with an HTML report and JUnit XML.
//!
//! ```text
//! testgrid full  tests/suite --workers 4            # build + test the baseline, then every module
//! testgrid quick tests/suite                        # reuse the snapshot of the same recipe
//! testgrid quick tests/suite --changed-since main   # only modules touched since main
//! testgrid quick tests/suite --changed-since last   # ... since the last run that passed whole
//! testgrid full  tests/suite --image 127.0.0.1:5000/shop:4be2c1d0a9f3   # test an image as it is
//! testgrid full  tests/suite --etcd http://10.0.0.1:2379 --logd http://10.0.0.1:7070 --logd-token-file logd.token \
//!                --push-to 10.0.0.1:5000 --registry-auth-file ci.creds
//! ```
//!
//! Without `--etcd` the tests run on the local Docker Engine through a cluster of one in
//! this process (a store in memory, a node agent, a log server on loopback). With it,
//! they are one-off runs on the cluster's node agents (started with `--logs-to` the
//! same logd). Nodes with engines of their own pull the snapshot and suite images
//! from a registry: give it with `--push-to` (and the agents its credentials);
//! without it, the nodes must share this engine.
//!
//! Exit status: 0 when every test passed, 1 when one failed or timed out (or the
//! baseline failed), 2 when the run could not be made (a bad manifest, no snapshot for
//! `quick`, no Docker). The report is in `<suite>/.testgrid/report/` unless `--report`
//! says otherwise.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keelson_examples::testgrid::{self, Mode, Options, Selection};

#[derive(Parser, Debug)]
#[command(version, about = "Functional tests in parallel containers from a baseline snapshot")]
struct Args {
    #[command(subcommand)]
    mode: ModeArg,
}

#[derive(Subcommand, Debug)]
enum ModeArg {
    /// Build and test the baseline, snapshot it, then test every module from it.
    Full(RunArgs),
    /// Reuse the snapshot made from the recipe as it is now; fail if there is none.
    Quick(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The suite's folder (holding testgrid.toml).
    #[arg(default_value = ".")]
    suite: PathBuf,
    /// Tests at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=512))]
    workers: u16,
    /// Only modules changed since this git ref (`last`: since the last run that passed whole).
    #[arg(long, value_name = "REF")]
    changed_since: Option<String>,
    /// Where the report goes (default <suite>/.testgrid/report).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Where snapshot records and the last success are kept (default <suite>/.testgrid).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Test this image (on the engine) instead of building the suite's baseline recipe.
    #[arg(long)]
    image: Option<String>,
    /// Push the snapshot and suite images to this registry (`host:port`) and run tests
    /// from there: for a cluster whose nodes have engines of their own.
    #[arg(long, value_name = "REGISTRY")]
    push_to: Option<String>,
    /// A file whose first line is `user:password` for --push-to's registry.
    #[arg(long, requires = "push_to")]
    registry_auth_file: Option<PathBuf>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(clap::Args, Debug)]
struct ClusterArgs {
    #[cfg(feature = "etcd")]
    #[command(flatten)]
    etcd: keelson_examples::backends::EtcdArgs,
    /// Root of the cluster state keys (as given to the node agents).
    #[cfg(feature = "etcd")]
    #[arg(long, default_value = "keelson/cluster", env = "KEELSON_ROOT")]
    root: String,
    /// The log server the cluster's agents ship task output to (with --etcd).
    #[command(flatten)]
    logd: keelson_examples::backends::LogdArgs,
}

async fn cluster_target(args: &ClusterArgs) -> Result<Option<testgrid::runner::Target>, String> {
    #[cfg(feature = "etcd")]
    if !args.etcd.endpoints.is_empty() {
        let logd = args.logd.logd.clone().ok_or("--etcd needs --logd: the log server the node agents ship to (their --logs-to)")?;
        let token = args.logd.token()?;
        let kv = args.etcd.connect().await?;
        let store = keelson_scheduler::ClusterStore::new(std::sync::Arc::new(kv), args.root.clone());
        return Ok(Some(testgrid::runner::Target { store, logd, logd_token: token }));
    }
    if args.logd.logd.is_some() {
        return Err("--logd is for a cluster given with --etcd; without it testgrid runs its own".into());
    }
    Ok(None)
}

async fn run(args: Args) -> Result<bool, String> {
    let (mode, run) = match args.mode {
        ModeArg::Full(r) => (Mode::Full, r),
        ModeArg::Quick(r) => (Mode::Quick, r),
    };
    let mut options = Options::new(&run.suite, mode).with_workers(usize::from(run.workers));
    options.selection = match run.changed_since.as_deref() {
        None => Selection::All,
        Some("last") => Selection::ChangedSinceLastSuccess,
        Some(r) => Selection::ChangedSince(r.to_owned()),
    };
    options.report_dir = run.report;
    options.state_dir = run.state_dir;
    options.image = run.image;
    options.push_to = match &run.push_to {
        Some(registry) => Some(testgrid::PushTo {
            registry: registry.clone(),
            auth: run
                .registry_auth_file
                .as_deref()
                .map(|file| keelson_examples::backends::registry_auth_from_file(registry, file))
                .transpose()
                .map_err(|e| format!("--registry-auth-file: {e}"))?,
        }),
        None => None,
    };
    let target = cluster_target(&run.cluster).await?;
    let report = testgrid::run(&options, target).await.map_err(|e| e.to_string())?;
    let c = report.counts();
    let baseline = match &report.baseline {
        Some(b) => format!("baseline {}; ", b.status.word()),
        None => String::new(),
    };
    let dir = options.report_dir_for(std::path::Path::new(&report.suite));
    println!(
        "testgrid: {baseline}{} passed, {} failed, {} timed out, {} skipped in {:.1} s; report: {}/report.html, junit: {}/junit.xml",
        c.passed,
        c.failed,
        c.timed_out,
        c.skipped,
        report.seconds,
        dir.display(),
        dir.display()
    );
    Ok(report.passed())
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("testgrid: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("testgrid: {e}");
            ExitCode::from(2)
        }
    }
}
