//! The placement engine feature by feature, each plan checked by the independent
//! validator as well as by the assertions of the test.

use std::collections::BTreeMap;

use keelson_scheduler::conformance::{assert_plan_valid, validate_plan};
use keelson_scheduler::{
    Allocation, ClusterSnapshot, ClusterState, Constraint, ConstraintOp, Dimension, EngineConfig, Error, HostVolume, Job, Node,
    PlacementEngine, Policy, PortRange, Resources, Scheduler, Spread, SpreadTarget, TaskGroup, VolumeAccess, VolumeMount, VolumeRequest,
};

fn zones(n: usize, per_zone_cpu: u64) -> ClusterSnapshot {
    let nodes = (0..n)
        .map(|i| {
            Node::new(format!("n{i}"), Resources::new(per_zone_cpu, 16_384))
                .with_attribute("zone", format!("z{}", i % 3))
                .with_label("rack", format!("r{}", i % 2))
        })
        .collect();
    ClusterSnapshot { nodes, ..ClusterSnapshot::default() }
}

fn plan(snap: &ClusterSnapshot, job: &Job) -> keelson_scheduler::Plan {
    let p = PlacementEngine::new().plan(snap, job).expect("plan");
    assert_plan_valid(snap, job, &p);
    p
}

fn per_node(p: &keelson_scheduler::Plan) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for x in &p.placements {
        *m.entry(x.node.clone()).or_default() += 1;
    }
    m
}

#[test]
fn best_fit_uses_the_fewest_nodes_and_spread_policy_the_most() {
    let snap = zones(10, 4000);
    let group = TaskGroup::new("a", 12, Resources::new(1000, 1024));
    let packed = plan(&snap, &Job::new("pack", vec![group.clone()]));
    assert_eq!(per_node(&packed).len(), 3, "12 quarter-node tasks fill exactly 3 nodes");
    let spread = plan(&snap, &Job::new("spread", vec![group]).with_policy(Policy::Spread));
    assert_eq!(per_node(&spread).len(), 10, "worst fit uses every node");
    assert!(per_node(&spread).values().all(|n| *n <= 2));
    assert!(spread.placements.iter().all(|p| p.score.policy == Policy::Spread));
}

#[test]
fn affinity_prefers_matching_nodes_and_avoids_negative_ones() {
    let snap = zones(6, 4000);
    let prefer = TaskGroup::new("g", 4, Resources::new(1000, 512)).with_affinity("attr.zone", ConstraintOp::Equal, "z1", 80);
    let p = plan(&snap, &Job::new("aff", vec![prefer]));
    assert!(p.placements.iter().all(|x| x.node == "n1" || x.node == "n4"), "z1 nodes first: {:?}", per_node(&p));
    assert!(p.placements.iter().all(|x| x.score.affinity == 80));
    // 12 tasks: z1's two nodes hold 8; the rest spill over to other zones.
    let spill = TaskGroup::new("g", 12, Resources::new(1000, 512)).with_affinity("attr.zone", ConstraintOp::Equal, "z1", 80);
    let p = plan(&snap, &Job::new("spill", vec![spill]));
    assert_eq!(p.placements.len(), 12);
    assert_eq!(p.placements.iter().filter(|x| x.score.affinity == 80).count(), 8);
    let avoid = TaskGroup::new("g", 8, Resources::new(1000, 512)).with_affinity("label.rack", ConstraintOp::Equal, "r0", -50);
    let p = plan(&snap, &Job::new("avoid", vec![avoid]));
    assert!(p.placements.iter().all(|x| x.score.affinity == 0), "r1 has room for all 8, so r0 is avoided");
}

#[test]
fn even_spread_has_skew_at_most_one_and_counts_existing_tasks() {
    let snap = zones(9, 8000);
    let g = TaskGroup::new("web", 10, Resources::new(100, 64)).with_spread(Spread { target: "attr.zone".into(), targets: vec![] });
    let p = plan(&snap, &Job::new("sp", vec![g.clone()]));
    let mut by_zone: BTreeMap<String, usize> = BTreeMap::new();
    for x in &p.placements {
        *by_zone.entry(x.score.spread_value.clone().expect("spread value")).or_default() += 1;
    }
    let (min, max) = (by_zone.values().min().copied().unwrap_or(0), by_zone.values().max().copied().unwrap_or(0));
    assert!(by_zone.len() == 3 && max - min <= 1, "{by_zone:?}");
    // Existing tasks all in z0: the new ones go elsewhere to even out.
    let mut state = ClusterState::from_snapshot(&snap).expect("state");
    for i in 0..3 {
        state.add_allocation(&Allocation::new(format!("old{i}"), "n0", "sp", "web", Resources::new(100, 64))).expect("add");
    }
    let p = state.plan(&Job::new("sp", vec![TaskGroup { count: 3, ..g }]), &EngineConfig::default()).expect("plan");
    assert!(p.placements.iter().all(|x| x.score.spread_value.as_deref() != Some("z0")), "{:?}", p.placements);
}

#[test]
fn spread_over_node_ids_is_refused_naming_the_target() {
    let snap = zones(3, 8000);
    let g = TaskGroup::new("web", 3, Resources::new(100, 64)).with_spread(Spread { target: "node.id".into(), targets: vec![] });
    let mut state = ClusterState::from_snapshot(&snap).expect("state");
    let err = state.plan(&Job::new("sp", vec![g]), &EngineConfig::default()).expect_err("node.id spread");
    assert!(err.to_string().contains("node.id"), "{err}");
}

#[test]
fn spread_targets_follow_percentages() {
    let snap = zones(9, 8000);
    let targets = vec![
        SpreadTarget { value: "z0".into(), percent: 50 },
        SpreadTarget { value: "z1".into(), percent: 30 },
        SpreadTarget { value: "z2".into(), percent: 20 },
    ];
    let g = TaskGroup::new("web", 20, Resources::new(100, 64)).with_spread(Spread { target: "attr.zone".into(), targets });
    let p = plan(&snap, &Job::new("pct", vec![g]));
    let count = |z: &str| p.placements.iter().filter(|x| x.score.spread_value.as_deref() == Some(z)).count();
    assert_eq!((count("z0"), count("z1"), count("z2")), (10, 6, 4));
}

#[test]
fn distinct_hosts_and_distinct_property() {
    let snap = zones(6, 8000);
    let g = TaskGroup::new("db", 8, Resources::new(100, 64)).with_constraint(Constraint::distinct_hosts());
    let p = plan(&snap, &Job::new("dh", vec![g]));
    assert_eq!(p.placements.len(), 6);
    assert_eq!(p.unplaced[0].count, 2);
    assert_eq!(p.unplaced[0].explanation.exhausted.get(&Dimension::Distinct), Some(&6));
    assert!(p.unplaced[0].explanation.adds_up());
    let g = TaskGroup::new("db", 5, Resources::new(100, 64)).with_constraint(Constraint::distinct_property("attr.zone", 1));
    let p = plan(&snap, &Job::new("dp", vec![g]));
    assert_eq!(p.placements.len(), 3, "one per zone");
    let g = TaskGroup::new("db", 9, Resources::new(100, 64)).with_constraint(Constraint::distinct_property("label.rack", 2));
    assert_eq!(plan(&snap, &Job::new("dp2", vec![g])).placements.len(), 4, "two per rack");
}

#[test]
fn ports_static_dynamic_and_reserved() {
    let mut snap = zones(2, 8000);
    snap.nodes[0].dynamic_ports = PortRange { start: 30_000, end: 30_004 };
    snap.nodes[0].reserved_ports.insert(30_001);
    snap.nodes[1].eligibility = keelson_scheduler::Eligibility::Ineligible;
    let g = TaskGroup::new("svc", 3, Resources::new(10, 10)).with_dynamic_ports(1);
    let p = plan(&snap, &Job::new("dyn", vec![g]));
    let ports: Vec<u16> = p.placements.iter().flat_map(|x| x.ports.clone()).collect();
    assert_eq!(ports, vec![30_000, 30_002, 30_003], "lowest free, skipping the reserved port");
    let g = TaskGroup::new("svc", 3, Resources::new(10, 10)).with_dynamic_ports(2);
    let p = plan(&snap, &Job::new("dyn2", vec![g]));
    assert_eq!(p.placements.len(), 2, "4 free dynamic ports, 2 per task");
    assert_eq!(p.unplaced[0].explanation.exhausted.get(&Dimension::Ports), Some(&1));
}

#[test]
fn volumes_pin_tasks_and_single_writers_stay_single() {
    let mut snap = zones(4, 8000);
    snap.volumes.push(HostVolume { name: "pg-0".into(), node: "n2".into(), access: VolumeAccess::SingleWriter });
    let stateful = TaskGroup::new("pg", 3, Resources::new(100, 64)).with_volume(VolumeRequest {
        name: "pg".into(),
        access: VolumeAccess::SingleWriter,
        read_only: false,
        per_task: true,
    });
    let p = plan(&snap, &Job::new("db", vec![stateful.clone()]));
    assert_eq!(p.placements.len(), 3);
    let task0 = p.placements.iter().find(|x| x.index == 0).expect("task 0");
    assert_eq!((task0.node.as_str(), task0.volumes[0].name.as_str()), ("n2", "pg-0"), "task 0 follows its volume");
    // pg-0 already has a writer: task 0 cannot run anywhere, the others can.
    let mut busy = snap.clone();
    let mut holder = Allocation::new("old-pg-0", "n2", "db", "pg", Resources::new(100, 64));
    holder.volumes.push(VolumeMount { name: "pg-0".into(), read_only: false });
    busy.allocations.push(holder);
    let p = plan(&busy, &Job::new("db2", vec![stateful]));
    assert_eq!(p.placements.len(), 2);
    assert_eq!(p.unplaced[0].count, 1);
    // A shared single-writer volume: one writer only, whatever the count.
    let shared = TaskGroup::new("app", 3, Resources::new(100, 64)).with_volume(VolumeRequest {
        name: "uploads".into(),
        access: VolumeAccess::SingleWriter,
        read_only: false,
        per_task: false,
    });
    let p = plan(&snap, &Job::new("app", vec![shared]));
    assert_eq!((p.placements.len(), p.unplaced[0].count), (1, 2));
    assert!(p.unplaced[0].explanation.exhausted.contains_key(&Dimension::Volume));
    // A shared multi-writer volume: every task on the volume's node.
    let multi = TaskGroup::new("app", 3, Resources::new(100, 64)).with_volume(VolumeRequest {
        name: "cache".into(),
        access: VolumeAccess::MultiWriter,
        read_only: false,
        per_task: false,
    });
    let p = plan(&snap, &Job::new("m", vec![multi]));
    assert_eq!(per_node(&p).len(), 1, "all on the node that holds the volume");
}

#[test]
fn preemption_evicts_only_much_lower_priority_work() {
    let snap = {
        let mut s = zones(2, 2000);
        s.allocations.push(Allocation { priority: 20, ..Allocation::new("batch-1", "n0", "batch", "b", Resources::new(2000, 512)) });
        s.allocations.push(Allocation { priority: 45, ..Allocation::new("svc-1", "n1", "svc", "s", Resources::new(2000, 512)) });
        s
    };
    let urgent = Job::new("urgent", vec![TaskGroup::new("u", 1, Resources::new(1500, 256))]).with_priority(50);
    let p = plan(&snap, &urgent);
    assert_eq!(p.evictions.len(), 1);
    assert_eq!((p.evictions[0].allocation.as_str(), p.evictions[0].priority), ("batch-1", 20), "priority 45 is within 10 of 50");
    assert_eq!(p.placements[0].node, "n0");
    let peer = Job::new("peer", vec![TaskGroup::new("u", 1, Resources::new(1500, 256))]).with_priority(25);
    let p = plan(&snap, &peer);
    assert!(p.evictions.is_empty() && p.placements.is_empty(), "25 may not evict 20");
    let off = PlacementEngine::with_config({
        let mut built = EngineConfig::default();
        built.preemption = false;
        built
    });
    assert!(off.plan(&snap, &urgent).expect("plan").evictions.is_empty());
}

#[test]
fn rebalancing_frees_nodes_without_breaking_rules() {
    // 8 nodes each a quarter full: the same work fits on 2.
    let snap = zones(8, 4000);
    let job = Job::new(
        "w",
        vec![TaskGroup::new("g", 8, Resources::new(1000, 512)).with_constraint(Constraint::new("attr.zone", ConstraintOp::IsSet, ""))],
    );
    let mut state = ClusterState::from_snapshot(&snap).expect("state");
    for i in 0..8 {
        state.add_allocation(&Allocation::new(format!("w.g.{i}"), format!("n{i}"), "w", "g", Resources::new(1000, 512))).expect("add");
    }
    let before = state.to_snapshot();
    let plan = state.rebalance(std::slice::from_ref(&job), 100).expect("rebalance");
    assert_eq!(state.to_snapshot(), before, "rebalance is a dry run");
    assert!(plan.freed_nodes.len() >= 5, "{plan:?}");
    // Apply the moves to a copy and check it independently.
    let mut after = before.clone();
    for m in &plan.moves {
        let a = after.allocations.iter_mut().find(|a| a.id == m.allocation).expect("moved allocation exists");
        assert_eq!(a.node, m.from);
        a.node = m.to.clone();
    }
    let mut used: BTreeMap<&str, u64> = BTreeMap::new();
    for a in &after.allocations {
        *used.entry(a.node.as_str()).or_default() += a.resources.cpu_millis;
    }
    assert!(used.values().all(|c| *c <= 4000), "{used:?}");
    assert_eq!(used.len(), 8 - plan.freed_nodes.len());
    let bounded = state.rebalance(&[job], 3).expect("rebalance");
    assert!(bounded.moves.len() <= 3);
}

#[test]
fn state_place_commits_and_plan_does_not() {
    let snap = zones(3, 4000);
    let mut state = ClusterState::from_snapshot(&snap).expect("state");
    let job = Job::new("j", vec![TaskGroup::new("g", 4, Resources::new(1000, 512))]);
    let dry = state.plan(&job, &EngineConfig::default()).expect("plan");
    assert_eq!(state.allocation_count(), 0);
    let real = state.place(&job, &EngineConfig::default()).expect("place");
    assert_eq!(dry, real);
    assert_eq!(state.allocation_count(), 4);
    let again = state.place(&job, &EngineConfig::default()).expect("place again");
    assert_eq!(state.allocation_count(), 8, "ids are made unique: {:?}", again.placements.len());
    state.remove_allocation("j.g.0").expect("remove");
    assert!(matches!(state.remove_allocation("j.g.0"), Err(Error::NotFound { .. })));
}

#[test]
fn bad_jobs_are_typed_errors_naming_the_field() {
    let snap = zones(3, 4000);
    let engine = PlacementEngine::with_config({
        let mut built = EngineConfig::default();
        built.max_group_count = 100;
        built
    });
    let spread =
        |t: Vec<SpreadTarget>| TaskGroup::new("g", 1, Resources::new(1, 1)).with_spread(Spread { target: "attr.zone".into(), targets: t });
    let cases: Vec<(TaskGroup, &str)> = vec![
        (TaskGroup::new("g", 101, Resources::new(1, 1)), "group count"),
        (
            spread(vec![SpreadTarget { value: "z0".into(), percent: 60 }, SpreadTarget { value: "z1".into(), percent: 30 }]),
            "spread targets",
        ),
        (TaskGroup::new("g", 1, Resources::new(1, 1)).with_affinity("attr.zone", ConstraintOp::Equal, "z0", 0), "affinity weight"),
        (
            TaskGroup::new("g", 1, Resources::new(1, 1)).with_constraint(Constraint::new("attr.v", ConstraintOp::Version, "~~")),
            "constraint",
        ),
        (
            TaskGroup::new("g", 1, Resources::new(1, 1)).with_constraint(Constraint::new(
                "attr.zone",
                ConstraintOp::DistinctProperty,
                "zero",
            )),
            "distinct_property limit",
        ),
        (TaskGroup::new("g", 1, Resources::new(1, 1)).with_dynamic_ports(1000), "dynamic ports"),
    ];
    for (g, field) in cases {
        match engine.plan(&snap, &Job::new("j", vec![g])) {
            Err(Error::InvalidInput { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected InvalidInput on {field}, got {other:?}"),
        }
    }
    // Negative numbers and unknown operators in a job file.
    for text in [
        r#"{"id":"j","groups":[{"name":"g","count":1,"resources":{"cpu_millis":-5}}]}"#,
        r#"{"id":"j","groups":[{"name":"g","count":1,"resources":{"cpu_millis":5},"constraints":[{"target":"attr.x","op":"~=","value":"1"}]}]}"#,
        r#"{"id":"j","groups":[],"priorty":5}"#,
    ] {
        let err = Job::from_json(text).expect_err(text);
        assert!(matches!(err, Error::InvalidInput { field: "job file", .. }), "{err}");
    }
}

#[test]
fn validator_catches_a_broken_plan() {
    // The validator must not just agree with the engine: hand it a bad plan.
    let snap = zones(2, 1000);
    let job = Job::new("j", vec![TaskGroup::new("g", 2, Resources::new(800, 64)).with_constraint(Constraint::equal("attr.zone", "z0"))]);
    let mut p = PlacementEngine::new().plan(&snap, &job).expect("plan");
    assert_eq!(p.placements.len(), 1);
    let mut twin = p.placements[0].clone();
    twin.index = 1;
    p.placements.push(twin.clone());
    twin.node = "n1".into();
    p.placements.push(twin);
    let violations = validate_plan(&snap, &job, &p).expect_err("invalid");
    assert!(violations.iter().any(|v| v.contains("over-committed")), "{violations:?}");
    assert!(violations.iter().any(|v| v.contains("breaks constraint attr.zone = z0")), "{violations:?}");
}
