//! What a task is, in the words shared by the parts of the crate: the spec a driver
//! runs, its limits, ports, mounts, restart policy and health check, its state and status,
//! and its output lines. Orchestration stores these in its specs and results; the runtime's
//! drivers take and return them. Data only: nothing here runs anything.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{validate_id, Error, Result};

/// What to run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Task id, unique on the driver (an allocation id, say).
    pub id: String,
    /// Image to run, for drivers that run images; ignored by the process driver.
    #[serde(default)]
    pub image: Option<String>,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default)]
    pub working_dir: Option<PathBuf>,
    /// Labels kept with the task (job, allocation, version), for adoption and listing.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// CPU and memory limits, for drivers that enforce them.
    #[serde(default)]
    pub limits: Option<Limits>,
    /// Ports published on the host, for drivers that isolate networking.
    #[serde(default)]
    pub ports: Vec<PortMapping>,
    /// Host directories (volumes) mounted into the task.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// A named network to attach to (Docker: a network created beforehand).
    #[serde(default)]
    pub network: Option<String>,
    /// On a keelson network, the address the task would like (the one its slot had
    /// before a stop-first update): given when the network has it free, otherwise the
    /// task gets another. A hint, never a reason to fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::IpAddr>,
    /// Restart the task on the node when it fails (none: a failed task stays exited and
    /// the scheduler replaces it).
    #[serde(default)]
    pub restart: Option<RestartPolicy>,
    /// A check the driver runs inside the task (Docker: the container's health check),
    /// reported as [`TaskStatus::health`]. Drivers without one refuse it.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
}

/// A command run inside a task to tell whether it is healthy (exit 0: healthy).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// Program and arguments (run directly, no shell: use `sh -c` for one).
    pub command: Vec<String>,
    /// Time between checks.
    #[serde(with = "crate::records::humantime_serde_compat")]
    pub interval: Duration,
    /// A check running longer fails.
    #[serde(with = "crate::records::humantime_serde_compat")]
    pub timeout: Duration,
    /// Consecutive failures before the task is unhealthy.
    pub retries: u32,
}

/// What a task's own health check says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TaskHealth {
    /// Not passed yet.
    Starting,
    /// Passing.
    Healthy,
    /// Failed `retries` times in a row.
    Unhealthy,
}

/// Restarts of a failed task in place: after a non-zero exit or a signal (never after
/// exit 0 or a `stop`), wait, then run it again, the wait doubling from `initial_backoff`
/// up to `max_backoff` (plus up to as much again of jitter in the process driver; Docker
/// applies its own schedule), at most `max_restarts` times. While it waits the task reports
/// `Running` (as Docker reports a restarting container) and [`TaskStatus::restarts`]
/// counts the restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// Restarts allowed before the task is left exited.
    pub max_restarts: u32,
    /// The first wait.
    #[serde(with = "crate::records::humantime_serde_compat")]
    pub initial_backoff: Duration,
    /// The longest wait.
    #[serde(with = "crate::records::humantime_serde_compat")]
    pub max_backoff: Duration,
}

impl RestartPolicy {
    /// The wait before restart number `n` (0-based) before jitter: doubling, capped.
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.initial_backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// CPU, memory and process-count limits of a task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU in thousandths of a core (0: no limit).
    pub cpu_millis: u64,
    /// Memory in MiB (0: no limit; Docker needs at least 6).
    pub memory_mb: u64,
    /// Processes and threads at most (0: no limit): a fork bomb stops here.
    #[serde(default)]
    pub pids: u64,
}

impl Limits {
    /// Limits on cpu (thousandths of a core) and memory (MiB), no process limit.
    pub fn new(cpu_millis: u64, memory_mb: u64) -> Self {
        Limits { cpu_millis, memory_mb, pids: 0 }
    }

    /// Also at most `pids` processes and threads.
    pub fn with_pids(mut self, pids: u64) -> Self {
        self.pids = pids;
        self
    }
}

/// A port a task serves on, reached on the host's `host` port. Drivers that map ports
/// (Docker) publish `host` to `container`; drivers that run on the host's network (the
/// process driver) need the two equal and tell the task its port in its environment
/// (`PORT`, and `KEELSON_PORT_<NAME>` when named).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// The port inside the task (1 to 65535).
    pub container: u16,
    /// The host port (1 to 65535).
    pub host: u16,
    /// A name for the port (the service it serves), for `KEELSON_PORT_<NAME>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl PortMapping {
    /// `host` published to `container`, unnamed.
    pub fn new(container: u16, host: u16) -> Self {
        PortMapping { container, host, name: None }
    }

    /// The same port, named.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The variable that tells the task this port: `KEELSON_PORT_WEB` for `web`
    /// (upper case; characters other than letters and digits become `_`).
    pub fn env_name(&self) -> Option<String> {
        let name = self.name.as_ref()?;
        let upper: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
        Some(format!("KEELSON_PORT_{upper}"))
    }
}

/// Where a mount's data lives on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum MountSource {
    /// A host directory (a [`crate::LocalVolumes`] volume's data directory).
    HostDir(PathBuf),
    /// A Docker named volume (a [`crate::DockerVolumes`] volume), by name.
    DockerVolume(String),
}

/// A volume mounted into a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// Where the data lives (a volume's [`crate::Volume::source`]).
    pub source: MountSource,
    /// Where it appears in the task (absolute).
    pub target: PathBuf,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
}

impl std::fmt::Display for MountSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MountSource::HostDir(dir) => write!(f, "{}", dir.display()),
            MountSource::DockerVolume(name) => write!(f, "volume {name}"),
        }
    }
}

impl TaskSpec {
    /// A task running `command`.
    pub fn new(id: impl Into<String>, command: impl IntoIterator<Item = impl Into<String>>) -> Self {
        TaskSpec { id: id.into(), command: command.into_iter().map(Into::into).collect(), ..TaskSpec::default() }
    }

    /// Adds an environment variable.
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Adds a label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Checks the spec before anything starts.
    pub fn validate(&self) -> Result<()> {
        validate_id("task id", &self.id)?;
        match self.command.first() {
            // An image without a command runs the image's own (its CMD).
            None if self.image.is_some() => {}
            None => return Err(Error::invalid("command", "", format!("task {:?}: must name a program", self.id))),
            Some(p) if p.is_empty() => return Err(Error::invalid("command", "", format!("task {:?}: program must not be empty", self.id))),
            _ => {}
        }
        if let Some(k) = self.env.keys().find(|k| k.is_empty() || k.contains('=') || k.contains('\0')) {
            return Err(Error::invalid("env name", k, "must be non-empty without '=' or NUL"));
        }
        let mut hosts = std::collections::BTreeSet::new();
        for p in &self.ports {
            if p.container == 0 || p.host == 0 {
                return Err(Error::invalid("port", format!("{}:{}", p.host, p.container), "host and container ports must be 1 to 65535"));
            }
            if !hosts.insert(p.host) {
                return Err(Error::invalid("port", p.host.to_string(), "host port published twice"));
            }
        }
        for m in &self.mounts {
            let lexical_escape = |p: &std::path::Path| p.components().any(|c| matches!(c, std::path::Component::ParentDir));
            let source_ok = match &m.source {
                MountSource::HostDir(dir) => dir.is_absolute() && !lexical_escape(dir),
                MountSource::DockerVolume(name) => validate_id("volume name", name).is_ok(),
            };
            if !source_ok || !m.target.is_absolute() || lexical_escape(&m.target) {
                return Err(Error::invalid(
                    "mount",
                    format!("{}:{}", m.source, m.target.display()),
                    "source must be an absolute path without '..' or a volume name, target an absolute path without '..'",
                ));
            }
        }
        if let Some(h) = &self.health_check {
            if h.command.first().is_none_or(String::is_empty) {
                return Err(Error::invalid("health check", "", format!("task {:?}: the check must name a program", self.id)));
            }
            if h.interval < Duration::from_millis(1) || h.timeout < Duration::from_millis(1) {
                return Err(Error::invalid(
                    "health check",
                    format!("{:?}/{:?}", h.interval, h.timeout),
                    "interval and timeout must be at least 1 ms",
                ));
            }
        }
        if let Some(l) = self.limits {
            if l.memory_mb != 0 && l.memory_mb < 6 {
                return Err(Error::invalid("memory_mb", l.memory_mb.to_string(), "at least 6 MiB (Docker's minimum), or 0 for no limit"));
            }
        }
        Ok(())
    }
}

/// Where a task is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// Running.
    Running,
    /// Finished: by its own exit (`code`) or by a signal.
    Exited {
        /// Exit code, if it exited by itself.
        code: Option<i32>,
        /// Signal number, if a signal ended it.
        signal: Option<i32>,
    },
}

impl TaskState {
    /// Whether the task has finished.
    pub fn is_exited(self) -> bool {
        matches!(self, TaskState::Exited { .. })
    }
}

/// A task as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// Task id.
    pub id: String,
    /// Current state.
    pub state: TaskState,
    /// Labels given at start.
    pub labels: BTreeMap<String, String>,
    /// When it started (its latest run, after a restart).
    pub started_at: SystemTime,
    /// Restarts in place so far (see [`RestartPolicy`]).
    #[serde(default)]
    pub restarts: u32,
    /// The task's own health check (Docker: a `HEALTHCHECK` of the image or
    /// [`TaskSpec::health_check`]); `None` when it has none.
    #[serde(default)]
    pub health: Option<TaskHealth>,
    /// Output lines longer than [`MAX_LINE_BYTES`] were cut into this many extra pieces
    /// (each marked [`OutputLine::partial`]); 0 where the driver does not count them.
    #[serde(default)]
    pub output_lines_split: u64,
    /// Output lines a reader of [`Driver::output`] missed because it fell behind the
    /// task (the driver never blocks a task on a slow reader; it counts instead).
    #[serde(default)]
    pub output_lines_dropped: u64,
    /// The task's own address on its network (a keelson network the driver attached
    /// it to); `None`: it is reached at its node's address and published port.
    #[serde(default)]
    pub address: Option<std::net::IpAddr>,
}

/// The longest output line kept whole: longer ones are split into pieces this long.
pub use keelson_logship::MAX_LINE_BYTES;

/// Which output stream a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line of a task's output, without its newline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputLine {
    /// Stdout or stderr.
    pub stream: OutputStream,
    /// The text (invalid UTF-8 replaced).
    pub line: String,
    /// When the driver read it.
    pub timestamp: SystemTime,
    /// A piece of a line longer than [`MAX_LINE_BYTES`], with more of it to come.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

/// A file name a secret may have (and each `/`-separated part of a secret's name in the
/// cluster store): 1 to 128 of `A-Za-z0-9_.-`, not starting with a dot.
pub fn is_secret_file_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_task_may_leave_the_command_to_the_image() {
        let mut spec = TaskSpec::new("t1", Vec::<String>::new());
        assert!(matches!(spec.validate(), Err(Error::InvalidInput { .. })), "no image, no command: nothing to run");
        spec.image = Some("registry.test/shop:1".into());
        spec.validate().expect("the image's CMD runs");
        spec.command = vec![String::new()];
        assert!(spec.validate().is_err(), "an empty program is still refused");
    }
}
