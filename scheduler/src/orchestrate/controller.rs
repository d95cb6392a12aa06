//! The cluster controller: the loop that keeps every submitted group at its count and
//! moves deployments forward, so a platform needs no hand-driven `advance` or
//! `reschedule` calls.
//!
//! Per group the store keeps a [`GroupState`] under `desired/<job>/<group>`: the stable
//! version, the count, and the deployment under way. [`ClusterStore::deploy`] records a
//! new version (the first one runs at once; later ones start a [`Deployment`] from the
//! stable version under the strategy given, stop-first if the group writes a
//! single-writer volume). Each [`Controller::tick`]:
//! - advances each deployment under way, and when it ends records the version that is
//!   now stable (the new one, or the old one after a rollback);
//! - reschedules the groups not deploying: allocations of lost nodes are replaced, failed
//!   and surplus ones stopped, missing ones placed.
//!
//! Ticks run under the controller lock (`<root>/locks/controller`), so any number of
//! controllers (one per node agent, say) may run: one leads at a time, the others wait
//! for the lock. The leader keeps its lock alive between ticks ([`LockGuard`]), and every
//! write it makes carries the lock as a fence: a leader paused past the lock's TTL wakes
//! up to find its writes refused ([`Error::LockLost`]) and its lock reported lost, and
//! steps down ([`Controller::lead`] returns). Plans also commit optimistically, so a
//! stale view never writes either.

use std::time::Duration;

use keelson_discovery::{Compare, LockGuard, Txn};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::orchestrate::cluster_cache::ClusterCache;
use crate::orchestrate::cluster_store::{decode, encode_over, kv_err, wall_clock_ms, ClusterStore};
use crate::orchestrate::deployment::{Deployment, Phase};
use crate::orchestrate::metrics::OrchestrationMetrics;
use crate::orchestrate::reconcile::DesiredGroup;
use crate::orchestrate::spec::GroupSpec;
use crate::orchestrate::strategy::{Gates, Strategy};
use crate::records::Origin;

/// What the controller keeps for one task group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    /// Job id.
    pub job: String,
    /// Group name.
    pub group: String,
    /// The version that runs when no deployment is under way.
    pub stable: u64,
    /// Allocations wanted.
    pub count: u32,
    /// The deployment under way, if any.
    pub deployment: Option<Deployment>,
    /// How the last deployment ended (`Succeeded`, `RolledBack`, `Failed`).
    pub last_outcome: Option<Phase>,
    /// The deployments that ended, oldest first (the last [`HISTORY_KEPT`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<DeploymentRecord>,
}

/// How many ended deployments a group remembers.
pub const HISTORY_KEPT: usize = 10;

/// A deployment that ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// The version it moved from.
    pub from: Option<u64>,
    /// The version it moved to.
    pub to: u64,
    /// How it ended.
    pub outcome: Phase,
    /// When it ended, in milliseconds since the Unix epoch.
    pub ended_ms: u64,
}

/// What one [`Controller::tick`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Whether this controller held the lock (otherwise it did nothing).
    pub acted: bool,
    /// Groups whose deployment ended in this tick, with how.
    pub deployments_ended: Vec<(String, String, Phase)>,
    /// Allocations replaced because their node was lost.
    pub lost: Vec<String>,
    /// New allocations placed by rescheduling.
    pub placed: usize,
}

impl ClusterStore {
    fn group_state_key(&self, job: &str, group: &str) -> String {
        self.key(&["desired", job, group])
    }

    /// The controller's record of a group.
    pub async fn group_state(&self, job: &str, group: &str) -> Result<Option<GroupState>> {
        let key = self.group_state_key(job, group);
        self.kv.get(&key).await.map_err(kv_err)?.map(|e| decode(&key, &e.value)).transpose()
    }

    pub(crate) async fn group_state_versioned(&self, job: &str, group: &str) -> Result<Option<(GroupState, Origin)>> {
        let key = self.group_state_key(job, group);
        match self.kv.get(&key).await.map_err(kv_err)? {
            Some(e) => Ok(Some((decode(&key, &e.value)?, Origin::of(&e)))),
            None => Ok(None),
        }
    }

    /// Writes `state` over the record it was read from (`None`: a new one), if that is
    /// still what is stored; fields this version does not know are kept.
    pub(crate) async fn save_group_state(&self, state: &GroupState, origin: Option<&Origin>) -> Result<()> {
        let key = self.group_state_key(&state.job, &state.group);
        let value = encode_over(Origin::bytes(origin), state)?;
        let txn = Txn::new().when(Compare::key(&key, Origin::expect(origin))).put(&key, value, None);
        self.write(txn).await.map_err(|e| match e {
            Error::Stale { .. } => Error::Stale { kind: "group state", name: format!("{}/{}", state.job, state.group) },
            other => other,
        })?;
        Ok(())
    }

    /// Submits `spec` for the controller to run. The first version of a group runs at
    /// once; a later one starts a deployment from the stable version with `strategy` and
    /// `gates` (made stop-first if the group writes a single-writer volume).
    /// [`Error::Conflict`] while another deployment of the group is under way;
    /// [`Error::InvalidInput`] if the version is the stable one.
    pub async fn deploy(&self, spec: &GroupSpec, strategy: Strategy, gates: Gates) -> Result<GroupState> {
        let d = &spec.desired;
        strategy.validate()?;
        gates.validate()?;
        // A refused deploy stores nothing: its version never enters the group's timeline.
        let (state, origin) = match self.group_state_versioned(&d.job, &d.group).await? {
            None => (
                GroupState {
                    job: d.job.clone(),
                    group: d.group.clone(),
                    stable: d.version,
                    count: d.count,
                    deployment: None,
                    last_outcome: None,
                    history: Vec::new(),
                },
                None,
            ),
            Some((current, _)) if current.deployment.is_some() => {
                return Err(Error::Conflict {
                    kind: "group",
                    name: format!("{}/{}", d.job, d.group),
                    reason: "a deployment is under way".into(),
                });
            }
            Some((mut current, origin)) => {
                let deployment =
                    Deployment::new(Some(current.stable), d.version, d.count, strategy, gates, d.single_writer(), wall_clock_ms())?;
                if let Some(why) = deployment.adjusted() {
                    tracing::info!(job = %d.job, group = %d.group, %why, "strategy adjusted");
                }
                current.count = d.count;
                current.deployment = Some(deployment);
                (current, Some(origin))
            }
        };
        self.put_group(spec).await?;
        self.save_group_state(&state, origin.as_ref()).await?;
        Ok(state)
    }

    /// Changes the deployment under way of a group (promote its canaries, roll it back).
    async fn with_deployment(&self, job: &str, group: &str, change: impl FnOnce(&mut Deployment) -> Result<()>) -> Result<()> {
        self.with_group_state(job, group, |state| {
            let deployment =
                state.deployment.as_mut().ok_or_else(|| Error::NotFound { kind: "deployment of", name: format!("{job}/{group}") })?;
            change(deployment)
        })
        .await
    }

    /// Changes a group's record over the version read ([`Error::NotFound`] without one;
    /// [`Error::Stale`] if the controller wrote it meanwhile).
    pub(crate) async fn with_group_state(&self, job: &str, group: &str, change: impl FnOnce(&mut GroupState) -> Result<()>) -> Result<()> {
        let (mut state, origin) = self
            .group_state_versioned(job, group)
            .await?
            .ok_or_else(|| Error::NotFound { kind: "group", name: format!("{job}/{group}") })?;
        change(&mut state)?;
        self.save_group_state(&state, Some(&origin)).await
    }

    /// Promotes the canaries of a group's deployment.
    pub async fn promote(&self, job: &str, group: &str) -> Result<()> {
        self.with_deployment(job, group, Deployment::promote).await
    }

    /// Rolls a group's deployment back to its stable version (inside a blue/green
    /// window, traffic returns at once).
    pub async fn rollback(&self, job: &str, group: &str, reason: &str) -> Result<()> {
        self.with_deployment(job, group, |d| d.rollback(reason)).await
    }

    pub(crate) async fn all_group_states(&self) -> Result<Vec<(GroupState, Origin)>> {
        let list = self.kv.list(&self.key(&["desired", ""])).await.map_err(kv_err)?;
        list.entries.iter().map(|e| Ok((decode(&e.key, &e.value)?, Origin::of(e)))).collect()
    }
}

/// How a spell of leadership ended ([`Controller::lead`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leadership {
    /// The lock was lost (expired while this process was paused, revoked, or a write
    /// was fenced off): this controller stepped down.
    Lost,
    /// The stop future completed; the lock was released.
    Stopped,
}

/// Default TTL of the controller lock: a leader that stops renewing it (dead, paused,
/// partitioned) is replaced after this long.
pub const CONTROLLER_LOCK_TTL: Duration = Duration::from_secs(10);

/// Runs the control loop over a [`ClusterStore`].
#[derive(Clone, Debug)]
pub struct Controller {
    store: ClusterStore,
    metrics: OrchestrationMetrics,
    lock_ttl: Duration,
}

impl Controller {
    /// A controller for `store`, with a lock TTL of [`CONTROLLER_LOCK_TTL`].
    pub fn new(store: ClusterStore) -> Self {
        Controller { store, metrics: OrchestrationMetrics::default(), lock_ttl: CONTROLLER_LOCK_TTL }
    }

    /// Sets the controller lock's TTL: how long a dead or paused leader keeps others
    /// waiting (renewed at a third of it while the leader is alive).
    pub fn with_lock_ttl(mut self, ttl: Duration) -> Self {
        self.lock_ttl = ttl;
        self
    }

    async fn acquire(&self, wait: Duration) -> Result<Option<LockGuard>> {
        let key = self.store.lock_key("controller");
        match LockGuard::acquire(self.store.kv.clone(), &key, self.lock_ttl, wait).await {
            Ok(guard) => Ok(Some(guard)),
            Err(keelson_discovery::Error::Timeout { .. } | keelson_discovery::Error::VersionMismatch { .. }) => Ok(None),
            Err(e) => Err(kv_err(e)),
        }
    }

    /// Counts into `metrics` (share one with the node agent; register it once).
    pub fn with_metrics(mut self, metrics: OrchestrationMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// One pass (see the module docs) under the lock, taken and released around it.
    /// Returns with `acted: false` if another controller holds the lock.
    pub async fn tick(&self) -> Result<TickReport> {
        let Some(guard) = self.acquire(Duration::from_millis(50)).await? else { return Ok(TickReport::default()) };
        let result = self.tick_as(&self.store.fenced(&guard), None).await;
        if let Err(e) = guard.release().await {
            tracing::warn!(error = %e, "releasing the controller lock (it expires with its lease)");
        }
        result
    }

    async fn tick_as(&self, store: &ClusterStore, cache: Option<&ClusterCache>) -> Result<TickReport> {
        let result = self.tick_locked(store, cache).await;
        match &result {
            Ok(r) => {
                self.metrics.ticks.inc();
                for (_, _, phase) in &r.deployments_ended {
                    self.metrics.deployments_ended.get_or_create(&OrchestrationMetrics::outcome(phase)).inc();
                }
                self.metrics.lost.inc_by(r.lost.len() as u64);
                self.metrics.placed.inc_by(r.placed as u64);
            }
            Err(_) => {
                self.metrics.tick_errors.inc();
            }
        }
        result
    }

    /// Leads once: waits for the controller lock (until `stop`), then ticks every
    /// `interval` while it holds it. Returns [`Leadership::Lost`] as soon as the lock is
    /// lost or a write is fenced off (nothing more is written), [`Leadership::Stopped`]
    /// when `stop` completes (the lock is released).
    pub async fn lead(&self, interval: Duration, stop: impl std::future::Future<Output = ()>) -> Leadership {
        tokio::pin!(stop);
        let mut pauses = keelson_base::retry_pauses(interval, interval * 10);
        let guard = loop {
            tokio::select! {
                () = &mut stop => return Leadership::Stopped,
                taken = self.acquire(interval.max(Duration::from_millis(100))) => match taken {
                    Ok(Some(guard)) => break guard,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "taking the controller lock failed; retrying");
                        tokio::time::sleep(pauses.next().unwrap_or(interval)).await;
                    }
                },
            }
        };
        tracing::info!(lock = guard.key(), revision = guard.revision(), "leading the cluster controller");
        self.metrics.leader.set(1);
        let store = self.store.fenced(&guard);
        // A leader plans from its own copy of the cluster, kept by a watch: a tick then
        // costs what the groups it plans hold, not what the cluster holds. Without one
        // (the listing failed), it reads the store whole each tick.
        let cache = match ClusterCache::start(&self.store).await {
            Ok(cache) => Some(cache),
            Err(e) => {
                tracing::warn!(error = %e, "listing the cluster for the controller's cache failed; reading it whole each tick");
                None
            }
        };
        let outcome = loop {
            // A tick is not cut short when the lock is lost: every write in it is fenced,
            // so what it sends after the loss fails, and the loss is seen right after.
            match self.tick_as(&store, cache.as_ref()).await {
                Ok(r) if !r.deployments_ended.is_empty() || !r.lost.is_empty() => tracing::info!(?r, "controller tick"),
                Ok(_) => {}
                Err(Error::LockLost { .. }) => break Leadership::Lost,
                Err(e) => tracing::warn!(error = %e, "controller tick failed; retrying"),
            }
            if !guard.is_held() {
                break Leadership::Lost;
            }
            tokio::select! {
                biased;
                () = guard.lost() => break Leadership::Lost,
                () = &mut stop => break Leadership::Stopped,
                () = tokio::time::sleep(interval) => {}
            }
        };
        self.metrics.leader.set(0);
        match outcome {
            Leadership::Lost => {
                self.metrics.leadership_lost.inc();
                tracing::warn!(lock = guard.key(), "lost the controller lock; stepping down");
                drop(guard);
            }
            Leadership::Stopped => {
                if let Err(e) = guard.release().await {
                    tracing::warn!(error = %e, "releasing the controller lock (it expires with its lease)");
                }
            }
        }
        outcome
    }

    async fn tick_locked(&self, store: &ClusterStore, cache: Option<&ClusterCache>) -> Result<TickReport> {
        let mut report = TickReport { acted: true, ..TickReport::default() };
        // A plan whose committer died half-way is finished first, so this tick plans on it.
        let collected = store.collect_garbage().await?;
        if collected > 0 {
            tracing::info!(keys = collected, "deleted chunks of plans that were never published");
        }
        let mut steady = Vec::new();
        for (mut state, origin) in store.all_group_states().await? {
            let Some(mut deployment) = state.deployment.take() else {
                let spec = store.group_version(&state.job, &state.group, state.stable).await?;
                steady.push(DesiredGroup { count: state.count, ..spec.desired });
                continue;
            };
            match cache {
                Some(cache) => store.advance_with(cache, &mut deployment, &state.job, &state.group, wall_clock_ms()).await?,
                None => store.advance(&mut deployment, &state.job, &state.group, wall_clock_ms()).await?,
            };
            if deployment.phase().is_terminal() {
                let phase = deployment.phase().clone();
                tracing::info!(job = %state.job, group = %state.group, ?phase, "deployment ended");
                state.stable = deployment.stable_version().unwrap_or(state.stable);
                state.last_outcome = Some(phase.clone());
                state.history.push(DeploymentRecord {
                    from: deployment.from_version(),
                    to: deployment.to_version(),
                    outcome: phase.clone(),
                    ended_ms: wall_clock_ms(),
                });
                let excess = state.history.len().saturating_sub(HISTORY_KEPT);
                state.history.drain(..excess);
                report.deployments_ended.push((state.job.clone(), state.group.clone(), phase));
            } else {
                state.deployment = Some(deployment);
            }
            // A promote or rollback saved meanwhile wins: this step is re-derived next tick.
            match store.save_group_state(&state, Some(&origin)).await {
                Ok(()) | Err(Error::Stale { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        // Work on draining nodes stops first; the pass below places it elsewhere.
        let drained = store.drain_pass(cache, &steady).await?;
        if drained > 0 {
            tracing::info!(allocations = drained, "draining nodes");
        }
        let pass = match cache {
            Some(cache) => store.reschedule_with(cache, &steady).await?,
            None => store.reschedule(&steady).await?,
        };
        report.lost = pass.lost;
        report.placed = pass.placed.len();
        Ok(report)
    }

    /// Leads whenever it can, every `interval`, until `stop` completes: a controller that
    /// lost its lock campaigns again. Errors are logged and retried (etcd away for a while
    /// is not a reason to stop).
    pub async fn run(&self, interval: Duration, stop: impl std::future::Future<Output = ()>) {
        let stop = futures::FutureExt::shared(Box::pin(stop));
        while self.lead(interval, stop.clone()).await == Leadership::Lost {}
    }
}
