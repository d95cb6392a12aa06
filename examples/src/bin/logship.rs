//! `logship`: ships log files (or stdin) to syslog or to files, at least once.
//!
//! ```text
//! logship --file '/var/log/app/*.log*' --checkpoints /var/lib/logship/files.json --to tcp://127.0.0.1:514
//! logship --file app.log --service web --to tls://logs.example:6514 --tls-ca ca.pem
//! some-program | logship --stdin --service batch --to udp://127.0.0.1:514
//! logship --file 'old/*.log' --once --to file:///srv/archive
//! ```
//!
//! A file's offset is saved only after the receiver has the lines before it: kill
//! `logship` at any moment and the next start sends what was not acknowledged (at most
//! one batch again), never skipping a line. While the receiver stalls, reading pauses.
//!
//! Every flag is also `KEELSON_LOGSHIP_<FLAG>` and a key of `--config FILE` (TOML);
//! `--metrics-listen` serves `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use keelson_logship::{
    sink_from_url, FileSource, FileSourceConfig, Labels, ReaderSource, ShipConfig, ShipMetrics, Shipper, Sink, SinkOptions, Source, StartAt,
};

#[derive(clap::Parser, Debug)]
#[command(version, about = "Ships log files or stdin to syslog or files, at least once")]
struct Args {
    /// Files to tail (glob patterns; include rotated names such as 'app.log*').
    #[arg(long = "file", value_name = "GLOB", required_unless_present = "stdin", env = "KEELSON_LOGSHIP_FILES", value_delimiter = ',')]
    files: Vec<String>,
    /// Read lines from standard input instead of files (ends at its end).
    #[arg(long, conflicts_with = "files")]
    stdin: bool,
    /// Where to send: tcp://host:port, tls://host:port, udp://host:port (syslog RFC 5424),
    /// file:///dir (JSON lines per service), http(s)://… (NDJSON), loki+http(s)://… or
    /// elasticsearch+http(s)://…/_bulk?index=NAME.
    #[arg(long, env = "KEELSON_LOGSHIP_TO")]
    to: String,
    /// File holding the bearer token for http(s) sinks (never on the command line).
    #[arg(long, env = "KEELSON_LOGSHIP_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM file of the certificates a tls:// or https:// receiver is checked against.
    #[arg(long, env = "KEELSON_LOGSHIP_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Name the tls:// receiver's certificate must carry (default: the URL's host).
    #[arg(long)]
    tls_server_name: Option<String>,
    /// Service label (default: each file's name up to its first dot; "stdin" for stdin).
    #[arg(long, env = "KEELSON_LOGSHIP_SERVICE")]
    service: Option<String>,
    /// Instance label.
    #[arg(long, default_value = "")]
    instance: String,
    /// Node label (syslog HOSTNAME; default: this machine's name).
    #[arg(long)]
    node: Option<String>,
    /// Where file offsets are kept (without it, a restart starts over).
    #[arg(long, env = "KEELSON_LOGSHIP_CHECKPOINTS")]
    checkpoints: Option<PathBuf>,
    /// Where to start in files found at the first start that have no checkpoint.
    #[arg(long, value_enum, default_value = "beginning")]
    start_at: Start,
    /// Stop once every file is read to its end and acknowledged.
    #[arg(long)]
    once: bool,
    /// Records per batch at most.
    #[arg(long, default_value_t = 2048)]
    max_batch: usize,
    /// Serve Prometheus metrics (and /healthz, /readyz) on this address (e.g. 127.0.0.1:9464).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    daemon: keelson_examples::daemon::DaemonArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Start {
    Beginning,
    End,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = keelson_examples::daemon::start("logship", |a: &Args| &a.daemon);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("logship: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let mut options = SinkOptions::default();
    options.ca = args.tls_ca.clone();
    options.server_name = args.tls_server_name.clone();
    if let Some(path) = &args.token_file {
        let token = std::fs::read_to_string(path).map_err(|e| format!("reading the token file {}: {e}", path.display()))?;
        options.bearer_token = Some(token.trim().to_owned());
    }
    let sink: Arc<dyn Sink> = sink_from_url(&args.to, &options).map_err(|e| e.to_string())?;
    let mut labels = Labels::new(args.service.clone().unwrap_or_default(), args.instance.clone());
    labels.node = args.node.clone();
    let mut source: Box<dyn Source> = if args.stdin {
        if labels.service.is_empty() {
            labels.service = "stdin".into();
        }
        Box::new(ReaderSource::stdin(labels))
    } else {
        let mut config = FileSourceConfig::new(args.files.clone());
        config.labels = labels;
        config.checkpoints = args.checkpoints.clone();
        config.start_at = match args.start_at {
            Start::Beginning => StartAt::Beginning,
            Start::End => StartAt::End,
        };
        config.stop_at_eof = args.once;
        Box::new(FileSource::new(config).map_err(|e| e.to_string())?)
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = ShipMetrics::register(&mut registry);
    let readiness = keelson_examples::metrics_http::Readiness::new();
    if let Some(addr) = args.metrics_listen {
        keelson_examples::daemon::serve_ops("--metrics-listen", addr, registry, "logship", readiness.clone()).await?;
    }
    readiness.set_ready();
    let mut config = ShipConfig::default();
    config.max_batch = args.max_batch;
    let mut shipper = Shipper::new(config.clone()).map_err(|e| e.to_string())?.with_metrics(metrics);
    tracing::info!(to = %args.to, "shipping");
    let mut pauses = config.pauses();
    let mut shipped_at_last_error = 0;
    let mut stop = std::pin::pin!(keelson_examples::daemon::shutdown_signal()?);
    loop {
        tokio::select! {
            result = shipper.run(&mut *source, &*sink) => match result {
                Ok(stats) => {
                    tracing::info!(records = stats.records, batches = stats.batches, retries = stats.retries, "all input shipped");
                    return Ok(());
                }
                Err(e) if e.is_retryable() => {
                    // The receiver is down: what was read stays held and goes first.
                    // Pauses grow while nothing gets through, and start small again after.
                    if shipper.stats().records > shipped_at_last_error {
                        pauses = config.pauses();
                        shipped_at_last_error = shipper.stats().records;
                    }
                    let pause = pauses.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(error = %e, retry_in = ?pause, held = shipper.held().count(), "shipping paused");
                    tokio::time::sleep(pause).await;
                }
                Err(e) => return Err(e.to_string()),
            },
            signal = &mut stop => {
                tracing::info!(?signal, "stopping");
                break;
            }
        }
    }
    // What was not acknowledged is sent again by the next start.
    tracing::info!(records = shipper.stats().records, "stopping");
    Ok(())
}
