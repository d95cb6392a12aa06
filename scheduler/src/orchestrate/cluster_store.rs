//! Cluster state in any [`KeyValue`] (etcd in production, `MemoryKv` embedded): nodes
//! with heartbeat leases, allocations by node, and plan commits that readers see whole.
//!
//! Layout under the store's root:
//! - `nodes/<node>`: the [`Node`], attached to the node's lease: when the node stops
//!   renewing it, the key goes and the node is lost.
//! - `allocs/<node>/<alloc>`: an allocation's desired state ([`AllocRecord`] with status
//!   `Pending` or `Stopping`), written only by plans.
//! - `status/<node>/<alloc>`: what the node's agent reports ([`AllocStatus`] and since
//!   when), written only by that agent: a report never overwrites a plan, and a plan never
//!   overwrites a report. Readers merge the two ([`ClusterStore::view`]).
//! - `fences/<node>`: rewritten by every plan that changes the node.
//! - `volumes/<name>`: a [`HostVolume`]: which node's disk holds the volume. Not on a
//!   lease: the data outlives its node's agent (moving it is [`ClusterStore::rehome_volume`]).
//! - `journal/`: the commit point ([`keelson_discovery::Journal`]).
//! - `locks/controller`: the controller's lock.
//!
//! A plan is made from a [`ClusterView`], which remembers the journal head and the fence
//! of every node. [`ClusterStore::commit`] hands the plan's writes to the journal, which
//! makes them visible all at once however many they are (one transaction when they fit,
//! published chunks when not), and only if no commit happened since the view was read.
//! If one did, the commit checks the fences of the nodes the plan touches: if none of
//! them changed, it commits on the new head; otherwise it fails with
//! [`Error::Stale`], writes nothing, and the caller re-plans from a fresh view. A
//! store made [`ClusterStore::fenced`] by a held lock adds the lock to every commit, so
//! a holder that lost its lock (paused past its TTL) writes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::{Compare, Expect, Journal, KeyValue, LeaseKeeper, LockGuard, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::orchestrate::deployment::Traffic;
use crate::orchestrate::reconcile::{AllocRecord, AllocStatus};
use crate::placement::model::{HostVolume, Node};
use crate::placement::scheduler::{PlacementEngine, Scheduler};

const BACKEND: &str = "cluster store";

pub(crate) fn kv_err(e: keelson_discovery::Error) -> Error {
    match e {
        keelson_discovery::Error::VersionMismatch { key, .. } => Error::Stale { kind: "key", name: key },
        keelson_discovery::Error::Fenced { key, .. } => Error::LockLost { lock: key },
        e @ (keelson_discovery::Error::Tls { .. }
        | keelson_discovery::Error::Unauthenticated { .. }
        | keelson_discovery::Error::PermissionDenied { .. }) => Error::Denied { operation: "cluster store access", reason: e.to_string() },
        e if e.is_retryable() => Error::Unavailable { backend: BACKEND, reason: e.to_string() },
        e => Error::Backend { backend: BACKEND, source: Box::new(e) },
    }
}

pub(crate) use crate::records::{decode, encode, encode_over};

/// Cluster state in a [`KeyValue`] store under one root.
#[derive(Clone, Debug)]
pub struct ClusterStore {
    pub(crate) kv: Arc<dyn KeyValue>,
    root: String,
    pub(crate) journal: Journal,
    /// Added to every write when the store acts under a lock.
    fence: Option<Compare>,
    /// Decides where new allocations go.
    scheduler: Arc<dyn Scheduler>,
}

/// What a node's agent reports about an allocation (`status/<node>/<alloc>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StatusRecord {
    pub(crate) status: AllocStatus,
    #[serde(default)]
    pub(crate) since_ms: u64,
    #[serde(default)]
    pub(crate) restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) address: Option<std::net::IpAddr>,
}

impl StatusRecord {
    /// What readers see of `a` with this report: a plan's `Stopping` wins over the
    /// reported status; the address is a fact either way.
    pub(crate) fn apply_to(&self, a: &mut AllocRecord) {
        if a.status != AllocStatus::Stopping {
            a.status = self.status;
            a.since_ms = self.since_ms;
            a.restarts = self.restarts;
        }
        if self.address.is_some() {
            a.address = self.address;
        }
    }
}

/// Where a group's slot last ran, and at which address (`slots/<job>/<group>/<slot>`,
/// written by its agent when it stops the slot's allocation): the next allocation of
/// the slot is placed on that node if it fits there, and asks for that address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotHome {
    /// The node.
    pub node: String,
    /// Its address on the node's keelson network, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::IpAddr>,
    /// When its allocation was forgotten (milliseconds since the Unix epoch): the slot
    /// left most recently is the one a replacement takes.
    #[serde(default)]
    pub left_ms: u64,
}

/// A node's membership: its lease is renewed until this is dropped or
/// [`NodeMembership::leave`] is called.
#[derive(Debug)]
#[must_use = "the node's lease stops being renewed when this is dropped, and the node is lost"]
pub struct NodeMembership {
    keeper: LeaseKeeper,
    kv: Arc<dyn KeyValue>,
}

impl NodeMembership {
    /// Leaves at once: revokes the lease, so the node is gone now rather than after its TTL.
    pub async fn leave(self) -> Result<()> {
        self.kv.revoke_lease(self.keeper.lease()).await.map_err(kv_err)
    }
}

/// What a plan read: nodes, allocations, volumes, the fence version of every node, and
/// the journal head they were read at.
#[derive(Clone, Debug)]
pub struct ClusterView {
    /// Live nodes (their lease is current).
    pub nodes: Vec<Node>,
    /// Every allocation, on live and lost nodes.
    pub allocations: Vec<AllocRecord>,
    /// Every volume and the node that holds it.
    pub volumes: Vec<HostVolume>,
    fences: BTreeMap<String, Option<u64>>,
    head: Expect,
    /// Each allocation's stored desired record, by `<node>/<id>`: a plan writing one back
    /// keeps the fields this version does not know.
    stored: Arc<HashMap<String, Vec<u8>>>,
}

impl Default for ClusterView {
    fn default() -> Self {
        ClusterView {
            nodes: Vec::new(),
            allocations: Vec::new(),
            volumes: Vec::new(),
            fences: BTreeMap::new(),
            head: Expect::Absent,
            stored: Arc::default(),
        }
    }
}

impl ClusterView {
    pub(crate) fn from_parts(nodes: Vec<Node>, allocations: Vec<AllocRecord>, volumes: Vec<HostVolume>, head: Expect) -> Self {
        ClusterView { nodes, allocations, volumes, head, ..ClusterView::default() }
    }

    pub(crate) fn set_fences(&mut self, fences: BTreeMap<String, Option<u64>>) {
        self.fences = fences;
    }

    /// Nodes that hold allocations but are no longer live.
    pub fn lost_nodes(&self) -> HashSet<String> {
        let live: HashSet<&str> = self.nodes.iter().map(|n| n.id.as_str()).collect();
        self.allocations.iter().filter(|a| !live.contains(a.node.as_str())).map(|a| a.node.clone()).collect()
    }

    /// An empty plan against this view.
    pub fn plan(&self) -> PlanCommit {
        PlanCommit {
            fences: self.fences.clone(),
            head: self.head,
            stored: self.stored.clone(),
            touched: BTreeSet::new(),
            puts: Vec::new(),
            deletes: Vec::new(),
            new_volumes: Vec::new(),
            runs: Vec::new(),
            traffic: Vec::new(),
        }
    }
}

/// Changes made against one [`ClusterView`].
#[derive(Clone, Debug)]
pub struct PlanCommit {
    fences: BTreeMap<String, Option<u64>>,
    head: Expect,
    stored: Arc<HashMap<String, Vec<u8>>>,
    touched: BTreeSet<String>,
    puts: Vec<AllocRecord>,
    deletes: Vec<(String, String)>,
    new_volumes: Vec<HostVolume>,
    pub(crate) runs: Vec<crate::orchestrate::runs::RunRecord>,
    traffic: Vec<(String, String, Traffic)>,
}

impl PlanCommit {
    /// Adds or updates an allocation.
    pub fn put(&mut self, alloc: AllocRecord) {
        self.touched.insert(alloc.node.clone());
        self.puts.push(alloc);
    }

    pub(crate) fn touch(&mut self, node: &str) {
        self.touched.insert(node.to_owned());
    }

    /// Removes an allocation (a lost one, or one that has stopped).
    pub fn delete(&mut self, node: &str, alloc: &str) {
        self.touched.insert(node.to_owned());
        self.deletes.push((node.to_owned(), alloc.to_owned()));
    }

    /// Records where a volume the plan creates lives (the commit fails with a conflict
    /// if another plan homed it first).
    pub fn new_volume(&mut self, volume: HostVolume) {
        self.touched.insert(volume.node.clone());
        self.new_volumes.push(volume);
    }

    /// Sets which allocations of a group agents register, in the same commit as the
    /// allocations it concerns (a blue/green switch lands with its stops, never apart).
    pub fn set_traffic(&mut self, job: &str, group: &str, traffic: Traffic) {
        self.traffic.push((job.to_owned(), group.to_owned(), traffic));
    }

    /// Whether the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty() && self.new_volumes.is_empty() && self.runs.is_empty() && self.traffic.is_empty()
    }

    /// How many allocations it writes or removes.
    pub fn len(&self) -> usize {
        self.puts.len() + self.deletes.len()
    }

    pub(crate) fn head(&self) -> Expect {
        self.head
    }

    pub(crate) fn touched(&self) -> impl Iterator<Item = &String> {
        self.touched.iter()
    }

    /// The `<node>/<id>` of every allocation it writes.
    pub(crate) fn put_keys(&self) -> impl Iterator<Item = String> + '_ {
        self.puts.iter().map(|a| format!("{}/{}", a.node, a.id))
    }

    pub(crate) fn set_fences(&mut self, fences: BTreeMap<String, Option<u64>>) {
        self.fences = fences;
    }

    pub(crate) fn set_stored(&mut self, stored: HashMap<String, Vec<u8>>) {
        self.stored = Arc::new(stored);
    }
}

impl ClusterStore {
    /// A store under `root` (for example `keelson/cluster`).
    pub fn new(kv: Arc<dyn KeyValue>, root: impl Into<String>) -> Self {
        let root = root.into().trim_end_matches('/').to_owned();
        let journal = Journal::new(kv.clone(), &format!("{root}/journal"));
        ClusterStore { kv, root, journal, fence: None, scheduler: Arc::new(PlacementEngine::new()) }
    }

    /// This store, placing new allocations (deployments, reschedules, runs) with
    /// `scheduler` instead of the embedded [`PlacementEngine`].
    pub fn with_scheduler(mut self, scheduler: Arc<dyn Scheduler>) -> Self {
        self.scheduler = scheduler;
        self
    }

    /// The scheduler that places new allocations.
    pub fn scheduler(&self) -> &Arc<dyn Scheduler> {
        &self.scheduler
    }

    /// The root every key of this store lives under.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Where a lock of this store named `name` lives (`<root>/locks/<name>`).
    pub fn lock_key(&self, name: &str) -> String {
        self.key(&["locks", name])
    }

    /// This store, with every write it makes fenced by `lock`: once the lock is lost
    /// (its lease expired while the holder was paused, say), writes fail with
    /// [`Error::LockLost`] and store nothing.
    pub fn fenced(&self, lock: &LockGuard) -> ClusterStore {
        ClusterStore { fence: Some(lock.fence()), ..self.clone() }
    }

    /// Applies `txn` with the store's fence added.
    pub(crate) async fn write(&self, mut txn: Txn) -> Result<u64> {
        txn.compares.extend(self.fence.clone());
        self.kv.txn(txn).await.map_err(kv_err)
    }

    pub(crate) fn key(&self, parts: &[&str]) -> String {
        format!("{}/{}", self.root, parts.join("/"))
    }

    /// Registers `node` on a lease of `ttl`, renewed at a third of it until the returned
    /// membership is dropped. A node that stops renewing is lost after `ttl`.
    pub async fn join(&self, node: &Node, ttl: Duration) -> Result<NodeMembership> {
        self.join_all(std::slice::from_ref(node), ttl).await
    }

    /// Registers `nodes` on one shared lease of `ttl`, kept alive by one task: for a
    /// process that hosts many nodes (a simulator, a benchmark, a fleet's proxy agent),
    /// whose nodes live and die together. Written in as few transactions as the backend
    /// allows, so 10,000 nodes cost a few dozen round trips and one renewal per TTL/3.
    pub async fn join_all(&self, nodes: &[Node], ttl: Duration) -> Result<NodeMembership> {
        let nodes = self.with_settings(nodes).await?;
        let mut records = Vec::with_capacity(nodes.len());
        for node in &nodes {
            crate::error::validate_id("node id", &node.id)?;
            records.push((self.key(&["nodes", &node.id]), encode(node)?));
        }
        let lease = self.kv.grant_lease(ttl).await.map_err(kv_err)?;
        put_on_lease(self.kv.as_ref(), &records, lease).await?;
        // Nodes that outlived their lease (a partition) join again: their allocations were
        // re-placed meanwhile, and each agent will see that in its own prefix.
        let kv = self.kv.clone();
        let records = Arc::new(records);
        let keeper = LeaseKeeper::spawn(self.kv.clone(), lease, ttl, move || {
            let (kv, records) = (kv.clone(), records.clone());
            async move {
                let lease = kv.grant_lease(ttl).await.ok()?;
                put_on_lease(kv.as_ref(), &records, lease).await.ok()?;
                tracing::warn!(nodes = records.len(), "node lease had expired; joined again");
                Some(lease)
            }
        });
        Ok(NodeMembership { keeper, kv: self.kv.clone() })
    }

    /// Reads nodes, allocations (desired state merged with status), volumes and fences,
    /// as of one commit.
    pub async fn view(&self) -> Result<ClusterView> {
        let prefixes = ["nodes", "allocs", "status", "volumes", "fences"].map(|p| self.key(&[p, ""]));
        let read = self.journal.read(&prefixes).await.map_err(kv_err)?;
        let [nodes, allocs, status, volumes, fences] = read
            .lists
            .try_into()
            .map_err(|_| Error::Backend { backend: BACKEND, source: "journal read returned the wrong number of listings".into() })?;
        let mut view = ClusterView { head: read.head, ..ClusterView::default() };
        for e in nodes.entries {
            view.nodes.push(decode(&e.key, &e.value)?);
        }
        let alloc_prefix = &prefixes[1];
        view.stored = Arc::new(allocs.entries.iter().map(|e| (e.key[alloc_prefix.len()..].to_owned(), e.value.clone())).collect());
        view.allocations = merge_status(&prefixes[2], allocs.entries, status.entries)?;
        for e in volumes.entries {
            view.volumes.push(decode(&e.key, &e.value)?);
        }
        for e in fences.entries {
            view.fences.insert(e.key[prefixes[4].len()..].to_owned(), Some(e.version));
        }
        Ok(view)
    }

    /// The allocations on one node (what its agent runs): only that node's keys are read.
    pub async fn allocations_on(&self, node: &str) -> Result<Vec<AllocRecord>> {
        let prefixes = [self.key(&["allocs", node, ""]), self.key(&["status", node, ""])];
        let read = self.journal.read(&prefixes).await.map_err(kv_err)?;
        let mut lists = read.lists.into_iter();
        let (allocs, status) = (lists.next().unwrap_or_default(), lists.next().unwrap_or_default());
        merge_status(&self.key(&["status", ""]), allocs.entries, status.entries)
    }

    /// Records an allocation's status as its node agent reports it, in the status key
    /// only that agent writes (a plan's record of the allocation is left as it is).
    pub async fn report(&self, alloc: &AllocRecord) -> Result<()> {
        let record = StatusRecord { status: alloc.status, since_ms: alloc.since_ms, restarts: alloc.restarts, address: alloc.address };
        self.kv.put(&self.key(&["status", &alloc.node, &alloc.id]), encode(&record)?, None).await.map_err(kv_err)?;
        Ok(())
    }

    /// Stores a secret under `<root>/secrets/<name>` (`name`: segments of `A-Za-z0-9_.-`
    /// joined by `/`, e.g. `shop/DB_PASSWORD`). Tasks get it as a file; never logged.
    pub async fn put_secret(&self, name: &str, value: &[u8]) -> Result<()> {
        self.kv.put(&self.secret_key(name)?, value.to_vec(), None).await.map_err(kv_err)?;
        Ok(())
    }

    /// A secret's value, if it is stored.
    pub async fn secret(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.kv.get(&self.secret_key(name)?).await.map_err(kv_err)?.map(|e| e.value))
    }

    /// Removes a secret; `false` if there was none.
    pub async fn delete_secret(&self, name: &str) -> Result<bool> {
        let key = self.secret_key(name)?;
        let existed = self.kv.get(&key).await.map_err(kv_err)?.is_some();
        self.kv.delete(&key).await.map_err(kv_err)?;
        Ok(existed)
    }

    /// The names of the secrets under `prefix` (`shop/` lists `shop/…`), sorted.
    pub async fn secret_names(&self, prefix: &str) -> Result<Vec<String>> {
        let base = self.key(&["secrets", ""]);
        let listed = self.kv.list(&format!("{base}{prefix}")).await.map_err(kv_err)?;
        let mut names: Vec<String> = listed.entries.into_iter().map(|e| e.key[base.len()..].to_owned()).collect();
        names.sort();
        Ok(names)
    }

    fn secret_key(&self, name: &str) -> Result<String> {
        let ok = name.split('/').all(crate::task::is_secret_file_name);
        if !ok {
            return Err(Error::invalid("secret name", name, "segments of A-Za-z0-9_.- (not starting with a dot) joined by /"));
        }
        Ok(self.key(&["secrets", name]))
    }

    /// Stores what a group runs at one version (kept per version: old and new run side by
    /// side during a deployment).
    pub async fn put_group(&self, spec: &crate::orchestrate::spec::GroupSpec) -> Result<()> {
        let d = &spec.desired;
        crate::error::validate_id("job id", &d.job)?;
        crate::error::validate_id("group name", &d.group)?;
        let key = self.key(&["groups", &d.job, &d.group, &format!("v{}", d.version)]);
        self.kv.put(&key, encode(spec)?, None).await.map_err(kv_err)?;
        Ok(())
    }

    /// What a group runs at `version`.
    pub async fn group_version(&self, job: &str, group: &str, version: u64) -> Result<crate::orchestrate::spec::GroupSpec> {
        let key = self.key(&["groups", job, group, &format!("v{version}")]);
        match self.kv.get(&key).await.map_err(kv_err)? {
            Some(e) => decode(&key, &e.value),
            None => Err(Error::NotFound { kind: "group version", name: format!("{job}/{group} v{version}") }),
        }
    }

    /// Every stored version of a group, oldest first: its release timeline.
    pub async fn group_versions(&self, job: &str, group: &str) -> Result<Vec<crate::orchestrate::spec::GroupSpec>> {
        let prefix = self.key(&["groups", job, group, "v"]);
        let mut out: Vec<crate::orchestrate::spec::GroupSpec> = Vec::new();
        for e in self.kv.list(&prefix).await.map_err(kv_err)?.entries {
            // `v10` sorts before `v9` as text: order by the number.
            if e.key[prefix.len()..].parse::<u64>().is_ok() {
                out.push(decode(&e.key, &e.value)?);
            }
        }
        out.sort_by_key(|g| g.desired.version);
        Ok(out)
    }

    /// Which allocations of a group should be in the routing catalog (default all).
    pub async fn traffic(&self, job: &str, group: &str) -> Result<Traffic> {
        let key = self.key(&["traffic", job, group]);
        match self.kv.get(&key).await.map_err(kv_err)? {
            Some(e) => decode(&key, &e.value),
            None => Ok(Traffic::All),
        }
    }

    /// Sets which allocations of a group agents register (blue/green switches).
    pub async fn set_traffic(&self, job: &str, group: &str, traffic: Traffic) -> Result<()> {
        let key = self.key(&["traffic", job, group]);
        self.write(Txn::new().put(key, crate::records::encode_plain(&traffic)?, None)).await?;
        Ok(())
    }

    /// Where volume `name` lives, if anywhere.
    pub async fn volume_home(&self, name: &str) -> Result<Option<HostVolume>> {
        let key = self.key(&["volumes", name]);
        self.kv.get(&key).await.map_err(kv_err)?.map(|e| decode(&key, &e.value)).transpose()
    }

    /// Records that volume `volume.name` now lives on `volume.node`: the last step of
    /// moving a stateful service, after its data was copied there ([`crate::fetch_volume`])
    /// and while no allocation mounts it. [`Error::Conflict`] if an allocation still
    /// mounts it, [`Error::NotFound`] for an unknown volume.
    pub async fn rehome_volume(&self, volume: &HostVolume) -> Result<()> {
        crate::error::validate_id("volume name", &volume.name)?;
        let key = self.key(&["volumes", &volume.name]);
        let view = self.view().await?;
        if !view.volumes.iter().any(|v| v.name == volume.name) {
            return Err(Error::NotFound { kind: "volume", name: volume.name.clone() });
        }
        if let Some(user) = view.allocations.iter().find(|a| a.volumes.iter().any(|m| m.name == volume.name)) {
            return Err(Error::Conflict { kind: "volume", name: volume.name.clone(), reason: format!("in use by allocation {}", user.id) });
        }
        // Through the journal: a plan placing a user of the volume meanwhile conflicts.
        let writes = vec![TxnOp::Put { key, value: encode(volume)?, lease: None }];
        self.journal.commit(view.head, self.fence.clone().into_iter().collect(), writes).await.map_err(|e| match e {
            keelson_discovery::Error::VersionMismatch { .. } => Error::Stale { kind: "plan", name: "cluster state changed; retry".into() },
            other => kv_err(other),
        })?;
        Ok(())
    }

    /// Removes a finished allocation's record (its agent has stopped it).
    pub async fn forget(&self, alloc: &AllocRecord) -> Result<()> {
        let mut txn =
            Txn::new().delete(self.key(&["allocs", &alloc.node, &alloc.id])).delete(self.key(&["status", &alloc.node, &alloc.id]));
        if let Some(slot) = alloc.slot {
            // In the same write: the slot's next allocation finds where this one was.
            let home = SlotHome { node: alloc.node.clone(), address: alloc.address, left_ms: wall_clock_ms() };
            txn = txn.put(self.key(&["slots", &alloc.job, &alloc.group, &slot.to_string()]), encode(&home)?, None);
        }
        self.kv.txn(txn).await.map_err(kv_err)?;
        Ok(())
    }

    /// Where each slot of `job`/`group` last ran ([`SlotHome`]), by slot.
    pub async fn slot_homes(&self, job: &str, group: &str) -> Result<HashMap<u32, SlotHome>> {
        let prefix = self.key(&["slots", job, group, ""]);
        let list = self.kv.list(&prefix).await.map_err(kv_err)?;
        let mut out = HashMap::new();
        for e in list.entries {
            // A key that is not a slot number is not ours to judge: skipped.
            if let Ok(slot) = e.key[prefix.len()..].parse::<u32>() {
                out.insert(slot, decode(&e.key, &e.value)?);
            }
        }
        Ok(out)
    }

    /// Commits `plan` if no node it touches changed since its view was read; otherwise
    /// [`Error::Stale`] and nothing is written. Readers see the whole plan at once,
    /// whatever its size. Returns the number of keys written.
    pub async fn commit(&self, plan: &PlanCommit) -> Result<usize> {
        self.commit_revision(plan).await.map(|(count, _)| count)
    }

    /// [`ClusterStore::commit`], also returning the revision the plan became visible at
    /// (`None` for an empty plan).
    pub(crate) async fn commit_revision(&self, plan: &PlanCommit) -> Result<(usize, Option<u64>)> {
        if plan.is_empty() {
            return Ok((0, None));
        }
        let writes = self.plan_writes(plan)?;
        let count = writes.len();
        let compares: Vec<Compare> = self.fence.clone().into_iter().collect();
        let mut head = plan.head;
        for _ in 0..5 {
            match self.journal.commit(head, compares.clone(), writes.clone()).await {
                Ok(revision) => return Ok((count, Some(revision))),
                Err(keelson_discovery::Error::VersionMismatch { key, .. }) if key == self.journal.head_key() => {
                    // Another plan committed since the view: still fine if it touched none
                    // of this plan's nodes and homed none of its volumes.
                    head = self.journal.read(&[]).await.map_err(kv_err)?.head;
                    self.check_unchanged(plan).await?;
                }
                Err(e) => return Err(kv_err(e)),
            }
        }
        Err(Error::Stale { kind: "plan", name: "the cluster state kept changing (5 attempts)".into() })
    }

    /// Fails with a conflict if a node `plan` touches changed, or a volume it homes was
    /// homed, since the plan's view was read.
    async fn check_unchanged(&self, plan: &PlanCommit) -> Result<()> {
        for node in &plan.touched {
            let now = self.kv.get(&self.key(&["fences", node])).await.map_err(kv_err)?.map(|e| e.version);
            if now != plan.fences.get(node).copied().flatten() {
                return Err(Error::Stale { kind: "plan for node", name: node.clone() });
            }
        }
        for v in &plan.new_volumes {
            if self.kv.get(&self.key(&["volumes", &v.name])).await.map_err(kv_err)?.is_some() {
                return Err(Error::Stale { kind: "volume home", name: v.name.clone() });
            }
        }
        Ok(())
    }

    /// The keys a plan writes: its allocations' desired state, their status keys when
    /// they go, the fences of the nodes it touches, volume homes, runs and traffic.
    fn plan_writes(&self, plan: &PlanCommit) -> Result<Vec<TxnOp>> {
        let mut writes = Vec::with_capacity(plan.puts.len() + plan.deletes.len() * 2 + plan.touched.len());
        let put = |key: String, value: Vec<u8>| TxnOp::Put { key, value, lease: None };
        for node in &plan.touched {
            writes.push(put(self.key(&["fences", node]), b"1".to_vec()));
        }
        for v in &plan.new_volumes {
            writes.push(put(self.key(&["volumes", &v.name]), encode(v)?));
        }
        for a in &plan.puts {
            // Desired state only: what the agent reports lives in its status key.
            let status = if a.status == AllocStatus::Stopping { AllocStatus::Stopping } else { AllocStatus::Pending };
            let stored = plan.stored.get(&format!("{}/{}", a.node, a.id)).map(Vec::as_slice);
            writes.push(put(self.key(&["allocs", &a.node, &a.id]), encode_over(stored, &AllocRecord { status, ..a.clone() })?));
        }
        for r in &plan.runs {
            writes.push(put(self.key(&["runs", &r.node, &r.spec.id]), encode(r)?));
        }
        for (job, group, traffic) in &plan.traffic {
            writes.push(put(self.key(&["traffic", job, group]), crate::records::encode_plain(traffic)?));
        }
        for (node, id) in &plan.deletes {
            writes.push(TxnOp::Delete { key: self.key(&["allocs", node, id]) });
            writes.push(TxnOp::Delete { key: self.key(&["status", node, id]) });
        }
        Ok(writes)
    }

    /// Finishes a plan whose committer died after publishing it, and deletes chunks of
    /// plans that were never published. The controller calls it now and then.
    pub async fn collect_garbage(&self) -> Result<usize> {
        self.journal.finish_pending().await.map_err(kv_err)?;
        self.journal.collect_garbage().await.map_err(kv_err)
    }
}

/// Puts `records` on `lease`, as many per transaction as the backend takes.
async fn put_on_lease(kv: &dyn KeyValue, records: &[(String, Vec<u8>)], lease: keelson_discovery::LeaseId) -> Result<()> {
    let caps = kv.capabilities();
    let mut txn = Txn::new();
    for (key, value) in records {
        let size = key.len() + value.len();
        if !txn.is_empty() && (txn.len() >= caps.max_txn_ops || txn.size_bytes() + size > caps.max_txn_bytes) {
            kv.txn(std::mem::take(&mut txn)).await.map_err(kv_err)?;
        }
        txn = txn.put(key.clone(), value.clone(), Some(lease));
    }
    if !txn.is_empty() {
        kv.txn(txn).await.map_err(kv_err)?;
    }
    Ok(())
}

/// Allocations from their desired records, with the status their agents reported: a
/// plan's `Stopping` wins; otherwise the reported status, or `Pending` before any report.
fn merge_status(
    status_prefix: &str,
    allocs: Vec<keelson_discovery::KvEntry>,
    status: Vec<keelson_discovery::KvEntry>,
) -> Result<Vec<AllocRecord>> {
    let mut reported: std::collections::HashMap<String, StatusRecord> = std::collections::HashMap::new();
    for e in status {
        // `status/<node>/<alloc>`: keyed by node and id, as allocations are.
        let rest = e.key.strip_prefix(status_prefix).unwrap_or(&e.key).to_owned();
        reported.insert(rest, decode(&e.key, &e.value)?);
    }
    let mut out = Vec::with_capacity(allocs.len());
    for e in allocs {
        let mut a: AllocRecord = decode(&e.key, &e.value)?;
        if let Some(r) = reported.get(&format!("{}/{}", a.node, a.id)) {
            r.apply_to(&mut a);
        }
        out.push(a);
    }
    Ok(out)
}

/// Milliseconds since the Unix epoch: the clock allocation timestamps and deployment
/// steps share across processes.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
