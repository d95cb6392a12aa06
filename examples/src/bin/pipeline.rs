//! `pipeline`: watches a branch of a git repository; each new commit is built with Docker,
//! tested with testgrid, pushed to the registry and deployed to the cluster the node
//! agents form (state in etcd), where edge routes to it by name.
//!
//! ```text
//! pipeline --repo /srv/git/shop.git --branch main --registry 127.0.0.1:5000 \
//!   --registry-auth-file ci.creds --etcd http://10.0.0.1:2379 \
//!   --logd http://10.0.0.1:7070 --logd-token-file logd.token --listen 127.0.0.1:7090
//! curl -s http://127.0.0.1:7090/v1/runs            # every run, its steps and outcome
//! keelson-ctl logs pipeline.shop                    # what the runs logged
//! ```
//!
//! The commit says what to deploy in `keelson.json` (a `keelson-ctl deploy` file plus
//! `"tests": {"suite": "tests"}`); see the README's walkthrough.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use keelson_examples::pipeline::{status, Pipeline};
use keelson_examples::pipeline_runs::RunLog;

#[derive(Parser, Debug)]
#[command(version, about = "Build, test, push and deploy every new commit of a branch")]
struct Args {
    /// The git repository to watch (bare or not).
    #[arg(long, env = "KEELSON_PIPELINE_REPO")]
    repo: PathBuf,
    /// The branch.
    #[arg(long, default_value = "main")]
    branch: String,
    /// The registry images go to, as image names spell it (`127.0.0.1:5000`).
    #[arg(long, env = "KEELSON_REGISTRY")]
    registry: String,
    /// A file whose first line is `user:password` for the registry.
    #[arg(long, env = "KEELSON_REGISTRY_AUTH_FILE")]
    registry_auth_file: Option<PathBuf>,
    #[command(flatten)]
    etcd: keelson_examples::backends::EtcdArgs,
    /// Root of the cluster state keys (as given to the node agents).
    #[arg(long, default_value = "keelson/cluster", env = "KEELSON_ROOT")]
    root: String,
    /// logd, where each run's log goes.
    #[command(flatten)]
    logd: keelson_examples::backends::LogdArgs,
    /// Where the status endpoint listens.
    #[arg(long, default_value = "127.0.0.1:7090")]
    listen: SocketAddr,
    /// How often the branch is looked at.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    poll: Duration,
    /// How long a deployment may take before the run counts as failed.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    deploy_timeout: Duration,
}

async fn run(args: Args) -> Result<(), String> {
    let registry_auth = args
        .registry_auth_file
        .as_deref()
        .map(|file| keelson_examples::backends::registry_auth_from_file(&args.registry, file))
        .transpose()
        .map_err(|e| format!("--registry-auth-file: {e}"))?;
    let kv: Arc<dyn keelson_discovery::KeyValue> = Arc::new(args.etcd.connect_waiting().await?);
    let store = keelson_scheduler::ClusterStore::new(kv.clone(), args.root.clone());
    let sink = args.logd.sink()?;
    let runs = Arc::new(RunLog::new(kv, &args.root, sink));
    let images = keelson_scheduler::DockerImages::connect().await.map_err(|e| format!("Docker Engine: {e}"))?;
    let pipeline = Pipeline {
        repo: args.repo.clone(),
        branch: args.branch.clone(),
        registry: args.registry.clone(),
        registry_auth,
        store,
        runs: (*runs).clone(),
        images,
        deploy_timeout: args.deploy_timeout,
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await.map_err(|e| format!("--listen {}: {e}", args.listen))?;
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    tokio::spawn(status::serve(listener, runs, until_stopped()));
    println!("pipeline: watching {} branch {}; status on http://{}/v1/runs", args.repo.display(), args.branch, args.listen);
    let watching = pipeline.watch(args.poll, until_stopped());
    tokio::select! {
        _ = watching => {}
        _ = stop => {}
    }
    let _ = stopping.send(true);
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    keelson_examples::init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pipeline: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pipeline: {e}");
            ExitCode::FAILURE
        }
    }
}
