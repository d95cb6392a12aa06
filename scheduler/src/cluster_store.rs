//! Cluster state in any [`KeyValue`] (etcd in production, `MemoryKv` embedded): nodes
//! with heartbeat leases, allocations by node, and optimistic plan commits.
//!
//! Layout under the store's root:
//! - `nodes/<node>`: the [`Node`], attached to the node's lease: when the node stops
//!   renewing it, the key goes and the node is lost.
//! - `allocs/<node>/<alloc>`: an [`AllocRecord`]; a node agent watches its own prefix.
//! - `fences/<node>`: a counter bumped by every plan that changes the node.
//! - `volumes/<name>`: a [`HostVolume`]: which node's disk holds the volume. Placement
//!   puts an allocation mounting it on that node; a plan that creates a volume records
//!   its home with compare-and-swap on absence, so two plans never home it twice. Not on
//!   a lease: the data outlives its node's agent (moving it is [`ClusterStore::rehome_volume`]).
//!
//! A plan is made from a [`ClusterView`] and remembers the fence version of every node
//! it touches. [`ClusterStore::commit`] takes the `plan` lock, then claims each fence
//! with compare-and-swap on the version the plan saw: if another plan changed one of
//! those nodes since, the commit fails with [`Error::Conflict`] and writes nothing, and
//! the caller re-plans from a fresh view. The lock serialises commits; the fences keep
//! them correct even if a lock holder stalls past its lease.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::{Expect, KeyValue, LeaseKeeper};

use crate::deployment::{Action, AllocHealth, AllocView, Deployment, Traffic};
use crate::error::{Error, Result};
use crate::model::{Allocation, ClusterSnapshot, HostVolume, Job, Node, TaskGroup};
use crate::placement::{PlacementEngine, Scheduler};
use crate::reconcile::{reconcile, AllocRecord, AllocStatus, DesiredGroup};

const BACKEND: &str = "cluster store";

pub(crate) fn kv_err(e: keelson_discovery::Error) -> Error {
    match e {
        keelson_discovery::Error::Conflict { key, .. } => Error::Conflict { kind: "key", name: key },
        e if e.is_retryable() => Error::Unavailable { backend: BACKEND, reason: e.to_string() },
        e => Error::Backend { backend: BACKEND, source: Box::new(e) },
    }
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Backend { backend: BACKEND, source: format!("{key}: {e}").into() })
}

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })
}

/// Cluster state in a [`KeyValue`] store under one root.
#[derive(Clone, Debug)]
pub struct ClusterStore {
    pub(crate) kv: Arc<dyn KeyValue>,
    root: String,
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

/// What a plan read: nodes, allocations, and the fence version of every node.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// Live nodes (their lease is current).
    pub nodes: Vec<Node>,
    /// Every allocation, on live and lost nodes.
    pub allocations: Vec<AllocRecord>,
    /// Every volume and the node that holds it.
    pub volumes: Vec<HostVolume>,
    fences: BTreeMap<String, Option<u64>>,
}

impl ClusterView {
    /// Nodes that hold allocations but are no longer live.
    pub fn lost_nodes(&self) -> HashSet<String> {
        let live: HashSet<&str> = self.nodes.iter().map(|n| n.id.as_str()).collect();
        self.allocations.iter().filter(|a| !live.contains(a.node.as_str())).map(|a| a.node.clone()).collect()
    }

    /// An empty plan against this view.
    pub fn plan(&self) -> PlanCommit {
        PlanCommit {
            fences: self.fences.clone(),
            touched: BTreeSet::new(),
            puts: Vec::new(),
            deletes: Vec::new(),
            new_volumes: Vec::new(),
            runs: Vec::new(),
        }
    }
}

/// Changes made against one [`ClusterView`].
#[derive(Clone, Debug)]
pub struct PlanCommit {
    fences: BTreeMap<String, Option<u64>>,
    touched: BTreeSet<String>,
    puts: Vec<AllocRecord>,
    deletes: Vec<(String, String)>,
    new_volumes: Vec<HostVolume>,
    pub(crate) runs: Vec<crate::runs::RunRecord>,
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

    /// Whether the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty() && self.new_volumes.is_empty() && self.runs.is_empty()
    }
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
        ClusterStore { kv, root: root.into().trim_end_matches('/').to_owned() }
    }

    pub(crate) fn key(&self, parts: &[&str]) -> String {
        format!("{}/{}", self.root, parts.join("/"))
    }

    /// Registers `node` on a lease of `ttl`, renewed at a third of it until the returned
    /// membership is dropped. A node that stops renewing is lost after `ttl`.
    pub async fn join(&self, node: &Node, ttl: Duration) -> Result<NodeMembership> {
        crate::error::validate_id("node id", &node.id)?;
        let lease = self.kv.grant_lease(ttl).await.map_err(kv_err)?;
        let (key, value) = (self.key(&["nodes", &node.id]), encode(node)?);
        self.kv.put(&key, value.clone(), Some(lease)).await.map_err(kv_err)?;
        // A node that outlived its lease (a partition) joins again: its allocations were
        // re-placed meanwhile, and it will see that in its own prefix.
        let kv = self.kv.clone();
        let keeper = LeaseKeeper::spawn(self.kv.clone(), lease, ttl, move || {
            let (kv, key, value) = (kv.clone(), key.clone(), value.clone());
            async move {
                let lease = kv.grant_lease(ttl).await.ok()?;
                kv.put(&key, value, Some(lease)).await.ok()?;
                tracing::warn!(%key, "node lease had expired; joined again");
                Some(lease)
            }
        });
        Ok(NodeMembership { keeper, kv: self.kv.clone() })
    }

    /// Reads nodes, allocations and fences.
    pub async fn view(&self) -> Result<ClusterView> {
        let mut view = ClusterView::default();
        for e in self.kv.list(&self.key(&["nodes", ""])).await.map_err(kv_err)?.entries {
            view.nodes.push(decode(&e.key, &e.value)?);
        }
        for e in self.kv.list(&self.key(&["allocs", ""])).await.map_err(kv_err)?.entries {
            view.allocations.push(decode(&e.key, &e.value)?);
        }
        for e in self.kv.list(&self.key(&["volumes", ""])).await.map_err(kv_err)?.entries {
            view.volumes.push(decode(&e.key, &e.value)?);
        }
        let fence_prefix = self.key(&["fences", ""]);
        for e in self.kv.list(&fence_prefix).await.map_err(kv_err)?.entries {
            view.fences.insert(e.key[fence_prefix.len()..].to_owned(), Some(e.version));
        }
        Ok(view)
    }

    /// The allocations on one node (what its agent runs).
    pub async fn allocations_on(&self, node: &str) -> Result<Vec<AllocRecord>> {
        let list = self.kv.list(&self.key(&["allocs", node, ""])).await.map_err(kv_err)?;
        list.entries.iter().map(|e| decode(&e.key, &e.value)).collect()
    }

    /// Records an allocation's status as its node agent reports it (no fence: only the
    /// agent of that node writes its allocations' status).
    pub async fn report(&self, alloc: &AllocRecord) -> Result<()> {
        self.kv.put(&self.key(&["allocs", &alloc.node, &alloc.id]), encode(alloc)?, None).await.map_err(kv_err)?;
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
        self.kv.put(&key, encode(&traffic)?, None).await.map_err(kv_err)?;
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
        let current =
            self.kv.get(&key).await.map_err(kv_err)?.ok_or_else(|| Error::NotFound { kind: "volume", name: volume.name.clone() })?;
        let view = self.view().await?;
        if let Some(user) = view.allocations.iter().find(|a| a.volumes.iter().any(|m| m.name == volume.name)) {
            return Err(Error::Conflict { kind: "volume in use by allocation", name: user.id.clone() });
        }
        self.kv.compare_and_swap(&key, Expect::Version(current.version), encode(volume)?, None).await.map_err(kv_err)?;
        Ok(())
    }

    /// Removes a finished allocation's record (its agent has stopped it).
    pub async fn forget(&self, alloc: &AllocRecord) -> Result<()> {
        self.kv.delete(&self.key(&["allocs", &alloc.node, &alloc.id])).await.map_err(kv_err)?;
        Ok(())
    }

    /// Commits `plan` if no node it touches changed since its view was read; otherwise
    /// [`Error::Conflict`] and nothing is written. Returns the number of keys written.
    pub async fn commit(&self, plan: &PlanCommit) -> Result<usize> {
        if plan.is_empty() {
            return Ok(0);
        }
        let lock = self.kv.lock("keelson-plan", Duration::from_secs(10), Duration::from_secs(10)).await.map_err(kv_err)?;
        let result = self.commit_locked(plan).await;
        if let Err(e) = self.kv.unlock(&lock).await {
            tracing::warn!(error = %e, "releasing the plan lock (it expires with its lease)");
        }
        result
    }

    async fn commit_locked(&self, plan: &PlanCommit) -> Result<usize> {
        // Check every fence and volume before claiming any, so a stale plan writes nothing.
        for v in &plan.new_volumes {
            if self.kv.get(&self.key(&["volumes", &v.name])).await.map_err(kv_err)?.is_some() {
                return Err(Error::Conflict { kind: "volume home", name: v.name.clone() });
            }
        }
        for node in &plan.touched {
            let seen = plan.fences.get(node).copied().flatten();
            let now = self.kv.get(&self.key(&["fences", node])).await.map_err(kv_err)?.map(|e| e.version);
            if now != seen {
                return Err(Error::Conflict { kind: "plan for node", name: node.clone() });
            }
        }
        for node in &plan.touched {
            let key = self.key(&["fences", node]);
            let expect = match plan.fences.get(node).copied().flatten() {
                Some(v) => Expect::Version(v),
                None => Expect::Absent,
            };
            self.kv.compare_and_swap(&key, expect, b"1".to_vec(), None).await.map_err(|e| match e {
                keelson_discovery::Error::Conflict { .. } => Error::Conflict { kind: "plan for node", name: node.clone() },
                other => kv_err(other),
            })?;
        }
        for v in &plan.new_volumes {
            self.kv.compare_and_swap(&self.key(&["volumes", &v.name]), Expect::Absent, encode(v)?, None).await.map_err(|e| match e {
                keelson_discovery::Error::Conflict { .. } => Error::Conflict { kind: "volume home", name: v.name.clone() },
                other => kv_err(other),
            })?;
        }
        for a in &plan.puts {
            self.kv.put(&self.key(&["allocs", &a.node, &a.id]), encode(a)?, None).await.map_err(kv_err)?;
        }
        for r in &plan.runs {
            self.kv.put(&self.key(&["runs", &r.node, &r.spec.id]), encode(r)?, None).await.map_err(kv_err)?;
        }
        for (node, id) in &plan.deletes {
            self.kv.delete(&self.key(&["allocs", node, id])).await.map_err(kv_err)?;
        }
        Ok(plan.puts.len() + plan.deletes.len() + plan.new_volumes.len() + plan.runs.len())
    }

    /// One step of `deployment` for `job`/`group`: reads the group's allocations, asks
    /// the deployment what to do, places new allocations with the placement engine and
    /// marks stopped ones `Stopping` (their agents deregister, drain and stop them), and
    /// commits optimistically. On a conflict it re-reads and steps again (steps are
    /// idempotent); the deployment only moves on once a step is committed.
    pub async fn advance(&self, deployment: &mut Deployment, job: &str, group: &str, now_ms: u64) -> Result<Vec<Action>> {
        for _ in 0..5 {
            let view = self.view().await?;
            let lost = view.lost_nodes();
            let mine: Vec<&AllocRecord> =
                view.allocations.iter().filter(|a| a.job == job && a.group == group && !lost.contains(&a.node)).collect();
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
            let mut plan = view.plan();
            for action in &actions {
                match action {
                    Action::Start { version, count } => {
                        let spec = self.group_version(job, group, *version).await?;
                        let desired = [DesiredGroup { count: *count, ..spec.desired }];
                        place(&view, &desired, &[(0, *count)], &lost, &mut plan)?;
                    }
                    Action::Stop { ids } => {
                        for a in mine.iter().filter(|a| ids.contains(&a.id)) {
                            plan.put(AllocRecord { status: AllocStatus::Stopping, since_ms: now_ms, ..(*a).clone() });
                        }
                    }
                }
            }
            match self.commit(&plan).await {
                Ok(_) => {
                    // Traffic follows the deployment (a blue/green switch, or its rollback).
                    if self.traffic(job, group).await? != trial.traffic() {
                        self.set_traffic(job, group, trial.traffic()).await?;
                    }
                    *deployment = trial;
                    return Ok(actions);
                }
                Err(Error::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict { kind: "plan", name: format!("deployment of {job}/{group} (5 attempts)") })
    }

    /// One pass of node-loss handling for `desired`: allocations on lost nodes are
    /// removed and replacements placed by the placement engine on live nodes, committed
    /// optimistically (re-planned up to 5 times when another plan wins).
    pub async fn reschedule(&self, desired: &[DesiredGroup]) -> Result<ReschedulePass> {
        let mut pass = ReschedulePass::default();
        for _ in 0..5 {
            let view = self.view().await?;
            let lost = view.lost_nodes();
            let r = reconcile(desired, &view.allocations, &lost);
            let mut plan = view.plan();
            for a in view.allocations.iter().filter(|a| r.lost.contains(&a.id)) {
                plan.delete(&a.node, &a.id);
            }
            // Failed and surplus allocations of these groups stop (their agents stop,
            // remove and forget them); other groups' allocations are not ours to touch.
            let ours = |a: &AllocRecord| desired.iter().any(|d| d.job == a.job && d.group == a.group);
            let stopping: Vec<&AllocRecord> = view.allocations.iter().filter(|a| r.stop.contains(&a.id) && ours(a)).collect();
            for a in &stopping {
                plan.put(AllocRecord { status: AllocStatus::Stopping, since_ms: wall_clock_ms(), ..(*a).clone() });
            }
            let placed = place(&view, desired, &r.place, &lost, &mut plan)?;
            match self.commit(&plan).await {
                Ok(_) => {
                    pass.lost = r.lost;
                    pass.placed = placed;
                    pass.stopped = stopping.iter().map(|a| a.id.clone()).collect();
                    return Ok(pass);
                }
                Err(Error::Conflict { .. }) => pass.replans += 1,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict { kind: "plan", name: "reschedule (5 attempts)".into() })
    }
}

/// Places `wanted` new allocations with the placement engine on the live nodes, given the
/// allocations already there and where volumes live; adds them (and the homes of volumes
/// they create) to `plan`.
fn place(
    view: &ClusterView,
    desired: &[DesiredGroup],
    wanted: &[(usize, u32)],
    lost: &HashSet<String>,
    plan: &mut PlanCommit,
) -> Result<Vec<AllocRecord>> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let resources_of =
        |job: &str, group: &str| desired.iter().find(|d| d.job == job && d.group == group).map(|d| d.resources).unwrap_or_default();
    let mut snapshot = ClusterSnapshot { nodes: view.nodes.clone(), volumes: view.volumes.clone(), ..ClusterSnapshot::default() };
    snapshot.allocations = view
        .allocations
        .iter()
        .filter(|a| !lost.contains(&a.node) && a.status != AllocStatus::Failed)
        .map(|a| Allocation {
            ports: a.ports.iter().copied().collect(),
            volumes: a.volumes.clone(),
            ..Allocation::new(a.id.clone(), a.node.clone(), a.job.clone(), a.group.clone(), resources_of(&a.job, &a.group))
        })
        .collect();
    let engine = PlacementEngine::new();
    let mut out = Vec::new();
    for (i, n) in wanted {
        let d = &desired[*i];
        let mut placements = Vec::new();
        for volumes in volume_batches(view, d, *n, lost) {
            let count = if d.volumes.iter().any(|v| v.per_task) { 1 } else { *n };
            let mut group = TaskGroup::new(d.group.clone(), count, d.resources).with_dynamic_ports(d.ports);
            for v in volumes {
                group = group.with_volume(v);
            }
            let placed = engine.plan(&snapshot, &Job::new(d.job.clone(), vec![group]))?;
            for u in &placed.unplaced {
                // Left for the next pass (a node may join, a volume's node may come back).
                tracing::warn!(job = %d.job, group = %d.group, unplaced = ?u, "allocation not placed");
            }
            // Placed one batch at a time, so the next sees this one's ports and writers.
            for p in &placed.placements {
                snapshot.allocations.push(Allocation {
                    ports: p.ports.iter().copied().collect(),
                    volumes: p.volumes.clone(),
                    ..Allocation::new(
                        format!("pending-{}", snapshot.allocations.len()),
                        p.node.clone(),
                        d.job.clone(),
                        d.group.clone(),
                        d.resources,
                    )
                });
            }
            placements.extend(placed.placements);
        }
        for p in placements {
            let id = format!("{}-{}-v{}-{}", d.job, d.group, d.version, unique_suffix());
            for (m, req) in p.volumes.iter().zip(&d.volumes) {
                if !snapshot.volumes.iter().any(|v| v.name == m.name) {
                    let home = HostVolume { name: m.name.clone(), node: p.node.clone(), access: req.access };
                    snapshot.volumes.push(home.clone());
                    plan.new_volume(home);
                }
            }
            out.push(AllocRecord {
                id,
                job: d.job.clone(),
                group: d.group.clone(),
                version: d.version,
                node: p.node,
                status: AllocStatus::Pending,
                ports: p.ports,
                since_ms: wall_clock_ms(),
                volumes: p.volumes,
            });
        }
    }
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
fn volume_batches(view: &ClusterView, d: &DesiredGroup, n: u32, lost: &HashSet<String>) -> Vec<Vec<crate::model::VolumeRequest>> {
    let Some(first) = d.volumes.iter().position(|v| v.per_task) else { return vec![d.volumes.clone()] };
    let prefix = format!("{}-", d.volumes[first].name);
    let mut taken: HashSet<u32> = view
        .allocations
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
