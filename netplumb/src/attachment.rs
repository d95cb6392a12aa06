//! What an attach returns, shaped like the CNI result (interfaces, IPs, routes, DNS), and
//! the key that identifies an attachment.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Transport protocol of a port mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Publish `container_port` of the endpoint on `host_port` of the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    /// Port on the host.
    pub host_port: u16,
    /// Port inside the endpoint.
    pub container_port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

impl PortMapping {
    /// A TCP mapping.
    pub fn tcp(host_port: u16, container_port: u16) -> Self {
        PortMapping { host_port, container_port, protocol: Protocol::Tcp }
    }
}

/// Identifies an attachment the way a runtime does: network, endpoint (container) id and
/// the interface name inside it. One endpoint may hold several interfaces on one network.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttachmentKey {
    /// Network name.
    pub network: String,
    /// Endpoint (container) id.
    pub id: String,
    /// Interface name inside the endpoint.
    pub ifname: String,
}

impl AttachmentKey {
    /// A key.
    pub fn new(network: impl Into<String>, id: impl Into<String>, ifname: impl Into<String>) -> Self {
        AttachmentKey { network: network.into(), id: id.into(), ifname: ifname.into() }
    }
}

impl std::fmt::Display for AttachmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.network, self.id, self.ifname)
    }
}

/// A network interface the attachment created or uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Its name.
    pub name: String,
    /// Its MAC address (`02:42:0a:58:00:02`), if it has one.
    #[serde(default)]
    pub mac: Option<String>,
    /// Its MTU, if the driver set one.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The namespace it lives in; `None` for the host's side.
    #[serde(default)]
    pub sandbox: Option<PathBuf>,
}

/// An address given to one of the interfaces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with its prefix length (`10.88.0.2/16`).
    pub address: IpNet,
    /// The gateway on that subnet, if any.
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// Index into [`Attachment::interfaces`].
    pub interface: usize,
}

/// A route installed inside the endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination (`0.0.0.0/0` for the default route).
    pub dst: IpNet,
    /// Next hop, if not on-link.
    #[serde(default)]
    pub gw: Option<IpAddr>,
}

/// Resolver settings for the endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// Name servers.
    #[serde(default)]
    pub nameservers: Vec<IpAddr>,
    /// Search domains.
    #[serde(default)]
    pub search: Vec<String>,
}

/// An endpoint attached to a network: what a runtime needs to use it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Endpoint id (as in its spec).
    pub id: String,
    /// Its network.
    pub network: String,
    /// Interface name inside the endpoint.
    pub ifname: String,
    /// Interfaces: the host side first (if the driver made one), then the endpoint's.
    pub interfaces: Vec<Interface>,
    /// Addresses, each on one of `interfaces`.
    pub ips: Vec<IpConfig>,
    /// Routes inside the endpoint.
    pub routes: Vec<Route>,
    /// Resolver settings.
    pub dns: Dns,
    /// Ports published on the host.
    pub port_mappings: Vec<PortMapping>,
}

impl Attachment {
    /// The key that identifies it.
    pub fn key(&self) -> AttachmentKey {
        AttachmentKey::new(&self.network, &self.id, &self.ifname)
    }

    /// The addresses it is reachable at.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.ips.iter().map(|ip| ip.address.addr()).collect()
    }

    /// The first IPv4 address, if any.
    pub fn ipv4(&self) -> Option<std::net::Ipv4Addr> {
        self.ips.iter().find_map(|ip| match ip.address.addr() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
    }
}
