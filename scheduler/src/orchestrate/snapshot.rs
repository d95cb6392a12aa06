//! Backup and restore of a cluster store: every key under its root, read at one
//! revision, as a document an operator keeps in a file; and written back into an empty
//! root.
//!
//! Left out: `nodes/` (each on its agent's lease: agents join again by themselves) and
//! `locks/` (held by live processes). So a restore brings back what should run and
//! where (groups, versions, deployments, allocations with their nodes, volumes' homes,
//! runs), and node agents started with the same node ids adopt the containers they
//! find for those allocations instead of starting others.
//!
//! The order that works: stop the node agents (SIGTERM leaves their tasks running),
//! restore into the empty root, start the agents.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::orchestrate::cluster_store::{kv_err, wall_clock_ms, ClusterStore};
use keelson_discovery::{Compare, Expect, Txn};

/// The format this version writes and reads.
pub const SNAPSHOT_FORMAT: &str = "keelson-cluster-snapshot/1";

/// Key prefixes (under the root) a snapshot leaves out: lease-bound keys.
const LEFT_OUT: [&str; 2] = ["nodes/", "locks/"];

/// A cluster store's keys at one revision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StoreSnapshot {
    /// [`SNAPSHOT_FORMAT`].
    pub format: String,
    /// The root the keys were read under (a restore may go to another).
    pub root: String,
    /// The store revision they were read at.
    pub revision: u64,
    /// When, in milliseconds since the Unix epoch.
    pub taken_ms: u64,
    /// The keys, relative to the root, in key order.
    pub entries: Vec<SnapshotEntry>,
}

/// One key and its value: JSON (every keelson record) kept readable, anything else as
/// bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// The key below the root.
    pub key: String,
    /// The value, when it is JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
    /// The value, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<Vec<u8>>,
}

impl SnapshotEntry {
    fn new(key: String, value: &[u8]) -> Self {
        match serde_json::from_slice(value) {
            Ok(json) => SnapshotEntry { key, json: Some(json), bytes: None },
            Err(_) => SnapshotEntry { key, json: None, bytes: Some(value.to_vec()) },
        }
    }

    fn value(&self) -> Result<Vec<u8>> {
        match (&self.json, &self.bytes) {
            (Some(json), None) => serde_json::to_vec(json).map_err(|e| Error::invalid("snapshot entry", &self.key, e.to_string())),
            (None, Some(bytes)) => Ok(bytes.clone()),
            _ => Err(Error::invalid("snapshot entry", &self.key, "needs exactly one of json and bytes")),
        }
    }
}

impl ClusterStore {
    /// Every key under the root but the lease-bound ones, read at one revision.
    pub async fn snapshot(&self) -> Result<StoreSnapshot> {
        let prefix = self.key(&[""]);
        let list = self.kv.list(&prefix).await.map_err(kv_err)?;
        let entries = list
            .entries
            .iter()
            .map(|e| (e.key[prefix.len()..].to_owned(), e))
            .filter(|(key, _)| !LEFT_OUT.iter().any(|p| key.starts_with(p)))
            .map(|(key, e)| SnapshotEntry::new(key, &e.value))
            .collect();
        Ok(StoreSnapshot {
            format: SNAPSHOT_FORMAT.to_owned(),
            root: self.root().to_owned(),
            revision: list.revision,
            taken_ms: wall_clock_ms(),
            entries,
        })
    }

    /// Writes `snapshot` under this store's root, which must hold nothing but
    /// lease-bound keys ([`Error::Conflict`] otherwise, naming a key found). Every write
    /// is create-if-absent, in as few transactions as the backend takes; a restore that
    /// fails half-way leaves what it wrote, and running it again after clearing the root
    /// completes it. Returns how many keys it wrote.
    pub async fn restore(&self, snapshot: &StoreSnapshot) -> Result<usize> {
        if snapshot.format != SNAPSHOT_FORMAT {
            return Err(Error::invalid("snapshot format", &snapshot.format, format!("this version reads {SNAPSHOT_FORMAT}")));
        }
        let prefix = self.key(&[""]);
        let present = self.kv.list(&prefix).await.map_err(kv_err)?;
        if let Some(e) = present.entries.iter().find(|e| !LEFT_OUT.iter().any(|p| e.key[prefix.len()..].starts_with(p))) {
            return Err(Error::Conflict {
                kind: "cluster state",
                name: self.root().to_owned(),
                reason: format!("it is not empty ({} exists); restore into an empty root", e.key),
            });
        }
        let caps = self.kv.capabilities();
        let mut txn = Txn::new();
        let mut written = 0;
        for entry in &snapshot.entries {
            if LEFT_OUT.iter().any(|p| entry.key.starts_with(p)) || entry.key.is_empty() || entry.key.contains("..") {
                return Err(Error::invalid("snapshot key", &entry.key, "is not a key a snapshot holds"));
            }
            let key = format!("{prefix}{}", entry.key);
            let value = entry.value()?;
            let size = 2 * key.len() + value.len();
            // A compare and a put per key.
            if !txn.is_empty() && (txn.len() + 2 > caps.max_txn_ops || txn.size_bytes() + size > caps.max_txn_bytes) {
                self.kv.txn(std::mem::take(&mut txn)).await.map_err(kv_err)?;
            }
            txn = txn.when(Compare::key(&key, Expect::Absent)).put(key, value, None);
            written += 1;
        }
        if !txn.is_empty() {
            self.kv.txn(txn).await.map_err(kv_err)?;
        }
        Ok(written)
    }
}
