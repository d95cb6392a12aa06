//! The platform's operations, one code path for every mode: what the controller's API
//! ([`super::api`]) and dashboard ([`super::dashboard`]) call, over any `KeyValue`
//! (`MemoryKv` for `minipaas demo`, etcd for `minipaas up`).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use keelson_examples::minipaas::platform::Platform;
//! let kv: Arc<dyn keelson_discovery::KeyValue> = Arc::new(keelson_discovery::MemoryKv::new());
//! let platform = Platform::new(kv, "keelson");
//! platform.apps.create("shop", "[services.web]\nport = 8080\nreplicas = 0\n", "ada").await?;
//! platform.deploy_image("shop", "127.0.0.1:5000/shop:1", "ada").await?;
//! platform.scale("shop", "web", 2, "ada").await?;
//! assert_eq!(platform.info("shop").await?.services[0].count, 2);
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::{Discovery, KeyValue, KvDiscovery, Query, ServiceName};
use keelson_scheduler::{AllocStatus, ClusterStore, Resources, RunResult, RunSpec};
use serde::{Deserialize, Serialize};

pub use super::apps::cluster_root;
use super::apps::{App, Apps, AppsError};
use super::manifest::Manifest;
use super::releases::{Release, ReleaseError, Releases};

/// Why an operation failed; the API answers with [`PlatformError::status`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlatformError {
    /// Apps, config or secrets.
    #[error(transparent)]
    App(#[from] AppsError),
    /// A release.
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// The cluster store.
    #[error(transparent)]
    Scheduler(#[from] keelson_scheduler::Error),
    /// Discovery.
    #[error("catalog: {0}")]
    Catalog(#[from] keelson_discovery::Error),
    /// A request naming something that is not there, or a bad value.
    #[error("{0}")]
    Invalid(String),
    /// Something this platform was started without (no builder, no log server).
    #[error("{0}")]
    Unavailable(String),
}

impl PlatformError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            PlatformError::App(AppsError::NotFound(_)) => 404,
            PlatformError::App(AppsError::Exists(_)) => 409,
            PlatformError::App(AppsError::InvalidInput { .. } | AppsError::Manifest(_)) => 400,
            PlatformError::Release(ReleaseError::Busy(_)) => 409,
            PlatformError::Release(ReleaseError::Nothing(_)) | PlatformError::Invalid(_) => 400,
            PlatformError::Release(ReleaseError::App(AppsError::NotFound(_))) => 404,
            PlatformError::Release(ReleaseError::App(AppsError::InvalidInput { .. } | AppsError::Manifest(_))) => 400,
            PlatformError::Scheduler(keelson_scheduler::Error::Conflict { .. }) => 409,
            PlatformError::Unavailable(_) => 501,
            _ => 503,
        }
    }
}

/// An app with its services' state, as `minipaas info` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppInfo {
    /// The app record (name, manifest, who made it and when).
    pub app: App,
    /// Each service.
    pub services: Vec<ServiceInfo>,
    /// Its config keys (values: `minipaas config`).
    pub config_keys: Vec<String>,
    /// Its secrets' names (never their values).
    pub secrets: Vec<String>,
}

/// One service's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Its name in the manifest.
    pub name: String,
    /// The release that runs (0: never deployed).
    pub release: u64,
    /// How many tasks it should have.
    pub count: u32,
    /// A release rolling out now, if any.
    pub rolling_out: Option<u64>,
    /// The host names edge routes to it.
    pub domains: Vec<String>,
}

/// One instance, as `minipaas ps` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The allocation (and task) id.
    pub id: String,
    /// Its service.
    pub service: String,
    /// Its release.
    pub release: u64,
    /// The node it runs on.
    pub node: String,
    /// `pending`, `running`, `failed` or `stopping`.
    pub status: String,
    /// Whether it passes its health check and is in the catalog (what edge routes to).
    pub healthy: bool,
    /// Where it answers (`address:port`), once known.
    pub address: Option<String>,
    /// Restarts in place.
    pub restarts: u32,
}

/// What a one-off run is asked to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRequest {
    /// The program and its arguments, exactly as given (no shell in between).
    pub command: Vec<String>,
    /// The service whose image and config it runs with (default: the first).
    #[serde(default)]
    pub service: Option<String>,
    /// Its time limit (default 10 minutes).
    #[serde(default, with = "humantime_serde_opt")]
    pub time_limit: Option<Duration>,
}

mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| humantime::parse_duration(&t).map_err(|e| serde::de::Error::custom(format!("time_limit {t:?}: {e}"))))
            .transpose()
    }
}

/// The platform: apps, releases and the cluster they run on.
#[derive(Clone, Debug)]
pub struct Platform {
    /// Apps, config and secrets.
    pub apps: Apps,
    /// Releases.
    pub releases: Releases,
    /// The cluster store the node agents follow.
    pub store: ClusterStore,
    catalog: Arc<dyn Discovery>,
}

impl Platform {
    /// The platform whose state is under `root` in `kv`: apps under `<root>/minipaas`,
    /// the cluster (as the node agents are given it) under `<root>/cluster`, the catalog
    /// as the agents register in it ([`KvDiscovery`] over the same store).
    pub fn new(kv: Arc<dyn KeyValue>, root: &str) -> Platform {
        let apps = Apps::new(kv.clone(), root);
        let store = ClusterStore::new(kv.clone(), cluster_root(root));
        Platform { releases: Releases::new(store.clone(), apps.clone()), apps, store, catalog: Arc::new(KvDiscovery::new(kv)) }
    }

    /// The app with its services' state.
    pub async fn info(&self, name: &str) -> Result<AppInfo, PlatformError> {
        let app = self.apps.get(name).await?;
        let manifest = app.parsed().map_err(AppsError::from)?;
        let mut services = Vec::new();
        for (service, spec) in &manifest.services {
            let state = self.store.group_state(name, service).await?;
            services.push(ServiceInfo {
                name: service.clone(),
                release: state.as_ref().map_or(0, |s| s.stable),
                count: state.as_ref().map_or(spec.replicas, |s| s.count),
                rolling_out: state.as_ref().and_then(|s| s.deployment.as_ref()).map(|d| d.to_version()),
                domains: spec.domains.clone(),
            });
        }
        Ok(AppInfo {
            config_keys: self.apps.config(name).await?.into_keys().collect(),
            secrets: self.apps.secret_names(name).await?,
            app,
            services,
        })
    }

    /// Deletes the app: stops its services, then forgets it, its config and secrets.
    pub async fn delete(&self, name: &str) -> Result<bool, PlatformError> {
        if self.apps.get(name).await.is_ok() {
            match self.store.stop(name, None).await {
                // Never deployed: nothing runs.
                Ok(_) | Err(keelson_scheduler::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.apps.delete(name).await?)
    }

    /// Deploys `image` as the next release of the app's built services.
    pub async fn deploy_image(&self, app: &str, image: &str, by: &str) -> Result<Vec<(String, u64)>, PlatformError> {
        if image.trim().is_empty() || image.chars().any(char::is_whitespace) {
            return Err(PlatformError::Invalid(format!("image {image:?}: not an image reference")));
        }
        Ok(self.releases.deploy(app, image, by, &format!("deploy {image}")).await?)
    }

    /// Every release of the app, oldest first.
    pub async fn timeline(&self, app: &str) -> Result<Vec<Release>, PlatformError> {
        Ok(self.releases.timeline(app).await?)
    }

    /// Sets and unsets config keys, then rolls the app's services with it (when it was
    /// ever deployed). Returns the releases made.
    pub async fn change_config(
        &self,
        app: &str,
        set: &[(String, String)],
        unset: &[String],
        by: &str,
    ) -> Result<Vec<(String, u64)>, PlatformError> {
        if set.is_empty() && unset.is_empty() {
            return Err(PlatformError::Invalid("nothing to set or unset".into()));
        }
        self.ensure_idle(app).await?;
        if !set.is_empty() {
            self.apps.config_set(app, set).await?;
        }
        if !unset.is_empty() {
            self.apps.config_unset(app, unset).await?;
        }
        // Keys only: the values may be credentials someone put in config after all.
        let mut change: Vec<String> = set.iter().map(|(k, _)| format!("set {k}")).collect();
        change.extend(unset.iter().map(|k| format!("unset {k}")));
        match self.releases.roll_config(app, by, &format!("config {}", change.join(", "))).await {
            Ok(made) => Ok(made),
            // Never deployed: the config waits for the first deploy.
            Err(ReleaseError::Nothing(_)) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Sets (`Some`) or removes (`None`) a secret, then rolls the app so its tasks get the
    /// files as they are now. Returns the releases made (none before the first deploy).
    pub async fn change_secret(&self, app: &str, key: &str, value: Option<&str>, by: &str) -> Result<Vec<(String, u64)>, PlatformError> {
        self.ensure_idle(app).await?;
        let change = match value {
            Some(v) => {
                self.apps.secret_set(app, key, v).await?;
                format!("secret set {key}")
            }
            None => {
                if !self.apps.secret_unset(app, key).await? {
                    return Err(PlatformError::Invalid(format!("{app} has no secret {key}")));
                }
                format!("secret unset {key}")
            }
        };
        match self.releases.roll_config(app, by, &change).await {
            Ok(made) => Ok(made),
            Err(ReleaseError::Nothing(_)) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Sets how many tasks `service` runs.
    pub async fn scale(&self, app: &str, service: &str, count: u32, by: &str) -> Result<(), PlatformError> {
        self.service_of(app, service).await?;
        if count > 1000 {
            return Err(PlatformError::Invalid(format!("{service}={count}: at most 1000 tasks per service")));
        }
        tracing::info!(app, service, count, by, "scale");
        Ok(self.store.scale(app, service, count).await?)
    }

    /// Refuses a change while a release of the app rolls out: the change would be stored
    /// and its release refused, leaving the two apart.
    async fn ensure_idle(&self, app: &str) -> Result<(), PlatformError> {
        let manifest = self.apps.get(app).await?.parsed().map_err(AppsError::from)?;
        for service in manifest.services.keys() {
            if self.store.group_state(app, service).await?.is_some_and(|s| s.deployment.is_some()) {
                return Err(ReleaseError::Busy(format!("{app}/{service}")).into());
            }
        }
        Ok(())
    }

    async fn service_of(&self, app: &str, service: &str) -> Result<(Manifest, super::manifest::Service), PlatformError> {
        let manifest = self.apps.get(app).await?.parsed().map_err(AppsError::from)?;
        let spec = manifest.services.get(service).cloned().ok_or_else(|| {
            PlatformError::Invalid(format!("{app} has no service {service:?} (it has: {})", names(manifest.services.keys())))
        })?;
        Ok((manifest, spec))
    }

    /// The app's instances: node, status, health (in the catalog) and address.
    pub async fn ps(&self, app: &str) -> Result<Vec<Instance>, PlatformError> {
        let manifest = self.apps.get(app).await?.parsed().map_err(AppsError::from)?;
        let mut healthy = BTreeMap::new();
        for service in manifest.services.keys() {
            if let Ok(name) = ServiceName::new(format!("{app}-{service}")) {
                for i in self.catalog.instances(&Query::service(name).healthy()).await? {
                    healthy.insert(i.id.clone(), format!("{}:{}", i.address, i.port));
                }
            }
        }
        let mut out: Vec<Instance> = self
            .store
            .view()
            .await?
            .allocations
            .into_iter()
            .filter(|a| a.job == app && manifest.services.contains_key(&a.group))
            .map(|a| Instance {
                address: healthy.get(&a.id).cloned().or_else(|| a.address.map(|ip| ip.to_string())),
                healthy: healthy.contains_key(&a.id),
                status: match a.status {
                    AllocStatus::Pending => "pending",
                    AllocStatus::Running => "running",
                    AllocStatus::Failed => "failed",
                    AllocStatus::Stopping => "stopping",
                }
                .to_owned(),
                id: a.id,
                service: a.group,
                release: a.version,
                node: a.node,
                restarts: a.restarts,
            })
            .collect();
        out.sort_by(|a, b| (&a.service, &a.id).cmp(&(&b.service, &b.id)));
        Ok(out)
    }

    /// Starts a one-off run from the image and config of a service's running release;
    /// returns its id (follow it with [`Platform::run_result`]).
    pub async fn run(&self, app: &str, request: &RunRequest, by: &str) -> Result<String, PlatformError> {
        if request.command.is_empty() {
            return Err(PlatformError::Invalid("run: no command".into()));
        }
        let manifest = self.apps.get(app).await?.parsed().map_err(AppsError::from)?;
        let service = match &request.service {
            Some(s) => s.clone(),
            None => manifest.services.keys().next().cloned().ok_or_else(|| PlatformError::Invalid(format!("{app} has no services")))?,
        };
        let (_, spec) = self.service_of(app, &service).await?;
        let stable = self.store.group_state(app, &service).await?.map_or(0, |s| s.stable);
        if stable == 0 {
            return Err(PlatformError::Invalid(format!("{app}/{service} was never deployed: deploy it first")));
        }
        let release = self.store.group_version(app, &service, stable).await?;
        let mut task = release.task.clone();
        task.command = request.command.clone();
        // A one-off is not a service: no health check of the service's, no restarts.
        task.health_check = None;
        task.restart = None;
        task.mounts.clear();
        let id = format!("{app}-run-{}", short_id());
        let spec = RunSpec {
            id: id.clone(),
            job: app.to_owned(),
            task,
            resources: Resources::new(u64::from(spec.cpu), u64::from(spec.memory_mb)),
            time_limit: request.time_limit.unwrap_or(Duration::from_secs(600)),
        };
        tracing::info!(app, run = %id, by, command = ?request.command, "one-off run");
        self.store.submit_run(&spec).await?;
        Ok(id)
    }

    /// A run's result, `None` while it runs.
    pub async fn run_result(&self, id: &str) -> Result<Option<RunResult>, PlatformError> {
        Ok(self.store.run_result(id).await?)
    }

    /// Adds `domain` to `service`'s domains (a new manifest, and a new release routed by
    /// it when the service was deployed).
    pub async fn add_domain(&self, app: &str, service: &str, domain: &str, by: &str) -> Result<Vec<(String, u64)>, PlatformError> {
        if !is_domain(domain) {
            return Err(PlatformError::Invalid(format!("domain {domain:?}: not a host name")));
        }
        let (_, spec) = self.service_of(app, service).await?;
        if spec.port.is_none() {
            return Err(PlatformError::Invalid(format!("{app}/{service} has no port: nothing to route {domain} to")));
        }
        self.ensure_idle(app).await?;
        let record = self.apps.get(app).await?;
        let mut doc: toml::Table =
            toml::from_str(&record.manifest).map_err(|e| PlatformError::Invalid(format!("{app}/minipaas.toml: {e}")))?;
        let domains = doc
            .get_mut("services")
            .and_then(|s| s.get_mut(service))
            .and_then(|s| s.as_table_mut())
            .map(|t| t.entry("domains").or_insert_with(|| toml::Value::Array(Vec::new())))
            .and_then(|d| d.as_array_mut())
            .ok_or_else(|| PlatformError::Invalid(format!("{app}/minipaas.toml: services.{service}.domains is not a list")))?;
        if domains.iter().any(|d| d.as_str() == Some(domain)) {
            return Ok(Vec::new());
        }
        domains.push(toml::Value::String(domain.to_owned()));
        let text = toml::to_string(&doc).map_err(|e| PlatformError::Invalid(e.to_string()))?;
        self.apps.set_manifest(app, &text).await?;
        match self.releases.roll_config(app, by, &format!("domains add {domain} to {service}")).await {
            Ok(made) => Ok(made),
            Err(ReleaseError::Nothing(_)) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }
}

fn names<'a>(it: impl Iterator<Item = &'a String>) -> String {
    it.map(String::as_str).collect::<Vec<_>>().join(", ")
}

/// A host name: dot-separated labels of a-z0-9- (lower case), 1 to 253 characters.
pub fn is_domain(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && s.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Eight hex digits from the clock and a counter: unique enough for run ids.
fn short_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{:08x}", (t as u32) ^ n.wrapping_mul(0x9E37_79B9))
}
