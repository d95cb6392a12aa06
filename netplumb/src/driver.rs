//! The `NetworkDriver` trait and what goes into it.

use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::attachment::{Attachment, AttachmentKey, PortMapping};
use crate::error::{Error, Result};

/// What to create.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NetworkSpec {
    /// Network name.
    pub name: String,
    /// Subnet in CIDR form, for drivers with IPAM (`10.88.0.0/16`).
    #[serde(default)]
    pub subnet: Option<String>,
    /// Link MTU, for drivers that create links.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Masquerade traffic from the network to addresses outside it (drivers with NAT).
    #[serde(default)]
    pub masquerade: bool,
    /// The host interface a macvlan network hangs off (`eth0`).
    #[serde(default)]
    pub parent: Option<String>,
    /// Name servers handed to endpoints in their attachment result.
    #[serde(default)]
    pub dns: Vec<std::net::IpAddr>,
}

impl NetworkSpec {
    /// A network with driver defaults.
    pub fn new(name: impl Into<String>) -> Self {
        NetworkSpec { name: name.into(), ..NetworkSpec::default() }
    }

    /// The same spec with `subnet`.
    pub fn with_subnet(mut self, subnet: impl Into<String>) -> Self {
        self.subnet = Some(subnet.into());
        self
    }

    /// The same spec with masquerade on.
    pub fn with_masquerade(mut self) -> Self {
        self.masquerade = true;
        self
    }
}

/// What to attach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct EndpointSpec {
    /// The network to attach to.
    pub network: String,
    /// Endpoint id (a container or task id).
    pub id: String,
    /// The endpoint's network namespace (`/var/run/netns/x`, `/proc/<pid>/ns/net`), for
    /// drivers that give endpoints their own namespace.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Interface name inside the namespace (at most 15 bytes, the kernel's limit).
    #[serde(default = "default_ifname")]
    pub ifname: String,
    /// Ports to publish.
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    /// The address the endpoint would like (the one it had before a restart or a
    /// stop-first update): given when it is in the network's pool and free, otherwise the
    /// endpoint gets the next free one as usual. A hint, never a reason to fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::IpAddr>,
}

fn default_ifname() -> String {
    "eth0".to_owned()
}

impl EndpointSpec {
    /// An endpoint with no namespace, `eth0`, and no port mappings.
    pub fn new(network: impl Into<String>, id: impl Into<String>) -> Self {
        EndpointSpec {
            network: network.into(),
            id: id.into(),
            netns: None,
            ifname: default_ifname(),
            port_mappings: Vec::new(),
            address: None,
        }
    }

    /// The same spec in namespace `netns`.
    pub fn in_netns(mut self, netns: impl Into<PathBuf>) -> Self {
        self.netns = Some(netns.into());
        self
    }

    /// The same spec publishing `mapping`.
    pub fn publish(mut self, mapping: PortMapping) -> Self {
        self.port_mappings.push(mapping);
        self
    }

    /// The same spec preferring `address` (see [`EndpointSpec::address`]).
    pub fn preferring(mut self, address: Option<std::net::IpAddr>) -> Self {
        self.address = address;
        self
    }

    /// The address asked for, as the IPv4 address pools hand out.
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for an IPv6 one: pools are IPv4.
    pub fn preferred_v4(&self) -> crate::error::Result<Option<std::net::Ipv4Addr>> {
        match self.address {
            None => Ok(None),
            Some(std::net::IpAddr::V4(a)) => Ok(Some(a)),
            Some(v6) => Err(crate::Error::InvalidInput {
                field: "address",
                value: v6.to_string(),
                reason: "pools hand out IPv4 addresses only".into(),
            }),
        }
    }

    /// The same spec with interface `ifname`.
    pub fn with_ifname(mut self, ifname: impl Into<String>) -> Self {
        self.ifname = ifname.into();
        self
    }

    /// What identifies this attachment.
    pub fn key(&self) -> AttachmentKey {
        AttachmentKey::new(&self.network, &self.id, &self.ifname)
    }
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
    /// Things removed (attachments, links, addresses, rules), described.
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
///
/// Attachments are identified by their [`AttachmentKey`] (network, endpoint id,
/// interface), as a CNI runtime identifies them; everything a driver creates for one is
/// tagged with it, so that [`gc`](NetworkDriver::gc) can reclaim what a crash left even
/// when the endpoint's namespace is gone.
#[async_trait]
pub trait NetworkDriver: Send + Sync + std::fmt::Debug {
    /// The driver's name.
    fn name(&self) -> &'static str;

    /// What it supports.
    fn capabilities(&self) -> NetworkCapabilities;

    /// Creates a network. [`Error::Conflict`] if the name is taken or its subnet
    /// overlaps another network's.
    async fn create_network(&self, spec: NetworkSpec) -> Result<NetworkInfo>;

    /// Deletes a network. [`Error::Conflict`] while endpoints are attached.
    async fn delete_network(&self, name: &str) -> Result<()>;

    /// Attaches an endpoint and returns what its runtime needs: interfaces, addresses,
    /// routes and DNS. [`Error::Conflict`] if the key is already attached. A failed
    /// attach leaves nothing behind.
    async fn attach(&self, spec: EndpointSpec) -> Result<Attachment>;

    /// Detaches an endpoint and releases what it held. Detaching something already gone
    /// (or on a network already deleted) succeeds: runtimes retry deletes.
    async fn detach(&self, key: &AttachmentKey) -> Result<()>;

    /// The attachment as the driver recorded it, after checking that what it created is
    /// still there. [`Error::NotFound`] if it is not attached; [`Error::Backend`] if
    /// something it created has gone missing.
    async fn check(&self, key: &AttachmentKey) -> Result<Attachment> {
        let info = self.inspect(&key.network).await?;
        info.endpoints.into_iter().find(|a| &a.key() == key).ok_or_else(|| Error::NotFound { kind: "attachment", name: key.to_string() })
    }

    /// A network and its endpoints.
    async fn inspect(&self, name: &str) -> Result<NetworkInfo>;

    /// Every network, sorted by name.
    async fn list(&self) -> Result<Vec<NetworkInfo>>;

    /// Detaches every attachment not in `valid` and reclaims what crashes left behind
    /// (addresses, links, rules no attachment owns).
    async fn gc(&self, valid: &[AttachmentKey]) -> Result<GcReport>;
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

/// An interface name the kernel accepts: 1 to 15 bytes, no `/`, whitespace or `:`, not
/// `.` or `..`.
pub fn validate_ifname(value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 15
        && value != "."
        && value != ".."
        && value.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput {
            field: "interface name",
            value: value.to_owned(),
            reason: "must be 1 to 15 printable bytes without '/', ':' or spaces (the kernel's IFNAMSIZ)".into(),
        })
    }
}
