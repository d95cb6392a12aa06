//! `KvIpam`: leases in a cluster `KeyValue`, one key per address
//! (`<prefix>/<network>/<address>`), taken by create-if-absent: two hosts racing for one
//! address both compare on its absence and exactly one wins.
//!
//! Host ports are per host, so this store does not check them across the cluster: the
//! driver that publishes ports checks its own host's.

use std::net::Ipv4Addr;
use std::sync::Arc;

use async_trait::async_trait;
use keelson_discovery::{Expect, KeyValue};

use super::{Ipam, Lease, LeaseRequest, Pool};
use crate::attachment::AttachmentKey;
use crate::error::{Error, Result};

/// Leases in a `KeyValue` under a prefix.
#[derive(Clone, Debug)]
pub struct KvIpam {
    kv: Arc<dyn KeyValue>,
    prefix: String,
}

fn kv_error(e: keelson_discovery::Error) -> Error {
    Error::Backend { backend: "kv-ipam", source: Box::new(e) }
}

impl KvIpam {
    /// Leases under `prefix` (`keelson/netplumb/ipam`) of `kv`.
    pub fn new(kv: Arc<dyn KeyValue>, prefix: impl Into<String>) -> KvIpam {
        KvIpam { kv, prefix: prefix.into().trim_end_matches('/').to_owned() }
    }

    fn network_prefix(&self, network: &str) -> String {
        format!("{}/{network}/", self.prefix)
    }

    async fn entries(&self, prefix: &str) -> Result<Vec<(String, u64, Lease)>> {
        let list = self.kv.list(prefix).await.map_err(kv_error)?;
        let mut out = Vec::with_capacity(list.entries.len());
        for entry in list.entries {
            let lease: Lease = serde_json::from_slice(&entry.value)
                .map_err(|e| Error::Backend { backend: "kv-ipam", source: format!("{}: unreadable lease: {e}", entry.key).into() })?;
            out.push((entry.key, entry.version, lease));
        }
        Ok(out)
    }
}

#[async_trait]
impl Ipam for KvIpam {
    async fn allocate(&self, pool: &Pool, request: LeaseRequest) -> Result<Lease> {
        crate::driver::validate_name("network name", &request.key.network)?;
        let prefix = self.network_prefix(&request.key.network);
        let held = self.entries(&prefix).await?;
        if let Some((_, _, lease)) = held.iter().find(|(_, _, l)| l.key == request.key) {
            return Err(Error::Conflict {
                kind: "attachment",
                name: request.key.to_string(),
                reason: format!("already holds {}", lease.address),
            });
        }
        // Start after the highest address in use: new leases do not reuse a just-freed one.
        let after = held.iter().map(|(_, _, l)| l.address).max();
        let taken: std::collections::HashSet<Ipv4Addr> = held.iter().map(|(_, _, l)| l.address).collect();
        for address in pool.candidates_preferring(request.prefer, after).filter(|a| !taken.contains(a)) {
            let lease = Lease {
                key: request.key.clone(),
                address,
                host_link: request.host_link.clone(),
                ports: request.ports.clone(),
                netns: request.netns.clone(),
            };
            let value = serde_json::to_vec(&lease).map_err(|e| Error::Backend { backend: "kv-ipam", source: Box::new(e) })?;
            match self.kv.compare_and_swap(&format!("{prefix}{address}"), Expect::Absent, value, None).await {
                Ok(_) => return Ok(lease),
                // Another host took it since we listed: try the next one.
                Err(keelson_discovery::Error::VersionMismatch { .. }) => continue,
                Err(e) => return Err(kv_error(e)),
            }
        }
        Err(Error::PoolExhausted { network: request.key.network, subnet: pool.subnet.to_string() })
    }

    async fn release(&self, network: &str, key: &AttachmentKey) -> Result<Option<Lease>> {
        let held = self.entries(&self.network_prefix(network)).await?;
        let Some((k, _, lease)) = held.into_iter().find(|(_, _, l)| &l.key == key) else { return Ok(None) };
        self.kv.delete(&k).await.map_err(kv_error)?;
        Ok(Some(lease))
    }

    async fn leases(&self, network: &str) -> Result<Vec<Lease>> {
        let mut out: Vec<Lease> = self.entries(&self.network_prefix(network)).await?.into_iter().map(|(_, _, l)| l).collect();
        out.sort_by_key(|l| l.address);
        Ok(out)
    }

    async fn all_leases(&self) -> Result<Vec<Lease>> {
        Ok(self.entries(&format!("{}/", self.prefix)).await?.into_iter().map(|(_, _, l)| l).collect())
    }

    async fn forget_network(&self, network: &str) -> Result<()> {
        let held = self.leases(network).await?;
        if let Some(first) = held.first() {
            return Err(Error::Conflict {
                kind: "network",
                name: network.to_owned(),
                reason: format!("{} leases held, the first by {}", held.len(), first.key),
            });
        }
        Ok(())
    }
}
