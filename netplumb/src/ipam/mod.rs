//! IPAM: which address each attachment holds. [`LocalIpam`] keeps one host's leases in a
//! journal file shared by every process on the host (a CNI plugin is a new process per
//! call); [`KvIpam`] (feature `cluster`) keeps them in a cluster `KeyValue`, so that
//! hosts sharing one subnet never hand out the same address.
//!
//! A lease records, beside its address, what the attachment owns on the host (its host
//! link, its published ports): `gc` finds orphans from leases, even after the endpoint's
//! namespace is gone.

#[cfg(feature = "cluster")]
mod kv;
mod local;
mod pool;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::attachment::AttachmentKey;
use crate::attachment::PortMapping;
use crate::error::Result;

#[cfg(feature = "cluster")]
pub use kv::KvIpam;
pub use local::LocalIpam;
pub use pool::Pool;

/// An address held by one attachment, and what that attachment owns on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Who holds it.
    pub key: AttachmentKey,
    /// The address.
    pub address: Ipv4Addr,
    /// The host-side link the attachment created, if any.
    #[serde(default)]
    pub host_link: Option<String>,
    /// Ports the attachment publishes on the host.
    #[serde(default)]
    pub ports: Vec<PortMapping>,
    /// The endpoint's namespace, as given at attach.
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

/// What an attachment asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRequest {
    /// Who asks.
    pub key: AttachmentKey,
    /// The host-side link it will create.
    pub host_link: Option<String>,
    /// Ports it will publish. The allocator refuses a port another lease on the same
    /// store already publishes ([`Error::Conflict`](crate::Error::Conflict)).
    pub ports: Vec<PortMapping>,
    /// The endpoint's namespace.
    pub netns: Option<PathBuf>,
    /// The address it would like: taken when it is in the pool and free, otherwise the
    /// next free one as usual.
    pub prefer: Option<Ipv4Addr>,
}

impl LeaseRequest {
    /// A request for `key` with nothing on the host.
    pub fn new(key: AttachmentKey) -> Self {
        LeaseRequest { key, host_link: None, ports: Vec::new(), netns: None, prefer: None }
    }

    /// The same request, preferring `address`.
    pub fn preferring(mut self, address: Option<Ipv4Addr>) -> Self {
        self.prefer = address;
        self
    }
}

/// Hands out addresses from pools, never the same one twice.
#[async_trait]
pub trait Ipam: Send + Sync + std::fmt::Debug {
    /// Leases a free address of `pool` to `request.key`. [`Error::Conflict`](crate::Error::Conflict)
    /// if the key already holds one or a port is taken; [`Error::PoolExhausted`](crate::Error::PoolExhausted)
    /// if none is free.
    async fn allocate(&self, pool: &Pool, request: LeaseRequest) -> Result<Lease>;

    /// Releases the key's lease and returns it; `None` if it held none.
    async fn release(&self, network: &str, key: &AttachmentKey) -> Result<Option<Lease>>;

    /// Every lease on `network`, by address.
    async fn leases(&self, network: &str) -> Result<Vec<Lease>>;

    /// Every lease on every network of this store (for port conflicts and `gc`).
    async fn all_leases(&self) -> Result<Vec<Lease>>;

    /// Forgets `network` (its network was deleted). [`Error::Conflict`](crate::Error::Conflict)
    /// while it holds leases.
    async fn forget_network(&self, network: &str) -> Result<()>;
}
