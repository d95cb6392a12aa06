//! Consul HTTP API types (feature `consul`): what the Consul backend sends and receives,
//! read as Consul's API docs show them (the samples in `testkit/fixtures/consul`, in
//! the documented format, parse as they are), and the conversions to keelson's types.
//!
//! This is the first part of the Consul backend; the HTTP client with blocking queries,
//! KV with CAS and sessions comes next. Enterprise-only fields (`Namespace`) are accepted
//! and ignored; unknown fields are ignored too, since Consul adds fields over versions.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::discovery::{Health, Instance, Registration};
use crate::error::{Error, Result};
use crate::name::ServiceName;

const BACKEND: &str = "consul";

/// Consul refuses `DeregisterCriticalServiceAfter` below one minute.
pub const MIN_DEREGISTER_AFTER: Duration = Duration::from_secs(60);

fn malformed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Backend { backend: BACKEND, source: format!("malformed {what} from Consul: {e}").into() }
}

/// A node as `/v1/health/service` returns it.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    /// Node name.
    pub node: String,
    /// Node address.
    pub address: String,
    /// Datacenter.
    #[serde(default)]
    pub datacenter: String,
}

/// A service instance as the agent and health endpoints return it.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentService {
    /// Instance id.
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name.
    pub service: String,
    /// Tags.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Service address; empty means "the node's address".
    #[serde(default)]
    pub address: String,
    /// Metadata.
    #[serde(default)]
    pub meta: Option<BTreeMap<String, String>>,
    /// Port.
    pub port: u16,
}

/// One health check's state.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
#[must_use = "the checks stop when the handle is dropped"]
pub struct ConsulHealthCheck {
    /// Check id (`service:<id>` for a service's TTL check, `serfHealth` for the node).
    #[serde(rename = "CheckID")]
    pub check_id: String,
    /// `passing`, `warning`, `critical` or `maintenance`.
    pub status: String,
    /// The service it belongs to (empty for node checks).
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
}

/// One entry of `GET /v1/health/service/<name>`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthServiceEntry {
    /// The node.
    pub node: Node,
    /// The instance.
    pub service: AgentService,
    /// Node and service checks.
    #[serde(default)]
    pub checks: Vec<ConsulHealthCheck>,
}

/// `GET /v1/catalog/services`: service name to the union of its instances' tags.
pub type CatalogServices = BTreeMap<String, Vec<String>>;

/// One entry of `GET /v1/kv/<key>`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KvPair {
    /// Raft index at creation.
    pub create_index: u64,
    /// Raft index of the last write: what `?cas=` compares.
    pub modify_index: u64,
    /// The key.
    pub key: String,
    /// Opaque flags.
    #[serde(default)]
    pub flags: u64,
    /// The value, base64; `None` for a key with no value.
    #[serde(default)]
    pub value: Option<String>,
    /// The session holding the key, if any.
    #[serde(default)]
    pub session: Option<String>,
}

impl KvPair {
    /// The value's bytes (any bytes: Consul values are not text).
    pub fn value_bytes(&self) -> Result<Vec<u8>> {
        match &self.value {
            None => Ok(Vec::new()),
            Some(v) => {
                base64::engine::general_purpose::STANDARD.decode(v).map_err(|e| malformed(&format!("value of key {:?}", self.key), e))
            }
        }
    }
}

/// `PUT /v1/session/create` answer.
#[derive(Clone, Debug, Deserialize)]
pub struct SessionCreated {
    /// Session id.
    #[serde(rename = "ID")]
    pub id: String,
}

/// A TTL check the registering process keeps passing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct TtlCheck {
    /// Check id, `service:<id>`.
    #[serde(rename = "CheckID")]
    pub check_id: String,
    /// TTL, like `10s`.
    #[serde(rename = "TTL")]
    pub ttl: String,
    /// How long a critical instance stays registered (at least `1m`).
    pub deregister_critical_service_after: String,
    /// Status at registration.
    pub status: String,
}

/// `PUT /v1/agent/service/register` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceRegistration {
    /// Instance id.
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name.
    pub name: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Address.
    pub address: String,
    /// Port.
    pub port: u16,
    /// Metadata.
    pub meta: BTreeMap<String, String>,
    /// The TTL check.
    pub check: TtlCheck,
}

/// Consul's duration syntax for whole seconds (`90s`), at least one second.
pub fn duration_text(d: Duration) -> String {
    format!("{}s", d.as_secs().max(1) + u64::from(d.subsec_nanos() > 0))
}

impl ServiceRegistration {
    /// The agent registration for `r`: a TTL check kept passing by the handle, and
    /// deregistration of a critical instance after `max(3 × TTL, 1 minute)`.
    pub fn from_registration(r: &Registration) -> Result<ServiceRegistration> {
        r.validate()?;
        let status = match r.initial_health {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        };
        Ok(ServiceRegistration {
            id: r.id.clone(),
            name: r.service.to_string(),
            tags: r.tags.clone(),
            address: r.address.clone(),
            port: r.port,
            meta: r.meta.clone(),
            check: TtlCheck {
                check_id: format!("service:{}", r.id),
                ttl: duration_text(r.ttl),
                deregister_critical_service_after: duration_text((r.ttl * 3).max(MIN_DEREGISTER_AFTER)),
                status: status.into(),
            },
        })
    }
}

/// An instance's health from its checks, Consul's way: any critical (or maintenance)
/// check makes it critical, else any warning makes it warning, else passing.
pub fn aggregate_health(checks: &[ConsulHealthCheck]) -> Health {
    if checks.iter().any(|c| c.status == "critical" || c.status == "maintenance") {
        Health::Critical
    } else if checks.iter().any(|c| c.status == "warning") {
        Health::Warning
    } else {
        Health::Passing
    }
}

impl HealthServiceEntry {
    /// As a keelson instance. The address falls back to the node's when the service has
    /// none (Consul's rule); a service name that is not a DNS label is an error.
    pub fn to_instance(&self) -> Result<Instance> {
        let service = ServiceName::new(self.service.service.clone())?;
        let address = if self.service.address.is_empty() { self.node.address.clone() } else { self.service.address.clone() };
        Ok(Instance {
            service,
            id: self.service.id.clone(),
            address,
            port: self.service.port,
            tags: self.service.tags.clone().unwrap_or_default(),
            meta: self.service.meta.clone().unwrap_or_default(),
            health: aggregate_health(&self.checks),
        })
    }
}

/// Parses a JSON body from Consul into `T`; errors name what was being read.
pub fn parse<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| malformed(what, e))
}
