//! A deployment of one task group from a stable version to a new one, as a pure state
//! machine: [`Deployment::step`] reads the allocations as they are and the time, and
//! returns what to start and stop. No I/O and no clock of its own, so every strategy and
//! every failure is unit-tested by replaying observations (see `tests/deployments.rs`).
//!
//! Rollback returns to the stable version directly: a canary or blue/green deployment
//! never touched the old set, so rolling back only stops the new allocations; a rolling
//! or recreate deployment replaces the new allocations with old ones under the same
//! limits. The canary phase is never re-run on the way back (nomad#10882).
//!
//! The caller's side: after an [`Action::Start`], report the new allocations (as
//! `Starting`) at the next step; after an [`Action::Stop`], report those allocations as
//! `Stopping` until they are gone. Steps are then idempotent: the same observations give
//! the same actions, so a restarted controller carries on from what it sees.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::orchestrate::strategy::{Gates, Strategy};

/// Milliseconds on the caller's clock (any fixed origin).
pub type Millis = u64;

/// A length as a count of allocations (saturating: a stored record can claim anything).
pub(crate) fn len32<T>(v: &[T]) -> u32 {
    u32::try_from(v.len()).unwrap_or(u32::MAX)
}

fn ms(d: Duration) -> Millis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Where an allocation is, as the node agents report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AllocHealth {
    /// Placed or starting, not yet passing its checks; placed at `since`.
    Starting {
        /// When it was placed.
        since: Millis,
    },
    /// Passing its checks since `since`.
    Healthy {
        /// When its checks started passing.
        since: Millis,
    },
    /// Failing its checks, or exited.
    Failed,
    /// Asked to stop and not gone yet: still holds its resources and volumes.
    Stopping,
}

/// One allocation of the task group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocView {
    /// Allocation id.
    pub id: String,
    /// The job version it runs.
    pub version: u64,
    /// Its health.
    pub health: AllocHealth,
}

impl AllocView {
    /// An allocation of `version` in state `health`.
    pub fn new(id: impl Into<String>, version: u64, health: AllocHealth) -> Self {
        AllocView { id: id.into(), version, health }
    }
}

/// What the deployment asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Place and start `count` new allocations of `version`.
    Start {
        /// The version to run.
        version: u64,
        /// How many.
        count: u32,
    },
    /// Stop these allocations (after their grace period) and remove them.
    Stop {
        /// Allocation ids.
        ids: Vec<String>,
    },
}

/// Which allocations should receive traffic (be registered with their route tags).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Traffic {
    /// Every healthy allocation, whatever its version.
    All,
    /// Only healthy allocations of this version (blue/green).
    Only(u64),
}

/// Where the deployment is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Canaries starting beside the old set.
    Canary,
    /// Canaries healthy; waiting for [`Deployment::promote`].
    AwaitingPromotion,
    /// Replacing old allocations with new ones (rolling, or after canary promotion).
    Rolling,
    /// Stopping the old set, then starting the new one.
    Recreating,
    /// Blue/green: the green set starting while blue takes the traffic.
    Green,
    /// Blue/green: traffic switched at `switched_at`; blue kept until the window ends.
    Verifying {
        /// When traffic moved to green.
        switched_at: Millis,
    },
    /// A gate failed or a rollback was asked for: returning to the stable version.
    RollingBack {
        /// Why.
        reason: String,
    },
    /// The new version runs everywhere.
    Succeeded,
    /// The stable version runs everywhere again.
    RolledBack {
        /// Why the deployment was rolled back.
        reason: String,
    },
    /// Stopped at a failed gate with nothing to return to (or rollback off, or the
    /// rollback itself failed).
    Failed {
        /// Why.
        reason: String,
    },
}

impl Phase {
    /// Whether the deployment is over.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Phase::Succeeded | Phase::RolledBack { .. } | Phase::Failed { .. })
    }
}

/// How a rollback proceeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Return {
    /// The old set is whole: stop the new allocations.
    StopNew,
    /// Replace new allocations with old ones under the strategy's limits.
    Redeploy,
}

/// One task group moving from `from` (its stable version, if any) to `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    from: Option<u64>,
    to: u64,
    count: u32,
    strategy: Strategy,
    gates: Gates,
    adjusted: Option<String>,
    phase: Phase,
    traffic: Traffic,
    ret: Return,
    /// Healthy target allocations at the last progress, and when that was.
    best: u32,
    last_progress: Millis,
}

/// Allocations sorted by what the deployment needs to know of them.
#[derive(Debug, Default)]
struct Census<'a> {
    /// Target version, live (starting or healthy).
    new_live: Vec<&'a AllocView>,
    /// Target version, healthy for at least the minimum healthy time.
    new_ready: u32,
    /// Target version failing, or not healthy by the deadline.
    new_failed: Vec<&'a AllocView>,
    /// Other versions, live; ready ones (healthy) separately.
    old_live: Vec<&'a AllocView>,
    old_ready: Vec<&'a AllocView>,
    /// Any version, failed (to clean up).
    failed: Vec<&'a AllocView>,
    /// Any version, stopping.
    stopping: u32,
}

impl<'a> Census<'a> {
    fn take(allocs: &'a [AllocView], target: u64, gates: &Gates, now: Millis) -> Census<'a> {
        let mut c = Census::default();
        for a in allocs {
            let new = a.version == target;
            match a.health {
                AllocHealth::Stopping => c.stopping += 1,
                AllocHealth::Failed => {
                    c.failed.push(a);
                    if new {
                        c.new_failed.push(a);
                    }
                }
                AllocHealth::Starting { since } if new => {
                    c.new_live.push(a);
                    if now.saturating_sub(since) > ms(gates.healthy_deadline) {
                        c.new_failed.push(a);
                    }
                }
                AllocHealth::Healthy { since } if new => {
                    c.new_live.push(a);
                    if now.saturating_sub(since) >= ms(gates.min_healthy_time) {
                        c.new_ready += 1;
                    }
                }
                AllocHealth::Starting { .. } => c.old_live.push(a),
                AllocHealth::Healthy { .. } => {
                    c.old_live.push(a);
                    c.old_ready.push(a);
                }
            }
        }
        c
    }
}

fn ids(allocs: &[&AllocView]) -> Vec<String> {
    allocs.iter().map(|a| a.id.clone()).collect()
}

impl Deployment {
    /// A deployment of `count` allocations from `from` to `to`, starting at `now`. With
    /// `single_writer` (the group mounts a single-writer volume), strategies that would
    /// run old and new at once become a stop-first rolling update
    /// ([`Deployment::adjusted`] says so).
    pub fn new(from: Option<u64>, to: u64, count: u32, strategy: Strategy, gates: Gates, single_writer: bool, now: Millis) -> Result<Self> {
        strategy.validate()?;
        gates.validate()?;
        if from == Some(to) {
            return Err(Error::invalid("version", to.to_string(), "the new version equals the stable one"));
        }
        let (strategy, adjusted) = if single_writer { strategy.for_single_writer() } else { (strategy, None) };
        let (phase, traffic) = match (&strategy, from) {
            (Strategy::Canary { .. }, Some(_)) => (Phase::Canary, Traffic::All),
            (Strategy::BlueGreen { .. }, Some(old)) => (Phase::Green, Traffic::Only(old)),
            (Strategy::Recreate, _) => (Phase::Recreating, Traffic::All),
            // A first deployment has nothing to protect: roll it out.
            _ => (Phase::Rolling, Traffic::All),
        };
        Ok(Deployment { from, to, count, strategy, gates, adjusted, phase, traffic, ret: Return::Redeploy, best: 0, last_progress: now })
    }

    /// The current phase.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The version it moves from (`None`: nothing ran before).
    pub fn from_version(&self) -> Option<u64> {
        self.from
    }

    /// The version it moves to.
    pub fn to_version(&self) -> u64 {
        self.to
    }

    /// Allocations wanted at the end.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The most allocations of the new version that were healthy at once so far (its
    /// progress, out of [`Deployment::count`]).
    pub fn healthy(&self) -> u32 {
        self.best
    }

    /// Which allocations should be in the routing catalog now.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// The strategy in force (after any single-writer adjustment).
    pub fn strategy(&self) -> &Strategy {
        &self.strategy
    }

    /// Why the strategy was changed from the one asked for, if it was.
    pub fn adjusted(&self) -> Option<&str> {
        self.adjusted.as_deref()
    }

    /// The version that is stable once the deployment is over: the new one if it
    /// succeeded, else the old one.
    pub fn stable_version(&self) -> Option<u64> {
        match self.phase {
            Phase::Succeeded => Some(self.to),
            _ => self.from,
        }
    }

    /// Promotes the canaries: the rolling phase starts at the next step.
    pub fn promote(&mut self) -> Result<()> {
        match self.phase {
            Phase::AwaitingPromotion => {
                self.phase = Phase::Rolling;
                Ok(())
            }
            Phase::Canary => Err(Error::invalid("promote", "canary", "the canaries have not passed their gates yet")),
            ref other => Err(Error::invalid("promote", format!("{other:?}"), "only a deployment awaiting promotion can be promoted")),
        }
    }

    /// Rolls back to the stable version by request (a blue/green switch inside its
    /// window, say). [`Error::InvalidInput`] when the deployment is over or there is no
    /// stable version.
    pub fn rollback(&mut self, reason: impl Into<String>) -> Result<()> {
        if self.phase.is_terminal() || matches!(self.phase, Phase::RollingBack { .. }) {
            return Err(Error::invalid("rollback", format!("{:?}", self.phase), "the deployment is already over or rolling back"));
        }
        if self.from.is_none() {
            return Err(Error::invalid("rollback", "first deployment", "there is no stable version to return to"));
        }
        self.begin_rollback(reason.into());
        Ok(())
    }

    fn begin_rollback(&mut self, reason: String) {
        self.ret = match self.phase {
            Phase::Canary | Phase::AwaitingPromotion | Phase::Green | Phase::Verifying { .. } => Return::StopNew,
            _ => Return::Redeploy,
        };
        if let Some(old) = self.from {
            if self.traffic != Traffic::All {
                self.traffic = Traffic::Only(old);
            }
        }
        self.phase = Phase::RollingBack { reason };
        self.best = 0;
    }

    /// A gate failed: roll back if allowed and possible, else stop here.
    fn gate_failed(&mut self, reason: String, now: Millis) {
        if self.gates.auto_rollback && self.from.is_some() {
            self.last_progress = now;
            self.begin_rollback(reason);
        } else {
            self.phase = Phase::Failed { reason };
        }
    }

    /// What to do now, given every allocation of the group and the time.
    pub fn step(&mut self, allocs: &[AllocView], now: Millis) -> Vec<Action> {
        if self.phase.is_terminal() {
            return Vec::new();
        }
        let rolling_back = matches!(self.phase, Phase::RollingBack { .. });
        let target = match (rolling_back, self.from) {
            (true, Some(old)) => old,
            _ => self.to,
        };
        let census = Census::take(allocs, target, &self.gates, now);
        if census.new_ready > self.best {
            self.best = census.new_ready;
            self.last_progress = now;
        }
        // Gates. Waiting for a person to promote, or inside the blue/green window, is not
        // a lack of progress.
        let waiting = matches!(self.phase, Phase::AwaitingPromotion | Phase::Verifying { .. });
        if waiting {
            self.last_progress = now;
        }
        let stalled = now.saturating_sub(self.last_progress) > ms(self.gates.progress_deadline);
        let returning_by_stopping = rolling_back && self.ret == Return::StopNew;
        if !returning_by_stopping && (!census.new_failed.is_empty() || stalled) {
            let reason = match census.new_failed.first() {
                Some(a) => format!("allocation {} of version {target} failed its health gate", a.id),
                None => format!("no progress for {:?}", self.gates.progress_deadline),
            };
            if rolling_back {
                self.phase = Phase::Failed { reason: format!("rollback to version {target}: {reason}") };
                return self.cleanup(&census);
            }
            self.gate_failed(reason, now);
            return self.step(allocs, now);
        }
        let mut actions = self.cleanup(&census);
        match self.phase.clone() {
            Phase::Canary => {
                let Strategy::Canary { canaries, auto_promote, .. } = self.strategy else { return self.inconsistent(&census) };
                let want = canaries.min(self.count);
                let live = len32(&census.new_live);
                if live < want {
                    actions.push(Action::Start { version: self.to, count: want - live });
                } else if census.new_ready >= want {
                    self.phase = if auto_promote { Phase::Rolling } else { Phase::AwaitingPromotion };
                    if auto_promote {
                        return self.step(allocs, now);
                    }
                }
            }
            Phase::AwaitingPromotion => {}
            Phase::Rolling => {
                let (surge, unavailable) = self.limits();
                actions.extend(self.roll(&census, target, surge, unavailable));
                if self.converged(&census) {
                    self.phase = Phase::Succeeded;
                }
            }
            Phase::Recreating => {
                actions.extend(self.recreate(&census, target));
                if self.converged(&census) {
                    self.phase = Phase::Succeeded;
                }
            }
            Phase::Green => {
                let live = len32(&census.new_live);
                if live < self.count {
                    actions.push(Action::Start { version: self.to, count: self.count - live });
                } else if census.new_ready >= self.count {
                    self.traffic = Traffic::Only(self.to);
                    self.phase = Phase::Verifying { switched_at: now };
                }
            }
            Phase::Verifying { switched_at } => {
                let Strategy::BlueGreen { rollback_window } = self.strategy else { return self.inconsistent(&census) };
                if now.saturating_sub(switched_at) >= ms(rollback_window) {
                    if !census.old_live.is_empty() {
                        actions.push(Action::Stop { ids: ids(&census.old_live) });
                    } else if census.stopping == 0 {
                        self.traffic = Traffic::All;
                        self.phase = Phase::Succeeded;
                    }
                }
            }
            Phase::RollingBack { reason } => {
                match self.ret {
                    Return::StopNew => {
                        // Everything not of the stable version goes; the old set is whole.
                        if !census.old_live.is_empty() {
                            actions.push(Action::Stop { ids: ids(&census.old_live) });
                        }
                        // A stable allocation lost meanwhile is replaced.
                        let live = len32(&census.new_live);
                        if census.old_live.is_empty() && live < self.count {
                            actions.push(Action::Start { version: target, count: self.count - live });
                        }
                    }
                    Return::Redeploy if self.strategy == Strategy::Recreate => actions.extend(self.recreate(&census, target)),
                    Return::Redeploy => {
                        let (surge, unavailable) = self.limits();
                        actions.extend(self.roll(&census, target, surge, unavailable));
                    }
                }
                if self.converged(&census) {
                    self.traffic = Traffic::All;
                    self.phase = Phase::RolledBack { reason };
                }
            }
            Phase::Succeeded | Phase::RolledBack { .. } | Phase::Failed { .. } => {}
        }
        actions
    }

    /// A phase this strategy never enters (`new` picks the phase from the strategy, which
    /// never changes), so the record was not written by this code as it is: fail the
    /// deployment, saying so, rather than guess. Failed allocations are still cleaned up.
    fn inconsistent(&mut self, census: &Census<'_>) -> Vec<Action> {
        let reason = format!("stored deployment is inconsistent: phase {:?} under strategy {:?}", self.phase, self.strategy);
        tracing::warn!(%reason, "deployment failed");
        self.phase = Phase::Failed { reason };
        self.cleanup(census)
    }

    /// Failed allocations of any version are stopped (and so removed); they hold no
    /// traffic but may hold resources.
    fn cleanup(&self, census: &Census<'_>) -> Vec<Action> {
        if census.failed.is_empty() {
            Vec::new()
        } else {
            vec![Action::Stop { ids: ids(&census.failed) }]
        }
    }

    fn limits(&self) -> (u32, u32) {
        match self.strategy {
            Strategy::Rolling { max_surge, max_unavailable } | Strategy::Canary { max_surge, max_unavailable, .. } => {
                (max_surge, max_unavailable)
            }
            // Recreate rolls back by recreating; blue/green returns by stopping green.
            Strategy::Recreate | Strategy::BlueGreen { .. } => (1, 0),
        }
    }

    /// Done when exactly `count` target allocations are ready and nothing else is live
    /// or still stopping.
    fn converged(&self, census: &Census<'_>) -> bool {
        census.new_ready == self.count
            && len32(&census.new_live) == self.count
            && census.old_live.is_empty()
            && census.failed.is_empty()
            && census.stopping == 0
    }

    /// One rolling step: stop old allocations as far as availability allows (starting
    /// ones first: they serve nothing), then start new ones as far as the surge allows.
    /// Stopping allocations count against the surge, so a stop-first update starts a
    /// replacement only once the old allocation is gone (and its volume free).
    fn roll(&self, census: &Census<'_>, target: u64, surge: u32, unavailable: u32) -> Vec<Action> {
        let mut actions = Vec::new();
        let count = self.count;
        let new_live = len32(&census.new_live);
        let available = len32(&census.old_ready).saturating_add(census.new_ready);
        let min_available = count.saturating_sub(unavailable);
        let mut can_stop = available.saturating_sub(min_available);
        let mut stop: Vec<&AllocView> =
            census.old_live.iter().filter(|a| matches!(a.health, AllocHealth::Starting { .. })).copied().collect();
        for a in &census.old_ready {
            if can_stop == 0 {
                break;
            }
            stop.push(a);
            can_stop -= 1;
        }
        // More target allocations than wanted (canaries beyond a smaller count, say):
        // stop the extra, not-yet-ready ones first.
        if new_live > count {
            let mut extra: Vec<&AllocView> = census.new_live.clone();
            extra.sort_by_key(|a| matches!(a.health, AllocHealth::Healthy { .. }));
            stop.extend(extra.into_iter().take((new_live - count) as usize));
        }
        // What is stopped now still runs until it is gone, so it counts like the rest.
        // A failed allocation may hold resources and volumes until it is removed, too.
        let holding =
            len32(&census.old_live).saturating_add(new_live).saturating_add(census.stopping).saturating_add(len32(&census.failed));
        let room = count.saturating_add(surge).saturating_sub(holding);
        let need = count.saturating_sub(new_live);
        if !stop.is_empty() {
            actions.push(Action::Stop { ids: ids(&stop) });
        }
        if room.min(need) > 0 {
            actions.push(Action::Start { version: target, count: room.min(need) });
        }
        actions
    }

    /// One recreate step: stop everything else, and once it is gone, start the target.
    fn recreate(&self, census: &Census<'_>, target: u64) -> Vec<Action> {
        if !census.old_live.is_empty() {
            return vec![Action::Stop { ids: ids(&census.old_live) }];
        }
        let live = len32(&census.new_live);
        if census.stopping == 0 && census.failed.is_empty() && live < self.count {
            return vec![Action::Start { version: target, count: self.count - live }];
        }
        Vec::new()
    }
}
