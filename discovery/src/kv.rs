//! `KeyValue`: the cluster-state interface (etcd v3 semantics, which Consul can also meet).
//!
//! Versions are revisions of one store-wide counter: every write bumps it, and an entry's
//! `version` is the revision of its last write (etcd's `mod_revision`). Compare-and-swap
//! compares that version, and watches resume from a revision.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A lease identifier. Keys attached to a lease are deleted when it expires or is revoked.
pub type LeaseId = u64;

/// The largest value every backend accepts (Consul caps values at 512 KB, etcd requests at
/// 1.5 MiB): code that stays under it runs on any backend unchanged.
pub const MAX_VALUE_BYTES: usize = 512 * 1024;

/// The longest key accepted.
pub const MAX_KEY_BYTES: usize = 1024;

/// Shortest lease TTL any backend accepts (etcd's minimum with default election timeout).
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);

/// Where [`KeyValue::lock`] keeps its lock keys.
pub const LOCK_PREFIX: &str = "keelson/locks/";

/// One stored key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    /// The key.
    pub key: String,
    /// The value bytes.
    pub value: Vec<u8>,
    /// Revision of the last write to this key; what compare-and-swap compares.
    pub version: u64,
    /// Revision at which the key was created.
    pub create_revision: u64,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// The result of a prefix listing: the entries and the store revision they were read at.
/// Watch from `revision + 1` to follow the prefix without missing a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvList {
    /// Store revision of the listing.
    pub revision: u64,
    /// Entries, sorted by key.
    pub entries: Vec<KvEntry>,
}

/// What happened to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvEventKind {
    /// Created or overwritten.
    Put,
    /// Deleted, by a call or by lease expiry.
    Delete,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEvent {
    /// Store revision of the change. Never decreases along one watch; changes made in
    /// one transaction share a revision and arrive together.
    pub revision: u64,
    /// Put or delete.
    pub kind: KvEventKind,
    /// The key.
    pub key: String,
    /// The new value (empty on delete).
    pub value: Vec<u8>,
}

/// What a compare-and-swap expects to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist (create-if-absent).
    Absent,
    /// The key must exist at exactly this version.
    Version(u64),
}

impl Expect {
    /// The expected version, `None` for absent; used in conflict errors.
    pub fn version(self) -> Option<u64> {
        match self {
            Expect::Absent => None,
            Expect::Version(v) => Some(v),
        }
    }
}

/// A stream of changes under a prefix, in revision order, each exactly once. Backends
/// resume it by themselves after transient failures (a lost connection or member). It ends
/// with `Err(Error::Compacted)` when the backend can no longer deliver every change since
/// the last one seen: re-list, then watch from the list's revision + 1.
pub type KvWatch = BoxStream<'static, Result<KvEvent>>;

/// A held lock: the key, the lease that keeps it, and the revision it was taken at
/// (a fencing token: a later holder always has a larger one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLock {
    /// The lock key.
    pub key: String,
    /// The lease; keep it alive (for instance with [`crate::LeaseKeeper`]) while holding.
    pub lease: LeaseId,
    /// Revision the lock was acquired at.
    pub revision: u64,
}

/// What a `KeyValue` backend can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct KvCapabilities {
    /// Watches can start at a past revision.
    pub watch_from_revision: bool,
    /// Leases with TTL are supported.
    pub leases: bool,
    /// Data survives a restart of the process.
    pub durable: bool,
    /// Shortest lease TTL the backend accepts (Consul sessions: 10 s).
    pub min_lease_ttl: Duration,
}

impl KvCapabilities {
    /// Capabilities with every flag given and [`MIN_LEASE_TTL`].
    pub fn new(watch_from_revision: bool, leases: bool, durable: bool) -> Self {
        KvCapabilities { watch_from_revision, leases, durable, min_lease_ttl: MIN_LEASE_TTL }
    }

    /// Sets the shortest lease TTL.
    pub fn with_min_lease_ttl(mut self, ttl: Duration) -> Self {
        self.min_lease_ttl = ttl;
        self
    }
}

/// Cluster state: get, put, compare-and-swap, delete, list and watch by prefix, leases, locks.
#[async_trait]
pub trait KeyValue: Send + Sync + std::fmt::Debug {
    /// The backend's name, for errors and metrics.
    fn backend(&self) -> &'static str;

    /// What this backend supports.
    fn capabilities(&self) -> KvCapabilities;

    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KvEntry>>;

    /// Writes a key unconditionally, optionally attached to a lease; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<u64>;

    /// Writes a key only if it is as `expect` says; otherwise fails with
    /// [`Error::Conflict`] and stores nothing. Returns the new revision.
    async fn compare_and_swap(&self, key: &str, expect: Expect, value: Vec<u8>, lease: Option<LeaseId>) -> Result<u64>;

    /// Deletes a key; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Lists every key starting with `prefix`, sorted, with the revision of the read.
    async fn list(&self, prefix: &str) -> Result<KvList>;

    /// Watches changes under `prefix`, from `from_revision` inclusive (`None`: from now on).
    /// Fails with [`Error::Compacted`] if that revision is no longer kept (a backend without
    /// history, like Consul, keeps only "now": any past revision with changes since is
    /// compacted for it).
    async fn watch(&self, prefix: &str, from_revision: Option<u64>) -> Result<KvWatch>;

    /// Grants a lease that expires after `ttl` unless kept alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// Renews a lease for another TTL. [`Error::NotFound`] if it already expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;

    /// Revokes a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// Takes the lock `name`, waiting up to `wait` for a holder to release it. The lock is
    /// a key under [`LOCK_PREFIX`] on a fresh lease of `ttl`: if the holder dies, the lock
    /// frees itself after `ttl`. Release with [`KeyValue::unlock`].
    async fn lock(&self, name: &str, ttl: Duration, wait: Duration) -> Result<KvLock> {
        crate::name::validate_instance_id(name)
            .map_err(|_| Error::invalid("lock name", name, "must be 1 to 128 printable characters without '/'"))?;
        let key = format!("{LOCK_PREFIX}{name}");
        let lease = self.grant_lease(ttl).await?;
        let deadline = tokio::time::Instant::now() + wait;
        let outcome = async {
            loop {
                match self.compare_and_swap(&key, Expect::Absent, lease.to_string().into_bytes(), Some(lease)).await {
                    Ok(revision) => return Ok(KvLock { key: key.clone(), lease, revision }),
                    Err(Error::Conflict { .. }) => {}
                    Err(e) => return Err(e),
                }
                // Someone holds it: wait for its key to go away. Watching from the holder's
                // version + 1 means a release between our CAS and the watch is not missed.
                let Some(holder) = self.get(&key).await? else { continue };
                let mut events = match self.watch(&key, Some(holder.version + 1)).await {
                    Ok(events) => events,
                    // Changed since we read it (and the backend keeps no history): retry.
                    Err(Error::Compacted { .. }) => continue,
                    Err(e) => return Err(e),
                };
                // A backend that cannot replay may have missed a release between the read
                // and the watch: look again before waiting.
                if self.get(&key).await?.is_none_or(|now| now.version != holder.version) {
                    continue;
                }
                let released = async {
                    let renew_every = ttl / 3;
                    loop {
                        tokio::select! {
                            event = events.next() => match event {
                                Some(Ok(ev)) if ev.key == key && ev.kind == KvEventKind::Delete => return Ok(()),
                                Some(Ok(_)) => {}
                                Some(Err(e)) => return Err(e),
                                None => return Ok(()),
                            },
                            _ = tokio::time::sleep(renew_every) => self.keep_alive(lease).await?,
                        }
                    }
                };
                match tokio::time::timeout_at(deadline, released).await {
                    Ok(result) => result?,
                    Err(_) => return Err(Error::Timeout { operation: "lock", after: wait }),
                }
            }
        }
        .await;
        if outcome.is_err() {
            // Best effort: the lease would expire anyway; revoking frees it now.
            let _ = self.revoke_lease(lease).await;
        }
        outcome
    }

    /// Releases a lock taken with [`KeyValue::lock`] by revoking its lease.
    async fn unlock(&self, lock: &KvLock) -> Result<()> {
        self.revoke_lease(lock.lease).await
    }
}

/// Validates a key as every backend would accept it.
pub fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid("key", key, "must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::invalid("key", truncate(key), format!("must be at most {MAX_KEY_BYTES} bytes")));
    }
    if key.chars().any(char::is_control) {
        return Err(Error::invalid("key", key, "must not contain control characters"));
    }
    Ok(())
}

/// Validates a value's size.
pub fn validate_value(key: &str, value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Error::invalid("value", key, format!("is {} bytes; the limit is {MAX_VALUE_BYTES}", value.len())));
    }
    Ok(())
}

/// Validates a lease TTL.
pub fn validate_ttl(ttl: Duration) -> Result<()> {
    if ttl < MIN_LEASE_TTL {
        return Err(Error::invalid("lease ttl", format!("{ttl:?}"), format!("must be at least {MIN_LEASE_TTL:?}")));
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect::<String>() + "..."
}
