//! Plans over the cluster store: deployment steps and reschedule passes read the
//! cluster (a fresh [`ClusterView`] or a watch-fed [`ClusterCache`]), ask the store's
//! [`Scheduler`] where new allocations go, and commit optimistically, planning again after
//! a lost race.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::orchestrate::cluster_cache::ClusterCache;
use crate::orchestrate::cluster_store::{kv_err, wall_clock_ms, ClusterStore, ClusterView, PlanCommit, SlotHome};
use crate::orchestrate::deployment::{len32, Action, AllocHealth, AllocView, Deployment};
use crate::orchestrate::operations::task_group;
use crate::orchestrate::reconcile::{placement_allocation, reconcile, AllocRecord, AllocStatus, DesiredGroup};
use crate::placement::model::{Allocation, ClusterSnapshot, Constraint, ConstraintOp, HostVolume, Job, VolumeRequest};
use crate::placement::scheduler::Scheduler;
use crate::placement::state::ClusterState;

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
    /// One step of `deployment` for `job`/`group`: reads the group's allocations, asks
    /// the deployment what to do, places new allocations with the store's scheduler and
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
        let mut pauses = keelson_base::retry_pauses(REPLAN_PAUSE, REPLAN_PAUSE * 20);
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
                        let homes = [self.slot_homes(job, group).await?];
                        self.place_in(source, &input, &desired, &[(0, *count)], &homes, &mut plan)?;
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
            let committed = match self.place_in(source, &input, &[], &[], &[], &mut plan) {
                Ok(_) => self.commit_from(source, &plan).await,
                Err(e) => Err(e),
            };
            match committed {
                Ok(()) => {
                    *deployment = trial;
                    return Ok(actions);
                }
                Err(Error::Stale { .. }) => floor = self.head_revision().await?,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Stale { kind: "plan", name: format!("deployment of {job}/{group} ({PLAN_ATTEMPTS} attempts)") })
    }

    /// One pass of node-loss handling for `desired`: allocations on lost nodes are
    /// removed and replacements placed by the store's scheduler on live nodes, committed
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
        let mut pauses = keelson_base::retry_pauses(REPLAN_PAUSE, REPLAN_PAUSE * 20);
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
            let mut homes = vec![HashMap::new(); desired.len()];
            for (i, _) in &r.place {
                homes[*i] = self.slot_homes(&desired[*i].job, &desired[*i].group).await?;
            }
            let committed = match self.place_in(source, &input, desired, &r.place, &homes, &mut plan) {
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
                Err(Error::Stale { .. }) => {
                    pass.replans += 1;
                    floor = self.head_revision().await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Stale { kind: "plan", name: format!("reschedule ({PLAN_ATTEMPTS} attempts)") })
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
                if cache.root() != self.root() {
                    return Err(Error::invalid("cluster cache", cache.root(), format!("follows another store than {}", self.root())));
                }
                cache.catch_up(floor).await?;
                let (allocs, lost, plan) = cache.plan_input(groups)?;
                Ok(PlanInput { allocs, lost, plan, view: None })
            }
        }
    }

    /// Places `wanted` allocations of `desired` into `plan`, in the state `input` came
    /// from, `homes[i]` holding where the slots of `desired[i]` last ran. From a cache,
    /// also seals the plan: the cache must still be at the head the plan was read at
    /// ([`Error::Stale`] otherwise), and the plan takes the fences of the nodes it touches
    /// from it.
    fn place_in(
        &self,
        source: Source<'_>,
        input: &PlanInput,
        desired: &[DesiredGroup],
        wanted: &[(usize, u32)],
        homes: &[HashMap<u32, SlotHome>],
        plan: &mut PlanCommit,
    ) -> Result<Vec<AllocRecord>> {
        let existing: Vec<&AllocRecord> = input.allocs.iter().collect();
        let ask = Placing { desired, wanted, homes, existing: &existing, lost: &input.lost };
        match (source, &input.view) {
            (Source::Cache(cache), _) => {
                cache.place_and_seal(plan, desired, |state, plan| place(self.scheduler().as_ref(), state, &ask, plan))
            }
            (Source::Store, Some(view)) if !wanted.is_empty() => {
                let mut state = view.placement_state(desired, &input.lost)?;
                place(self.scheduler().as_ref(), &mut state, &ask, plan)
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

/// What [`place`] is asked to place.
pub(crate) struct Placing<'a> {
    /// The groups.
    pub(crate) desired: &'a [DesiredGroup],
    /// How many new allocations of which group (an index into `desired`).
    pub(crate) wanted: &'a [(usize, u32)],
    /// Where each group's slots last ran (parallel to `desired`; shorter is fine).
    pub(crate) homes: &'a [HashMap<u32, SlotHome>],
    /// The groups' current allocations.
    pub(crate) existing: &'a [&'a AllocRecord],
    /// Lost nodes.
    pub(crate) lost: &'a HashSet<String>,
}

/// Places `ask.wanted` new allocations with `scheduler` in `state` (the live nodes and
/// what they hold); adds them, and the homes of volumes they create, to `plan`. Each
/// takes a free slot of its group; a slot that last ran on a node goes back there if it
/// fits (and asks for the address it had), elsewhere if not. `state` is left as it was.
pub(crate) fn place(
    scheduler: &dyn Scheduler,
    state: &mut ClusterState,
    ask: &Placing<'_>,
    plan: &mut PlanCommit,
) -> Result<Vec<AllocRecord>> {
    if ask.wanted.is_empty() {
        return Ok(Vec::new());
    }
    let no_homes = HashMap::new();
    let mut out = Vec::new();
    let mut homed: HashSet<String> = HashSet::new();
    // Batches are placed one after another in a trial of the state, so each sees the
    // ports, resources and volume writers of the ones before; the trial is undone at the
    // end: the allocations come back to the state once committed.
    state.trial(|state| -> Result<()> {
        for (i, n) in ask.wanted {
            let d = &ask.desired[*i];
            let homes = ask.homes.get(*i).unwrap_or(&no_homes);
            for batch in slot_batches(ask.existing, d, *n, ask.lost, homes) {
                let fresh: HashSet<String> =
                    batch.volumes.iter().filter(|v| !state.volumes.contains_key(&v.name)).map(|v| v.name.clone()).collect();
                let group = task_group(d, len32(&batch.slots), &batch.volumes);
                let mut at_home = None;
                if let Some(home) = batch.home.filter(|h| !ask.lost.contains(&h.node)) {
                    // The slot's node first, as a hard constraint (affinities score node
                    // classes, and one node is not a class); elsewhere if it does not fit.
                    let mut pinned = group.clone();
                    pinned.constraints.push(Constraint { target: "node.id".into(), op: ConstraintOp::Equal, value: home.node.clone() });
                    let placed = scheduler.place_in(state, &Job::new(d.job.clone(), vec![pinned]))?;
                    if placed.unplaced.is_empty() {
                        at_home = Some((placed, home));
                    } else {
                        tracing::info!(job = %d.job, group = %d.group, slot = ?batch.slots, node = %home.node, "slot's node has no room; placed elsewhere");
                    }
                }
                let (placed, home) = match at_home {
                    Some((placed, home)) => (placed, Some(home)),
                    None => (scheduler.place_in(state, &Job::new(d.job.clone(), vec![group]))?, None),
                };
                for u in &placed.unplaced {
                    // Left for the next pass (a node may join, a volume's node may come back).
                    tracing::warn!(job = %d.job, group = %d.group, unplaced = ?u, "allocation not placed");
                }
                for (p, slot) in placed.placements.into_iter().zip(&batch.slots) {
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
                        prefer_address: home.and_then(|h| h.address),
                        node: p.node,
                        status: AllocStatus::Pending,
                        ports: p.ports,
                        since_ms: wall_clock_ms(),
                        volumes: p.volumes,
                        resources: d.resources,
                        restarts: 0,
                        slot: Some(*slot),
                        address: None,
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

/// A placement batch: the slots it fills, in order, its volume requests, and, for a
/// batch of one slot that ran before, where it ran.
struct SlotBatch<'h> {
    slots: Vec<u32>,
    volumes: Vec<VolumeRequest>,
    home: Option<&'h SlotHome>,
}

/// The batches for `n` new allocations of `d`, each taking a slot no live allocation of
/// the group holds (stopping ones free theirs): first the slots that ran before, the one
/// left most recently first (the slot a stop-first update just stopped: its replacement
/// goes back to its node and address), then the lowest free ones. A slot that ran
/// before is a batch of its own, to go back to its node; the rest are one batch.
///
/// With per-task volumes the slot is the volume's index: always the lowest free one,
/// each a batch of its own, its per-task requests turned into that slot's volume
/// (`data-2`), so a replacement mounts the volume of the task it replaces and placement
/// pins it to that volume's node (a single writer is not placed beside a stopping one:
/// its volume stays busy until it is gone).
fn slot_batches<'h>(
    existing: &[&AllocRecord],
    d: &DesiredGroup,
    n: u32,
    lost: &HashSet<String>,
    homes: &'h HashMap<u32, SlotHome>,
) -> Vec<SlotBatch<'h>> {
    let per_task = d.volumes.iter().position(|v| v.per_task);
    let volume_prefix = per_task.map(|first| (first, format!("{}-", d.volumes[first].name)));
    let mut taken: HashSet<u32> = existing
        .iter()
        .filter(|a| a.job == d.job && a.group == d.group && !lost.contains(&a.node))
        .filter(|a| !matches!(a.status, AllocStatus::Failed | AllocStatus::Stopping))
        .filter_map(|a| {
            // Records from before slots were kept hold the index of their volume.
            a.slot.or_else(|| {
                let (first, prefix) = volume_prefix.as_ref()?;
                a.volumes.get(*first)?.name.strip_prefix(prefix.as_str())?.parse().ok()
            })
        })
        .collect();
    let mut chosen: Vec<u32> = Vec::with_capacity(n as usize);
    if per_task.is_none() {
        let mut returning: Vec<(&u32, &SlotHome)> = homes.iter().filter(|(s, _)| !taken.contains(s)).collect();
        returning.sort_by_key(|(s, h)| (std::cmp::Reverse(h.left_ms), **s));
        chosen.extend(returning.into_iter().take(n as usize).map(|(s, _)| *s));
        taken.extend(chosen.iter().copied());
    }
    let mut slot = 0u32;
    while chosen.len() < n as usize {
        if taken.insert(slot) {
            chosen.push(slot);
        }
        slot += 1;
    }
    let mut batches = Vec::new();
    let mut shared = SlotBatch { slots: Vec::new(), volumes: d.volumes.clone(), home: None };
    for slot in chosen {
        if per_task.is_some() {
            let volumes = d
                .volumes
                .iter()
                .map(|v| if v.per_task { VolumeRequest { name: v.volume_for(slot), per_task: false, ..v.clone() } } else { v.clone() })
                .collect();
            batches.push(SlotBatch { slots: vec![slot], volumes, home: homes.get(&slot) });
        } else if let Some(home) = homes.get(&slot) {
            batches.push(SlotBatch { slots: vec![slot], volumes: d.volumes.clone(), home: Some(home) });
        } else {
            shared.slots.push(slot);
        }
    }
    if !shared.slots.is_empty() {
        batches.push(shared);
    }
    batches
}

/// Plans made again after losing a race before giving up with a conflict.
const PLAN_ATTEMPTS: u32 = 10;

/// The first pause before planning again after a lost race (then doubling, with
/// jitter, so planners that collided do not collide again in lock step).
const REPLAN_PAUSE: Duration = Duration::from_millis(2);

/// A short id suffix unique within this process and unlikely across processes.
fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{:x}{:x}{n:x}", std::process::id(), nanos)
}
