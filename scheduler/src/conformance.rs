//! Conformance scenarios for `Scheduler`, `Driver` and `VolumeManager` (feature
//! `conformance`). Backends run all of them against the real thing; each panics with a
//! message on any deviation.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::{
    Allocation, ClusterSnapshot, Constraint, ConstraintOp, Dimension, Driver, Eligibility, Error, Job, Node, OutputStream, Plan, Resources,
    RestartPolicy, Scheduler, TaskGroup, TaskSpec, TaskState, VolumeAccess, VolumeManager,
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
        ..ClusterSnapshot::default()
    }
}

/// Like [`validate_plan`], panicking with the violations.
pub fn assert_plan_valid(snapshot: &ClusterSnapshot, job: &Job, plan: &Plan) {
    if let Err(v) = validate_plan(snapshot, job, plan) {
        panic!("plan violates the cluster's rules:\n{}", v.join("\n"));
    }
}

/// An independent check of a plan against the snapshot it was made for. It shares no
/// code with the engine (its own constraint evaluation, its own counting): nothing
/// over-committed, no port twice on a node or outside the node's rules, every constraint
/// (including distinct ones) held, only eligible nodes, evictions only of allocations at
/// least 10 priority points lower, volumes local to one node with at most one writer when
/// single-writer. Returns every violation found.
pub fn validate_plan(snapshot: &ClusterSnapshot, job: &Job, plan: &Plan) -> Result<(), Vec<String>> {
    let mut v = Vec::new();
    let nodes: BTreeMap<&str, &Node> = snapshot.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let evicted: BTreeSet<&str> = plan.evictions.iter().map(|e| e.allocation.as_str()).collect();
    let live: Vec<&Allocation> = snapshot.allocations.iter().filter(|a| !evicted.contains(a.id.as_str())).collect();
    for e in &plan.evictions {
        match snapshot.allocations.iter().find(|a| a.id == e.allocation) {
            None => v.push(format!("eviction of unknown allocation {}", e.allocation)),
            Some(a) if u16::from(a.priority) + 10 > u16::from(job.priority) => {
                v.push(format!("evicted {} (priority {}) for a job of priority {}", a.id, a.priority, job.priority))
            }
            Some(_) => {}
        }
    }
    let mut used: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
    let mut ports: BTreeSet<(&str, u16)> = BTreeSet::new();
    for a in &live {
        let u = used.entry(a.node.as_str()).or_default();
        u.0 += a.resources.cpu_millis;
        u.1 += a.resources.memory_mb;
        u.2 += a.resources.disk_mb;
        for p in &a.ports {
            ports.insert((a.node.as_str(), *p));
        }
    }
    let mut group_on_node: BTreeMap<(&str, &str), u32> = BTreeMap::new();
    for a in live.iter().filter(|a| a.job == job.id) {
        *group_on_node.entry((a.group.as_str(), a.node.as_str())).or_default() += 1;
    }
    let mut writers: BTreeMap<String, u32> = BTreeMap::new();
    let mut volume_node: BTreeMap<String, String> = snapshot.volumes.iter().map(|x| (x.name.clone(), x.node.clone())).collect();
    let existing: BTreeSet<&str> = snapshot.volumes.iter().map(|x| x.name.as_str()).collect();
    let mut single: BTreeSet<String> =
        snapshot.volumes.iter().filter(|x| x.access == VolumeAccess::SingleWriter).map(|x| x.name.clone()).collect();
    for a in &live {
        for m in a.volumes.iter().filter(|m| !m.read_only) {
            *writers.entry(m.name.clone()).or_default() += 1;
        }
    }
    for p in &plan.placements {
        let Some(group) = job.groups.iter().find(|g| g.name == p.group) else {
            v.push(format!("placement of unknown group {}", p.group));
            continue;
        };
        let Some(node) = nodes.get(p.node.as_str()) else {
            v.push(format!("placement on unknown node {}", p.node));
            continue;
        };
        if node.eligibility != Eligibility::Eligible {
            v.push(format!("{}[{}] placed on ineligible node {}", p.group, p.index, node.id));
        }
        if p.resources != group.resources {
            v.push(format!("{}[{}] reserves {:?}, group asks {:?}", p.group, p.index, p.resources, group.resources));
        }
        for c in job
            .constraints
            .iter()
            .chain(&group.constraints)
            .filter(|c| !matches!(c.op, ConstraintOp::DistinctHosts | ConstraintOp::DistinctProperty))
        {
            if !holds(node, c) {
                v.push(format!("{}[{}] on {} breaks constraint {c}", p.group, p.index, node.id));
            }
        }
        let u = used.entry(node.id.as_str()).or_default();
        u.0 += p.resources.cpu_millis;
        u.1 += p.resources.memory_mb;
        u.2 += p.resources.disk_mb;
        *group_on_node.entry((group.name.as_str(), node.id.as_str())).or_default() += 1;
        for port in &p.ports {
            if !ports.insert((node.id.as_str(), *port)) {
                v.push(format!("port {port} double-booked on {}", node.id));
            }
            if node.reserved_ports.contains(port) {
                v.push(format!("reserved port {port} given out on {}", node.id));
            }
            let is_static = group.static_ports.contains(port);
            if !is_static && !(node.dynamic_ports.start..=node.dynamic_ports.end).contains(port) {
                v.push(format!("dynamic port {port} outside {}'s range", node.id));
            }
        }
        let want_ports = group.static_ports.len() + usize::from(group.dynamic_ports);
        if p.ports.len() != want_ports {
            v.push(format!("{}[{}] got {} ports, wants {want_ports}", p.group, p.index, p.ports.len()));
        }
        for (req, m) in group.volumes.iter().zip(&p.volumes) {
            let home = volume_node.entry(m.name.clone()).or_insert_with(|| node.id.clone());
            if *home != node.id {
                v.push(format!("volume {} lives on {} but {}[{}] mounts it on {}", m.name, home, p.group, p.index, node.id));
            }
            if req.access == VolumeAccess::SingleWriter && !existing.contains(m.name.as_str()) {
                single.insert(m.name.clone());
            }
            if !m.read_only {
                *writers.entry(m.name.clone()).or_default() += 1;
            }
        }
    }
    for (name, n) in &writers {
        if *n > 1 && single.contains(name) {
            v.push(format!("single-writer volume {name} has {n} writers"));
        }
    }
    for (node, (c, m, d)) in &used {
        let Some(n) = nodes.get(node) else { continue };
        let over = *c > n.capacity.cpu_millis || *m > n.capacity.memory_mb || *d > n.capacity.disk_mb;
        // Only the plan's doing if the plan put something there.
        if over && plan.placements.iter().any(|p| p.node == *node) {
            v.push(format!(
                "node {node} over-committed: cpu {c}/{}, memory {m}/{}, disk {d}/{}",
                n.capacity.cpu_millis, n.capacity.memory_mb, n.capacity.disk_mb
            ));
        }
    }
    for group in &job.groups {
        for c in &group.constraints {
            match c.op {
                ConstraintOp::DistinctHosts => {
                    for ((g, node), n) in &group_on_node {
                        if *g == group.name && *n > 1 {
                            v.push(format!("distinct_hosts broken: {n} tasks of {g} on {node}"));
                        }
                    }
                }
                ConstraintOp::DistinctProperty => {
                    let limit: u32 = if c.value.is_empty() { 1 } else { c.value.parse().unwrap_or(1) };
                    let mut per_value: BTreeMap<Option<String>, u32> = BTreeMap::new();
                    for ((g, node), n) in &group_on_node {
                        if *g == group.name {
                            *per_value.entry(nodes.get(node).and_then(|n| lookup(n, &c.target))).or_default() += n;
                        }
                    }
                    for (value, n) in per_value {
                        if n > limit {
                            v.push(format!("distinct_property {} broken: {n} tasks on value {value:?} (limit {limit})", c.target));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    if v.is_empty() {
        Ok(())
    } else {
        Err(v)
    }
}

fn lookup(node: &Node, target: &str) -> Option<String> {
    match target.split_once('.')? {
        ("attr", k) => node.attributes.get(k).cloned(),
        ("label", k) => node.labels.get(k).cloned(),
        ("node", "datacenter") => Some(node.datacenter.clone()),
        ("node", "pool") => Some(node.pool.clone()),
        ("node", "id") => Some(node.id.clone()),
        _ => None,
    }
}

/// The validator's own ordering: numbers as numbers, else dotted versions.
fn order(a: &str, b: &str) -> std::cmp::Ordering {
    if let (Ok(x), Ok(y)) = (a.trim().parse::<f64>(), b.trim().parse::<f64>()) {
        return x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal);
    }
    let parts = |s: &str| s.trim().trim_start_matches('v').split(['.', '-', '+', '_']).map(str::to_owned).collect::<Vec<_>>();
    let (pa, pb) = (parts(a), parts(b));
    for i in 0..pa.len().max(pb.len()) {
        let (x, y) = match (pa.get(i), pb.get(i)) {
            (Some(x), Some(y)) => (x, y),
            (None, _) => return std::cmp::Ordering::Less,
            (_, None) => return std::cmp::Ordering::Greater,
        };
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(p), Ok(q)) => p.cmp(&q),
            _ => x.cmp(y),
        };
        if o.is_ne() {
            return o;
        }
    }
    std::cmp::Ordering::Equal
}

/// The validator's own reading of a constraint (deliberately not the engine's code).
fn holds(node: &Node, c: &Constraint) -> bool {
    let have = lookup(node, &c.target);
    let items = |s: &str| s.split(',').map(|x| x.trim().to_owned()).filter(|x| !x.is_empty()).collect::<BTreeSet<_>>();
    match c.op {
        ConstraintOp::Equal => have.as_deref() == Some(c.value.as_str()),
        ConstraintOp::NotEqual => have.as_deref() != Some(c.value.as_str()),
        ConstraintOp::Less => have.is_some_and(|h| order(&h, &c.value).is_lt()),
        ConstraintOp::LessEqual => have.is_some_and(|h| order(&h, &c.value).is_le()),
        ConstraintOp::Greater => have.is_some_and(|h| order(&h, &c.value).is_gt()),
        ConstraintOp::GreaterEqual => have.is_some_and(|h| order(&h, &c.value).is_ge()),
        ConstraintOp::Version => have.is_some_and(|h| {
            c.value.split(',').all(|clause| {
                let clause = clause.trim();
                let (cmp, ver): (fn(std::cmp::Ordering) -> bool, &str) = if let Some(r) = clause.strip_prefix(">=") {
                    (std::cmp::Ordering::is_ge, r)
                } else if let Some(r) = clause.strip_prefix("<=") {
                    (std::cmp::Ordering::is_le, r)
                } else if let Some(r) = clause.strip_prefix("!=") {
                    (std::cmp::Ordering::is_ne, r)
                } else if let Some(r) = clause.strip_prefix('>') {
                    (std::cmp::Ordering::is_gt, r)
                } else if let Some(r) = clause.strip_prefix('<') {
                    (std::cmp::Ordering::is_lt, r)
                } else {
                    (std::cmp::Ordering::is_eq, clause.trim_start_matches('='))
                };
                cmp(order(&h, ver.trim()))
            })
        }),
        ConstraintOp::Regex => have.is_some_and(|h| regex::Regex::new(&c.value).is_ok_and(|re| re.is_match(&h))),
        ConstraintOp::SetContainsAny => have.is_some_and(|h| !items(&h).is_disjoint(&items(&c.value))),
        ConstraintOp::SetContainsAll => have.is_some_and(|h| items(&c.value).is_subset(&items(&h))),
        ConstraintOp::IsSet => have.is_some(),
        ConstraintOp::IsNotSet => have.is_none(),
        ConstraintOp::DistinctHosts | ConstraintOp::DistinctProperty => true,
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
    snap.allocations.push(Allocation::new("old", "n1", "other", "g", Resources::new(3500, 1024)));
    let job = Job::new("cap", vec![TaskGroup::new("web", 9, Resources::new(1000, 1024))]);
    let plan = s.plan(&snap, &job).unwrap();
    assert_plan_valid(&snap, &job, &plan);
    // Free cpu: n1 500, n2 4000, n3 2000 -> 6 tasks of 1000.
    assert_eq!(plan.placements.len(), 6, "fills exactly the free capacity");
    assert_eq!(plan.unplaced[0].count, 3);
}

/// Constraints filter nodes.
pub fn scheduler_respects_constraints(s: &dyn Scheduler) {
    let snap = cluster();
    let job = Job::new(
        "cons",
        vec![
            TaskGroup::new("in-a", 3, Resources::new(500, 512)).with_constraint(Constraint::equal("attr.zone", "a")),
            TaskGroup::new("not-a", 3, Resources::new(500, 512)).with_constraint(Constraint::not_equal("attr.zone", "a")),
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
    let mut holder = Allocation::new("holder", "n2", "other", "g", Resources::new(1, 1));
    holder.ports.insert(8080);
    snap.allocations.push(holder);
    let job = Job::new("ports", vec![TaskGroup::new("web", 3, Resources::new(100, 64)).with_static_port(8080)]);
    let plan = s.plan(&snap, &job).unwrap();
    assert_plan_valid(&snap, &job, &plan);
    assert_eq!(plan.placements.len(), 2);
    assert_eq!(plan.unplaced[0].explanation.exhausted.get(&Dimension::Ports), Some(&3));
}

/// Unplaced tasks say why: per constraint and per exhausted dimension, adding up.
pub fn scheduler_explains_what_did_not_fit(s: &dyn Scheduler) {
    let mut snap = cluster();
    snap.nodes[1].eligibility = Eligibility::Draining;
    let job =
        Job::new("why", vec![TaskGroup::new("big", 3, Resources::new(3000, 1024)).with_constraint(Constraint::equal("attr.zone", "a"))]);
    let plan = s.plan(&snap, &job).unwrap();
    assert_eq!(plan.placements.len(), 1, "only n1 has 3000 free in zone a");
    let e = &plan.unplaced[0].explanation;
    assert_eq!((plan.unplaced[0].count, e.nodes_evaluated, e.nodes_ineligible), (2, 3, 1));
    assert_eq!(e.exhausted.get(&Dimension::Cpu), Some(&2), "n1 (now full) and n3 (too small) lack cpu: {e}");
    assert!(e.adds_up(), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("3 nodes evaluated") && text.contains("cpu"), "{text}");
    let job = Job::new("why2", vec![TaskGroup::new("g", 1, Resources::new(1, 1)).with_constraint(Constraint::equal("attr.zone", "z"))]);
    let plan = s.plan(&snap, &job).unwrap();
    assert_eq!(plan.unplaced[0].explanation.filtered_by_constraint.get("attr.zone = z"), Some(&2));
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
        Job::new(
            "j",
            vec![TaskGroup::new("g", 1, Resources::new(1, 1)).with_constraint(Constraint::new("attr.x", ConstraintOp::Regex, "(("))],
        ),
        Job::new("j", vec![TaskGroup::new("g", 1, Resources::new(1, 1)).with_constraint(Constraint::equal("zone", "a"))]),
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
    driver_restarts_failed_tasks_under_their_policy(d, shell).await;
}

/// A failing task is restarted in place up to its policy's limit, then stays exited with
/// its last exit code; a task that succeeds is not restarted; `stop` during a restart
/// backoff ends the task for good.
pub async fn driver_restarts_failed_tasks_under_their_policy(d: &dyn Driver, shell: ShellSpec<'_>) {
    let policy = RestartPolicy { max_restarts: 2, initial_backoff: Duration::from_millis(100), max_backoff: Duration::from_millis(400) };
    let id = unique("restart");
    d.start(TaskSpec { restart: Some(policy), ..shell(&id, "echo run; exit 3") }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s = d.inspect(&id).await.unwrap();
        if s.state.is_exited() && s.restarts == 2 {
            break s;
        }
        assert!(Instant::now() < deadline, "not restarted twice then left exited: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.state, TaskState::Exited { code: Some(3), signal: None });
    let runs = tokio::time::timeout(
        Duration::from_secs(10),
        d.output(&id).await.unwrap().filter(|l| futures::future::ready(l.line == "run")).count(),
    )
    .await
    .expect("output ends");
    assert_eq!(runs, 3, "the first run and two restarts");
    d.remove(&id).await.unwrap();

    let ok = unique("restart-ok");
    d.start(TaskSpec { restart: Some(policy), ..shell(&ok, "exit 0") }).await.unwrap();
    assert_eq!(wait_exit(d, &ok).await, TaskState::Exited { code: Some(0), signal: None });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(d.inspect(&ok).await.unwrap().restarts, 0, "success is not a failure");
    d.remove(&ok).await.unwrap();

    let slow = unique("restart-stop");
    let patient = RestartPolicy { max_restarts: 5, initial_backoff: Duration::from_secs(3), max_backoff: Duration::from_secs(3) };
    d.start(TaskSpec { restart: Some(patient), ..shell(&slow, "echo up; sleep 0.3; exit 1") }).await.unwrap();
    // Let the first run fail, so the stop lands in (or right before) the backoff.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let asked = Instant::now();
    let stopped = d.stop(&slow, Duration::from_secs(1)).await.unwrap();
    assert!(stopped.state.is_exited(), "{stopped:?}");
    assert!(asked.elapsed() < Duration::from_secs(3), "stop waited out the backoff");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = d.inspect(&slow).await.unwrap();
    // (Docker restarts with its own 100 ms backoff, so a restart may precede the stop.)
    assert!(later.state.is_exited() && later.restarts == stopped.restarts, "restarted after stop: {later:?}");
    d.remove(&slow).await.unwrap();
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
    volume_archives_round_trip(v).await;
    volume_imports_are_all_or_nothing(v).await;
    volume_imports_drop_setuid_and_foreign_owners(v).await;
}

/// An archive from a peer holding a setuid-root program and files of a foreign owner:
/// imported, the program is a plain file (no setuid, no setgid; the rest of its mode
/// kept) and nothing belongs to the archive's owners (by default).
pub async fn volume_imports_drop_setuid_and_foreign_owners(v: &dyn VolumeManager) {
    let name = unique("setuid");
    let mut b = tar::Builder::new(Vec::new());
    for (path, mode, uid) in [("tool", 0o4755, 0), ("shared", 0o2775, 4242), ("plain", 0o640, 4242)] {
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(uid);
        h.set_gid(uid);
        b.append_data(&mut h, path, &b"data"[..]).unwrap();
    }
    v.import(&name, BTreeMap::new(), chunked(b.into_inner().unwrap())).await.unwrap();
    let mut bytes = Vec::new();
    let mut tar = v.export(&name).await.unwrap();
    while let Some(chunk) = tar.next().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    let mut seen = BTreeMap::new();
    for entry in tar::Archive::new(bytes.as_slice()).entries().unwrap() {
        let e = entry.unwrap();
        let path = e.path().unwrap().to_string_lossy().trim_start_matches("./").to_owned();
        seen.insert(path, (e.header().mode().unwrap() & 0o7777, e.header().uid().unwrap()));
    }
    assert_eq!(seen.get("tool").map(|s| s.0), Some(0o755), "setuid dropped, the rest kept: {seen:?}");
    assert_eq!(seen.get("shared").map(|s| s.0), Some(0o775), "setgid dropped: {seen:?}");
    assert_eq!(seen.get("plain").map(|s| s.0), Some(0o640));
    assert!(seen.values().all(|(_, uid)| *uid != 4242), "no file belongs to the archive's owner: {seen:?}");
    v.remove(&name).await.unwrap();
}

/// One entry of a volume archive, as the scenarios compare them: kind, mode, and the
/// contents (files) or target (links).
pub type ArchiveEntry = (char, u32, Vec<u8>);

/// A tar archive of `files` (path, contents, mode) and `links` (path, target), in 1000-byte
/// chunks (so importers see an archive split at arbitrary points).
pub fn archive_of(files: &[(&str, &[u8], u32)], links: &[(&str, &str)]) -> crate::TarStream {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, path, *data).unwrap();
    }
    for (path, target) in links {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        b.append_link(&mut h, path, target).unwrap();
    }
    chunked(b.into_inner().unwrap())
}

/// `bytes` as a tar stream of 1000-byte chunks.
pub fn chunked(bytes: Vec<u8>) -> crate::TarStream {
    let chunks: Vec<std::io::Result<bytes::Bytes>> = bytes.chunks(1000).map(|c| Ok(bytes::Bytes::copy_from_slice(c))).collect();
    Box::pin(futures::stream::iter(chunks))
}

/// Reads a whole volume export: path (without `./`) to entry, the root itself left out.
pub async fn export_listing(v: &dyn VolumeManager, name: &str) -> BTreeMap<String, ArchiveEntry> {
    let mut bytes = Vec::new();
    let mut tar = v.export(name).await.unwrap();
    while let Some(chunk) = tar.next().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    let mut out = BTreeMap::new();
    let mut archive = tar::Archive::new(bytes.as_slice());
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        let path = e.path().unwrap().to_string_lossy().trim_start_matches("./").trim_end_matches('/').to_owned();
        if path.is_empty() || path == "." {
            continue;
        }
        let kind = e.header().entry_type();
        let mode = e.header().mode().unwrap() & 0o7777;
        let (k, body) = if kind.is_symlink() {
            ('l', e.link_name().unwrap().unwrap().to_string_lossy().as_bytes().to_vec())
        } else if kind.is_dir() {
            ('d', Vec::new())
        } else {
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            ('f', data)
        };
        out.insert(path, (k, mode, body));
    }
    out
}

/// Import, export, import again: files, modes, directories and symlinks survive.
pub async fn volume_archives_round_trip(v: &dyn VolumeManager) {
    let (a, b) = (unique("vol-a"), unique("vol-b"));
    let labels = BTreeMap::from([("app".to_owned(), "db".to_owned())]);
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let files: [(&str, &[u8], u32); 3] = [("a.txt", b"hello\n", 0o644), ("bin/run", b"#!/bin/sh\n", 0o755), ("data/big", &big, 0o600)];
    let imported = v.import(&a, labels.clone(), archive_of(&files, &[("latest", "data/big")])).await.unwrap();
    assert_eq!(imported.labels, labels);
    assert_eq!(v.get(&a).await.unwrap(), imported);
    let first = export_listing(v, &a).await;
    assert_eq!(first.get("a.txt"), Some(&('f', 0o644, b"hello\n".to_vec())), "{:?}", first.keys());
    assert_eq!(first.get("bin/run"), Some(&('f', 0o755, b"#!/bin/sh\n".to_vec())));
    assert_eq!(first.get("data/big").map(|e| (e.0, e.1, e.2.len())), Some(('f', 0o600, big.len())));
    assert_eq!(first.get("data/big").map(|e| &e.2), Some(&big), "contents intact");
    assert_eq!(first.get("latest").map(|e| (e.0, e.2.clone())), Some(('l', b"data/big".to_vec())), "symlink kept as a link");
    assert!(matches!(first.get("bin"), Some(('d', _, _))));
    // The export imports elsewhere to the same contents.
    let tar = v.export(&a).await.unwrap();
    v.import(&b, BTreeMap::new(), tar).await.unwrap();
    assert_eq!(export_listing(v, &b).await, first);
    assert!(matches!(v.export("no-such-volume").await, Err(Error::NotFound { .. })));
    v.remove(&a).await.unwrap();
    v.remove(&b).await.unwrap();
}

/// A bad or cut archive, or an existing name, leaves no volume behind and changes none.
pub async fn volume_imports_are_all_or_nothing(v: &dyn VolumeManager) {
    let existing = unique("vol-kept");
    v.import(&existing, BTreeMap::new(), archive_of(&[("keep", b"1", 0o644)], &[])).await.unwrap();
    let before = export_listing(v, &existing).await;
    let other = archive_of(&[("other", b"2", 0o644)], &[]);
    assert!(matches!(v.import(&existing, BTreeMap::new(), other).await, Err(Error::Conflict { .. })));
    assert_eq!(export_listing(v, &existing).await, before, "an import never overwrites");

    // An entry climbing out of the volume (written raw: tar's builder refuses such paths).
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..9].copy_from_slice(b"../escape");
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &b"x"[..]).unwrap();
    let climbing = unique("vol-climb");
    let r = v.import(&climbing, BTreeMap::new(), chunked(b.into_inner().unwrap())).await;
    assert!(matches!(r, Err(Error::InvalidInput { .. })), "{r:?}");
    assert!(matches!(v.get(&climbing).await, Err(Error::NotFound { .. })), "nothing left of a refused import");

    // A stream that fails half-way (the source node died).
    let cut = unique("vol-cut");
    let big: Vec<u8> = vec![7; 200_000];
    let mut whole = Vec::new();
    let mut stream = archive_of(&[("big", &big, 0o644)], &[]);
    while let Some(c) = stream.next().await {
        whole.extend_from_slice(&c.unwrap());
    }
    let head: Vec<std::io::Result<bytes::Bytes>> = vec![
        Ok(bytes::Bytes::copy_from_slice(&whole[..100_000])),
        Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "source went away")),
    ];
    let r = v.import(&cut, BTreeMap::new(), Box::pin(futures::stream::iter(head))).await;
    assert!(r.is_err(), "a cut stream must fail the import");
    assert!(matches!(v.get(&cut).await, Err(Error::NotFound { .. })), "nothing left of a cut import");

    // Bytes that are not a tar archive.
    let junk = unique("vol-junk");
    let r = v.import(&junk, BTreeMap::new(), chunked(b"this is not a tar archive, not even close to one".repeat(20))).await;
    assert!(matches!(r, Err(Error::InvalidInput { .. })), "{r:?}");
    assert!(matches!(v.get(&junk).await, Err(Error::NotFound { .. })));
    v.remove(&existing).await.unwrap();
}

/// The validator's reading of one constraint on one node, for callers that check plans
/// their own way (the placement bench's reference policies).
pub fn constraint_holds(node: &Node, c: &Constraint) -> bool {
    holds(node, c)
}

/// An independent check of a whole cluster against the jobs that placed its allocations:
/// no node over-committed, no port twice on a node, every allocation of a known job on a
/// node that satisfies its job's and group's constraints, distinct limits held, volumes on
/// one node with at most one writer when single-writer. Shares no code with the engine.
pub fn validate_cluster(snapshot: &ClusterSnapshot, jobs: &[Job]) -> Result<(), Vec<String>> {
    let mut v = Vec::new();
    let nodes: BTreeMap<&str, &Node> = snapshot.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let jobs: BTreeMap<&str, &Job> = jobs.iter().map(|j| (j.id.as_str(), j)).collect();
    let mut used: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
    let mut ports: BTreeSet<(&str, u16)> = BTreeSet::new();
    let mut per_group_node: BTreeMap<(&str, &str, &str), u32> = BTreeMap::new();
    let mut writers: BTreeMap<&str, u32> = BTreeMap::new();
    let mut homes: BTreeMap<&str, &str> = snapshot.volumes.iter().map(|x| (x.name.as_str(), x.node.as_str())).collect();
    for a in &snapshot.allocations {
        let Some(node) = nodes.get(a.node.as_str()) else {
            v.push(format!("{} on unknown node {}", a.id, a.node));
            continue;
        };
        let u = used.entry(node.id.as_str()).or_default();
        u.0 += a.resources.cpu_millis;
        u.1 += a.resources.memory_mb;
        u.2 += a.resources.disk_mb;
        for p in &a.ports {
            if !ports.insert((node.id.as_str(), *p)) {
                v.push(format!("port {p} double-booked on {}", node.id));
            }
        }
        for m in &a.volumes {
            let home = homes.entry(m.name.as_str()).or_insert(node.id.as_str());
            if *home != node.id {
                v.push(format!("volume {} used on {} and {}", m.name, home, node.id));
            }
            if !m.read_only {
                *writers.entry(m.name.as_str()).or_default() += 1;
            }
        }
        *per_group_node.entry((a.job.as_str(), a.group.as_str(), node.id.as_str())).or_default() += 1;
        let Some(job) = jobs.get(a.job.as_str()) else { continue };
        let Some(group) = job.groups.iter().find(|g| g.name == a.group) else {
            v.push(format!("{} of unknown group {}/{}", a.id, a.job, a.group));
            continue;
        };
        for c in job.constraints.iter().chain(&group.constraints) {
            if !holds(node, c) {
                v.push(format!("{} on {} breaks constraint {c}", a.id, node.id));
            }
        }
    }
    for (id, (c, m, d)) in &used {
        if let Some(n) = nodes.get(id) {
            if *c > n.capacity.cpu_millis || *m > n.capacity.memory_mb || *d > n.capacity.disk_mb {
                v.push(format!("node {id} over-committed"));
            }
        }
    }
    let access: BTreeMap<&str, VolumeAccess> = snapshot.volumes.iter().map(|x| (x.name.as_str(), x.access)).collect();
    for (name, n) in &writers {
        let single = access.get(name).is_none_or(|a| *a == VolumeAccess::SingleWriter);
        if *n > 1 && single {
            v.push(format!("single-writer volume {name} has {n} writers"));
        }
    }
    for job in jobs.values() {
        for group in &job.groups {
            let on = |node: &str| per_group_node.get(&(job.id.as_str(), group.name.as_str(), node)).copied().unwrap_or(0);
            for c in &group.constraints {
                match c.op {
                    ConstraintOp::DistinctHosts => {
                        for n in nodes.keys() {
                            if on(n) > 1 {
                                v.push(format!("distinct_hosts broken for {}/{} on {n}", job.id, group.name));
                            }
                        }
                    }
                    ConstraintOp::DistinctProperty => {
                        let limit: u32 = if c.value.is_empty() { 1 } else { c.value.parse().unwrap_or(1) };
                        let mut per: BTreeMap<Option<String>, u32> = BTreeMap::new();
                        for (id, node) in &nodes {
                            *per.entry(lookup(node, &c.target)).or_default() += on(id);
                        }
                        if per.values().any(|n| *n > limit) {
                            v.push(format!("distinct_property {} broken for {}/{}", c.target, job.id, group.name));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    if v.is_empty() {
        Ok(())
    } else {
        Err(v)
    }
}
