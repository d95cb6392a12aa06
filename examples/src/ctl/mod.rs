//! What `keelson-ctl` shows and how: summaries of the cluster state (nodes with what
//! they hold, groups, allocations, deployments), each printable as a table for people
//! or as JSON for scripts, and the wait that follows a deployment with progress.

pub mod follow;
pub mod table;

use std::collections::{BTreeMap, HashSet};

use keelson_scheduler::{AllocRecord, AllocStatus, ClusterView, DeployPlan, GroupState, Node, Phase, Resources};
use serde::Serialize;

pub use table::Table;

/// A node as `keelson-ctl nodes` shows it.
#[derive(Debug, Serialize)]
pub struct NodeSummary {
    /// Node id.
    pub id: String,
    /// `ready` (its agent's lease is current) or `lost` (allocations remain, the lease
    /// expired).
    pub status: &'static str,
    /// The node as its agent described it (`None` when lost).
    pub node: Option<Node>,
    /// What its allocations hold (not failed, not stopping).
    pub used: Resources,
    /// Allocations on it, any status.
    pub allocations: usize,
    /// How long ago its agent last renewed its heartbeat lease, in milliseconds (`None`:
    /// lost, or a backend that cannot tell).
    pub since_heartbeat_ms: Option<u64>,
}

/// Every node, live and lost, in id order, with how long ago each live one's agent
/// renewed its heartbeat (from [`keelson_scheduler::ClusterStore::node_heartbeats`]).
pub fn nodes(view: &ClusterView, heartbeats: &BTreeMap<String, std::time::Duration>) -> Vec<NodeSummary> {
    let mut out: BTreeMap<String, NodeSummary> = view
        .nodes
        .iter()
        .map(|n| {
            let since_heartbeat_ms = heartbeats.get(&n.id).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let s = NodeSummary {
                id: n.id.clone(),
                status: "ready",
                node: Some(n.clone()),
                used: Resources::default(),
                allocations: 0,
                since_heartbeat_ms,
            };
            (n.id.clone(), s)
        })
        .collect();
    for a in &view.allocations {
        let s = out.entry(a.node.clone()).or_insert_with(|| NodeSummary {
            id: a.node.clone(),
            status: "lost",
            node: None,
            used: Resources::default(),
            allocations: 0,
            since_heartbeat_ms: None,
        });
        s.allocations += 1;
        if matches!(a.status, AllocStatus::Pending | AllocStatus::Running) {
            s.used = s.used.saturating_add(a.resources);
        }
    }
    out.into_values().collect()
}

fn pairs(map: &BTreeMap<String, String>) -> String {
    map.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// `used/total`.
fn share(used: u64, total: u64) -> String {
    format!("{used}/{total}")
}

/// The nodes table: resources used of total, eligibility, address, labels.
pub fn nodes_table(nodes: &[NodeSummary]) -> Table {
    let mut t = Table::new(&[
        "id",
        "status",
        "heartbeat",
        "eligibility",
        "dc",
        "pool",
        "address",
        "cpu",
        "memory mb",
        "disk mb",
        "allocs",
        "labels",
    ]);
    for s in nodes {
        let n = s.node.as_ref();
        let total = n.map(|n| n.capacity).unwrap_or_default();
        t.row(vec![
            s.id.clone(),
            s.status.into(),
            s.since_heartbeat_ms
                .map(|ms| format!("{} ago", humantime::format_duration(std::time::Duration::from_secs(ms / 1000))))
                .unwrap_or_default(),
            n.map(|n| format!("{:?}", n.eligibility).to_lowercase()).unwrap_or_default(),
            n.map(|n| n.datacenter.clone()).unwrap_or_default(),
            n.map(|n| n.pool.clone()).unwrap_or_default(),
            n.and_then(|n| n.address.clone()).unwrap_or_default(),
            share(s.used.cpu_millis, total.cpu_millis),
            share(s.used.memory_mb, total.memory_mb),
            share(s.used.disk_mb, total.disk_mb),
            s.allocations.to_string(),
            n.map(|n| pairs(&n.labels)).unwrap_or_default(),
        ]);
    }
    t
}

/// One node in full: the table row, then its attributes one per line.
pub fn node_detail(s: &NodeSummary) -> String {
    let mut out = nodes_table(std::slice::from_ref(s)).render();
    if let Some(n) = &s.node {
        out.push_str("\nATTRIBUTES\n");
        for (k, v) in &n.attributes {
            out.push_str(&format!("  {k} = {v}\n"));
        }
    }
    out
}

/// A group as `keelson-ctl jobs` shows it.
#[derive(Debug, Serialize)]
pub struct GroupSummary {
    /// The controller's record.
    #[serde(flatten)]
    pub state: GroupState,
    /// Allocations running now (any version).
    pub running: usize,
}

/// Each group with how many of its allocations run.
pub fn groups(states: Vec<GroupState>, view: &ClusterView) -> Vec<GroupSummary> {
    let lost: HashSet<String> = view.lost_nodes();
    states
        .into_iter()
        .map(|state| {
            let running = view
                .allocations
                .iter()
                .filter(|a| a.job == state.job && a.group == state.group && a.status == AllocStatus::Running && !lost.contains(&a.node))
                .count();
            GroupSummary { state, running }
        })
        .collect()
}

/// A phase in a word or two (`rolling`, `rolled back: why`).
pub fn phase_text(phase: &Phase) -> String {
    match phase {
        Phase::Canary => "canary".into(),
        Phase::AwaitingPromotion => "awaiting promotion".into(),
        Phase::Rolling => "rolling".into(),
        Phase::Recreating => "recreating".into(),
        Phase::Green => "green starting".into(),
        Phase::Verifying { .. } => "verifying".into(),
        Phase::RollingBack { reason } => format!("rolling back: {reason}"),
        Phase::Succeeded => "succeeded".into(),
        Phase::RolledBack { reason } => format!("rolled back: {reason}"),
        Phase::Failed { reason } => format!("failed: {reason}"),
    }
}

/// The jobs table: one row per group.
pub fn jobs_table(groups: &[GroupSummary]) -> Table {
    let mut t = Table::new(&["job", "group", "version", "count", "running", "deployment", "last"]);
    for g in groups {
        let s = &g.state;
        let deployment = s.deployment.as_ref().map(|d| format!("v{} {}", d.to_version(), phase_text(d.phase()))).unwrap_or_default();
        let status = if s.count == 0 { "stopped".to_owned() } else { s.count.to_string() };
        t.row(vec![
            s.job.clone(),
            s.group.clone(),
            format!("v{}", s.stable),
            status,
            g.running.to_string(),
            deployment,
            s.last_outcome.as_ref().map(phase_text).unwrap_or_default(),
        ]);
    }
    t
}

/// The allocations of `view`, filtered by node and job.
pub fn allocations<'a>(view: &'a ClusterView, node: Option<&str>, job: Option<&str>) -> Vec<&'a AllocRecord> {
    let mut out: Vec<&AllocRecord> =
        view.allocations.iter().filter(|a| node.is_none_or(|n| a.node == n) && job.is_none_or(|j| a.job == j)).collect();
    out.sort_by(|a, b| (&a.job, &a.group, &a.node, &a.id).cmp(&(&b.job, &b.group, &b.node, &b.id)));
    out
}

/// How long ago `since_ms` was, in humantime (`-` when unknown).
fn age(since_ms: u64, now_ms: u64) -> String {
    if since_ms == 0 {
        return String::new();
    }
    let secs = now_ms.saturating_sub(since_ms) / 1000;
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

/// The allocations table: where each runs, its status and since when, how often its
/// task restarted in place, its address.
pub fn allocs_table(view: &ClusterView, allocs: &[&AllocRecord], now_ms: u64) -> Table {
    let lost = view.lost_nodes();
    let address: BTreeMap<&str, &str> = view.nodes.iter().filter_map(|n| Some((n.id.as_str(), n.address.as_deref()?))).collect();
    let mut t = Table::new(&["id", "job", "group", "version", "node", "status", "restarts", "age", "address"]);
    for a in allocs {
        let status = if lost.contains(&a.node) { "lost".to_owned() } else { format!("{:?}", a.status).to_lowercase() };
        let addr = match (address.get(a.node.as_str()), a.ports.first()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (None, Some(port)) => format!(":{port}"),
            _ => String::new(),
        };
        t.row(vec![
            a.id.clone(),
            a.job.clone(),
            a.group.clone(),
            format!("v{}", a.version),
            a.node.clone(),
            status,
            a.restarts.to_string(),
            age(a.since_ms, now_ms),
            addr,
        ]);
    }
    t
}

/// The deployments table: the one under way of each group, then those that ended, newest
/// first.
pub fn deployments_table(states: &[GroupState], now_ms: u64) -> Table {
    let mut t = Table::new(&["job", "group", "from", "to", "status", "healthy", "ended"]);
    let version = |v: Option<u64>| v.map(|v| format!("v{v}")).unwrap_or_default();
    for s in states {
        if let Some(d) = &s.deployment {
            t.row(vec![
                s.job.clone(),
                s.group.clone(),
                version(d.from_version()),
                version(Some(d.to_version())),
                phase_text(d.phase()),
                format!("{}/{}", d.healthy(), d.count()),
                String::new(),
            ]);
        }
        for h in s.history.iter().rev() {
            t.row(vec![
                s.job.clone(),
                s.group.clone(),
                version(h.from),
                version(Some(h.to)),
                phase_text(&h.outcome),
                String::new(),
                format!("{} ago", age(h.ended_ms, now_ms)),
            ]);
        }
    }
    t
}

/// `keelson-ctl plan` for people: what is stopped, what goes where, and why anything
/// does not fit.
pub fn plan_text(plan: &DeployPlan) -> String {
    let mut out = String::new();
    let from = plan.current.map(|v| format!(" (from v{v})")).unwrap_or_else(|| " (new group)".into());
    let placed = plan.placement.placements.len();
    out.push_str(&format!("{}/{} v{}{from}: {placed} to place, {} to stop\n", plan.job, plan.group, plan.version, plan.stops.len()));
    for (node, n) in plan.per_node() {
        out.push_str(&format!("  + {n} on {node}\n"));
    }
    for id in &plan.stops {
        out.push_str(&format!("  - {id}\n"));
    }
    for e in &plan.placement.evictions {
        out.push_str(&format!("  ! evicts {} on {} (priority {})\n", e.allocation, e.node, e.priority));
    }
    for u in &plan.placement.unplaced {
        out.push_str(&format!("  ! {} allocation(s) of {} cannot be placed: {}\n", u.count, u.group, u.explanation));
    }
    out
}
