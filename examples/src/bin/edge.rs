//! `edge`: the keelson reverse proxy as a program.
//!
//! ```text
//! edge --routes routes.json --listen 127.0.0.1:8080 --metrics-listen 127.0.0.1:9100
//! curl -H 'Host: app.example' http://127.0.0.1:8080/
//! kill -HUP $(pidof edge)     # re-read routes.json; connections are not dropped
//! curl http://127.0.0.1:9100/metrics
//! ```
//!
//! With `--etcd http://127.0.0.1:2379` (build with `--features etcd`) it also follows
//! the keelson catalog in etcd: instances tagged `keelson.http.host=<host>` become
//! endpoints of that host, updated as they register, fail health checks or go away.
//! Hosts from the file and from the catalog must not overlap. `--consul
//! http://127.0.0.1:8500` (build with `--features consul`) follows Consul's catalog the
//! same way, through blocking queries. Either way `/metrics` then includes
//! `keelson_route_source_stale`, 1 while the catalog is unreachable and the last good
//! routes are served.
//!
//! `routes.json` is a keelson-routing routes file:
//! `{"routes": [{"host": "app.example", "endpoints": [{"id": "a", "addr": "127.0.0.1:9000"}]}]}`;
//! a route may add `"path": "/api"` (longest prefix wins), `"balancer"` and
//! `"upstream": "h2c"`, and `host` may be a `*.example` wildcard.
//! On SIGHUP, and within `--routes-poll` (1s) of the file changing, the file is read
//! again and only the difference is applied (`keelson_routing::RoutesFileSource`); a file
//! that no longer parses is reported and the routes in force are kept. SIGINT or SIGTERM stop
//! accepting and drain in-flight requests.
//!
//! TCP: a `"tcp"` section in the routes file, `[{"listen": "127.0.0.1:5432", "sni":
//! "db.example", "endpoints": [...]}]`, opens each listen address; connections go by TLS
//! server name without decrypting (SNI passthrough), or to the entry without `sni`.
//! SIGHUP updates endpoints and names; a new listen address needs a restart.
//!
//! Scaling: `--workers N` serves the HTTP listener from N single-thread runtimes, each
//! with its own SO_REUSEPORT socket and upstream pools (one per core), sharing routes and
//! metrics.
//!
//! TLS: `--tls-listen 127.0.0.1:8443 --cert app.example=chain.pem,key.pem` (repeatable;
//! the name may be `*.example` or `default`, the certificate for clients naming no known
//! host). SIGHUP re-reads the certificate files too: new handshakes get the new
//! certificate, open connections keep theirs, and a file that no longer loads leaves the
//! previous certificate in place. Clients speak HTTP/1.1 or HTTP/2 on either listener.
//! `--cert-dir DIR` adds every `<name>.crt` with its `<name>.key` there (read at start
//! and on SIGHUP, so a platform can add a name's certificate while edge runs).
//!
//! ACME: `--acme-directory https://acme-v02.api.letsencrypt.org/directory --acme-domain
//! shop.example --tls-listen 0.0.0.0:443 --listen 0.0.0.0:80` gets a certificate for each
//! `--acme-domain` from the CA once the listeners are up, answering its HTTP-01
//! challenges on `--listen`; keeps the account and certificates in `--acme-state`
//! (`edge-acme`, files mode 0600), reuses them across restarts and renews them 30 days
//! before they expire. `--acme-ca-file` trusts a private CA's HTTPS (a test CA).
//! `--acme-routed-domain apps.example.com` gets one for every routed host under that
//! domain as its route appears (from the catalog or the routes file); hosts outside every
//! such domain are never sent to the CA.
//!
//! Configuration: every flag is also `KEELSON_EDGE_<FLAG>` (`KEELSON_EDGE_LISTEN`) and a
//! key of the TOML file given with `--config` (`listen = "127.0.0.1:8080"`); flags win
//! over the environment, the environment over the file. Every flag is checked (and every
//! certificate loaded) before the first listener opens. `/healthz` and `/readyz` answer
//! beside `/metrics`; `/readyz` turns 503 as soon as a drain starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use keelson_routing::{MemoryRouter, Proxy, ProxyConfig, Router, RoutesFileSource};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{signal, SignalKind};

#[derive(clap::Parser, Debug)]
#[command(version, about = "Serve HTTP routes from a routes file through the keelson proxy")]
struct Args {
    /// Routes file (JSON); re-read on SIGHUP and when it changes.
    #[arg(long, required_unless_present_any = ["etcd", "consul"])]
    routes: Option<PathBuf>,
    /// How often the routes file is checked for changes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    routes_poll: Duration,
    /// etcd (`--etcd` and its TLS and credential flags): follow the keelson catalog
    /// stored there.
    #[command(flatten)]
    etcd: keelson_examples::backends::EtcdArgs,
    /// With --etcd or --consul: serve catalog instances tagged `keelson.tcp.port=<port>`
    /// (and optionally `keelson.sni=<name>`) on this address, opening each port as it
    /// first appears.
    #[arg(long)]
    tcp_bind: Option<std::net::IpAddr>,
    /// Copy TCP bytes through user space instead of splice(2) (for comparison).
    #[arg(long)]
    tcp_copy: bool,
    /// Consul (`--consul` URL and its TLS and token flags): follow the service catalog
    /// there.
    #[command(flatten)]
    consul: keelson_examples::backends::ConsulArgs,
    /// Proxy listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// TLS listen address (needs --cert, --cert-dir or --acme-domain).
    #[arg(long)]
    tls_listen: Option<SocketAddr>,
    /// A certificate: NAME=CHAIN_PEM,KEY_PEM, NAME an exact host, `*.parent` or `default`.
    #[arg(long)]
    cert: Vec<String>,
    /// A folder of certificates: `<name>.crt` (chain, PEM) with `<name>.key`, for host
    /// `<name>`; read at start and again on SIGHUP.
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// Active health checks of every HTTP endpoint: `tcp` or `http:/path` (2xx/3xx
    /// passes). Two failures in a row take an endpoint out, two passes bring it back.
    #[arg(long)]
    health_check: Option<String>,
    /// Time between health checks.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    health_interval: Duration,
    /// Append one JSON line per request to this file.
    #[arg(long)]
    access_log: Option<PathBuf>,
    /// Serve Prometheus metrics at http://<addr>/metrics, and /healthz and /readyz.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Worker threads (default: one per available core). 1 runs everything on a single
    /// thread, which is the fastest setup for a proxy pinned to one core.
    #[arg(long)]
    threads: Option<usize>,
    /// Runtimes serving the HTTP listener, each a single thread with its own socket on
    /// the same address (SO_REUSEPORT; the kernel spreads connections) and its own
    /// upstream pools: one per core scales without sharing. Default 1.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Upstream answer timeout, counted once the request was sent whole.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    upstream_timeout: Duration,
    /// Longest pause inside a request or response body, and longest a client may leave
    /// its response unread; past it the connection is cut.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    body_idle_timeout: Duration,
    /// A clear-text HTTP/1 connection quiet this long is parked: its HTTP buffers are
    /// dropped until the client's next request. `0s` keeps every connection's buffers.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    park_idle_after: Duration,
    #[command(flatten)]
    daemon: keelson_examples::daemon::DaemonArgs,
    #[command(flatten)]
    acme: AcmeArgs,
}

/// Certificates from an ACME CA, validated over HTTP-01 on `--listen` (which must be
/// what the names' port 80 reaches).
#[derive(clap::Args, Debug)]
struct AcmeArgs {
    /// The CA's directory URL (`https://acme-v02.api.letsencrypt.org/directory`).
    #[arg(long)]
    acme_directory: Option<String>,
    /// A name to get a certificate for (repeatable: each gets its own).
    #[arg(long, requires = "acme_directory")]
    acme_domain: Vec<String>,
    /// Get a certificate for every routed host under this domain as its route appears
    /// (`apps.example.com` covers `shop.apps.example.com`; repeatable). Names outside
    /// every such domain are never sent to the CA.
    #[arg(long, requires = "acme_directory")]
    acme_routed_domain: Vec<String>,
    /// Where the account key and the certificates are kept.
    #[arg(long, default_value = "edge-acme")]
    acme_state: PathBuf,
    /// A PEM root the CA's own HTTPS certificate chains to (a private or test CA).
    #[arg(long)]
    acme_ca_file: Option<PathBuf>,
    /// The account's contact (`mailto:ops@example.com`; repeatable).
    #[arg(long)]
    acme_contact: Vec<String>,
}

/// What the flags ask for, checked whole before anything starts serving.
struct Checked {
    certs: Vec<CertSpec>,
    probe: Option<keelson_routing::ActiveProbe>,
}

fn check(args: &Args) -> Result<Checked, String> {
    if args.workers == 0 {
        return Err("--workers must be at least 1".into());
    }
    if args.threads == Some(0) {
        return Err("--threads must be at least 1".into());
    }
    if args.etcd.is_set() && args.consul.address.is_some() {
        return Err("--etcd and --consul are two catalogs: follow one".into());
    }
    for (flag, value) in [
        ("--routes-poll", args.routes_poll),
        ("--health-interval", args.health_interval),
        ("--upstream-timeout", args.upstream_timeout),
        ("--body-idle-timeout", args.body_idle_timeout),
    ] {
        if value.is_zero() {
            return Err(format!("{flag} must be longer than 0s"));
        }
    }
    let probe = match args.health_check.as_deref() {
        None => None,
        Some("tcp") => Some(keelson_routing::ActiveProbe::Tcp),
        Some(other) => match other.strip_prefix("http:") {
            Some(path) => Some(keelson_routing::ActiveProbe::Http { path: path.to_owned() }),
            None => return Err(format!("--health-check {other:?}: expected tcp or http:/path")),
        },
    };
    let certs = args.cert.iter().map(|s| parse_cert_spec(s)).collect::<Result<Vec<_>, _>>()?;
    let acme_names = !args.acme.acme_domain.is_empty() || !args.acme.acme_routed_domain.is_empty();
    if args.tls_listen.is_some() && certs.is_empty() && args.cert_dir.is_none() && !acme_names {
        return Err("--tls-listen needs a certificate: --cert, --cert-dir, --acme-domain or --acme-routed-domain".into());
    }
    if args.acme.acme_directory.is_some() && !acme_names {
        return Err("--acme-directory needs names: --acme-domain or --acme-routed-domain".into());
    }
    Ok(Checked { certs, probe })
}

/// A listening socket on `addr`; with `shared`, SO_REUSEPORT lets other sockets bind
/// the same address, each getting its share of connections from the kernel.
fn bind_shared(addr: SocketAddr, shared: bool) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    if shared {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// One `--cert` argument.
#[derive(Debug, Clone)]
struct CertSpec {
    name: String,
    chain: PathBuf,
    key: PathBuf,
}

fn parse_cert_spec(spec: &str) -> Result<CertSpec, String> {
    let bad = || format!("--cert {spec:?}: expected NAME=CHAIN_PEM,KEY_PEM");
    let (name, files) = spec.split_once('=').ok_or_else(bad)?;
    let (chain, key) = files.split_once(',').ok_or_else(bad)?;
    if name.is_empty() || chain.is_empty() || key.is_empty() {
        return Err(bad());
    }
    Ok(CertSpec { name: name.to_owned(), chain: chain.into(), key: key.into() })
}

/// `--cert` specs and, with `--cert-dir`, one per `<name>.crt` there with its `.key`.
fn cert_specs(fixed: &[CertSpec], dir: Option<&Path>) -> Result<Vec<CertSpec>, String> {
    let mut specs = fixed.to_vec();
    let Some(dir) = dir else { return Ok(specs) };
    let entries = std::fs::read_dir(dir).map_err(|e| format!("--cert-dir {}: {e}", dir.display()))?;
    let mut found: Vec<CertSpec> = entries
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let name = path.file_name()?.to_str()?.strip_suffix(".crt")?.to_owned();
            let key = dir.join(format!("{name}.key"));
            Some(CertSpec { name, chain: path, key })
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    specs.extend(found);
    Ok(specs)
}

/// Reads every certificate and installs it; the first failure is returned, and a
/// certificate that fails leaves the one in force for its name untouched.
fn load_certs(specs: &[CertSpec], store: &keelson_routing::CertStore) -> Result<(), String> {
    let mut first_error = None;
    for spec in specs {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("certificate {}: {}: {e}", spec.name, p.display()));
        let result = read(&spec.chain).and_then(|chain| {
            let key = read(&spec.key)?;
            let set = if spec.name == "default" { store.set_fallback(&chain, &key) } else { store.set(&spec.name, &chain, &key) };
            set.map_err(|e| e.to_string())
        });
        if let Err(e) = result {
            tracing::error!(error = %e, "certificate not loaded; keeping the one in force");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The TCP proxy's settings from the flags.
fn tcp_config(args: &Args) -> keelson_routing::TcpProxyConfig {
    let mut config = keelson_routing::TcpProxyConfig::default();
    config.zero_copy = !args.tcp_copy;
    config
}

/// Follows a catalog in etcd or Consul, if asked to. Returns whether one is followed.
async fn follow_catalog(args: &Args, router: Arc<MemoryRouter>, status: keelson_routing::SourceStatus) -> Result<bool, String> {
    let discovery: Arc<dyn keelson_discovery::Discovery> = if args.etcd.is_set() {
        etcd_catalog(&args.etcd).await?
    } else if args.consul.address.is_some() {
        consul_catalog(&args.consul)?
    } else {
        return Ok(false);
    };
    // The followers run for the life of the process and resume after backend errors.
    if let Some(ip) = args.tcp_bind {
        let config = tcp_config(args);
        keelson_routing::follow_discovery_tcp(discovery.clone(), ip, config, status.clone()).await.map_err(|e| e.to_string())?;
    }
    keelson_routing::follow_discovery_with(discovery, router, status).await.map_err(|e| e.to_string())?;
    Ok(true)
}

#[cfg(feature = "etcd")]
async fn etcd_catalog(etcd: &keelson_examples::backends::EtcdArgs) -> Result<Arc<dyn keelson_discovery::Discovery>, String> {
    let kv = etcd.connect_waiting().await?;
    Ok(Arc::new(keelson_discovery::KvDiscovery::new(Arc::new(kv))))
}

#[cfg(not(feature = "etcd"))]
async fn etcd_catalog(_: &keelson_examples::backends::EtcdArgs) -> Result<Arc<dyn keelson_discovery::Discovery>, String> {
    Err("this build has no etcd support: rebuild with `--features etcd` (needs protoc: apt-get install -y protobuf-compiler)".into())
}

#[cfg(feature = "consul")]
fn consul_catalog(consul: &keelson_examples::backends::ConsulArgs) -> Result<Arc<dyn keelson_discovery::Discovery>, String> {
    let config = consul.config()?.ok_or("--consul is required")?;
    let consul = keelson_discovery::ConsulDiscovery::new(config).map_err(|e| format!("consul: {e}"))?;
    Ok(Arc::new(consul))
}

#[cfg(not(feature = "consul"))]
fn consul_catalog(_: &keelson_examples::backends::ConsulArgs) -> Result<Arc<dyn keelson_discovery::Discovery>, String> {
    Err("this build has no Consul support: rebuild with `--features consul`".into())
}

async fn run(args: Args) -> Result<(), String> {
    let Checked { certs: fixed, probe } = check(&args)?;
    let certs = keelson_routing::CertStore::new();
    load_certs(&cert_specs(&fixed, args.cert_dir.as_deref())?, &certs)?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut stop_signal = std::pin::pin!(keelson_examples::daemon::shutdown_signal()?);
    let router = Arc::new(MemoryRouter::new());
    // The routes file, installed and then kept installed (SIGHUP, or the file changing).
    let mut tcp_routers = BTreeMap::new();
    let _file_watch = match &args.routes {
        None => None,
        Some(path) => {
            let source = RoutesFileSource::open(path, router.clone()).await.map_err(|e| e.to_string())?;
            tcp_routers = source.tcp_routers().clone();
            Some(source.watch(args.routes_poll).map_err(|e| e.to_string())?)
        }
    };
    let _checks = match probe {
        None => None,
        Some(probe) => {
            let interval = args.health_interval;
            let mut config = keelson_routing::CheckConfig::default();
            config.interval = interval;
            config.timeout = interval.min(Duration::from_secs(1));
            (config.rise, config.fall) = (2, 2);
            Some(keelson_routing::spawn_active_health(router.clone(), probe, config).map_err(|e| e.to_string())?)
        }
    };
    let source_status = keelson_routing::SourceStatus::new();
    let following = follow_catalog(&args, router.clone(), source_status.clone()).await?;
    let mut config = ProxyConfig::default();
    config.upstream_timeout = args.upstream_timeout;
    config.body_idle_timeout = args.body_idle_timeout;
    config.park_idle_after = (!args.park_idle_after.is_zero()).then_some(args.park_idle_after);
    // With ACME, the CA's HTTP-01 challenges are answered on every HTTP listener (a hook
    // only then: it would cost every request a call).
    let challenges = args.acme.acme_directory.is_some().then(|| Arc::new(keelson_routing::acme::Http01Challenges::default()));
    let with_challenges = |proxy: Proxy| match &challenges {
        Some(c) => proxy.with_hooks(c.clone()),
        None => proxy,
    };
    let mut proxy = with_challenges(Proxy::new(router.clone(), config.clone()));
    let mut access_log = None;
    if let Some(path) = &args.access_log {
        let (log, _writer) = keelson_routing::AccessLog::to_file(path, 65_536).await.map_err(|e| e.to_string())?;
        proxy = proxy.with_access_log(log.clone());
        access_log = Some(log);
    }
    let proxy = Arc::new(proxy);
    let readiness = keelson_examples::metrics_http::Readiness::new();
    if let Some(addr) = args.metrics_listen {
        let mut registry = Registry::default();
        proxy.register_metrics(&mut registry);
        if following {
            source_status.register(&mut registry);
        }
        keelson_examples::daemon::serve_ops("--metrics-listen", addr, registry, "edge", readiness.clone()).await?;
    }
    let listener = bind_shared(args.listen, args.workers > 1).map_err(|e| format!("listen {}: {e}", args.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut servers = vec![tokio::spawn(proxy.clone().serve(listener, until_stopped(stopped.clone())))];
    let mut workers = Vec::new();
    for n in 1..args.workers {
        let mut worker = with_challenges(Proxy::new(router.clone(), config.clone()).with_metrics_of(&proxy));
        if let Some(log) = &access_log {
            worker = worker.with_access_log(log.clone());
        }
        let stop = until_stopped(stopped.clone());
        let thread = std::thread::Builder::new().name(format!("edge-worker-{n}")).spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let listener = bind_shared(local, true).map_err(|e| format!("worker {n} listen {local}: {e}"))?;
                Arc::new(worker).serve(listener, stop).await;
                Ok::<(), String>(())
            })
        });
        workers.push(thread.map_err(|e| format!("starting worker {n}: {e}"))?);
    }
    let mut tls_local = None;
    if let Some(addr) = args.tls_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("listen {addr}: {e}"))?;
        tls_local = Some(listener.local_addr().map_err(|e| e.to_string())?);
        servers.push(tokio::spawn(proxy.clone().serve_tls(listener, certs.clone(), until_stopped(stopped.clone()))));
    }
    let mut tcp_local = Vec::new();
    for (addr, tcp_router) in &tcp_routers {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("TCP listen {addr}: {e}"))?;
        tcp_local.push(listener.local_addr().map_err(|e| e.to_string())?);
        let tcp = Arc::new(keelson_routing::TcpProxy::new(tcp_router.clone(), tcp_config(&args)));
        servers.push(tokio::spawn(tcp.serve(listener, until_stopped(stopped.clone()))));
    }
    // Printed once every listener is up, so a supervisor can wait for this line.
    readiness.set_ready();
    println!("edge serving {} routes on {local}", router.snapshot().len());
    if let Some(tls_local) = tls_local {
        println!("edge serving TLS for {:?} on {tls_local}", certs.names());
    }
    for addr in tcp_local {
        println!("edge serving TCP on {addr}");
    }
    // Once the listeners answer the CA's challenges: stored certificates, or new ones,
    // then renewals twice a day.
    let _acme = args.acme.acme_directory.as_ref().zip(challenges.as_ref()).map(|(directory, challenges)| {
        let mut config = keelson_routing::acme::AcmeConfig::new(directory.clone(), args.acme.acme_state.clone());
        config.ca_file.clone_from(&args.acme.acme_ca_file);
        config.contact.clone_from(&args.acme.acme_contact);
        let issuer = Arc::new(keelson_routing::acme::AcmeIssuer::new(config, challenges.clone(), certs.clone()));
        let sets: Vec<Vec<String>> = args.acme.acme_domain.iter().map(|d| vec![d.clone()]).collect();
        if !args.acme.acme_routed_domain.is_empty() {
            let follow = issuer.clone().follow_routes(
                router.clone(),
                args.acme.acme_routed_domain.clone(),
                Duration::from_secs(1),
                Duration::from_secs(12 * 3600),
                until_stopped(stopped.clone()),
            );
            tokio::spawn(follow);
        }
        tokio::spawn(issuer.run(sets, Duration::from_secs(12 * 3600), until_stopped(stopped.clone())))
    });
    loop {
        tokio::select! {
            // The routes file reloads itself on SIGHUP; the certificates are read here.
            _ = hup.recv() => {
                match cert_specs(&fixed, args.cert_dir.as_deref()) {
                    Ok(specs) => {
                        if load_certs(&specs, &certs).is_ok() && !specs.is_empty() {
                            tracing::info!(names = ?certs.names(), "certificates reloaded");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "certificates not reloaded; keeping those in force"),
                }
            }
            signal = &mut stop_signal => {
                tracing::info!(?signal, "draining");
                break;
            }
        }
    }
    readiness.set_not_ready("draining");
    let _ = stop.send(true);
    for server in servers {
        server.await.map_err(|e| e.to_string())?;
    }
    for worker in workers {
        worker.join().map_err(|_| "a worker panicked".to_owned())??;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = keelson_examples::daemon::start("edge", |a: &Args| &a.daemon);
    let runtime = match args.threads {
        Some(0) => Err(std::io::Error::other("--threads must be at least 1")),
        Some(1) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
        None => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    };
    let result = match runtime {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => Err(format!("starting the runtime: {e}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge: {e}");
            ExitCode::FAILURE
        }
    }
}
