//! `keelson-ctl`: the operator's side of a keelson cluster whose state lives in etcd (the
//! cluster `node-agent`s form), in the manner of the Nomad CLI.
//!
//! ```text
//! keelson-ctl plan web.json                  # what deploying would do; exit 1 if something cannot be placed
//! keelson-ctl deploy web.json --wait         # {"group": GroupSpec, "strategy": …, "gates": …}; follow it to the end
//! keelson-ctl status web http
//! keelson-ctl promote web http --wait
//! keelson-ctl rollback web http "errors after the switch" --wait
//! keelson-ctl scale web http 5
//! keelson-ctl stop web [http]
//! keelson-ctl nodes                          # resources used/total, eligibility, address, labels
//! keelson-ctl node status n1                 # one node with its attributes
//! keelson-ctl node drain n1                  # move its work elsewhere; no new work
//! keelson-ctl node eligibility n1 ineligible # no new work; what runs stays
//! keelson-ctl jobs
//! keelson-ctl allocs --node n1 | --job web
//! keelson-ctl deployments [web]
//! keelson-ctl snapshot save state.json       # backup of the cluster state
//! keelson-ctl snapshot restore state.json    # into an empty root; then start the agents
//! keelson-ctl run migrate.json               # a RunSpec
//! keelson-ctl result migrate-42
//! keelson-ctl logs shop http --follow --since 10m --logd http://127.0.0.1:7070 --token-file logd.token
//! keelson-ctl pipeline [shop]                # pipeline runs: commit, outcome, version, steps
//! keelson-ctl logs pipeline shop             # what the pipeline's runs of job shop logged
//! ```
//!
//! etcd comes from `--etcd` or `KEELSON_ETCD_ENDPOINTS` (and the TLS and credential
//! flags of every keelson binary). Output is a table for people, or JSON with `--json`
//! for scripts. `--wait` shows a progress bar on a terminal (one line per phase change
//! otherwise) and its exit status tells the outcome: 0 when the version runs
//! everywhere, 1 when the deployment failed or was rolled back, or the wait ran out
//! (`--wait-timeout`, 10m). Errors are one line on stderr and exit status 1 (2 for
//! usage).
//!
//! `logs` reads a job's output from `logd` (the node agents ship it there with
//! `--logs-to`): every group of the job, or one; one line per record,
//! `<time> <instance> <stream> <line>`, or the records as NDJSON with `--json`.
//!
//! Build with `--features etcd`.

use std::process::ExitCode;
use std::sync::Arc;

use std::time::Duration;

use clap::{Parser, Subcommand};
use keelson_discovery::KeyValue;
use keelson_examples::ctl;
use keelson_examples::ctl::follow::{follow, Outcome};
use keelson_scheduler::{wall_clock_ms, ClusterStore, Eligibility, Gates, GroupSpec, RunSpec, Strategy};
use serde::Deserialize;

#[derive(Parser, Debug)]
#[command(version, about = "Deploy to and inspect a keelson cluster (state in etcd)")]
struct Args {
    #[command(flatten)]
    etcd: keelson_examples::backends::EtcdArgs,
    /// Root of the cluster state keys (as given to the node agents).
    #[arg(long, default_value = "keelson/cluster", env = "KEELSON_ROOT")]
    root: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Print a completion script for this shell and exit.
    #[arg(long, value_name = "SHELL")]
    completions: Option<clap_complete::Shell>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// `--wait` and how long.
#[derive(clap::Args, Debug, Clone, Copy)]
struct Wait {
    /// Follow the deployment until it ends; exit 1 if it fails or is rolled back.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    wait_timeout: Duration,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Shows what deploying a file would do now: placements per node, stops, and why
    /// anything cannot be placed (exit 1 then). Writes nothing.
    Plan { file: std::path::PathBuf },
    /// Submits a group version from a JSON file: {"group": …, "strategy": …, "gates": …}.
    Deploy {
        file: std::path::PathBuf,
        #[command(flatten)]
        wait: Wait,
    },
    /// Prints a group's state: stable version, count, deployment under way, last outcome.
    Status { job: String, group: String },
    /// Promotes the canaries of a group's deployment.
    Promote {
        job: String,
        group: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Rolls a group's deployment back to its stable version.
    Rollback {
        job: String,
        group: String,
        reason: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Sets how many allocations of a group run.
    Scale { job: String, group: String, count: u32 },
    /// Stops a group, or every group of a job (count 0; deploy or scale to start again).
    Stop { job: String, group: Option<String> },
    /// Lists nodes: live and lost, resources used of total, eligibility, labels.
    Nodes,
    /// Acts on one node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Lists groups: version, count, running, deployment under way, last outcome.
    Jobs,
    /// Lists allocations.
    Allocs {
        /// Only this node's.
        #[arg(long)]
        node: Option<String>,
        /// Only this job's.
        #[arg(long)]
        job: Option<String>,
    },
    /// Lists deployments under way and those that ended.
    Deployments { job: Option<String> },
    /// Saves or restores the cluster state.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Submits a one-off run from a JSON file (a RunSpec).
    Run { file: std::path::PathBuf },
    /// Prints a run's result (null while it has not ended).
    Result { id: String },
    /// Prints a job's output (every group, or one) from logd.
    Logs(LogsArgs),
    /// Lists pipeline runs (every job's, or one's): commit, outcome, version, steps.
    Pipeline {
        /// Only this job's runs.
        job: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Shows a node with its attributes.
    Status { node: String },
    /// Drains a node: no new work, and the controller moves what runs there elsewhere.
    Drain { node: String },
    /// Sets whether new work may be placed on a node.
    Eligibility { node: String, eligibility: EligibilityArg },
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Writes every key of the cluster state but the lease-bound ones (nodes, locks),
    /// read at one revision, to a file.
    Save { file: std::path::PathBuf },
    /// Writes a saved state back into an empty root. Stop the node agents first (their
    /// tasks keep running) and start them after: they adopt their containers.
    Restore { file: std::path::PathBuf },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum EligibilityArg {
    Eligible,
    Ineligible,
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

/// Prints `value` as JSON, or `table` for people.
fn show(json: bool, value: &impl serde::Serialize, table: impl FnOnce() -> String) -> Result<(), String> {
    if json {
        println!("{}", serde_json::to_string_pretty(value).map_err(|e| e.to_string())?);
    } else {
        print!("{}", table());
    }
    Ok(())
}

/// What a command ended with, beyond success: an exit status of 1 with its reason.
type Done = Result<Option<String>, String>;

/// Waits for `version` of a group if asked, and turns how it ended into the exit.
async fn maybe_wait(store: &ClusterStore, wait: Wait, job: &str, group: &str, version: u64) -> Done {
    if !wait.wait {
        return Ok(None);
    }
    match follow(store, job, group, version, wait.wait_timeout).await? {
        Outcome::Succeeded => {
            eprintln!("{job}/{group} v{version}: running everywhere");
            Ok(None)
        }
        Outcome::Failed(why) => Ok(Some(format!("{job}/{group} v{version}: {why}"))),
        Outcome::TimedOut => {
            Ok(Some(format!("{job}/{group} v{version}: still under way after {}", humantime::format_duration(wait.wait_timeout))))
        }
    }
}

async fn run(args: Args) -> Done {
    let command = args.command.ok_or("a command is required (try --help)")?;
    if let Command::Logs(logs) = &command {
        keelson_examples::logs_client::print_logs(&logs.query(), &logs.logd, logs.token_file.as_deref(), args.json).await?;
        return Ok(None);
    }
    if !args.etcd.is_set() {
        return Err("--etcd (or KEELSON_ETCD_ENDPOINTS) is required".into());
    }
    let kv: Arc<dyn KeyValue> = Arc::new(args.etcd.connect().await?);
    if let Command::Pipeline { job } = &command {
        let runs = keelson_examples::pipeline_runs::RunLog::new(kv, &args.root, None).list(job.as_deref()).await?;
        show(args.json, &runs, || keelson_examples::pipeline_runs::runs_table(&runs))?;
        return Ok(None);
    }
    let store = ClusterStore::new(kv, args.root);
    let json = args.json;
    let err = |e: keelson_scheduler::Error| e.to_string();
    match command {
        Command::Plan { file } => {
            let d: DeployFile = read_json(&file)?;
            let plan = store.plan_deploy(&d.group).await.map_err(err)?;
            show(json, &plan, || ctl::plan_text(&plan))?;
            Ok((!plan.is_complete()).then(|| "some allocations cannot be placed".to_owned()))
        }
        Command::Deploy { file, wait } => {
            let d: DeployFile = read_json(&file)?;
            let state = store.deploy(&d.group, d.strategy, d.gates).await.map_err(err)?;
            let version = d.group.desired.version;
            show(json, &state, || format!("{}/{} v{version} submitted\n", state.job, state.group))?;
            maybe_wait(&store, wait, &state.job, &state.group, version).await
        }
        Command::Status { job, group } => {
            let state = store.group_state(&job, &group).await.map_err(err)?.ok_or_else(|| format!("no group {job}/{group}"))?;
            let view = store.view().await.map_err(err)?;
            let summary = ctl::groups(vec![state], &view);
            show(json, &summary[0].state, || {
                let now = wall_clock_ms();
                let mine = ctl::allocations(&view, None, Some(&job));
                let mine: Vec<_> = mine.into_iter().filter(|a| a.group == group).collect();
                format!(
                    "{}\n{}\n{}",
                    ctl::jobs_table(&summary).render(),
                    ctl::deployments_table(std::slice::from_ref(&summary[0].state), now).render(),
                    ctl::allocs_table(&view, &mine, now).render()
                )
            })?;
            Ok(None)
        }
        Command::Promote { job, group, wait } => {
            store.promote(&job, &group).await.map_err(err)?;
            let target = deploying_to(&store, &job, &group).await?;
            eprintln!("{job}/{group}: canaries promoted");
            maybe_wait(&store, wait, &job, &group, target).await
        }
        Command::Rollback { job, group, reason, wait } => {
            let state = store.group_state(&job, &group).await.map_err(err)?.ok_or_else(|| format!("no group {job}/{group}"))?;
            store.rollback(&job, &group, &reason).await.map_err(err)?;
            eprintln!("{job}/{group}: rolling back to v{}", state.stable);
            maybe_wait(&store, wait, &job, &group, state.stable).await
        }
        Command::Scale { job, group, count } => {
            store.scale(&job, &group, count).await.map_err(err)?;
            eprintln!("{job}/{group}: count {count}");
            Ok(None)
        }
        Command::Stop { job, group } => {
            let stopped = store.stop(&job, group.as_deref()).await.map_err(err)?;
            show(json, &stopped, || stopped.iter().map(|g| format!("{job}/{g} stopped\n")).collect())?;
            Ok(None)
        }
        Command::Nodes => {
            let nodes = ctl::nodes(&store.view().await.map_err(err)?, &store.node_heartbeats().await.map_err(err)?);
            show(json, &nodes, || ctl::nodes_table(&nodes).render())?;
            Ok(None)
        }
        Command::Node(NodeCommand::Status { node }) => {
            let nodes = ctl::nodes(&store.view().await.map_err(err)?, &store.node_heartbeats().await.map_err(err)?);
            let found = nodes.iter().find(|n| n.id == node).ok_or_else(|| format!("no node {node}"))?;
            show(json, found, || ctl::node_detail(found))?;
            Ok(None)
        }
        Command::Node(NodeCommand::Drain { node }) => {
            store.set_eligibility(&node, Eligibility::Draining).await.map_err(err)?;
            eprintln!("node {node}: draining (its work moves elsewhere)");
            Ok(None)
        }
        Command::Node(NodeCommand::Eligibility { node, eligibility }) => {
            let e = match eligibility {
                EligibilityArg::Eligible => Eligibility::Eligible,
                EligibilityArg::Ineligible => Eligibility::Ineligible,
            };
            store.set_eligibility(&node, e).await.map_err(err)?;
            eprintln!("node {node}: {}", format!("{e:?}").to_lowercase());
            Ok(None)
        }
        Command::Jobs => {
            let groups = ctl::groups(store.group_states().await.map_err(err)?, &store.view().await.map_err(err)?);
            show(json, &groups, || ctl::jobs_table(&groups).render())?;
            Ok(None)
        }
        Command::Allocs { node, job } => {
            let view = store.view().await.map_err(err)?;
            let allocs = ctl::allocations(&view, node.as_deref(), job.as_deref());
            show(json, &allocs, || ctl::allocs_table(&view, &allocs, wall_clock_ms()).render())?;
            Ok(None)
        }
        Command::Deployments { job } => {
            let states: Vec<_> =
                store.group_states().await.map_err(err)?.into_iter().filter(|s| job.as_ref().is_none_or(|j| &s.job == j)).collect();
            show(json, &states, || ctl::deployments_table(&states, wall_clock_ms()).render())?;
            Ok(None)
        }
        Command::Snapshot(SnapshotCommand::Save { file }) => {
            let snapshot = store.snapshot().await.map_err(err)?;
            let text = serde_json::to_vec_pretty(&snapshot).map_err(|e| e.to_string())?;
            // Written beside and renamed over: a crash never leaves half a backup.
            let partial = file.with_extension("partial");
            std::fs::write(&partial, text)
                .and_then(|()| std::fs::File::open(&partial)?.sync_all())
                .and_then(|()| std::fs::rename(&partial, &file))
                .map_err(|e| format!("{}: {e}", file.display()))?;
            eprintln!("{} keys at revision {} saved to {}", snapshot.entries.len(), snapshot.revision, file.display());
            Ok(None)
        }
        Command::Snapshot(SnapshotCommand::Restore { file }) => {
            let text = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let snapshot: keelson_scheduler::StoreSnapshot =
                serde_json::from_slice(&text).map_err(|e| format!("{}: not a keelson snapshot: {e}", file.display()))?;
            let written = store.restore(&snapshot).await.map_err(err)?;
            eprintln!("{written} keys restored from {} (taken at revision {})", file.display(), snapshot.revision);
            Ok(None)
        }
        Command::Run { file } => {
            let spec: RunSpec = read_json(&file)?;
            let record = store.submit_run(&spec).await.map_err(err)?;
            show(json, &record, || format!("run {} submitted\n", spec.id))?;
            Ok(None)
        }
        Command::Result { id } => {
            let result = store.run_result(&id).await.map_err(err)?;
            // A result is a document (its output lines): JSON either way.
            show(true, &result, String::new)?;
            Ok(None)
        }
        Command::Logs(_) | Command::Pipeline { .. } => Ok(None),
    }
}

/// The version a group's deployment under way moves to.
async fn deploying_to(store: &ClusterStore, job: &str, group: &str) -> Result<u64, String> {
    let state = store.group_state(job, group).await.map_err(|e| e.to_string())?.ok_or_else(|| format!("no group {job}/{group}"))?;
    state.deployment.map(|d| d.to_version()).ok_or_else(|| format!("{job}/{group}: the deployment ended meanwhile (see status)"))
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
    if let Some(shell) = args.completions {
        clap_complete::generate(shell, &mut <Args as clap::CommandFactory>::command(), "keelson-ctl", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keelson-ctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(failed)) | Err(failed) => {
            eprintln!("keelson-ctl: {failed}");
            ExitCode::FAILURE
        }
    }
}
