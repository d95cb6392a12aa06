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
//! [`Error::Conflict`], writes nothing, and the caller re-plans from a fresh view. A
//! store made [`ClusterStore::fenced`] by a held lock adds the lock to every commit, so
//! a holder that lost its lock (paused past its TTL) writes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::{Compare, Expect, Journal, KeyValue, LeaseKeeper, LockGuard, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::cluster_cache::ClusterCache;
use crate::deployment::{Action, AllocHealth, AllocView, Deployment, Traffic};
use crate::error::{Error, Result};
use crate::model::{Allocation, ClusterSnapshot, HostVolume, Job, Node, TaskGroup};
use crate::reconcile::{reconcile, AllocRecord, AllocStatus, DesiredGroup};
use crate::state::ClusterState;

const BACKEND: &str = "cluster store";

pub(crate) fn kv_err(e: keelson_discovery::Error) -> Error {
    match e {
        keelson_discovery::Error::Conflict { key, .. } => Error::Conflict { kind: "key", name: key },
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
    journal: Journal,
    /// Added to every write when the store acts under a lock.
    fence: Option<Compare>,
}

/// What a node's agent reports about an allocation (`status/<node>/<alloc>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StatusRecord {
    pub(crate) status: AllocStatus,
    #[serde(default)]
    pub(crate) since_ms: u64,
}

/// A node's membership: its lease is renewed until this is dropped or
/// [`NodeMembership::leave`] is called.
#[derive(Debug)]
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
    pub(crate) runs: Vec<crate::runs::RunRecord>,
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

/// Where a plan reads the cluster from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// A fresh [`ClusterView`], read whole.
    Store,
    /// A [`ClusterCache`] kept by a watch.
    Cache(&'a ClusterCache),
}

/// What a plan starts from.
struct PlanInput {
    /// The allocations of the groups planned and those on lost nodes (all of them, from
    /// a fresh view), merged with reported status.
    allocs: Vec<AllocRecord>,
    lost: HashSet<String>,
    /// An empty plan against the state read.
    plan: PlanCommit,
    /// The fresh view it was read from.
    view: Option<ClusterView>,
}

/// What one [`ClusterStore::reschedule`] pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReschedulePass {
    /// Allocations removed because their node was lost.
    pub lost: Vec<String>,
    /// New allocations placed.
    pub placed: Vec<AllocRecord>,
    /// Allocations of the desired groups asked to stop: failed, or over the count.
    pub stopped: Vec<String>,
    /// Commits that lost a race and were re-planned.
    pub replans: u32,
}

impl ClusterStore {
    /// A store under `root` (for example `keelson/cluster`).
    pub fn new(kv: Arc<dyn KeyValue>, root: impl Into<String>) -> Self {
        let root = root.into().trim_end_matches('/').to_owned();
        let journal = Journal::new(kv.clone(), &format!("{root}/journal"));
        ClusterStore { kv, root, journal, fence: None }
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
        let mut records = Vec::with_capacity(nodes.len());
        for node in nodes {
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
        let record = StatusRecord { status: alloc.status, since_ms: alloc.since_ms };
        self.kv.put(&self.key(&["status", &alloc.node, &alloc.id]), encode(&record)?, None).await.map_err(kv_err)?;
        Ok(())
    }

    /// Stores what a group runs at one version (kept per version: old and new run side by
    /// side during a deployment).
    pub async fn put_group(&self, spec: &crate::agent::GroupSpec) -> Result<()> {
        let d = &spec.desired;
        crate::error::validate_id("job id", &d.job)?;
        crate::error::validate_id("group name", &d.group)?;
        let key = self.key(&["groups", &d.job, &d.group, &format!("v{}", d.version)]);
        self.kv.put(&key, encode(spec)?, None).await.map_err(kv_err)?;
        Ok(())
    }

    /// What a group runs at `version`.
    pub async fn group_version(&self, job: &str, group: &str, version: u64) -> Result<crate::agent::GroupSpec> {
        let key = self.key(&["groups", job, group, &format!("v{version}")]);
        match self.kv.get(&key).await.map_err(kv_err)? {
            Some(e) => decode(&key, &e.value),
            None => Err(Error::NotFound { kind: "group version", name: format!("{job}/{group} v{version}") }),
        }
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
            return Err(Error::Conflict { kind: "volume in use by allocation", name: user.id.clone() });
        }
        // Through the journal: a plan placing a user of the volume meanwhile conflicts.
        let writes = vec![TxnOp::Put { key, value: encode(volume)?, lease: None }];
        self.journal.commit(view.head, self.fence.clone().into_iter().collect(), writes).await.map_err(|e| match e {
            keelson_discovery::Error::Conflict { .. } => Error::Conflict { kind: "plan", name: "cluster state changed; retry".into() },
            other => kv_err(other),
        })?;
        Ok(())
    }

    /// Removes a finished allocation's record (its agent has stopped it).
    pub async fn forget(&self, alloc: &AllocRecord) -> Result<()> {
        let txn = Txn::new().delete(self.key(&["allocs", &alloc.node, &alloc.id])).delete(self.key(&["status", &alloc.node, &alloc.id]));
        self.kv.txn(txn).await.map_err(kv_err)?;
        Ok(())
    }

    /// Commits `plan` if no node it touches changed since its view was read; otherwise
    /// [`Error::Conflict`] and nothing is written. Readers see the whole plan at once,
    /// whatever its size. Returns the number of keys written.
    pub async fn commit(&self, plan: &PlanCommit) -> Result<usize> {
        self.commit_revision(plan).await.map(|(count, _)| count)
    }

    /// [`ClusterStore::commit`], also returning the revision the plan became visible at
    /// (`None` for an empty plan).
    async fn commit_revision(&self, plan: &PlanCommit) -> Result<(usize, Option<u64>)> {
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
                Err(keelson_discovery::Error::Conflict { key, .. }) if key == self.journal.head_key() => {
                    // Another plan committed since the view: still fine if it touched none
                    // of this plan's nodes and homed none of its volumes.
                    head = self.journal.read(&[]).await.map_err(kv_err)?.head;
                    self.check_unchanged(plan).await?;
                }
                Err(e) => return Err(kv_err(e)),
            }
        }
        Err(Error::Conflict { kind: "plan", name: "the cluster state kept changing (5 attempts)".into() })
    }

    /// Fails with a conflict if a node `plan` touches changed, or a volume it homes was
    /// homed, since the plan's view was read.
    async fn check_unchanged(&self, plan: &PlanCommit) -> Result<()> {
        for node in &plan.touched {
            let now = self.kv.get(&self.key(&["fences", node])).await.map_err(kv_err)?.map(|e| e.version);
            if now != plan.fences.get(node).copied().flatten() {
                return Err(Error::Conflict { kind: "plan for node", name: node.clone() });
            }
        }
        for v in &plan.new_volumes {
            if self.kv.get(&self.key(&["volumes", &v.name])).await.map_err(kv_err)?.is_some() {
                return Err(Error::Conflict { kind: "volume home", name: v.name.clone() });
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

    /// One step of `deployment` for `job`/`group`: reads the group's allocations, asks
    /// the deployment what to do, places new allocations with the placement engine and
    /// marks stopped ones `Stopping` (their agents deregister, drain and stop them), and
    /// commits optimistically. On a conflict it re-reads and steps again (steps are
    /// idempotent); the deployment only moves on once a step is committed.
    pub async fn advance(&self, deployment: &mut Deployment, job: &str, group: &str, now_ms: u64) -> Result<Vec<Action>> {
        self.advance_from(Source::Store, deployment, job, group, now_ms).await
    }

    /// [`ClusterStore::advance`], reading from `cache` instead of the whole store.
    pub async fn advance_with(
        &self,
        cache: &ClusterCache,
        deployment: &mut Deployment,
        job: &str,
        group: &str,
        now_ms: u64,
    ) -> Result<Vec<Action>> {
        self.advance_from(Source::Cache(cache), deployment, job, group, now_ms).await
    }

    async fn advance_from(
        &self,
        source: Source<'_>,
        deployment: &mut Deployment,
        job: &str,
        group: &str,
        now_ms: u64,
    ) -> Result<Vec<Action>> {
        let mut floor = 0;
        let mut pauses = keelson_discovery::retry_pauses(REPLAN_PAUSE, REPLAN_PAUSE * 20);
        for attempt in 0..PLAN_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(pauses.next().unwrap_or(REPLAN_PAUSE)).await;
            }
            let input = self.plan_input(source, &[(job, group)], floor).await?;
            let mine: Vec<&AllocRecord> =
                input.allocs.iter().filter(|a| a.job == job && a.group == group && !input.lost.contains(&a.node)).collect();
            let seen: Vec<AllocView> = mine
                .iter()
                .map(|a| {
                    let health = match a.status {
                        AllocStatus::Pending => AllocHealth::Starting { since: a.since_ms },
                        AllocStatus::Running => AllocHealth::Healthy { since: a.since_ms },
                        AllocStatus::Failed => AllocHealth::Failed,
                        AllocStatus::Stopping => AllocHealth::Stopping,
                    };
                    AllocView::new(a.id.clone(), a.version, health)
                })
                .collect();
            let mut trial = deployment.clone();
            let actions = trial.step(&seen, now_ms);
            let mut plan = input.plan.clone();
            for action in &actions {
                match action {
                    Action::Start { version, count } => {
                        let spec = self.group_version(job, group, *version).await?;
                        let desired = [DesiredGroup { count: *count, ..spec.desired }];
                        self.place_in(source, &input, &desired, &[(0, *count)], &mut plan)?;
                    }
                    Action::Stop { ids } => {
                        for a in mine.iter().filter(|a| ids.contains(&a.id)) {
                            plan.put(AllocRecord { status: AllocStatus::Stopping, since_ms: now_ms, ..(*a).clone() });
                        }
                    }
                }
            }
            // Traffic follows the deployment (a blue/green switch, or its rollback), in the
            // same commit as the allocations it concerns.
            if self.traffic(job, group).await? != trial.traffic() {
                plan.set_traffic(job, group, trial.traffic());
            }
            let committed = match self.place_in(source, &input, &[], &[], &mut plan) {
                Ok(_) => self.commit_from(source, &plan).await,
                Err(e) => Err(e),
            };
            match committed {
                Ok(()) => {
                    *deployment = trial;
                    return Ok(actions);
                }
                Err(Error::Conflict { .. }) => floor = self.head_revision().await?,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict { kind: "plan", name: format!("deployment of {job}/{group} ({PLAN_ATTEMPTS} attempts)") })
    }

    /// One pass of node-loss handling for `desired`: allocations on lost nodes are
    /// removed and replacements placed by the placement engine on live nodes, committed
    /// optimistically (re-planned up to 5 times when another plan wins).
    pub async fn reschedule(&self, desired: &[DesiredGroup]) -> Result<ReschedulePass> {
        self.reschedule_from(Source::Store, desired).await
    }

    /// [`ClusterStore::reschedule`], reading from `cache` instead of the whole store: what
    /// a pass costs grows with the groups it plans, not with the cluster.
    pub async fn reschedule_with(&self, cache: &ClusterCache, desired: &[DesiredGroup]) -> Result<ReschedulePass> {
        self.reschedule_from(Source::Cache(cache), desired).await
    }

    async fn reschedule_from(&self, source: Source<'_>, desired: &[DesiredGroup]) -> Result<ReschedulePass> {
        let mut pass = ReschedulePass::default();
        let groups: Vec<(&str, &str)> = desired.iter().map(|d| (d.job.as_str(), d.group.as_str())).collect();
        let mut floor = 0;
        let mut pauses = keelson_discovery::retry_pauses(REPLAN_PAUSE, REPLAN_PAUSE * 20);
        for attempt in 0..PLAN_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(pauses.next().unwrap_or(REPLAN_PAUSE)).await;
            }
            let input = self.plan_input(source, &groups, floor).await?;
            let r = reconcile(desired, &input.allocs, &input.lost);
            let mut plan = input.plan.clone();
            for a in input.allocs.iter().filter(|a| r.lost.contains(&a.id)) {
                plan.delete(&a.node, &a.id);
            }
            // Failed and surplus allocations of these groups stop (their agents stop,
            // remove and forget them); other groups' allocations are not ours to touch.
            let ours = |a: &AllocRecord| desired.iter().any(|d| d.job == a.job && d.group == a.group);
            let stopping: Vec<&AllocRecord> = input.allocs.iter().filter(|a| r.stop.contains(&a.id) && ours(a)).collect();
            for a in &stopping {
                plan.put(AllocRecord { status: AllocStatus::Stopping, since_ms: wall_clock_ms(), ..(*a).clone() });
            }
            let committed = match self.place_in(source, &input, desired, &r.place, &mut plan) {
                Ok(placed) => self.commit_from(source, &plan).await.map(|()| placed),
                Err(e) => Err(e),
            };
            match committed {
                Ok(placed) => {
                    pass.lost = r.lost;
                    pass.placed = placed;
                    pass.stopped = stopping.iter().map(|a| a.id.clone()).collect();
                    return Ok(pass);
                }
                Err(Error::Conflict { .. }) => {
                    pass.replans += 1;
                    floor = self.head_revision().await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict { kind: "plan", name: format!("reschedule ({PLAN_ATTEMPTS} attempts)") })
    }

    /// Reads what a plan for `groups` starts from; a cache first catches up with
    /// `floor` (the head after a lost race) and the commits made through it.
    async fn plan_input(&self, source: Source<'_>, groups: &[(&str, &str)], floor: u64) -> Result<PlanInput> {
        match source {
            Source::Store => {
                let view = self.view().await?;
                let lost = view.lost_nodes();
                Ok(PlanInput { allocs: view.allocations.clone(), lost, plan: view.plan(), view: Some(view) })
            }
            Source::Cache(cache) => {
                if cache.root() != self.root {
                    return Err(Error::invalid("cluster cache", cache.root(), format!("follows another store than {}", self.root)));
                }
                cache.catch_up(floor).await?;
                let (allocs, lost, plan) = cache.plan_input(groups)?;
                Ok(PlanInput { allocs, lost, plan, view: None })
            }
        }
    }

    /// Places `wanted` allocations of `desired` into `plan`, in the state `input` came
    /// from. From a cache, also seals the plan: the cache must still be at the head the
    /// plan was read at ([`Error::Conflict`] otherwise), and the plan takes the fences of
    /// the nodes it touches from it.
    fn place_in(
        &self,
        source: Source<'_>,
        input: &PlanInput,
        desired: &[DesiredGroup],
        wanted: &[(usize, u32)],
        plan: &mut PlanCommit,
    ) -> Result<Vec<AllocRecord>> {
        let existing: Vec<&AllocRecord> = input.allocs.iter().collect();
        match (source, &input.view) {
            (Source::Cache(cache), _) => {
                cache.place_and_seal(plan, desired, |state, plan| place(state, &existing, desired, wanted, &input.lost, plan))
            }
            (Source::Store, Some(view)) if !wanted.is_empty() => {
                let mut state = view.placement_state(desired, &input.lost)?;
                place(&mut state, &existing, desired, wanted, &input.lost, plan)
            }
            (Source::Store, _) => Ok(Vec::new()),
        }
    }

    async fn commit_from(&self, source: Source<'_>, plan: &PlanCommit) -> Result<()> {
        let (_, revision) = self.commit_revision(plan).await?;
        if let (Source::Cache(cache), Some(revision)) = (source, revision) {
            cache.note_commit(revision);
        }
        Ok(())
    }

    /// The journal head's revision now (0 before the first commit).
    async fn head_revision(&self) -> Result<u64> {
        Ok(self.journal.read(&[]).await.map_err(kv_err)?.head.version().unwrap_or(0))
    }
}

impl ClusterView {
    /// The live nodes, their allocations (not failed) and volumes, indexed for placement.
    /// Each allocation holds what was recorded with it at placement; records from before
    /// that field count their group's resources, if it is among `desired`.
    fn placement_state(&self, desired: &[DesiredGroup], lost: &HashSet<String>) -> Result<ClusterState> {
        let resources_of = |a: &AllocRecord| {
            if !a.resources.is_zero() {
                return a.resources;
            }
            desired.iter().find(|d| d.job == a.job && d.group == a.group).map(|d| d.resources).unwrap_or_default()
        };
        let mut snapshot = ClusterSnapshot { nodes: self.nodes.clone(), volumes: self.volumes.clone(), ..ClusterSnapshot::default() };
        snapshot.allocations = self
            .allocations
            .iter()
            .filter(|a| !lost.contains(&a.node) && a.status != AllocStatus::Failed)
            .map(|a| Allocation { resources: resources_of(a), ..placement_allocation(a) })
            .collect();
        ClusterState::from_snapshot(&snapshot)
    }
}

/// An allocation as the placement engine counts it.
pub(crate) fn placement_allocation(a: &AllocRecord) -> Allocation {
    Allocation {
        ports: a.ports.iter().copied().collect(),
        volumes: a.volumes.clone(),
        ..Allocation::new(a.id.clone(), a.node.clone(), a.job.clone(), a.group.clone(), a.resources)
    }
}

/// Places `wanted` new allocations of `desired` with the placement engine in `state` (the
/// live nodes and what they hold), given the groups' current allocations `existing`; adds
/// them, and the homes of volumes they create, to `plan`. `state` is left as it was.
pub(crate) fn place(
    state: &mut ClusterState,
    existing: &[&AllocRecord],
    desired: &[DesiredGroup],
    wanted: &[(usize, u32)],
    lost: &HashSet<String>,
    plan: &mut PlanCommit,
) -> Result<Vec<AllocRecord>> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let config = crate::engine::EngineConfig::default();
    let mut out = Vec::new();
    let mut homed: HashSet<String> = HashSet::new();
    // Batches are placed one after another in a trial of the state, so each sees the
    // ports, resources and volume writers of the ones before; the trial is undone at the
    // end: the allocations come back to the state once committed.
    state.trial(|state| -> Result<()> {
        for (i, n) in wanted {
            let d = &desired[*i];
            for volumes in volume_batches(existing, d, *n, lost) {
                let count = if d.volumes.iter().any(|v| v.per_task) { 1 } else { *n };
                let fresh: HashSet<String> =
                    volumes.iter().filter(|v| !state.volumes.contains_key(&v.name)).map(|v| v.name.clone()).collect();
                let mut group = TaskGroup::new(d.group.clone(), count, d.resources).with_dynamic_ports(d.ports);
                for v in volumes {
                    group = group.with_volume(v);
                }
                let placed = state.place(&Job::new(d.job.clone(), vec![group]), &config)?;
                for u in &placed.unplaced {
                    // Left for the next pass (a node may join, a volume's node may come back).
                    tracing::warn!(job = %d.job, group = %d.group, unplaced = ?u, "allocation not placed");
                }
                for p in placed.placements {
                    for (m, req) in p.volumes.iter().zip(&d.volumes) {
                        if fresh.contains(&m.name) && homed.insert(m.name.clone()) {
                            plan.new_volume(HostVolume { name: m.name.clone(), node: p.node.clone(), access: req.access });
                        }
                    }
                    out.push(AllocRecord {
                        id: format!("{}-{}-v{}-{}", d.job, d.group, d.version, unique_suffix()),
                        job: d.job.clone(),
                        group: d.group.clone(),
                        version: d.version,
                        node: p.node,
                        status: AllocStatus::Pending,
                        ports: p.ports,
                        since_ms: wall_clock_ms(),
                        volumes: p.volumes,
                        resources: d.resources,
                    });
                }
            }
        }
        Ok(())
    })?;
    for a in &out {
        plan.put(a.clone());
    }
    Ok(out)
}

/// The volume requests of each placement batch for `n` new allocations of `d`. Without
/// per-task volumes: one batch of `n`, the requests as they are. With them: one batch per
/// allocation, each taking the lowest task index no live allocation of the group holds,
/// its per-task requests turned into that index's volume (`data-2`), so a replacement
/// mounts the volume of the task it replaces and placement pins it to that volume's node.
/// Stopping allocations free their index (their volume stays busy until they are gone:
/// a single writer is not placed beside them).
fn volume_batches(existing: &[&AllocRecord], d: &DesiredGroup, n: u32, lost: &HashSet<String>) -> Vec<Vec<crate::model::VolumeRequest>> {
    let Some(first) = d.volumes.iter().position(|v| v.per_task) else { return vec![d.volumes.clone()] };
    let prefix = format!("{}-", d.volumes[first].name);
    let mut taken: HashSet<u32> = existing
        .iter()
        .filter(|a| a.job == d.job && a.group == d.group && !lost.contains(&a.node))
        .filter(|a| !matches!(a.status, AllocStatus::Failed | AllocStatus::Stopping))
        .filter_map(|a| a.volumes.get(first)?.name.strip_prefix(&prefix)?.parse().ok())
        .collect();
    let mut batches = Vec::new();
    let mut index = 0u32;
    while batches.len() < n as usize {
        if taken.insert(index) {
            let volumes = d
                .volumes
                .iter()
                .map(|v| {
                    if v.per_task {
                        crate::model::VolumeRequest { name: v.volume_for(index), per_task: false, ..v.clone() }
                    } else {
                        v.clone()
                    }
                })
                .collect();
            batches.push(volumes);
        }
        index += 1;
    }
    batches
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
        if a.status != AllocStatus::Stopping {
            if let Some(r) = reported.get(&format!("{}/{}", a.node, a.id)) {
                a.status = r.status;
                a.since_ms = r.since_ms;
            }
        }
        out.push(a);
    }
    Ok(out)
}

/// Plans made again after losing a race before giving up with a conflict.
const PLAN_ATTEMPTS: u32 = 10;

/// The first pause before planning again after a lost race (then doubling, with
/// jitter, so planners that collided do not collide again in lock step).
const REPLAN_PAUSE: Duration = Duration::from_millis(2);

/// Milliseconds since the Unix epoch: the clock allocation timestamps and deployment
/// steps share across processes.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A short id suffix unique within this process and unlikely across processes.
fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{:x}{:x}{n:x}", std::process::id(), nanos)
}
