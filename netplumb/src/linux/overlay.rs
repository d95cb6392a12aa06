//! `OverlayNetwork`: containers on different hosts reach each other over VXLAN, in
//! flannel's vxlan scheme.
//!
//! - The cluster CIDR of a network (`10.244.0.0/16`) is cut in per-host subnets (`/24`).
//!   Each host takes one in the cluster `KeyValue` by create-if-absent, under a lease it
//!   keeps alive: `<prefix>/<network>/hosts/<subnet>` = the host's name, underlay address
//!   and VTEP MAC. A host that dies stops renewing; its key expires and every other host
//!   removes its entries.
//! - Each host has one VXLAN device per network (learning off, MTU = underlay − 50) with
//!   its subnet's first address, and a local bridge network on its subnet for its
//!   containers ([`BridgeNetwork`], masquerading only traffic leaving the cluster CIDR).
//! - For every other host, from a watch on the hosts' keys (no polling): a route to its
//!   subnet via its subnet's first address on the VXLAN device (onlink), a permanent
//!   neighbour entry mapping that address to its VTEP MAC, and an FDB entry sending that
//!   MAC to its underlay address.
//! - The VXLAN port accepts packets only from the underlay addresses of hosts that hold
//!   a lease (an nftables set kept in step with the watch); anything else is dropped and
//!   counted.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use ipnet::Ipv4Net;
use keelson_discovery::{Expect, KeyValue, KvEventKind, LeaseId};
use rtnetlink::packet_route::neighbour::NeighbourFlags;
use rtnetlink::{LinkVxlan, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

use super::bridge::{mac_string, BridgeNetwork, HostSide};
use super::links;
use super::nft::{expr, BaseChain, Batch, Hook, DROP, FAMILY_IPV4, REG_1};
use super::state::stable_hash;
use crate::attachment::{Attachment, AttachmentKey};
use crate::driver::{validate_name, EndpointSpec, GcReport, NetworkCapabilities, NetworkDriver, NetworkInfo, NetworkSpec};
use crate::error::{Error, Result};

const BACKEND: &str = "overlay";
/// VXLAN encapsulation: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// How a host joins overlays.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct OverlayConfig {
    /// The cluster store holding subnet leases.
    pub kv: Arc<dyn KeyValue>,
    /// Key prefix (default `keelson/netplumb/overlay`).
    pub prefix: String,
    /// This host's name (unique in the cluster).
    pub host: String,
    /// This host's underlay address: where other hosts send its VXLAN packets.
    pub public_ip: Ipv4Addr,
    /// The underlay's MTU (default 1500); containers get 50 less.
    pub underlay_mtu: u32,
    /// VXLAN UDP port (default 4789, IANA's).
    pub port: u16,
    /// Prefix length of each host's subnet (default 24).
    pub subnet_len: u8,
    /// Lease of a host's subnet: a dead host's entries go this long after it died
    /// (default 10 s; renewed every third of it).
    pub lease_ttl: Duration,
}

impl OverlayConfig {
    /// Defaults for host `host` at `public_ip`, on `kv`.
    pub fn new(kv: Arc<dyn KeyValue>, host: impl Into<String>, public_ip: Ipv4Addr) -> Self {
        OverlayConfig {
            kv,
            prefix: "keelson/netplumb/overlay".into(),
            host: host.into(),
            public_ip,
            underlay_mtu: 1500,
            port: 4789,
            subnet_len: 24,
            lease_ttl: Duration::from_secs(10),
        }
    }
}

/// The cluster-wide settings of one overlay network, the same for every host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ClusterSettings {
    cidr: Ipv4Net,
    subnet_len: u8,
    vni: u32,
    port: u16,
}

/// One host's lease, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct HostLease {
    host: String,
    public_ip: Ipv4Addr,
    vtep_mac: String,
    subnet: Ipv4Net,
}

struct Running {
    vxlan: String,
    /// The lease holding this host's subnet (renewed, or replaced when it was lost).
    lease: Arc<Mutex<LeaseId>>,
    key: String,
    task: tokio::task::JoinHandle<()>,
}

/// The overlay driver: a [`BridgeNetwork`] per host for local containers, joined by VXLAN.
#[derive(Clone)]
pub struct OverlayNetwork {
    inner: Arc<Inner>,
}

struct Inner {
    bridge: BridgeNetwork,
    config: OverlayConfig,
    running: Mutex<HashMap<String, Running>>,
}

impl std::fmt::Debug for OverlayNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlayNetwork").field("host", &self.inner.config.host).field("public_ip", &self.inner.config.public_ip).finish()
    }
}

fn kv_error(what: &str, e: keelson_discovery::Error) -> Error {
    Error::Backend { backend: BACKEND, source: format!("{what}: {e}").into() }
}

fn vxlan_name(network: &str) -> String {
    format!("kpx{:08x}", stable_hash(network) as u32)
}

fn vni(network: &str) -> u32 {
    1 + (stable_hash(network) % 0x00ff_fffe) as u32
}

fn vtep_mac(public_ip: Ipv4Addr) -> [u8; 6] {
    let o = public_ip.octets();
    [0x02, 0x4b, o[0], o[1], o[2], o[3]]
}

fn parse_mac(s: &str) -> Option<Vec<u8>> {
    let bytes: Vec<u8> = s.split(':').filter_map(|b| u8::from_str_radix(b, 16).ok()).collect();
    (bytes.len() == 6).then_some(bytes)
}

/// A host's lease record; one that does not parse (written by a newer or broken peer) is
/// logged and skipped: its subnet stays taken (its key exists) but is not routed.
fn read_lease(key: &str, value: &[u8]) -> Option<HostLease> {
    match serde_json::from_slice(value) {
        Ok(lease) => Some(lease),
        Err(e) => {
            tracing::warn!(key, error = %e, "unreadable overlay host lease: not routed");
            None
        }
    }
}

fn table(network: &str) -> String {
    format!("keelson-ovl-{network}")
}

impl OverlayNetwork {
    /// An overlay driver on `bridge` (which gives it its state directory and host
    /// namespace). Must be called inside a tokio runtime.
    pub fn new(bridge: BridgeNetwork, config: OverlayConfig) -> Result<OverlayNetwork> {
        validate_name("host name", &config.host)?;
        if !(576 + VXLAN_OVERHEAD..=65535).contains(&config.underlay_mtu) {
            return Err(Error::InvalidInput {
                field: "underlay mtu",
                value: config.underlay_mtu.to_string(),
                reason: "must be 626 to 65535".into(),
            });
        }
        Ok(OverlayNetwork { inner: Arc::new(Inner { bridge, config, running: Mutex::new(HashMap::new()) }) })
    }

    fn prefix(&self, network: &str) -> String {
        format!("{}/{network}", self.inner.config.prefix.trim_end_matches('/'))
    }

    /// Stops renewing this host's lease and following its peers on `network`, leaving
    /// everything in place: what a host that died looks like to the others (its lease
    /// expires), and what an agent stopping for a restart does (it joins again after).
    pub fn stop_following(&self, network: &str) {
        if let Some(run) = self.inner.running.lock().unwrap_or_else(|p| p.into_inner()).get(network) {
            run.task.abort();
        }
    }

    /// This host's subnet on `network`, once created.
    pub fn host_subnet(&self, network: &str) -> Option<Ipv4Net> {
        let running = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
        running.get(network).and_then(|r| r.key.rsplit('/').next().and_then(|k| k.replacen('-', "/", 1).parse().ok()))
    }

    /// Agrees the cluster settings of `network` with every other host: the first writes
    /// them, later ones must match.
    async fn settings(&self, network: &str, wanted: ClusterSettings) -> Result<ClusterSettings> {
        let kv = &self.inner.config.kv;
        let key = format!("{}/config", self.prefix(network));
        let value = serde_json::to_vec(&wanted).map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })?;
        match kv.compare_and_swap(&key, Expect::Absent, value, None).await {
            Ok(_) => Ok(wanted),
            Err(keelson_discovery::Error::VersionMismatch { .. }) => {
                let entry = kv
                    .get(&key)
                    .await
                    .map_err(|e| kv_error("reading the overlay settings", e))?
                    .ok_or_else(|| Error::Backend { backend: BACKEND, source: format!("{key} vanished").into() })?;
                let existing: ClusterSettings =
                    serde_json::from_slice(&entry.value).map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })?;
                if existing != wanted {
                    return Err(Error::Conflict {
                        kind: "overlay",
                        name: network.to_owned(),
                        reason: format!("the cluster has it as {existing:?}, this host asked for {wanted:?}"),
                    });
                }
                Ok(existing)
            }
            Err(e) => Err(kv_error("writing the overlay settings", e)),
        }
    }

    /// Takes a subnet for this host under `lease`: its own from before if the cluster
    /// still has it, else the first free one.
    async fn take_subnet(&self, network: &str, settings: &ClusterSettings, lease: LeaseId) -> Result<(String, HostLease)> {
        let c = &self.inner.config;
        let kv = &c.kv;
        let hosts = format!("{}/hosts/", self.prefix(network));
        let list = kv.list(&hosts).await.map_err(|e| kv_error("listing host subnets", e))?;
        let mut taken = std::collections::HashSet::new();
        for entry in &list.entries {
            let Some(held) = read_lease(&entry.key, &entry.value) else { continue };
            if held.host == c.host {
                // Ours from before a restart: keep it (containers may still use it).
                let mine = HostLease { public_ip: c.public_ip, vtep_mac: mac_string(vtep_mac(c.public_ip)), ..held };
                let value = serde_json::to_vec(&mine).map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })?;
                kv.compare_and_swap(&entry.key, Expect::Version(entry.version), value, Some(lease))
                    .await
                    .map_err(|e| kv_error("renewing this host's subnet", e))?;
                return Ok((entry.key.clone(), mine));
            }
            taken.insert(held.subnet);
        }
        let subnets = settings.cidr.subnets(settings.subnet_len).map_err(|e| Error::InvalidInput {
            field: "subnet",
            value: settings.cidr.to_string(),
            reason: e.to_string(),
        })?;
        for subnet in subnets.filter(|s| !taken.contains(s)) {
            let key = format!("{hosts}{}-{}", subnet.network(), subnet.prefix_len());
            let mine = HostLease { host: c.host.clone(), public_ip: c.public_ip, vtep_mac: mac_string(vtep_mac(c.public_ip)), subnet };
            let value = serde_json::to_vec(&mine).map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })?;
            match kv.compare_and_swap(&key, Expect::Absent, value, Some(lease)).await {
                Ok(_) => return Ok((key, mine)),
                Err(keelson_discovery::Error::VersionMismatch { .. }) => continue,
                Err(e) => return Err(kv_error("taking a host subnet", e)),
            }
        }
        Err(Error::PoolExhausted { network: network.to_owned(), subnet: settings.cidr.to_string() })
    }

    async fn create_vxlan(&self, name: &str, settings: &ClusterSettings, subnet: Ipv4Net) -> Result<u32> {
        let c = &self.inner.config;
        let h = &self.inner.bridge.host().rtnl;
        // A device left by a crash may carry stale settings: start afresh.
        links::delete(h, name).await?;
        let msg = LinkVxlan::new(name, settings.vni)
            .port(settings.port)
            .local(c.public_ip)
            .learning(false)
            .mtu(c.underlay_mtu - VXLAN_OVERHEAD)
            .address(vtep_mac(c.public_ip).to_vec())
            .alias(format!("keelson:overlay:{}", name))
            .up()
            .build();
        h.link().add(msg).execute().await.map_err(|e| links::backend(format!("creating vxlan {name}"), e))?;
        let link =
            links::by_name(h, name).await?.ok_or_else(|| Error::Backend { backend: BACKEND, source: format!("{name} vanished").into() })?;
        let index = link.header.index;
        h.address()
            .add(index, IpAddr::V4(subnet.network()), 32)
            .execute()
            .await
            .map_err(|e| links::backend(format!("address on {name}"), e))?;
        Ok(index)
    }

    fn create_firewall(&self, network: &str, port: u16) -> Result<()> {
        let t = table(network);
        let mut b = Batch::default();
        b.add_table(FAMILY_IPV4, &t);
        b.del_table(FAMILY_IPV4, &t);
        b.add_table(FAMILY_IPV4, &t);
        b.add_set(FAMILY_IPV4, &t, "peers", (super::nft::TYPE_IPV4_ADDR, 4));
        b.add_chain(FAMILY_IPV4, &t, "input", Some(BaseChain { hook: Hook::Input, priority: -10, kind: "filter" }));
        let rule = vec![
            expr::meta(expr::META_L4PROTO, REG_1),
            expr::cmp(REG_1, true, &[17]),
            expr::payload(expr::TRANSPORT_HEADER, 2, 2, REG_1),
            expr::cmp(REG_1, true, &port.to_be_bytes()),
            expr::payload(expr::NETWORK_HEADER, 12, 4, REG_1),
            expr::set_lookup("peers", REG_1, true),
            expr::counter(),
            expr::verdict(DROP),
        ];
        b.add_rule(FAMILY_IPV4, &t, "input", rule, None, false);
        self.inner
            .bridge
            .host()
            .nft()
            .commit(b)
            .map_err(|e| Error::Backend { backend: "nftables", source: format!("creating {t}: {e}").into() })
    }

    fn remove_firewall(&self, network: &str) -> Result<()> {
        let mut b = Batch::default();
        b.del_table(FAMILY_IPV4, &table(network));
        match self.inner.bridge.host().nft().commit(b) {
            Ok(()) => Ok(()),
            Err(e) if e.source.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32) => Ok(()),
            Err(e) => Err(Error::Backend { backend: "nftables", source: format!("deleting {}: {e}", table(network)).into() }),
        }
    }
}

/// Programs and unprograms peers on one host.
struct Peers {
    host: Arc<Inner>,
    network: String,
    vxlan_index: u32,
    me: String,
    known: HashMap<String, HostLease>,
}

impl Peers {
    fn h(&self) -> &HostSide {
        self.host.bridge.host()
    }

    async fn add(&mut self, key: String, peer: HostLease) -> Result<()> {
        if peer.host == self.me {
            return Ok(());
        }
        if self.known.get(&key) == Some(&peer) {
            return Ok(());
        }
        if let Some(old) = self.known.remove(&key) {
            self.remove_entries(&old).await?;
        }
        let h = &self.h().rtnl;
        let mac = parse_mac(&peer.vtep_mac)
            .ok_or_else(|| Error::Backend { backend: BACKEND, source: format!("bad VTEP MAC {:?}", peer.vtep_mac).into() })?;
        let gw = peer.subnet.network();
        // The VXLAN port accepts the peer first, so its first packets are not dropped.
        let mut b = Batch::default();
        b.add_elems(FAMILY_IPV4, &table(&self.network), "peers", &[(peer.public_ip.octets().to_vec(), Vec::new())]);
        self.h()
            .nft()
            .commit(b)
            .map_err(|e| Error::Backend { backend: "nftables", source: format!("accepting peer {}: {e}", peer.public_ip).into() })?;
        h.neighbours()
            .add_bridge(self.vxlan_index, &mac)
            .flags(NeighbourFlags::Own)
            .destination(IpAddr::V4(peer.public_ip))
            .replace()
            .execute()
            .await
            .map_err(|e| links::backend(format!("fdb entry for {}", peer.host), e))?;
        h.neighbours()
            .add(self.vxlan_index, IpAddr::V4(gw))
            .link_layer_address(&mac)
            .replace()
            .execute()
            .await
            .map_err(|e| links::backend(format!("neighbour entry for {}", peer.host), e))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(peer.subnet.network(), peer.subnet.prefix_len())
            .gateway(gw)
            .output_interface(self.vxlan_index)
            .onlink()
            .build();
        match h.route().add(route).replace().execute().await {
            Ok(()) => {}
            Err(e) => return Err(links::backend(format!("route to {} on {}", peer.subnet, peer.host), e)),
        }
        tracing::info!(network = %self.network, peer = %peer.host, subnet = %peer.subnet, underlay = %peer.public_ip, "overlay peer added");
        self.known.insert(key, peer);
        Ok(())
    }

    async fn remove(&mut self, key: &str) -> Result<()> {
        let Some(peer) = self.known.get(key).cloned() else { return Ok(()) };
        // Forgotten only once every entry is gone: a failure is retried on the next pass.
        self.known.remove(key);
        if let Err(e) = self.remove_entries(&peer).await {
            self.known.insert(key.to_owned(), peer);
            return Err(e);
        }
        tracing::info!(network = %self.network, peer = %peer.host, subnet = %peer.subnet, "overlay peer removed");
        Ok(())
    }

    /// Route, neighbour, FDB entry and firewall element of a peer; each already gone is fine.
    async fn remove_entries(&self, peer: &HostLease) -> Result<()> {
        let h = &self.h().rtnl;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(peer.subnet.network(), peer.subnet.prefix_len())
            .output_interface(self.vxlan_index)
            .build();
        if let Err(e) = h.route().del(route).execute().await {
            if !links::already_gone(&e) {
                return Err(links::backend("removing a peer route", e));
            }
        }
        if let Some(mac) = parse_mac(&peer.vtep_mac) {
            let mut neigh = h.neighbours().add(self.vxlan_index, IpAddr::V4(peer.subnet.network())).link_layer_address(&mac);
            if let Err(e) = h.neighbours().del(neigh.message_mut().clone()).execute().await {
                if !links::already_gone(&e) {
                    return Err(links::backend("removing a peer neighbour", e));
                }
            }
            let mut fdb =
                h.neighbours().add_bridge(self.vxlan_index, &mac).flags(NeighbourFlags::Own).destination(IpAddr::V4(peer.public_ip));
            if let Err(e) = h.neighbours().del(fdb.message_mut().clone()).execute().await {
                if !links::already_gone(&e) {
                    return Err(links::backend("removing a peer fdb entry", e));
                }
            }
        }
        // The peer's address leaves the VXLAN port's accept set, unless another peer
        // lease still names it.
        if !self.known.values().any(|p| p.public_ip == peer.public_ip) {
            let mut b = Batch::default();
            b.del_elems(FAMILY_IPV4, &table(&self.network), "peers", &[(peer.public_ip.octets().to_vec(), Vec::new())]);
            if let Err(e) = self.h().nft().commit(b) {
                if e.source.raw_os_error() != Some(nix::errno::Errno::ENOENT as i32) {
                    return Err(Error::Backend { backend: "nftables", source: format!("dropping peer {}: {e}", peer.public_ip).into() });
                }
            }
        }
        Ok(())
    }
}

/// This host's subnet key and record, and the lease holding it.
struct MyLease {
    key: String,
    record: HostLease,
    lease: Arc<Mutex<LeaseId>>,
}

impl MyLease {
    fn current(&self) -> LeaseId {
        *self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Renews the lease; if it is gone (expired while this host could not reach the
    /// store), takes the same subnet again under a new one, unless another host took it.
    async fn renew(&self, kv: &dyn KeyValue, ttl: Duration) -> Result<()> {
        if kv.keep_alive(self.current()).await.is_ok() {
            return Ok(());
        }
        let lease = kv.grant_lease(ttl).await.map_err(|e| kv_error("granting this host's lease again", e))?;
        let value = serde_json::to_vec(&self.record).map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })?;
        let taken = match kv.compare_and_swap(&self.key, Expect::Absent, value.clone(), Some(lease)).await {
            Ok(_) => Ok(()),
            Err(keelson_discovery::Error::VersionMismatch { .. }) => {
                match kv.get(&self.key).await.map_err(|e| kv_error("reading this host's subnet", e))? {
                    Some(entry) if serde_json::from_slice::<HostLease>(&entry.value).is_ok_and(|h| h.host == self.record.host) => kv
                        .compare_and_swap(&self.key, Expect::Version(entry.version), value, Some(lease))
                        .await
                        .map(drop)
                        .map_err(|e| kv_error("taking this host's subnet again", e)),
                    _ => Err(Error::Conflict {
                        kind: "overlay subnet",
                        name: self.record.subnet.to_string(),
                        reason: "another host took it while this one was away; its tasks need new addresses".into(),
                    }),
                }
            }
            Err(e) => Err(kv_error("taking this host's subnet again", e)),
        };
        match taken {
            Ok(()) => {
                tracing::warn!(subnet = %self.record.subnet, "this host's lease had expired; its subnet is taken again");
                *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = lease;
                Ok(())
            }
            Err(e) => {
                let _ = kv.revoke_lease(lease).await;
                Err(e)
            }
        }
    }
}

/// Keeps this host's lease alive and the peers in step with the cluster, until aborted.
async fn follow(mut peers: Peers, mine: MyLease, prefix: String) {
    let kv = peers.host.config.kv.clone();
    let ttl = peers.host.config.lease_ttl;
    let renew_every = ttl / 3;
    let mut pauses = keelson_base::retry_pauses(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let outcome: Result<()> = async {
            let list = kv.list(&prefix).await.map_err(|e| kv_error("listing peers", e))?;
            let mut present = std::collections::HashSet::new();
            for entry in list.entries {
                if let Some(peer) = read_lease(&entry.key, &entry.value) {
                    present.insert(entry.key.clone());
                    peers.add(entry.key, peer).await?;
                }
            }
            let stale: Vec<String> = peers.known.keys().filter(|k| !present.contains(*k)).cloned().collect();
            // (Entries of a peer whose removal failed are still known: retried here.)
            for key in stale {
                peers.remove(&key).await?;
            }
            let mut events = kv.watch(&prefix, Some(list.revision + 1)).await.map_err(|e| kv_error("watching peers", e))?;
            let mut renew = tokio::time::interval(renew_every);
            renew.tick().await;
            loop {
                tokio::select! {
                    event = events.next() => match event {
                        Some(Ok(ev)) => match ev.kind {
                            KvEventKind::Put => {
                                if let Some(peer) = read_lease(&ev.key, &ev.value) {
                                    peers.add(ev.key, peer).await?;
                                }
                            }
                            KvEventKind::Delete => peers.remove(&ev.key).await?,
                        },
                        Some(Err(e)) => return Err(kv_error("peer watch", e)),
                        None => return Err(Error::Backend { backend: BACKEND, source: "the peer watch ended".into() }),
                    },
                    _ = renew.tick() => mine.renew(kv.as_ref(), ttl).await?,
                }
            }
        }
        .await;
        if let Err(e) = outcome {
            let pause = pauses.next().unwrap_or(Duration::from_secs(5));
            tracing::warn!(network = %peers.network, error = %e, retry_in = ?pause, "overlay follower restarting");
            tokio::time::sleep(pause).await;
        }
    }
}

#[async_trait]
impl NetworkDriver for OverlayNetwork {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> NetworkCapabilities {
        NetworkCapabilities { isolated_endpoints: true, port_mappings: true, multi_host: true }
    }

    /// Joins this host to overlay `spec.name`, whose `subnet` is the cluster CIDR.
    async fn create_network(&self, spec: NetworkSpec) -> Result<NetworkInfo> {
        validate_name("network name", &spec.name)?;
        let c = &self.inner.config;
        let cidr: Ipv4Net = spec
            .subnet
            .as_deref()
            .ok_or_else(|| Error::InvalidInput {
                field: "subnet",
                value: String::new(),
                reason: "an overlay needs its cluster CIDR (10.244.0.0/16)".into(),
            })?
            .parse()
            .map_err(|_| Error::InvalidInput {
                field: "subnet",
                value: spec.subnet.clone().unwrap_or_default(),
                reason: "not an IPv4 CIDR".into(),
            })?;
        if cidr.trunc() != cidr || c.subnet_len <= cidr.prefix_len() || c.subnet_len > 29 {
            return Err(Error::InvalidInput {
                field: "subnet",
                value: cidr.to_string(),
                reason: format!("must be a network address shorter than the per-host /{} (at most /29)", c.subnet_len),
            });
        }
        if self.inner.running.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&spec.name) {
            return Err(Error::Conflict { kind: "network", name: spec.name, reason: "already exists".into() });
        }
        let settings =
            self.settings(&spec.name, ClusterSettings { cidr, subnet_len: c.subnet_len, vni: vni(&spec.name), port: c.port }).await?;
        let lease = c.kv.grant_lease(c.lease_ttl).await.map_err(|e| kv_error("granting this host's lease", e))?;
        let undo_lease = |e: Error| {
            let kv = c.kv.clone();
            async move {
                let _ = kv.revoke_lease(lease).await;
                Err(e)
            }
        };
        let (key, mine) = match self.take_subnet(&spec.name, &settings, lease).await {
            Ok(taken) => taken,
            Err(e) => return undo_lease(e).await,
        };
        let vxlan = vxlan_name(&spec.name);
        let built: Result<(u32, NetworkInfo)> = async {
            self.create_firewall(&spec.name, settings.port)?;
            let index = self.create_vxlan(&vxlan, &settings, mine.subnet).await?;
            let mut local = NetworkSpec::new(&spec.name).with_subnet(mine.subnet.to_string());
            local.mtu = Some(c.underlay_mtu - VXLAN_OVERHEAD);
            local.masquerade = spec.masquerade;
            local.dns = spec.dns.clone();
            // After a restart the host gets its subnet back, and its local bridge (with
            // the containers on it) is still there: adopt it.
            if let Some(existing) = self.inner.bridge.network_spec(&spec.name)? {
                if existing.subnet.as_deref() == Some(mine.subnet.to_string().as_str()) {
                    return Ok((index, self.inner.bridge.inspect(&spec.name).await?));
                }
                return Err(Error::Conflict {
                    kind: "network",
                    name: spec.name.clone(),
                    reason: format!("a local network on {:?} exists but this host now leases {}", existing.subnet, mine.subnet),
                });
            }
            let info = self.inner.bridge.create(local, Some(cidr)).await?;
            Ok((index, info))
        }
        .await;
        let (index, mut info) = match built {
            Ok(b) => b,
            Err(e) => {
                let _ = links::delete(&self.inner.bridge.host().rtnl, &vxlan).await;
                let _ = self.remove_firewall(&spec.name);
                let _ = c.kv.delete(&key).await;
                return undo_lease(e).await;
            }
        };
        let peers =
            Peers { host: self.inner.clone(), network: spec.name.clone(), vxlan_index: index, me: c.host.clone(), known: HashMap::new() };
        let hosts_prefix = format!("{}/hosts/", self.prefix(&spec.name));
        let lease = Arc::new(Mutex::new(lease));
        let me = MyLease { key: key.clone(), record: mine.clone(), lease: lease.clone() };
        let task = tokio::spawn(follow(peers, me, hosts_prefix));
        tracing::info!(network = %spec.name, subnet = %mine.subnet, vxlan = %vxlan, "joined overlay");
        self.inner.running.lock().unwrap_or_else(|p| p.into_inner()).insert(spec.name.clone(), Running { vxlan, lease, key, task });
        info.spec = spec;
        info.driver = BACKEND.into();
        Ok(info)
    }

    /// Leaves the overlay on this host: its subnet goes back to the cluster.
    async fn delete_network(&self, name: &str) -> Result<()> {
        if !self.inner.running.lock().unwrap_or_else(|p| p.into_inner()).contains_key(name) {
            return Err(Error::NotFound { kind: "network", name: name.to_owned() });
        }
        self.inner.bridge.delete_network(name).await?;
        let Some(run) = self.inner.running.lock().unwrap_or_else(|p| p.into_inner()).remove(name) else { return Ok(()) };
        run.task.abort();
        let _ = run.task.await;
        links::delete(&self.inner.bridge.host().rtnl, &run.vxlan).await?;
        self.remove_firewall(name)?;
        let kv = &self.inner.config.kv;
        kv.delete(&run.key).await.map_err(|e| kv_error("releasing this host's subnet", e))?;
        let lease = *run.lease.lock().unwrap_or_else(|p| p.into_inner());
        // Already expired is fine: the subnet key is deleted above either way.
        if let Err(e) = kv.revoke_lease(lease).await {
            tracing::debug!(error = %e, "revoking this host's lease");
        }
        Ok(())
    }

    async fn attach(&self, spec: EndpointSpec) -> Result<Attachment> {
        self.inner.bridge.attach(spec).await
    }

    async fn detach(&self, key: &AttachmentKey) -> Result<()> {
        self.inner.bridge.detach(key).await
    }

    async fn check(&self, key: &AttachmentKey) -> Result<Attachment> {
        self.inner.bridge.check(key).await
    }

    async fn inspect(&self, name: &str) -> Result<NetworkInfo> {
        let mut info = self.inner.bridge.inspect(name).await?;
        info.driver = BACKEND.into();
        Ok(info)
    }

    async fn list(&self) -> Result<Vec<NetworkInfo>> {
        let running: Vec<String> = self.inner.running.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        let mut out = Vec::new();
        for name in running {
            out.push(self.inspect(&name).await?);
        }
        out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(out)
    }

    async fn gc(&self, valid: &[AttachmentKey]) -> Result<GcReport> {
        self.inner.bridge.gc(valid).await
    }
}
