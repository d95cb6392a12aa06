//! `Journal`: a set of writes of any size made visible to readers all at once, on any
//! `KeyValue` backend, within its transaction limits.
//!
//! A transaction holds at most 128 operations and 1.5 MiB on etcd (64 and 512 KiB on
//! Consul), but a scheduler plan can touch thousands of keys. The journal keeps one
//! small *head* key, the commit point every commit compares and rewrites:
//! - a write set that fits one transaction is applied by that transaction, together
//!   with the compare on the head and its rewrite;
//! - a larger one is first written as immutable *chunks* that no reader follows, then
//!   *published* by one transaction that compares the head (and that every chunk is
//!   still there) and records in it the pending write set; it is then *applied* in
//!   transactions that each compare the head (so a stale applier can never write over
//!   newer state), and *finished* by rewriting the head without it.
//!
//! Readers use [`Journal::read`]: they list their prefixes between two reads of the head
//! and retry if it moved, and while a write set is pending they lay its chunks over what
//! they listed. A published write set is therefore visible whole from the moment it is
//! published, even if its writer dies half-way through applying it; whoever commits
//! next (or calls [`Journal::finish_pending`]) finishes it. Unpublished chunks of a
//! writer that died are invisible and collected by [`Journal::collect_garbage`].
//!
//! Every commit compares the head, so commits are serialised, like the plan applier of
//! Nomad: a writer that read its state before another commit gets [`Error::VersionMismatch`]
//! on the head key and re-reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kv::{Compare, Expect, KeyValue, KvEntry, KvList, LeaseId, Txn, TxnOp};

/// The journal's head record: the commit count and the write set being applied, if any.
/// Stored as JSON; unknown fields are ignored so that a newer writer's head is readable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    #[serde(default)]
    schema: u32,
    /// Commits so far.
    #[serde(default)]
    seq: u64,
    /// A published write set not yet fully applied.
    #[serde(default)]
    pending: Option<Pending>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    /// The write set's id (its chunks live under `chunks/<id>/`).
    id: String,
    /// How many chunks it has.
    chunks: u32,
}

/// What [`Journal::read`] saw: each prefix's entries as of one commit, and the head's
/// version to pass back to [`Journal::commit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalRead {
    /// The head as read: what a commit based on this read must still find.
    pub head: Expect,
    /// One listing per prefix asked for, in that order. Entries written by a pending
    /// write set carry version 0 (they have no revision yet: a compare-and-swap on them
    /// conflicts, and the caller re-reads).
    pub lists: Vec<KvList>,
}

/// Makes write sets of any size visible at once (see the module docs).
#[derive(Clone, Debug)]
pub struct Journal {
    kv: Arc<dyn KeyValue>,
    head_key: String,
    chunk_prefix: String,
}

/// Reads retried this often when commits keep moving the head before giving up.
const READ_ATTEMPTS: u32 = 50;
/// Apply transactions of one write set in flight at once.
const APPLY_CONCURRENCY: usize = 4;

impl Journal {
    /// A journal whose head and chunks live under `root` (e.g. `keelson/cluster/journal`).
    pub fn new(kv: Arc<dyn KeyValue>, root: &str) -> Self {
        let root = root.trim_end_matches('/');
        Journal { kv, head_key: format!("{root}/head"), chunk_prefix: format!("{root}/chunks/") }
    }

    /// The head key (for watchers that want to follow commits).
    pub fn head_key(&self) -> &str {
        &self.head_key
    }

    /// Whether `head` (the head key's entry, as a watcher of the journal receives it)
    /// holds a published write set not yet applied: until it is finished, the keys the
    /// watcher follows do not yet show every write of the last commit.
    pub fn is_pending(head: &[u8]) -> bool {
        serde_json::from_slice::<Head>(head).map_or(true, |h| h.pending.is_some())
    }

    async fn head(&self) -> Result<(Head, Option<KvEntry>)> {
        match self.kv.get(&self.head_key).await? {
            Some(e) => Ok((decode_head(&e)?, Some(e))),
            None => Ok((Head::default(), None)),
        }
    }

    /// Lists `prefixes` as of one commit, with a pending write set laid over them.
    pub async fn read(&self, prefixes: &[String]) -> Result<JournalRead> {
        let mut pauses = crate::retry_pauses(Duration::from_millis(1), Duration::from_millis(50));
        for _ in 0..READ_ATTEMPTS {
            let (head, before) = self.head().await?;
            let mut lists = Vec::with_capacity(prefixes.len());
            for p in prefixes {
                lists.push(crate::kv::list_paged(self.kv.as_ref(), p).await?);
            }
            let after = self.kv.get(&self.head_key).await?;
            if after.as_ref().map(|e| e.version) != before.as_ref().map(|e| e.version) {
                tokio::time::sleep(pauses.next().unwrap_or_default()).await;
                continue;
            }
            if let Some(pending) = &head.pending {
                let Some(writes) = self.chunks(pending).await? else { continue };
                for (list, prefix) in lists.iter_mut().zip(prefixes) {
                    overlay(list, prefix, &writes);
                }
            }
            return Ok(JournalRead { head: before.map_or(Expect::Absent, |e| Expect::Version(e.version)), lists });
        }
        Err(Error::Unavailable {
            backend: self.kv.backend(),
            reason: format!("{} kept changing during {READ_ATTEMPTS} consistent reads", self.head_key),
        })
    }

    /// Reads a pending write set's chunks; `None` if one is gone (the set was finished
    /// and collected meanwhile: the caller re-reads the head).
    async fn chunks(&self, pending: &Pending) -> Result<Option<Vec<TxnOp>>> {
        let mut writes = Vec::new();
        for k in 0..pending.chunks {
            let key = self.chunk_key(&pending.id, k);
            let Some(e) = self.kv.get(&key).await? else { return Ok(None) };
            writes.extend(decode_chunk(&key, &e.value)?);
        }
        Ok(Some(writes))
    }

    fn chunk_key(&self, id: &str, k: u32) -> String {
        format!("{}{id}/{k:06}", self.chunk_prefix)
    }

    /// Applies `writes` if the head is still as `head` says (from a [`Journal::read`])
    /// and every compare holds, visible to readers all at once whatever its size.
    /// Returns the revision at which it became visible. [`Error::VersionMismatch`] on the head
    /// key if another commit came first (re-read and retry); the error of a compare that
    /// failed otherwise ([`Error::Fenced`] for a lost lock). Each key may be written once.
    pub async fn commit(&self, head: Expect, compares: Vec<Compare>, writes: Vec<TxnOp>) -> Result<u64> {
        let caps = self.kv.capabilities();
        let (now, entry) = self.head().await?;
        let current = entry.as_ref().map_or(Expect::Absent, |e| Expect::Version(e.version));
        if now.pending.is_some() {
            // Nothing commits over a write set still being applied (its appliers would
            // fail, or worse, a late one would write under the new head). Its writer may
            // have died: finish it, and let the caller re-read.
            self.finish_pending().await?;
            return Err(Error::VersionMismatch { key: self.head_key.clone(), expected: head.version(), actual: current.version() });
        }
        if current != head {
            return Err(Error::VersionMismatch { key: self.head_key.clone(), expected: head.version(), actual: current.version() });
        }
        let next = Head { schema: 1, seq: now.seq + 1, pending: None };
        let whole = Txn { compares: compares.clone(), ops: writes.clone() }.when(Compare::key(&self.head_key, head)).put(
            &self.head_key,
            encode_head(&next)?,
            None,
        );
        match whole.validate(self.kv.backend(), &caps) {
            Ok(()) => return self.kv.txn(whole).await,
            Err(Error::TxnTooLarge { .. }) => {}
            Err(e) => return Err(e),
        }
        self.commit_large(head, next, compares, writes).await
    }

    async fn commit_large(&self, head: Expect, next: Head, compares: Vec<Compare>, writes: Vec<TxnOp>) -> Result<u64> {
        let caps = self.kv.capabilities();
        // The whole set must be a valid transaction but for its size: same checks.
        let mut seen = std::collections::HashSet::new();
        for op in &writes {
            crate::kv::validate_key(op.key())?;
            if let TxnOp::Put { key, value, .. } = op {
                crate::kv::validate_value(key, value)?;
            }
            if !seen.insert(op.key()) {
                return Err(Error::invalid("journal commit", op.key(), "writes this key twice; a commit writes a key once"));
            }
            // Each write must fit an apply transaction beside the head's compare, or the
            // set, once published, could never be finished.
            let alone = Txn { compares: vec![Compare::key(&self.head_key, Expect::Absent)], ops: vec![op.clone()] };
            alone.validate(self.kv.backend(), &caps)?;
        }

        // 1. Chunks nobody follows yet.
        let id = unique_id();
        let chunk_bytes = crate::kv::MAX_VALUE_BYTES.min(caps.max_txn_bytes / 2);
        let encoded = encode_chunks(&writes, chunk_bytes);
        let mut chunk_compares = Vec::with_capacity(encoded.len());
        for (k, bytes) in encoded.into_iter().enumerate() {
            let key = self.chunk_key(&id, k as u32);
            let version = match self.kv.put(&key, bytes, None).await {
                Ok(v) => v,
                Err(e) => {
                    self.drop_chunks(&id, k as u32).await;
                    return Err(e);
                }
            };
            chunk_compares.push(Compare::key(key, Expect::Version(version)));
        }
        let chunks = chunk_compares.len() as u32;

        // 2. Publish: from here on the write set is committed.
        let published_head = Head { pending: Some(Pending { id: id.clone(), chunks }), ..next.clone() };
        let mut publish = Txn { compares, ops: Vec::new() }.when(Compare::key(&self.head_key, head));
        publish.compares.extend(chunk_compares);
        let publish = publish.put(&self.head_key, encode_head(&published_head)?, None);
        let published = match self.kv.txn(publish).await {
            Ok(revision) => revision,
            Err(e) => {
                self.drop_chunks(&id, chunks).await;
                return Err(e);
            }
        };
        tracing::debug!(id, chunks, writes = writes.len(), revision = published, "journal: write set published");

        // 3. Apply, and 4. finish. If another process finishes it first, the head moves
        // and our remaining transactions fail on it: the work is done all the same.
        match self.apply(&id, chunks, published, writes).await {
            Ok(()) | Err(Error::VersionMismatch { .. }) => Ok(published),
            // Not applied yet, but committed: readers see it through the head, and the
            // next commit finishes it. Report success, as etcd would after its Raft commit.
            Err(e) => {
                tracing::warn!(id, error = %e, "journal: applying a published write set failed; the next commit finishes it");
                Ok(published)
            }
        }
    }

    /// Applies a published write set under the head's `version`, then finishes it.
    async fn apply(&self, id: &str, chunks: u32, version: u64, writes: Vec<TxnOp>) -> Result<()> {
        let caps = self.kv.capabilities();
        let guard = Compare::key(&self.head_key, Expect::Version(version));
        let room_ops = caps.max_txn_ops.saturating_sub(1).max(1);
        let room_bytes = caps.max_txn_bytes.saturating_sub(self.head_key.len());
        let mut batches: Vec<Txn> = Vec::new();
        let mut batch = Txn::new().when(guard.clone());
        for op in writes {
            let size = Txn { compares: Vec::new(), ops: vec![op.clone()] }.size_bytes();
            if batch.ops.len() >= room_ops || (!batch.ops.is_empty() && batch.size_bytes() + size > room_bytes) {
                batches.push(std::mem::replace(&mut batch, Txn::new().when(guard.clone())));
            }
            batch.ops.push(op);
        }
        if !batch.ops.is_empty() {
            batches.push(batch);
        }
        let kv = &self.kv;
        let mut results = futures::stream::iter(batches.into_iter().map(|txn| kv.txn(txn))).buffer_unordered(APPLY_CONCURRENCY);
        while let Some(r) = results.next().await {
            r?;
        }
        drop(results);
        let (head, _) = self.head().await?;
        let finished = Head { pending: None, ..head };
        let mut finish = Txn::new().when(guard).put(&self.head_key, encode_head(&finished)?, None);
        for k in 0..chunks {
            finish = finish.delete(self.chunk_key(id, k));
        }
        match finish.validate(kv.backend(), &caps) {
            Ok(()) => {
                kv.txn(finish).await?;
            }
            // More chunks than one transaction deletes: finish, then collect them.
            Err(Error::TxnTooLarge { .. }) => {
                let Txn { compares, ops } = finish;
                kv.txn(Txn { compares, ops: ops.into_iter().take(1).collect() }).await?;
                self.drop_chunks(id, chunks).await;
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Finishes a published write set whose writer stopped before finishing it. Returns
    /// whether there was one. Safe to call at any time, from any number of processes.
    pub async fn finish_pending(&self) -> Result<bool> {
        let (head, entry) = self.head().await?;
        let (Some(pending), Some(entry)) = (head.pending, entry) else { return Ok(false) };
        let Some(writes) = self.chunks(&pending).await? else {
            // Finished and collected meanwhile.
            return Ok(true);
        };
        tracing::info!(id = %pending.id, "journal: finishing a write set its writer left pending");
        match self.apply(&pending.id, pending.chunks, entry.version, writes).await {
            Ok(()) | Err(Error::VersionMismatch { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Deletes chunks that no published write set refers to (left by writers that died
    /// before publishing). A writer about to publish them fails with a conflict and
    /// retries, so this is safe at any time. Returns how many keys it deleted.
    pub async fn collect_garbage(&self) -> Result<usize> {
        let (head, _) = self.head().await?;
        let keep = head.pending.map(|p| format!("{}{}/", self.chunk_prefix, p.id));
        let list = self.kv.list(&self.chunk_prefix).await?;
        let mut deleted = 0;
        for e in list.entries {
            if keep.as_deref().is_some_and(|k| e.key.starts_with(k)) {
                continue;
            }
            if self.kv.delete(&e.key).await? {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    async fn drop_chunks(&self, id: &str, count: u32) {
        for k in 0..count {
            if let Err(e) = self.kv.delete(&self.chunk_key(id, k)).await {
                tracing::debug!(id, error = %e, "journal: leaving a chunk for garbage collection");
                return;
            }
        }
    }
}

/// Lays a pending write set over a listing of `prefix`.
fn overlay(list: &mut KvList, prefix: &str, writes: &[TxnOp]) {
    let mut entries: BTreeMap<String, KvEntry> = std::mem::take(&mut list.entries).into_iter().map(|e| (e.key.clone(), e)).collect();
    for op in writes.iter().filter(|op| op.key().starts_with(prefix)) {
        match op {
            TxnOp::Put { key, value, lease } => {
                let create_revision = entries.get(key).map_or(0, |e| e.create_revision);
                entries.insert(key.clone(), KvEntry { key: key.clone(), value: value.clone(), version: 0, create_revision, lease: *lease });
            }
            TxnOp::Delete { key } => {
                entries.remove(key);
            }
        }
    }
    list.entries = entries.into_values().collect();
}

fn decode_head(e: &KvEntry) -> Result<Head> {
    serde_json::from_slice(&e.value).map_err(|err| Error::Backend { backend: "journal", source: format!("{}: {err}", e.key).into() })
}

fn encode_head(head: &Head) -> Result<Vec<u8>> {
    serde_json::to_vec(head).map_err(|e| Error::Backend { backend: "journal", source: Box::new(e) })
}

const CHUNK_MAGIC: &[u8; 4] = b"KJC1";

/// Chunks of at most about `max` bytes each. Framing: the magic, then per write a kind
/// byte (0 put, 1 delete), the key's length (u32 BE) and bytes, and for a put the lease
/// (u64 BE, 0: none) and the value's length and bytes. Binary, because values are
/// arbitrary bytes and JSON would triple them.
fn encode_chunks(writes: &[TxnOp], max: usize) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut chunk = CHUNK_MAGIC.to_vec();
    for op in writes {
        let size = 1 + 4 + op.key().len() + if let TxnOp::Put { value, .. } = op { 12 + value.len() } else { 0 };
        if chunk.len() > CHUNK_MAGIC.len() && chunk.len() + size > max {
            chunks.push(std::mem::replace(&mut chunk, CHUNK_MAGIC.to_vec()));
        }
        match op {
            TxnOp::Put { key, value, lease } => {
                chunk.push(0);
                chunk.extend_from_slice(&(key.len() as u32).to_be_bytes());
                chunk.extend_from_slice(key.as_bytes());
                chunk.extend_from_slice(&lease.unwrap_or(0).to_be_bytes());
                chunk.extend_from_slice(&(value.len() as u32).to_be_bytes());
                chunk.extend_from_slice(value);
            }
            TxnOp::Delete { key } => {
                chunk.push(1);
                chunk.extend_from_slice(&(key.len() as u32).to_be_bytes());
                chunk.extend_from_slice(key.as_bytes());
            }
        }
    }
    chunks.push(chunk);
    chunks
}

fn decode_chunk(key: &str, bytes: &[u8]) -> Result<Vec<TxnOp>> {
    let corrupt = |why: &str| Error::Backend { backend: "journal", source: format!("chunk {key}: {why}").into() };
    let mut rest = bytes.strip_prefix(CHUNK_MAGIC.as_slice()).ok_or_else(|| corrupt("unknown format"))?;
    let mut take = |n: usize| -> Result<&[u8]> {
        if rest.len() < n {
            return Err(corrupt("cut short"));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let mut writes = Vec::new();
    loop {
        let kind = match take(1) {
            Ok(k) => k[0],
            Err(_) => break,
        };
        let key_len = u32::from_be_bytes(take(4)?.try_into().map_err(|_| corrupt("cut short"))?) as usize;
        let key = String::from_utf8(take(key_len)?.to_vec()).map_err(|_| corrupt("key is not UTF-8"))?;
        match kind {
            0 => {
                let lease: LeaseId = u64::from_be_bytes(take(8)?.try_into().map_err(|_| corrupt("cut short"))?);
                let len = u32::from_be_bytes(take(4)?.try_into().map_err(|_| corrupt("cut short"))?) as usize;
                let value = take(len)?.to_vec();
                writes.push(TxnOp::Put { key, value, lease: (lease != 0).then_some(lease) });
            }
            1 => writes.push(TxnOp::Delete { key }),
            other => return Err(corrupt(&format!("unknown write kind {other}"))),
        }
    }
    Ok(writes)
}

fn unique_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{nanos:x}-{:x}-{:x}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_and_split_by_size() {
        let writes: Vec<TxnOp> = (0..100)
            .map(|i| {
                if i % 3 == 0 {
                    TxnOp::Delete { key: format!("k/{i}") }
                } else {
                    TxnOp::Put { key: format!("k/{i}"), value: vec![i as u8; 100], lease: (i % 2 == 0).then_some(7) }
                }
            })
            .collect();
        let chunks = encode_chunks(&writes, 1000);
        assert!(chunks.len() > 5, "split into several chunks: {}", chunks.len());
        assert!(chunks.iter().all(|c| c.len() <= 1000));
        let back: Vec<TxnOp> = chunks.iter().flat_map(|c| decode_chunk("c", c).unwrap()).collect();
        assert_eq!(back, writes);
    }

    #[test]
    fn corrupt_chunks_are_typed_errors() {
        for bad in [&b"nope"[..], b"KJC1\x00\x00\x00\x00\x05ab", b"KJC1\x07\x00\x00\x00\x00"] {
            assert!(matches!(decode_chunk("c", bad), Err(Error::Backend { .. })), "{bad:?}");
        }
    }
}
