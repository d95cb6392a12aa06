//! Plans over the cluster store: deployment steps and reschedule passes read the
//! cluster (a fresh [`ClusterView`] or a watch-fed [`ClusterCache`]), ask the store's
//! [`Scheduler`] where new allocations go, and commit optimistically, planning again after
//! a lost race.

use std::collections::HashSet;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::orchestrate::cluster_cache::ClusterCache;
use crate::orchestrate::cluster_store::{kv_err, wall_clock_ms, ClusterStore, ClusterView, PlanCommit};
use crate::orchestrate::deployment::{Action, AllocHealth, AllocView, Deployment};
use crate::orchestrate::operations::task_group;
use crate::orchestrate::reconcile::{placement_allocation, reconcile, AllocRecord, AllocStatus, DesiredGroup};
use crate::placement::model::{Allocation, ClusterSnapshot, HostVolume, Job};
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
    /// from. From a cache, also seals the plan: the cache must still be at the head the
    /// plan was read at ([`Error::Stale`] otherwise), and the plan takes the fences of
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
            (Source::Cache(cache), _) => cache.place_and_seal(plan, desired, |state, plan| {
                place(self.scheduler().as_ref(), state, &existing, desired, wanted, &input.lost, plan)
            }),
            (Source::Store, Some(view)) if !wanted.is_empty() => {
                let mut state = view.placement_state(desired, &input.lost)?;
                place(self.scheduler().as_ref(), &mut state, &existing, desired, wanted, &input.lost, plan)
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

/// Places `wanted` new allocations of `desired` with `scheduler` in `state` (the
/// live nodes and what they hold), given the groups' current allocations `existing`; adds
/// them, and the homes of volumes they create, to `plan`. `state` is left as it was.
pub(crate) fn place(
    scheduler: &dyn Scheduler,
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
                let group = task_group(d, count, &volumes);
                let placed = scheduler.place_in(state, &Job::new(d.job.clone(), vec![group]))?;
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
                        restarts: 0,
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
fn volume_batches(
    existing: &[&AllocRecord],
    d: &DesiredGroup,
    n: u32,
    lost: &HashSet<String>,
) -> Vec<Vec<crate::placement::model::VolumeRequest>> {
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
                        crate::placement::model::VolumeRequest { name: v.volume_for(index), per_task: false, ..v.clone() }
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
