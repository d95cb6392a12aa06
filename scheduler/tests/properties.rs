//! Property tests: over random clusters and jobs, no plan ever breaks a rule (checked by
//! the independent validator), every group's tasks are either placed or explained, the
//! explanations add up, and planning is deterministic.

use keelson_scheduler::conformance::validate_plan;
use keelson_scheduler::{
    Allocation, ClusterSnapshot, Constraint, ConstraintOp, Eligibility, Error, Job, Node, PlacementEngine, Policy, PortRange, Resources,
    Scheduler, Spread, TaskGroup, VolumeAccess, VolumeRequest,
};
use proptest::prelude::*;

fn node(i: usize, cpu: u64, mem: u64, zone: u8, rack: u8, eligible: bool, ports: u16) -> Node {
    let mut n = Node::new(format!("n{i}"), Resources::new(cpu, mem))
        .with_attribute("zone", format!("z{zone}"))
        .with_label("rack", format!("r{rack}"));
    n.eligibility = if eligible { Eligibility::Eligible } else { Eligibility::Draining };
    n.dynamic_ports = PortRange { start: 30_000, end: 30_000 + ports };
    n
}

fn constraint(kind: u8, v: u8) -> Constraint {
    match kind % 7 {
        0 => Constraint::equal("attr.zone", format!("z{}", v % 3)),
        1 => Constraint::not_equal("attr.zone", format!("z{}", v % 3)),
        2 => Constraint::new("label.rack", ConstraintOp::Regex, format!("^r[0-{}]$", v % 3)),
        3 => Constraint::new("label.rack", ConstraintOp::IsSet, ""),
        4 => Constraint::distinct_hosts(),
        5 => Constraint::distinct_property("attr.zone", u32::from(v % 3) + 1),
        _ => Constraint::new("label.rack", ConstraintOp::SetContainsAny, format!("r{},r{}", v % 4, (v + 1) % 4)),
    }
}

prop_compose! {
    fn cluster()(specs in prop::collection::vec((500u64..8000, 500u64..8000, 0u8..3, 0u8..4, prop::bool::weighted(0.85), 0u16..6), 1..14),
                 allocs in prop::collection::vec((0usize..14, 1u64..3000, 1u64..3000, 0u8..100), 0..10)) -> ClusterSnapshot {
        let nodes: Vec<Node> = specs.iter().enumerate().map(|(i, s)| node(i, s.0, s.1, s.2, s.3, s.4, s.5)).collect();
        let allocations = allocs.iter().enumerate().filter(|(_, a)| a.0 < nodes.len()).map(|(i, a)| {
            Allocation { priority: a.3, ..Allocation::new(format!("old{i}"), format!("n{}", a.0), "other", "g", Resources::new(a.1, a.2)) }
        }).collect();
        ClusterSnapshot { nodes, allocations, ..ClusterSnapshot::default() }
    }
}

prop_compose! {
    fn group(i: usize)(count in 0u32..25, cpu in 1u64..2500, mem in 1u64..2500,
                       constraints in prop::collection::vec((0u8..7, 0u8..9), 0..3),
                       static_port in prop::option::weighted(0.2, prop::sample::select(vec![8080u16, 9090])),
                       dynamic in 0u16..3, spread in prop::bool::weighted(0.3), affinity in prop::option::weighted(0.3, (0u8..3, -100i8..=100)),
                       volume in prop::option::weighted(0.2, prop::bool::ANY)) -> TaskGroup {
        let mut g = TaskGroup::new(format!("g{i}"), count, Resources::new(cpu, mem)).with_dynamic_ports(dynamic);
        for (k, v) in constraints {
            g = g.with_constraint(constraint(k, v));
        }
        if let Some(p) = static_port {
            g = g.with_static_port(p);
        }
        if spread {
            g = g.with_spread(Spread { target: "attr.zone".into(), targets: vec![] });
        }
        if let Some((z, w)) = affinity.filter(|(_, w)| *w != 0) {
            g = g.with_affinity("attr.zone", ConstraintOp::Equal, format!("z{z}"), w);
        }
        if let Some(per_task) = volume {
            g = g.with_volume(VolumeRequest { name: format!("vol{i}"), access: VolumeAccess::SingleWriter, read_only: false, per_task });
        }
        g
    }
}

prop_compose! {
    fn job()(groups in (group(0), group(1)), priority in 0u8..=100, spread_policy in prop::bool::weighted(0.3)) -> Job {
        Job::new("job", vec![groups.0, groups.1]).with_priority(priority).with_policy(if spread_policy { Policy::Spread } else { Policy::Binpack })
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn plans_never_break_rules_and_explain_every_unplaced_task(snap in cluster(), job in job()) {
        let engine = PlacementEngine::new();
        match engine.plan(&snap, &job) {
            Ok(plan) => {
                if let Err(v) = validate_plan(&snap, &job, &plan) {
                    prop_assert!(false, "violations: {v:?}\nplan: {plan:?}");
                }
                for g in &job.groups {
                    let placed = plan.placements.iter().filter(|p| p.group == g.name).count() as u32;
                    let unplaced: u32 = plan.unplaced.iter().filter(|u| u.group == g.name).map(|u| u.count).sum();
                    prop_assert_eq!(placed + unplaced, g.count, "group {} accounted", g.name);
                    let mut idx: Vec<u32> = plan.placements.iter().filter(|p| p.group == g.name).map(|p| p.index).collect();
                    idx.sort_unstable();
                    idx.dedup();
                    prop_assert_eq!(idx.len() as u32, placed, "task indices unique");
                }
                for u in &plan.unplaced {
                    prop_assert!(u.explanation.adds_up(), "explanation does not add up: {:?}", u.explanation);
                    prop_assert_eq!(u.explanation.nodes_evaluated, snap.nodes.len());
                }
                prop_assert_eq!(engine.plan(&snap, &job).expect("same input"), plan, "deterministic");
            }
            Err(Error::ExceedsNodeCapacity { .. }) => {
                let largest_cpu = snap.nodes.iter().filter(|n| n.is_eligible()).map(|n| n.capacity.cpu_millis).max().unwrap_or(0);
                let largest_mem = snap.nodes.iter().filter(|n| n.is_eligible()).map(|n| n.capacity.memory_mb).max().unwrap_or(0);
                prop_assert!(job.groups.iter().any(|g| g.resources.cpu_millis > largest_cpu || g.resources.memory_mb > largest_mem));
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}
