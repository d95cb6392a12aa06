//! Conformance scenarios for `Scheduler`, `Driver` and `VolumeManager` (feature
//! `conformance`). Backends run all of them against the real thing; each panics with a
//! message on any deviation.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::{
    ClusterSnapshot, Constraint, Dimension, Driver, Error, Job, Node, OutputStream, Resources, Scheduler, TaskGroup, TaskSpec, TaskState,
    VolumeManager,
};

fn unique(base: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{base}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

fn cluster() -> ClusterSnapshot {
    ClusterSnapshot {
        nodes: vec![
            Node::new("n1", Resources::new(4000, 8192)).with_attribute("zone", "a"),
            Node::new("n2", Resources::new(4000, 8192)).with_attribute("zone", "b"),
            Node::new("n3", Resources::new(2000, 4096)).with_attribute("zone", "a"),
        ],
        allocations: Vec::new(),
    }
}

/// An independent check of a plan: nothing over-committed, no port twice on a node,
/// every constraint held. Counts on its own, not with the scheduler's code.
pub fn assert_plan_valid(snapshot: &ClusterSnapshot, job: &Job, plan: &crate::Plan) {
    let mut used: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut ports: BTreeSet<(&str, u16)> = BTreeSet::new();
    for a in &snapshot.allocations {
        let u = used.entry(a.node.as_str()).or_default();
        u.0 += a.resources.cpu_millis;
        u.1 += a.resources.memory_mb;
        for p in &a.ports {
            ports.insert((a.node.as_str(), *p));
        }
    }
    for p in &plan.placements {
        let group = job.groups.iter().find(|g| g.name == p.group).expect("placement of a known group");
        let node = snapshot.nodes.iter().find(|n| n.id == p.node).expect("placement on a known node");
        assert!(node.eligible, "placed on ineligible node {}", node.id);
        for c in &group.constraints {
            assert!(c.matches(node), "constraint {c} broken on {}", node.id);
        }
        let u = used.entry(node.id.as_str()).or_default();
        u.0 += p.resources.cpu_millis;
        u.1 += p.resources.memory_mb;
        assert!(u.0 <= node.capacity.cpu_millis && u.1 <= node.capacity.memory_mb, "node {} over-committed: {u:?}", node.id);
        for port in &p.ports {
            assert!(ports.insert((node.id.as_str(), *port)), "port {port} double-booked on {}", node.id);
        }
    }
}

/// Every scheduler scenario.
pub fn scheduler_all(s: &dyn Scheduler) {
    scheduler_respects_capacity(s);
    scheduler_respects_constraints(s);
    scheduler_never_double_books_static_ports(s);
    scheduler_explains_what_did_not_fit(s);
    scheduler_rejects_impossible_and_bad_jobs(s);
    scheduler_is_deterministic(s);
}

/// Capacity, including existing allocations, is never exceeded.
pub fn scheduler_respects_capacity(s: &dyn Scheduler) {
    let mut snap = cluster();
    snap.allocations.push(crate::Allocation {
        id: "old".into(),
        node: "n1".into(),
        resources: Resources::new(3500, 1024),
        ports: BTreeSet::new(),
    });
    let job = Job::new("cap", vec![TaskGroup::new("web", 9, Resources::new(1000, 1024))]);
    let plan = s.plan(&snap, &job).unwrap();
    assert_plan_valid(&snap, &job, &plan);
    // Free cpu: n1 500, n2 4000, n3 2000 -> 6 tasks of 1000.
    assert_eq!(plan.placements.len(), 6, "fills exactly the free capacity");
    assert_eq!(plan.unplaced[0].count, 3);
}

/// Equality constraints filter nodes.
pub fn scheduler_respects_constraints(s: &dyn Scheduler) {
    let snap = cluster();
    let job = Job::new(
        "cons",
        vec![
            TaskGroup::new("in-a", 3, Resources::new(500, 512)).with_constraint(Constraint::equal("zone", "a")),
            TaskGroup::new("not-a", 3, Resources::new(500, 512)).with_constraint(Constraint::not_equal("zone", "a")),
        ],
    );
    let plan = s.plan(&snap, &job).unwrap();
    assert!(plan.is_complete(), "{plan:?}");
    assert_plan_valid(&snap, &job, &plan);
    for p in &plan.placements {
        let expect_a = p.group == "in-a";
        assert_eq!(p.node == "n1" || p.node == "n3", expect_a, "{p:?}");
    }
}

/// A static port is used once per node, so N tasks need N nodes.
pub fn scheduler_never_double_books_static_ports(s: &dyn Scheduler) {
    let mut snap = cluster();
    snap.allocations.push(crate::Allocation {
        id: "holder".into(),
        node: "n2".into(),
        resources: Resources::new(1, 1),
        ports: BTreeSet::from([8080]),
    });
    let job = Job::new("ports", vec![TaskGroup::new("web", 3, Resources::new(100, 64)).with_static_port(8080)]);
    let plan = s.plan(&snap, &job).unwrap();
    assert_plan_valid(&snap, &job, &plan);
    assert_eq!(plan.placements.len(), 2);
    assert_eq!(plan.unplaced[0].explanation.exhausted.get(&Dimension::Ports), Some(&3));
}

/// Unplaced tasks say why: per constraint and per exhausted dimension.
pub fn scheduler_explains_what_did_not_fit(s: &dyn Scheduler) {
    let mut snap = cluster();
    snap.nodes[1].eligible = false;
    let job = Job::new("why", vec![TaskGroup::new("big", 3, Resources::new(3000, 1024)).with_constraint(Constraint::equal("zone", "a"))]);
    let plan = s.plan(&snap, &job).unwrap();
    assert_eq!(plan.placements.len(), 1, "only n1 has 3000 free in zone a");
    let e = &plan.unplaced[0].explanation;
    assert_eq!((plan.unplaced[0].count, e.nodes_evaluated, e.nodes_ineligible), (2, 3, 1));
    assert_eq!(e.exhausted.get(&Dimension::Cpu), Some(&2), "n1 (now full) and n3 (too small) lack cpu: {e}");
    let text = e.to_string();
    assert!(text.contains("3 nodes evaluated") && text.contains("cpu"), "{text}");
    let job = Job::new("why2", vec![TaskGroup::new("g", 1, Resources::new(1, 1)).with_constraint(Constraint::equal("zone", "z"))]);
    let plan = s.plan(&snap, &job).unwrap();
    assert_eq!(plan.unplaced[0].explanation.filtered_by_constraint.get("zone = z"), Some(&2));
}

/// Jobs that can never fit, and malformed jobs, are typed errors naming the value.
pub fn scheduler_rejects_impossible_and_bad_jobs(s: &dyn Scheduler) {
    let snap = cluster();
    match s.plan(&snap, &Job::new("huge", vec![TaskGroup::new("g", 1, Resources::new(100, 9000))])) {
        Err(Error::ExceedsNodeCapacity { group, dimension: Dimension::Memory, requested: 9000, largest: 8192 }) => assert_eq!(group, "g"),
        other => panic!("expected ExceedsNodeCapacity, got {other:?}"),
    }
    let bad = [
        Job::new("", vec![]),
        Job::new("j", vec![TaskGroup::new("g", 1, Resources::new(1, 1)), TaskGroup::new("g", 1, Resources::new(1, 1))]),
        Job::new("j", vec![TaskGroup::new("g", 1, Resources::default())]),
        Job::new("j", vec![TaskGroup::new("g", 1, Resources::new(1, 1)).with_static_port(0)]),
        Job::new("j", vec![TaskGroup::new("bad name", 1, Resources::new(1, 1))]),
    ];
    for job in bad {
        let err = s.plan(&snap, &job).unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{job:?}: {err}");
    }
    let mut dup = cluster();
    dup.nodes.push(Node::new("n1", Resources::new(1, 1)));
    assert!(matches!(s.plan(&dup, &Job::new("j", vec![])), Err(Error::InvalidInput { field: "node id", .. })));
}

/// Same input, same plan.
pub fn scheduler_is_deterministic(s: &dyn Scheduler) {
    let snap = cluster();
    let job = Job::new("det", vec![TaskGroup::new("a", 5, Resources::new(700, 900)), TaskGroup::new("b", 4, Resources::new(300, 2000))]);
    let first = s.plan(&snap, &job).unwrap();
    for _ in 0..5 {
        assert_eq!(s.plan(&snap, &job).unwrap(), first);
    }
}

/// Makes a spec that runs `script` with a POSIX shell, for the driver under test (a
/// local `sh` for processes, `busybox sh` in an image for containers).
pub type ShellSpec<'a> = &'a (dyn Fn(&str, &str) -> TaskSpec + Sync);

async fn wait_exit(d: &dyn Driver, id: &str) -> TaskState {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = d.inspect(id).await.unwrap().state;
        if s.is_exited() {
            return s;
        }
        assert!(Instant::now() < deadline, "task {id} still running after 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_line(d: &dyn Driver, id: &str, want: &str) {
    let mut out = d.output(id).await.unwrap();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(l) = out.next().await {
            if l.line == want {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "task {id} never printed {want:?}");
}

/// Every driver scenario.
pub async fn driver_all(d: &dyn Driver, shell: ShellSpec<'_>) {
    driver_captures_output_and_exit_code(d, shell).await;
    driver_stop_sends_term_first(d, shell).await;
    driver_stop_kills_after_grace(d, shell).await;
    driver_rejects_bad_and_duplicate_tasks(d, shell).await;
}

/// Stdout and stderr lines arrive tagged; the exit code is reported.
pub async fn driver_captures_output_and_exit_code(d: &dyn Driver, shell: ShellSpec<'_>) {
    let id = unique("out");
    d.start(shell(&id, "echo to-out; echo to-err >&2; exit 3")).await.unwrap();
    assert_eq!(wait_exit(d, &id).await, TaskState::Exited { code: Some(3), signal: None });
    let lines: Vec<(OutputStream, String)> =
        tokio::time::timeout(Duration::from_secs(10), d.output(&id).await.unwrap().map(|l| (l.stream, l.line)).collect())
            .await
            .expect("output stream ends after exit");
    assert!(lines.contains(&(OutputStream::Stdout, "to-out".into())), "{lines:?}");
    assert!(lines.contains(&(OutputStream::Stderr, "to-err".into())), "{lines:?}");
    d.remove(&id).await.unwrap();
    assert!(matches!(d.inspect(&id).await, Err(Error::NotFound { .. })));
}

/// Stop sends SIGTERM first; a task that handles it exits without waiting out the grace.
pub async fn driver_stop_sends_term_first(d: &dyn Driver, shell: ShellSpec<'_>) {
    let id = unique("term");
    d.start(shell(&id, "trap 'echo got-term; exit 7' TERM; echo ready; while true; do sleep 0.1; done")).await.unwrap();
    wait_line(d, &id, "ready").await;
    let t0 = Instant::now();
    let status = d.stop(&id, Duration::from_secs(15)).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10), "stop waited {:?} for a task that exits on TERM", t0.elapsed());
    assert_eq!(status.state, TaskState::Exited { code: Some(7), signal: None });
    wait_line(d, &id, "got-term").await;
    d.remove(&id).await.unwrap();
}

/// A task ignoring SIGTERM is killed once the grace period is over, not before.
pub async fn driver_stop_kills_after_grace(d: &dyn Driver, shell: ShellSpec<'_>) {
    let id = unique("kill");
    d.start(shell(&id, "trap '' TERM; echo ready; while true; do sleep 0.1; done")).await.unwrap();
    wait_line(d, &id, "ready").await;
    let t0 = Instant::now();
    let status = d.stop(&id, Duration::from_millis(800)).await.unwrap();
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(800), "killed before the grace period ended ({took:?})");
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
    assert!(matches!(status.state, TaskState::Exited { signal: Some(9), .. } | TaskState::Exited { code: Some(137), .. }), "{status:?}");
    d.remove(&id).await.unwrap();
}

/// Bad specs, duplicate ids and unknown ids are typed errors.
pub async fn driver_rejects_bad_and_duplicate_tasks(d: &dyn Driver, shell: ShellSpec<'_>) {
    let id = unique("dup");
    d.start(shell(&id, "echo ready; while true; do sleep 0.1; done")).await.unwrap();
    assert!(matches!(d.start(shell(&id, "true")).await, Err(Error::Conflict { .. })), "duplicate running id");
    assert!(matches!(d.remove(&id).await, Err(Error::Conflict { .. })), "cannot remove a running task");
    d.stop(&id, Duration::from_secs(5)).await.unwrap();
    d.remove(&id).await.unwrap();
    assert!(matches!(d.start(TaskSpec::new("x", Vec::<String>::new())).await, Err(Error::InvalidInput { field: "command", .. })));
    assert!(matches!(d.start(shell("bad/id", "true")).await, Err(Error::InvalidInput { field: "task id", .. })));
    assert!(matches!(d.stop("no-such-task", Duration::ZERO).await, Err(Error::NotFound { .. })));
    assert!(matches!(d.output("no-such-task").await, Err(Error::NotFound { .. })));
}

/// Every volume scenario.
pub async fn volumes_all(v: &dyn VolumeManager) {
    let name = unique("vol");
    let labels = BTreeMap::from([("app".to_owned(), "db".to_owned())]);
    let created = v.create(&name, labels.clone()).await.unwrap();
    assert_eq!(created.labels, labels);
    assert!(matches!(v.create(&name, BTreeMap::new()).await, Err(Error::Conflict { .. })));
    assert_eq!(v.get(&name).await.unwrap(), created);
    assert!(v.list().await.unwrap().contains(&created));
    v.remove(&name).await.unwrap();
    assert!(matches!(v.get(&name).await, Err(Error::NotFound { .. })));
    assert!(matches!(v.remove(&name).await, Err(Error::NotFound { .. })));
    for bad in ["", "..", "../etc", "a/b", ".hidden"] {
        assert!(matches!(v.create(bad, BTreeMap::new()).await, Err(Error::InvalidInput { field: "volume name", .. })), "{bad:?}");
    }
}
