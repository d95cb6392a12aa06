//! The `NetworkDriver` trait and its types.

use std::net::IpAddr;
use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What to create.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// Network name.
    pub name: String,
    /// Subnet in CIDR form, for drivers with IPAM (`10.88.0.0/16`).
    #[serde(default)]
    pub subnet: Option<String>,
    /// Link MTU, for drivers that create links.
    #[serde(default)]
    pub mtu: Option<u32>,
}

impl NetworkSpec {
    /// A network with driver defaults.
    pub fn new(name: impl Into<String>) -> Self {
        NetworkSpec { name: name.into(), subnet: None, mtu: None }
    }
}

/// Transport protocol of a port mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// Publish `container_port` of the endpoint on `host_port` of the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    /// Port on the host.
    pub host_port: u16,
    /// Port inside the endpoint.
    pub container_port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// What to attach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// The network to attach to.
    pub network: String,
    /// Endpoint id (a container or task id).
    pub id: String,
    /// The endpoint's network namespace (`/var/run/netns/x`, `/proc/<pid>/ns/net`), for
    /// drivers that give endpoints their own namespace.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Interface name inside the namespace.
    #[serde(default = "default_ifname")]
    pub ifname: String,
    /// Ports to publish.
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
}

fn default_ifname() -> String {
    "eth0".to_owned()
}

impl EndpointSpec {
    /// An endpoint with no namespace, `eth0`, and no port mappings.
    pub fn new(network: impl Into<String>, id: impl Into<String>) -> Self {
        EndpointSpec { network: network.into(), id: id.into(), netns: None, ifname: default_ifname(), port_mappings: Vec::new() }
    }
}

/// An endpoint attached to a network: what a runtime needs to use it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Endpoint id (as in its spec).
    pub id: String,
    /// Its network.
    pub network: String,
    /// Addresses it is reachable at.
    pub addresses: Vec<IpAddr>,
    /// Interface name.
    pub ifname: String,
}

/// A network and its endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    /// The spec it was created with.
    pub spec: NetworkSpec,
    /// The driver that owns it.
    pub driver: String,
    /// Attached endpoints, sorted by id.
    pub endpoints: Vec<Attachment>,
}

/// What `gc` reclaimed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Things removed (links, addresses, rules), described.
    pub removed: Vec<String>,
}

/// What a network driver supports.
///
/// A backend outside this crate starts from `default()` (nothing supported) and sets
/// the fields it supports: `let mut caps = NetworkCapabilities::default(); caps.isolated_endpoints = true;`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetworkCapabilities {
    /// Endpoints get their own network namespace.
    pub isolated_endpoints: bool,
    /// Port mappings are supported.
    pub port_mappings: bool,
    /// Networks span hosts.
    pub multi_host: bool,
}

/// Creates networks and attaches endpoints to them.
#[async_trait]
pub trait NetworkDriver: Send + Sync + std::fmt::Debug {
    /// The driver's name.
    fn name(&self) -> &'static str;

    /// What it supports.
    fn capabilities(&self) -> NetworkCapabilities;

    /// Creates a network. [`Error::Conflict`] if the name is taken.
    async fn create_network(&self, spec: NetworkSpec) -> Result<NetworkInfo>;

    /// Deletes a network. [`Error::Conflict`] while endpoints are attached.
    async fn delete_network(&self, name: &str) -> Result<()>;

    /// Attaches an endpoint and returns its addresses.
    async fn attach(&self, spec: EndpointSpec) -> Result<Attachment>;

    /// Detaches an endpoint. [`Error::NotFound`] if it is not attached.
    async fn detach(&self, network: &str, id: &str) -> Result<()>;

    /// A network and its endpoints.
    async fn inspect(&self, name: &str) -> Result<NetworkInfo>;

    /// Every network, sorted by name.
    async fn list(&self) -> Result<Vec<NetworkInfo>>;

    /// Reclaims what a crash left behind (links, addresses, rules with no owner).
    async fn gc(&self) -> Result<GcReport>;
}

/// A network or endpoint name: 1 to 64 of `A-Za-z0-9_.-`, starting alphanumeric, so it is
/// safe in interface names, file names and keys.
pub fn validate_name(field: &'static str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && value.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput {
            field,
            value: value.to_owned(),
            reason: "must be 1 to 64 of A-Za-z0-9_.- starting with a letter or digit".into(),
        })
    }
}
