//! Placement workloads (seeded), the offline best-fit-decreasing baseline, and two
//! reference policies modelled on Nomad's and Kubernetes' schedulers, all measured on
//! the same workloads as keelson's engine.

use std::collections::HashMap;

use keelson_scheduler::conformance::constraint_holds;
use keelson_scheduler::{ClusterSnapshot, Constraint, ConstraintOp, Job, Node, Resources, Spread, TaskGroup, VolumeAccess, VolumeRequest};

use crate::SplitMix;

/// Which workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Two constraints per job.
    Plain,
    /// Plain plus an even spread over zones on every job.
    Spread,
    /// Plain with 20% of groups mounting a per-task single-writer volume.
    Stateful,
    /// Plain, then 10% of allocations stop and are re-placed.
    Churn,
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "plain" => Ok(Workload::Plain),
            "spread" | "spread-heavy" => Ok(Workload::Spread),
            "stateful" => Ok(Workload::Stateful),
            "churn" => Ok(Workload::Churn),
            other => Err(format!("unknown workload {other:?}: plain, spread, stateful or churn")),
        }
    }
}

/// Node capacity in every workload: 32 cores, 128 GiB, 1 TiB.
pub const NODE: Resources = Resources::new(32_000, 131_072).with_disk(1_048_576);
const ZONES: u64 = 5;
const KERNELS: [&str; 4] = ["5.10.0", "5.15.0", "6.1.0", "6.6.0"];

/// `nodes` identical nodes in 5 zones, 4 kernel versions, 50 racks, 2 tiers.
pub fn cluster(nodes: usize, seed: u64) -> ClusterSnapshot {
    let mut rng = SplitMix::new(seed);
    let nodes = (0..nodes)
        .map(|i| {
            Node::new(format!("node-{i:05}"), NODE)
                .with_attribute("zone", format!("z{}", i as u64 % ZONES))
                .with_attribute("kernel.version", KERNELS[rng.below(4) as usize])
                .with_label("rack", format!("r{}", i % 50))
                .with_label("tier", if rng.below(2) == 0 { "a" } else { "b" })
        })
        .collect();
    ClusterSnapshot { nodes, ..ClusterSnapshot::default() }
}

/// `tasks` tasks in jobs of 500 (one group each), two constraints per job, sized so the
/// whole workload needs about 80% of the cluster's cpu.
pub fn jobs(workload: Workload, nodes: usize, tasks: u64, seed: u64) -> Vec<Job> {
    let mut rng = SplitMix::new(seed ^ 0x5eed);
    let per_job = tasks.clamp(1, 500);
    let count = tasks.div_ceil(per_job);
    // Mean cpu per task so that total demand is ~80% of the cluster.
    let mean_cpu = (NODE.cpu_millis as f64 * nodes as f64 * 0.8 / tasks.max(1) as f64).max(50.0);
    let sizes = [0.4, 0.8, 1.0, 1.2, 1.6];
    let mut left = tasks;
    (0..count)
        .map(|j| {
            let n = per_job.min(left);
            left -= n;
            let f = sizes[rng.below(5) as usize];
            let cpu = ((mean_cpu * f) as u64 / 10 * 10).max(10);
            let mem = (cpu * 4).clamp(64, NODE.memory_mb);
            let second = match rng.below(4) {
                0 => Constraint::new("attr.kernel.version", ConstraintOp::Version, ">= 5.10"),
                1 => Constraint::new("label.rack", ConstraintOp::Regex, "^r[0-9]*[02468]$"),
                2 => Constraint::new("attr.kernel.version", ConstraintOp::GreaterEqual, "5.15"),
                _ => Constraint::new("label.tier", ConstraintOp::SetContainsAny, "a,b"),
            };
            let mut g = TaskGroup::new("g", n as u32, Resources::new(cpu, mem))
                .with_constraint(Constraint::not_equal("attr.zone", format!("z{}", rng.below(ZONES))))
                .with_constraint(second);
            if workload == Workload::Spread {
                g = g.with_spread(Spread { target: "attr.zone".into(), targets: vec![] });
            }
            if workload == Workload::Stateful && rng.below(5) == 0 {
                g = g.with_volume(VolumeRequest {
                    name: format!("data{j}"),
                    access: VolumeAccess::SingleWriter,
                    read_only: false,
                    per_task: true,
                });
            }
            Job::new(format!("job{j:05}"), vec![g])
        })
        .collect()
}

/// The lower bound on non-empty nodes: total demand over node capacity on the tightest
/// dimension.
pub fn lower_bound(jobs: &[Job]) -> u64 {
    let (mut cpu, mut mem) = (0u64, 0u64);
    for g in jobs.iter().flat_map(|j| &j.groups) {
        cpu += g.resources.cpu_millis * u64::from(g.count);
        mem += g.resources.memory_mb * u64::from(g.count);
    }
    cpu.div_ceil(NODE.cpu_millis).max(mem.div_ceil(NODE.memory_mb))
}

/// What a reference run produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RefResult {
    /// Tasks placed.
    pub placed: u64,
    /// Nodes holding at least one task.
    pub non_empty: u64,
    /// Largest (max - min) tasks per zone over spread jobs.
    pub spread_skew: u64,
}

/// A simple cluster model for the baselines: used cpu/mem per node, and feasibility per
/// job and node class precomputed with the validator's constraint reading (so the
/// baselines are not charged for constraint evaluation at all).
struct Sim<'a> {
    nodes: &'a [Node],
    used: Vec<(u64, u64)>,
    class_of: Vec<usize>,
    class_rep: Vec<usize>,
}

impl<'a> Sim<'a> {
    fn new(snapshot: &'a ClusterSnapshot) -> Self {
        let mut classes: HashMap<(String, String, String, String), usize> = HashMap::new();
        let mut class_of = Vec::new();
        let mut class_rep = Vec::new();
        for (i, n) in snapshot.nodes.iter().enumerate() {
            let key = (
                n.attributes.get("zone").cloned().unwrap_or_default(),
                n.attributes.get("kernel.version").cloned().unwrap_or_default(),
                n.labels.get("rack").cloned().unwrap_or_default(),
                n.labels.get("tier").cloned().unwrap_or_default(),
            );
            let next = classes.len();
            let c = *classes.entry(key).or_insert(next);
            if c == next {
                class_rep.push(i);
            }
            class_of.push(c);
        }
        Sim { nodes: &snapshot.nodes, used: vec![(0, 0); snapshot.nodes.len()], class_of, class_rep }
    }

    fn feasible_classes(&self, g: &TaskGroup) -> Vec<bool> {
        self.class_rep.iter().map(|&r| g.constraints.iter().all(|c| constraint_holds(&self.nodes[r], c))).collect()
    }

    fn fits(&self, i: usize, r: Resources) -> bool {
        let (c, m) = self.used[i];
        c + r.cpu_millis <= NODE.cpu_millis && m + r.memory_mb <= NODE.memory_mb
    }

    fn result(&self, placed: u64, spread_skew: u64) -> RefResult {
        RefResult { placed, non_empty: self.used.iter().filter(|u| u.0 > 0 || u.1 > 0).count() as u64, spread_skew }
    }

    /// Records one task of `r` on node `i`.
    fn take(&mut self, i: usize, r: Resources, per_zone: &mut [u64; ZONES as usize]) {
        self.used[i].0 += r.cpu_millis;
        self.used[i].1 += r.memory_mb;
        per_zone[self.zone(i)] += 1;
    }

    fn zone(&self, i: usize) -> usize {
        self.nodes[i].attributes.get("zone").and_then(|z| z.trim_start_matches('z').parse().ok()).unwrap_or(0)
    }
}

/// The zones (by number) where at least one node satisfies the group's constraints:
/// spread can only be even over those, so skew is measured over those.
pub fn feasible_zones(nodes: &[Node], g: &TaskGroup) -> [bool; ZONES as usize] {
    let mut out = [false; ZONES as usize];
    for n in nodes {
        let z: usize = n.attributes.get("zone").and_then(|z| z.trim_start_matches('z').parse().ok()).unwrap_or(0);
        if z < out.len() && !out[z] && g.constraints.iter().all(|c| constraint_holds(n, c)) {
            out[z] = true;
        }
        if out.iter().all(|x| *x) {
            break;
        }
    }
    out
}

/// max - min tasks per zone, over the zones the group can use.
pub fn skew_over(per_zone: &[u64; ZONES as usize], feasible: &[bool; ZONES as usize]) -> u64 {
    let used: Vec<u64> = per_zone.iter().zip(feasible).filter(|(_, f)| **f).map(|(n, _)| *n).collect();
    used.iter().max().copied().unwrap_or(0) - used.iter().min().copied().unwrap_or(0)
}

/// Offline best-fit decreasing: all groups sorted by task size, largest first, each task
/// on the feasible node with the least room left that fits it (identical tasks batched).
pub fn best_fit_decreasing(snapshot: &ClusterSnapshot, jobs: &[Job]) -> RefResult {
    let mut sim = Sim::new(snapshot);
    let mut groups: Vec<&TaskGroup> = jobs.iter().flat_map(|j| &j.groups).collect();
    groups.sort_by_key(|g| std::cmp::Reverse((g.resources.cpu_millis, g.resources.memory_mb)));
    let mut placed = 0;
    for g in groups {
        let ok = sim.feasible_classes(g);
        let mut left = u64::from(g.count);
        while left > 0 {
            let best = (0..sim.nodes.len()).filter(|&i| ok[sim.class_of[i]] && sim.fits(i, g.resources)).min_by_key(|&i| {
                (NODE.cpu_millis - sim.used[i].0) * 1000 / NODE.cpu_millis + (NODE.memory_mb - sim.used[i].1) * 1000 / NODE.memory_mb
            });
            let Some(i) = best else { break };
            while left > 0 && sim.fits(i, g.resources) {
                sim.used[i].0 += g.resources.cpu_millis;
                sim.used[i].1 += g.resources.memory_mb;
                left -= 1;
                placed += 1;
            }
        }
    }
    sim.result(placed, 0)
}

/// Nomad-like: per task, visit nodes in a seeded shuffled order from a rotating offset,
/// score the first ceil(log2 N) feasible ones (max(count, 100) when the job spreads) with
/// BestFit v3, `20 - (10^freeCpu + 10^freeMem)` plus a spread boost, and take the best.
pub fn nomad_like(snapshot: &ClusterSnapshot, jobs: &[Job], seed: u64) -> RefResult {
    let mut sim = Sim::new(snapshot);
    let n = sim.nodes.len();
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix::new(seed);
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let base_limit = (n.max(2) as f64).log2().ceil() as usize;
    let (mut placed, mut worst_skew, mut offset) = (0, 0, 0usize);
    for g in jobs.iter().flat_map(|j| &j.groups) {
        let ok = sim.feasible_classes(g);
        let limit = if g.spread.is_some() { (g.count as usize).max(100) } else { base_limit };
        let mut per_zone = [0u64; ZONES as usize];
        let feasible = feasible_zones(sim.nodes, g);
        let desired = f64::from(g.count) / feasible.iter().filter(|f| **f).count().max(1) as f64;
        for _ in 0..g.count {
            let mut best: Option<(f64, usize)> = None;
            let mut seen = 0;
            for k in 0..n {
                let i = order[(offset + k) % n];
                if !ok[sim.class_of[i]] || !sim.fits(i, g.resources) {
                    continue;
                }
                let free_cpu = 1.0 - (sim.used[i].0 + g.resources.cpu_millis) as f64 / NODE.cpu_millis as f64;
                let free_mem = 1.0 - (sim.used[i].1 + g.resources.memory_mb) as f64 / NODE.memory_mb as f64;
                let mut score = (20.0 - (10f64.powf(free_cpu) + 10f64.powf(free_mem))) / 18.0;
                if g.spread.is_some() {
                    score += (desired - per_zone[sim.zone(i)] as f64) / desired.max(1.0);
                }
                if best.is_none_or(|(s, _)| score > s) {
                    best = Some((score, i));
                }
                seen += 1;
                if seen >= limit {
                    break;
                }
            }
            offset = (offset + 1) % n;
            let Some((_, i)) = best else { continue };
            sim.take(i, g.resources, &mut per_zone);
            placed += 1;
        }
        if g.spread.is_some() {
            worst_skew = worst_skew.max(skew_over(&per_zone, &feasible));
        }
    }
    sim.result(placed, worst_skew)
}

/// Kubernetes-like: per pod, filter nodes from a rotating start index until
/// `percentageOfNodesToScore` (adaptive: 50 - N/125, at least 5%, at least 100 nodes) are
/// feasible, score them with LeastAllocated (plus a topology-spread term for spread
/// jobs), take the best.
pub fn kubernetes_like(snapshot: &ClusterSnapshot, jobs: &[Job]) -> RefResult {
    let mut sim = Sim::new(snapshot);
    let n = sim.nodes.len();
    let pct = (50i64 - n as i64 / 125).max(5) as usize;
    let to_find = (n * pct / 100).max(100).min(n);
    let (mut placed, mut worst_skew, mut start) = (0, 0, 0usize);
    for g in jobs.iter().flat_map(|j| &j.groups) {
        let ok = sim.feasible_classes(g);
        let mut per_zone = [0u64; ZONES as usize];
        // Topology spread counts only domains with nodes the pod may use.
        let feasible = feasible_zones(sim.nodes, g);
        for _ in 0..g.count {
            let mut best: Option<(f64, usize)> = None;
            let mut found = 0;
            let mut k = 0;
            while k < n && found < to_find {
                let i = (start + k) % n;
                k += 1;
                if !ok[sim.class_of[i]] || !sim.fits(i, g.resources) {
                    continue;
                }
                found += 1;
                let cpu = (NODE.cpu_millis - sim.used[i].0 - g.resources.cpu_millis) as f64 / NODE.cpu_millis as f64;
                let mem = (NODE.memory_mb - sim.used[i].1 - g.resources.memory_mb) as f64 / NODE.memory_mb as f64;
                let mut score = (cpu + mem) / 2.0;
                if g.spread.is_some() {
                    let max = per_zone.iter().zip(&feasible).filter(|(_, f)| **f).map(|(n, _)| *n).max().unwrap_or(0) as f64;
                    score += (max - per_zone[sim.zone(i)] as f64) / (max + 1.0);
                }
                if best.is_none_or(|(s, _)| score > s) {
                    best = Some((score, i));
                }
            }
            start = (start + k) % n;
            let Some((_, i)) = best else { continue };
            sim.take(i, g.resources, &mut per_zone);
            placed += 1;
        }
        if g.spread.is_some() {
            worst_skew = worst_skew.max(skew_over(&per_zone, &feasible));
        }
    }
    sim.result(placed, worst_skew)
}
