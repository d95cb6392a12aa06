//! The `minipaas demo` wiring: every keelson building block on its embedded default.
//!
//! the scheduler (PlacementEngine) places the replicas on this machine, netplumb (HostNetwork) gives
//! them an address, the ProcessDriver runs them, discovery (in memory) registers them with
//! HTTP health checks, the router follows discovery and the proxy serves it, and logship
//! ships each replica's output to `<data-dir>/logs/<service>.log`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keelson_discovery::health::{CheckConfig, HealthChecker, Probe};
use keelson_discovery::{Discovery, Health, MemoryDiscovery, Query, Registration, RegistrationHandle, ServiceName};
use keelson_logship::{FileSink, Record, ShipConfig, Sink, StreamSource};
use keelson_netplumb::{EndpointSpec, HostNetwork, NetworkDriver, NetworkSpec};
use keelson_routing::{follow_discovery, MemoryRouter, Proxy, ProxyConfig, HTTP_HOST_TAG};
use keelson_scheduler::{
    ClusterSnapshot, Driver, Job, Node, OutputStream, PlacementEngine, ProcessDriver, Resources, Scheduler, TaskGroup, TaskSpec,
};
use tokio::task::JoinHandle;

/// The service the demo runs.
pub const SERVICE: &str = "hello";
/// The host the router serves it as.
pub const HOST: &str = "hello.localhost";

/// Demo settings.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Where the router listens (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// Where logs go (default `./minipaas-data`).
    pub data_dir: PathBuf,
    /// How many replicas (default 3).
    pub replicas: u32,
    /// The program to run for each replica, with arguments before `--id ID --port PORT`.
    pub hello_command: Vec<String>,
    /// How long to wait for every replica to pass its health check (default 30 s).
    pub ready_timeout: Duration,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("minipaas-data"),
            replicas: 3,
            hello_command: vec!["hello".into()],
            ready_timeout: Duration::from_secs(30),
        }
    }
}

/// Why the demo could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Placement failed or did not place every replica.
    #[error("scheduling: {0}")]
    Schedule(String),
    /// Starting or stopping a replica failed.
    #[error("driver: {0}")]
    Driver(#[from] keelson_scheduler::Error),
    /// Discovery failed.
    #[error("discovery: {0}")]
    Discovery(#[from] keelson_discovery::Error),
    /// Routing failed.
    #[error("routing: {0}")]
    Routing(#[from] keelson_routing::Error),
    /// Networking failed.
    #[error("network: {0}")]
    Network(#[from] keelson_netplumb::Error),
    /// Log shipping failed.
    #[error("logs: {0}")]
    Logs(#[from] keelson_logship::Error),
    /// A socket could not be bound.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Replicas did not become healthy in time.
    #[error("only {healthy} of {wanted} replicas healthy after {after:?}; see {logs}")]
    NotReady {
        /// Healthy replicas.
        healthy: usize,
        /// Wanted replicas.
        wanted: u32,
        /// How long we waited.
        after: Duration,
        /// Where the logs are.
        logs: String,
    },
}

struct Replica {
    task: String,
    registration: RegistrationHandle,
    _check: HealthChecker,
    shipper: JoinHandle<()>,
}

/// A running demo.
pub struct Demo {
    listen: SocketAddr,
    driver: Arc<ProcessDriver>,
    network: HostNetwork,
    sink: Arc<FileSink>,
    replicas: Vec<Replica>,
    follower: JoinHandle<()>,
    proxy_stop: tokio::sync::oneshot::Sender<()>,
    proxy: JoinHandle<()>,
}

impl std::fmt::Debug for Demo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demo").field("listen", &self.listen).field("replicas", &self.replicas.len()).finish_non_exhaustive()
    }
}

/// This machine as a one-node cluster.
fn local_node() -> Node {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let mem_mb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(1024, |kb| kb / 1024);
    Node::new("local", Resources::new(cpus * 1000, mem_mb)).with_attribute("kernel.name", std::env::consts::OS)
}

fn free_port() -> Result<u16, DemoError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| DemoError::Io { context: "finding a free port".into(), source })?;
    l.local_addr().map(|a| a.port()).map_err(|source| DemoError::Io { context: "finding a free port".into(), source })
}

impl Demo {
    /// Starts everything and returns once every replica is healthy and routed.
    pub async fn start(config: DemoConfig) -> Result<Demo, DemoError> {
        let service = ServiceName::new(SERVICE)?;
        let discovery: Arc<dyn Discovery> = Arc::new(MemoryDiscovery::memory());
        let driver = Arc::new(ProcessDriver::new());
        let network = HostNetwork::new();
        network.create_network(NetworkSpec::new("minipaas")).await?;
        let sink = Arc::new(FileSink::new(config.data_dir.join("logs"))?);
        let router = Arc::new(MemoryRouter::new());
        let follower = follow_discovery(discovery.clone(), router.clone()).await?;

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| DemoError::Io { context: format!("binding the router to {}", config.listen), source })?;
        let listen = listener.local_addr().map_err(|source| DemoError::Io { context: "router address".into(), source })?;
        let (proxy_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let proxy = tokio::spawn(Arc::new(Proxy::new(router, ProxyConfig::default())).serve(listener, async move {
            let _ = stopped.await;
        }));

        let cluster = ClusterSnapshot { nodes: vec![local_node()], ..ClusterSnapshot::default() };
        let job = Job::new("minipaas-demo", vec![TaskGroup::new(SERVICE, config.replicas, Resources::new(100, 64))]);
        let plan = PlacementEngine::new().plan(&cluster, &job).map_err(|e| DemoError::Schedule(e.to_string()))?;
        if let Some(u) = plan.unplaced.first() {
            return Err(DemoError::Schedule(format!("{} replicas did not fit: {}", u.count, u.explanation)));
        }

        let mut demo = Demo { listen, driver, network, sink, replicas: Vec::new(), follower, proxy_stop, proxy };
        for placement in &plan.placements {
            let id = format!("{SERVICE}-{}", placement.index + 1);
            match demo.start_replica(&config, &discovery, &service, &id, &placement.node).await {
                Ok(r) => demo.replicas.push(r),
                Err(e) => {
                    let _ = demo.shutdown().await;
                    return Err(e);
                }
            }
        }
        if let Err(e) = wait_healthy(&*discovery, &service, config.replicas, config.ready_timeout, &config.data_dir).await {
            let _ = demo.shutdown().await;
            return Err(e);
        }
        Ok(demo)
    }

    async fn start_replica(
        &self,
        config: &DemoConfig,
        discovery: &Arc<dyn Discovery>,
        service: &ServiceName,
        id: &str,
        node: &str,
    ) -> Result<Replica, DemoError> {
        let endpoint = self.network.attach(EndpointSpec::new("minipaas", id)).await?;
        let ip = endpoint.addresses.iter().copied().find(IpAddr::is_loopback).unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let port = free_port()?;
        let mut command = config.hello_command.clone();
        command.extend(["--id".into(), id.into(), "--port".into(), port.to_string()]);
        let spec = TaskSpec::new(id, command).with_label("keelson.service", SERVICE).with_label("keelson.node", node);
        self.driver.start(spec).await?;
        let shipper = self.ship_logs(id).await?;
        let registration = discovery
            .register(
                Registration::new(service.clone(), id, ip.to_string(), port)
                    .with_tag(format!("{HTTP_HOST_TAG}={HOST}"))
                    .with_meta("node", node)
                    // Not routable until the first health check passes.
                    .with_initial_health(Health::Critical),
            )
            .await?;
        let check = CheckConfig { interval: Duration::from_millis(500), timeout: Duration::from_secs(1), rise: 1, fall: 2 };
        let probe = Probe::Http { addr: SocketAddr::new(ip, port), path: "/health".into() };
        let check = HealthChecker::spawn(discovery.clone(), service.clone(), id.to_owned(), probe, check)?;
        tracing::info!(replica = id, %ip, port, node, "replica started");
        Ok(Replica { task: id.to_owned(), registration, _check: check, shipper })
    }

    async fn ship_logs(&self, id: &str) -> Result<JoinHandle<()>, DemoError> {
        let instance = id.to_owned();
        let lines = self.driver.output(id).await?.map(move |l| Record {
            timestamp: l.timestamp,
            service: SERVICE.to_owned(),
            instance: instance.clone(),
            stream: match l.stream {
                OutputStream::Stdout => keelson_logship::Stream::Stdout,
                OutputStream::Stderr => keelson_logship::Stream::Stderr,
            },
            line: l.line,
            partial: l.partial,
        });
        let sink = self.sink.clone();
        let replica = id.to_owned();
        Ok(tokio::spawn(async move {
            let mut source = StreamSource::new(lines);
            if let Err(e) = keelson_logship::ship(&mut source, &*sink, &ShipConfig::default()).await {
                tracing::warn!(%replica, error = %e, "log shipping stopped");
            }
        }))
    }

    /// Where the router listens.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Stops routing, deregisters and stops every replica (SIGTERM, then SIGKILL after
    /// 5 s), and flushes their logs.
    pub async fn shutdown(self) -> Result<(), DemoError> {
        let _ = self.proxy_stop.send(());
        let _ = self.proxy.await;
        self.follower.abort();
        let mut first_error = None;
        for r in self.replicas {
            if let Err(e) = r.registration.deregister().await {
                first_error.get_or_insert(DemoError::from(e));
            }
            if let Err(e) = self.driver.stop(&r.task, Duration::from_secs(5)).await {
                first_error.get_or_insert(DemoError::from(e));
            }
            let _ = self.network.detach("minipaas", &r.task).await;
            // The output stream ends when the process's pipes close, which ends shipping.
            if tokio::time::timeout(Duration::from_secs(5), r.shipper).await.is_err() {
                tracing::warn!(replica = %r.task, "log shipping did not finish in 5 s");
            }
        }
        self.sink.flush().await?;
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

async fn wait_healthy(
    discovery: &dyn Discovery,
    service: &ServiceName,
    wanted: u32,
    timeout: Duration,
    data_dir: &std::path::Path,
) -> Result<(), DemoError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let healthy = discovery.instances(&Query::service(service.clone()).healthy()).await?.len();
        if healthy >= wanted as usize {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DemoError::NotReady { healthy, wanted, after: timeout, logs: data_dir.join("logs").display().to_string() });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
