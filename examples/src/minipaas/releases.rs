//! Releases: every deploy, config change and rollback of an app is a new version of each
//! of its services' scheduler groups, with a [`ReleaseNote`] saying who, when and what
//! changed. The timeline is read back from the groups' versions: there is no second
//! history beside the scheduler's.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use keelson_examples::minipaas::{apps::Apps, releases::Releases};
//! let kv: Arc<dyn keelson_discovery::KeyValue> = Arc::new(keelson_discovery::MemoryKv::new());
//! let apps = Apps::new(kv.clone(), "keelson");
//! let releases = Releases::new(keelson_scheduler::ClusterStore::new(kv, "keelson/cluster"), apps.clone());
//! apps.create("shop", "[services.web]\nport = 8080\n", "ada").await?;
//! releases.deploy("shop", "127.0.0.1:5000/shop:1a2b3c", "ada", "deploy 1a2b3c").await?;
//! apps.config_set("shop", &[("GREETING".into(), "hi".into())]).await?;
//! releases.roll_config("shop", "ada", "config set GREETING").await?;
//! let timeline = releases.timeline("shop").await?;
//! assert_eq!(timeline.iter().map(|r| r.version).collect::<Vec<_>>(), [1, 2]);
//! assert_eq!(timeline[1].change, "config set GREETING");
//! # Ok(()) }
//! ```

use keelson_scheduler::{ClusterStore, GroupSpec, ReleaseNote};
use serde::Serialize;

use super::apps::{Apps, AppsError};

/// Why a release could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseError {
    /// The app, its manifest or its config.
    #[error(transparent)]
    App(#[from] AppsError),
    /// The cluster store refused or failed.
    #[error(transparent)]
    Scheduler(#[from] keelson_scheduler::Error),
    /// Nothing to release from or back to.
    #[error("{0}")]
    Nothing(String),
    /// A release of this service is still rolling out.
    #[error("{0}: a release is still rolling out; wait for it (or roll it back) first")]
    Busy(String),
}

/// One release of one service, as the timeline shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Release {
    /// The service.
    pub service: String,
    /// Its group version.
    pub version: u64,
    /// The image it runs.
    pub image: String,
    /// Who made it.
    pub by: String,
    /// When (milliseconds since the Unix epoch).
    pub at_ms: u64,
    /// What changed.
    pub change: String,
    /// Whether it is the version that runs now (the group's stable version).
    pub current: bool,
}

/// Releases of apps, made through a cluster store.
#[derive(Clone, Debug)]
pub struct Releases {
    store: ClusterStore,
    apps: Apps,
}

impl Releases {
    /// Releases through `store`, of the apps in `apps`.
    pub fn new(store: ClusterStore, apps: Apps) -> Releases {
        Releases { store, apps }
    }

    /// Deploys `image` as the next release of every service of `app` that builds its
    /// image (services naming an image of their own keep it). Returns the versions made.
    pub async fn deploy(&self, app: &str, image: &str, by: &str, change: &str) -> Result<Vec<(String, u64)>, ReleaseError> {
        self.release(app, by, change, |_, spec| spec.image.clone().unwrap_or_else(|| image.to_owned())).await
    }

    /// A new release of every service of `app` with its current image and the app's
    /// config as it is now (a `config set` or `unset`): a rolling restart under each
    /// service's strategy.
    pub async fn roll_config(&self, app: &str, by: &str, change: &str) -> Result<Vec<(String, u64)>, ReleaseError> {
        let mut current = std::collections::BTreeMap::new();
        for (service, _) in self.apps.get(app).await?.parsed().map_err(AppsError::from)?.services {
            let versions = self.store.group_versions(app, &service).await?;
            let Some(last) = versions.last().and_then(|g| g.task.image.clone()) else {
                return Err(ReleaseError::Nothing(format!("{app}/{service} was never deployed: deploy it first")));
            };
            current.insert(service, last);
        }
        self.release(app, by, change, |service, _| current[service].clone()).await
    }

    async fn release(
        &self,
        app: &str,
        by: &str,
        change: &str,
        image_of: impl Fn(&str, &super::manifest::Service) -> String,
    ) -> Result<Vec<(String, u64)>, ReleaseError> {
        let record = self.apps.get(app).await?;
        let manifest = record.parsed().map_err(AppsError::from)?;
        let config = self.apps.config(app).await?;
        let secrets = self.apps.secret_names(app).await?;
        // All services or none: refused before any is released while one is rolling.
        for name in manifest.services.keys() {
            if self.store.group_state(app, name).await?.is_some_and(|s| s.deployment.is_some()) {
                return Err(ReleaseError::Busy(format!("{app}/{name}")));
            }
        }
        let mut made = Vec::new();
        for (name, service) in &manifest.services {
            let version = self.next_version(app, name).await?;
            let mut spec = service.group_spec(app, name, &image_of(name, service), &config, version);
            spec.release = Some(note(by, change));
            // Each secret a file named after it; the values stay in the store.
            spec.task.secrets = secrets.iter().map(|k| (k.clone(), format!("{app}/{k}"))).collect();
            self.store.deploy(&spec, service.strategy(), service.gates()).await?;
            made.push((name.clone(), version));
        }
        Ok(made)
    }

    /// Goes back to release `to` of `service` (default: the version before the one that
    /// runs now), as a new release: the same image and environment, the current count.
    pub async fn rollback(&self, app: &str, service: &str, to: Option<u64>, by: &str) -> Result<u64, ReleaseError> {
        let manifest = self.apps.get(app).await?.parsed().map_err(AppsError::from)?;
        let svc = manifest.services.get(service).ok_or_else(|| ReleaseError::Nothing(format!("{app} has no service {service:?}")))?;
        let versions = self.store.group_versions(app, service).await?;
        let state = self.store.group_state(app, service).await?;
        let stable = state.as_ref().map_or(0, |s| s.stable);
        let target = match to {
            Some(v) => versions.iter().find(|g| g.desired.version == v),
            None => versions.iter().rev().find(|g| g.desired.version < stable),
        }
        .ok_or_else(|| match to {
            Some(v) => ReleaseError::Nothing(format!("{app}/{service} has no release v{v}")),
            None => ReleaseError::Nothing(format!("{app}/{service} has no release before v{stable}")),
        })?;
        let version = self.next_version(app, service).await?;
        let mut spec: GroupSpec = target.clone();
        spec.desired.version = version;
        if let Some(state) = &state {
            spec.desired.count = state.count;
        }
        spec.release = Some(note(by, &format!("rollback to v{}", target.desired.version)));
        self.store.deploy(&spec, svc.strategy(), svc.gates()).await?;
        Ok(version)
    }

    /// Every release of every service of `app`, oldest first.
    pub async fn timeline(&self, app: &str) -> Result<Vec<Release>, ReleaseError> {
        let manifest = self.apps.get(app).await?.parsed().map_err(AppsError::from)?;
        let mut out = Vec::new();
        for service in manifest.services.keys() {
            let stable = self.store.group_state(app, service).await?.map(|s| s.stable);
            for g in self.store.group_versions(app, service).await? {
                let note = g.release.clone().unwrap_or(ReleaseNote { by: String::new(), at_ms: 0, change: String::new() });
                out.push(Release {
                    service: service.clone(),
                    version: g.desired.version,
                    image: g.task.image.clone().unwrap_or_default(),
                    by: note.by,
                    at_ms: note.at_ms,
                    change: note.change,
                    current: stable == Some(g.desired.version),
                });
            }
        }
        out.sort_by_key(|r| (r.at_ms, r.version));
        Ok(out)
    }

    async fn next_version(&self, app: &str, service: &str) -> Result<u64, ReleaseError> {
        let stored = self.store.group_versions(app, service).await?.last().map_or(0, |g| g.desired.version);
        let state = self.store.group_state(app, service).await?.map_or(0, |s| s.stable);
        Ok(stored.max(state) + 1)
    }
}

fn note(by: &str, change: &str) -> ReleaseNote {
    ReleaseNote { by: by.to_owned(), at_ms: keelson_scheduler::wall_clock_ms(), change: change.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    async fn platform() -> (Apps, Releases) {
        let kv: Arc<dyn keelson_discovery::KeyValue> = Arc::new(keelson_discovery::MemoryKv::new());
        let apps = Apps::new(kv.clone(), "t");
        let releases = Releases::new(ClusterStore::new(kv, "t/cluster"), apps.clone());
        // No replicas: with no node to run on, each rollout ends at the controller's next tick.
        apps.create("shop", "[services.web]\nport = 8080\nreplicas = 0\n[services.worker]\nimage = \"busybox\"\nreplicas = 0\n", "ada")
            .await
            .expect("app");
        (apps, releases)
    }

    #[tokio::test]
    async fn deploys_config_changes_and_rollbacks_are_group_versions() {
        let (apps, releases) = platform().await;
        assert!(matches!(releases.roll_config("shop", "ada", "config").await, Err(ReleaseError::Nothing(_))), "nothing deployed yet");
        let made = releases.deploy("shop", "reg/shop:1", "ada", "deploy 1").await.expect("deploy");
        assert_eq!(made, vec![("web".to_owned(), 1), ("worker".to_owned(), 1)]);
        let controller = keelson_scheduler::Controller::new(releases.store.clone());
        releases.deploy("shop", "reg/shop:2", "bob", "deploy 2").await.expect("deploy 2");
        assert!(matches!(releases.deploy("shop", "reg/shop:x", "eve", "too soon").await, Err(ReleaseError::Busy(_))));
        // The store itself refuses it too, and keeps nothing of it.
        let mut late = releases.store.group_version("shop", "web", 2).await.expect("v2");
        late.desired.version = 9;
        let refused = releases.store.deploy(&late, keelson_scheduler::Strategy::default(), keelson_scheduler::Gates::default()).await;
        assert!(matches!(refused, Err(keelson_scheduler::Error::Conflict { .. })), "{refused:?}");
        assert!(releases.store.group_versions("shop", "web").await.expect("versions").iter().all(|g| g.desired.version != 9));
        controller.tick().await.expect("tick");
        apps.config_set("shop", &[("GREETING".into(), "hi".into())]).await.expect("config");
        releases.roll_config("shop", "ada", "config set GREETING").await.expect("config release");
        controller.tick().await.expect("tick");
        let store = &releases.store;
        let v3 = store.group_version("shop", "web", 3).await.expect("v3");
        assert_eq!(v3.task.image.as_deref(), Some("reg/shop:2"), "the config release keeps the image");
        assert_eq!(v3.task.env["GREETING"], "hi");
        let worker = store.group_version("shop", "worker", 3).await.expect("worker v3");
        assert_eq!(worker.task.image.as_deref(), Some("busybox"), "a service with its own image keeps it");

        let timeline = releases.timeline("shop").await.expect("timeline");
        let web: Vec<(u64, &str, &str)> =
            timeline.iter().filter(|r| r.service == "web").map(|r| (r.version, r.by.as_str(), r.change.as_str())).collect();
        assert_eq!(web, [(1, "ada", "deploy 1"), (2, "bob", "deploy 2"), (3, "ada", "config set GREETING")]);

        // Back to v1 explicitly: a new release, v4, running v1's image and environment.
        let v4 = releases.rollback("shop", "web", Some(1), "ada").await.expect("rollback");
        assert_eq!(v4, 4);
        let back = store.group_version("shop", "web", 4).await.expect("v4");
        assert_eq!(back.task.image.as_deref(), Some("reg/shop:1"));
        assert!(!back.task.env.contains_key("GREETING"), "v1's environment");
        assert_eq!(back.release.expect("note").change, "rollback to v1");
        assert!(matches!(releases.rollback("shop", "web", Some(99), "ada").await, Err(ReleaseError::Nothing(_))));
        assert!(matches!(releases.rollback("shop", "db", None, "ada").await, Err(ReleaseError::Nothing(_))));
    }
}
