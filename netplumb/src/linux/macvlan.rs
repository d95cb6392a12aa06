//! `MacvlanNetwork`: endpoints get a macvlan link on a host interface (bridge mode), so
//! they sit directly on that interface's L2 segment with addresses from its subnet. No
//! NAT and no published ports: the segment's router is the gateway.

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use rtnetlink::packet_route::link::MacVlanMode;
use rtnetlink::LinkMacVlan;

use super::bridge::{
    attachment_of, checked_mtu, choose_pool, configure_in_namespace, in_namespace, mac_for, open_endpoint, HostSide, KernelConfig,
};
use super::state::{NetworkStore, StoredNetwork};
use super::{links, netns};
use crate::attachment::{Attachment, AttachmentKey};
use crate::driver::{validate_name, EndpointSpec, GcReport, NetworkCapabilities, NetworkDriver, NetworkInfo, NetworkSpec};
use crate::error::{Error, Result};
use crate::ipam::{Ipam, Lease, LeaseRequest, LocalIpam};

const BACKEND: &str = "macvlan";

/// The macvlan driver. Addresses come from a [`LocalIpam`] by default; hosts sharing a
/// segment share a cluster IPAM instead ([`MacvlanNetwork::with_ipam`], e.g. `KvIpam`).
#[derive(Clone, Debug)]
pub struct MacvlanNetwork {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: KernelConfig,
    networks: NetworkStore,
    ipam: Arc<dyn Ipam>,
    host: HostSide,
}

impl MacvlanNetwork {
    /// A driver with state in `config.state_dir/macvlan`, on `config.host_netns`.
    pub fn open(config: KernelConfig) -> Result<MacvlanNetwork> {
        let ipam = Arc::new(LocalIpam::open(config.state_dir.join("macvlan-ipam"))?);
        MacvlanNetwork::with_ipam(config, ipam)
    }

    /// The same with addresses from `ipam`.
    pub fn with_ipam(config: KernelConfig, ipam: Arc<dyn Ipam>) -> Result<MacvlanNetwork> {
        let networks = NetworkStore::open(config.state_dir.join("macvlan"))?;
        let host = HostSide::open(config.host_netns.as_deref())?;
        Ok(MacvlanNetwork { inner: Arc::new(Inner { config, networks, ipam, host }) })
    }

    fn info(net: StoredNetwork, leases: &[Lease]) -> NetworkInfo {
        let mut endpoints: Vec<Attachment> = leases.iter().map(|l| attachment_of(&net, l)).collect();
        endpoints.sort_by_key(|a| a.key());
        NetworkInfo { spec: net.spec, driver: BACKEND.into(), endpoints }
    }

    /// Deletes the endpoint's link inside its namespace (gone with the namespace if that
    /// is gone), then the lease.
    async fn teardown(&self, lease: &Lease) -> Result<()> {
        if let Some(path) = &lease.netns {
            match netns::open(path) {
                Ok(ns) => {
                    let ifname = lease.key.ifname.clone();
                    in_namespace(ns, move |h| Box::pin(async move { links::delete(&h, &ifname).await.map(|_| ()) })).await?;
                }
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.inner.ipam.release(&lease.key.network, &lease.key).await?;
        Ok(())
    }
}

#[async_trait]
impl NetworkDriver for MacvlanNetwork {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> NetworkCapabilities {
        NetworkCapabilities { isolated_endpoints: true, port_mappings: false, multi_host: true }
    }

    async fn create_network(&self, spec: NetworkSpec) -> Result<NetworkInfo> {
        validate_name("network name", &spec.name)?;
        let parent = spec.parent.clone().ok_or_else(|| Error::InvalidInput {
            field: "parent",
            value: String::new(),
            reason: "a macvlan network needs the host interface it hangs off (eth0)".into(),
        })?;
        crate::driver::validate_ifname(&parent)?;
        if spec.subnet.is_none() {
            return Err(Error::InvalidInput {
                field: "subnet",
                value: String::new(),
                reason: "a macvlan network needs its segment's subnet".into(),
            });
        }
        if spec.masquerade {
            return Err(Error::Unsupported { operation: "masquerade (endpoints are on the segment itself)", backend: BACKEND });
        }
        if links::by_name(&self.inner.host.rtnl, &parent).await?.is_none() {
            return Err(Error::NotFound { kind: "parent interface", name: parent });
        }
        let mtu = checked_mtu(&spec, self.inner.config.default_mtu)?;
        let store = &self.inner.networks;
        let _lock = store.lock()?;
        if store.get(&spec.name)?.is_some() {
            return Err(Error::Conflict { kind: "network", name: spec.name, reason: "already exists".into() });
        }
        let pool = choose_pool(&spec, &store.all()?)?;
        let net = StoredNetwork { link: parent, spec, driver: BACKEND.into(), pool, mtu, overlay: None };
        store.put(&net)?;
        Ok(MacvlanNetwork::info(net, &[]))
    }

    async fn delete_network(&self, name: &str) -> Result<()> {
        let store = &self.inner.networks;
        let _lock = store.lock()?;
        store.require(name)?;
        self.inner.ipam.forget_network(name).await?;
        store.remove(name)
    }

    async fn attach(&self, spec: EndpointSpec) -> Result<Attachment> {
        use std::os::fd::AsRawFd;
        let ns = open_endpoint(&spec, BACKEND)?;
        if !spec.port_mappings.is_empty() {
            return Err(Error::Unsupported { operation: "port mappings (endpoints are on the segment itself)", backend: BACKEND });
        }
        let net = self.inner.networks.require(&spec.network)?;
        let key = spec.key();
        let lease = self
            .inner
            .ipam
            .allocate(&net.pool, LeaseRequest { netns: spec.netns.clone(), ..LeaseRequest::new(key) }.preferring(spec.preferred_v4()?))
            .await?;
        let made: Result<()> = async {
            let parent = links::by_name(&self.inner.host.rtnl, &net.link)
                .await?
                .ok_or_else(|| Error::NotFound { kind: "parent interface", name: net.link.clone() })?;
            // Created directly inside the endpoint's namespace, under its final name.
            let msg = LinkMacVlan::new(&lease.key.ifname, parent.header.index, MacVlanMode::Bridge)
                .setns_by_fd(ns.as_raw_fd())
                .address(mac_for(lease.address).to_vec())
                .mtu(net.mtu)
                .build();
            self.inner
                .host
                .rtnl
                .link()
                .add(msg)
                .execute()
                .await
                .map_err(|e| links::backend(format!("creating macvlan {} on {}", lease.key.ifname, net.link), e))?;
            configure_in_namespace(ns, lease.key.ifname.clone(), lease.address, net.pool.subnet.prefix_len(), net.pool.gateway).await
        }
        .await;
        if let Err(e) = made {
            if let Err(undo) = self.teardown(&lease).await {
                tracing::warn!(attachment = %lease.key, error = %undo, "undoing a failed attach");
            }
            return Err(e);
        }
        Ok(attachment_of(&net, &lease))
    }

    async fn detach(&self, key: &AttachmentKey) -> Result<()> {
        if self.inner.networks.get(&key.network)?.is_none() {
            return Ok(());
        }
        let leases = self.inner.ipam.leases(&key.network).await?;
        match leases.iter().find(|l| &l.key == key) {
            Some(lease) => self.teardown(lease).await,
            None => Ok(()),
        }
    }

    async fn inspect(&self, name: &str) -> Result<NetworkInfo> {
        let net = self.inner.networks.require(name)?;
        let leases = self.inner.ipam.leases(name).await?;
        Ok(MacvlanNetwork::info(net, &leases))
    }

    async fn list(&self) -> Result<Vec<NetworkInfo>> {
        let mut out = Vec::new();
        for net in self.inner.networks.all()? {
            let leases = self.inner.ipam.leases(&net.spec.name).await?;
            out.push(MacvlanNetwork::info(net, &leases));
        }
        Ok(out)
    }

    async fn gc(&self, valid: &[AttachmentKey]) -> Result<GcReport> {
        let mut report = GcReport::default();
        for net in self.inner.networks.all()? {
            for lease in self.inner.ipam.leases(&net.spec.name).await? {
                if !valid.contains(&lease.key) {
                    self.teardown(&lease).await?;
                    report.removed.push(format!("attachment {} ({})", lease.key, IpAddr::V4(lease.address)));
                }
            }
        }
        Ok(report)
    }
}
