//! The node agent: runs its node's allocations (from a [`ClusterStore`]) through a
//! [`Driver`], reports their status back, and registers healthy ones in a `Discovery`
//! with their service tags, so a router following discovery serves them with no extra
//! step.
//!
//! Each [`NodeAgent::sync`] compares what the store assigns to the node with what the
//! driver runs (tasks labelled with the node): it starts what is missing, stops and
//! removes what is no longer assigned (an allocation re-placed after this node was
//! thought lost, say), and reports status changes. The driver is the record of what
//! runs, so an agent restarted next to running containers adopts them instead of
//! starting duplicates. Only allocations the group's traffic record admits are
//! registered (a blue/green deployment switches it from the old version to the new).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use keelson_discovery::health::{probe_once, Probe};
use keelson_discovery::{Discovery, Registration, RegistrationHandle, ServiceName};
use tokio::sync::Mutex;

use crate::error::{Error, Result};
use crate::orchestrate::cluster_store::ClusterStore;
use crate::orchestrate::deployment::Traffic;
use crate::orchestrate::metrics::OrchestrationMetrics;
use crate::orchestrate::reconcile::{AllocRecord, AllocStatus};
use crate::orchestrate::spec::{GroupSpec, NODE_LABEL};
use crate::runtime::driver::Driver;
use crate::runtime::volumes::VolumeManager;
use crate::task::{MountSpec, PortMapping, TaskHealth, TaskSpec, TaskState};

/// What one [`NodeAgent::sync`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Allocations started.
    pub started: Vec<String>,
    /// Tasks stopped and removed.
    pub stopped: Vec<String>,
    /// Allocations whose status changed, with the new status.
    pub reported: Vec<(String, AllocStatus)>,
    /// One-off runs that ended (their results are in the cluster store).
    pub runs_finished: Vec<String>,
}

/// Runs one node's allocations.
#[derive(Debug)]
pub struct NodeAgent {
    node: String,
    store: ClusterStore,
    driver: Arc<dyn Driver>,
    discovery: Option<Arc<dyn Discovery>>,
    volumes: Option<Arc<dyn VolumeManager>>,
    address: String,
    stop_grace: Duration,
    drain: Duration,
    registrations: Mutex<HashMap<String, RegistrationHandle>>,
    metrics: OrchestrationMetrics,
    output_wait: Option<crate::runtime::run_exec::RunOutputWait>,
    secret_files: Option<crate::SecretFiles>,
}

impl NodeAgent {
    /// An agent for `node`; services are registered at `address` (the node's address as
    /// clients reach it) when `discovery` is given.
    pub fn new(
        node: impl Into<String>,
        store: ClusterStore,
        driver: Arc<dyn Driver>,
        discovery: Option<Arc<dyn Discovery>>,
        address: impl Into<String>,
    ) -> Self {
        NodeAgent {
            node: node.into(),
            store,
            driver,
            discovery,
            volumes: None,
            address: address.into(),
            stop_grace: Duration::from_secs(5),
            drain: Duration::from_millis(500),
            registrations: Mutex::new(HashMap::new()),
            metrics: OrchestrationMetrics::default(),
            output_wait: None,
            secret_files: None,
        }
    }

    /// A finished one-off run keeps its task, and its result stays unwritten, until
    /// `shipped` says its whole output reached the log sink (from
    /// [`TaskLogShipper::shipped_outputs`](crate::TaskLogShipper::shipped_outputs)), for at
    /// most `limit`: whoever reads the result then finds every line in the log server.
    /// Past the limit the result says the output may be incomplete, and
    /// `keelson_runs_output_undelivered` counts it.
    pub fn with_output_shipping(mut self, shipped: crate::ShippedOutputs, limit: Duration) -> Self {
        self.output_wait = Some(crate::runtime::run_exec::RunOutputWait::new(shipped, limit));
        self
    }

    /// How long a stopped task gets between SIGTERM and SIGKILL (default 5 s).
    pub fn with_stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }

    /// How long a deregistered allocation keeps serving before it is stopped, so routers
    /// following discovery stop sending it requests first (default 500 ms).
    pub fn with_drain(mut self, drain: Duration) -> Self {
        self.drain = drain;
        self
    }

    /// Counts into `metrics` (share one with the controller; register it once).
    pub fn with_metrics(mut self, metrics: OrchestrationMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The node's volumes: allocations that mount volumes get them from here (created
    /// on first use). Without it, such allocations fail with [`Error::Unsupported`].
    pub fn with_volumes(mut self, volumes: Arc<dyn VolumeManager>) -> Self {
        self.volumes = Some(volumes);
        self
    }

    /// Where tasks' secret files go (a folder per task; see [`crate::SecretFiles`]).
    /// Without it, allocations whose task names secrets fail with [`Error::Unsupported`].
    pub fn with_secret_files(mut self, files: crate::SecretFiles) -> Self {
        self.secret_files = Some(files);
        self
    }

    /// The secrets of an allocation's task, read from the store now, as files.
    async fn secret_mount(&self, alloc: &AllocRecord, spec: &GroupSpec) -> Result<Option<MountSpec>> {
        if spec.task.secrets.is_empty() {
            return Ok(None);
        }
        let files = self.secret_files.as_ref().ok_or(Error::Unsupported { operation: "secret files", backend: "this node agent" })?;
        let mut values = std::collections::BTreeMap::new();
        for (file, name) in &spec.task.secrets {
            let value = self.store.secret(name).await?.ok_or_else(|| {
                Error::invalid("secret", name, format!("group {:?} names it, and the cluster has no such secret", alloc.group))
            })?;
            values.insert(file.clone(), value);
        }
        files.write(&alloc.id, &values).map(Some)
    }

    /// The mounts of an allocation: each of its volumes from the node's manager (created
    /// if placement put a new volume here), at the path the task template names.
    async fn mounts(&self, alloc: &AllocRecord, spec: &GroupSpec) -> Result<Vec<MountSpec>> {
        if alloc.volumes.is_empty() {
            return Ok(Vec::new());
        }
        let manager =
            self.volumes.as_ref().ok_or(Error::Unsupported { operation: "volumes (no volume manager)", backend: "node agent" })?;
        let mut mounts = Vec::new();
        for (request, mount) in spec.desired.volumes.iter().zip(&alloc.volumes) {
            let target = spec.task.mounts.get(&request.name).ok_or_else(|| {
                Error::invalid("volume", &request.name, format!("group {:?} has no mount path for it in task.mounts", alloc.group))
            })?;
            let volume = match manager.get(&mount.name).await {
                Ok(v) => v,
                Err(Error::NotFound { .. }) => {
                    let labels =
                        BTreeMap::from([("keelson.job".to_owned(), alloc.job.clone()), ("keelson.group".to_owned(), alloc.group.clone())]);
                    tracing::info!(volume = %mount.name, node = %self.node, "creating a volume placed here");
                    match manager.create(&mount.name, labels).await {
                        Ok(v) => v,
                        // Another task of this node created it first.
                        Err(Error::Conflict { .. }) => manager.get(&mount.name).await?,
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            };
            mounts.push(volume.mount(target.clone(), mount.read_only));
        }
        Ok(mounts)
    }

    async fn task_spec(&self, alloc: &AllocRecord, spec: &GroupSpec) -> Result<TaskSpec> {
        // A driver that maps ports publishes the host port on the service's own port; one
        // that cannot runs the task on the host port itself and tells it so (`PORT`).
        let ports = match (&spec.service, alloc.ports.first()) {
            (Some(s), Some(&host)) if self.driver.capabilities().publishes_ports => vec![PortMapping::new(s.port, host).named(&s.name)],
            (Some(s), Some(&host)) => vec![PortMapping::new(host, host).named(&s.name)],
            _ => Vec::new(),
        };
        Ok(TaskSpec {
            ports,
            mounts: {
                let mut mounts = self.mounts(alloc, spec).await?;
                mounts.extend(self.secret_mount(alloc, spec).await?);
                mounts
            },
            // The address its slot had here, if any (a stop-first update keeps it).
            address: alloc.prefer_address,
            ..spec.task.to_spec(alloc.id.clone())
        }
        .with_label(NODE_LABEL, self.node.clone())
        .with_label("keelson.job", alloc.job.clone())
        .with_label("keelson.group", alloc.group.clone())
        .with_label("keelson.version", alloc.version.to_string()))
    }

    async fn start(&self, alloc: &AllocRecord, spec: &GroupSpec) -> Result<()> {
        self.driver.start(self.task_spec(alloc, spec).await?).await.map(drop)
    }

    /// One pass: start, stop, check, report, register; then the node's one-off runs.
    pub async fn sync(&self) -> Result<SyncReport> {
        let began = std::time::Instant::now();
        let result = self.sync_once().await;
        self.metrics.sync_seconds.observe(began.elapsed().as_secs_f64());
        match &result {
            Ok(report) => {
                self.metrics.store_unreachable.set(0);
                self.metrics.started.inc_by(report.started.len() as u64);
                self.metrics.stopped.inc_by(report.stopped.len() as u64);
                for (_, status) in &report.reported {
                    self.metrics.reports.get_or_create(&OrchestrationMetrics::status(status)).inc();
                }
            }
            Err(e) => {
                self.metrics.sync_errors.inc();
                if e.is_retryable() {
                    self.metrics.store_unreachable.set(1);
                }
            }
        }
        result
    }

    async fn sync_once(&self) -> Result<SyncReport> {
        let mut report = SyncReport::default();
        let assigned: HashMap<String, AllocRecord> =
            self.store.allocations_on(&self.node).await?.into_iter().map(|a| (a.id.clone(), a)).collect();
        let running: HashMap<String, (TaskState, Option<TaskHealth>, Option<std::net::IpAddr>, u32)> = self
            .driver
            .list()
            .await?
            .into_iter()
            // One-off runs have their own loop (`runs`).
            .filter(|t| t.labels.get(NODE_LABEL) == Some(&self.node) && !t.labels.contains_key(crate::orchestrate::runs::RUN_LABEL))
            .map(|t| (t.id, (t.state, t.health, t.address, t.restarts)))
            .collect();
        let mut traffic: HashMap<(String, String), Traffic> = HashMap::new();
        // Registrations come first in a pass and deregistrations after, so a switch of
        // traffic from one version to another never leaves the service without instances.
        let mut unroute = Vec::new();
        for (id, alloc) in &assigned {
            if alloc.status == AllocStatus::Stopping {
                continue;
            }
            let spec = self.store.group_version(&alloc.job, &alloc.group, alloc.version).await?;
            // On a keelson network the task has its own address, where it serves on its
            // service's own port.
            let address = running.get(id).and_then(|r| r.2);
            let status = match running.get(id) {
                None if alloc.status == AllocStatus::Failed => continue,
                None => match self.start(alloc, &spec).await {
                    Ok(_) => {
                        report.started.push(id.clone());
                        AllocStatus::Pending
                    }
                    Err(e) if e.is_retryable() => return Err(e),
                    Err(e) => {
                        tracing::warn!(alloc = %id, error = %e, "allocation failed to start");
                        AllocStatus::Failed
                    }
                },
                Some((TaskState::Exited { .. }, _, _, _)) => AllocStatus::Failed,
                Some((TaskState::Running, health, _, _)) => {
                    // The task's own check (Docker HEALTHCHECK) and keelson's probe must
                    // both pass, when there are both.
                    let own = health.is_none_or(|h| h == TaskHealth::Healthy);
                    if own && self.healthy(alloc, &spec, address).await {
                        AllocStatus::Running
                    } else {
                        AllocStatus::Pending
                    }
                }
            };
            let key = (alloc.job.clone(), alloc.group.clone());
            let routed = match traffic.get(&key) {
                Some(t) => *t,
                None => {
                    let t = self.store.traffic(&alloc.job, &alloc.group).await?;
                    traffic.insert(key, t);
                    t
                }
            };
            let admitted = match routed {
                Traffic::All => true,
                Traffic::Only(v) => v == alloc.version,
            };
            if status == AllocStatus::Running && admitted {
                self.register(alloc, &spec, address).await?;
            } else {
                unroute.push(id.clone());
            }
            let restarts = running.get(id).map_or(alloc.restarts, |r| r.3);
            let moved = address.is_some() && address != alloc.address;
            if status != alloc.status || restarts != alloc.restarts || moved {
                // A restart or an address alone keeps the time the status began.
                let since_ms = if status != alloc.status { crate::orchestrate::cluster_store::wall_clock_ms() } else { alloc.since_ms };
                let address = address.or(alloc.address);
                self.store.report(&AllocRecord { status, since_ms, restarts, address, ..alloc.clone() }).await?;
                report.reported.push((id.clone(), status));
            }
        }
        // Then what is no longer assigned here, or asked to stop: out of discovery, one
        // drain for all of them (routers stop sending them requests), then stopped.
        let to_stop: Vec<&String> =
            running.keys().filter(|id| assigned.get(*id).is_none_or(|a| a.status == AllocStatus::Stopping)).collect();
        let mut routed = false;
        for id in &to_stop {
            routed |= self.deregister(id).await;
        }
        if routed {
            tokio::time::sleep(self.drain).await;
        }
        for id in to_stop {
            match self.driver.stop(id, self.stop_grace).await {
                Ok(_) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            match self.driver.remove(id).await {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            report.stopped.push(id.clone());
        }
        // Stopped now (or never ran): those allocations are done.
        // Their slots remember this node and the address they had here.
        for alloc in assigned.values().filter(|a| a.status == AllocStatus::Stopping) {
            let address = running.get(&alloc.id).and_then(|r| r.2).or(alloc.address);
            self.store.forget(&AllocRecord { address, ..alloc.clone() }).await?;
        }
        for id in unroute {
            self.deregister(&id).await;
        }
        // Secret files live as long as their task: a stopped or vanished task's go now.
        if let Some(files) = &self.secret_files {
            let mut keep: std::collections::HashSet<String> = running.keys().cloned().collect();
            keep.extend(assigned.iter().filter(|(_, a)| a.status != AllocStatus::Stopping).map(|(id, _)| id.clone()));
            keep.retain(|id| !report.stopped.contains(id));
            if let Err(e) = files.collect(&keep) {
                tracing::warn!(error = %e, "removing stopped tasks' secret files");
            }
        }
        let pass = crate::runtime::run_exec::RunPass {
            store: &self.store,
            driver: self.driver.as_ref(),
            node: &self.node,
            stop_grace: self.stop_grace,
            output_wait: self.output_wait.as_ref(),
            metrics: &self.metrics,
        };
        let finished = crate::runtime::run_exec::sync_runs(&pass).await?;
        for (id, outcome) in finished {
            self.metrics.runs_finished.get_or_create(&OrchestrationMetrics::outcome(outcome)).inc();
            report.runs_finished.push(id);
        }
        Ok(report)
    }

    /// Syncs every `interval`, and as soon as a plan changes this node's allocations
    /// (a watch on the node's own `allocs/<node>/` keys, nothing else), until `shutdown`
    /// completes; errors are logged and retried. A watch that fails is opened again at
    /// the next tick; meanwhile the ticks alone keep the node in sync.
    pub async fn run(self: Arc<Self>, interval: Duration, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let prefix = self.store.key(&["allocs", &self.node, ""]);
        let mut changes: Option<keelson_discovery::KvWatch> = None;
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if changes.is_none() {
                        changes = match self.store.kv.watch(&prefix, None).await {
                            Ok(w) => Some(w),
                            Err(e) => {
                                tracing::debug!(node = %self.node, error = %e, "watching this node's allocations failed; syncing on ticks");
                                None
                            }
                        };
                    }
                }
                change = next_change(&mut changes) => {
                    if !change {
                        changes = None;
                        continue;
                    }
                    // One sync for everything that is ready (a plan's events come together).
                    while let Some(Some(Ok(_))) = changes.as_mut().and_then(|w| futures::StreamExt::next(w).now_or_never()) {}
                }
                () = &mut shutdown => return,
            }
            if let Err(e) = self.sync().await {
                tracing::warn!(node = %self.node, error = %e, "agent sync failed; retrying");
            }
        }
    }

    async fn healthy(&self, alloc: &AllocRecord, spec: &GroupSpec, address: Option<std::net::IpAddr>) -> bool {
        let (Some(service), Some(port)) = (&spec.service, alloc.ports.first()) else { return true };
        let addr = match address {
            Some(ip) => SocketAddr::new(ip, service.port),
            None => SocketAddr::from(([127, 0, 0, 1], *port)),
        };
        let probe = match &service.http_check {
            Some(path) => Probe::Http { addr, path: path.clone() },
            None => Probe::Tcp(addr),
        };
        probe_once(&probe, Duration::from_secs(1)).await
    }

    async fn register(&self, alloc: &AllocRecord, spec: &GroupSpec, address: Option<std::net::IpAddr>) -> Result<()> {
        let (Some(discovery), Some(service), Some(port)) = (&self.discovery, &spec.service, alloc.ports.first()) else { return Ok(()) };
        let mut registrations = self.registrations.lock().await;
        if registrations.contains_key(&alloc.id) {
            return Ok(());
        }
        let name = ServiceName::new(service.name.clone()).map_err(|e| Error::invalid("service name", &service.name, e.to_string()))?;
        let (host, port) = match address {
            Some(ip) => (ip.to_string(), service.port),
            None => (self.address.clone(), *port),
        };
        let mut registration = Registration::new(name, alloc.id.clone(), host, port)
            .with_meta("keelson.job", alloc.job.clone())
            .with_meta("keelson.version", alloc.version.to_string());
        for tag in &service.tags {
            registration = registration.with_tag(tag.clone());
        }
        let handle =
            discovery.register(registration).await.map_err(|e| Error::Unavailable { backend: "discovery", reason: e.to_string() })?;
        registrations.insert(alloc.id.clone(), handle);
        Ok(())
    }

    /// Removes the allocation from discovery; returns whether it was registered.
    async fn deregister(&self, id: &str) -> bool {
        let handle = self.registrations.lock().await.remove(id);
        let Some(handle) = handle else { return false };
        if let Err(e) = handle.deregister().await {
            tracing::warn!(alloc = %id, error = %e, "deregistering (it expires with its TTL)");
        }
        true
    }
}

/// Waits for the next change on `watch`: `true` for a change, `false` if the watch failed
/// or ended; never resolves without a watch.
async fn next_change(watch: &mut Option<keelson_discovery::KvWatch>) -> bool {
    match watch {
        Some(w) => matches!(futures::StreamExt::next(w).await, Some(Ok(_))),
        None => std::future::pending().await,
    }
}
