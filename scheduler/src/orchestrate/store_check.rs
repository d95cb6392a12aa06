//! The independent validator of stored cluster state: it reads the raw keys (not the
//! store's merged view) and checks the invariants every commit must keep, so tests and
//! benchmarks can assert that no crash or race left the state broken.

use std::collections::{BTreeMap, HashMap, HashSet};

use keelson_discovery::KvEntry;

use crate::error::Result;
use crate::orchestrate::cluster_store::{kv_err, ClusterStore};
use crate::orchestrate::reconcile::{AllocRecord, AllocStatus};

/// What [`ClusterStore::check_stored`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredCheck {
    /// Allocation records read.
    pub allocations: usize,
    /// Every broken invariant, in words (empty when the state is sound).
    pub violations: Vec<String>,
    /// Whether a published plan is still being applied (readers see it whole; the next
    /// commit or [`ClusterStore::collect_garbage`] finishes it).
    pub pending_plan: bool,
}

impl ClusterStore {
    /// Checks the stored state: every allocation record sits under its own node and id
    /// and decodes; no id is used twice; no host port is given twice on one node; what
    /// a node's allocations hold fits its capacity; no single-writer volume is written by
    /// two live allocations; every status key belongs to an allocation.
    pub async fn check_stored(&self) -> Result<StoredCheck> {
        let mut check = StoredCheck::default();
        let head = self.kv.get(&self.key(&["journal", "head"])).await.map_err(kv_err)?;
        check.pending_plan = head.is_some_and(|h| {
            serde_json::from_slice::<serde_json::Value>(&h.value).is_ok_and(|v| v.get("pending").is_some_and(|p| !p.is_null()))
        });
        let alloc_prefix = self.key(&["allocs", ""]);
        // Paged, every listing at the revision of the first: one consistent state of any size.
        let allocs = keelson_discovery::list_paged(self.kv.as_ref(), &alloc_prefix).await.map_err(kv_err)?;
        let revision = Some(allocs.revision);
        let allocs = allocs.entries;
        check.allocations = allocs.len();
        let mut ids: HashSet<String> = HashSet::new();
        let mut ports: HashMap<(String, u16), String> = HashMap::new();
        let mut writers: BTreeMap<String, String> = BTreeMap::new();
        let mut keys: HashSet<String> = HashSet::new();
        let mut decoded = Vec::with_capacity(allocs.len());
        for e in &allocs {
            let rest = &e.key[alloc_prefix.len()..];
            keys.insert(rest.to_owned());
            let Some(a) = decode_alloc(e, &mut check.violations) else { continue };
            if rest != format!("{}/{}", a.node, a.id) {
                check.violations.push(format!("{} holds allocation {} of node {}", e.key, a.id, a.node));
            }
            if !ids.insert(a.id.clone()) {
                check.violations.push(format!("allocation id {} is used twice", a.id));
            }
            for p in &a.ports {
                if let Some(other) = ports.insert((a.node.clone(), *p), a.id.clone()) {
                    check.violations.push(format!("port {p} on node {} is given to {other} and {}", a.node, a.id));
                }
            }
            if a.status != AllocStatus::Stopping {
                for m in a.volumes.iter().filter(|m| !m.read_only) {
                    if let Some(other) = writers.insert(m.name.clone(), a.id.clone()) {
                        // Shared-write volumes may have several writers; the home says.
                        let home = self.volume_home(&m.name).await?;
                        if home.is_some_and(|h| h.access == crate::placement::model::VolumeAccess::SingleWriter) {
                            check.violations.push(format!("single-writer volume {} is written by {other} and {}", m.name, a.id));
                        }
                    }
                }
            }
            decoded.push(a);
        }
        let status_prefix = self.key(&["status", ""]);
        let statuses = keelson_discovery::list_paged_at(self.kv.as_ref(), &status_prefix, revision).await.map_err(kv_err)?.entries;
        // Failed allocations are replaced beside themselves (placement leaves them out).
        let failed: HashSet<&str> = statuses
            .iter()
            .filter(|e| serde_json::from_slice::<serde_json::Value>(&e.value).is_ok_and(|v| v["status"] == "Failed"))
            .map(|e| &e.key[status_prefix.len()..])
            .collect();
        // Capacity: what live allocations hold on a node fits the node.
        let node_prefix = self.key(&["nodes", ""]);
        let mut held: HashMap<&str, crate::placement::model::Resources> = HashMap::new();
        for a in decoded.iter().filter(|a| !failed.contains(format!("{}/{}", a.node, a.id).as_str())) {
            let sum = held.entry(a.node.as_str()).or_default();
            *sum = sum.saturating_add(a.resources);
        }
        for e in keelson_discovery::list_paged_at(self.kv.as_ref(), &node_prefix, revision).await.map_err(kv_err)?.entries {
            let Ok(node) = serde_json::from_slice::<crate::placement::model::Node>(&e.value) else {
                check.violations.push(format!("{} does not decode", e.key));
                continue;
            };
            if let Some(sum) = held.get(node.id.as_str()) {
                let cap = node.capacity;
                if sum.cpu_millis > cap.cpu_millis || sum.memory_mb > cap.memory_mb || sum.disk_mb > cap.disk_mb {
                    check.violations.push(format!("node {} holds {sum:?}, over its capacity {cap:?}", node.id));
                }
            }
        }
        for e in &statuses {
            if !keys.contains(&e.key[status_prefix.len()..]) {
                check.violations.push(format!("{} reports on an allocation that does not exist", e.key));
            }
        }
        Ok(check)
    }
}

fn decode_alloc(e: &KvEntry, violations: &mut Vec<String>) -> Option<AllocRecord> {
    match serde_json::from_slice(&e.value) {
        Ok(a) => Some(a),
        Err(err) => {
            violations.push(format!("{} does not decode: {err}", e.key));
            None
        }
    }
}
