//! `localcloud`: a whole multi-host cloud on one machine (see `keelson_examples::localcloud`).
//!
//! ```text
//! localcloud up --name demo [--hosts 3] [--underlay 10.78.0.0/24] [--roles roles.toml]
//! dig @10.78.0.11 master.demo.test +short            # the load balancer
//! ip netns exec lc-demo-lan curl http://node.demo.test/   # from a machine on the LAN
//! localcloud status --name demo
//! localcloud reset --name demo                       # all data wiped, same cloud again
//! localcloud down --name demo                        # nothing left behind
//! ```
//!
//! `up` starts the cloud's supervisor in the background and returns once every role
//! answers by name (`--foreground` keeps it attached: Ctrl-C or SIGTERM take the cloud
//! down, SIGHUP resets it). Its state and logs are in `--state-dir` (default
//! `localcloud-<name>`). Needs root (namespaces), the Docker Engine, etcd, unbound,
//! curl and busybox-static; keelson's programs are found beside this one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use keelson_examples::localcloud::cloud::{self, CloudConfig, Event};
use keelson_examples::localcloud::layout::Layout;
use keelson_examples::localcloud::roles::DEFAULT_ROLES;
use keelson_examples::localcloud::state::CloudState;

#[derive(Parser, Debug)]
#[command(version, about = "A whole multi-host cloud on one machine, up in seconds")]
struct Cli {
    /// The cloud's name: 1 to 12 of a-z0-9, starting with a letter.
    #[arg(long, global = true, env = "LOCALCLOUD_NAME")]
    name: Option<String>,
    /// Its state, data and logs (default `localcloud-<name>`).
    #[arg(long, global = true, env = "LOCALCLOUD_STATE_DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct UpArgs {
    /// Hosts (network namespaces); the first three hold etcd's members.
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// The hosts' subnet, a /24 nothing on this machine routes.
    #[arg(long, default_value = "10.78.0.0/24")]
    underlay: ipnet::Ipv4Net,
    /// The zone of the cloud's names (default `<name>.test`).
    #[arg(long)]
    domain: Option<String>,
    /// The roles' manifest (a minipaas manifest; default: master and storage nodes).
    #[arg(long)]
    roles: Option<PathBuf>,
    /// Millicores each host offers.
    #[arg(long, default_value_t = 2000)]
    cpu: u64,
    /// MiB each host offers.
    #[arg(long, default_value_t = 2048)]
    memory: u64,
    /// How long a start (or a reset) may take until every role answers.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Stay attached: Ctrl-C or SIGTERM take the cloud down, SIGHUP resets it.
    #[arg(long)]
    foreground: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make the cloud and return once every role answers by name.
    Up(UpArgs),
    /// Wipe all data and start the same cloud again; returns once every role answers.
    Reset,
    /// Take the cloud down: no namespace, link, container, process or data left.
    Down,
    /// Where the cloud is: names, addresses, hosts.
    Status {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut <Cli as clap::CommandFactory>::command(), "localcloud", &mut std::io::stdout());
            Ok(())
        }
        command => target(&cli).and_then(|(name, dir)| match command {
            Command::Up(args) if args.foreground => foreground(&name, &dir, args),
            Command::Up(args) => up(&name, &dir, args),
            Command::Reset => reset(&dir),
            Command::Down => down(&dir),
            Command::Status { json } => status(&dir, *json),
            Command::Completions { .. } => Ok(()),
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("localcloud: {e}");
            ExitCode::FAILURE
        }
    }
}

fn target(cli: &Cli) -> Result<(String, PathBuf), String> {
    let name = cli.name.clone().ok_or("which cloud? give --name (or LOCALCLOUD_NAME)")?;
    let dir = cli.state_dir.clone().unwrap_or_else(|| PathBuf::from(format!("localcloud-{name}")));
    Ok((name, dir))
}

fn layout(name: &str, args: &UpArgs) -> Result<Layout, String> {
    Layout::new(name, args.hosts, args.underlay, args.domain.as_deref()).map_err(|e| e.to_string())
}

/// Starts the supervisor (this program, `--foreground`) in a session of its own and
/// waits until the cloud is ready or the supervisor gives up.
fn up(name: &str, dir: &Path, args: &UpArgs) -> Result<(), String> {
    let t0 = Instant::now();
    layout(name, args)?;
    if let Ok(state) = CloudState::read(dir) {
        if keelson_examples::supervise::is_running(state.pid) {
            return Err(format!("cloud {name} is up already (pid {}); localcloud down --name {name} first", state.pid));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let log_path = dir.join(cloud::LOG_FILE);
    let log = std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let me = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    let mut command = std::process::Command::new(me);
    command.args(["up", "--foreground", "--name", name]).arg("--state-dir").arg(dir);
    command.args(["--hosts", &args.hosts.to_string(), "--underlay", &args.underlay.to_string()]);
    command.args(["--cpu", &args.cpu.to_string(), "--memory", &args.memory.to_string()]);
    command.args(["--timeout", &humantime::format_duration(args.timeout).to_string()]);
    if let Some(domain) = &args.domain {
        command.args(["--domain", domain]);
    }
    if let Some(roles) = &args.roles {
        command.arg("--roles").arg(roles);
    }
    use std::os::unix::process::CommandExt;
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting the supervisor: {e}"))?;
    loop {
        if let Ok(state) = CloudState::read(dir) {
            if state.ready && state.pid == child.id() {
                println!("localcloud {name} is up in {:.1} s", t0.elapsed().as_secs_f64());
                print_state(&state);
                return Ok(());
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            return Err(format!(
                "the cloud did not come up ({status}); {}:\n{}",
                log_path.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The supervisor itself.
fn foreground(name: &str, dir: &Path, args: &UpArgs) -> Result<(), String> {
    keelson_examples::init_tracing();
    let (roles_file, roles_text) = match &args.roles {
        Some(path) => (path.display().to_string(), std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?),
        None => ("(default roles)".to_owned(), DEFAULT_ROLES.to_owned()),
    };
    let me = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    let config = CloudConfig {
        layout: layout(name, args)?,
        state_dir: dir.to_owned(),
        bin_dir: me.parent().map(Path::to_path_buf).unwrap_or_default(),
        roles_file,
        roles_text,
        cpu: args.cpu,
        memory: args.memory,
        ready_timeout: args.timeout,
    };
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("tokio: {e}"))?;
    runtime.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
        let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("SIGHUP handler: {e}"))?;
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = term.recv() => Event::Stop,
                    _ = int.recv() => Event::Stop,
                    _ = hup.recv() => Event::Reset,
                };
                if tx.send(event).await.is_err() || event == Event::Stop {
                    return;
                }
            }
        });
        cloud::run(config, rx, |state| {
            println!("localcloud {} generation {} answers (ready in {} ms)", state.name, state.generation, state.ready_in_ms);
        })
        .await
    })?;
    println!("localcloud {name} is down");
    Ok(())
}

/// SIGHUP to the supervisor, then wait for the next generation to answer.
fn reset(dir: &Path) -> Result<(), String> {
    let t0 = Instant::now();
    let before = CloudState::read(dir)?;
    if !keelson_examples::supervise::is_running(before.pid) {
        return Err(format!("cloud {}'s supervisor (pid {}) is not running: localcloud down, then up", before.name, before.pid));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(before.pid as i32), nix::sys::signal::Signal::SIGHUP)
        .map_err(|e| format!("signalling the supervisor (pid {}): {e}", before.pid))?;
    loop {
        match CloudState::read(dir) {
            Ok(now) if now.generation > before.generation && now.ready => {
                println!("localcloud {} was reset in {:.1} s (generation {})", now.name, t0.elapsed().as_secs_f64(), now.generation);
                return Ok(());
            }
            _ if !keelson_examples::supervise::is_running(before.pid) => {
                return Err(format!("the supervisor stopped during the reset; see {}", dir.join(cloud::LOG_FILE).display()));
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn down(dir: &Path) -> Result<(), String> {
    let state = CloudState::read(dir)?;
    keelson_examples::supervise::signal_and_wait(
        "the localcloud supervisor",
        state.pid,
        nix::sys::signal::Signal::SIGTERM,
        Duration::from_secs(120),
    )?;
    println!("localcloud {} is down", state.name);
    Ok(())
}

fn status(dir: &Path, json: bool) -> Result<(), String> {
    let state = CloudState::read(dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&state).map_err(|e| e.to_string())?);
    } else {
        print_state(&state);
    }
    Ok(())
}

fn print_state(state: &CloudState) {
    // A closed stdout (`| head`) is not this program's failure.
    let _ = write_state(&mut std::io::stdout().lock(), state);
}

fn write_state(out: &mut impl std::io::Write, state: &CloudState) -> std::io::Result<()> {
    let phase = if state.ready { "answering" } else { "starting" };
    writeln!(out, "cloud {} (generation {}, {phase}), supervisor pid {}", state.name, state.generation, state.pid)?;
    if !keelson_examples::supervise::is_running(state.pid) {
        writeln!(out, "  the supervisor is not running: localcloud down cleans up what is left")?;
    }
    writeln!(out, "  names:   {} and lb.{} -> load balancer {}", state.domain, state.domain, state.edge.ip())?;
    for role in &state.roles {
        writeln!(out, "           http://{role}/")?;
    }
    let first = state.roles.first().map_or("", String::as_str);
    writeln!(out, "  dns:     dig @{} {first} (from this machine)", state.dns.ip())?;
    writeln!(out, "  lan:     ip netns exec {} curl http://{first}/", state.lan_netns)?;
    writeln!(out, "  etcd:    {}", state.etcd.join(","))?;
    writeln!(out, "  apps:    minipaas --controller {} --token-file {} --app cloud ps", state.controller, state.token_file.display())?;
    writeln!(out, "  hosts:   {}", state.hosts.iter().map(|h| format!("{} {}", h.netns, h.address)).collect::<Vec<_>>().join(", "))?;
    writeln!(out, "  logs:    {}", state.logs.display())
}
