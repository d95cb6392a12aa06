//! Service discovery and cluster state for keelson.
//!
//! Two traits: [`Discovery`] (register service instances, look them up, watch them) and
//! [`KeyValue`] (etcd-style cluster state: revisions, compare-and-swap, prefix watches,
//! leases, locks). The embedded default needs no server: [`MemoryKv`], and
//! [`MemoryDiscovery`], which is [`KvDiscovery`] over it. `KvDiscovery` works over any
//! `KeyValue`, so a store backend gets discovery for free. [`health`] runs active
//! checks that set instance health through any `Discovery`.
//!
//! ## Backends
//!
//! | backend | cargo feature | `KeyValue` | `Discovery` |
//! |---|---|---|---|
//! | in memory (default) | none | [`MemoryKv`] | [`MemoryDiscovery`] |
//! | etcd v3 | `etcd` (build needs `protoc`) | `EtcdKv::connect(EtcdConfig::new(["http://10.0.0.1:2379", ...]))` | `KvDiscovery::new(Arc::new(etcd_kv))` |
//! | Consul | `consul` | `ConsulKv::new(ConsulConfig::new("http://127.0.0.1:8500"))` | `ConsulDiscovery::new(ConsulConfig::new("http://127.0.0.1:8500"))` |
//! | DNS (read-only) | `dns` | | `DnsDiscovery::new(DnsConfig::new(vec![server], "example.test"))` |
//!
//! Serving: `DnsServer` (feature `dns-server`) answers DNS from any `Discovery`;
//! [`ServiceView`] keeps a lock-free local copy for hot paths.
//!
//! The etcd backend resumes watches by itself after member loss (no event lost or
//! repeated), reports compaction as [`Error::Compacted`], bounds every call by
//! `EtcdConfig::request_timeout` (then [`Error::Unavailable`]), and keeps leases alive
//! through a fresh stream per renewal. The Consul backend registers through the local
//! agent with TTL checks, watches with blocking queries (Consul's index rules), and keeps
//! cluster state in Consul KV with sessions as leases; Consul keeps no history, so its
//! `KeyValue` reports past revisions as compacted. `ConsulConfig` takes the ACL token
//! (never printed) and the datacenter.
//!
//! ```
//! use keelson_discovery::{Discovery, MemoryDiscovery, Query, Registration, ServiceName};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keelson_discovery::Error> {
//! let discovery = MemoryDiscovery::memory();
//! let web = ServiceName::new("web")?;
//! let handle = discovery
//!     .register(Registration::new(web.clone(), "web-1", "127.0.0.1", 8080).with_tag("keelson.http.host=web.localhost"))
//!     .await?;
//! let found = discovery.instances(&Query::service(web).healthy()).await?;
//! assert_eq!(found[0].tag_value("keelson.http.host"), Some("web.localhost"));
//! handle.deregister().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Cluster state changes all at once: [`KeyValue::txn`] applies compares and writes
//! together (within each backend's limits, stated in [`KvCapabilities`]), a
//! [`LockGuard`] keeps a lock alive and fences every write made under it, and a
//! [`Journal`] makes write sets of any size visible to readers at one moment.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use keelson_discovery::{Compare, Error, Journal, KeyValue, LockGuard, MemoryKv, Txn, TxnOp};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Error> {
//! let kv: Arc<dyn KeyValue> = Arc::new(MemoryKv::new());
//! let lock = LockGuard::acquire(kv.clone(), "cluster/locks/leader", Duration::from_secs(5), Duration::from_secs(1)).await?;
//! // Lands only while this process still holds the lock.
//! kv.txn(Txn::new().when(lock.fence()).put("cluster/leader", b"me".to_vec(), None)).await?;
//!
//! // 1,000 writes, far past one transaction, seen whole or not at all.
//! let journal = Journal::new(kv.clone(), "cluster/journal");
//! let read = journal.read(&["cluster/data/".to_owned()]).await?;
//! let writes = (0..1000).map(|i| TxnOp::Put { key: format!("cluster/data/{i:04}"), value: vec![1], lease: None }).collect();
//! journal.commit(read.head, vec![lock.fence()], writes).await?;
//! assert_eq!(journal.read(&["cluster/data/".to_owned()]).await?.lists[0].entries.len(), 1000);
//! lock.release().await?;
//! # Ok(())
//! # }
//! ```
//!
//! ## Feature flags
//!
#![doc = document_features::document_features!()]
// docs.rs (all features, --cfg docsrs) marks each backend item with the feature it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "consul")]
mod consul;
#[cfg(feature = "consul")]
pub mod consul_api;
mod discovery;
#[cfg(feature = "dns")]
mod dns;
#[cfg(feature = "dns-server")]
mod dns_server;
mod error;
#[cfg(feature = "etcd")]
mod etcd;
pub mod health;
mod journal;
mod kv;
mod kv_discovery;
mod lease_keeper;
mod lock_guard;
mod memory_kv;
mod name;
mod view;
mod wrappers;

#[cfg(feature = "conformance")]
pub mod conformance;

#[cfg(feature = "consul")]
pub use consul::{
    next_index as consul_next_index, ConsulConfig, ConsulDiscovery, ConsulKv, CONSUL_MAX_TXN_BYTES, CONSUL_MAX_TXN_OPS, SESSION_TTL_RANGE,
};
pub use discovery::{
    Discovery, DiscoveryCapabilities, Health, Instance, Query, Registration, RegistrationHandle, RegistrationLease, Snapshot,
    SnapshotStream, DEFAULT_TTL, MAX_META, MAX_META_KEY_BYTES, MAX_META_VALUE_BYTES, MAX_TAGS, MAX_TAG_BYTES,
};
#[cfg(feature = "dns")]
pub use dns::{DnsConfig, DnsDiscovery};
#[cfg(feature = "dns-server")]
pub use dns_server::{instance_label, DnsServer, DnsServerConfig};
pub use error::{Error, Result};
#[cfg(feature = "etcd")]
pub use etcd::{EtcdConfig, EtcdKv, EtcdTls, DEFAULT_MAX_MESSAGE_BYTES};
pub use journal::{Journal, JournalRead};
pub use keelson_base::{retry_pauses, RetryPauses};
pub use kv::{
    failed_compare, list_paged, list_paged_at, validate_key, Compare, Expect, KeyValue, KvCapabilities, KvEntry, KvEvent, KvEventKind,
    KvList, KvLock, KvWatch, LeaseId, LeaseTtl, Txn, TxnOp, ETCD_MAX_TXN_BYTES, ETCD_MAX_TXN_OPS, LIST_PAGE, MAX_KEY_BYTES,
    MAX_VALUE_BYTES, MIN_LEASE_TTL,
};
pub use kv_discovery::{KvDiscovery, MemoryDiscovery, DEFAULT_ROOT};
pub use lease_keeper::LeaseKeeper;
pub use lock_guard::LockGuard;
pub use memory_kv::{MemoryKv, DEFAULT_HISTORY};
pub use name::{validate_instance_id, validate_label, ServiceName};
pub use view::{ServiceView, ViewSnapshot};
pub use wrappers::{MetricsDiscovery, RetryDiscovery, RetryPolicy};
