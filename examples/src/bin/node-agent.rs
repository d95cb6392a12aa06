//! `node-agent`: one node of a keelson cluster. Joins the cluster state in etcd with a
//! heartbeat lease, runs the allocations and one-off runs assigned to this node on Docker
//! Engine, reports their status, and registers healthy services in the etcd catalog (where
//! `edge --etcd` routes to them). Every agent also runs the cluster controller (one acts
//! at a time, under a lock): deployments move forward and a lost node's work is re-placed
//! with no other process. Volumes are Docker named volumes; `--volume-listen` serves them
//! to other nodes (to move a stateful service, see `keelson_scheduler::fetch_volume`).
//!
//! ```text
//! node-agent --etcd http://127.0.0.1:2379 --node n1 --datacenter eu1 --label tier=edge --attr gpu=none
//! ```
//!
//! The agent describes its node for placement to match: `--datacenter`, `--pool`,
//! `--label k=v` (an operator's, `label.k`) and `--attr k=v` (`attr.k`), plus what it
//! detects (`keelson_scheduler::fingerprint`): cpu, memory and disk as the node's
//! resources (`--cpu`, `--memory`, `--disk` override them) and `attr.cpu.cores`,
//! `attr.memory.mb`, `attr.disk.mb`, `attr.kernel.name`, `attr.kernel.version`,
//! `attr.os.name`, `attr.os.version`, `attr.arch` (`--attr` overrides any of them).
//! The address services register at is `--address`, or else the IPv4 address of the
//! interface the default route leaves by: the one other hosts reach.
//!
//! Every flag is also `KEELSON_NODE_AGENT_<FLAG>` and a key of `--config FILE` (TOML);
//! `--metrics-listen` serves `/metrics`, `/healthz` and `/readyz`.
//!
//! With `--network bridge`, tasks get addresses of their own on a keelson bridge on this
//! host; with `--network overlay`, on a VXLAN overlay across every agent of the cluster
//! (each host leases a subnet of `--network-subnet` in etcd): services register at
//! their own address and port, and reach each other across hosts.
//!
//! Build with `--features etcd,docker`. SIGINT or SIGTERM stop the agent and leave its
//! tasks running: restarted with the same `--node` within `--ttl`, it adopts them and
//! nothing moves (an upgrade of the agent); if it stays away longer, the node is lost and
//! its work is re-placed by the controller of another agent. With `--drain-on-sigterm`
//! the agent first drains its node (the controller moves its allocations elsewhere and
//! this agent stops them), waits for that up to `--drain-timeout`, and then leaves the
//! cluster at once: for a host going away.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::{Discovery, KeyValue, KvDiscovery};
use keelson_scheduler::{
    ClusterStore, Controller, DockerDriver, Eligibility, Node, NodeAgent, OrchestrationMetrics, PortRange, VolumeManager,
};

#[derive(clap::Parser, Debug)]
#[command(version, about = "Run a keelson node: cluster state in etcd, tasks on Docker")]
struct Args {
    #[command(flatten)]
    etcd: keelson_examples::backends::EtcdArgs,
    /// This node's id.
    #[arg(long)]
    node: String,
    /// The address other hosts reach this node's services at (default: the IPv4 address
    /// of the interface the default route leaves by).
    #[arg(long)]
    address: Option<String>,
    /// The node's datacenter (`node.datacenter` in constraints).
    #[arg(long, default_value = "dc1")]
    datacenter: String,
    /// The node's pool (`node.pool`).
    #[arg(long, default_value = "default")]
    pool: String,
    /// An attribute, KEY=VALUE (`attr.KEY`; repeatable); overrides a detected one.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_pair)]
    attr: Vec<(String, String)>,
    /// A label, KEY=VALUE (`label.KEY`; repeatable).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_pair)]
    label: Vec<(String, String)>,
    /// CPU offered, in thousandths of a core (default: every core detected).
    #[arg(long)]
    cpu: Option<u64>,
    /// Memory offered, in MiB (default: the memory detected).
    #[arg(long)]
    memory: Option<u64>,
    /// Disk offered, in MiB (default: the size of --disk-path's filesystem).
    #[arg(long)]
    disk: Option<u64>,
    /// A path on the filesystem tasks' data lives on (for detecting the disk size).
    #[arg(long, default_value = "/var/lib/docker")]
    disk_path: std::path::PathBuf,
    /// Heartbeat lease TTL: the node is lost this long after the agent dies, and a
    /// controller that dies while leading is replaced this long after.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Time between syncs.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// On SIGTERM or SIGINT, drain the node before leaving (instead of leaving its tasks
    /// running for the agent's next start).
    #[arg(long)]
    drain_on_sigterm: bool,
    /// How long a drain on SIGTERM may take before the agent leaves anyway.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Root of the cluster state keys.
    #[arg(long, default_value = "keelson/cluster")]
    root: String,
    /// Host ports this node gives out to allocations, as FIRST-LAST.
    #[arg(long, value_parser = parse_ports)]
    ports: Option<PortRange>,
    /// Serve Prometheus metrics at http://<addr>/metrics.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Do not run the cluster controller in this agent.
    #[arg(long)]
    no_controller: bool,
    /// Serve this node's volumes to other nodes on this address (private network only).
    #[arg(long)]
    volume_listen: Option<std::net::SocketAddr>,
    /// A file holding the bearer token volume requests must carry (required with
    /// --volume-listen unless --volume-insecure-no-auth; read from a file so it stays out
    /// of `ps`).
    #[arg(long, env = "KEELSON_VOLUME_TOKEN_FILE")]
    volume_token_file: Option<std::path::PathBuf>,
    /// Serve volumes without a token: anyone who reaches --volume-listen reads every
    /// volume. Only for a network nothing else can reach.
    #[arg(long)]
    volume_insecure_no_auth: bool,
    /// Serve volumes over TLS with this certificate chain (PEM; with --volume-tls-key).
    #[arg(long, requires = "volume_tls_key")]
    volume_tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --volume-tls-cert.
    #[arg(long, requires = "volume_tls_cert")]
    volume_tls_key: Option<std::path::PathBuf>,
    /// The host address task ports are published on (default: --address when it is an
    /// IP address, else 127.0.0.1; never every interface).
    #[arg(long)]
    publish_address: Option<std::net::IpAddr>,
    /// Put tasks on a keelson network: `bridge` (this host) or `overlay` (VXLAN across
    /// every agent on the same etcd). Without it tasks use the engine's default network.
    #[arg(long, value_enum)]
    network: Option<NetworkKind>,
    /// The keelson network's name.
    #[arg(long, default_value = "keelson")]
    network_name: String,
    /// The bridge's subnet (default: a free 10.89.x.0/24), or the overlay's cluster CIDR
    /// (default 10.244.0.0/16; each host leases a /24 of it).
    #[arg(long)]
    network_subnet: Option<String>,
    /// Where netplumb keeps its state (a tmpfs: a reboot clears it with the containers).
    #[arg(long, default_value = "/run/keelson/netplumb")]
    network_state_dir: std::path::PathBuf,
    /// Where tasks' secret files go, a folder per task mounted read-only at /run/secrets
    /// (a tmpfs: a reboot clears them with the containers).
    #[arg(long, default_value = "/run/keelson/secrets")]
    secrets_dir: std::path::PathBuf,
    /// The address other hosts send this host's VXLAN packets to (default: --address).
    #[arg(long)]
    underlay_address: Option<std::net::Ipv4Addr>,
    /// Do not masquerade task traffic that leaves the network.
    #[arg(long)]
    no_masquerade: bool,
    /// The name server tasks on the network resolve with (repeatable), e.g. the
    /// `dns-catalog` serving the cluster's catalog at this host's address.
    #[arg(long)]
    network_dns: Vec<std::net::IpAddr>,
    /// Credentials for pulling from a private registry: `HOST[:PORT]=FILE`, where the
    /// file's first line is `user:password` (repeatable). Or set KEELSON_REGISTRY_HOST,
    /// KEELSON_REGISTRY_USER and KEELSON_REGISTRY_PASSWORD.
    #[arg(long, value_name = "HOST=FILE")]
    registry_auth: Vec<String>,
    /// Ship every task's output here, labelled with service (job.group), instance (task
    /// id), node and stream: a logd (http://host:7070/v1/push) or any logship sink URL.
    #[arg(long, env = "KEELSON_LOGS_TO")]
    logs_to: Option<String>,
    /// File holding the bearer token of --logs-to.
    #[arg(long, env = "KEELSON_LOGS_TOKEN_FILE")]
    logs_token_file: Option<std::path::PathBuf>,
    /// PEM file of the certificates an https:// or tls:// --logs-to is checked against.
    #[arg(long)]
    logs_ca: Option<std::path::PathBuf>,
    #[command(flatten)]
    daemon: keelson_examples::daemon::DaemonArgs,
}

/// KEY=VALUE of --attr and --label.
fn parse_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{text:?}: expected KEY=VALUE")),
    }
}

/// This node as the flags and the machine describe it, and the address it advertises.
fn describe_node(args: &Args) -> Result<(Node, String), String> {
    let facts = keelson_scheduler::fingerprint(&args.disk_path);
    let mut resources = facts.resources;
    resources.cpu_millis = args.cpu.unwrap_or(resources.cpu_millis);
    resources.memory_mb = args.memory.unwrap_or(resources.memory_mb);
    resources.disk_mb = args.disk.unwrap_or(resources.disk_mb);
    if resources.cpu_millis == 0 || resources.memory_mb == 0 {
        return Err(format!(
            "cpu {} and memory {} MiB: could not detect them; give --cpu and --memory",
            resources.cpu_millis, resources.memory_mb
        ));
    }
    let mut node = Node::new(args.node.clone(), resources);
    node.datacenter.clone_from(&args.datacenter);
    node.pool.clone_from(&args.pool);
    node.attributes = facts.attributes;
    node.attributes.extend(args.attr.iter().cloned());
    node.labels.extend(args.label.iter().cloned());
    if let Some(ports) = args.ports {
        node.dynamic_ports = ports;
    }
    let address = match &args.address {
        Some(a) => a.clone(),
        None => keelson_scheduler::default_route_address()
            .map_err(|e| format!("detecting the address (give --address): {e}"))?
            .ok_or("no default route with an IPv4 address to advertise: give --address")?
            .to_string(),
    };
    node.address = Some(address.clone());
    Ok((node, address))
}

/// The registry credentials of `--registry-auth` and the environment.
fn registry_auth(args: &Args) -> Result<Vec<keelson_scheduler::RegistryAuth>, String> {
    let mut out = Vec::new();
    for spec in &args.registry_auth {
        let (host, file) = spec.split_once('=').ok_or_else(|| format!("--registry-auth {spec:?}: expected HOST=FILE"))?;
        let text = std::fs::read_to_string(file).map_err(|e| format!("--registry-auth: reading {file}: {e}"))?;
        let (user, password) = text
            .lines()
            .next()
            .and_then(|l| l.split_once(':'))
            .ok_or_else(|| format!("--registry-auth: the first line of {file} must be user:password"))?;
        out.push(keelson_scheduler::RegistryAuth::new(host, user, password).map_err(|e| format!("--registry-auth: {e}"))?);
    }
    if let (Ok(host), Ok(user), Ok(password)) =
        (std::env::var("KEELSON_REGISTRY_HOST"), std::env::var("KEELSON_REGISTRY_USER"), std::env::var("KEELSON_REGISTRY_PASSWORD"))
    {
        out.push(keelson_scheduler::RegistryAuth::new(host, user, password).map_err(|e| format!("KEELSON_REGISTRY_HOST: {e}"))?);
    }
    Ok(out)
}

/// The longest a finished one-off run waits for its output to reach `--logs-to` before
/// its result is written anyway (saying so, and counted in
/// `keelson_runs_output_undelivered`).
const RUN_OUTPUT_DELIVERY_LIMIT: Duration = Duration::from_secs(60);

/// The shipper of task output that `--logs-to` asks for.
fn log_shipper(args: &Args, driver: Arc<DockerDriver>) -> Result<Option<keelson_scheduler::TaskLogShipper>, String> {
    let Some(url) = &args.logs_to else { return Ok(None) };
    let mut options = keelson_logship::SinkOptions::default();
    options.ca = args.logs_ca.clone();
    if let Some(path) = &args.logs_token_file {
        let token = std::fs::read_to_string(path).map_err(|e| format!("--logs-token-file {}: {e}", path.display()))?;
        options.bearer_token = Some(token.trim().to_owned());
    }
    let sink = keelson_logship::sink_from_url(url, &options).map_err(|e| format!("--logs-to: {e}"))?;
    Ok(Some(keelson_scheduler::TaskLogShipper::new(driver, sink, args.node.clone())))
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum NetworkKind {
    Bridge,
    Overlay,
}

/// The keelson network tasks go on, created (bridge) or joined (overlay) if needed.
async fn task_network(args: &Args, address: &str, kv: Arc<dyn KeyValue>) -> Result<Option<keelson_scheduler::TaskNetwork>, String> {
    use keelson_netplumb::{BridgeNetwork, KernelConfig, NetworkDriver, NetworkSpec, OverlayConfig, OverlayNetwork};
    let Some(kind) = args.network else { return Ok(None) };
    let bridge = BridgeNetwork::open(KernelConfig::in_dir(&args.network_state_dir)).map_err(|e| format!("--network-state-dir: {e}"))?;
    let mut spec = NetworkSpec::new(&args.network_name);
    spec.masquerade = !args.no_masquerade;
    let driver: Arc<dyn NetworkDriver> = match kind {
        NetworkKind::Bridge => {
            spec.subnet = args.network_subnet.clone();
            if bridge.network_spec(&args.network_name).map_err(|e| e.to_string())?.is_none() {
                bridge.create_network(spec).await.map_err(|e| format!("--network bridge: {e}"))?;
            }
            Arc::new(bridge)
        }
        NetworkKind::Overlay => {
            spec.subnet = Some(args.network_subnet.clone().unwrap_or_else(|| "10.244.0.0/16".into()));
            let underlay = match args.underlay_address {
                Some(a) => a,
                None => address.parse().map_err(|_| "--network overlay needs --underlay-address (or an IPv4 --address)".to_owned())?,
            };
            let overlay = OverlayNetwork::new(bridge, OverlayConfig::new(kv, &args.node, underlay)).map_err(|e| e.to_string())?;
            overlay.create_network(spec).await.map_err(|e| format!("--network overlay: {e}"))?;
            Arc::new(overlay)
        }
    };
    Ok(Some(keelson_scheduler::TaskNetwork::new(driver, &args.network_name).with_dns(args.network_dns.iter().copied())))
}

async fn run(args: Args) -> Result<(), String> {
    if !args.etcd.is_set() {
        return Err("--etcd (or KEELSON_ETCD_ENDPOINTS) is required".into());
    }
    if args.interval.is_zero() || args.ttl < Duration::from_secs(2) {
        return Err(format!(
            "--interval {} must be above 0 and --ttl {} at least 2s (etcd's shortest lease)",
            humantime::format_duration(args.interval),
            humantime::format_duration(args.ttl)
        ));
    }
    let (node, address) = describe_node(&args)?;
    let stop = keelson_examples::daemon::shutdown_signal()?;
    let kv: Arc<dyn KeyValue> = Arc::new(args.etcd.connect_waiting().await?);
    let store = ClusterStore::new(kv.clone(), args.root.clone());
    let publish = args.publish_address.or_else(|| address.parse().ok()).unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    let driver = DockerDriver::connect().await.map_err(|e| format!("docker: {e}"))?;
    let mut driver = driver.with_publish_address(publish).map_err(|e| format!("--publish-address: {e}"))?;
    for auth in registry_auth(&args)? {
        driver = driver.with_registry_auth(auth);
    }
    if let Some(net) = task_network(&args, &address, kv.clone()).await? {
        // Attachments of containers that are gone (the agent or host died) go first.
        let keep: Vec<String> =
            keelson_scheduler::Driver::list(&driver).await.map_err(|e| format!("docker: {e}"))?.into_iter().map(|t| t.id).collect();
        let collected = net.collect(&keep).await.map_err(|e| format!("--network: {e}"))?;
        println!("node-agent: tasks on keelson network {} ({collected} stale attachments collected)", net.name());
        driver = driver.with_network(net);
    }
    let driver = Arc::new(driver);
    let volumes: Arc<dyn VolumeManager> = Arc::new(driver.volumes());
    if let Some(addr) = args.volume_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("--volume-listen {addr}: {e}"))?;
        let mut server = keelson_scheduler::VolumeServer::new(volumes.clone());
        match (&args.volume_token_file, args.volume_insecure_no_auth) {
            (Some(path), _) => {
                let token = std::fs::read_to_string(path).map_err(|e| format!("--volume-token-file {}: {e}", path.display()))?;
                server = server.with_token(token.trim()).map_err(|e| format!("--volume-token-file {}: {e}", path.display()))?;
            }
            (None, true) => server = server.insecure_no_auth(),
            (None, false) => {
                return Err(
                    "--volume-listen needs --volume-token-file (or --volume-insecure-no-auth on a network nothing else reaches)".into()
                )
            }
        }
        if let (Some(cert), Some(key)) = (&args.volume_tls_cert, &args.volume_tls_key) {
            let chain = std::fs::read(cert).map_err(|e| format!("--volume-tls-cert {}: {e}", cert.display()))?;
            let key_pem = std::fs::read(key).map_err(|e| format!("--volume-tls-key {}: {e}", key.display()))?;
            let certs = keelson_routing::CertStore::new();
            certs.set_fallback(&chain, &key_pem).map_err(|e| format!("--volume-tls-cert/--volume-tls-key: {e}"))?;
            server = server.with_tls(certs.server_config());
        }
        tokio::spawn(async move {
            if let Err(e) = server.serve(listener, std::future::pending()).await {
                eprintln!("node-agent: volume server: {e}");
            }
        });
        println!("node-agent: serving volumes on {addr}");
    }
    let discovery: Arc<dyn Discovery> = Arc::new(KvDiscovery::new(kv));
    let membership = store.join(&node, args.ttl).await.map_err(|e| format!("joining: {e}"))?;
    let metrics = OrchestrationMetrics::new();
    let readiness = keelson_examples::metrics_http::Readiness::new();
    if let Some(addr) = args.metrics_listen {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        driver.register_metrics(&mut registry);
        keelson_examples::daemon::serve_ops("--metrics-listen", addr, registry, "node-agent", readiness.clone()).await?;
    }
    let log_shipping = log_shipper(&args, driver.clone())?;
    let mut agent = NodeAgent::new(args.node.clone(), store.clone(), driver, Some(discovery), address.clone())
        .with_volumes(volumes)
        .with_secret_files(keelson_scheduler::SecretFiles::new(&args.secrets_dir))
        .with_metrics(metrics.clone());
    if let Some(shipper) = &log_shipping {
        // A one-off run's result is written once its whole output is at --logs-to, so
        // whoever reads the result (testgrid, keelson-ctl result) finds every line there.
        agent = agent.with_output_shipping(shipper.shipped_outputs(), RUN_OUTPUT_DELIVERY_LIMIT);
    }
    let agent = Arc::new(agent);
    let interval = args.interval;
    if !args.no_controller {
        // The controller lock lives as long as a node lease: if this node dies while it
        // leads, another agent's controller takes over as soon as the node is lost.
        let controller = Controller::new(store.clone()).with_metrics(metrics).with_lock_ttl(args.ttl);
        tokio::spawn(async move { controller.run(interval, std::future::pending()).await });
    }
    if let Some(shipper) = log_shipping {
        tokio::spawn(shipper.run(interval, std::future::pending()));
        println!("node-agent: shipping task output to {}", args.logs_to.as_deref().unwrap_or_default());
    }
    readiness.set_ready();
    println!("node-agent: node {} joined at {address}", args.node);
    let (agent_stop, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let agent = agent.clone();
        tokio::spawn(async move {
            agent
                .run(interval, async {
                    let _ = agent_stopped.await;
                })
                .await
        })
    };
    let signal = stop.await;
    readiness.set_not_ready("stopping");
    tracing::info!(?signal, drain = args.drain_on_sigterm, "stopping");
    if !args.drain_on_sigterm {
        let _ = agent_stop.send(());
        running.await.map_err(|e| e.to_string())?;
        // The lease is left to expire: an agent back within --ttl finds its node and its
        // tasks as they were.
        drop(membership);
        println!("node-agent: node {} stopped; its tasks keep running for the next start", args.node);
        return Ok(());
    }
    // The agent keeps running while draining: it stops what the controller moves away.
    store.set_eligibility(&args.node, Eligibility::Draining).await.map_err(|e| format!("draining: {e}"))?;
    let drained = tokio::time::timeout(args.drain_timeout, async {
        loop {
            match store.allocations_on(&args.node).await {
                Ok(left) if left.is_empty() => return,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reading this node's allocations while draining"),
            }
            tokio::time::sleep(interval).await;
        }
    })
    .await;
    let _ = agent_stop.send(());
    running.await.map_err(|e| e.to_string())?;
    membership.leave().await.map_err(|e| format!("leaving: {e}"))?;
    // Gone now (nothing can be placed here), so its next start takes work again.
    store.set_eligibility(&args.node, Eligibility::Eligible).await.map_err(|e| format!("after draining: {e}"))?;
    match drained {
        Ok(()) => println!("node-agent: node {} drained and left", args.node),
        Err(_) => println!("node-agent: node {} left with work still on it after --drain-timeout", args.node),
    }
    Ok(())
}

fn parse_ports(text: &str) -> Result<PortRange, String> {
    let (first, last) = text.split_once('-').ok_or("expected FIRST-LAST, e.g. 21000-21999")?;
    let (start, end) =
        (first.parse::<u16>().map_err(|e| format!("{first}: {e}"))?, last.parse::<u16>().map_err(|e| format!("{last}: {e}"))?);
    if start == 0 || start > end {
        return Err(format!("{text}: FIRST must be 1 or more and not above LAST"));
    }
    Ok(PortRange { start, end })
}

fn main() -> ExitCode {
    let args = keelson_examples::daemon::start("node-agent", |a: &Args| &a.daemon);
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("node-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("node-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
