//! `logd`: the platform's log server (see [`keelson_examples::logd`]).
//!
//! ```text
//! logd --dir /var/lib/keelson/logd --token-file /etc/keelson/logd.token          # 127.0.0.1:7070
//! logd --dir DIR --token-file FILE --listen 10.0.0.5:7070                          # reachable by agents
//! ```
//!
//! The token comes from a file (or `KEELSON_LOGD_TOKEN_FILE`), never the command line;
//! without one logd refuses to start unless `--insecure-no-auth` says otherwise.
//! Every flag is also `KEELSON_LOGD_<FLAG>` and a key of `--config FILE` (TOML).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use keelson_examples::logd::{serve, LogdConfig};

#[derive(clap::Parser, Debug)]
#[command(version, about = "keelson's log server: receives records from agents, answers queries and follows")]
struct Args {
    /// Where the per-service files are kept.
    #[arg(long, env = "KEELSON_LOGD_DIR")]
    dir: PathBuf,
    /// Listen address (loopback unless you say otherwise).
    #[arg(long, default_value = "127.0.0.1:7070", env = "KEELSON_LOGD_LISTEN")]
    listen: SocketAddr,
    /// File holding the bearer token agents and readers must send.
    #[arg(long, env = "KEELSON_LOGD_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Serve without a token: anyone who reaches --listen reads and writes every log.
    #[arg(long, conflicts_with = "token_file")]
    insecure_no_auth: bool,
    /// Rotate a service's file once it holds this many bytes.
    #[arg(long, default_value_t = 64 << 20)]
    max_file_bytes: u64,
    /// Rotated files kept per service.
    #[arg(long, default_value_t = 5)]
    keep_files: usize,
    /// Also receive syslog over TLS (RFC 5425) on this address; senders must present a
    /// certificate signed by --syslog-client-ca.
    #[arg(long, requires_all = ["syslog_tls_cert", "syslog_tls_key", "syslog_client_ca"])]
    syslog_listen: Option<SocketAddr>,
    /// The syslog listener's certificate chain (PEM).
    #[arg(long)]
    syslog_tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long)]
    syslog_tls_key: Option<PathBuf>,
    /// The CA (PEM) whose certificates syslog senders must present.
    #[arg(long)]
    syslog_client_ca: Option<PathBuf>,
    #[command(flatten)]
    daemon: keelson_examples::daemon::DaemonArgs,
}

/// The syslog listener's TLS: this server's certificate, and client certificates
/// required, checked against the CA.
fn syslog_tls(args: &Args) -> Result<Option<(SocketAddr, std::sync::Arc<rustls::ServerConfig>)>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (Some(addr), Some(cert), Some(key), Some(ca)) =
        (args.syslog_listen, &args.syslog_tls_cert, &args.syslog_tls_key, &args.syslog_client_ca)
    else {
        return Ok(None);
    };
    let named = |flag: &str, path: &PathBuf, e: &dyn std::fmt::Display| format!("{flag} {}: {e}", path.display());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| named("--syslog-tls-cert", cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| named("--syslog-tls-cert", cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| named("--syslog-tls-key", key, &e))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| named("--syslog-client-ca", ca, &e))? {
        roots.add(c.map_err(|e| named("--syslog-client-ca", ca, &e))?).map_err(|e| named("--syslog-client-ca", ca, &e))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(std::sync::Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| named("--syslog-client-ca", ca, &e))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("--syslog-tls-cert/--syslog-tls-key: {e}"))?;
    Ok(Some((addr, std::sync::Arc::new(config))))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = keelson_examples::daemon::start("logd", |a: &Args| &a.daemon);
    let stop = match keelson_examples::daemon::shutdown_signal() {
        Ok(stop) => stop,
        Err(e) => return fail(e),
    };
    let token = match (&args.token_file, args.insecure_no_auth) {
        (Some(path), _) => match std::fs::read_to_string(path) {
            Ok(t) if t.trim().len() >= 16 => Some(t.trim().to_owned()),
            Ok(_) => return fail(format!("--token-file {}: the token must be at least 16 characters", path.display())),
            Err(e) => return fail(format!("--token-file {}: {e}", path.display())),
        },
        (None, true) => None,
        (None, false) => {
            return fail("a token is required: --token-file FILE (or --insecure-no-auth on a network nothing else reaches)".into())
        }
    };
    let mut config = LogdConfig::new(&args.dir, token);
    config.files.max_bytes = Some(args.max_file_bytes);
    config.files.keep = args.keep_files;
    config.syslog = match syslog_tls(&args) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => return fail(format!("--listen {}: {e}", args.listen)),
    };
    println!("logd: serving on {} from {}", args.listen, args.dir.display());
    let stop = async {
        let signal = stop.await;
        tracing::info!(?signal, "stopping");
    };
    match serve(listener, config, stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.to_string()),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("logd: {message}");
    ExitCode::FAILURE
}
