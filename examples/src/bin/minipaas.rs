//! `minipaas`: a small Heroku-like platform built from keelson's building blocks.
//!
//! `minipaas demo` runs everything on embedded defaults (no servers, no Docker).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keelson_examples::minipaas::{Demo, DemoConfig, HOST};

#[derive(Parser, Debug)]
#[command(version, about = "A small platform built from keelson building blocks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run 3 replicas of `hello` behind the router on embedded defaults, until Ctrl-C.
    Demo {
        /// Router listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where logs go (`<data-dir>/logs/hello.log`).
        #[arg(long, default_value = "minipaas-data")]
        data_dir: PathBuf,
        /// Number of replicas.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
        replicas: u32,
        /// The hello program to run (default: `hello` next to this binary, else this
        /// binary's own `hello` subcommand).
        #[arg(long)]
        hello_bin: Option<PathBuf>,
    },
    /// Serve the hello service (what each replica runs when no `hello` binary is found).
    #[command(hide = true)]
    Hello {
        #[arg(long, env = "KEELSON_TASK_ID")]
        id: String,
        #[arg(long, env = "PORT")]
        port: u16,
    },
}

/// The command that runs one replica: an explicit binary, the sibling `hello` binary,
/// or this binary's `hello` subcommand (so `cargo run --bin minipaas` alone suffices).
fn hello_command(explicit: Option<PathBuf>) -> Result<Vec<String>, String> {
    if let Some(p) = explicit {
        return Ok(vec![p.display().to_string()]);
    }
    let me = std::env::current_exe().map_err(|e| format!("cannot find this program's path: {e}"))?;
    let sibling = me.with_file_name("hello");
    if sibling.is_file() {
        return Ok(vec![sibling.display().to_string()]);
    }
    Ok(vec![me.display().to_string(), "hello".into()])
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Hello { id, port } => match keelson_examples::hello::serve(id, ([127, 0, 0, 1], port).into()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hello: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Demo { listen, data_dir, replicas, hello_bin } => {
            keelson_examples::init_tracing();
            let hello_command = match hello_command(hello_bin) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("minipaas: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let config = DemoConfig { listen, data_dir: data_dir.clone(), replicas, hello_command, ..DemoConfig::default() };
            run_demo(config, data_dir).await
        }
    }
}

async fn run_demo(config: DemoConfig, data_dir: PathBuf) -> ExitCode {
    let replicas = config.replicas;
    let demo = match Demo::start(config).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("minipaas: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = demo.listen_addr();
    println!(
        "minipaas ready: {replicas} replicas of hello behind http://{addr} (logs in {}) -- try: curl -H 'Host: {HOST}' http://{addr}/",
        data_dir.join("logs").display()
    );
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("minipaas: cannot watch SIGTERM: {e}");
            let _ = demo.shutdown().await;
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("minipaas: stopping");
    match demo.shutdown().await {
        Ok(()) => {
            println!("minipaas stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("minipaas: stopped with an error: {e}");
            ExitCode::FAILURE
        }
    }
}
