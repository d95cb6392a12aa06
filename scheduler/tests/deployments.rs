//! Deployment strategies replayed against a simulated cluster, step by step, across a
//! grid of counts and limits: every run must converge, and the limits must hold at every
//! step (never more than count + surge running, never fewer than count - unavailable
//! healthy, never old and new at once with a single-writer volume). Failures: a version
//! whose allocations fail their checks, one whose allocations never start, placements
//! that never happen, rollback off, a rollback that fails too.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use keelson_scheduler::{Action, AllocHealth, AllocView, Deployment, Error, Gates, Millis, Phase, Strategy, Traffic};

/// How a version behaves in the simulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// Healthy `START_MS` after placement.
    Good,
    /// Fails its checks `START_MS` after placement.
    Crashes,
    /// Stays starting forever.
    NeverStarts,
}

const START_MS: Millis = 2_000;
const TICK_MS: Millis = 1_000;

fn gates() -> Gates {
    {
        let mut built = Gates::default();
        built.min_healthy_time = Duration::from_secs(3);
        built.healthy_deadline = Duration::from_secs(20);
        built.progress_deadline = Duration::from_secs(60);
        built.auto_rollback = true;
        built
    }
}

#[derive(Debug)]
struct Sim {
    allocs: Vec<AllocView>,
    placed_at: Vec<Millis>,
    behaviour: fn(u64) -> Behaviour,
    /// Start actions are ignored (no node has room).
    no_room: bool,
    next: u32,
    now: Millis,
    starts: Vec<(u64, u32)>,
    stopped: BTreeSet<String>,
}

impl Sim {
    /// `count` healthy allocations of version 1.
    fn new(count: u32, behaviour: fn(u64) -> Behaviour) -> Sim {
        let mut sim = Sim {
            allocs: Vec::new(),
            placed_at: Vec::new(),
            behaviour,
            no_room: false,
            next: 0,
            now: 100_000,
            starts: Vec::new(),
            stopped: BTreeSet::new(),
        };
        for _ in 0..count {
            sim.place(1);
            let last = sim.allocs.len() - 1;
            sim.allocs[last].health = AllocHealth::Healthy { since: 0 };
        }
        sim
    }

    fn place(&mut self, version: u64) {
        self.allocs.push(AllocView::new(format!("a{}", self.next), version, AllocHealth::Starting { since: self.now }));
        self.placed_at.push(self.now);
        self.next += 1;
    }

    fn apply(&mut self, actions: &[Action]) {
        for action in actions {
            match action {
                Action::Start { version, count } => {
                    self.starts.push((*version, *count));
                    if !self.no_room {
                        for _ in 0..*count {
                            self.place(*version);
                        }
                    }
                }
                Action::Stop { ids } => {
                    for a in self.allocs.iter_mut().filter(|a| ids.contains(&a.id)) {
                        assert_ne!(a.health, AllocHealth::Stopping, "{} asked to stop twice", a.id);
                        a.health = AllocHealth::Stopping;
                        self.stopped.insert(a.id.clone());
                    }
                }
            }
        }
    }

    /// Time passes: stopping allocations are gone, starting ones become what their
    /// version makes them.
    fn tick(&mut self) {
        self.now += TICK_MS;
        let mut keep = Vec::new();
        let mut placed = Vec::new();
        for (mut a, at) in self.allocs.drain(..).zip(self.placed_at.drain(..)) {
            if a.health == AllocHealth::Stopping {
                continue;
            }
            if matches!(a.health, AllocHealth::Starting { .. }) && self.now - at >= START_MS {
                a.health = match (self.behaviour)(a.version) {
                    Behaviour::Good => AllocHealth::Healthy { since: self.now },
                    Behaviour::Crashes => AllocHealth::Failed,
                    Behaviour::NeverStarts => a.health,
                };
            }
            keep.push(a);
            placed.push(at);
        }
        self.allocs = keep;
        self.placed_at = placed;
    }

    fn running(&self) -> usize {
        self.allocs.iter().filter(|a| a.health != AllocHealth::Failed).count()
    }

    fn healthy(&self) -> u32 {
        self.allocs.iter().filter(|a| matches!(a.health, AllocHealth::Healthy { .. })).count() as u32
    }

    fn versions(&self) -> BTreeSet<u64> {
        self.allocs.iter().map(|a| a.version).collect()
    }
}

/// Limits checked after every step.
#[derive(Clone, Copy, Debug)]
struct Limits {
    max_running: usize,
    min_healthy: u32,
}

/// Steps until the deployment is over (or 500 steps), checking `limits` after each.
fn drive(d: &mut Deployment, sim: &mut Sim, limits: Option<Limits>, mut each: impl FnMut(&mut Deployment, &Sim)) {
    for _ in 0..500 {
        let actions = d.step(&sim.allocs, sim.now);
        sim.apply(&actions);
        if let Some(l) = limits {
            assert!(sim.running() <= l.max_running, "{} running > {} at {:?}: {:?}", sim.running(), l.max_running, d.phase(), sim.allocs);
            assert!(sim.healthy() >= l.min_healthy, "{} healthy < {} at {:?}: {:?}", sim.healthy(), l.min_healthy, d.phase(), sim.allocs);
        }
        each(d, sim);
        if d.phase().is_terminal() {
            return;
        }
        sim.tick();
    }
    panic!("no end after 500 steps: {:?} {:?}", d.phase(), sim.allocs);
}

fn good(_: u64) -> Behaviour {
    Behaviour::Good
}

fn v2_crashes(v: u64) -> Behaviour {
    if v == 2 {
        Behaviour::Crashes
    } else {
        Behaviour::Good
    }
}

fn v2_never_starts(v: u64) -> Behaviour {
    if v == 2 {
        Behaviour::NeverStarts
    } else {
        Behaviour::Good
    }
}

/// Every new placement crashes, of either version; the first set is healthy from the
/// start (see `Sim::new`), so only replacements fail.
fn all_crash(_: u64) -> Behaviour {
    Behaviour::Crashes
}

fn rolling_grid() -> Vec<(u32, u32, u32)> {
    let mut grid = Vec::new();
    for count in 1..=5 {
        for surge in 0..=2 {
            for unavailable in 0..=2 {
                if surge + unavailable > 0 {
                    grid.push((count, surge, unavailable));
                }
            }
        }
    }
    grid
}

#[test]
fn rolling_updates_converge_within_their_limits_for_every_count_and_limit() {
    for (count, surge, unavailable) in rolling_grid() {
        let mut sim = Sim::new(count, good);
        let strategy = Strategy::Rolling { max_surge: surge, max_unavailable: unavailable };
        let mut d = Deployment::new(Some(1), 2, count, strategy, gates(), false, sim.now).expect("deployment");
        let limits = Limits { max_running: (count + surge) as usize, min_healthy: count.saturating_sub(unavailable) };
        drive(&mut d, &mut sim, Some(limits), |_, _| {});
        assert_eq!(d.phase(), &Phase::Succeeded, "count {count} surge {surge} unavailable {unavailable}");
        assert_eq!(sim.versions(), BTreeSet::from([2]));
        assert_eq!(sim.healthy(), count);
        assert_eq!(d.stable_version(), Some(2));
    }
}

#[test]
fn a_failing_version_is_rolled_back_automatically_within_the_same_limits() {
    for (count, surge, unavailable) in rolling_grid() {
        let mut sim = Sim::new(count, v2_crashes);
        let strategy = Strategy::Rolling { max_surge: surge, max_unavailable: unavailable };
        let mut d = Deployment::new(Some(1), 2, count, strategy, gates(), false, sim.now).expect("deployment");
        let limits = Limits { max_running: (count + surge) as usize, min_healthy: count.saturating_sub(unavailable) };
        drive(&mut d, &mut sim, Some(limits), |_, _| {});
        let Phase::RolledBack { reason } = d.phase() else { panic!("{:?} for {count}/{surge}/{unavailable}", d.phase()) };
        assert!(reason.contains("failed its health gate"), "{reason}");
        assert_eq!(sim.versions(), BTreeSet::from([1]), "count {count} surge {surge} unavailable {unavailable}");
        assert_eq!(sim.healthy(), count);
        assert_eq!(d.stable_version(), Some(1));
    }
}

#[test]
fn a_single_writer_volume_never_runs_old_and_new_at_once_whatever_the_strategy() {
    let strategies = [
        Strategy::Rolling { max_surge: 2, max_unavailable: 0 },
        Strategy::Canary { canaries: 1, auto_promote: true, max_surge: 1, max_unavailable: 0 },
        Strategy::BlueGreen { rollback_window: Duration::from_secs(30) },
        Strategy::Recreate,
    ];
    for strategy in strategies {
        for count in 1..=4 {
            let mut sim = Sim::new(count, good);
            let mut d = Deployment::new(Some(1), 2, count, strategy.clone(), gates(), true, sim.now).expect("deployment");
            // Stopping allocations still hold the volume: they count as running.
            let limits = Limits { max_running: count as usize, min_healthy: 0 };
            drive(&mut d, &mut sim, Some(limits), |_, _| {});
            assert_eq!(d.phase(), &Phase::Succeeded, "{strategy:?} count {count}");
            assert_eq!(sim.versions(), BTreeSet::from([2]));
            if strategy != Strategy::Recreate {
                assert!(d.adjusted().is_some_and(|w| w.contains("single-writer")), "{strategy:?}");
            }
        }
    }
}

#[test]
fn canary_waits_for_manual_promotion_with_the_old_set_whole() {
    let mut sim = Sim::new(4, good);
    let old: BTreeSet<String> = sim.allocs.iter().map(|a| a.id.clone()).collect();
    let strategy = Strategy::Canary { canaries: 1, auto_promote: false, max_surge: 1, max_unavailable: 0 };
    let mut d = Deployment::new(Some(1), 2, 4, strategy, gates(), false, sim.now).expect("deployment");
    assert!(matches!(d.promote(), Err(Error::InvalidInput { .. })), "no promotion before the canaries pass");
    // Wait well past the progress deadline: waiting for a person is not a stall.
    let mut waited = 0;
    drive(&mut d, &mut sim, Some(Limits { max_running: 5, min_healthy: 4 }), |d, sim| {
        if d.phase() == &Phase::AwaitingPromotion {
            assert_eq!(sim.allocs.iter().filter(|a| a.version == 2).count(), 1, "one canary");
            assert!(sim.stopped.is_empty(), "the old set is untouched before promotion");
            waited += 1;
            if waited == 120 {
                d.promote().expect("promote");
            }
        }
    });
    assert!(waited >= 120);
    assert_eq!(d.phase(), &Phase::Succeeded);
    assert_eq!(sim.versions(), BTreeSet::from([2]));
    assert_eq!(sim.stopped, old, "every old allocation stopped once, after promotion");
}

#[test]
fn a_failing_canary_rolls_back_by_stopping_it_without_touching_or_rerunning_anything_old() {
    for behaviour in [v2_crashes as fn(u64) -> Behaviour, v2_never_starts] {
        let mut sim = Sim::new(3, behaviour);
        let old: BTreeSet<String> = sim.allocs.iter().map(|a| a.id.clone()).collect();
        let strategy = Strategy::Canary { canaries: 2, auto_promote: true, max_surge: 1, max_unavailable: 0 };
        let mut d = Deployment::new(Some(1), 2, 3, strategy, gates(), false, sim.now).expect("deployment");
        drive(&mut d, &mut sim, Some(Limits { max_running: 5, min_healthy: 3 }), |_, _| {});
        assert!(matches!(d.phase(), Phase::RolledBack { .. }), "{:?}", d.phase());
        let now: BTreeSet<String> = sim.allocs.iter().map(|a| a.id.clone()).collect();
        assert_eq!(now, old, "the same old allocations serve on");
        assert!(sim.starts.iter().all(|(v, _)| *v == 2), "nothing of version 1 was started again: {:?}", sim.starts);
    }
}

#[test]
fn blue_green_switches_when_green_is_healthy_and_keeps_blue_for_the_window() {
    let mut sim = Sim::new(3, good);
    let strategy = Strategy::BlueGreen { rollback_window: Duration::from_secs(30) };
    let mut d = Deployment::new(Some(1), 2, 3, strategy, gates(), false, sim.now).expect("deployment");
    assert_eq!(d.traffic(), Traffic::Only(1));
    let mut switched = None;
    let mut blue_stopped = None;
    drive(&mut d, &mut sim, Some(Limits { max_running: 6, min_healthy: 3 }), |d, sim| {
        if switched.is_none() && d.traffic() == Traffic::Only(2) {
            assert_eq!(sim.allocs.iter().filter(|a| a.version == 2 && matches!(a.health, AllocHealth::Healthy { .. })).count(), 3);
            switched = Some(sim.now);
        }
        if blue_stopped.is_none() && !sim.stopped.is_empty() {
            blue_stopped = Some(sim.now);
        }
    });
    let (switched, blue_stopped) = (switched.expect("switched"), blue_stopped.expect("blue stopped"));
    assert!(blue_stopped - switched >= 30_000, "blue kept for the window: {switched} → {blue_stopped}");
    assert_eq!(d.phase(), &Phase::Succeeded);
    assert_eq!(d.traffic(), Traffic::All);
    assert_eq!(sim.versions(), BTreeSet::from([2]));
}

#[test]
fn blue_green_rollback_inside_the_window_moves_traffic_back_at_once() {
    let mut sim = Sim::new(3, good);
    let blue: BTreeSet<String> = sim.allocs.iter().map(|a| a.id.clone()).collect();
    let strategy = Strategy::BlueGreen { rollback_window: Duration::from_secs(300) };
    let mut d = Deployment::new(Some(1), 2, 3, strategy, gates(), false, sim.now).expect("deployment");
    drive(&mut d, &mut sim, Some(Limits { max_running: 6, min_healthy: 3 }), |d, _| {
        if matches!(d.phase(), Phase::Verifying { .. }) {
            d.rollback("error rate up after the switch").expect("rollback");
            assert_eq!(d.traffic(), Traffic::Only(1), "traffic returns before anything stops");
        }
    });
    assert_eq!(d.phase(), &Phase::RolledBack { reason: "error rate up after the switch".into() });
    let now: BTreeSet<String> = sim.allocs.iter().map(|a| a.id.clone()).collect();
    assert_eq!(now, blue);
    assert!(matches!(d.rollback("again"), Err(Error::InvalidInput { .. })), "a finished deployment cannot roll back");
}

#[test]
fn recreate_stops_everything_first_and_rolls_back_by_recreating() {
    let mut sim = Sim::new(3, good);
    let mut d = Deployment::new(Some(1), 2, 3, Strategy::Recreate, gates(), false, sim.now).expect("deployment");
    drive(&mut d, &mut sim, Some(Limits { max_running: 3, min_healthy: 0 }), |_, sim| {
        assert!(sim.versions().len() <= 1 || sim.allocs.iter().all(|a| a.version == 2 || a.health == AllocHealth::Stopping));
    });
    assert_eq!(d.phase(), &Phase::Succeeded);
    let mut sim = Sim::new(3, v2_crashes);
    let mut d = Deployment::new(Some(1), 2, 3, Strategy::Recreate, gates(), false, sim.now).expect("deployment");
    drive(&mut d, &mut sim, Some(Limits { max_running: 3, min_healthy: 0 }), |_, _| {});
    assert!(matches!(d.phase(), Phase::RolledBack { .. }), "{:?}", d.phase());
    assert_eq!(sim.versions(), BTreeSet::from([1]));
    assert_eq!(sim.healthy(), 3);
}

#[test]
fn placements_that_never_happen_hit_the_progress_deadline() {
    let mut sim = Sim::new(2, good);
    sim.no_room = true;
    let mut d = Deployment::new(Some(1), 2, 2, Strategy::Rolling { max_surge: 1, max_unavailable: 0 }, gates(), false, sim.now)
        .expect("deployment");
    let started = sim.now;
    drive(&mut d, &mut sim, Some(Limits { max_running: 3, min_healthy: 2 }), |_, _| {});
    let Phase::RolledBack { reason } = d.phase() else { panic!("{:?}", d.phase()) };
    assert!(reason.contains("no progress"), "{reason}");
    assert!(sim.now - started > 60_000);
    assert_eq!(sim.healthy(), 2, "the old set kept serving");
}

#[test]
fn without_auto_rollback_a_failed_gate_stops_the_deployment_where_it_is() {
    let mut sim = Sim::new(3, v2_crashes);
    let no_rollback = {
        let mut built = gates();
        built.auto_rollback = false;
        built
    };
    let mut d = Deployment::new(Some(1), 2, 3, Strategy::Rolling { max_surge: 1, max_unavailable: 0 }, no_rollback, false, sim.now)
        .expect("deployment");
    drive(&mut d, &mut sim, None, |_, _| {});
    assert!(matches!(d.phase(), Phase::Failed { .. }), "{:?}", d.phase());
    assert_eq!(d.stable_version(), Some(1));
    assert!(d.step(&sim.allocs, sim.now + 1).is_empty(), "a finished deployment asks for nothing");
}

#[test]
fn a_rollback_that_fails_too_ends_failed_instead_of_bouncing() {
    let mut sim = Sim::new(2, all_crash);
    let mut d = Deployment::new(Some(1), 2, 2, Strategy::Rolling { max_surge: 0, max_unavailable: 1 }, gates(), false, sim.now)
        .expect("deployment");
    drive(&mut d, &mut sim, None, |_, _| {});
    let Phase::Failed { reason } = d.phase() else { panic!("{:?}", d.phase()) };
    assert!(reason.starts_with("rollback to version 1"), "{reason}");
}

#[test]
fn a_first_deployment_rolls_out_and_bad_requests_are_typed_errors() {
    let mut sim = Sim::new(0, good);
    let mut d = Deployment::new(
        None,
        1,
        3,
        Strategy::Canary { canaries: 1, auto_promote: false, max_surge: 1, max_unavailable: 0 },
        gates(),
        false,
        sim.now,
    )
    .expect("deployment");
    drive(&mut d, &mut sim, None, |_, _| {});
    assert_eq!(d.phase(), &Phase::Succeeded, "nothing to protect: no canary phase");
    assert_eq!(sim.healthy(), 3);
    let mut first = Deployment::new(None, 1, 1, Strategy::default(), gates(), false, 0).expect("deployment");
    assert!(matches!(first.rollback("why"), Err(Error::InvalidInput { .. })), "nothing to return to");
    assert!(matches!(
        Deployment::new(Some(2), 2, 1, Strategy::default(), gates(), false, 0),
        Err(Error::InvalidInput { field: "version", .. })
    ));
    assert!(Deployment::new(Some(1), 2, 1, Strategy::Rolling { max_surge: 0, max_unavailable: 0 }, gates(), false, 0).is_err());
}

#[test]
fn steps_are_idempotent_for_the_same_observations() {
    let sim = Sim::new(3, good);
    let mut d = Deployment::new(Some(1), 2, 3, Strategy::Rolling { max_surge: 1, max_unavailable: 1 }, gates(), false, sim.now)
        .expect("deployment");
    let first = d.step(&sim.allocs, sim.now);
    let mut again = d.clone();
    assert_eq!(again.step(&sim.allocs, sim.now), first);
    let ids: HashSet<String> = first
        .iter()
        .flat_map(|a| match a {
            Action::Stop { ids } => ids.clone(),
            Action::Start { .. } => Vec::new(),
        })
        .collect();
    assert_eq!(ids.len(), 1, "max_unavailable 1: one old allocation stops first: {first:?}");
    assert!(first.contains(&Action::Start { version: 2, count: 1 }), "max_surge 1: one new one starts: {first:?}");
}
