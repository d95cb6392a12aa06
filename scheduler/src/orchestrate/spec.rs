//! What a group or a run executes, as orchestration stores it: the task template, the
//! service it offers, and one record per group version. The node agent reads these and
//! turns them into a driver's [`TaskSpec`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::orchestrate::reconcile::DesiredGroup;
use crate::task::{HealthCheck, Limits, RestartPolicy, TaskSpec};

/// Label holding the node an agent started a task for.
pub const NODE_LABEL: &str = "keelson.node";

/// What a group's allocations run, one record per version (old and new versions run side
/// by side during a deployment).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpec {
    /// Job, group, version, count, resources and dynamic ports.
    pub desired: DesiredGroup,
    /// The task each allocation runs.
    pub task: TaskTemplate,
    /// The service each allocation offers, if any.
    #[serde(default)]
    pub service: Option<ServiceSpec>,
    /// Who made this version, when, and what it changed: a group's versions with their
    /// notes are its release timeline ([`ClusterStore::group_versions`](crate::ClusterStore::group_versions)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseNote>,
}

/// Who made a version of a group, when, and what it changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseNote {
    /// Who (a user, a pipeline).
    pub by: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What changed (`deploy 4be2c1d`, `config set GREETING`, `rollback to v3`).
    pub change: String,
}

/// The task of a group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTemplate {
    /// Image (for image drivers).
    #[serde(default)]
    pub image: Option<String>,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// CPU and memory limits.
    #[serde(default)]
    pub limits: Option<Limits>,
    /// Where each of the group's volumes appears in the task: volume request name to an
    /// absolute path. The agent's [`VolumeManager`](crate::VolumeManager) supplies (or creates) the volume.
    #[serde(default)]
    pub mounts: BTreeMap<String, std::path::PathBuf>,
    /// Restart a failed task in place before the allocation counts as failed.
    #[serde(default)]
    pub restart: Option<RestartPolicy>,
    /// A check run inside the task (Docker health check); the allocation is healthy only
    /// while it passes (and the service's probe, if any).
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Secrets the task finds as files under [`SECRETS_MOUNT`](crate::SECRETS_MOUNT): file
    /// name → the secret's name in the cluster store ([`ClusterStore::put_secret`](crate::ClusterStore::put_secret)).
    /// The agent needs a secrets directory ([`NodeAgent::with_secret_files`](crate::NodeAgent::with_secret_files)).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
}

impl TaskTemplate {
    /// The task `id` runs: this template's program, image, environment, limits, restart
    /// policy and health check. Ports, mounts and labels are the caller's.
    pub fn to_spec(&self, id: impl Into<String>) -> TaskSpec {
        TaskSpec {
            image: self.image.clone(),
            env: self.env.clone(),
            limits: self.limits,
            restart: self.restart,
            health_check: self.health_check.clone(),
            ..TaskSpec::new(id, self.command.clone())
        }
    }
}

/// A service offered by each allocation of a group, on the allocation's first host port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Service name (a DNS label).
    pub name: String,
    /// The port inside the task, published on the allocation's host port.
    pub port: u16,
    /// Tags, route tags included (`keelson.http.host=web.example`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// HTTP path that must answer 2xx/3xx for the allocation to count as healthy (none:
    /// a TCP connect).
    #[serde(default)]
    pub http_check: Option<String>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_template_carries_everything_it_names_into_the_task() {
        let template = TaskTemplate {
            image: Some("web:2".into()),
            command: vec!["/web".into()],
            env: BTreeMap::from([("MODE".to_owned(), "prod".to_owned())]),
            limits: Some(Limits::new(500, 64)),
            mounts: BTreeMap::new(),
            // Secrets become a mount the agent adds (it reads them from the store).
            secrets: BTreeMap::new(),
            restart: Some(RestartPolicy {
                max_restarts: 3,
                initial_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
            }),
            health_check: Some(HealthCheck {
                command: vec!["/check".into()],
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                retries: 2,
            }),
        };
        let spec = template.to_spec("a1");
        assert_eq!(spec.id, "a1");
        assert_eq!(spec.command, template.command);
        assert_eq!((spec.image, spec.env, spec.limits), (template.image.clone(), template.env.clone(), template.limits));
        assert_eq!((spec.restart, spec.health_check), (template.restart, template.health_check.clone()));
        assert!(spec.ports.is_empty() && spec.mounts.is_empty() && spec.labels.is_empty(), "those are the caller's");
    }
}
