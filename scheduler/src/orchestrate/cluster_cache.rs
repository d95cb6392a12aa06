//! `ClusterCache`: a process's own copy of the cluster state, fed by a watch, so that a
//! plan costs what it changes rather than what the cluster holds.
//!
//! [`ClusterStore::view`] reads every node and allocation: fine for a few thousand, but at
//! a million allocations each plan would read hundreds of megabytes. The cache lists the
//! keys plans read (`nodes/`, `allocs/`, `status/`, `volumes/`, `fences/` and the journal
//! head) once, in pages, all at one revision, then follows them with one watch from the
//! next revision; when the store has compacted that revision away (a long partition), it
//! lists again. It keeps, beside the records, the placement engine's [`ClusterState`]
//! up to date event by event (an allocation added, stopped or failed), rebuilt only when
//! the node set or a volume's home changes.
//!
//! Consistency: a plan is made only from a state that ends on a whole revision (the
//! events of one transaction arrive together, [`keelson_discovery::KvEvent`]), with no
//! journal write set half-applied (the cache waits for it to finish), at least as new as
//! the last commit made through it. Its plan remembers the journal head it saw, so the
//! commit is as optimistic as one made from a fresh [`ClusterView`]: if another commit came
//! first and touched the same nodes, it conflicts and the caller plans again once the
//! cache has caught up.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use keelson_discovery::{Expect, Journal, KeyValue, KvEvent, KvEventKind};

use crate::error::{Error, Result};
use crate::orchestrate::cluster_store::{kv_err, ClusterStore, ClusterView, PlanCommit, StatusRecord};
use crate::orchestrate::reconcile::{placement_allocation, AllocRecord, AllocStatus, DesiredGroup};
use crate::placement::model::{HostVolume, Node};
use crate::placement::state::ClusterState;

const BACKEND: &str = "cluster cache";
/// How long a journal write set may stay half-applied before the cache finishes it.
const PENDING_GRACE: Duration = Duration::from_secs(2);
/// How long a plan waits for the cache to catch up before giving up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// A watch-fed copy of a [`ClusterStore`]'s state (see the module docs). Dropping it
/// stops its watch.
#[derive(Debug)]
#[must_use = "the cache stops following the store when dropped"]
pub struct ClusterCache {
    shared: Arc<Shared>,
    journal: Journal,
    root: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ClusterCache {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug)]
struct Shared {
    data: Mutex<CacheData>,
    progress: tokio::sync::watch::Sender<Progress>,
    /// The newest commit made through this cache: plans wait until the cache has it.
    floor: AtomicU64,
    relists: AtomicU64,
}

/// How far the cache has got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Progress {
    /// Every event up to this revision is applied.
    revision: u64,
    /// The journal head holds a write set not yet fully applied.
    pending: bool,
}

#[derive(Debug, Default)]
struct CacheData {
    revision: u64,
    /// The journal head's version (`None`: no commit yet) and whether it is pending.
    head: Option<u64>,
    pending: bool,
    nodes: BTreeMap<String, Node>,
    /// Desired state by `<node>/<id>`.
    allocs: HashMap<String, Cached>,
    status: HashMap<String, StatusRecord>,
    volumes: BTreeMap<String, HostVolume>,
    fences: HashMap<String, u64>,
    /// `<node>/<id>` keys by job and group.
    by_group: HashMap<(String, String), BTreeSet<String>>,
    /// How many allocations each node holds (lost nodes are those not live).
    per_node: HashMap<String, usize>,
    /// The placement engine's view of live nodes and their allocations; `None` until
    /// the next plan rebuilds it.
    placement: Option<ClusterState>,
    /// Records that could not be read, by key: no plan is made while there are any.
    unreadable: BTreeMap<String, String>,
}

#[derive(Debug)]
struct Cached {
    record: AllocRecord,
    /// The stored bytes, kept only when they hold fields this version does not know (a
    /// plan writing the record back keeps them).
    unknown: Option<Vec<u8>>,
}

impl ClusterCache {
    /// Lists `store`'s state and starts following it. Returns once the listing is in.
    pub async fn start(store: &ClusterStore) -> Result<ClusterCache> {
        let root = store.root().to_owned();
        let kv = store.kv.clone();
        let (data, watch) = load(kv.as_ref(), &root).await?;
        let progress = Progress { revision: data.revision, pending: data.pending };
        let shared = Arc::new(Shared {
            data: Mutex::new(data),
            progress: tokio::sync::watch::channel(progress).0,
            floor: AtomicU64::new(0),
            relists: AtomicU64::new(0),
        });
        let task = tokio::spawn(follow(kv, root.clone(), shared.clone(), watch));
        Ok(ClusterCache { shared, journal: Journal::new(store.kv.clone(), &format!("{root}/journal")), root, task })
    }

    /// The revision up to which the cache has applied every change.
    pub fn revision(&self) -> u64 {
        self.shared.progress.borrow().revision
    }

    /// How many times the cache listed the store again because its watch could not
    /// resume (the revision it needed was compacted, or the stream ended).
    pub fn relists(&self) -> u64 {
        self.shared.relists.load(Ordering::Relaxed)
    }

    /// How many allocations the cache holds.
    pub fn allocation_count(&self) -> usize {
        self.lock().allocs.len()
    }

    /// The live nodes an operator is draining.
    pub(crate) fn draining_nodes(&self) -> Vec<String> {
        let data = self.lock();
        data.nodes.values().filter(|n| n.eligibility == crate::placement::model::Eligibility::Draining).map(|n| n.id.clone()).collect()
    }

    /// A [`ClusterView`] of the cache (everything copied: for tools and tests; plans use
    /// the cache directly).
    pub async fn view(&self) -> Result<ClusterView> {
        self.catch_up(0).await?;
        let data = self.lock();
        let mut view = ClusterView::from_parts(
            data.nodes.values().cloned().collect(),
            data.merged_sorted(data.allocs.keys().collect()),
            data.volumes.values().cloned().collect(),
            data.head_expect(),
        );
        view.set_fences(data.fences.iter().map(|(n, v)| (n.clone(), Some(*v))).collect());
        Ok(view)
    }

    /// Makes later plans wait until the cache has seen `revision` (a commit made through
    /// the store).
    pub(crate) fn note_commit(&self, revision: u64) {
        self.shared.floor.fetch_max(revision, Ordering::Relaxed);
    }

    /// Waits until the cache has every change up to `revision` and the newest commit made
    /// through it, with no write set half-applied (finishing one left too long).
    pub(crate) async fn catch_up(&self, revision: u64) -> Result<()> {
        let want = revision.max(self.shared.floor.load(Ordering::Relaxed));
        let mut rx = self.shared.progress.subscribe();
        let deadline = tokio::time::Instant::now() + CATCH_UP_TIMEOUT;
        let mut pending_since: Option<tokio::time::Instant> = None;
        loop {
            let p = *rx.borrow_and_update();
            if p.revision >= want && !p.pending {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if p.pending {
                let since = *pending_since.get_or_insert(now);
                if now - since >= PENDING_GRACE {
                    // Its writer may have died: finishing it is safe from anywhere.
                    self.journal.finish_pending().await.map_err(kv_err)?;
                    pending_since = Some(now);
                }
            }
            if now >= deadline {
                return Err(Error::Unavailable {
                    backend: BACKEND,
                    reason: format!(
                        "the cache of {} did not reach revision {want} in {CATCH_UP_TIMEOUT:?} (it is at {})",
                        self.root, p.revision
                    ),
                });
            }
            let _ = tokio::time::timeout(PENDING_GRACE.min(deadline - now), rx.changed()).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheData> {
        self.shared.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a plan for `groups` reads: their allocations and those on lost nodes (merged
    /// with reported status, in key order), the lost nodes, and an empty plan against the
    /// journal head they were read at.
    pub(crate) fn plan_input(&self, groups: &[(&str, &str)]) -> Result<(Vec<AllocRecord>, HashSet<String>, PlanCommit)> {
        let data = self.lock();
        data.readable()?;
        let lost = data.lost_nodes();
        let mut keys: BTreeSet<&String> = BTreeSet::new();
        for (job, group) in groups {
            if let Some(set) = data.by_group.get(&((*job).to_owned(), (*group).to_owned())) {
                keys.extend(set);
            }
        }
        if !lost.is_empty() {
            keys.extend(data.allocs.iter().filter(|(_, a)| lost.contains(&a.record.node)).map(|(k, _)| k));
        }
        let allocs = data.merged_sorted(keys.into_iter().collect());
        Ok((allocs, lost, ClusterView::from_parts(Vec::new(), Vec::new(), Vec::new(), data.head_expect()).plan()))
    }

    /// Runs `place` on the cache's placement state, then seals `plan` for commit (the
    /// fences of the nodes it touches and the stored bytes of records it rewrites).
    /// [`Error::Stale`] if the cache has moved past the head `plan` was made against.
    /// Allocations of `desired` recorded before allocations carried their resources are
    /// counted with their group's.
    pub(crate) fn place_and_seal<T>(
        &self,
        plan: &mut PlanCommit,
        desired: &[DesiredGroup],
        place: impl FnOnce(&mut ClusterState, &mut PlanCommit) -> Result<T>,
    ) -> Result<T> {
        let mut data = self.lock();
        if plan.head() != data.head_expect() || data.pending {
            return Err(Error::Stale { kind: "plan", name: "the cluster changed while planning".into() });
        }
        data.readable()?;
        if data.placement.is_none() {
            data.placement = Some(data.build_placement()?);
        }
        let CacheData { placement, allocs, fences, by_group, .. } = &mut *data;
        let state = placement.as_mut().ok_or_else(|| Error::Backend { backend: BACKEND, source: "placement state missing".into() })?;
        for d in desired {
            for key in by_group.get(&(d.job.clone(), d.group.clone())).into_iter().flatten() {
                let Some(a) = allocs.get(key).map(|c| &c.record).filter(|a| a.resources.is_zero()) else { continue };
                if state.remove_allocation(&a.id).is_ok() {
                    let _ =
                        state.add_allocation(&crate::placement::model::Allocation { resources: d.resources, ..placement_allocation(a) });
                }
            }
        }
        let out = place(state, plan)?;
        let touched: Vec<String> = plan.touched().cloned().collect();
        plan.set_fences(
            touched
                .into_iter()
                .map(|n| {
                    let f = fences.get(&n).copied();
                    (n, f)
                })
                .collect(),
        );
        let stored: HashMap<String, Vec<u8>> = plan
            .put_keys()
            .filter_map(|k| {
                let b = allocs.get(&k)?.unknown.clone()?;
                Some((k, b))
            })
            .collect();
        plan.set_stored(stored);
        Ok(out)
    }

    /// The root of the store the cache follows.
    pub fn root(&self) -> &str {
        &self.root
    }
}

impl CacheData {
    fn head_expect(&self) -> Expect {
        self.head.map_or(Expect::Absent, Expect::Version)
    }

    fn readable(&self) -> Result<()> {
        match self.unreadable.iter().next() {
            Some((key, why)) => Err(Error::Backend { backend: BACKEND, source: format!("{key}: {why}").into() }),
            None => Ok(()),
        }
    }

    fn lost_nodes(&self) -> HashSet<String> {
        self.per_node.keys().filter(|n| !self.nodes.contains_key(*n)).cloned().collect()
    }

    /// An allocation as readers see it: a plan's `Stopping` wins, otherwise the status
    /// its agent reported (`Pending` before any report).
    fn merged(&self, key: &str) -> Option<AllocRecord> {
        let mut a = self.allocs.get(key)?.record.clone();
        if let Some(r) = self.status.get(key) {
            r.apply_to(&mut a);
        }
        Some(a)
    }

    fn merged_sorted(&self, mut keys: Vec<&String>) -> Vec<AllocRecord> {
        keys.sort();
        keys.into_iter().filter_map(|k| self.merged(k)).collect()
    }

    /// Whether the placement engine counts the allocation at `key`: it is on a live node
    /// and has not failed.
    fn counted(&self, key: &str) -> Option<AllocRecord> {
        self.merged(key).filter(|a| a.status != AllocStatus::Failed && self.nodes.contains_key(&a.node))
    }

    fn build_placement(&self) -> Result<ClusterState> {
        let snapshot = crate::placement::model::ClusterSnapshot {
            nodes: self.nodes.values().cloned().collect(),
            volumes: self.volumes.values().cloned().collect(),
            allocations: self.allocs.keys().filter_map(|k| self.counted(k)).map(|a| placement_allocation(&a)).collect(),
        };
        ClusterState::from_snapshot(&snapshot)
    }

    /// Brings the placement state in line with the allocation at `key` after a change.
    fn sync_placement(&mut self, key: &str, id: &str) {
        let counted = self.counted(key);
        let Some(state) = self.placement.as_mut() else { return };
        let _ = state.remove_allocation(id);
        if let Some(a) = counted {
            if let Err(e) = state.add_allocation(&placement_allocation(&a)) {
                // A rebuild reports it, with the state as a whole.
                tracing::debug!(alloc = id, error = %e, "placement state rebuilt");
                self.placement = None;
            }
        }
    }

    fn apply(&mut self, root: &str, ev: &KvEvent) {
        let Some(rest) = ev.key.strip_prefix(root).and_then(|r| r.strip_prefix('/')) else { return };
        let Some((kind, name)) = rest.split_once('/') else { return };
        let put = ev.kind == KvEventKind::Put;
        self.unreadable.remove(&ev.key);
        match kind {
            "nodes" => {
                if !put {
                    self.nodes.remove(name);
                } else if let Some(node) = self.read::<Node>(ev) {
                    self.nodes.insert(name.to_owned(), node);
                }
                self.placement = None;
            }
            "allocs" => self.apply_alloc(name, ev),
            "status" => {
                if !put {
                    self.status.remove(name);
                } else if let Some(status) = self.read::<StatusRecord>(ev) {
                    self.status.insert(name.to_owned(), status);
                }
                if let Some(id) = name.split_once('/').map(|(_, id)| id.to_owned()) {
                    self.sync_placement(name, &id);
                }
            }
            "volumes" => {
                if !put {
                    self.volumes.remove(name);
                    self.placement = None;
                } else if let Some(v) = self.read::<HostVolume>(ev) {
                    // A new home is added in place; a moved one means a rebuild.
                    let moved = self.volumes.insert(name.to_owned(), v.clone()).is_some();
                    let added = !moved && self.placement.as_mut().is_some_and(|state| state.add_volume(&v).is_ok());
                    if !added {
                        self.placement = None;
                    }
                }
            }
            "fences" => {
                if put {
                    self.fences.insert(name.to_owned(), ev.revision);
                } else {
                    self.fences.remove(name);
                }
            }
            "journal" if name == "head" => {
                self.head = put.then_some(ev.revision);
                self.pending = put && Journal::is_pending(&ev.value);
            }
            _ => {}
        }
    }

    fn apply_alloc(&mut self, name: &str, ev: &KvEvent) {
        let Some((node, id)) = name.split_once('/') else { return };
        if let Some(old) = self.allocs.remove(name) {
            self.forget_indexes(name, &old.record);
        }
        if ev.kind == KvEventKind::Put {
            match decode_noting_unknown(&ev.key, &ev.value) {
                Ok((record, unknown)) => {
                    self.by_group.entry((record.job.clone(), record.group.clone())).or_default().insert(name.to_owned());
                    *self.per_node.entry(node.to_owned()).or_default() += 1;
                    self.allocs.insert(name.to_owned(), Cached { record, unknown: unknown.then(|| ev.value.clone()) });
                }
                Err(e) => self.unreadable(&ev.key, e),
            }
        }
        self.sync_placement(name, id);
    }

    fn forget_indexes(&mut self, key: &str, record: &AllocRecord) {
        let group = (record.job.clone(), record.group.clone());
        if let Some(set) = self.by_group.get_mut(&group) {
            set.remove(key);
            if set.is_empty() {
                self.by_group.remove(&group);
            }
        }
        if let Some(n) = self.per_node.get_mut(&record.node) {
            *n -= 1;
            if *n == 0 {
                self.per_node.remove(&record.node);
            }
        }
    }

    /// The record an event put, or `None` (recorded as unreadable) if it does not decode.
    fn read<T: serde::de::DeserializeOwned>(&mut self, ev: &KvEvent) -> Option<T> {
        match crate::records::decode(&ev.key, &ev.value) {
            Ok(value) => Some(value),
            Err(e) => {
                self.unreadable(&ev.key, e);
                None
            }
        }
    }

    fn unreadable(&mut self, key: &str, e: Error) {
        tracing::warn!(key, error = %e, "cluster cache: a stored record cannot be read; plans wait until it is fixed");
        self.unreadable.insert(key.to_owned(), e.to_string());
    }
}

/// Decodes an allocation record, and says whether it holds fields this version does not
/// know (other than the schema stamp).
fn decode_noting_unknown(key: &str, bytes: &[u8]) -> Result<(AllocRecord, bool)> {
    let mut unknown = false;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let record = serde_ignored::deserialize(&mut de, |path| unknown |= path.to_string() != "schema")
        .map_err(|e| Error::Backend { backend: "cluster store", source: format!("{key}: {e}").into() })?;
    Ok((record, unknown))
}

/// The prefixes the cache follows, under the store's root.
const FOLLOWED: [&str; 5] = ["nodes/", "allocs/", "status/", "volumes/", "fences/"];

/// Lists everything the cache follows at one revision, and opens the watch from the
/// next. Retries when the store moves between pages of a backend without history.
async fn load(kv: &dyn KeyValue, root: &str) -> Result<(CacheData, keelson_discovery::KvWatch)> {
    let mut attempts = 0;
    let mut pauses = keelson_base::retry_pauses(Duration::from_millis(5), Duration::from_millis(100));
    loop {
        match load_once(kv, root).await {
            Err(keelson_discovery::Error::Compacted { .. }) if attempts < 50 => {
                attempts += 1;
                tokio::time::sleep(pauses.next().unwrap_or_default()).await;
            }
            other => return other.map_err(kv_err),
        }
    }
}

async fn load_once(kv: &dyn KeyValue, root: &str) -> keelson_discovery::Result<(CacheData, keelson_discovery::KvWatch)> {
    let head_key = format!("{root}/journal/head");
    let first = keelson_discovery::list_paged_at(kv, &head_key, None).await?;
    let revision = first.revision;
    let mut data = CacheData { revision, ..CacheData::default() };
    let mut events: Vec<KvEvent> = first.entries.into_iter().filter(|e| e.key == head_key).map(as_put).collect();
    for p in FOLLOWED {
        let list = keelson_discovery::list_paged_at(kv, &format!("{root}/{p}"), Some(revision)).await?;
        events.extend(list.entries.into_iter().map(as_put));
    }
    for ev in &events {
        data.apply(root, ev);
    }
    let watch = kv.watch(&format!("{root}/"), Some(revision + 1)).await?;
    Ok((data, watch))
}

/// A listed entry as the event that wrote it (fences and the head keep their versions).
fn as_put(e: keelson_discovery::KvEntry) -> KvEvent {
    KvEvent { revision: e.version, kind: KvEventKind::Put, key: e.key, value: e.value }
}

/// Applies the watch's events, a whole revision at a time, and lists again when the
/// watch cannot go on.
async fn follow(kv: Arc<dyn KeyValue>, root: String, shared: Arc<Shared>, mut watch: keelson_discovery::KvWatch) {
    loop {
        match watch.next().await {
            Some(Ok(first)) => {
                let mut data = shared.data.lock().unwrap_or_else(|p| p.into_inner());
                data.apply(&root, &first);
                let mut last = first.revision;
                let mut broken = false;
                // The rest of this transaction is ready with its first event; what else is
                // ready comes along. Publishing only when nothing more is ready means a
                // plan never sees part of a transaction.
                while let Some(next) = watch.next().now_or_never() {
                    match next {
                        Some(Ok(ev)) => {
                            last = ev.revision;
                            data.apply(&root, &ev);
                        }
                        _ => {
                            broken = true;
                            break;
                        }
                    }
                }
                data.revision = data.revision.max(last);
                let progress = Progress { revision: data.revision, pending: data.pending };
                drop(data);
                shared.progress.send_replace(progress);
                if !broken {
                    continue;
                }
            }
            Some(Err(e)) => tracing::warn!(root, error = %e, "cluster cache: watch failed; listing again"),
            None => tracing::warn!(root, "cluster cache: watch ended; listing again"),
        }
        // List again, until it works: plans wait meanwhile (and time out).
        let mut pauses = keelson_base::retry_pauses(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match load(kv.as_ref(), &root).await {
                Ok((data, w)) => {
                    let progress = Progress { revision: data.revision, pending: data.pending };
                    *shared.data.lock().unwrap_or_else(|p| p.into_inner()) = data;
                    shared.relists.fetch_add(1, Ordering::Relaxed);
                    shared.progress.send_replace(progress);
                    watch = w;
                    break;
                }
                Err(e) => {
                    tracing::warn!(root, error = %e, "cluster cache: listing failed; retrying");
                    tokio::time::sleep(pauses.next().unwrap_or_default()).await;
                }
            }
        }
    }
}
