//! `ClusterState`: the cluster indexed for placement, updated incrementally.
//!
//! Per-node data is kept as parallel vectors (struct of arrays) indexed by a dense node
//! number; nodes with identical attributes, labels, datacenter and pool share a *class*,
//! so constraints are evaluated once per class; eligible nodes sit in an ordered index by
//! free capacity, so best fit walks from the fullest node that could fit instead of
//! scoring every node. Every change goes through `add_alloc` / `remove_alloc`, which keep
//! all of this consistent, and can be journaled and rolled back (dry runs).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::error::{validate_id, Error, Result};
use crate::placement::class_cache::{AffinityScores, ClassCache, CompiledConstraints};
use crate::placement::model::{
    Affinity, Allocation, ClusterSnapshot, Constraint, HostVolume, Job, Node, Plan, Resources, VolumeAccess, VolumeMount,
};

/// `part / whole` in fixed point (0 when `whole` is 0).
fn frac(part: u64, whole: u64) -> u64 {
    if whole == 0 {
        0
    } else {
        (u128::from(part) * u128::from(SCALE) / u128::from(whole)) as u64
    }
}

/// What makes two nodes interchangeable for constraints: datacenter, pool, attributes,
/// labels (everything but the id).
type ClassKey<'a> = (&'a str, &'a str, &'a BTreeMap<String, String>, &'a BTreeMap<String, String>);

/// Fixed-point scale of one dimension's free fraction in the fit key.
const SCALE: u64 = 1 << 20;

/// An allocation as the state keeps it.
#[derive(Clone, Debug)]
pub(crate) struct AllocRec {
    pub(crate) id: String,
    pub(crate) node: u32,
    pub(crate) group: u32,
    pub(crate) priority: u8,
    pub(crate) resources: Resources,
    pub(crate) ports: Vec<u16>,
    pub(crate) volumes: Vec<VolumeMount>,
}

#[derive(Clone, Debug)]
pub(crate) struct VolRec {
    pub(crate) node: u32,
    pub(crate) access: VolumeAccess,
    pub(crate) writers: u32,
}

/// One reversible change, for rolling back a dry run.
#[derive(Clone, Debug)]
pub(crate) enum Change {
    Added(u32),
    Removed(AllocRec),
    VolumeCreated(String),
}

/// The cluster indexed for fast placement. Build it once from a [`ClusterSnapshot`] and
/// keep it: [`ClusterState::place`] commits a job's plan into it, [`ClusterState::plan`]
/// computes one without changing it, and allocations can be added and removed as the
/// cluster changes. Cloning copies everything.
#[derive(Clone, Debug)]
pub struct ClusterState {
    pub(crate) nodes: Vec<Node>,
    pub(crate) node_index: HashMap<String, u32>,
    pub(crate) cap: Vec<Resources>,
    pub(crate) used: Vec<Resources>,
    pub(crate) eligible: Vec<bool>,
    pub(crate) class_of: Vec<u32>,
    /// A representative node of each class, for evaluating class-level predicates.
    pub(crate) class_rep: Vec<u32>,
    /// Ports in use per node (reserved and allocated), sorted.
    pub(crate) ports: Vec<Vec<u16>>,
    pub(crate) dyn_free: Vec<u32>,
    pub(crate) node_allocs: Vec<Vec<u32>>,
    pub(crate) allocs: Vec<Option<AllocRec>>,
    free_slots: Vec<u32>,
    pub(crate) alloc_index: HashMap<String, u32>,
    /// Interned `job/group` names and their allocations.
    pub(crate) group_ids: HashMap<(String, String), u32>,
    pub(crate) group_names: Vec<(String, String)>,
    pub(crate) group_allocs: Vec<Vec<u32>>,
    pub(crate) volumes: HashMap<String, VolRec>,
    /// Eligible nodes by (fit key, node): smaller key = less free = better best fit.
    pub(crate) fit: BTreeSet<(u64, u32)>,
    pub(crate) fit_key: Vec<u64>,
    pub(crate) priority_count: [u32; 101],
    pub(crate) journal: Option<Vec<Change>>,
    /// The largest capacity of any eligible node, per dimension (`None`: no eligible node).
    pub(crate) largest: Option<Resources>,
    pub(crate) cache: ClassCache,
}

impl ClusterState {
    /// Indexes `snapshot`, validating it: node ids unique and well-formed, every
    /// allocation and volume on a known node, allocation ids unique, no port held twice
    /// on a node, volumes consistent with their mounts.
    pub fn from_snapshot(snapshot: &ClusterSnapshot) -> Result<ClusterState> {
        let n = snapshot.nodes.len();
        let mut s = ClusterState {
            nodes: snapshot.nodes.clone(),
            node_index: HashMap::with_capacity(n),
            cap: Vec::with_capacity(n),
            used: vec![Resources::default(); n],
            eligible: Vec::with_capacity(n),
            class_of: Vec::with_capacity(n),
            class_rep: Vec::new(),
            ports: Vec::with_capacity(n),
            dyn_free: Vec::with_capacity(n),
            node_allocs: vec![Vec::new(); n],
            allocs: Vec::with_capacity(snapshot.allocations.len()),
            free_slots: Vec::new(),
            alloc_index: HashMap::with_capacity(snapshot.allocations.len()),
            group_ids: HashMap::new(),
            group_names: Vec::new(),
            group_allocs: Vec::new(),
            volumes: HashMap::new(),
            fit: BTreeSet::new(),
            fit_key: vec![0; n],
            priority_count: [0; 101],
            journal: None,
            largest: None,
            cache: ClassCache::default(),
        };
        let mut classes: HashMap<ClassKey<'_>, u32> = HashMap::new();
        for (i, node) in snapshot.nodes.iter().enumerate() {
            validate_id("node id", &node.id)?;
            let i = u32::try_from(i).map_err(|_| Error::invalid("nodes", n.to_string(), "too many nodes"))?;
            if s.node_index.insert(node.id.clone(), i).is_some() {
                return Err(Error::invalid("node id", &node.id, "appears twice in the snapshot"));
            }
            if node.dynamic_ports.is_empty() {
                return Err(Error::invalid("node dynamic ports", &node.id, "range is empty (start > end)"));
            }
            let key = (node.datacenter.as_str(), node.pool.as_str(), &node.attributes, &node.labels);
            let next = s.class_rep.len() as u32;
            let class = *classes.entry(key).or_insert(next);
            if class == next {
                s.class_rep.push(i);
            }
            s.class_of.push(class);
            s.cap.push(node.capacity);
            s.eligible.push(node.is_eligible());
            let reserved: Vec<u16> = node.reserved_ports.iter().copied().collect();
            let in_range = reserved.iter().filter(|p| node.dynamic_ports.contains(**p)).count() as u32;
            s.dyn_free.push(node.dynamic_ports.len() - in_range);
            s.ports.push(reserved);
            s.rekey(i);
        }
        for (i, c) in s.cap.iter().enumerate() {
            if s.eligible[i] {
                let l = s.largest.get_or_insert(Resources::default());
                *l = Resources {
                    cpu_millis: l.cpu_millis.max(c.cpu_millis),
                    memory_mb: l.memory_mb.max(c.memory_mb),
                    disk_mb: l.disk_mb.max(c.disk_mb),
                };
            }
        }
        for v in &snapshot.volumes {
            s.add_volume(v)?;
        }
        for a in &snapshot.allocations {
            s.add_allocation(a)?;
        }
        Ok(s)
    }

    pub(crate) fn add_volume(&mut self, v: &HostVolume) -> Result<()> {
        validate_id("volume name", &v.name)?;
        let node = *self
            .node_index
            .get(&v.node)
            .ok_or_else(|| Error::invalid("volume node", &v.node, format!("volume {:?} is on a node not in the snapshot", v.name)))?;
        if self.volumes.insert(v.name.clone(), VolRec { node, access: v.access, writers: 0 }).is_some() {
            return Err(Error::invalid("volume name", &v.name, "appears twice in the snapshot"));
        }
        Ok(())
    }

    /// Applies a plan made for `job` on this state's snapshot (by any [`Scheduler`]):
    /// its evictions are removed and its placements added as allocations, with ids
    /// `<job>.<group>.<index>` (suffixed `-<n>` if taken). A plan naming an unknown node,
    /// allocation or a taken port is [`Error::InvalidInput`] and leaves the state as it was.
    ///
    /// [`Scheduler`]: crate::Scheduler
    pub fn apply(&mut self, job: &Job, plan: &Plan) -> Result<()> {
        self.atomically(true, |state| {
            for e in &plan.evictions {
                state.remove_allocation(&e.allocation)?;
            }
            for p in &plan.placements {
                let base = format!("{}.{}.{}", job.id, p.group, p.index);
                let mut id = base.clone();
                let mut n = 0;
                while state.alloc_index.contains_key(&id) {
                    n += 1;
                    id = format!("{base}-{n}");
                }
                let a = Allocation {
                    ports: p.ports.iter().copied().collect(),
                    volumes: p.volumes.clone(),
                    priority: job.priority,
                    ..Allocation::new(id, p.node.clone(), job.id.clone(), p.group.clone(), p.resources)
                };
                state.add_allocation(&a)?;
            }
            Ok(())
        })
    }

    /// Adds an existing allocation (one that started outside the scheduler, say).
    pub fn add_allocation(&mut self, a: &Allocation) -> Result<()> {
        validate_id("allocation id", &a.id)?;
        let node = *self
            .node_index
            .get(&a.node)
            .ok_or_else(|| Error::invalid("allocation node", &a.node, format!("allocation {:?} is on a node not in the snapshot", a.id)))?;
        if a.priority > 100 {
            return Err(Error::invalid("allocation priority", a.priority.to_string(), "must be 0 to 100"));
        }
        let group = self.intern_group(&a.job, &a.group);
        let rec = AllocRec {
            id: a.id.clone(),
            node,
            group,
            priority: a.priority,
            resources: a.resources,
            ports: a.ports.iter().copied().collect(),
            volumes: a.volumes.clone(),
        };
        self.add_alloc(rec, VolumeAccess::SingleWriter).map(|_| ())
    }

    /// Removes an allocation (it stopped). [`Error::NotFound`] if unknown.
    pub fn remove_allocation(&mut self, id: &str) -> Result<Allocation> {
        let slot = *self.alloc_index.get(id).ok_or_else(|| Error::NotFound { kind: "allocation", name: id.to_owned() })?;
        let rec = self.remove_alloc(slot);
        Ok(self.export(&rec))
    }

    /// The node-predicate constraints of `list` (distinct ones are skipped), compiled and
    /// evaluated per class.
    pub(crate) fn compiled_constraints(&mut self, list: &[Constraint]) -> Result<Arc<CompiledConstraints>> {
        self.cache.compiled_constraints(&self.class_rep, &self.nodes, list)
    }

    /// Sum of matching affinity weights per class.
    pub(crate) fn affinity_scores(&mut self, list: &[Affinity]) -> Result<Arc<AffinityScores>> {
        self.cache.affinity_scores(&self.class_rep, &self.nodes, list)
    }

    /// The value of `target` per class.
    pub(crate) fn spread_values(&mut self, target: &str) -> Arc<Vec<Option<String>>> {
        self.cache.spread_values(&self.class_rep, &self.nodes, target)
    }

    /// Runs `f` in its own journal: its changes are undone if it fails or `keep` is
    /// false, and otherwise stay (recorded in an outer journal too, so a caller trying
    /// several jobs can still undo them all).
    pub(crate) fn atomically<T>(&mut self, keep: bool, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let outer = self.journal.replace(Vec::new());
        let result = f(self);
        if !keep || result.is_err() {
            self.rollback_to(0);
        }
        let inner = self.journal.take().unwrap_or_default();
        self.journal = outer.map(|mut o| {
            o.extend(inner);
            o
        });
        result
    }

    /// Runs `f` on the state, then undoes every change it made (placements committed by
    /// [`ClusterState::place`], volumes they created): trying several jobs in turn, each
    /// seeing the ones before, without keeping any of them.
    pub(crate) fn trial<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let outer = self.journal.replace(Vec::new());
        let out = f(self);
        self.rollback_to(0);
        self.journal = outer;
        out
    }

    /// Every allocation, as snapshot data, sorted by id.
    pub fn allocations(&self) -> Vec<Allocation> {
        let mut out: Vec<Allocation> = self.allocs.iter().flatten().map(|r| self.export(r)).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The state as a snapshot (nodes, allocations, volumes).
    pub fn to_snapshot(&self) -> ClusterSnapshot {
        let mut volumes: Vec<HostVolume> = self
            .volumes
            .iter()
            .map(|(name, v)| HostVolume { name: name.clone(), node: self.nodes[v.node as usize].id.clone(), access: v.access })
            .collect();
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        ClusterSnapshot { nodes: self.nodes.clone(), allocations: self.allocations(), volumes }
    }

    /// How many nodes hold at least one allocation.
    pub fn non_empty_nodes(&self) -> usize {
        self.node_allocs.iter().filter(|a| !a.is_empty()).count()
    }

    /// How many allocations there are.
    pub fn allocation_count(&self) -> usize {
        self.alloc_index.len()
    }

    /// The nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub(crate) fn export(&self, r: &AllocRec) -> Allocation {
        let (job, group) = self.group_names[r.group as usize].clone();
        Allocation {
            id: r.id.clone(),
            node: self.nodes[r.node as usize].id.clone(),
            job,
            group,
            priority: r.priority,
            resources: r.resources,
            ports: r.ports.iter().copied().collect(),
            volumes: r.volumes.clone(),
        }
    }

    pub(crate) fn intern_group(&mut self, job: &str, group: &str) -> u32 {
        if let Some(id) = self.group_ids.get(&(job.to_owned(), group.to_owned())) {
            return *id;
        }
        let id = self.group_names.len() as u32;
        self.group_ids.insert((job.to_owned(), group.to_owned()), id);
        self.group_names.push((job.to_owned(), group.to_owned()));
        self.group_allocs.push(Vec::new());
        id
    }

    pub(crate) fn free(&self, node: u32) -> Resources {
        self.cap[node as usize].saturating_sub(self.used[node as usize])
    }

    /// The best-fit order: the node's tightest free fraction over cpu and memory, in fixed
    /// point. A node can hold a task only if every free fraction covers the task's, so
    /// nodes below the task's smallest fraction are skipped outright, and among the rest
    /// the walk reaches first the node whose bottleneck is closest to full. (A sum of
    /// fractions would rank a cpu-full node with spare memory above an empty-ish one, and
    /// walk past every such node for every task.) Disk is checked when fitting but left
    /// out of the order: it is rarely the binding dimension.
    fn key_of(&self, node: u32) -> u64 {
        let (c, f) = (self.cap[node as usize], self.free(node));
        let dims = [(f.cpu_millis, c.cpu_millis), (f.memory_mb, c.memory_mb)];
        dims.iter().filter(|(_, cap)| *cap > 0).map(|(free, cap)| frac(*free, *cap)).min().unwrap_or(0)
    }

    /// A lower bound on the fit key of any node that can hold `r`: every free fraction is
    /// at least the demand over the largest capacity in that dimension, so the tightest
    /// one is at least the smallest of those.
    pub(crate) fn demand_key(&self, r: Resources) -> u64 {
        let Some(l) = self.largest else { return 0 };
        let dims = [(r.cpu_millis, l.cpu_millis), (r.memory_mb, l.memory_mb)];
        dims.iter().filter(|(_, cap)| *cap > 0).map(|(d, cap)| frac(*d, *cap)).min().unwrap_or(0)
    }

    /// How full a node is, 0 to 1, averaged over the dimensions it has.
    pub(crate) fn fullness(&self, node: u32) -> f64 {
        let (c, u) = (self.cap[node as usize], self.used[node as usize]);
        let parts: Vec<f64> = [(u.cpu_millis, c.cpu_millis), (u.memory_mb, c.memory_mb), (u.disk_mb, c.disk_mb)]
            .iter()
            .filter(|(_, cap)| *cap > 0)
            .map(|(used, cap)| (*used as f64 / *cap as f64).min(1.0))
            .collect();
        if parts.is_empty() {
            0.0
        } else {
            parts.iter().sum::<f64>() / parts.len() as f64
        }
    }

    fn rekey(&mut self, node: u32) {
        let i = node as usize;
        self.fit.remove(&(self.fit_key[i], node));
        if self.eligible[i] {
            self.fit_key[i] = self.key_of(node);
            self.fit.insert((self.fit_key[i], node));
        }
    }

    pub(crate) fn port_used(&self, node: u32, port: u16) -> bool {
        self.ports[node as usize].binary_search(&port).is_ok()
    }

    /// Takes `n` free dynamic ports on `node`, lowest first.
    pub(crate) fn pick_dynamic_ports(&self, node: u32, n: u16) -> Vec<u16> {
        let range = self.nodes[node as usize].dynamic_ports;
        let used = &self.ports[node as usize];
        let mut out = Vec::with_capacity(usize::from(n));
        // Walk the range and the sorted used list together: O(range prefix + used).
        let mut u = used.partition_point(|p| *p < range.start);
        let mut p = u32::from(range.start);
        while out.len() < usize::from(n) && p <= u32::from(range.end) {
            let port = p as u16;
            while u < used.len() && used[u] < port {
                u += 1;
            }
            if u < used.len() && used[u] == port {
                u += 1;
            } else {
                out.push(port);
            }
            p += 1;
        }
        out
    }

    /// Adds an allocation, creating volumes it mounts that do not exist yet (with
    /// `create_access`). Returns the slot.
    pub(crate) fn add_alloc(&mut self, rec: AllocRec, create_access: VolumeAccess) -> Result<u32> {
        let node = rec.node;
        if self.alloc_index.contains_key(&rec.id) {
            return Err(Error::invalid("allocation id", &rec.id, "appears twice"));
        }
        for p in &rec.ports {
            if self.port_used(node, *p) {
                return Err(Error::invalid(
                    "allocation port",
                    p.to_string(),
                    format!("allocation {:?}: port already in use on node {:?}", rec.id, self.nodes[node as usize].id),
                ));
            }
        }
        for m in &rec.volumes {
            if let Some(v) = self.volumes.get(&m.name) {
                if v.node != node {
                    return Err(Error::invalid(
                        "allocation volume",
                        &m.name,
                        format!("allocation {:?} mounts a volume that lives on another node", rec.id),
                    ));
                }
            }
        }
        // Checks done: from here on nothing fails, so nothing is left half-added.
        for m in &rec.volumes {
            if !self.volumes.contains_key(&m.name) {
                validate_id("volume name", &m.name)?;
                self.volumes.insert(m.name.clone(), VolRec { node, access: create_access, writers: 0 });
                if let Some(j) = self.journal.as_mut() {
                    j.push(Change::VolumeCreated(m.name.clone()));
                }
            }
            if !m.read_only {
                if let Some(v) = self.volumes.get_mut(&m.name) {
                    v.writers += 1;
                }
            }
        }
        let i = node as usize;
        self.used[i] = self.used[i].saturating_add(rec.resources);
        let range = self.nodes[i].dynamic_ports;
        for p in &rec.ports {
            let ports = &mut self.ports[i];
            let at = ports.partition_point(|x| x < p);
            ports.insert(at, *p);
            if range.contains(*p) {
                self.dyn_free[i] = self.dyn_free[i].saturating_sub(1);
            }
        }
        self.priority_count[usize::from(rec.priority.min(100))] += 1;
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.allocs.push(None);
                (self.allocs.len() - 1) as u32
            }
        };
        self.alloc_index.insert(rec.id.clone(), slot);
        self.node_allocs[i].push(slot);
        self.group_allocs[rec.group as usize].push(slot);
        self.allocs[slot as usize] = Some(rec);
        self.rekey(node);
        if let Some(j) = self.journal.as_mut() {
            j.push(Change::Added(slot));
        }
        Ok(slot)
    }

    /// Removes the allocation in `slot` (which must be occupied) and returns it.
    pub(crate) fn remove_alloc(&mut self, slot: u32) -> AllocRec {
        let Some(rec) = self.allocs[slot as usize].take() else {
            unreachable_slot();
            return AllocRec {
                id: String::new(),
                node: 0,
                group: 0,
                priority: 0,
                resources: Resources::default(),
                ports: vec![],
                volumes: vec![],
            };
        };
        let i = rec.node as usize;
        self.used[i] = self.used[i].saturating_sub(rec.resources);
        let range = self.nodes[i].dynamic_ports;
        for p in &rec.ports {
            if let Ok(at) = self.ports[i].binary_search(p) {
                self.ports[i].remove(at);
                if range.contains(*p) {
                    self.dyn_free[i] += 1;
                }
            }
        }
        for m in rec.volumes.iter().filter(|m| !m.read_only) {
            if let Some(v) = self.volumes.get_mut(&m.name) {
                v.writers = v.writers.saturating_sub(1);
            }
        }
        self.priority_count[usize::from(rec.priority.min(100))] -= 1;
        self.alloc_index.remove(&rec.id);
        remove_item(&mut self.node_allocs[i], slot);
        remove_item(&mut self.group_allocs[rec.group as usize], slot);
        self.free_slots.push(slot);
        self.rekey(rec.node);
        if let Some(j) = self.journal.as_mut() {
            j.push(Change::Removed(rec.clone()));
        }
        rec
    }

    /// Undoes journaled changes back to `mark` entries.
    pub(crate) fn rollback_to(&mut self, mark: usize) {
        let Some(mut journal) = self.journal.take() else { return };
        while journal.len() > mark {
            match journal.pop() {
                Some(Change::Added(slot)) => {
                    self.remove_alloc(slot);
                }
                Some(Change::Removed(rec)) => {
                    // It was valid before it was removed, so re-adding cannot fail.
                    let _ = self.add_alloc(rec, VolumeAccess::SingleWriter);
                }
                Some(Change::VolumeCreated(name)) => {
                    self.volumes.remove(&name);
                }
                None => break,
            }
        }
        self.journal = Some(journal);
    }

    /// How many allocations of `group` are on `node`.
    pub(crate) fn group_count_on(&self, group: u32, node: u32) -> u32 {
        self.node_allocs[node as usize].iter().filter(|s| self.allocs[**s as usize].as_ref().is_some_and(|a| a.group == group)).count()
            as u32
    }
}

fn remove_item(v: &mut Vec<u32>, x: u32) {
    if let Some(at) = v.iter().rposition(|y| *y == x) {
        v.swap_remove(at);
    }
}

#[cold]
fn unreachable_slot() {
    debug_assert!(false, "remove_alloc on an empty slot");
}
