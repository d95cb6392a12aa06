//! The placement model: nodes, allocations, volumes, jobs, plans. Plain serde data;
//! unknown keys are rejected so a typo in a job file is an error, not a silent default.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::Dimension;

/// An amount of compute resources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in millicores (1000 = one core).
    #[serde(default)]
    pub cpu_millis: u64,
    /// Memory in MiB.
    #[serde(default)]
    pub memory_mb: u64,
    /// Disk in MiB.
    #[serde(default)]
    pub disk_mb: u64,
}

impl Resources {
    /// `cpu_millis` and `memory_mb`, no disk.
    pub const fn new(cpu_millis: u64, memory_mb: u64) -> Self {
        Resources { cpu_millis, memory_mb, disk_mb: 0 }
    }

    /// Sets the disk amount.
    pub const fn with_disk(mut self, disk_mb: u64) -> Self {
        self.disk_mb = disk_mb;
        self
    }

    /// Component-wise sum, saturating.
    pub fn saturating_add(self, o: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(o.cpu_millis),
            memory_mb: self.memory_mb.saturating_add(o.memory_mb),
            disk_mb: self.disk_mb.saturating_add(o.disk_mb),
        }
    }

    /// Component-wise difference, saturating at zero.
    pub fn saturating_sub(self, o: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(o.cpu_millis),
            memory_mb: self.memory_mb.saturating_sub(o.memory_mb),
            disk_mb: self.disk_mb.saturating_sub(o.disk_mb),
        }
    }

    /// The first dimension in which `self` exceeds `limit`.
    pub fn exceeds(self, limit: Resources) -> Option<Dimension> {
        if self.cpu_millis > limit.cpu_millis {
            Some(Dimension::Cpu)
        } else if self.memory_mb > limit.memory_mb {
            Some(Dimension::Memory)
        } else if self.disk_mb > limit.disk_mb {
            Some(Dimension::Disk)
        } else {
            None
        }
    }

    /// Whether every component is zero.
    pub fn is_zero(self) -> bool {
        self == Resources::default()
    }
}

/// Whether new work may be placed on a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Eligibility {
    /// New work may be placed here.
    #[default]
    Eligible,
    /// Marked ineligible by an operator; existing work stays.
    Ineligible,
    /// Draining: existing work is being moved away.
    Draining,
}

/// An inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    /// First port.
    pub start: u16,
    /// Last port (inclusive).
    pub end: u16,
}

impl Default for PortRange {
    /// Nomad's default dynamic range.
    fn default() -> Self {
        PortRange { start: 20_000, end: 32_000 }
    }
}

impl PortRange {
    /// How many ports the range holds.
    pub fn len(self) -> u32 {
        if self.end < self.start {
            0
        } else {
            u32::from(self.end - self.start) + 1
        }
    }

    /// Whether the range is empty.
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// Whether `port` is in the range.
    pub fn contains(self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

fn default_datacenter() -> String {
    "dc1".to_owned()
}

fn default_pool() -> String {
    "default".to_owned()
}

/// A machine that can run tasks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Unique node id.
    pub id: String,
    /// Datacenter (default `dc1`); target `node.datacenter`.
    #[serde(default = "default_datacenter")]
    pub datacenter: String,
    /// Node pool (default `default`); target `node.pool`.
    #[serde(default = "default_pool")]
    pub pool: String,
    /// What the node offers in total.
    pub capacity: Resources,
    /// Attributes fingerprinted from the machine (`kernel.version`, `cpu.arch`, ...);
    /// target `attr.<name>`.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Labels set by operators (`rack`, `tier`, ...); target `label.<name>`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Whether new work may be placed here.
    #[serde(default)]
    pub eligibility: Eligibility,
    /// Ports the node itself uses; never allocated to tasks.
    #[serde(default)]
    pub reserved_ports: BTreeSet<u16>,
    /// Where dynamic ports are allocated from.
    #[serde(default)]
    pub dynamic_ports: PortRange,
    /// The address other hosts reach this node at, as its agent advertises it (for
    /// operators' tools; placement does not look at it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

impl Node {
    /// An eligible node in `dc1`/`default` with no attributes.
    pub fn new(id: impl Into<String>, capacity: Resources) -> Self {
        Node {
            id: id.into(),
            datacenter: default_datacenter(),
            pool: default_pool(),
            capacity,
            attributes: BTreeMap::new(),
            labels: BTreeMap::new(),
            eligibility: Eligibility::Eligible,
            reserved_ports: BTreeSet::new(),
            dynamic_ports: PortRange::default(),
            address: None,
        }
    }

    /// Adds an attribute (`attr.<key>`).
    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }

    /// Adds a label (`label.<key>`).
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets the datacenter.
    pub fn with_datacenter(mut self, dc: impl Into<String>) -> Self {
        self.datacenter = dc.into();
        self
    }

    /// Whether new work may be placed here.
    pub fn is_eligible(&self) -> bool {
        self.eligibility == Eligibility::Eligible
    }

    /// The value of a constraint target on this node: `attr.<k>`, `label.<k>`,
    /// `node.datacenter`, `node.pool`, `node.id`. `None` if unset.
    pub fn target_value(&self, target: &str) -> Option<&str> {
        if let Some(k) = target.strip_prefix("attr.") {
            self.attributes.get(k).map(String::as_str)
        } else if let Some(k) = target.strip_prefix("label.") {
            self.labels.get(k).map(String::as_str)
        } else {
            match target {
                "node.datacenter" => Some(&self.datacenter),
                "node.pool" => Some(&self.pool),
                "node.id" => Some(&self.id),
                _ => None,
            }
        }
    }
}

/// How many writers a volume allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeAccess {
    /// At most one task may mount it read-write at a time.
    #[default]
    SingleWriter,
    /// Any number of writers.
    MultiWriter,
}

/// A volume that exists on a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostVolume {
    /// Volume name, unique in the cluster.
    pub name: String,
    /// The node whose disk holds it.
    pub node: String,
    /// Writer policy.
    #[serde(default)]
    pub access: VolumeAccess,
}

/// A volume mounted by an allocation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VolumeMount {
    /// Volume name.
    pub name: String,
    /// Mounted read-only (does not count as a writer).
    #[serde(default)]
    pub read_only: bool,
}

fn default_priority() -> u8 {
    50
}

/// Work already placed on a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Allocation id.
    pub id: String,
    /// The node it runs on.
    pub node: String,
    /// Its job (for distinct and spread accounting, and rebalancing).
    #[serde(default)]
    pub job: String,
    /// Its task group.
    #[serde(default)]
    pub group: String,
    /// Its job's priority (0-100, default 50).
    #[serde(default = "default_priority")]
    pub priority: u8,
    /// What it uses.
    pub resources: Resources,
    /// Ports it holds (static and dynamic).
    #[serde(default)]
    pub ports: BTreeSet<u16>,
    /// Volumes it mounts.
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
}

impl Allocation {
    /// An allocation of `resources` on `node`, for job/group, priority 50.
    pub fn new(
        id: impl Into<String>,
        node: impl Into<String>,
        job: impl Into<String>,
        group: impl Into<String>,
        resources: Resources,
    ) -> Self {
        Allocation {
            id: id.into(),
            node: node.into(),
            job: job.into(),
            group: group.into(),
            priority: default_priority(),
            resources,
            ports: BTreeSet::new(),
            volumes: Vec::new(),
        }
    }
}

/// The cluster as the scheduler sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSnapshot {
    /// Every node.
    pub nodes: Vec<Node>,
    /// Every live allocation.
    #[serde(default)]
    pub allocations: Vec<Allocation>,
    /// Every volume.
    #[serde(default)]
    pub volumes: Vec<HostVolume>,
}

/// How a constraint or affinity compares a node's target value with its `value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ConstraintOp {
    /// Set and equal.
    #[serde(rename = "=")]
    Equal,
    /// Unset or different.
    #[serde(rename = "!=")]
    NotEqual,
    /// Set and less than (numeric if both are numbers, else version order).
    #[serde(rename = "<")]
    Less,
    /// Set and less than or equal.
    #[serde(rename = "<=")]
    LessEqual,
    /// Set and greater than.
    #[serde(rename = ">")]
    Greater,
    /// Set and greater than or equal.
    #[serde(rename = ">=")]
    GreaterEqual,
    /// Set and satisfying every comma-separated clause, like `>= 1.2, < 2`.
    #[serde(rename = "version")]
    Version,
    /// Set and matching the regular expression.
    #[serde(rename = "regexp")]
    Regex,
    /// The node's comma-separated set contains any of the value's items.
    #[serde(rename = "set_contains_any")]
    SetContainsAny,
    /// The node's comma-separated set contains all of the value's items.
    #[serde(rename = "set_contains_all")]
    SetContainsAll,
    /// The target is set (value ignored).
    #[serde(rename = "is_set")]
    IsSet,
    /// The target is not set (value ignored).
    #[serde(rename = "is_not_set")]
    IsNotSet,
    /// At most one task of the group per node (target and value ignored).
    #[serde(rename = "distinct_hosts")]
    DistinctHosts,
    /// At most `value` (default 1) tasks of the group per distinct value of the target.
    #[serde(rename = "distinct_property")]
    DistinctProperty,
}

impl ConstraintOp {
    /// The operator as written in job files.
    pub fn as_str(self) -> &'static str {
        match self {
            ConstraintOp::Equal => "=",
            ConstraintOp::NotEqual => "!=",
            ConstraintOp::Less => "<",
            ConstraintOp::LessEqual => "<=",
            ConstraintOp::Greater => ">",
            ConstraintOp::GreaterEqual => ">=",
            ConstraintOp::Version => "version",
            ConstraintOp::Regex => "regexp",
            ConstraintOp::SetContainsAny => "set_contains_any",
            ConstraintOp::SetContainsAll => "set_contains_all",
            ConstraintOp::IsSet => "is_set",
            ConstraintOp::IsNotSet => "is_not_set",
            ConstraintOp::DistinctHosts => "distinct_hosts",
            ConstraintOp::DistinctProperty => "distinct_property",
        }
    }

    /// Whether the operator counts tasks (and so depends on placements, not just the node).
    pub fn is_distinct(self) -> bool {
        matches!(self, ConstraintOp::DistinctHosts | ConstraintOp::DistinctProperty)
    }
}

/// A hard requirement on nodes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Constraint {
    /// What to look at: `attr.<k>`, `label.<k>`, `node.datacenter`, `node.pool`, `node.id`.
    #[serde(default)]
    pub target: String,
    /// The comparison.
    pub op: ConstraintOp,
    /// The value compared with.
    #[serde(default)]
    pub value: String,
}

impl Constraint {
    /// `target op value`.
    pub fn new(target: impl Into<String>, op: ConstraintOp, value: impl Into<String>) -> Self {
        Constraint { target: target.into(), op, value: value.into() }
    }

    /// `target = value`.
    pub fn equal(target: impl Into<String>, value: impl Into<String>) -> Self {
        Constraint::new(target, ConstraintOp::Equal, value)
    }

    /// `target != value`.
    pub fn not_equal(target: impl Into<String>, value: impl Into<String>) -> Self {
        Constraint::new(target, ConstraintOp::NotEqual, value)
    }

    /// At most one task of the group per node.
    pub fn distinct_hosts() -> Self {
        Constraint::new("", ConstraintOp::DistinctHosts, "")
    }

    /// At most `limit` tasks of the group per value of `target`.
    pub fn distinct_property(target: impl Into<String>, limit: u32) -> Self {
        Constraint::new(target, ConstraintOp::DistinctProperty, limit.to_string())
    }
}

impl std::fmt::Display for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.op {
            ConstraintOp::DistinctHosts => f.write_str("distinct_hosts"),
            ConstraintOp::IsSet | ConstraintOp::IsNotSet => write!(f, "{} {}", self.target, self.op.as_str()),
            _ => write!(f, "{} {} {}", self.target, self.op.as_str(), self.value),
        }
    }
}

/// A soft preference: nodes matching get `weight` (-100..=100) added to their affinity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Affinity {
    /// Target, as for constraints.
    pub target: String,
    /// Comparison (distinct operators are not allowed).
    pub op: ConstraintOp,
    /// Value.
    #[serde(default)]
    pub value: String,
    /// Weight, -100 (avoid) to 100 (prefer).
    pub weight: i8,
}

/// Desired share of a spread value, in percent.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SpreadTarget {
    /// The target value.
    pub value: String,
    /// Its share, in percent.
    pub percent: u8,
}

/// Spread a group's tasks over the values of a target.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Spread {
    /// The target (`attr.zone`, `node.datacenter`, ...).
    pub target: String,
    /// Shares per value, summing to 100; empty means even over the values present on
    /// feasible nodes.
    #[serde(default)]
    pub targets: Vec<SpreadTarget>,
}

/// A volume a group mounts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VolumeRequest {
    /// Volume name; with `per_task`, task `i` uses `<name>-<i>`.
    pub name: String,
    /// Writer policy if the volume has to be created.
    #[serde(default)]
    pub access: VolumeAccess,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
    /// One volume per task (stateful replicas), instead of one shared by the group.
    #[serde(default)]
    pub per_task: bool,
}

impl VolumeRequest {
    /// The volume task `index` mounts.
    pub fn volume_for(&self, index: u32) -> String {
        if self.per_task {
            format!("{}-{index}", self.name)
        } else {
            self.name.clone()
        }
    }
}

/// A set of identical tasks placed together.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskGroup {
    /// Group name, unique within the job.
    pub name: String,
    /// How many tasks.
    pub count: u32,
    /// What each task needs.
    pub resources: Resources,
    /// Static ports each task needs on its node.
    #[serde(default)]
    pub static_ports: Vec<u16>,
    /// How many dynamic ports each task needs.
    #[serde(default)]
    pub dynamic_ports: u16,
    /// Hard node requirements (in addition to the job's).
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// Soft node preferences.
    #[serde(default)]
    pub affinities: Vec<Affinity>,
    /// How to spread the tasks.
    #[serde(default)]
    pub spread: Option<Spread>,
    /// Volumes to mount.
    #[serde(default)]
    pub volumes: Vec<VolumeRequest>,
}

impl TaskGroup {
    /// `count` tasks of `resources` each.
    pub fn new(name: impl Into<String>, count: u32, resources: Resources) -> Self {
        TaskGroup {
            name: name.into(),
            count,
            resources,
            static_ports: Vec::new(),
            dynamic_ports: 0,
            constraints: Vec::new(),
            affinities: Vec::new(),
            spread: None,
            volumes: Vec::new(),
        }
    }

    /// Adds a constraint.
    pub fn with_constraint(mut self, c: Constraint) -> Self {
        self.constraints.push(c);
        self
    }

    /// Adds a static port.
    pub fn with_static_port(mut self, port: u16) -> Self {
        self.static_ports.push(port);
        self
    }

    /// Asks for `n` dynamic ports per task.
    pub fn with_dynamic_ports(mut self, n: u16) -> Self {
        self.dynamic_ports = n;
        self
    }

    /// Adds an affinity.
    pub fn with_affinity(mut self, target: impl Into<String>, op: ConstraintOp, value: impl Into<String>, weight: i8) -> Self {
        self.affinities.push(Affinity { target: target.into(), op, value: value.into(), weight });
        self
    }

    /// Sets the spread.
    pub fn with_spread(mut self, spread: Spread) -> Self {
        self.spread = Some(spread);
        self
    }

    /// Adds a volume.
    pub fn with_volume(mut self, v: VolumeRequest) -> Self {
        self.volumes.push(v);
        self
    }
}

/// How to choose among nodes that fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Policy {
    /// Best fit: the fullest node that fits, keeping whole nodes free.
    #[default]
    Binpack,
    /// Worst fit: the emptiest node, spreading load.
    Spread,
}

/// What to place.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Job id.
    pub id: String,
    /// Priority, 0 to 100 (default 50). A job may preempt allocations at least
    /// [`crate::PREEMPTION_GAP`] points lower.
    #[serde(default = "default_priority")]
    pub priority: u8,
    /// Placement policy.
    #[serde(default)]
    pub policy: Policy,
    /// Constraints applying to every group.
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// Task groups.
    pub groups: Vec<TaskGroup>,
}

impl Job {
    /// A job of `groups`, priority 50, bin-packing.
    pub fn new(id: impl Into<String>, groups: Vec<TaskGroup>) -> Self {
        Job { id: id.into(), priority: default_priority(), policy: Policy::Binpack, constraints: Vec::new(), groups }
    }

    /// Sets the priority.
    pub fn with_priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the policy.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }
}

/// Why a node was chosen, as numbers a person can compare.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScoreBreakdown {
    /// How full the node is after the placement, 0 to 1 (mean over cpu, memory, disk).
    pub fullness: f64,
    /// Sum of the matching affinities' weights.
    pub affinity: i32,
    /// The spread value this task counts toward, if the group spreads.
    pub spread_value: Option<String>,
    /// `binpack` or `spread`.
    pub policy: Policy,
}

/// One task placed on a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// The group.
    pub group: String,
    /// Task index within the group, from 0.
    pub index: u32,
    /// The chosen node.
    pub node: String,
    /// What the task reserves.
    pub resources: Resources,
    /// Ports reserved: static ones first, then dynamic ones.
    pub ports: Vec<u16>,
    /// Volumes mounted (created on the node if they did not exist).
    pub volumes: Vec<VolumeMount>,
    /// Why this node.
    pub score: ScoreBreakdown,
}

/// An allocation the plan stops to make room for higher-priority work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eviction {
    /// Allocation id.
    pub allocation: String,
    /// Its node.
    pub node: String,
    /// Its priority.
    pub priority: u8,
}

/// Why tasks of a group could not be placed. Each evaluated node is counted exactly once:
/// `nodes_ineligible + Σ filtered_by_constraint + Σ exhausted + nodes_available ==
/// nodes_evaluated`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// Nodes looked at.
    pub nodes_evaluated: usize,
    /// Nodes not eligible (draining or ineligible).
    pub nodes_ineligible: usize,
    /// Nodes filtered out, by the first constraint they fail (its display form).
    pub filtered_by_constraint: BTreeMap<String, usize>,
    /// Nodes that passed the constraints but lacked something, by the first lack.
    pub exhausted: BTreeMap<Dimension, usize>,
    /// Nodes that could still take a task (non-zero only when placement stopped for a
    /// reason outside the node, such as a spread target's share being used up).
    pub nodes_available: usize,
}

impl Explanation {
    /// Whether the counts add up to `nodes_evaluated`.
    pub fn adds_up(&self) -> bool {
        self.nodes_ineligible
            + self.filtered_by_constraint.values().sum::<usize>()
            + self.exhausted.values().sum::<usize>()
            + self.nodes_available
            == self.nodes_evaluated
    }
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} nodes evaluated", self.nodes_evaluated)?;
        if self.nodes_ineligible > 0 {
            write!(f, "; {} ineligible", self.nodes_ineligible)?;
        }
        for (c, n) in &self.filtered_by_constraint {
            write!(f, "; {n} filtered by constraint `{c}`")?;
        }
        for (d, n) in &self.exhausted {
            write!(f, "; {n} exhausted on {d}")?;
        }
        if self.nodes_available > 0 {
            write!(f, "; {} available but not used", self.nodes_available)?;
        }
        Ok(())
    }
}

/// Tasks of a group left unplaced, with the reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    /// The group.
    pub group: String,
    /// How many of its tasks were not placed.
    pub count: u32,
    /// Why, evaluated after every placement the plan could make.
    pub explanation: Explanation,
}

/// The result of planning a job: where each task goes, what must be evicted for it, and
/// what did not fit and why.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Placed tasks, in group order then index order.
    pub placements: Vec<Placement>,
    /// Allocations to stop first (preemption).
    pub evictions: Vec<Eviction>,
    /// Groups with tasks that did not fit.
    pub unplaced: Vec<Unplaced>,
}

impl Plan {
    /// Whether every task was placed.
    pub fn is_complete(&self) -> bool {
        self.unplaced.is_empty()
    }
}
