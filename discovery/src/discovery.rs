//! `Discovery`: register service instances, look them up, follow them as they change.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::name::{validate_instance_id, ServiceName};

/// Health of one instance, as set by its checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Serving; included in healthy lookups.
    Passing,
    /// Degraded but serving; included in healthy lookups (as Consul does).
    Warning,
    /// Not serving; excluded from healthy lookups.
    Critical,
}

impl Health {
    /// Whether healthy-only lookups include this instance.
    pub fn is_healthy(self) -> bool {
        !matches!(self, Health::Critical)
    }
}

/// What to register. Build with [`Registration::new`] and the `with_*` methods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// The service.
    pub service: ServiceName,
    /// Instance id, unique within the service.
    pub id: String,
    /// Host name or IP address to reach the instance at.
    pub address: String,
    /// Port to reach the instance at.
    pub port: u16,
    /// Free-form tags; routing reads `keelson.http.host=<host>` from here.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Free-form metadata.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// How long the registration outlives its handle's last keep-alive.
    #[serde(default = "default_ttl", with = "duration_secs")]
    pub ttl: Duration,
    /// Health until a check says otherwise.
    #[serde(default = "default_health")]
    pub initial_health: Health,
}

/// Most tags one registration may carry.
pub const MAX_TAGS: usize = 64;
/// Longest tag, in bytes.
pub const MAX_TAG_BYTES: usize = 255;
/// Most metadata entries one registration may carry.
pub const MAX_META: usize = 64;
/// Longest metadata key, in bytes.
pub const MAX_META_KEY_BYTES: usize = 128;
/// Longest metadata value, in bytes.
pub const MAX_META_VALUE_BYTES: usize = 512;

/// Default registration TTL: 10 s, renewed every ~3.3 s by the handle.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

fn default_ttl() -> Duration {
    DEFAULT_TTL
}

fn default_health() -> Health {
    Health::Passing
}

mod duration_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

impl Registration {
    /// A registration with no tags, no metadata, [`DEFAULT_TTL`] and passing health.
    pub fn new(service: ServiceName, id: impl Into<String>, address: impl Into<String>, port: u16) -> Self {
        Registration {
            service,
            id: id.into(),
            address: address.into(),
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            ttl: DEFAULT_TTL,
            initial_health: Health::Passing,
        }
    }

    /// Adds a tag.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Adds a metadata entry.
    pub fn with_meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.meta.insert(key.into(), value.into());
        self
    }

    /// Sets the TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the health the instance starts with.
    pub fn with_initial_health(mut self, health: Health) -> Self {
        self.initial_health = health;
        self
    }

    /// Checks every field; called by every backend before anything is stored.
    pub fn validate(&self) -> Result<()> {
        validate_instance_id(&self.id)?;
        if self.address.is_empty()
            || self.address.len() > 253
            || self.address.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/')
        {
            return Err(Error::InvalidInput {
                field: "address",
                value: self.address.clone(),
                reason: "must be a host name or IP address".into(),
            });
        }
        if self.port == 0 {
            return Err(Error::InvalidInput { field: "port", value: "0".into(), reason: "must be 1 to 65535".into() });
        }
        if let Some(tag) = self.tags.iter().find(|t| t.is_empty() || t.chars().any(char::is_control)) {
            return Err(Error::InvalidInput {
                field: "tag",
                value: tag.clone(),
                reason: "must be non-empty without control characters".into(),
            });
        }
        self.validate_sizes()?;
        crate::kv::validate_ttl(self.ttl)
    }

    /// Limits keep a record small enough for every backend (Consul's 512 KB KV values, a
    /// DNS answer) and stop a runaway registration from bloating every lookup.
    fn validate_sizes(&self) -> Result<()> {
        let invalid = |field: &'static str, value: String, reason: String| Err(Error::InvalidInput { field, value, reason });
        if self.tags.len() > MAX_TAGS {
            return invalid("tags", self.tags.len().to_string(), format!("at most {MAX_TAGS} tags"));
        }
        if let Some(tag) = self.tags.iter().find(|t| t.len() > MAX_TAG_BYTES) {
            return invalid("tag", tag.chars().take(32).collect::<String>() + "...", format!("at most {MAX_TAG_BYTES} bytes"));
        }
        if self.meta.len() > MAX_META {
            return invalid("meta", self.meta.len().to_string(), format!("at most {MAX_META} entries"));
        }
        for (k, v) in &self.meta {
            if k.is_empty() || k.len() > MAX_META_KEY_BYTES || k.chars().any(char::is_control) {
                return invalid(
                    "meta key",
                    k.chars().take(32).collect(),
                    format!("1 to {MAX_META_KEY_BYTES} bytes without control characters"),
                );
            }
            if v.len() > MAX_META_VALUE_BYTES {
                return invalid(
                    "meta value",
                    k.clone(),
                    format!("the value of {k:?} is {} bytes; at most {MAX_META_VALUE_BYTES}", v.len()),
                );
            }
        }
        Ok(())
    }
}

/// One registered instance as lookups return it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Instance {
    /// The service.
    pub service: ServiceName,
    /// Instance id.
    pub id: String,
    /// Address to connect to.
    pub address: String,
    /// Port to connect to.
    pub port: u16,
    /// Tags.
    pub tags: Vec<String>,
    /// Metadata.
    pub meta: BTreeMap<String, String>,
    /// Current health.
    pub health: Health,
}

impl Instance {
    /// The value of the first tag `key=value`, if any.
    pub fn tag_value(&self, key: &str) -> Option<&str> {
        self.tags.iter().find_map(|t| t.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
    }
}

/// Which instances a lookup or watch wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    /// One service, or every service when `None`.
    pub service: Option<ServiceName>,
    /// Only instances whose health is not critical.
    pub healthy_only: bool,
    /// Only instances carrying this exact tag.
    pub tag: Option<String>,
}

impl Query {
    /// Every instance of `service`, whatever its health.
    pub fn service(service: ServiceName) -> Self {
        Query { service: Some(service), ..Query::default() }
    }

    /// Every instance of every service.
    pub fn all() -> Self {
        Query::default()
    }

    /// Keep only healthy instances.
    pub fn healthy(mut self) -> Self {
        self.healthy_only = true;
        self
    }

    /// Keep only instances with `tag`.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// Whether `instance` matches.
    pub fn matches(&self, instance: &Instance) -> bool {
        self.service.as_ref().is_none_or(|s| *s == instance.service)
            && (!self.healthy_only || instance.health.is_healthy())
            && self.tag.as_ref().is_none_or(|t| instance.tags.contains(t))
    }
}

/// A consistent view of a query's instances at a backend version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Backend version the view was read at; increases along a watch.
    pub version: u64,
    /// Matching instances, sorted by service then id.
    pub instances: Vec<Instance>,
    /// Set while the backend is failing: `instances` is then the last good view, kept
    /// rather than emptied, and this says why it may be stale. Cleared by the next
    /// snapshot after the backend answers again.
    pub error: Option<String>,
}

/// A watch: each item is a complete snapshot. Backend errors are retried inside the
/// stream and reported once per outage as a snapshot with [`Snapshot::error`] set; a
/// snapshot is never emptied because of an error.
pub type SnapshotStream = BoxStream<'static, Snapshot>;

/// What a `Discovery` backend can do.
///
/// A backend outside this crate starts from `default()` (nothing supported) and sets
/// the fields it supports: `let mut caps = DiscoveryCapabilities::default(); caps.register = true;`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiscoveryCapabilities {
    /// `register` and `deregister` work (DNS, for one, is read-only).
    pub register: bool,
    /// `set_health` works.
    pub set_health: bool,
    /// `watch` and `instances` accept a query over all services.
    pub query_all_services: bool,
}

impl DiscoveryCapabilities {
    /// Capabilities with every flag given.
    pub fn new(register: bool, set_health: bool, query_all_services: bool) -> Self {
        DiscoveryCapabilities { register, set_health, query_all_services }
    }
}

/// Keeps a registration alive; see [`RegistrationHandle`].
#[async_trait]
pub trait RegistrationLease: Send + Sync + std::fmt::Debug {
    /// Removes the registration now.
    async fn release(&self) -> Result<()>;
}

/// Returned by [`Discovery::register`]. While it lives, the registration is kept alive.
/// Dropping it ends the registration: the instance disappears within its TTL (at once on
/// [`crate::KvDiscovery`], whose instances share one lease per process and TTL; after the
/// TTL on Consul, whose check stops being renewed). If the process dies, every instance
/// it registered disappears after its TTL. Call [`RegistrationHandle::deregister`] to
/// remove it at once and see any error.
#[derive(Debug)]
#[must_use = "the registration is released when the handle is dropped; keep it for as long as the instance should be listed"]
pub struct RegistrationHandle {
    service: ServiceName,
    id: String,
    lease: Box<dyn RegistrationLease>,
}

impl RegistrationHandle {
    /// Wraps a backend's lease.
    pub fn new(service: ServiceName, id: String, lease: Box<dyn RegistrationLease>) -> Self {
        RegistrationHandle { service, id, lease }
    }

    /// The registered service.
    pub fn service(&self) -> &ServiceName {
        &self.service
    }

    /// The registered instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Removes the registration now.
    pub async fn deregister(self) -> Result<()> {
        self.lease.release().await
    }
}

/// Service discovery: register instances, look them up, watch them change.
#[async_trait]
pub trait Discovery: Send + Sync + std::fmt::Debug {
    /// The backend's name.
    fn backend(&self) -> &'static str;

    /// What this backend supports.
    fn capabilities(&self) -> DiscoveryCapabilities;

    /// Registers (or replaces) an instance; the handle keeps it alive.
    async fn register(&self, registration: Registration) -> Result<RegistrationHandle>;

    /// Removes an instance. [`Error::NotFound`] if it is not registered.
    async fn deregister(&self, service: &ServiceName, id: &str) -> Result<()>;

    /// Sets an instance's health. [`Error::NotFound`] if it is not registered.
    async fn set_health(&self, service: &ServiceName, id: &str, health: Health) -> Result<()>;

    /// Instances matching `query`, sorted by service then id.
    async fn instances(&self, query: &Query) -> Result<Vec<Instance>>;

    /// Names of services with at least one instance, sorted.
    async fn services(&self) -> Result<Vec<ServiceName>>;

    /// Follows `query`: the first item is the current snapshot, then one per change.
    async fn watch(&self, query: Query) -> Result<SnapshotStream>;
}
