//! The placement model: nodes, allocations, jobs, plans. Plain data, serde-friendly.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::Dimension;

/// An amount of compute resources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU in millicores (1000 = one core).
    #[serde(default)]
    pub cpu_millis: u64,
    /// Memory in MiB.
    #[serde(default)]
    pub memory_mb: u64,
}

impl Resources {
    /// `cpu_millis` and `memory_mb`.
    pub const fn new(cpu_millis: u64, memory_mb: u64) -> Self {
        Resources { cpu_millis, memory_mb }
    }

    /// Component-wise sum, saturating.
    pub fn saturating_add(self, o: Resources) -> Resources {
        Resources { cpu_millis: self.cpu_millis.saturating_add(o.cpu_millis), memory_mb: self.memory_mb.saturating_add(o.memory_mb) }
    }

    /// The first dimension in which `self` exceeds `limit`.
    pub fn exceeds(self, limit: Resources) -> Option<Dimension> {
        if self.cpu_millis > limit.cpu_millis {
            Some(Dimension::Cpu)
        } else if self.memory_mb > limit.memory_mb {
            Some(Dimension::Memory)
        } else {
            None
        }
    }
}

/// A machine that can run tasks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Unique node id.
    pub id: String,
    /// What the node offers in total.
    pub capacity: Resources,
    /// Attributes constraints match on (`os`, `rack`, `kernel`, ...).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Whether new work may be placed here (false while draining).
    #[serde(default = "yes")]
    pub eligible: bool,
}

fn yes() -> bool {
    true
}

impl Node {
    /// An eligible node with no attributes.
    pub fn new(id: impl Into<String>, capacity: Resources) -> Self {
        Node { id: id.into(), capacity, attributes: BTreeMap::new(), eligible: true }
    }

    /// Adds an attribute.
    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }
}

/// Work already placed on a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allocation {
    /// Allocation id.
    pub id: String,
    /// The node it runs on.
    pub node: String,
    /// What it uses.
    pub resources: Resources,
    /// Static ports it holds.
    #[serde(default)]
    pub ports: BTreeSet<u16>,
}

/// The cluster as the scheduler sees it: nodes and what already runs on them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSnapshot {
    /// Every node.
    pub nodes: Vec<Node>,
    /// Every live allocation.
    #[serde(default)]
    pub allocations: Vec<Allocation>,
}

/// How a constraint compares a node attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConstraintOp {
    /// The attribute exists and equals the value.
    #[serde(rename = "=")]
    Equal,
    /// The attribute is absent or differs from the value.
    #[serde(rename = "!=")]
    NotEqual,
}

/// A hard requirement on a node attribute.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraint {
    /// The attribute name.
    pub attribute: String,
    /// The comparison.
    pub op: ConstraintOp,
    /// The value compared with.
    pub value: String,
}

impl Constraint {
    /// `attribute = value`.
    pub fn equal(attribute: impl Into<String>, value: impl Into<String>) -> Self {
        Constraint { attribute: attribute.into(), op: ConstraintOp::Equal, value: value.into() }
    }

    /// `attribute != value`.
    pub fn not_equal(attribute: impl Into<String>, value: impl Into<String>) -> Self {
        Constraint { attribute: attribute.into(), op: ConstraintOp::NotEqual, value: value.into() }
    }

    /// Whether `node` satisfies the constraint.
    pub fn matches(&self, node: &Node) -> bool {
        let attr = node.attributes.get(&self.attribute);
        match self.op {
            ConstraintOp::Equal => attr == Some(&self.value),
            ConstraintOp::NotEqual => attr != Some(&self.value),
        }
    }
}

impl std::fmt::Display for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = match self.op {
            ConstraintOp::Equal => "=",
            ConstraintOp::NotEqual => "!=",
        };
        write!(f, "{} {op} {}", self.attribute, self.value)
    }
}

/// A set of identical tasks placed together.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Hard node requirements.
    #[serde(default)]
    pub constraints: Vec<Constraint>,
}

impl TaskGroup {
    /// `count` tasks of `resources` each.
    pub fn new(name: impl Into<String>, count: u32, resources: Resources) -> Self {
        TaskGroup { name: name.into(), count, resources, static_ports: Vec::new(), constraints: Vec::new() }
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
}

/// What to place.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Job id.
    pub id: String,
    /// Task groups.
    pub groups: Vec<TaskGroup>,
}

impl Job {
    /// A job of `groups`.
    pub fn new(id: impl Into<String>, groups: Vec<TaskGroup>) -> Self {
        Job { id: id.into(), groups }
    }
}

/// One task placed on a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The group.
    pub group: String,
    /// Task index within the group, from 0.
    pub index: u32,
    /// The chosen node.
    pub node: String,
    /// What the task reserves.
    pub resources: Resources,
    /// Static ports reserved.
    pub ports: Vec<u16>,
}

/// Why tasks of a group could not be placed, counted over the nodes evaluated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// Nodes looked at.
    pub nodes_evaluated: usize,
    /// Nodes skipped because they are not eligible (draining).
    pub nodes_ineligible: usize,
    /// Nodes filtered out per constraint (its display form).
    pub filtered_by_constraint: BTreeMap<String, usize>,
    /// Nodes that passed the constraints but lacked a resource.
    pub exhausted: BTreeMap<Dimension, usize>,
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
    /// Why, as of the first task that failed.
    pub explanation: Explanation,
}

/// The result of planning a job: where each task goes, and what did not fit and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Placed tasks, in group order then index order.
    pub placements: Vec<Placement>,
    /// Groups with tasks that did not fit.
    pub unplaced: Vec<Unplaced>,
}

impl Plan {
    /// Whether every task was placed.
    pub fn is_complete(&self) -> bool {
        self.unplaced.is_empty()
    }
}
