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

/// A lease's TTL ([`KeyValue::lease_ttl`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseTtl {
    /// The TTL it was granted (and is renewed to).
    pub granted: Duration,
    /// What is left before it expires.
    pub remaining: Duration,
}

impl LeaseTtl {
    /// A lease's TTL: `granted`, of which `remaining` is left.
    pub fn new(granted: Duration, remaining: Duration) -> Self {
        LeaseTtl { granted, remaining }
    }

    /// About how long ago the lease was granted or last renewed.
    pub fn since_renewal(&self) -> Duration {
        self.granted.saturating_sub(self.remaining)
    }
}

/// The largest value every backend accepts (Consul caps values at 512 KB, etcd requests at
/// 1.5 MiB): code that stays under it runs on any backend unchanged.
pub const MAX_VALUE_BYTES: usize = 512 * 1024;

/// The longest key accepted.
pub const MAX_KEY_BYTES: usize = 1024;

/// Shortest lease TTL any backend accepts (etcd's minimum with default election timeout).
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);

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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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

/// One condition of a [`Txn`]: all must hold for its writes to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key is as `expect` says: absent, or last written at exactly that revision.
    Key {
        /// The key compared.
        key: String,
        /// What it must be.
        expect: Expect,
    },
    /// The key exists and is attached to `lease`: a lock still held by the lease that
    /// took it. This is how a write made under a lock is fenced (see [`crate::LockGuard`]).
    Lease {
        /// The lock key.
        key: String,
        /// The lease that must hold it.
        lease: LeaseId,
    },
}

impl Compare {
    /// `key` must be absent or at `version`.
    pub fn key(key: impl Into<String>, expect: Expect) -> Self {
        Compare::Key { key: key.into(), expect }
    }

    /// `key` must be held by `lease`.
    pub fn lease(key: impl Into<String>, lease: LeaseId) -> Self {
        Compare::Lease { key: key.into(), lease }
    }

    /// The key this compare reads.
    pub fn key_name(&self) -> &str {
        match self {
            Compare::Key { key, .. } | Compare::Lease { key, .. } => key,
        }
    }
}

/// One write of a [`Txn`].
#[derive(Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Writes `value` at `key`, attached to `lease` if given.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// The lease the key lives on.
        lease: Option<LeaseId>,
    },
    /// Deletes `key` (absent is fine).
    Delete {
        /// The key.
        key: String,
    },
}

impl std::fmt::Debug for TxnOp {
    // Values can be large: print their size, not their bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxnOp::Put { key, value, lease } => {
                f.debug_struct("Put").field("key", key).field("value_bytes", &value.len()).field("lease", lease).finish()
            }
            TxnOp::Delete { key } => f.debug_struct("Delete").field("key", key).finish(),
        }
    }
}

impl TxnOp {
    /// The key written.
    pub fn key(&self) -> &str {
        match self {
            TxnOp::Put { key, .. } | TxnOp::Delete { key } => key,
        }
    }
}

/// Compares and writes applied all or nothing by [`KeyValue::txn`].
///
/// ```
/// use keelson_discovery::{Compare, Expect, Txn};
/// let txn = Txn::new()
///     .when(Compare::key("cluster/head", Expect::Version(7)))
///     .put("cluster/head", b"8".to_vec(), None)
///     .delete("cluster/old");
/// assert_eq!(txn.len(), 3);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    /// Conditions, all checked before any write.
    pub compares: Vec<Compare>,
    /// Writes, applied in order at one revision if every compare holds.
    pub ops: Vec<TxnOp>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Txn::default()
    }

    /// Adds a condition.
    pub fn when(mut self, compare: Compare) -> Self {
        self.compares.push(compare);
        self
    }

    /// Adds a put.
    pub fn put(mut self, key: impl Into<String>, value: Vec<u8>, lease: Option<LeaseId>) -> Self {
        self.ops.push(TxnOp::Put { key: key.into(), value, lease });
        self
    }

    /// Adds a delete.
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(TxnOp::Delete { key: key.into() });
        self
    }

    /// Compares plus writes: what backends count against [`KvCapabilities::max_txn_ops`].
    pub fn len(&self) -> usize {
        self.compares.len() + self.ops.len()
    }

    /// Whether the transaction has neither compares nor writes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of keys and values: what backends count against
    /// [`KvCapabilities::max_txn_bytes`].
    pub fn size_bytes(&self) -> usize {
        let compares: usize = self.compares.iter().map(|c| c.key_name().len()).sum();
        let ops: usize = self
            .ops
            .iter()
            .map(|op| match op {
                TxnOp::Put { key, value, .. } => key.len() + value.len(),
                TxnOp::Delete { key } => key.len(),
            })
            .sum();
        compares + ops
    }

    /// Checks every key and value, and the size against `caps`, before anything is sent:
    /// a transaction past a backend's limits is refused whole, never applied in part.
    pub fn validate(&self, backend: &'static str, caps: &KvCapabilities) -> Result<()> {
        for c in &self.compares {
            validate_key(c.key_name())?;
        }
        for op in &self.ops {
            validate_key(op.key())?;
            if let TxnOp::Put { key, value, .. } = op {
                validate_value(key, value)?;
            }
        }
        let mut written = std::collections::HashSet::new();
        if let Some(twice) = self.ops.iter().map(TxnOp::key).find(|k| !written.insert(*k)) {
            return Err(Error::invalid("txn", twice, "writes this key twice; one transaction writes a key once"));
        }
        let (ops, bytes) = (self.len(), self.size_bytes());
        if ops > caps.max_txn_ops || bytes > caps.max_txn_bytes {
            return Err(Error::TxnTooLarge { backend, ops, bytes, max_ops: caps.max_txn_ops, max_bytes: caps.max_txn_bytes });
        }
        Ok(())
    }
}

/// A stream of changes under a prefix, in revision order, each exactly once. Backends
/// resume it by themselves after transient failures (a lost connection or member); while
/// the backend cannot be reached they yield one `Err(Error::Unavailable)` per outage
/// (within about twice the client's keep-alive interval), so that a follower can say it
/// is stale, and go on: reading on delivers the changes once the backend is back. It ends
/// with `Err(Error::Compacted)` when the backend can no longer deliver every change since
/// the last one seen: re-list, then watch from the list's revision + 1.
pub type KvWatch = BoxStream<'static, Result<KvEvent>>;

/// A held lock: the key, the lease that keeps it, and the revision it was taken at
/// (a later holder always has a larger one). [`crate::LockGuard`] keeps it alive and
/// fences writes with it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "the lock stays held until unlocked or its lease expires; release it with KeyValue::unlock"]
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
    /// Most compares plus writes in one [`KeyValue::txn`] (etcd: 128 by default; Consul:
    /// 64 on every version).
    pub max_txn_ops: usize,
    /// Most bytes of keys and values in one [`KeyValue::txn`] (etcd: 1.5 MiB per request;
    /// Consul: 512 KiB).
    pub max_txn_bytes: usize,
}

/// etcd's default `--max-txn-ops`.
pub const ETCD_MAX_TXN_OPS: usize = 128;
/// etcd's default `--max-request-bytes` (1.5 MiB), less room for the request's framing.
pub const ETCD_MAX_TXN_BYTES: usize = 1536 * 1024 - 16 * 1024;

/// Nothing supported, with [`MIN_LEASE_TTL`] and etcd's transaction limits: a backend
/// outside this crate starts here and sets what it supports.
impl Default for KvCapabilities {
    fn default() -> Self {
        KvCapabilities::new(false, false, false)
    }
}

impl KvCapabilities {
    /// Capabilities with every flag given, [`MIN_LEASE_TTL`] and etcd's transaction limits.
    pub fn new(watch_from_revision: bool, leases: bool, durable: bool) -> Self {
        KvCapabilities {
            watch_from_revision,
            leases,
            durable,
            min_lease_ttl: MIN_LEASE_TTL,
            max_txn_ops: ETCD_MAX_TXN_OPS,
            max_txn_bytes: ETCD_MAX_TXN_BYTES,
        }
    }

    /// Sets the transaction limits.
    pub fn with_txn_limits(mut self, max_ops: usize, max_bytes: usize) -> Self {
        self.max_txn_ops = max_ops;
        self.max_txn_bytes = max_bytes;
        self
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
    /// [`Error::VersionMismatch`] and stores nothing. Returns the new revision.
    async fn compare_and_swap(&self, key: &str, expect: Expect, value: Vec<u8>, lease: Option<LeaseId>) -> Result<u64>;

    /// Deletes a key; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Applies `txn`'s writes at one revision if every compare holds, or nothing.
    /// Returns the revision of the writes (Consul cannot tell it for a transaction that
    /// only deletes: 0). A compare that fails gives [`Error::VersionMismatch`] (a key compare,
    /// with the version found) or [`Error::Fenced`] (a lease compare) naming its key;
    /// a transaction past [`KvCapabilities::max_txn_ops`] or
    /// [`KvCapabilities::max_txn_bytes`] gives [`Error::TxnTooLarge`]. Writes to one key
    /// twice in one transaction are refused ([`Error::InvalidInput`]), as etcd does.
    async fn txn(&self, txn: Txn) -> Result<u64> {
        let _ = txn;
        Err(Error::Unsupported { operation: "txn", backend: self.backend() })
    }

    /// Lists every key starting with `prefix`, sorted, with the revision of the read.
    async fn list(&self, prefix: &str) -> Result<KvList>;

    /// One page of a prefix listing: at most `limit` entries (at least 1) whose keys come
    /// after `after` (`None`: from the first), read at `revision` (`None`: now). Reading
    /// every page at the revision of the first ([`list_paged`] does) gives a consistent
    /// listing of any size, each response within the client's limits. A revision the
    /// backend can no longer serve is [`Error::Compacted`]: start over. The default reads
    /// the whole prefix and cuts it, serving only the current revision (right for
    /// backends that keep no history, such as `MemoryKv` and Consul).
    async fn list_page(&self, prefix: &str, after: Option<&str>, limit: usize, revision: Option<u64>) -> Result<KvList> {
        let mut list = self.list(prefix).await?;
        if let Some(r) = revision.filter(|r| *r != list.revision) {
            return Err(Error::Compacted { requested: r, oldest: list.revision });
        }
        list.entries.retain(|e| after.is_none_or(|a| e.key.as_str() > a));
        list.entries.truncate(limit.max(1));
        Ok(list)
    }

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

    /// A lease's TTL as granted and the time it has left: its holder last renewed it
    /// about `granted - remaining` ago (what `keelson-ctl nodes` shows as a node's last
    /// heartbeat). [`Error::NotFound`] once it expired or was revoked. The default is
    /// [`Error::Unsupported`] (Consul sessions do not tell).
    async fn lease_ttl(&self, lease: LeaseId) -> Result<LeaseTtl> {
        let _ = lease;
        Err(Error::Unsupported { operation: "lease_ttl", backend: self.backend() })
    }

    /// Takes the lock kept at `key`, waiting up to `wait` for a holder to release it. The
    /// key lives on a fresh lease of `ttl`: if the holder dies, the lock frees itself after
    /// `ttl`. Put lock keys under your own root (one etcd role can then cover them).
    /// Nothing renews the lease: use [`crate::LockGuard`], which keeps it alive, says
    /// when it is lost and fences writes, unless the work is shorter than `ttl`.
    /// Release with [`KeyValue::unlock`].
    async fn lock(&self, key: &str, ttl: Duration, wait: Duration) -> Result<KvLock> {
        validate_key(key)?;
        let key = key.to_owned();
        let lease = self.grant_lease(ttl).await?;
        let deadline = tokio::time::Instant::now() + wait;
        let outcome = async {
            loop {
                match self.compare_and_swap(&key, Expect::Absent, lease.to_string().into_bytes(), Some(lease)).await {
                    Ok(revision) => return Ok(KvLock { key: key.clone(), lease, revision }),
                    Err(Error::VersionMismatch { .. }) => {}
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

/// Entries per page in [`list_paged`].
pub const LIST_PAGE: usize = 5_000;

/// Lists `prefix` in pages of [`LIST_PAGE`] entries, all read at one revision (restarting
/// if the backend compacts it meanwhile), so a listing of any size stays consistent and
/// each response small.
pub async fn list_paged(kv: &dyn KeyValue, prefix: &str) -> Result<KvList> {
    let mut attempts = 0;
    loop {
        match list_paged_at(kv, prefix, None).await {
            Err(Error::Compacted { .. }) if attempts < 10 => attempts += 1,
            other => return other,
        }
    }
}

/// Lists `prefix` in pages of [`LIST_PAGE`] entries, every page read at `revision`
/// (`None`: the revision of the first page). Several prefixes listed at one revision are
/// one consistent snapshot, and a watch from `revision + 1` follows it without a gap.
/// [`Error::Compacted`] if the backend no longer serves that revision: start over.
pub async fn list_paged_at(kv: &dyn KeyValue, prefix: &str, revision: Option<u64>) -> Result<KvList> {
    let first = kv.list_page(prefix, None, LIST_PAGE, revision).await?;
    let revision = first.revision;
    let mut full = first.entries.len() == LIST_PAGE;
    let mut entries = first.entries;
    while full {
        let after = entries.last().map(|e| e.key.clone());
        let page = kv.list_page(prefix, after.as_deref(), LIST_PAGE, Some(revision)).await?;
        full = page.entries.len() == LIST_PAGE;
        entries.extend(page.entries);
    }
    Ok(KvList { revision, entries })
}

/// The error for a transaction whose compares did not all hold, given what each
/// compared key held (`None`: absent) when it was checked: the first compare that
/// fails, by its kind. Backends that only learn "some compare failed" (etcd) use it.
pub fn failed_compare(compares: &[Compare], found: &[Option<KvEntry>]) -> Error {
    for (c, entry) in compares.iter().zip(found) {
        match c {
            Compare::Key { key, expect } => {
                let actual = entry.as_ref().map(|e| e.version);
                if actual != expect.version() {
                    return Error::VersionMismatch { key: key.clone(), expected: expect.version(), actual };
                }
            }
            Compare::Lease { key, lease } => {
                if entry.as_ref().and_then(|e| e.lease) != Some(*lease) {
                    return Error::Fenced { key: key.clone(), lease: *lease };
                }
            }
        }
    }
    // Every compare holds now: a racing writer changed a key back between the check and
    // the read. Still a conflict on the first key; the caller re-reads and retries.
    let key = compares.first().map(|c| c.key_name().to_owned()).unwrap_or_default();
    Error::VersionMismatch { key, expected: None, actual: None }
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
