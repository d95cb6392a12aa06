//! The `Scheduler` trait and `BinPack`, the embedded default placement policy.

use std::collections::{BTreeSet, HashMap};

use crate::error::{validate_id, Dimension, Error, Result};
use crate::model::{ClusterSnapshot, Explanation, Job, Placement, Plan, Resources, TaskGroup, Unplaced};

/// Largest task count one group may ask for; a guard against typos like `count: 1e9`.
pub const MAX_GROUP_COUNT: u32 = 1_000_000;

/// What a scheduler supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SchedulerCapabilities {
    /// Honours `=` and `!=` constraints.
    pub equality_constraints: bool,
    /// Honours static ports.
    pub static_ports: bool,
}

/// Decides where tasks run. Pure and synchronous: the same snapshot and job give the same
/// plan, and nothing is read or written besides the arguments.
pub trait Scheduler: Send + Sync + std::fmt::Debug {
    /// The policy's name.
    fn name(&self) -> &'static str;

    /// What the policy supports.
    fn capabilities(&self) -> SchedulerCapabilities;

    /// Places every task of `job` on `snapshot`, on top of its existing allocations.
    /// Tasks that fit nowhere are listed in [`Plan::unplaced`] with an explanation; a job
    /// that could never fit (bad input, a task larger than any node) is an error.
    fn plan(&self, snapshot: &ClusterSnapshot, job: &Job) -> Result<Plan>;
}

/// Best-fit bin packing over cpu and memory, with static ports and equality constraints.
/// Each task goes to the feasible node that is fullest after placing it, which keeps
/// whole nodes free for large tasks; ties go to the node listed first.
#[derive(Clone, Copy, Debug, Default)]
pub struct BinPack;

/// Mutable per-node view while planning.
struct NodeUse {
    used: Resources,
    ports: BTreeSet<u16>,
}

impl Scheduler for BinPack {
    fn name(&self) -> &'static str {
        "binpack"
    }

    fn capabilities(&self) -> SchedulerCapabilities {
        SchedulerCapabilities { equality_constraints: true, static_ports: true }
    }

    fn plan(&self, snapshot: &ClusterSnapshot, job: &Job) -> Result<Plan> {
        let index = validate(snapshot, job)?;
        let mut usage: Vec<NodeUse> =
            snapshot.nodes.iter().map(|_| NodeUse { used: Resources::default(), ports: BTreeSet::new() }).collect();
        for a in &snapshot.allocations {
            let u = &mut usage[index[a.node.as_str()]];
            u.used = u.used.saturating_add(a.resources);
            u.ports.extend(a.ports.iter().copied());
        }
        let mut plan = Plan::default();
        for group in &job.groups {
            // Constraints depend only on the node, so evaluate them once per group.
            let feasible: Vec<bool> = snapshot.nodes.iter().map(|n| n.eligible && group.constraints.iter().all(|c| c.matches(n))).collect();
            for i in 0..group.count {
                match best_node(snapshot, &usage, &feasible, group) {
                    Some(n) => {
                        let u = &mut usage[n];
                        u.used = u.used.saturating_add(group.resources);
                        u.ports.extend(group.static_ports.iter().copied());
                        plan.placements.push(Placement {
                            group: group.name.clone(),
                            index: i,
                            node: snapshot.nodes[n].id.clone(),
                            resources: group.resources,
                            ports: group.static_ports.clone(),
                        });
                    }
                    None => {
                        plan.unplaced.push(Unplaced {
                            group: group.name.clone(),
                            count: group.count - i,
                            explanation: explain(snapshot, &usage, group),
                        });
                        break;
                    }
                }
            }
        }
        Ok(plan)
    }
}

fn fits(capacity: Resources, u: &NodeUse, group: &TaskGroup) -> Option<Dimension> {
    if let Some(d) = u.used.saturating_add(group.resources).exceeds(capacity) {
        return Some(d);
    }
    group.static_ports.iter().any(|p| u.ports.contains(p)).then_some(Dimension::Ports)
}

fn best_node(snapshot: &ClusterSnapshot, usage: &[NodeUse], feasible: &[bool], group: &TaskGroup) -> Option<usize> {
    let mut best: Option<(u128, usize)> = None;
    for (i, node) in snapshot.nodes.iter().enumerate() {
        if !feasible[i] || fits(node.capacity, &usage[i], group).is_some() {
            continue;
        }
        let after = usage[i].used.saturating_add(group.resources);
        let score = fullness(after.cpu_millis, node.capacity.cpu_millis) + fullness(after.memory_mb, node.capacity.memory_mb);
        if best.is_none_or(|(s, _)| score > s) {
            best = Some((score, i));
        }
    }
    best.map(|(_, i)| i)
}

/// Used fraction in fixed point (parts per 2^32), so scores compare exactly and the
/// result does not depend on float rounding.
fn fullness(used: u64, capacity: u64) -> u128 {
    if capacity == 0 {
        return 0;
    }
    (u128::from(used) << 32) / u128::from(capacity)
}

fn explain(snapshot: &ClusterSnapshot, usage: &[NodeUse], group: &TaskGroup) -> Explanation {
    let mut e = Explanation { nodes_evaluated: snapshot.nodes.len(), ..Explanation::default() };
    for (i, node) in snapshot.nodes.iter().enumerate() {
        if !node.eligible {
            e.nodes_ineligible += 1;
        } else if let Some(c) = group.constraints.iter().find(|c| !c.matches(node)) {
            *e.filtered_by_constraint.entry(c.to_string()).or_default() += 1;
        } else if let Some(d) = fits(node.capacity, &usage[i], group) {
            *e.exhausted.entry(d).or_default() += 1;
        }
    }
    e
}

/// Checks the snapshot and job; returns node id → index.
fn validate<'a>(snapshot: &'a ClusterSnapshot, job: &Job) -> Result<HashMap<&'a str, usize>> {
    validate_id("job id", &job.id)?;
    let mut index = HashMap::with_capacity(snapshot.nodes.len());
    for (i, n) in snapshot.nodes.iter().enumerate() {
        validate_id("node id", &n.id)?;
        if index.insert(n.id.as_str(), i).is_some() {
            return Err(Error::invalid("node id", &n.id, "appears twice in the snapshot"));
        }
    }
    for a in &snapshot.allocations {
        if !index.contains_key(a.node.as_str()) {
            return Err(Error::invalid("allocation node", &a.node, format!("allocation {:?} is on a node not in the snapshot", a.id)));
        }
    }
    let mut names = BTreeSet::new();
    for g in &job.groups {
        validate_id("group name", &g.name)?;
        if !names.insert(g.name.as_str()) {
            return Err(Error::invalid("group name", &g.name, "appears twice in the job"));
        }
        if g.count > MAX_GROUP_COUNT {
            return Err(Error::invalid("group count", g.count.to_string(), format!("must be at most {MAX_GROUP_COUNT}")));
        }
        if g.resources == Resources::default() {
            return Err(Error::invalid("group resources", &g.name, "must ask for some cpu or memory"));
        }
        let mut ports = BTreeSet::new();
        for &p in &g.static_ports {
            if p == 0 || !ports.insert(p) {
                return Err(Error::invalid(
                    "static port",
                    p.to_string(),
                    format!("group {:?}: ports must be 1-65535 and distinct", g.name),
                ));
            }
        }
        for c in &g.constraints {
            if c.attribute.is_empty() {
                return Err(Error::invalid("constraint attribute", "", "must not be empty"));
            }
        }
        // With no eligible node at all the tasks go unplaced with an explanation instead:
        // that is a cluster state (everything draining), not a bad job.
        if !snapshot.nodes.iter().any(|n| n.eligible) {
            continue;
        }
        let largest = snapshot.nodes.iter().filter(|n| n.eligible).fold(Resources::default(), |m, n| Resources {
            cpu_millis: m.cpu_millis.max(n.capacity.cpu_millis),
            memory_mb: m.memory_mb.max(n.capacity.memory_mb),
        });
        if let Some(dimension) = g.resources.exceeds(largest) {
            let (requested, largest) = match dimension {
                Dimension::Cpu => (g.resources.cpu_millis, largest.cpu_millis),
                _ => (g.resources.memory_mb, largest.memory_mb),
            };
            return Err(Error::ExceedsNodeCapacity { group: g.name.clone(), dimension, requested, largest });
        }
    }
    Ok(index)
}
