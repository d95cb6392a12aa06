//! `keelson-ctl`: the operator's side of a keelson cluster whose state lives in etcd (the
//! cluster `node-agent`s form). Deploys a group version, promotes or rolls back its
//! deployment, shows its state, submits one-off runs and reads their results.
//!
//! ```text
//! keelson-ctl --etcd http://127.0.0.1:2379 deploy web.json     # {"group": GroupSpec, "strategy": …, "gates": …}
//! keelson-ctl --etcd http://127.0.0.1:2379 status web http
//! keelson-ctl --etcd http://127.0.0.1:2379 promote web http
//! keelson-ctl --etcd http://127.0.0.1:2379 rollback web http "errors after the switch"
//! keelson-ctl --etcd http://127.0.0.1:2379 run migrate.json    # a RunSpec
//! keelson-ctl --etcd http://127.0.0.1:2379 result migrate-42
//! keelson-ctl logs shop http --follow --since 10m --logd http://127.0.0.1:7070 --token-file logd.token
//! ```
//!
//! `logs` reads a job's output from `logd` (the node agents ship it there with
//! `--logs-to`): every group of the job, or one; one line per record,
//! `<time> <instance> <stream> <line>`, or the records as NDJSON with `--json`.
//!
//! Answers are JSON on stdout; errors go to stderr with exit status 1 (2 for usage).
//! Build with `--features etcd`.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use keelson_discovery::KeyValue;
use keelson_scheduler::{ClusterStore, Gates, GroupSpec, RunSpec, Strategy};
use serde::Deserialize;

#[derive(Parser, Debug)]
#[command(version, about = "Deploy to and inspect a keelson cluster (state in etcd)")]
struct Args {
    #[command(flatten)]
    etcd: keelson_examples::backends::EtcdArgs,
    /// Root of the cluster state keys (as given to the node agents).
    #[arg(long, default_value = "keelson/cluster")]
    root: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Submits a group version from a JSON file: {"group": …, "strategy": …, "gates": …}.
    Deploy { file: std::path::PathBuf },
    /// Prints a group's state: stable version, count, deployment under way, last outcome.
    Status { job: String, group: String },
    /// Promotes the canaries of a group's deployment.
    Promote { job: String, group: String },
    /// Rolls a group's deployment back to its stable version.
    Rollback { job: String, group: String, reason: String },
    /// Submits a one-off run from a JSON file (a RunSpec).
    Run { file: std::path::PathBuf },
    /// Prints a run's result (null while it has not ended).
    Result { id: String },
    /// Prints a job's output (every group, or one) from logd.
    Logs(LogsArgs),
}

#[derive(clap::Args, Debug)]
struct LogsArgs {
    job: String,
    group: Option<String>,
    /// Keep printing new output as it arrives.
    #[arg(long, short)]
    follow: bool,
    /// Only output since this time (RFC 3339) or this long ago (5m, 2h).
    #[arg(long)]
    since: Option<String>,
    /// Only the last N records.
    #[arg(long)]
    tail: Option<usize>,
    /// Only this instance (task id).
    #[arg(long)]
    instance: Option<String>,
    /// The log server.
    #[arg(long, default_value = "http://127.0.0.1:7070", env = "KEELSON_LOGD")]
    logd: String,
    /// File holding logd's bearer token.
    #[arg(long, env = "KEELSON_LOGD_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    /// Print the records as NDJSON.
    #[arg(long)]
    json: bool,
}

/// A deploy file: the group version, and how to roll it out (default: rolling with one
/// surge, default gates).
#[derive(Deserialize, serde::Serialize, Debug)]
struct DeployFile {
    group: GroupSpec,
    #[serde(default)]
    strategy: Strategy,
    #[serde(default)]
    gates: Gates,
}

fn read_json<T: serde::de::DeserializeOwned + serde::Serialize>(path: &std::path::Path) -> Result<T, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // Strict: an unknown field in a file a person wrote is a typo, named in the error.
    let text = String::from_utf8(bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    keelson_scheduler::parse_strict("file", &text).map_err(|e| format!("{}: {e}", path.display()))
}

fn print(value: &impl serde::Serialize) -> Result<(), String> {
    println!("{}", serde_json::to_string_pretty(value).map_err(|e| e.to_string())?);
    Ok(())
}

async fn run(args: Args) -> Result<(), String> {
    if let Command::Logs(logs) = &args.command {
        return keelson_examples::logs_client::print_logs(&logs.query(), &logs.logd, logs.token_file.as_deref(), logs.json).await;
    }
    if !args.etcd.is_set() {
        return Err("--etcd (or KEELSON_ETCD_ENDPOINTS) is required".into());
    }
    let kv: Arc<dyn KeyValue> = Arc::new(args.etcd.connect().await?);
    let store = ClusterStore::new(kv, args.root);
    match args.command {
        Command::Deploy { file } => {
            let d: DeployFile = read_json(&file)?;
            print(&store.deploy(&d.group, d.strategy, d.gates).await.map_err(|e| e.to_string())?)
        }
        Command::Status { job, group } => {
            let state = store.group_state(&job, &group).await.map_err(|e| e.to_string())?;
            print(&state.ok_or_else(|| format!("no group {job}/{group}"))?)
        }
        Command::Promote { job, group } => store.promote(&job, &group).await.map_err(|e| e.to_string()),
        Command::Rollback { job, group, reason } => store.rollback(&job, &group, &reason).await.map_err(|e| e.to_string()),
        Command::Run { file } => {
            let spec: RunSpec = read_json(&file)?;
            print(&store.submit_run(&spec).await.map_err(|e| e.to_string())?)
        }
        Command::Result { id } => print(&store.run_result(&id).await.map_err(|e| e.to_string())?),
        Command::Logs(_) => Ok(()),
    }
}

impl LogsArgs {
    fn query(&self) -> keelson_examples::logs_client::LogQuery {
        keelson_examples::logs_client::LogQuery {
            service: match &self.group {
                Some(group) => format!("{}.{group}", self.job),
                None => format!("{}.*", self.job),
            },
            instance: self.instance.clone(),
            since: self.since.clone(),
            tail: self.tail,
            follow: self.follow,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keelson-ctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keelson-ctl: {e}");
            ExitCode::FAILURE
        }
    }
}
