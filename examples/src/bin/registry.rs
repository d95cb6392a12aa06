//! `registry`: keelson's OCI image registry, and the tools around it.
//!
//! ```text
//! registry serve --root /var/lib/keelson-registry --listen 127.0.0.1:5000
//! registry serve --root DIR --htpasswd users.htpasswd --token-secret secret.key --realm http://127.0.0.1:5000/token
//! registry gc --root DIR            # offline: the server must be stopped (it collects online itself)
//! registry fsck --root DIR          # verify every blob's bytes and every link
//! registry push --registry http://127.0.0.1:5000 --oci-layout DIR team/app:v1
//! registry pull --registry http://127.0.0.1:5000 team/app:v1 --oci-layout DIR
//! ```
//!
//! Secrets (htpasswd, token secret, TLS key, client password) come from files or the
//! environment, never from flags another user can read in the process list.
//!
//! Every flag is also `KEELSON_REGISTRY_<FLAG>` and a key of `--config FILE` (TOML, the
//! flags of the subcommand run); `--metrics-listen` serves `/metrics`, `/healthz` and
//! `/readyz`. SIGTERM or SIGINT stop accepting and finish the requests in flight.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;
use std::sync::Mutex;

use clap::Subcommand;
use keelson_registry::client::{Client, ClientConfig, Credentials, Progress};
use keelson_registry::server::{Acl, Auth, Htpasswd, Server, ServerConfig, Tokens};
use keelson_registry::{Digest, Registry, RegistryConfig, RepoName};

#[derive(clap::Parser, Debug)]
#[command(version, about = "keelson's OCI image registry")]
struct Args {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    daemon: keelson_examples::daemon::DaemonArgs,
}

#[derive(clap::Args, Debug)]
struct StoreArgs {
    /// Where blobs and metadata live.
    #[arg(long, env = "KEELSON_REGISTRY_ROOT")]
    root: PathBuf,
    /// Grace window of garbage collection (blobs younger, or leased within it, stay).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    gc_grace: Duration,
    /// Upload sessions idle this long are ended by garbage collection.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    upload_idle: Duration,
    /// Largest manifest accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_manifest: u64,
}

impl StoreArgs {
    fn open(&self) -> Result<Registry, String> {
        let mut config = RegistryConfig::default();
        config.gc_grace = self.gc_grace;
        config.upload_idle_timeout = self.upload_idle;
        config.max_manifest_size = self.max_manifest;
        Registry::open_dir(&self.root, config).map_err(|e| format!("opening {}: {e}", self.root.display()))
    }
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Listen address (loopback by default: nothing is open unless you say so).
    #[arg(long, default_value = "127.0.0.1:5000", env = "KEELSON_REGISTRY_LISTEN")]
    listen: SocketAddr,
    /// htpasswd file (bcrypt, `htpasswd -B`): basic auth, or the token endpoint's users.
    #[arg(long, env = "KEELSON_REGISTRY_HTPASSWD")]
    htpasswd: Option<PathBuf>,
    /// Per-repository rules: `<user|*> <pattern> <pull,push,delete|*>` lines.
    #[arg(long, env = "KEELSON_REGISTRY_ACL", requires = "htpasswd")]
    acl: Option<PathBuf>,
    /// File holding the bearer-token signing secret (32 bytes or more): turns on
    /// bearer auth with a token endpoint at `/token`.
    #[arg(long, env = "KEELSON_REGISTRY_TOKEN_SECRET", requires_all = ["htpasswd", "realm"])]
    token_secret: Option<PathBuf>,
    /// The token endpoint's URL as clients reach it (e.g. http://127.0.0.1:5000/token).
    #[arg(long, env = "KEELSON_REGISTRY_REALM")]
    realm: Option<String>,
    /// The `service` of tokens.
    #[arg(long, default_value = "keelson-registry")]
    service: String,
    /// TLS certificate chain (PEM); with --tls-key, serve HTTPS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Run garbage collection this often (0 to disable).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    gc_interval: Duration,
    /// Serve Prometheus metrics on this address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the distribution API.
    Serve(Box<ServeArgs>),
    /// Collect garbage once (offline: the server holds the store while it runs).
    Gc {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Verify every blob's bytes and every manifest link and tag; exit 1 if anything is wrong.
    Fsck {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Push an image from an OCI layout directory.
    Push {
        #[command(flatten)]
        remote: RemoteArgs,
        /// The OCI layout holding the image (its index.json entry named TAG, or its only one).
        #[arg(long)]
        oci_layout: PathBuf,
        /// Repositories to mount shared layers from (no bytes move for those).
        #[arg(long)]
        mount_from: Vec<String>,
        /// Where to push: REPOSITORY:TAG.
        image: String,
    },
    /// Pull an image into an OCI layout directory.
    Pull {
        #[command(flatten)]
        remote: RemoteArgs,
        /// What to pull: REPOSITORY:TAG or REPOSITORY@DIGEST.
        image: String,
        /// The OCI layout to write (created if needed).
        #[arg(long)]
        oci_layout: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct RemoteArgs {
    /// The registry's URL.
    #[arg(long, default_value = "http://127.0.0.1:5000", env = "KEELSON_REGISTRY_URL")]
    registry: String,
    /// A file whose first line is user:password.
    #[arg(long, env = "KEELSON_REGISTRY_CREDENTIALS_FILE")]
    credentials_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) for an HTTPS registry.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Blobs moved at once.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

impl RemoteArgs {
    fn client(&self) -> Result<Client, String> {
        // Credentials from a file, or KEELSON_REGISTRY_USER and KEELSON_REGISTRY_PASSWORD:
        // never a flag, which other users can read in the process list.
        let creds = match &self.credentials_file {
            Some(f) => Some(Credentials::from_file(f).map_err(|e| e.to_string())?),
            None => match (std::env::var("KEELSON_REGISTRY_USER"), std::env::var("KEELSON_REGISTRY_PASSWORD")) {
                (Ok(u), Ok(p)) => Some(Credentials::new(u, p)),
                _ => None,
            },
        };
        let mut config = ClientConfig::default();
        config.parallel = self.parallel.max(1);
        if let Some(ca) = &self.ca {
            config.ca_pem = Some(read(ca, "CA certificate")?);
        }
        Client::new(&self.registry, creds, config).map_err(|e| e.to_string())
    }
}

/// `repo:tag` or `repo@digest` into the repository and the reference.
fn split_image(image: &str) -> Result<(RepoName, String), String> {
    let (repo, reference) = match image.split_once('@') {
        Some((r, d)) => (r, d.to_owned()),
        None => match image.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, t.to_owned()),
            _ => (image, "latest".to_owned()),
        },
    };
    let repo: RepoName = repo.parse().map_err(|e: keelson_registry::Error| e.to_string())?;
    reference.parse::<keelson_registry::Reference>().map_err(|e| e.to_string())?;
    Ok((repo, reference))
}

/// Progress bars, one per blob, under one header line.
struct Bars {
    multi: indicatif::MultiProgress,
    bars: Mutex<HashMap<Digest, indicatif::ProgressBar>>,
}

impl Bars {
    fn new(quiet: bool) -> Bars {
        let multi = indicatif::MultiProgress::new();
        if quiet {
            multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        Bars { multi, bars: Mutex::default() }
    }
}

impl Progress for Bars {
    fn begin(&self, blob: &Digest, size: u64) {
        let bar = self.multi.add(indicatif::ProgressBar::new(size));
        let style = indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(blob.hex()[..12].to_owned());
        self.bars.lock().unwrap_or_else(|p| p.into_inner()).insert(*blob, bar);
    }

    fn advance(&self, blob: &Digest, bytes: u64) {
        if let Some(bar) = self.bars.lock().unwrap_or_else(|p| p.into_inner()).get(blob) {
            bar.inc(bytes);
        }
    }

    fn done(&self, blob: &Digest, skipped: bool) {
        let bar = self.bars.lock().unwrap_or_else(|p| p.into_inner()).remove(blob);
        match bar {
            Some(bar) => bar.finish(),
            None if skipped => {
                let _ = self.multi.println(format!("{} already there", &blob.hex()[..12]));
            }
            None => {}
        }
    }
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("reading {what} {}: {e}", path.display()))
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let ServeArgs { store, listen, htpasswd, acl, token_secret, realm, service, tls_cert, tls_key, gc_interval, metrics_listen } = args;
    let registry = Arc::new(store.open()?);
    let acl = match &acl {
        Some(p) => Acl::load(p).map_err(|e| e.to_string())?,
        None => Acl::allow_all(),
    };
    let auth = match (htpasswd, token_secret, realm) {
        (None, _, _) => Auth::None,
        (Some(h), None, _) => Auth::Basic { users: Htpasswd::load(&h).map_err(|e| e.to_string())?, acl },
        (Some(h), Some(secret), Some(realm)) => Auth::Bearer {
            users: Htpasswd::load(&h).map_err(|e| e.to_string())?,
            acl,
            tokens: Tokens::load(&secret, realm, service).map_err(|e| e.to_string())?,
        },
        (Some(_), Some(_), None) => return Err("--token-secret needs --realm".into()),
    };
    if matches!(auth, Auth::None) && !listen.ip().is_loopback() {
        tracing::warn!(%listen, "serving without authentication on a non-loopback address");
    }
    let mut config = ServerConfig::with_auth(auth);
    if let Some((cert, key)) = tls_cert.zip(tls_key) {
        config.tls = Some(
            keelson_registry::server::tls_config(&read(&cert, "TLS certificate")?, &read(&key, "TLS key")?).map_err(|e| e.to_string())?,
        );
    }
    let server = Server::new(registry.clone(), config);
    let readiness = keelson_examples::metrics_http::Readiness::new();
    if let Some(addr) = metrics_listen {
        let mut reg = prometheus_client::registry::Registry::default();
        server.metrics().register(&mut reg);
        keelson_examples::daemon::serve_ops("--metrics-listen", addr, reg, "registry", readiness.clone()).await?;
    }
    if !gc_interval.is_zero() {
        let registry = registry.clone();
        let metrics = server.metrics().clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(gc_interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                match registry.gc().await {
                    Ok(r) => {
                        metrics.observe_gc(&r);
                        tracing::info!(
                            removed = r.blobs_removed,
                            bytes = r.bytes_removed,
                            spared = r.blobs_spared,
                            uploads = r.uploads_removed,
                            deferred = r.deferred,
                            "gc"
                        )
                    }
                    Err(e) => tracing::warn!(error = %e, "gc failed"),
                }
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("binding {listen}: {e}"))?;
    tracing::info!(addr = %listener.local_addr().map_err(|e| e.to_string())?, "registry serving");
    let stop = keelson_examples::daemon::shutdown_signal()?;
    readiness.set_ready();
    let shutdown = async {
        let signal = stop.await;
        readiness.set_not_ready("draining");
        tracing::info!(?signal, "draining");
    };
    server.serve(listener, shutdown).await;
    Ok(())
}

async fn run(args: Args) -> Result<ExitCode, String> {
    match args.command {
        Command::Serve(args) => {
            serve(*args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc { store } => {
            // The metadata store admits one process: if this opened it, no server is
            // running, so no lease can be outstanding.
            let report = store.open()?.gc_offline().await.map_err(|e| e.to_string())?;
            println!(
                "removed {} blobs ({} bytes), spared {} young or leased, ended {} idle uploads, {} blobs seen",
                report.blobs_removed, report.bytes_removed, report.blobs_spared, report.uploads_removed, report.blobs_seen
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Push { remote, oci_layout, mount_from, image } => {
            let (repo, tag) = split_image(&image)?;
            let mount_from = mount_from.iter().map(|m| m.parse::<RepoName>().map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>()?;
            let bars = Bars::new(remote.quiet);
            let d = remote.client()?.push_oci_layout(&oci_layout, &repo, &tag, &mount_from, &bars).await.map_err(|e| e.to_string())?;
            println!("{repo}:{tag} {d}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Pull { remote, image, oci_layout } => {
            let (repo, reference) = split_image(&image)?;
            let bars = Bars::new(remote.quiet);
            let d = remote.client()?.pull_oci_layout(&repo, &reference, &oci_layout, &bars).await.map_err(|e| e.to_string())?;
            println!("{repo}:{reference} {d} -> {}", oci_layout.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Fsck { store } => {
            let registry = store.open()?;
            let report = registry.fsck().await.map_err(|e| e.to_string())?;
            for d in &report.corrupt {
                println!("corrupt blob {d}");
            }
            for m in &report.missing {
                println!("missing {m}");
            }
            for t in &report.dangling_tags {
                println!("dangling tag {t}");
            }
            println!("{} blobs checked, {}", report.blobs_checked, if report.is_clean() { "clean" } else { "PROBLEMS FOUND" });
            Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = keelson_examples::daemon::start("registry", |a: &Args| &a.daemon);
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("registry: {e}");
            ExitCode::from(2)
        }
    }
}
