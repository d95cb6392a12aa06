//! The placement engine: plans a job against a [`ClusterState`].
//!
//! Per group: constraints are compiled and evaluated once per node class; affinities give
//! each class a score, and classes are visited in tiers of descending score; a spread
//! block becomes a quota per value (largest remainder), placed value by value; identical
//! tasks go onto the best node in batches (as many as fit), since best fit would pick the
//! same node again for the next identical task. Tasks pinned by an existing volume are
//! placed on that volume's node. What is left unplaced gets an explanation, and may
//! preempt lower-priority work.

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use crate::error::{validate_id, Dimension, Error, Result};
use crate::placement::class_cache::{AffinityScores, CompiledConstraints};
use crate::placement::constraints::validate_target;
use crate::placement::model::{
    ConstraintOp, Eviction, Explanation, Job, Placement, Plan, Policy, Resources, ScoreBreakdown, TaskGroup, Unplaced, VolumeAccess,
    VolumeMount,
};
use crate::placement::state::{AllocRec, ClusterState};

/// A job may preempt allocations whose priority is at least this much lower.
pub const PREEMPTION_GAP: u8 = 10;

/// Limits the engine enforces on jobs.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineConfig {
    /// Largest task count one group may ask for (default 1,000,000).
    pub max_group_count: u32,
    /// Largest number of dynamic ports one task may ask for (default 64).
    pub max_dynamic_ports: u16,
    /// Whether jobs may preempt lower-priority allocations (default true).
    pub preemption: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { max_group_count: 1_000_000, max_dynamic_ports: 64, preemption: true }
    }
}

/// One group, compiled against the state's node classes.
pub(crate) struct GroupCtx<'g> {
    pub(crate) group: &'g TaskGroup,
    pub(crate) gid: u32,
    priority: u8,
    /// Node-predicate constraints (job's then group's), with their verdict per class.
    constraints: Arc<CompiledConstraints>,
    distinct_hosts: bool,
    /// (target, limit, count per value so far).
    distinct_props: Vec<(String, u32, HashMap<String, u32>)>,
    class_affinity: Arc<AffinityScores>,
    /// Spread target and each class's value.
    spread: Option<(String, Arc<Vec<Option<String>>>)>,
}

/// Which nodes a filling pass may use.
#[derive(Clone, Copy, Default)]
pub(crate) struct Pass<'a> {
    pub(crate) spread_value: Option<&'a str>,
    pub(crate) affinity: Option<i32>,
    pub(crate) pin: Option<u32>,
    /// Only nodes that already hold work (rebalancing never fills an empty node).
    pub(crate) non_empty_only: bool,
    pub(crate) exclude: Option<&'a [bool]>,
    /// Keep this allocation id (a move, not a new task).
    pub(crate) reuse_id: Option<&'a str>,
}

/// Validates a job: ids, counts, resources, ports, constraints (compiled), affinities,
/// spread targets, volumes. Errors name the field and value.
pub(crate) fn validate_job(job: &Job, config: &EngineConfig) -> Result<()> {
    validate_id("job id", &job.id)?;
    if job.priority > 100 {
        return Err(Error::invalid("job priority", job.priority.to_string(), "must be 0 to 100"));
    }
    for c in &job.constraints {
        if c.op.is_distinct() {
            return Err(Error::invalid("job constraint", c.to_string(), "distinct constraints belong on a group"));
        }
        validate_target("job constraint target", &c.target)?;
    }
    let mut names = std::collections::BTreeSet::new();
    for g in &job.groups {
        validate_id("group name", &g.name)?;
        if !names.insert(g.name.as_str()) {
            return Err(Error::invalid("group name", &g.name, "appears twice in the job"));
        }
        if g.count > config.max_group_count {
            return Err(Error::invalid(
                "group count",
                g.count.to_string(),
                format!("group {:?}: must be at most {}", g.name, config.max_group_count),
            ));
        }
        if g.resources.is_zero() {
            return Err(Error::invalid("group resources", &g.name, "must ask for some cpu, memory or disk"));
        }
        let mut ports = std::collections::BTreeSet::new();
        for &p in &g.static_ports {
            if p == 0 || !ports.insert(p) {
                return Err(Error::invalid(
                    "static port",
                    p.to_string(),
                    format!("group {:?}: ports must be 1-65535 and distinct", g.name),
                ));
            }
        }
        if g.dynamic_ports > config.max_dynamic_ports {
            return Err(Error::invalid(
                "dynamic ports",
                g.dynamic_ports.to_string(),
                format!("group {:?}: at most {} per task", g.name, config.max_dynamic_ports),
            ));
        }
        for c in &g.constraints {
            match c.op {
                ConstraintOp::DistinctHosts => {}
                ConstraintOp::DistinctProperty => {
                    validate_target("constraint target", &c.target)?;
                    distinct_limit(&c.value)?;
                }
                _ => validate_target("constraint target", &c.target)?,
            }
        }
        for a in &g.affinities {
            if !(-100..=100).contains(&a.weight) || a.weight == 0 {
                return Err(Error::invalid("affinity weight", a.weight.to_string(), "must be -100 to 100 and not 0"));
            }
            if a.op.is_distinct() {
                return Err(Error::invalid("affinity", a.op.as_str(), "distinct operators are not preferences"));
            }
        }
        if let Some(s) = &g.spread {
            validate_target("spread target", &s.target)?;
            if s.target == "node.id" {
                // Spread values are worked out per node class, and nodes of one class
                // differ in their ids only: every node would count as one value.
                return Err(Error::invalid(
                    "spread target",
                    &s.target,
                    "not supported: spread over a label each node has its own value of",
                ));
            }
            if !s.targets.is_empty() {
                let sum: u32 = s.targets.iter().map(|t| u32::from(t.percent)).sum();
                if sum != 100 {
                    return Err(Error::invalid(
                        "spread targets",
                        format!("{sum}%"),
                        format!("group {:?}: percentages must sum to 100", g.name),
                    ));
                }
                let mut seen = std::collections::BTreeSet::new();
                if let Some(t) = s.targets.iter().find(|t| !seen.insert(t.value.as_str())) {
                    return Err(Error::invalid("spread target value", &t.value, "appears twice"));
                }
            }
        }
        let mut vols = std::collections::BTreeSet::new();
        for v in &g.volumes {
            validate_id("volume name", &v.name)?;
            if !vols.insert(v.name.as_str()) {
                return Err(Error::invalid("volume name", &v.name, format!("group {:?} mounts it twice", g.name)));
            }
        }
    }
    Ok(())
}

fn distinct_limit(value: &str) -> Result<u32> {
    if value.is_empty() {
        return Ok(1);
    }
    match value.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(Error::invalid("distinct_property limit", value, "must be a whole number of at least 1")),
    }
}

impl ClusterState {
    /// Plans `job` without changing the state (a dry run).
    pub fn plan(&mut self, job: &Job, config: &EngineConfig) -> Result<Plan> {
        self.run(job, config, false)
    }

    /// Plans `job` and commits the plan: evictions are removed and placements become
    /// allocations (ids `<job>.<group>.<index>`, suffixed `-<n>` if taken).
    pub fn place(&mut self, job: &Job, config: &EngineConfig) -> Result<Plan> {
        self.run(job, config, true)
    }

    fn run(&mut self, job: &Job, config: &EngineConfig, commit: bool) -> Result<Plan> {
        validate_job(job, config)?;
        self.check_fits_somewhere(job)?;
        // Compile (or fetch) every group's constraints first, so a bad regex or version
        // is reported before anything is placed.
        for g in &job.groups {
            let all: Vec<crate::placement::model::Constraint> = job.constraints.iter().chain(&g.constraints).cloned().collect();
            self.compiled_constraints(&all)?;
            self.affinity_scores(&g.affinities)?;
        }
        self.atomically(commit, |state| {
            let mut plan = Plan::default();
            for group in &job.groups {
                state.place_group(job, group, config, &mut plan)?;
            }
            Ok(plan)
        })
    }

    /// "Asks for more than any node has" is a property of the job, not of the moment:
    /// report it as an error instead of an unplaced group.
    fn check_fits_somewhere(&self, job: &Job) -> Result<()> {
        let Some(largest) = self.largest else { return Ok(()) };
        for g in &job.groups {
            if let Some(dimension) = g.resources.exceeds(largest) {
                let (requested, largest) = match dimension {
                    Dimension::Cpu => (g.resources.cpu_millis, largest.cpu_millis),
                    Dimension::Memory => (g.resources.memory_mb, largest.memory_mb),
                    _ => (g.resources.disk_mb, largest.disk_mb),
                };
                return Err(Error::ExceedsNodeCapacity { group: g.name.clone(), dimension, requested, largest });
            }
        }
        Ok(())
    }

    pub(crate) fn group_ctx<'g>(&mut self, job: &Job, group: &'g TaskGroup) -> Result<GroupCtx<'g>> {
        let gid = self.intern_group(&job.id, &group.name);
        let all: Vec<crate::placement::model::Constraint> = job.constraints.iter().chain(&group.constraints).cloned().collect();
        let constraints = self.compiled_constraints(&all)?;
        let class_affinity = self.affinity_scores(&group.affinities)?;
        let distinct_hosts = group.constraints.iter().any(|c| c.op == ConstraintOp::DistinctHosts);
        let mut distinct_props = Vec::new();
        for c in group.constraints.iter().filter(|c| c.op == ConstraintOp::DistinctProperty) {
            let mut counts: HashMap<String, u32> = HashMap::new();
            for &slot in &self.group_allocs[gid as usize] {
                if let Some(a) = &self.allocs[slot as usize] {
                    if let Some(v) = self.nodes[a.node as usize].target_value(&c.target) {
                        *counts.entry(v.to_owned()).or_default() += 1;
                    }
                }
            }
            distinct_props.push((c.target.clone(), distinct_limit(&c.value)?, counts));
        }
        let spread = group.spread.as_ref().map(|sp| (sp.target.clone(), self.spread_values(&sp.target)));
        Ok(GroupCtx { group, gid, priority: job.priority, constraints, distinct_hosts, distinct_props, class_affinity, spread })
    }

    /// The first constraint `node` fails, as an index into the context's matchers.
    fn failed_constraint(&self, ctx: &GroupCtx<'_>, node: u32) -> Option<usize> {
        ctx.constraints.class_fail[self.class_of[node as usize] as usize].or_else(|| {
            ctx.constraints.per_node.iter().copied().find(|&i| !ctx.constraints.matchers[i].matches(&self.nodes[node as usize]))
        })
    }

    fn passes(&self, ctx: &GroupCtx<'_>, pass: &Pass<'_>, node: u32) -> bool {
        let i = node as usize;
        let class = self.class_of[i] as usize;
        self.eligible[i]
            && pass.pin.is_none_or(|p| p == node)
            && pass.exclude.is_none_or(|x| !x[i])
            && (!pass.non_empty_only || !self.node_allocs[i].is_empty())
            && pass.affinity.is_none_or(|a| ctx.class_affinity.per_class[class] == a)
            && pass.spread_value.is_none_or(|v| ctx.spread.as_ref().is_some_and(|(_, vals)| vals[class].as_deref() == Some(v)))
            && self.failed_constraint(ctx, node).is_none()
    }

    /// How many more tasks of the group fit on `node`, or the first dimension that stops it.
    pub(crate) fn capacity(&self, ctx: &GroupCtx<'_>, node: u32) -> std::result::Result<u32, Dimension> {
        let (free, want) = (self.free(node), ctx.group.resources);
        let mut k = u64::MAX;
        for (f, w, dim) in [
            (free.cpu_millis, want.cpu_millis, Dimension::Cpu),
            (free.memory_mb, want.memory_mb, Dimension::Memory),
            (free.disk_mb, want.disk_mb, Dimension::Disk),
        ] {
            if let Some(n) = f.checked_div(w) {
                if n == 0 {
                    return Err(dim);
                }
                k = k.min(n);
            }
        }
        if !ctx.group.static_ports.is_empty() {
            if ctx.group.static_ports.iter().any(|p| self.port_used(node, *p)) {
                return Err(Dimension::Ports);
            }
            k = 1;
        }
        if ctx.group.dynamic_ports > 0 {
            let n = u64::from(self.dyn_free[node as usize] / u32::from(ctx.group.dynamic_ports));
            if n == 0 {
                return Err(Dimension::Ports);
            }
            k = k.min(n);
        }
        match self.distinct_left(ctx, node) {
            0 => Err(Dimension::Distinct),
            left => Ok(u32::try_from(k.min(u64::from(left))).unwrap_or(u32::MAX)),
        }
    }

    /// How many more tasks of the group the distinct constraints allow on `node`.
    fn distinct_left(&self, ctx: &GroupCtx<'_>, node: u32) -> u32 {
        let mut left = u32::MAX;
        if ctx.distinct_hosts {
            left = u32::from(self.group_count_on(ctx.gid, node) == 0);
        }
        for (target, limit, counts) in &ctx.distinct_props {
            left = match self.nodes[node as usize].target_value(target) {
                Some(v) => left.min(limit.saturating_sub(counts.get(v).copied().unwrap_or(0))),
                // A node without the property cannot be counted, so it cannot be used.
                None => 0,
            };
        }
        left
    }

    /// Places one task of the group on `node` (capacity already checked).
    pub(crate) fn put(&mut self, ctx: &mut GroupCtx<'_>, node: u32, index: u32, id: Option<String>, policy: Policy) -> Result<Placement> {
        let mut ports = ctx.group.static_ports.clone();
        ports.extend(self.pick_dynamic_ports(node, ctx.group.dynamic_ports));
        let volumes: Vec<VolumeMount> =
            ctx.group.volumes.iter().map(|v| VolumeMount { name: v.volume_for(index), read_only: v.read_only }).collect();
        let access = ctx.group.volumes.first().map_or(VolumeAccess::SingleWriter, |v| v.access);
        let id = id.unwrap_or_else(|| {
            let (job, group) = &self.group_names[ctx.gid as usize];
            let base = format!("{job}.{group}.{index}");
            if self.alloc_index.contains_key(&base) {
                (1..).map(|n| format!("{base}-{n}")).find(|c| !self.alloc_index.contains_key(c)).unwrap_or(base)
            } else {
                base
            }
        });
        let rec = AllocRec {
            id,
            node,
            group: ctx.gid,
            priority: ctx.priority,
            resources: ctx.group.resources,
            ports: ports.clone(),
            volumes: volumes.clone(),
        };
        // Per-volume access would need per-mount create policy; a group's volumes share the
        // first request's access mode when they are created.
        self.add_alloc(rec, access)?;
        for (target, _, counts) in &mut ctx.distinct_props {
            if let Some(v) = self.nodes[node as usize].target_value(target) {
                *counts.entry(v.to_owned()).or_default() += 1;
            }
        }
        let class = self.class_of[node as usize] as usize;
        Ok(Placement {
            group: ctx.group.name.clone(),
            index,
            node: self.nodes[node as usize].id.clone(),
            resources: ctx.group.resources,
            ports,
            volumes,
            score: ScoreBreakdown {
                fullness: self.fullness(node),
                affinity: ctx.class_affinity.per_class[class],
                spread_value: ctx.spread.as_ref().and_then(|(_, vals)| vals[class].clone()),
                policy,
            },
        })
    }

    /// Places up to `want` tasks on nodes allowed by `pass`, taking indices from `indices`.
    pub(crate) fn fill(
        &mut self,
        ctx: &mut GroupCtx<'_>,
        pass: &Pass<'_>,
        want: u32,
        policy: Policy,
        indices: &mut dyn Iterator<Item = u32>,
        out: &mut Vec<Placement>,
    ) -> Result<u32> {
        if want == 0 {
            return Ok(0);
        }
        match policy {
            Policy::Binpack => self.fill_best(ctx, pass, want, indices, out),
            Policy::Spread => self.fill_worst(ctx, pass, want, indices, out),
        }
    }

    /// Best fit: walk eligible nodes from the fullest; fill each fitting node with as many
    /// tasks as fit. A filled node's key shrinks, so it moves behind the cursor.
    fn fill_best(
        &mut self,
        ctx: &mut GroupCtx<'_>,
        pass: &Pass<'_>,
        want: u32,
        indices: &mut dyn Iterator<Item = u32>,
        out: &mut Vec<Placement>,
    ) -> Result<u32> {
        let mut placed = 0;
        let mut cursor: Option<(u64, u32)> = None;
        if let Some(pin) = pass.pin {
            // One candidate: no walk.
            if self.passes(ctx, pass, pin) {
                if let Ok(k) = self.capacity(ctx, pin) {
                    for _ in 0..k.min(want) {
                        let Some(index) = indices.next() else { break };
                        out.push(self.put(ctx, pin, index, pass.reuse_id.map(str::to_owned), Policy::Binpack)?);
                        placed += 1;
                    }
                }
            }
            return Ok(placed);
        }
        // Nodes below the demand's bound cannot fit it: start the walk there. One iterator
        // per segment between placements; placing re-keys the node behind the cursor.
        let start = (self.demand_key(ctx.group.resources), 0);
        while placed < want {
            let found = {
                let walk = match cursor {
                    None => self.fit.range((Bound::Included(start), Bound::Unbounded)),
                    Some(c) => self.fit.range((Bound::Excluded(c), Bound::Unbounded)),
                };
                let mut found = None;
                for &(key, node) in walk {
                    if self.passes(ctx, pass, node) {
                        if let Ok(k) = self.capacity(ctx, node) {
                            found = Some((key, node, k));
                            break;
                        }
                    }
                }
                found
            };
            let Some((key, node, k)) = found else { break };
            cursor = Some((key, node));
            for _ in 0..k.min(want - placed) {
                let Some(index) = indices.next() else { return Ok(placed) };
                out.push(self.put(ctx, node, index, pass.reuse_id.map(str::to_owned), Policy::Binpack)?);
                placed += 1;
            }
        }
        Ok(placed)
    }

    /// Worst fit: always the emptiest allowed node, one task at a time (a heap keyed by
    /// free capacity).
    fn fill_worst(
        &mut self,
        ctx: &mut GroupCtx<'_>,
        pass: &Pass<'_>,
        want: u32,
        indices: &mut dyn Iterator<Item = u32>,
        out: &mut Vec<Placement>,
    ) -> Result<u32> {
        let mut heap: BinaryHeap<(u64, std::cmp::Reverse<u32>)> = BinaryHeap::new();
        let candidates: Vec<(u64, u32)> = match pass.pin {
            Some(p) => self.fit.iter().filter(|(_, n)| *n == p).copied().collect(),
            None => self.fit.iter().copied().collect(),
        };
        for (key, node) in candidates {
            if self.passes(ctx, pass, node) && self.capacity(ctx, node).is_ok() {
                heap.push((key, std::cmp::Reverse(node)));
            }
        }
        let mut placed = 0;
        while placed < want {
            let Some((_, std::cmp::Reverse(node))) = heap.pop() else { break };
            // Re-check at pop time: a placement elsewhere can use up a limit this node
            // shares (a distinct_property value), so the heap entry may be stale.
            if self.capacity(ctx, node).is_err() {
                continue;
            }
            let Some(index) = indices.next() else { break };
            out.push(self.put(ctx, node, index, None, Policy::Spread)?);
            placed += 1;
            if self.capacity(ctx, node).is_ok() {
                heap.push((self.fit_key[node as usize], std::cmp::Reverse(node)));
            }
        }
        Ok(placed)
    }

    fn place_group(&mut self, job: &Job, group: &TaskGroup, config: &EngineConfig, plan: &mut Plan) -> Result<()> {
        let mut ctx = self.group_ctx(job, group)?;
        let mut out = Vec::new();
        let mut unplaced = 0u32;
        let mut pin = None;

        // Volumes decide where some tasks must go.
        let mut pinned: Vec<(u32, u32)> = Vec::new(); // (index, node)
        let mut blocked: Vec<u32> = Vec::new(); // indices that can never be placed now
        let mut writer_budget = u32::MAX;
        for v in &group.volumes {
            if v.per_task {
                for i in 0..group.count {
                    if let Some(rec) = self.volumes.get(&v.volume_for(i)) {
                        if !v.read_only && rec.access == VolumeAccess::SingleWriter && rec.writers > 0 {
                            blocked.push(i);
                        } else {
                            pinned.push((i, rec.node));
                        }
                    }
                }
            } else if let Some(rec) = self.volumes.get(&v.name) {
                pin = Some(rec.node);
                if !v.read_only && rec.access == VolumeAccess::SingleWriter {
                    writer_budget = writer_budget.min(1u32.saturating_sub(rec.writers));
                }
            } else if !v.read_only && v.access == VolumeAccess::SingleWriter {
                writer_budget = writer_budget.min(1);
            }
        }
        pinned.sort_unstable();
        pinned.dedup_by_key(|p| p.0);
        blocked.sort_unstable();
        blocked.dedup();
        let mut volume_misses = blocked.len() as u32;
        let taken: std::collections::BTreeSet<u32> = pinned.iter().map(|p| p.0).chain(blocked.iter().copied()).collect();
        let free_count = (group.count - taken.len() as u32).min(writer_budget.saturating_sub(pinned.len() as u32));
        volume_misses += group.count - taken.len() as u32 - free_count;

        for (index, node) in &pinned {
            let pass = Pass { pin: Some(*node), ..Pass::default() };
            let mut one = std::iter::once(*index);
            if self.fill(&mut ctx, &pass, 1, Policy::Binpack, &mut one, &mut out)? == 0 {
                unplaced += 1;
            }
        }

        let mut indices = (0..group.count).filter(|i| !taken.contains(i)).take(free_count as usize);
        let mut left = free_count;
        // A shared volume that does not exist yet: the first task creates it, and the
        // rest must follow it to that node.
        let shared_new = group.volumes.iter().any(|v| !v.per_task) && pin.is_none();
        if shared_new && left > 0 {
            let before = out.len();
            left -= self.place_free(&mut ctx, 1, job.policy, None, &mut indices, &mut out)?;
            if out.len() > before {
                pin = self.node_index.get(&out[before].node).copied();
            }
        }
        left -= self.place_free(&mut ctx, left, job.policy, pin, &mut indices, &mut out)?;

        if left > 0 && config.preemption {
            left -= self.preempt(&mut ctx, left, pin, &mut indices, &mut out, &mut plan.evictions)?;
        }
        unplaced += left + volume_misses;
        if unplaced > 0 {
            let mut explanation = self.explain(&ctx, pin);
            if volume_misses > 0 && explanation.nodes_available > 0 {
                // The nodes were fine; the volume's single writer was the limit.
                *explanation.exhausted.entry(Dimension::Volume).or_default() += explanation.nodes_available;
                explanation.nodes_available = 0;
            }
            plan.unplaced.push(Unplaced { group: group.name.clone(), count: unplaced, explanation });
        }
        out.sort_by_key(|p| p.index);
        plan.placements.extend(out);
        Ok(())
    }

    /// Places `want` unpinned tasks: spread quotas first (if any), each in affinity tiers,
    /// then whatever is left anywhere allowed.
    fn place_free(
        &mut self,
        ctx: &mut GroupCtx<'_>,
        want: u32,
        policy: Policy,
        pin: Option<u32>,
        indices: &mut dyn Iterator<Item = u32>,
        out: &mut Vec<Placement>,
    ) -> Result<u32> {
        if want == 0 {
            return Ok(0);
        }
        let tiers: Vec<Option<i32>> = match ctx.class_affinity.tiers.len() {
            0 | 1 => vec![None],
            _ => ctx.class_affinity.tiers.iter().copied().map(Some).collect(),
        };
        let mut placed = 0;
        for (value, quota) in self.spread_quotas(ctx, want) {
            let mut got = 0;
            for tier in &tiers {
                let pass = Pass { spread_value: Some(&value), affinity: *tier, pin, ..Pass::default() };
                got += self.fill(ctx, &pass, quota - got, policy, indices, out)?;
            }
            placed += got;
        }
        // Spread is a preference: tasks a value could not take go wherever they fit.
        for tier in &tiers {
            let pass = Pass { affinity: *tier, pin, ..Pass::default() };
            placed += self.fill(ctx, &pass, want - placed, policy, indices, out)?;
        }
        Ok(placed)
    }

    /// How many of `want` new tasks each spread value should get, counting the group's
    /// existing tasks, so that the totals approach the targets (largest remainder).
    fn spread_quotas(&self, ctx: &GroupCtx<'_>, want: u32) -> Vec<(String, u32)> {
        let (Some((target, class_values)), Some(spread)) = (&ctx.spread, &ctx.group.spread) else { return Vec::new() };
        let mut current: BTreeMap<String, u64> = BTreeMap::new();
        let weights: Vec<(String, u64)> = if spread.targets.is_empty() {
            // Even over the values present on nodes that pass the constraints.
            let mut vals: Vec<String> = class_values
                .iter()
                .enumerate()
                .filter(|(c, v)| v.is_some() && ctx.constraints.class_fail[*c].is_none())
                .filter_map(|(_, v)| v.clone())
                .collect();
            vals.sort();
            vals.dedup();
            vals.into_iter().map(|v| (v, 1)).collect()
        } else {
            spread.targets.iter().map(|t| (t.value.clone(), u64::from(t.percent))).collect()
        };
        if weights.is_empty() {
            return Vec::new();
        }
        for &slot in &self.group_allocs[ctx.gid as usize] {
            if let Some(v) = self.allocs[slot as usize].as_ref().and_then(|a| self.nodes[a.node as usize].target_value(target)) {
                *current.entry(v.to_owned()).or_default() += 1;
            }
        }
        let existing: u64 = weights.iter().map(|(v, _)| current.get(v).copied().unwrap_or(0)).sum();
        let total = existing + u64::from(want);
        let wsum: u64 = weights.iter().map(|(_, w)| w).sum();
        // Ideal totals by largest remainder, then new tasks = ideal - existing (>= 0).
        let mut ideal: Vec<(String, u64, u64)> = weights.iter().map(|(v, w)| (v.clone(), total * w / wsum, total * w % wsum)).collect();
        let mut rest = total - ideal.iter().map(|(_, q, _)| q).sum::<u64>();
        let mut order: Vec<usize> = (0..ideal.len()).collect();
        order.sort_by(|&a, &b| {
            ideal[b]
                .2
                .cmp(&ideal[a].2)
                .then(current.get(&ideal[a].0).copied().unwrap_or(0).cmp(&current.get(&ideal[b].0).copied().unwrap_or(0)))
                .then(a.cmp(&b))
        });
        for i in order {
            if rest == 0 {
                break;
            }
            ideal[i].1 += 1;
            rest -= 1;
        }
        let mut quotas: Vec<(String, u32)> = ideal
            .into_iter()
            .map(|(v, q, _)| {
                let have = current.get(&v).copied().unwrap_or(0);
                (v, u32::try_from(q.saturating_sub(have)).unwrap_or(u32::MAX))
            })
            .collect();
        // Values already over their share make the others' sum exceed `want`: trim the
        // largest quotas first.
        let mut sum: u64 = quotas.iter().map(|(_, q)| u64::from(*q)).sum();
        while sum > u64::from(want) {
            if let Some(max) = quotas.iter_mut().max_by_key(|(_, q)| *q) {
                max.1 -= 1;
                sum -= 1;
            }
        }
        quotas
    }

    /// Accounts for every node once: ineligible, first failing constraint, first exhausted
    /// dimension, or available.
    pub(crate) fn explain(&self, ctx: &GroupCtx<'_>, pin: Option<u32>) -> Explanation {
        let mut e = Explanation { nodes_evaluated: self.nodes.len(), ..Explanation::default() };
        for node in 0..self.nodes.len() as u32 {
            if !self.eligible[node as usize] {
                e.nodes_ineligible += 1;
            } else if let Some(i) = self.failed_constraint(ctx, node) {
                *e.filtered_by_constraint.entry(ctx.constraints.matchers[i].display.clone()).or_default() += 1;
            } else if pin.is_some_and(|p| p != node) {
                *e.exhausted.entry(Dimension::Volume).or_default() += 1;
            } else {
                match self.capacity(ctx, node) {
                    Err(d) => *e.exhausted.entry(d).or_default() += 1,
                    Ok(_) => e.nodes_available += 1,
                }
            }
        }
        e
    }

    /// Places up to `want` tasks by evicting allocations at least [`PREEMPTION_GAP`]
    /// priority points lower: per task, the node whose cheapest victim set has the lowest
    /// highest priority, then the fewest victims.
    fn preempt(
        &mut self,
        ctx: &mut GroupCtx<'_>,
        want: u32,
        pin: Option<u32>,
        indices: &mut dyn Iterator<Item = u32>,
        out: &mut Vec<Placement>,
        evictions: &mut Vec<Eviction>,
    ) -> Result<u32> {
        let Some(ceiling) = ctx.priority.checked_sub(PREEMPTION_GAP) else { return Ok(0) };
        let mut placed = 0;
        while placed < want {
            if self.priority_count[..=usize::from(ceiling)].iter().all(|c| *c == 0) {
                break;
            }
            let mut best: Option<((u8, usize, u32), Vec<u32>)> = None;
            for node in 0..self.nodes.len() as u32 {
                let pass = Pass { pin, ..Pass::default() };
                if !self.passes(ctx, &pass, node) || self.distinct_left(ctx, node) == 0 {
                    continue;
                }
                if let Some(victims) = self.victims(ctx, node, ceiling) {
                    let worst = victims.iter().filter_map(|s| self.allocs[*s as usize].as_ref()).map(|a| a.priority).max().unwrap_or(0);
                    let rank = (worst, victims.len(), node);
                    if best.as_ref().is_none_or(|(r, _)| rank < *r) {
                        best = Some((rank, victims));
                    }
                }
            }
            let Some(((_, _, node), victims)) = best else { break };
            let Some(index) = indices.next() else { break };
            for slot in victims {
                let rec = self.remove_alloc(slot);
                evictions.push(Eviction { allocation: rec.id, node: self.nodes[node as usize].id.clone(), priority: rec.priority });
            }
            out.push(self.put(ctx, node, index, None, Policy::Binpack)?);
            placed += 1;
        }
        Ok(placed)
    }

    /// The fewest lowest-priority allocations on `node` whose removal lets one task fit;
    /// `None` if even evicting every eligible one would not.
    fn victims(&self, ctx: &GroupCtx<'_>, node: u32, ceiling: u8) -> Option<Vec<u32>> {
        let i = node as usize;
        let mut candidates: Vec<&u32> =
            self.node_allocs[i].iter().filter(|s| self.allocs[**s as usize].as_ref().is_some_and(|a| a.priority <= ceiling)).collect();
        if candidates.is_empty() {
            return None;
        }
        candidates.sort_by_key(|s| {
            let a = self.allocs[**s as usize].as_ref();
            (a.map_or(0, |a| a.priority), std::cmp::Reverse(a.map_or(0, |a| a.resources.cpu_millis + a.resources.memory_mb)))
        });
        let need = ctx.group.resources;
        let cap = self.cap[i];
        // Track what stays used, not what is free: on an over-committed node "free" is
        // clamped at zero, and adding a victim back to it would overstate the room.
        let mut used = self.used[i];
        let mut freed_ports: Vec<u16> = Vec::new();
        let mut dyn_free = self.dyn_free[i];
        let range = self.nodes[i].dynamic_ports;
        let mut chosen = Vec::new();
        let fits = |used: Resources, freed: &[u16], dyn_free: u32| {
            used.saturating_add(need).exceeds(cap).is_none()
                && ctx.group.static_ports.iter().all(|p| !self.port_used(node, *p) || freed.contains(p))
                && dyn_free >= u32::from(ctx.group.dynamic_ports)
        };
        for s in candidates {
            if fits(used, &freed_ports, dyn_free) {
                break;
            }
            if let Some(a) = &self.allocs[*s as usize] {
                used = used.saturating_sub(a.resources);
                dyn_free += a.ports.iter().filter(|p| range.contains(**p)).count() as u32;
                freed_ports.extend(&a.ports);
                chosen.push(*s);
            }
        }
        (fits(used, &freed_ports, dyn_free) && !chosen.is_empty()).then_some(chosen)
    }
}
