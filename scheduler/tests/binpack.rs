//! BinPack's packing quality and serde of the model.

use keelson_scheduler::{conformance::assert_plan_valid, BinPack, ClusterSnapshot, Job, Node, Resources, Scheduler, TaskGroup};

#[test]
fn best_fit_uses_the_fewest_nodes() {
    let nodes = (0..10).map(|i| Node::new(format!("n{i}"), Resources::new(4000, 4096))).collect();
    let snap = ClusterSnapshot { nodes, allocations: vec![] };
    let job = Job::new("pack", vec![TaskGroup::new("a", 12, Resources::new(1000, 1024))]);
    let plan = BinPack.plan(&snap, &job).expect("plan");
    assert_plan_valid(&snap, &job, &plan);
    let used: std::collections::BTreeSet<_> = plan.placements.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(used.len(), 3, "12 quarter-node tasks fill exactly 3 nodes: {used:?}");
}

#[test]
fn job_files_reject_unknown_keys() {
    let err = serde_json::from_str::<Job>(r#"{"id":"j","groups":[],"priority":5}"#).expect_err("unknown key");
    assert!(err.to_string().contains("priority"), "{err}");
}
