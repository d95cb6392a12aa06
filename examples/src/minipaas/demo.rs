//! The `minipaas demo` wiring: the building blocks on their embedded defaults, put
//! together as a platform would put them together on many machines.
//!
//! The cluster state is a [`ClusterStore`] over `MemoryKv`; this machine joins it as one
//! node. The replicas are one group deployed through the store: the [`Controller`] places
//! them, a [`NodeAgent`] runs them with the [`ProcessDriver`] (each told its port in
//! `PORT`), checks their health and registers the healthy ones in discovery (in memory),
//! the router follows discovery and the proxy serves it, and logship ships each
//! replica's output to `<data-dir>/logs/<service>.log`. The demo itself only wires.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::{Discovery, MemoryDiscovery, MemoryKv, Query, ServiceName};
use keelson_logship::{FileSink, ShipConfig, Sink};
use keelson_routing::{follow_discovery, MemoryRouter, Proxy, ProxyConfig, HTTP_HOST_TAG};
use keelson_scheduler::{
    ClusterStore, Controller, DesiredGroup, Driver, Gates, GroupSpec, Node, NodeAgent, NodeMembership, ProcessDriver, Resources,
    ServiceSpec, Strategy, TaskTemplate, NODE_LABEL,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The service the demo runs.
pub const SERVICE: &str = "hello";
/// The host the router serves it as.
pub const HOST: &str = "hello.localhost";
/// This machine's name in the cluster.
const NODE: &str = "local";
/// How often the agent and the controller go over the cluster (and the log shipper
/// looks for new replicas).
const TICK: Duration = Duration::from_millis(200);

/// Demo settings.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Where the router listens (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// Where logs go (default `./minipaas-data`).
    pub data_dir: PathBuf,
    /// How many replicas (default 3).
    pub replicas: u32,
    /// The program each replica runs; it learns its id and port from `KEELSON_TASK_ID`
    /// and `PORT`, which the process driver sets.
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
    /// Placing, starting or stopping a replica failed.
    #[error("scheduler: {0}")]
    Scheduler(#[from] keelson_scheduler::Error),
    /// Discovery failed.
    #[error("discovery: {0}")]
    Discovery(#[from] keelson_discovery::Error),
    /// Routing failed.
    #[error("routing: {0}")]
    Routing(#[from] keelson_routing::Error),
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

/// A running demo.
pub struct Demo {
    listen: SocketAddr,
    driver: Arc<ProcessDriver>,
    sink: Arc<FileSink>,
    _member: NodeMembership,
    stop: watch::Sender<bool>,
    loops: Vec<JoinHandle<()>>,
    shippers: JoinHandle<Vec<JoinHandle<()>>>,
    follower: JoinHandle<()>,
    proxy: JoinHandle<()>,
}

impl std::fmt::Debug for Demo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demo").field("listen", &self.listen).finish_non_exhaustive()
    }
}

/// This machine as a cluster node.
fn local_node() -> Node {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let mem_mb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(1024, |kb| kb / 1024);
    Node::new(NODE, Resources::new(cpus * 1000, mem_mb)).with_attribute("kernel.name", std::env::consts::OS)
}

/// The demo's one group: `replicas` of the hello program, each on a port of its own,
/// offered as the `hello` service, routed as [`HOST`], healthy while `/health` answers.
fn hello_group(config: &DemoConfig) -> GroupSpec {
    GroupSpec {
        desired: DesiredGroup {
            job: SERVICE.into(),
            group: "web".into(),
            version: 1,
            count: config.replicas,
            resources: Resources::new(100, 64),
            ports: 1,
            ..Default::default()
        },
        task: TaskTemplate { command: config.hello_command.clone(), ..Default::default() },
        service: Some(ServiceSpec {
            name: SERVICE.into(),
            // Inside a container; a process serves on the host port it is told (PORT).
            port: 8080,
            tags: vec![format!("{HTTP_HOST_TAG}={HOST}")],
            http_check: Some("/health".into()),
        }),
        release: None,
    }
}

impl Demo {
    /// Starts everything and returns once every replica is healthy and routed.
    pub async fn start(config: DemoConfig) -> Result<Demo, DemoError> {
        let discovery: Arc<dyn Discovery> = Arc::new(MemoryDiscovery::memory());
        let router = Arc::new(MemoryRouter::new());
        let follower = follow_discovery(discovery.clone(), router.clone()).await?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| DemoError::Io { context: format!("binding the router to {}", config.listen), source })?;
        let listen = listener.local_addr().map_err(|source| DemoError::Io { context: "router address".into(), source })?;
        let (stop, stopped) = watch::channel(false);
        let until_stopped = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            }
        };
        let proxy = tokio::spawn(Arc::new(Proxy::new(router, ProxyConfig::default())).serve(listener, until_stopped()));

        let store = ClusterStore::new(Arc::new(MemoryKv::new()), "minipaas");
        let member = store.join(&local_node(), Duration::from_secs(10)).await?;
        let driver = Arc::new(ProcessDriver::new());
        let agent = Arc::new(NodeAgent::new(NODE, store.clone(), driver.clone(), Some(discovery.clone()), "127.0.0.1"));
        let controller = Controller::new(store.clone());
        store.deploy(&hello_group(&config), Strategy::default(), Gates::default()).await?;
        let loops = vec![
            tokio::spawn(agent.run(TICK, until_stopped())),
            tokio::spawn({
                let stop = until_stopped();
                async move { controller.run(TICK, stop).await }
            }),
        ];
        let sink = Arc::new(FileSink::new(config.data_dir.join("logs"))?);
        let shippers = tokio::spawn(ship_replica_logs(driver.clone(), sink.clone(), until_stopped()));
        let demo = Demo { listen, driver, sink, _member: member, stop, loops, shippers, follower, proxy };
        let service = ServiceName::new(SERVICE)?;
        if let Err(e) = wait_healthy(&*discovery, &service, config.replicas, config.ready_timeout, &config.data_dir).await {
            let _ = demo.shutdown().await;
            return Err(e);
        }
        Ok(demo)
    }

    /// Where the router listens.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Stops routing, then the agent and the controller, then every replica (SIGTERM,
    /// then SIGKILL after 5 s), and flushes their logs.
    pub async fn shutdown(self) -> Result<(), DemoError> {
        let _ = self.stop.send(true);
        let _ = self.proxy.await;
        self.follower.abort();
        for l in self.loops {
            let _ = l.await;
        }
        let mut first_error = None;
        for task in self.driver.list().await? {
            if let Err(e) = self.driver.stop(&task.id, Duration::from_secs(5)).await {
                first_error.get_or_insert(DemoError::from(e));
            }
        }
        // Each replica's output stream ends when its process's pipes close.
        let shippers = self.shippers.await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the log shipping watcher failed; replicas' last lines may be missing");
            Vec::new()
        });
        for shipper in shippers {
            if tokio::time::timeout(Duration::from_secs(5), shipper).await.is_err() {
                tracing::warn!("log shipping did not finish in 5 s");
            }
        }
        self.sink.flush().await?;
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Ships the output of every replica the agent starts, as `hello-1`, `hello-2`, ... in
/// the order they appear; returns the shippers once `stop` completes, after a last look
/// (a replica started since the previous look is still running then, and its output
/// stream begins with what it printed so far).
async fn ship_replica_logs(
    driver: Arc<ProcessDriver>,
    sink: Arc<FileSink>,
    stop: impl std::future::Future<Output = ()>,
) -> Vec<JoinHandle<()>> {
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut shippers = Vec::new();
    tokio::pin!(stop);
    loop {
        ship_new_replicas(&driver, &sink, &mut names, &mut shippers).await;
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            () = &mut stop => {
                ship_new_replicas(&driver, &sink, &mut names, &mut shippers).await;
                return shippers;
            }
        }
    }
}

/// Starts a shipper for each replica task not seen before, named in order.
async fn ship_new_replicas(
    driver: &ProcessDriver,
    sink: &Arc<FileSink>,
    names: &mut BTreeMap<String, String>,
    shippers: &mut Vec<JoinHandle<()>>,
) {
    let listed = match driver.list().await {
        Ok(listed) => listed,
        Err(e) => {
            // Looked for again next tick, and once more at shutdown.
            tracing::warn!(error = %e, "cannot list the replicas to ship their logs");
            return;
        }
    };
    let mut tasks: Vec<String> = listed.into_iter().filter(|t| t.labels.contains_key(NODE_LABEL)).map(|t| t.id).collect();
    tasks.sort();
    for id in tasks {
        if names.contains_key(&id) {
            continue;
        }
        let instance = format!("{SERVICE}-{}", names.len() + 1);
        names.insert(id.clone(), instance.clone());
        match driver.output(&id).await {
            Ok(output) => shippers.push(tokio::spawn(ship(output, instance, sink.clone()))),
            Err(e) => tracing::warn!(task = %id, error = %e, "no output to ship"),
        }
    }
}

async fn ship(output: keelson_scheduler::Output, instance: String, sink: Arc<FileSink>) {
    let labels = Arc::new(keelson_logship::Labels::new(SERVICE, instance.clone()));
    let replica = instance;
    let mut source = keelson_scheduler::output_source(output, labels);
    if let Err(e) = keelson_logship::ship(&mut source, &*sink, &ShipConfig::default()).await {
        tracing::warn!(%replica, error = %e, "log shipping stopped");
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
