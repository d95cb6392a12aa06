//! `HostNetwork`: endpoints share the host's network namespace. Nothing is created in the
//! kernel; the driver keeps the bookkeeping so that code written against
//! `NetworkDriver` runs unchanged on a single machine.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::attachment::{Attachment, AttachmentKey, Dns, Interface, IpConfig};
use crate::driver::{validate_name, EndpointSpec, GcReport, NetworkCapabilities, NetworkDriver, NetworkInfo, NetworkSpec};
use crate::error::{Error, Result};

const BACKEND: &str = "host";

/// The trivial driver: an endpoint is reachable at the host's own addresses.
#[derive(Debug, Default)]
pub struct HostNetwork {
    networks: Mutex<BTreeMap<String, NetworkInfo>>,
}

impl HostNetwork {
    /// A driver with no networks.
    pub fn new() -> Self {
        HostNetwork::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NetworkInfo>> {
        self.networks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The host's addresses on interfaces that are up, loopback first.
pub fn host_addresses() -> Result<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })?;
    let mut out: Vec<IpAddr> = addrs
        .filter(|a| a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP))
        .filter_map(|a| {
            let sa = a.address?;
            sa.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())).or_else(|| sa.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        })
        .collect();
    out.sort_by_key(|ip| (!ip.is_loopback(), ip.is_ipv6(), *ip));
    out.dedup();
    Ok(out)
}

#[async_trait]
impl NetworkDriver for HostNetwork {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> NetworkCapabilities {
        NetworkCapabilities { isolated_endpoints: false, port_mappings: false, multi_host: false }
    }

    async fn create_network(&self, spec: NetworkSpec) -> Result<NetworkInfo> {
        validate_name("network name", &spec.name)?;
        if spec.subnet.is_some() || spec.mtu.is_some() || spec.masquerade || spec.parent.is_some() {
            return Err(Error::InvalidInput {
                field: "network spec",
                value: spec.name,
                reason: "the host network has no subnet, MTU, NAT or parent of its own".into(),
            });
        }
        let mut nets = self.lock();
        if nets.contains_key(&spec.name) {
            return Err(Error::Conflict { kind: "network", name: spec.name, reason: "already exists".into() });
        }
        let info = NetworkInfo { spec: spec.clone(), driver: BACKEND.into(), endpoints: Vec::new() };
        nets.insert(spec.name, info.clone());
        Ok(info)
    }

    async fn delete_network(&self, name: &str) -> Result<()> {
        let mut nets = self.lock();
        let net = nets.get(name).ok_or_else(|| Error::NotFound { kind: "network", name: name.to_owned() })?;
        if !net.endpoints.is_empty() {
            return Err(Error::Conflict {
                kind: "network",
                name: name.to_owned(),
                reason: format!("{} endpoints still attached", net.endpoints.len()),
            });
        }
        nets.remove(name);
        Ok(())
    }

    async fn attach(&self, spec: EndpointSpec) -> Result<Attachment> {
        validate_name("endpoint id", &spec.id)?;
        crate::driver::validate_ifname(&spec.ifname)?;
        if spec.netns.is_some() {
            return Err(Error::InvalidInput {
                field: "endpoint netns",
                value: spec.netns.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                reason: "host-network endpoints live in the host namespace".into(),
            });
        }
        if !spec.port_mappings.is_empty() {
            return Err(Error::Unsupported { operation: "port mappings (ports are already the host's)", backend: BACKEND });
        }
        let addresses = host_addresses()?;
        let mut nets = self.lock();
        let net = nets.get_mut(&spec.network).ok_or_else(|| Error::NotFound { kind: "network", name: spec.network.clone() })?;
        let key = spec.key();
        if net.endpoints.iter().any(|e| e.key() == key) {
            return Err(Error::Conflict { kind: "attachment", name: key.to_string(), reason: "already attached".into() });
        }
        let ips = addresses.into_iter().map(|a| IpConfig { address: ipnet::IpNet::from(a), gateway: None, interface: 0 }).collect();
        let endpoint = Attachment {
            interfaces: vec![Interface { name: "host".into(), mac: None, mtu: None, sandbox: None }],
            id: spec.id,
            network: spec.network,
            ifname: spec.ifname,
            ips,
            routes: Vec::new(),
            dns: Dns { nameservers: net.spec.dns.clone(), search: Vec::new() },
            port_mappings: Vec::new(),
        };
        net.endpoints.push(endpoint.clone());
        net.endpoints.sort_by_key(|a| a.key());
        Ok(endpoint)
    }

    async fn detach(&self, key: &AttachmentKey) -> Result<()> {
        if let Some(net) = self.lock().get_mut(&key.network) {
            net.endpoints.retain(|e| &e.key() != key);
        }
        Ok(())
    }

    async fn inspect(&self, name: &str) -> Result<NetworkInfo> {
        self.lock().get(name).cloned().ok_or_else(|| Error::NotFound { kind: "network", name: name.to_owned() })
    }

    async fn list(&self) -> Result<Vec<NetworkInfo>> {
        Ok(self.lock().values().cloned().collect())
    }

    async fn gc(&self, valid: &[AttachmentKey]) -> Result<GcReport> {
        // Nothing is ever created in the kernel: only bookkeeping is reclaimed.
        let mut report = GcReport::default();
        for net in self.lock().values_mut() {
            net.endpoints.retain(|e| {
                let keep = valid.contains(&e.key());
                if !keep {
                    report.removed.push(format!("attachment {}", e.key()));
                }
                keep
            });
        }
        Ok(report)
    }
}
