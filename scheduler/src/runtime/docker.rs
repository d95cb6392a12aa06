//! `DockerDriver`: tasks as Docker Engine containers (bollard).
//!
//! The engine is the record: a task is the container named `keelson-<task id>`, labelled
//! [`MANAGED_LABEL`] and [`TASK_LABEL`], so a driver started after an agent restart
//! sees (adopts) the containers already running and never starts a second one for the
//! same task. A container that was created but could not be started is removed before
//! the error is returned: no half-created containers are left behind.
//!
//! With [`DockerDriver::with_network`], containers get no network of the engine's: each
//! is attached to a keelson network through its namespace, its ports published there,
//! and its address reported in [`TaskStatus::address`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::models::ContainerCreateBody;
use bollard::models::{HealthConfig, HealthStatusEnum, HostConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StartContainerOptions, StopContainerOptionsBuilder,
};
use bollard::Docker;
use futures::{StreamExt, TryStreamExt};

use crate::runtime::driver::{Driver, DriverCapabilities, Output};

use crate::error::{validate_id, Error, Result};
use crate::task::{MountSource, OutputLine, OutputStream, TaskHealth, TaskSpec, TaskState, TaskStatus};

/// Label on every container keelson manages.
pub const MANAGED_LABEL: &str = "keelson.managed";
/// Label holding the task id.
pub const TASK_LABEL: &str = "keelson.task";

const BACKEND: &str = "docker";

/// Runs tasks as Docker containers on the local engine.
#[derive(Clone, Debug)]
pub struct DockerDriver {
    docker: Docker,
    volume_root: Option<PathBuf>,
    /// Time limit of each engine call that is not a wait (create, inspect, remove).
    call_timeout: Duration,
    /// Pieces cut from over-long output lines, over every task.
    lines_split: prometheus_client::metrics::counter::Counter,
    /// The host address published ports bind to.
    publish_address: std::net::IpAddr,
    /// The keelson network tasks are attached to, if any.
    network: Option<crate::runtime::task_network::TaskNetwork>,
    /// Credentials for private registries images are pulled from.
    registry_auth: Vec<RegistryAuth>,
}

/// Credentials the engine pulls with from one registry (a keelson registry, say).
/// The password never appears in `Debug` output.
#[derive(Clone)]
pub struct RegistryAuth {
    /// The registry as image names spell it: `host[:port]`.
    pub server: String,
    /// User name.
    pub username: String,
    password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth").field("server", &self.server).field("username", &self.username).finish_non_exhaustive()
    }
}

impl RegistryAuth {
    /// Credentials for `server` (`host[:port]`, no scheme).
    pub fn new(server: impl Into<String>, username: impl Into<String>, password: impl Into<String>) -> Result<Self> {
        let server = server.into();
        if server.is_empty() || server.contains('/') || server.contains("://") {
            return Err(Error::invalid("registry", &server, "must be host[:port], as in image names"));
        }
        Ok(RegistryAuth { server, username: username.into(), password: password.into() })
    }

    /// The password (for a client that checks the credentials before the engine uses them).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// What the engine takes with a pull or a push.
    pub(crate) fn credentials(&self) -> bollard::auth::DockerCredentials {
        bollard::auth::DockerCredentials {
            username: Some(self.username.clone()),
            password: Some(self.password.clone()),
            serveraddress: Some(self.server.clone()),
            ..Default::default()
        }
    }
}

/// The registry an image name points at (`host[:port]/path:tag`), if it names one:
/// the first component counts as a host when it has a dot or a port, or is `localhost`.
pub(crate) fn image_registry(image: &str) -> Option<&str> {
    let (first, _) = image.split_once('/')?;
    (first.contains('.') || first.contains(':') || first == "localhost").then_some(first)
}

fn container_name(id: &str) -> String {
    format!("keelson-{id}")
}

/// Maps engine errors: 404 and 409 are answers about the object, connection failures
/// mean the daemon is away (retryable), the rest is a backend error.
pub(crate) fn map_err<'a>(kind: &'static str, name: &'a str) -> impl Fn(bollard::errors::Error) -> Error + 'a {
    move |e| match e {
        bollard::errors::Error::DockerResponseServerError { status_code: 404, .. } => Error::NotFound { kind, name: name.to_owned() },
        bollard::errors::Error::DockerResponseServerError { status_code: 409, message } => {
            Error::Conflict { kind, name: name.to_owned(), reason: message }
        }
        bollard::errors::Error::DockerResponseServerError { status_code: 400, message } => Error::invalid("task", name, message),
        bollard::errors::Error::DockerResponseServerError { .. } | bollard::errors::Error::JsonDataError { .. } => {
            Error::Backend { backend: BACKEND, source: Box::new(e) }
        }
        other => Error::Unavailable { backend: BACKEND, reason: other.to_string() },
    }
}

impl DockerDriver {
    /// Connects to the local engine (`DOCKER_HOST` or the default socket) and agrees on
    /// an API version with it. [`Error::Unavailable`] when no daemon answers.
    pub async fn connect() -> Result<Self> {
        let docker = Docker::connect_with_local_defaults().map_err(|e| Error::Unavailable { backend: BACKEND, reason: e.to_string() })?;
        Self::with_client(docker).await
    }

    /// Connects to the engine at a Unix socket path.
    pub async fn connect_unix(socket: &Path) -> Result<Self> {
        let docker = Docker::connect_with_unix(&socket.to_string_lossy(), 30, bollard::API_DEFAULT_VERSION)
            .map_err(|e| Error::Unavailable { backend: BACKEND, reason: e.to_string() })?;
        Self::with_client(docker).await
    }

    async fn with_client(docker: Docker) -> Result<Self> {
        let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
            .await
            .map_err(|_| Error::Timeout { operation: "docker version negotiation", after: Duration::from_secs(10) })?
            .map_err(|e| Error::Unavailable { backend: BACKEND, reason: e.to_string() })?;
        Ok(DockerDriver {
            docker,
            volume_root: None,
            call_timeout: Duration::from_secs(30),
            lines_split: Default::default(),
            publish_address: std::net::IpAddr::from([127, 0, 0, 1]),
            network: None,
            registry_auth: Vec::new(),
        })
    }

    /// Registers `keelson_driver_output_lines_split_total`: pieces cut from task output
    /// lines longer than [`crate::MAX_LINE_BYTES`], as readers of
    /// [`Driver::output`] received them.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "keelson_driver_output_lines_split",
            "Pieces cut from task output lines longer than the maximum line length",
            self.lines_split.clone(),
        );
    }

    pub(crate) fn client(&self) -> &Docker {
        &self.docker
    }

    /// Publishes task ports on `address` (default 127.0.0.1, never every interface):
    /// the node's address on the network the edge reaches it by. `0.0.0.0` is refused:
    /// a published port must not bypass the edge on an interface nobody meant.
    pub fn with_publish_address(mut self, address: std::net::IpAddr) -> Result<Self> {
        if address.is_unspecified() {
            return Err(Error::invalid("publish address", address.to_string(), "must be one address, not every interface"));
        }
        self.publish_address = address;
        Ok(self)
    }

    /// Puts every task that names no engine network on the keelson network `network`:
    /// the container starts with none of the engine's, its namespace is attached, its
    /// ports are published by the network driver, and [`TaskStatus::address`] carries
    /// its address there.
    pub fn with_network(mut self, network: crate::runtime::task_network::TaskNetwork) -> Self {
        self.network = Some(network);
        self
    }

    /// Pulls images of `auth.server` with these credentials (repeat for more registries).
    pub fn with_registry_auth(mut self, auth: RegistryAuth) -> Self {
        self.registry_auth.retain(|a| a.server != auth.server);
        self.registry_auth.push(auth);
        self
    }

    /// Only host directories under `root` may be mounted (a volume manager's root).
    pub fn with_volume_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.volume_root = Some(root.into());
        self
    }

    async fn timed<T>(&self, operation: &'static str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.call_timeout, f).await.map_err(|_| Error::Timeout { operation, after: self.call_timeout })?
    }

    /// Makes sure `image` is on the node: present, or pulled. When it can be neither
    /// (no registry reachable, unknown name), the error names the image.
    pub async fn ensure_image(&self, image: &str) -> Result<()> {
        if self.docker.inspect_image(image).await.is_ok() {
            return Ok(());
        }
        let options = CreateImageOptionsBuilder::new().from_image(image).build();
        let credentials =
            image_registry(image).and_then(|r| self.registry_auth.iter().find(|a| a.server == r)).map(RegistryAuth::credentials);
        let pulled: std::result::Result<Vec<_>, _> =
            tokio::time::timeout(Duration::from_secs(300), self.docker.create_image(Some(options), None, credentials).try_collect())
                .await
                .map_err(|_| Error::ImageUnavailable { image: image.to_owned(), reason: "pull timed out after 300 s".into() })?;
        pulled.map_err(|e| Error::ImageUnavailable { image: image.to_owned(), reason: e.to_string() })?;
        Ok(())
    }

    fn check_mounts(&self, spec: &TaskSpec) -> Result<()> {
        let Some(root) = &self.volume_root else { return Ok(()) };
        let root = root.canonicalize().map_err(|e| Error::invalid("volume root", root.display().to_string(), e.to_string()))?;
        for m in &spec.mounts {
            // Named volumes live where the engine keeps them; host directories must be
            // under the root.
            let MountSource::HostDir(dir) = &m.source else { continue };
            // Canonical, so a symlink inside the root cannot lead out of it.
            let source = dir.canonicalize().map_err(|e| Error::invalid("mount", dir.display().to_string(), e.to_string()))?;
            if !source.starts_with(&root) {
                return Err(Error::invalid("mount", dir.display().to_string(), format!("outside the volume root {}", root.display())));
            }
        }
        Ok(())
    }

    fn config(&self, spec: &TaskSpec, image: &str) -> ContainerCreateBody {
        let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        labels.insert(MANAGED_LABEL.into(), "1".into());
        labels.insert(TASK_LABEL.into(), spec.id.clone());
        let exposed: Vec<String> = spec.ports.iter().map(|p| format!("{}/tcp", p.container)).collect();
        let bindings: HashMap<String, Option<Vec<PortBinding>>> = spec
            .ports
            .iter()
            .map(|p| {
                let binding = PortBinding { host_ip: Some(self.publish_address.to_string()), host_port: Some(p.host.to_string()) };
                (format!("{}/tcp", p.container), Some(vec![binding]))
            })
            .collect();
        // Host directories and named volumes share the bind syntax: `source:target[:ro]`.
        let binds: Vec<String> = spec
            .mounts
            .iter()
            .map(|m| {
                let source = match &m.source {
                    MountSource::HostDir(dir) => dir.display().to_string(),
                    MountSource::DockerVolume(name) => name.clone(),
                };
                format!("{source}:{}{}", m.target.display(), if m.read_only { ":ro" } else { "" })
            })
            .collect();
        let limits = spec.limits.unwrap_or_default();
        // On a keelson network the network driver publishes the ports, not the engine.
        let on_keelson = self.network.is_some() && spec.network.is_none();
        let (network_mode, bindings) =
            if on_keelson { (Some("none".to_owned()), HashMap::new()) } else { (spec.network.clone(), bindings) };
        let host_config = HostConfig {
            nano_cpus: (limits.cpu_millis > 0).then(|| i64::try_from(limits.cpu_millis.saturating_mul(1_000_000)).unwrap_or(i64::MAX)),
            memory: (limits.memory_mb > 0).then(|| i64::try_from(limits.memory_mb.saturating_mul(1 << 20)).unwrap_or(i64::MAX)),
            pids_limit: (limits.pids > 0).then(|| i64::try_from(limits.pids).unwrap_or(i64::MAX)),
            port_bindings: (!bindings.is_empty()).then_some(bindings),
            binds: (!binds.is_empty()).then_some(binds),
            network_mode,
            // The engine writes them to the container's resolv.conf, network or none.
            dns: self
                .network
                .as_ref()
                .filter(|n| on_keelson && !n.dns().is_empty())
                .map(|n| n.dns().iter().map(ToString::to_string).collect()),
            // The engine restarts on failure with its own backoff (100 ms doubling);
            // the count is what the policy allows.
            restart_policy: spec.restart.map(|r| RestartPolicy {
                name: Some(RestartPolicyNameEnum::ON_FAILURE),
                maximum_retry_count: Some(i64::from(r.max_restarts)),
            }),
            ..Default::default()
        };
        let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        let healthcheck = spec.health_check.as_ref().map(|h| HealthConfig {
            test: Some(std::iter::once("CMD".to_owned()).chain(h.command.iter().cloned()).collect()),
            interval: Some(nanos(h.interval)),
            timeout: Some(nanos(h.timeout)),
            retries: Some(i64::from(h.retries)),
            // Checked from the start (interval), not after Docker's 30 s default.
            start_interval: Some(nanos(h.interval)),
            ..Default::default()
        });
        ContainerCreateBody {
            image: Some(image.to_owned()),
            // None: the image's CMD (an empty list would replace it with nothing).
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            healthcheck,
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            working_dir: spec.working_dir.as_ref().map(|p| p.display().to_string()),
            labels: Some(labels),
            exposed_ports: (!exposed.is_empty()).then_some(exposed),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    async fn status_of(&self, id: &str) -> Result<TaskStatus> {
        let info = self
            .timed("docker inspect", async {
                self.docker.inspect_container(&container_name(id), None::<InspectContainerOptions>).await.map_err(map_err("task", id))
            })
            .await?;
        let state = info.state.unwrap_or_default();
        let running = state.running.unwrap_or(false) || state.restarting.unwrap_or(false);
        let task_state = if running {
            TaskState::Running
        } else {
            TaskState::Exited { code: state.exit_code.and_then(|c| i32::try_from(c).ok()), signal: None }
        };
        let started_at = state
            .started_at
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let labels: BTreeMap<String, String> = info.config.and_then(|c| c.labels).unwrap_or_default().into_iter().collect();
        let restarts = info.restart_count.and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
        let pid = state.pid.and_then(|p| u32::try_from(p).ok()).filter(|p| *p > 0);
        let address = match (&self.network, pid, running) {
            (Some(net), Some(pid), true) => net.address(id, pid, &[]).await?,
            _ => None,
        };
        let health = state.health.and_then(|h| h.status).and_then(|s| match s {
            HealthStatusEnum::STARTING => Some(TaskHealth::Starting),
            HealthStatusEnum::HEALTHY => Some(TaskHealth::Healthy),
            HealthStatusEnum::UNHEALTHY => Some(TaskHealth::Unhealthy),
            HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => None,
        });
        Ok(TaskStatus {
            id: id.to_owned(),
            state: task_state,
            labels,
            started_at,
            restarts,
            health,
            output_lines_split: 0,
            output_lines_dropped: 0,
            address,
        })
    }

    /// Attaches a just-started container's namespace to the keelson network. The engine
    /// starts the process before keelson can attach it: a container that has already
    /// exited (a one-off run that fails at once, say) ran without its network, and that
    /// run's exit and output are its result, not an attach error.
    async fn attach(&self, net: &crate::runtime::task_network::TaskNetwork, spec: &TaskSpec) -> Result<()> {
        let Some(pid) = self.running_pid(spec).await? else {
            tracing::info!(task = %spec.id, "task exited before it could be attached to its network; it ran without it");
            return Ok(());
        };
        match net.attach(&spec.id, pid, &spec.ports, spec.address).await {
            Ok(address) => {
                tracing::info!(task = %spec.id, network = %net.name(), %address, "task attached");
                Ok(())
            }
            // Its namespace went between the inspect and the attach: it exited (the
            // engine may still say running for a moment; the process's namespace is gone).
            Err(e) if !std::path::Path::new(&format!("/proc/{pid}/ns/net")).exists() || self.running_pid(spec).await?.is_none() => {
                tracing::info!(task = %spec.id, error = %e, "task exited while it was being attached to its network; it ran without it");
                net.detach(&spec.id).await
            }
            Err(e) => Err(e),
        }
    }

    /// The container's process, while it runs.
    async fn running_pid(&self, spec: &TaskSpec) -> Result<Option<u32>> {
        let info = self
            .docker
            .inspect_container(&container_name(&spec.id), None::<InspectContainerOptions>)
            .await
            .map_err(map_err("task", &spec.id))?;
        Ok(info.state.filter(|s| s.running == Some(true)).and_then(|s| s.pid).and_then(|p| u32::try_from(p).ok()).filter(|p| *p > 0))
    }

    /// Removes the container, and its attachment first (already gone is fine).
    async fn remove_container(&self, id: &str) -> Result<()> {
        if let Some(net) = &self.network {
            net.detach(id).await?;
        }
        let options = RemoveContainerOptionsBuilder::new().force(true).build();
        self.timed("docker remove", async {
            self.docker.remove_container(&container_name(id), Some(options)).await.map_err(map_err("task", id))
        })
        .await
    }
}

#[async_trait]
impl Driver for DockerDriver {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn capabilities(&self) -> DriverCapabilities {
        DriverCapabilities::new(true, true, true)
    }

    async fn start(&self, spec: TaskSpec) -> Result<TaskStatus> {
        spec.validate()?;
        let image =
            spec.image.clone().ok_or_else(|| Error::invalid("image", "", format!("task {:?}: the docker driver runs images", spec.id)))?;
        self.check_mounts(&spec)?;
        // Adoption: the engine already has this task. Running: never a second one.
        match self.status_of(&spec.id).await {
            Ok(s) if s.state == TaskState::Running => {
                return Err(Error::Conflict { kind: "task", name: spec.id, reason: "already running".into() })
            }
            Ok(_) => self.remove_container(&spec.id).await?,
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        self.ensure_image(&image).await?;
        let name = container_name(&spec.id);
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let config = self.config(&spec, &image);
        self.timed("docker create", async { self.docker.create_container(Some(options), config).await.map_err(map_err("task", &spec.id)) })
            .await?;
        let started = self
            .timed("docker start", async {
                self.docker.start_container(&name, None::<StartContainerOptions>).await.map_err(map_err("task", &spec.id))
            })
            .await;
        // The container exists, so a 404 here is about what it refers to: its network.
        let started = started.map_err(|e| match (e, &spec.network) {
            (Error::NotFound { .. }, Some(network)) => Error::NotFound { kind: "network", name: network.clone() },
            (e, _) => e,
        });
        let started = match (started, &self.network) {
            (Ok(()), Some(net)) if spec.network.is_none() => self.attach(net, &spec).await,
            (other, _) => other,
        };
        if let Err(e) = started {
            // A bad port binding, a missing network or mount, a failed attach shows up
            // here: leave nothing behind.
            if let Err(cleanup) = self.remove_container(&spec.id).await {
                tracing::warn!(task = %spec.id, error = %cleanup, "removing a container that failed to start");
            }
            return Err(e);
        }
        tracing::info!(task = %spec.id, %image, "container started");
        self.status_of(&spec.id).await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<TaskStatus> {
        validate_id("task id", id)?;
        let status = self.status_of(id).await?;
        if status.state.is_exited() {
            return Ok(status);
        }
        // The engine sends the image's stop signal (SIGTERM), then SIGKILL after `t`
        // whole seconds: round up so the task gets at least its grace.
        let t = i32::try_from(grace.as_millis().div_ceil(1000)).unwrap_or(i32::MAX);
        let wait = grace + self.call_timeout;
        tokio::time::timeout(wait, self.docker.stop_container(&container_name(id), Some(StopContainerOptionsBuilder::new().t(t).build())))
            .await
            .map_err(|_| Error::Timeout { operation: "docker stop", after: wait })?
            .map_err(map_err("task", id))?;
        // Its namespace went with its process: give the address back now.
        if let Some(net) = &self.network {
            net.detach(id).await?;
        }
        self.status_of(id).await
    }

    async fn inspect(&self, id: &str) -> Result<TaskStatus> {
        validate_id("task id", id)?;
        self.status_of(id).await
    }

    async fn output(&self, id: &str) -> Result<Output> {
        validate_id("task id", id)?;
        self.status_of(id).await?;
        let frames = whole_log(self.docker.clone(), container_name(id));
        let split = self.lines_split.clone();
        let lines = lines(frames);
        Ok(lines
            .inspect(move |l| {
                if l.partial {
                    split.inc();
                }
            })
            .boxed())
    }

    async fn list(&self) -> Result<Vec<TaskStatus>> {
        let filters = HashMap::from([("label".to_owned(), vec![MANAGED_LABEL.to_owned()])]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let containers =
            self.timed("docker list", async { self.docker.list_containers(Some(options)).await.map_err(map_err("task", "*")) }).await?;
        let mut out = Vec::new();
        for c in containers {
            let Some(id) = c.labels.as_ref().and_then(|l| l.get(TASK_LABEL)).cloned() else { continue };
            match self.status_of(&id).await {
                Ok(s) => out.push(s),
                // Removed between the list and the inspect.
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn remove(&self, id: &str) -> Result<()> {
        validate_id("task id", id)?;
        if self.status_of(id).await?.state == TaskState::Running {
            return Err(Error::Conflict { kind: "task", name: id.to_owned(), reason: "already running".into() });
        }
        self.remove_container(id).await
    }
}

/// How many times a follow that ends while its container still runs is opened again.
const LOG_REOPENS: u32 = 20;

/// A container's whole log, from its start to its end, as frames (backpressure kept: the
/// engine is read only as fast as the caller reads).
///
/// The engine's follow stream can end before it has sent everything a container wrote
/// when the container exits quickly after writing a lot (seen here: 6,455 of 20,000
/// lines, no error), and it stops after a json-file rotation (moby#37646). So when a
/// follow ends the container is looked at: exited (or gone), the log is read once more
/// without following; still running, the follow is opened again. Either way the bytes
/// already passed on, counted per stream, are skipped, so each byte comes once and a line
/// cut at the break is joined again by the line splitter downstream. (A log rotated
/// away and deleted between two opens cannot be replayed; its bytes are not there to read.)
fn whole_log(docker: Docker, name: String) -> impl futures::Stream<Item = LogOutput> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<LogOutput>(64);
    tokio::spawn(async move {
        // Bytes passed on so far: stdout, stderr.
        let mut passed = [0usize; 2];
        let mut follow = true;
        let mut reopens = 0;
        loop {
            let options = LogsOptionsBuilder::new().follow(follow).stdout(true).stderr(true).tail("all").build();
            let mut frames = docker.logs(&name, Some(options));
            let mut skip = passed;
            while let Some(frame) = frames.next().await {
                let Ok(frame) = frame else { break };
                let (k, message) = match &frame {
                    LogOutput::StdOut { message } | LogOutput::Console { message } => (0, message.clone()),
                    LogOutput::StdErr { message } => (1, message.clone()),
                    LogOutput::StdIn { .. } => continue,
                };
                let fresh = if skip[k] >= message.len() {
                    skip[k] -= message.len();
                    continue;
                } else {
                    message.slice(std::mem::take(&mut skip[k])..)
                };
                passed[k] += fresh.len();
                let out = if k == 0 { LogOutput::StdOut { message: fresh } } else { LogOutput::StdErr { message: fresh } };
                if tx.send(out).await.is_err() {
                    return; // the reader is gone
                }
            }
            if !follow {
                return; // the log of an exited container, read to its end
            }
            let running = match docker.inspect_container(&name, None::<InspectContainerOptions>).await {
                Ok(c) => c.state.and_then(|s| s.running).unwrap_or(false),
                Err(_) => false,
            };
            if running {
                reopens += 1;
                if reopens > LOG_REOPENS {
                    tracing::warn!(container = %name, "its log follow keeps ending while it runs; no more of its output is read");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            } else {
                follow = false;
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|frame| (frame, rx)) })
}

/// Splits the engine's log frames into lines per stream, carrying partial lines across
/// frames (at most [`crate::MAX_LINE_BYTES`] each: longer lines come in marked pieces)
/// and flushing what is left when the stream ends.
fn lines(frames: impl futures::Stream<Item = LogOutput> + Send + 'static) -> impl futures::Stream<Item = OutputLine> + Send + 'static {
    struct State<S> {
        frames: std::pin::Pin<Box<S>>,
        splitters: [keelson_logship::LineSplitter; 2],
        ready: VecDeque<OutputLine>,
        done: bool,
    }
    let line = |stream: OutputStream, l: keelson_logship::Line| OutputLine {
        stream,
        line: l.text,
        timestamp: SystemTime::now(),
        partial: l.partial,
    };
    let state = State { frames: Box::pin(frames), splitters: Default::default(), ready: VecDeque::new(), done: false };
    futures::stream::unfold(state, move |mut st| async move {
        let mut pieces = VecDeque::new();
        loop {
            if let Some(l) = st.ready.pop_front() {
                return Some((l, st));
            }
            if st.done {
                return None;
            }
            match st.frames.next().await {
                Some(frame) => {
                    let (stream, bytes) = match frame {
                        LogOutput::StdErr { message } => (OutputStream::Stderr, message),
                        LogOutput::StdOut { message } | LogOutput::Console { message } => (OutputStream::Stdout, message),
                        LogOutput::StdIn { .. } => continue,
                    };
                    st.splitters[usize::from(stream == OutputStream::Stderr)].push(&bytes, &mut pieces);
                    st.ready.extend(pieces.drain(..).map(|l| line(stream, l)));
                }
                None => {
                    st.done = true;
                    for (k, stream) in [OutputStream::Stdout, OutputStream::Stderr].into_iter().enumerate() {
                        if let Some(last) = st.splitters[k].finish() {
                            st.ready.push_back(line(stream, last));
                        }
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod registry_auth_tests {
    use super::*;

    #[test]
    fn image_names_name_their_registry_and_passwords_stay_hidden() {
        assert_eq!(image_registry("127.0.0.1:5000/apps/web:v1"), Some("127.0.0.1:5000"));
        assert_eq!(image_registry("registry.example/web"), Some("registry.example"));
        assert_eq!(image_registry("localhost/web"), Some("localhost"));
        assert_eq!(image_registry("library/busybox:1"), None);
        assert_eq!(image_registry("busybox"), None);
        let auth = RegistryAuth::new("127.0.0.1:5000", "ci", "hunter2").expect("auth");
        assert!(!format!("{auth:?}").contains("hunter2"));
        assert!(RegistryAuth::new("http://127.0.0.1:5000", "ci", "x").is_err());
    }
}
