//! `BridgeNetwork`: a Linux bridge per network, a veth pair per attachment (its peer
//! created directly inside the endpoint's namespace), addresses from [`LocalIpam`],
//! masquerade and published ports in nftables.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ipnet::{IpNet, Ipv4Net};

use super::firewall::{Firewall, BRIDGE_PREFIX};
use super::nft::Nft;
use super::state::{stable_hash, NetworkStore, StoredNetwork};
use super::{links, netns};
use crate::attachment::{Attachment, AttachmentKey, Dns, Interface, IpConfig, Route};
use crate::driver::{validate_ifname, validate_name, EndpointSpec, GcReport, NetworkCapabilities, NetworkDriver, NetworkInfo, NetworkSpec};
use crate::error::{Error, Result};
use crate::ipam::{Ipam, Lease, LeaseRequest, LocalIpam, Pool};

const BACKEND: &str = "bridge";
/// Where state lives by default: tmpfs, so a reboot clears it with the containers.
pub const DEFAULT_STATE_DIR: &str = "/run/keelson/netplumb";
/// Link aliases of attachments start with this, followed by the attachment key.
const ALIAS_PREFIX: &str = "keelson:";

/// Where a kernel driver keeps its state and which namespace is its host.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct KernelConfig {
    /// State directory (networks and IPAM journals). Default [`DEFAULT_STATE_DIR`].
    pub state_dir: PathBuf,
    /// The namespace that plays the host (bridges, NAT, published ports); `None` is the
    /// namespace of the process. Tests and one-machine clusters use one per host.
    pub host_netns: Option<PathBuf>,
    /// MTU of networks that do not set one.
    pub default_mtu: u32,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig { state_dir: DEFAULT_STATE_DIR.into(), host_netns: None, default_mtu: 1500 }
    }
}

impl KernelConfig {
    /// State in `dir`, the process's own namespace as host.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        KernelConfig { state_dir: dir.into(), ..KernelConfig::default() }
    }
}

/// Netlink sockets inside the host namespace.
#[derive(Debug)]
pub(crate) struct HostSide {
    pub(crate) ns: Option<File>,
    pub(crate) rtnl: rtnetlink::Handle,
    /// Deletes attachments' links, batching concurrent deletions.
    pub(crate) deleter: links::Deleter,
    pub(crate) nft: Mutex<Nft>,
}

impl HostSide {
    /// Opens the sockets inside `netns` (they stay bound to it) and drives the rtnetlink
    /// connection on the current runtime.
    pub(crate) fn open(netns: Option<&std::path::Path>) -> Result<HostSide> {
        let ns = netns.map(netns::open).transpose()?;
        // The socket registers with the runtime's reactor as it is made.
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| Error::Backend { backend: "netlink", source: format!("the kernel drivers need a tokio runtime: {e}").into() })?;
        let (conn, rtnl, nft) = netns::run_in(ns.as_ref(), || -> Result<_> {
            let _entered = runtime.enter();
            let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| Error::Backend { backend: "netlink", source: Box::new(e) })?;
            let nft = Nft::open().map_err(|e| Error::Backend { backend: "nftables", source: Box::new(e) })?;
            Ok((conn, handle, nft))
        })??;
        tokio::spawn(conn);
        let deleter = links::Deleter::start(rtnl.clone());
        Ok(HostSide { ns, deleter, rtnl, nft: Mutex::new(nft) })
    }

    pub(crate) fn nft(&self) -> std::sync::MutexGuard<'_, Nft> {
        self.nft.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a sysctl of the host namespace.
    pub(crate) fn sysctl(&self, name: &str, value: &str) -> Result<()> {
        netns::run_in(self.ns.as_ref(), || netns::write_sysctl(name, value))?
    }
}

/// The bridge driver.
#[derive(Clone, Debug)]
pub struct BridgeNetwork {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: KernelConfig,
    networks: NetworkStore,
    ipam: LocalIpam,
    host: HostSide,
}

/// The bridge of network `name`: `kpb` and 8 hex digits of its hash (fits IFNAMSIZ).
pub(crate) fn bridge_name(network: &str) -> String {
    format!("{BRIDGE_PREFIX}{:08x}", stable_hash(network) as u32)
}

/// The host end of an attachment's veth: `kpv` and 12 hex digits of its key's hash.
pub(crate) fn host_link_name(key: &AttachmentKey) -> String {
    format!("kpv{:012x}", stable_hash(&key.to_string()) & 0xffff_ffff_ffff)
}

/// A locally administered MAC derived from the address (as Docker does), so the result
/// needs no read-back.
pub(crate) fn mac_for(address: Ipv4Addr) -> [u8; 6] {
    let o = address.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

pub(crate) fn mac_string(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Subnets tried, in order, for a network created without one.
fn default_subnets() -> impl Iterator<Item = Pool> {
    (0..=255u8).filter_map(|n| Pool::parse(&format!("10.89.{n}.0/24")).ok())
}

/// The MTU of a spec, checked.
pub(crate) fn checked_mtu(spec: &NetworkSpec, default: u32) -> Result<u32> {
    let mtu = spec.mtu.unwrap_or(default);
    if !(576..=65535).contains(&mtu) {
        return Err(Error::InvalidInput { field: "mtu", value: mtu.to_string(), reason: "must be 576 to 65535".into() });
    }
    Ok(mtu)
}

/// The pool of a new network: its subnet if given (refused if it overlaps another
/// network's), else the first free default one.
pub(crate) fn choose_pool(spec: &NetworkSpec, existing: &[StoredNetwork]) -> Result<Pool> {
    match &spec.subnet {
        Some(cidr) => {
            let pool = Pool::parse(cidr)?;
            if let Some(other) = existing.iter().find(|n| n.pool.overlaps(&pool)) {
                return Err(Error::Conflict {
                    kind: "subnet",
                    name: cidr.clone(),
                    reason: format!("overlaps {} of network {}", other.pool.subnet, other.spec.name),
                });
            }
            Ok(pool)
        }
        None => default_subnets().find(|p| existing.iter().all(|n| !n.pool.overlaps(p))).ok_or_else(|| Error::Conflict {
            kind: "subnet",
            name: spec.name.clone(),
            reason: "every default subnet (10.89.0.0/16 in /24s) is taken: give one".into(),
        }),
    }
}

/// The attachment a lease describes on `net`.
pub(crate) fn attachment_of(net: &StoredNetwork, lease: &Lease) -> Attachment {
    let pool = net.pool;
    let prefix = pool.subnet.prefix_len();
    let mut interfaces = Vec::new();
    if let Some(host) = &lease.host_link {
        interfaces.push(Interface { name: host.clone(), mac: None, mtu: Some(net.mtu), sandbox: None });
    }
    interfaces.push(Interface {
        name: lease.key.ifname.clone(),
        mac: Some(mac_string(mac_for(lease.address))),
        mtu: Some(net.mtu),
        sandbox: lease.netns.clone(),
    });
    let endpoint_if = interfaces.len() - 1;
    let gateway = IpAddr::V4(pool.gateway);
    Attachment {
        id: lease.key.id.clone(),
        network: lease.key.network.clone(),
        ifname: lease.key.ifname.clone(),
        ips: vec![IpConfig {
            address: IpNet::V4(Ipv4Net::new(lease.address, prefix).unwrap_or_default()),
            gateway: Some(gateway),
            interface: endpoint_if,
        }],
        routes: vec![Route { dst: "0.0.0.0/0".parse().unwrap_or_else(|_| IpNet::V4(Ipv4Net::default())), gw: Some(gateway) }],
        dns: Dns { nameservers: net.spec.dns.clone(), search: Vec::new() },
        interfaces,
        port_mappings: lease.ports.clone(),
    }
}

/// Validates what every kernel driver needs of an endpoint and opens its namespace.
pub(crate) fn open_endpoint(spec: &EndpointSpec, backend: &'static str) -> Result<File> {
    validate_name("endpoint id", &spec.id)?;
    validate_ifname(&spec.ifname)?;
    let Some(path) = &spec.netns else {
        return Err(Error::InvalidInput {
            field: "endpoint netns",
            value: String::new(),
            reason: format!("{backend} endpoints need a network namespace (/var/run/netns/x, /proc/<pid>/ns/net)"),
        });
    };
    netns::open(path)
}

/// Runs `work` with a netlink handle inside the namespace `ns`: one thread joins the
/// namespace and drives its own connection there.
pub(crate) async fn in_namespace<F>(ns: File, work: F) -> Result<()>
where
    F: FnOnce(rtnetlink::Handle) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>>>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let outcome = (|| -> Result<()> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::Backend { backend: "netns", source: format!("joining the endpoint's namespace: {e}").into() })?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| Error::Backend { backend: "netlink", source: Box::new(e) })?;
            rt.block_on(async {
                let h = links::connect()?;
                work(h).await
            })
        })();
        let _ = tx.send(outcome);
    });
    rx.await.map_err(|_| Error::Backend { backend: "netns", source: "the thread inside the endpoint's namespace died".into() })?
}

/// Inside the endpoint's namespace: address, default route, and no IPv6 DAD delay.
pub(crate) async fn configure_in_namespace(ns: File, ifname: String, address: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> Result<()> {
    in_namespace(ns, move |h| {
        Box::pin(async move {
            // The address is ours: duplicate address detection only delays IPv6 here.
            let _ = netns::write_sysctl(&format!("net/ipv6/conf/{ifname}/accept_dad"), "0");
            links::configure_endpoint(&h, &ifname, address, prefix, gateway).await
        })
    })
    .await
}

impl BridgeNetwork {
    /// A driver with its state in `config.state_dir`, acting on `config.host_netns`.
    /// Must be called inside a tokio runtime (it drives a netlink connection on it).
    pub fn open(config: KernelConfig) -> Result<BridgeNetwork> {
        let networks = NetworkStore::open(config.state_dir.join("networks"))?;
        let ipam = LocalIpam::open(config.state_dir.join("ipam"))?;
        let host = HostSide::open(config.host_netns.as_deref())?;
        Ok(BridgeNetwork { inner: Arc::new(Inner { config, networks, ipam, host }) })
    }

    /// The spec of network `name`, if it exists (cheaper than [`NetworkDriver::inspect`]:
    /// no leases are read).
    pub fn network_spec(&self, name: &str) -> Result<Option<NetworkSpec>> {
        Ok(self.inner.networks.get(name)?.map(|n| n.spec))
    }

    /// The sockets in the host namespace (for drivers built on this one).
    #[cfg(feature = "overlay")]
    pub(crate) fn host(&self) -> &HostSide {
        &self.inner.host
    }

    /// The driver's IPAM (to inspect leases).
    pub fn ipam(&self) -> &LocalIpam {
        &self.inner.ipam
    }

    fn firewall<'a>(net: &'a StoredNetwork) -> Firewall<'a> {
        Firewall {
            network: &net.spec.name,
            bridge: &net.link,
            subnet: net.pool.subnet,
            masquerade: net.spec.masquerade,
            keep_source_to: net.overlay,
        }
    }

    async fn create_kernel_side(&self, net: &StoredNetwork) -> Result<()> {
        let host = &self.inner.host;
        // Forwarding is what a bridge with NAT and published ports is for; dockerd turns
        // it on too. Written only if off, so a read-only /proc/sys with it on is fine.
        let forwarding = netns::run_in(host.ns.as_ref(), || std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default())?;
        if forwarding.trim() != "1" {
            host.sysctl("net/ipv4/ip_forward", "1")?;
        }
        let prefix = net.pool.subnet.prefix_len();
        let alias = format!("{ALIAS_PREFIX}network:{}", net.spec.name);
        links::ensure_bridge(&host.rtnl, &net.link, net.mtu, net.pool.gateway, prefix, &alias).await?;
        // localhost -> published port is routed out of the bridge with a 127/8 source.
        host.sysctl(&format!("net/ipv4/conf/{}/route_localnet", net.link), "1")?;
        BridgeNetwork::firewall(net).create(&host.nft())
    }

    async fn remove_kernel_side(&self, net: &StoredNetwork) -> Result<()> {
        BridgeNetwork::firewall(net).delete(&self.inner.host.nft())?;
        links::delete(&self.inner.host.rtnl, &net.link).await?;
        Ok(())
    }

    /// Removes what `lease` owns on the host, then the lease: ports first, then the link
    /// (its peer goes with it), then the address, so a crash part-way leaves the lease
    /// and the next detach or `gc` finishes the job.
    async fn teardown(&self, net: Option<&StoredNetwork>, lease: &Lease) -> Result<()> {
        if let Some(net) = net {
            if !lease.ports.is_empty() {
                BridgeNetwork::firewall(net).unpublish(&self.inner.host.nft(), lease.address, &lease.ports)?;
            }
        }
        if let Some(link) = &lease.host_link {
            self.inner.host.deleter.delete(link).await?;
        }
        self.inner.ipam.release(&lease.key.network, &lease.key).await?;
        Ok(())
    }

    async fn attach_kernel_side(&self, net: &StoredNetwork, lease: &Lease, ns: File) -> Result<()> {
        use std::os::fd::AsRawFd;
        let host_name = lease.host_link.clone().unwrap_or_default();
        let bridge = links::by_name(&self.inner.host.rtnl, &net.link).await?.ok_or_else(|| Error::Backend {
            backend: BACKEND,
            source: format!("bridge {} of network {} is missing", net.link, net.spec.name).into(),
        })?;
        let alias = format!("{ALIAS_PREFIX}{}", lease.key);
        let veth = links::VethSpec {
            host_name: &host_name,
            peer_name: &lease.key.ifname,
            peer_netns: ns.as_raw_fd(),
            peer_mac: mac_for(lease.address),
            bridge: bridge.header.index,
            mtu: net.mtu,
            alias: &alias,
        };
        links::create_veth(&self.inner.host.rtnl, &veth, !lease.ports.is_empty()).await?;
        configure_in_namespace(ns, lease.key.ifname.clone(), lease.address, net.pool.subnet.prefix_len(), net.pool.gateway).await?;
        if !lease.ports.is_empty() {
            BridgeNetwork::firewall(net).publish(&self.inner.host.nft(), lease.address, &lease.ports)?;
        }
        Ok(())
    }

    /// Creates a network; `overlay` is the cluster CIDR when this is an overlay's local
    /// bridge (its subnet is the host's lease; traffic to the CIDR keeps its source).
    pub(crate) async fn create(&self, spec: NetworkSpec, overlay: Option<Ipv4Net>) -> Result<NetworkInfo> {
        validate_name("network name", &spec.name)?;
        if spec.parent.is_some() {
            return Err(Error::InvalidInput {
                field: "parent",
                value: spec.parent.clone().unwrap_or_default(),
                reason: "bridge networks have no parent link".into(),
            });
        }
        let mtu = checked_mtu(&spec, self.inner.config.default_mtu)?;
        let store = &self.inner.networks;
        let _lock = store.lock()?;
        if store.get(&spec.name)?.is_some() {
            return Err(Error::Conflict { kind: "network", name: spec.name, reason: "already exists".into() });
        }
        let existing = store.all()?;
        let pool = choose_pool(&spec, &existing)?;
        let net = StoredNetwork { link: bridge_name(&spec.name), spec, driver: BACKEND.into(), pool, mtu, overlay };
        store.put(&net)?;
        if let Err(e) = self.create_kernel_side(&net).await {
            // Nothing half-created: undo what was made, keep the first error.
            if let Err(undo) = self.remove_kernel_side(&net).await {
                tracing::warn!(network = %net.spec.name, error = %undo, "undoing a failed network create");
            }
            store.remove(&net.spec.name)?;
            return Err(e);
        }
        tracing::info!(network = %net.spec.name, bridge = %net.link, subnet = %net.pool.subnet, "network created");
        Ok(self.info(net, &[]))
    }

    fn info(&self, net: StoredNetwork, leases: &[Lease]) -> NetworkInfo {
        let mut endpoints: Vec<Attachment> = leases.iter().map(|l| attachment_of(&net, l)).collect();
        endpoints.sort_by_key(|a| a.key());
        NetworkInfo { spec: net.spec, driver: BACKEND.into(), endpoints }
    }
}

#[async_trait]
impl NetworkDriver for BridgeNetwork {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> NetworkCapabilities {
        NetworkCapabilities { isolated_endpoints: true, port_mappings: true, multi_host: false }
    }

    async fn create_network(&self, spec: NetworkSpec) -> Result<NetworkInfo> {
        self.create(spec, None).await
    }

    async fn delete_network(&self, name: &str) -> Result<()> {
        let store = &self.inner.networks;
        let _lock = store.lock()?;
        let net = store.require(name)?;
        self.inner.ipam.forget_network(name).await?;
        self.remove_kernel_side(&net).await?;
        store.remove(name)?;
        tracing::info!(network = %name, "network deleted");
        Ok(())
    }

    async fn attach(&self, spec: EndpointSpec) -> Result<Attachment> {
        let ns = open_endpoint(&spec, BACKEND)?;
        let net = self.inner.networks.require(&spec.network)?;
        let key = spec.key();
        let request = LeaseRequest {
            host_link: Some(host_link_name(&key)),
            ports: spec.port_mappings.clone(),
            netns: spec.netns.clone(),
            prefer: spec.preferred_v4()?,
            key,
        };
        let lease = self.inner.ipam.allocate(&net.pool, request).await?;
        if let Err(e) = self.attach_kernel_side(&net, &lease, ns).await {
            if let Err(undo) = self.teardown(Some(&net), &lease).await {
                tracing::warn!(attachment = %lease.key, error = %undo, "undoing a failed attach");
            }
            return Err(e);
        }
        Ok(attachment_of(&net, &lease))
    }

    async fn detach(&self, key: &AttachmentKey) -> Result<()> {
        let net = self.inner.networks.get(&key.network)?;
        let leases = match &net {
            Some(_) => self.inner.ipam.leases(&key.network).await?,
            None => Vec::new(),
        };
        match leases.iter().find(|l| &l.key == key) {
            Some(lease) => self.teardown(net.as_ref(), lease).await,
            // Not leased: leases are written before anything is created and released
            // last, so nothing of ours should exist; a link of its derived name (made by
            // hand, or by an older build) goes anyway.
            None => links::delete(&self.inner.host.rtnl, &host_link_name(key)).await.map(|_| ()),
        }
    }

    async fn check(&self, key: &AttachmentKey) -> Result<Attachment> {
        let net = self.inner.networks.require(&key.network)?;
        let leases = self.inner.ipam.leases(&key.network).await?;
        let lease = leases.iter().find(|l| &l.key == key).ok_or_else(|| Error::NotFound { kind: "attachment", name: key.to_string() })?;
        if let Some(link) = &lease.host_link {
            if links::by_name(&self.inner.host.rtnl, link).await?.is_none() {
                return Err(Error::Backend { backend: BACKEND, source: format!("{key}: host link {link} is missing").into() });
            }
        }
        Ok(attachment_of(&net, lease))
    }

    async fn inspect(&self, name: &str) -> Result<NetworkInfo> {
        let net = self.inner.networks.require(name)?;
        let leases = self.inner.ipam.leases(name).await?;
        Ok(self.info(net, &leases))
    }

    async fn list(&self) -> Result<Vec<NetworkInfo>> {
        let mut out = Vec::new();
        for net in self.inner.networks.all()? {
            let leases = self.inner.ipam.leases(&net.spec.name).await?;
            out.push(self.info(net, &leases));
        }
        Ok(out)
    }

    async fn gc(&self, valid: &[AttachmentKey]) -> Result<GcReport> {
        let mut report = GcReport::default();
        let networks = self.inner.networks.all()?;
        let mut bridges = std::collections::HashMap::new();
        for net in &networks {
            for lease in self.inner.ipam.leases(&net.spec.name).await? {
                if !valid.contains(&lease.key) {
                    self.teardown(Some(net), &lease).await?;
                    report.removed.push(format!("attachment {} ({})", lease.key, lease.address));
                }
            }
            if let Some(link) = links::by_name(&self.inner.host.rtnl, &net.link).await? {
                bridges.insert(link.header.index, net.spec.name.clone());
            }
        }
        // Links on our bridges that no lease owns (created by a process killed after
        // its lease was released by someone else's gc, or by hand).
        let held: std::collections::HashSet<String> = self.inner.ipam.all_leases().await?.into_iter().filter_map(|l| l.host_link).collect();
        for link in links::all(&self.inner.host.rtnl).await? {
            let on_ours = links::controller(&link).is_some_and(|c| bridges.contains_key(&c));
            let ours = links::alias(&link).is_some_and(|a| a.starts_with(ALIAS_PREFIX) && !a.starts_with("keelson:network:"));
            if let (true, true, Some(name)) = (on_ours, ours, links::name(&link)) {
                if !held.contains(name) {
                    let name = name.to_owned();
                    links::delete(&self.inner.host.rtnl, &name).await?;
                    report.removed.push(format!("link {name} ({})", links::alias(&link).unwrap_or_default()));
                }
            }
        }
        Ok(report)
    }
}
