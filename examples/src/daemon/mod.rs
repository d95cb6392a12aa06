//! What every keelson daemon (`edge`, `node-agent`, `dns-catalog`, `logd`, `registry`,
//! `logship`) shares, so an operator learns it once:
//!
//! - configuration by flag, `KEELSON_<BIN>_<FLAG>` environment variable and strict TOML
//!   file ([`config`]), durations in humantime (`500ms`, `30s`, `1h`);
//! - `--log-format text|json` and `--log-level` ([`init_logging`]); colour only on a
//!   terminal;
//! - `/healthz`, `/readyz` and a `keelson_build_info` metric beside `/metrics`
//!   ([`crate::metrics_http`]);
//! - SIGTERM and SIGINT as one shutdown signal ([`shutdown_signal`]);
//! - `--completions <shell>`.
//!
//! ```
//! #[derive(clap::Parser, Debug)]
//! struct Args {
//!     /// Where to listen.
//!     #[arg(long, default_value = "127.0.0.1:8080")]
//!     listen: std::net::SocketAddr,
//!     #[command(flatten)]
//!     daemon: keelson_examples::daemon::DaemonArgs,
//! }
//! std::env::set_var("KEELSON_DOCDEMO_LISTEN", "127.0.0.1:9000");
//! let parsed = keelson_examples::daemon::try_parse_from::<Args>("docdemo", ["docdemo"]).unwrap();
//! let keelson_examples::daemon::Parsed::Args(args) = parsed else { unreachable!() };
//! assert_eq!(args.listen.port(), 9000);
//! ```

pub mod config;

pub use config::{env_name, parse, try_parse_from, DaemonArgs, Parsed};

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`).
    Json,
}

/// Sends `tracing` events to stderr in `args.log_format`, filtered by `args.log_level`.
/// Colour codes only when stderr is a terminal, never into a file or a journal.
pub fn init_logging(args: &DaemonArgs) -> Result<(), String> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level).map_err(|e| format!("--log-level {:?}: {e}", args.log_level))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match args.log_format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
    result.map_err(|e| format!("logging: {e}"))
}

/// Parses `binary`'s flags, environment and config file ([`parse`]) and starts its logs
/// ([`init_logging`]) from the [`DaemonArgs`] `daemon` finds in them: a daemon's first
/// line. A usage or logging error is printed and the process exits with status 2.
pub fn start<T: clap::Parser + std::fmt::Debug>(binary: &str, daemon: impl FnOnce(&T) -> &DaemonArgs) -> T {
    let args: T = parse(binary);
    if let Err(e) = init_logging(daemon(&args)) {
        eprintln!("{binary}: {e}");
        std::process::exit(2);
    }
    args
}

/// Which signal asked the process to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM (a supervisor: systemd, Docker, a test).
    Terminate,
    /// SIGINT (Ctrl-C).
    Interrupt,
}

/// Resolves on the first SIGTERM or SIGINT. Both handlers are installed when this is
/// called, so call it before serving.
pub fn shutdown_signal() -> Result<impl std::future::Future<Output = StopSignal>, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => StopSignal::Terminate,
            _ = int.recv() => StopSignal::Interrupt,
        }
    })
}

/// Binds `addr` (the value of `flag`) and serves `/metrics` of `registry` (with the
/// build-info metric of `binary` added), `/healthz` and `/readyz` there.
pub async fn serve_ops(
    flag: &str,
    addr: std::net::SocketAddr,
    mut registry: prometheus_client::registry::Registry,
    binary: &str,
    readiness: crate::metrics_http::Readiness,
) -> Result<std::net::SocketAddr, String> {
    crate::metrics_http::register_build_info(&mut registry, binary);
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("{flag} {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| format!("{flag} {addr}: {e}"))?;
    tokio::spawn(crate::metrics_http::serve_metrics(listener, std::sync::Arc::new(registry), readiness));
    Ok(local)
}
