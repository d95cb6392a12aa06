//! The reconciler: what the cluster should run against what it runs, as actions. Pure
//! and synchronous, two passes over the allocations (the first hashes each allocation's
//! job and group once and remembers the result, the second picks surplus without
//! hashing), so a million allocations reconcile in a fraction of a second (the
//! `reconcile` bench).
//!
//! Version changes are not the reconciler's business: a group whose allocations run
//! another version is reported in [`Reconciliation::deploy`] for a [`crate::Deployment`]
//! to move under its strategy. The reconciler keeps counts right: it replaces what was
//! lost with its node or failed, places what is missing, and stops what is surplus or
//! belongs to no desired group.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::placement::model::Allocation;

/// One task group as it should run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredGroup {
    /// Job id.
    pub job: String,
    /// Group name within the job.
    pub group: String,
    /// The job version to run.
    pub version: u64,
    /// Allocations wanted.
    pub count: u32,
    /// What each allocation needs (for placing replacements).
    #[serde(default)]
    pub resources: crate::placement::model::Resources,
    /// Dynamic host ports each allocation gets (a service's port, say).
    #[serde(default)]
    pub ports: u16,
    /// Volumes each allocation mounts: placement puts the allocation on the node that
    /// holds an existing volume, and a new one is created where the allocation lands.
    #[serde(default)]
    pub volumes: Vec<crate::placement::model::VolumeRequest>,
    /// Where allocations may go: `attr.kernel.name = linux`, `label.tier = edge`,
    /// `node.datacenter = dc2` (see [`crate::Constraint`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<crate::placement::model::Constraint>,
    /// Where allocations would rather go, weighted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinities: Vec<crate::placement::model::Affinity>,
    /// How allocations spread over the values of a node target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<crate::placement::model::Spread>,
}

impl DesiredGroup {
    /// Whether an allocation writes a single-writer volume: then two allocations of the
    /// group can never run at once, and a [`crate::Deployment`] must be stop-first.
    pub fn single_writer(&self) -> bool {
        self.volumes.iter().any(|v| !v.read_only && v.access == crate::placement::model::VolumeAccess::SingleWriter)
    }
}

/// Where an allocation is, as the cluster state records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AllocStatus {
    /// Placed, not yet running.
    Pending,
    /// Running.
    Running,
    /// Exited or failing; to be replaced.
    Failed,
    /// Asked to stop.
    Stopping,
}

/// One allocation as the cluster state records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocRecord {
    /// Allocation id.
    pub id: String,
    /// Job id.
    pub job: String,
    /// Group name.
    pub group: String,
    /// Job version it runs.
    pub version: u64,
    /// Node it was placed on.
    pub node: String,
    /// Its status.
    pub status: AllocStatus,
    /// Host ports given to it at placement (the service port first).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// When it entered its status, in milliseconds since the Unix epoch (0: unknown).
    #[serde(default)]
    pub since_ms: u64,
    /// The volumes it mounts, in the order of its group's volume requests.
    #[serde(default)]
    pub volumes: Vec<crate::placement::model::VolumeMount>,
    /// What it was placed with: what it holds on its node, whichever group placement
    /// is working on (records from before this field count as zero).
    #[serde(default)]
    pub resources: crate::placement::model::Resources,
    /// How often its task was restarted in place, as its agent last reported.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
    /// Its place among its group's allocations (0..count, the lowest free when it was
    /// placed; a per-task volume's index): a replacement takes the slot of what it
    /// replaces, so it can go back to that slot's node and address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    /// Its address on a keelson network, as its agent last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::IpAddr>,
    /// The address its slot had on this node before (a stop-first update): the agent
    /// asks the network for it, and gets it when it is free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefer_address: Option<std::net::IpAddr>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What to do to make the cluster match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconciliation {
    /// New allocations to place: (index into the desired groups, how many), of the
    /// group's desired version.
    pub place: Vec<(usize, u32)>,
    /// Allocations to stop: surplus, failed, or of no desired group.
    pub stop: Vec<String>,
    /// Allocations on lost nodes: to be marked lost (they are replaced through `place`).
    pub lost: Vec<String>,
    /// Indices of desired groups with live allocations of another version: a deployment
    /// moves them.
    pub deploy: Vec<usize>,
}

impl Reconciliation {
    /// Whether the cluster already matches.
    pub fn is_empty(&self) -> bool {
        self.place.is_empty() && self.stop.is_empty() && self.lost.is_empty() && self.deploy.is_empty()
    }
}

/// No desired group (in the per-allocation index).
const NONE: u32 = u32::MAX;

/// Compares `desired` with `allocs`; `lost_nodes` are nodes whose heartbeat lease expired.
pub fn reconcile(desired: &[DesiredGroup], allocs: &[AllocRecord], lost_nodes: &HashSet<String>) -> Reconciliation {
    let index: HashMap<(&str, &str), u32> =
        desired.iter().enumerate().map(|(i, g)| ((g.job.as_str(), g.group.as_str()), i as u32)).collect();
    let mut live = vec![0u32; desired.len()];
    let mut other_version = vec![false; desired.len()];
    let mut group_of = Vec::with_capacity(allocs.len());
    let mut out = Reconciliation::default();
    for a in allocs {
        let g = index.get(&(a.job.as_str(), a.group.as_str())).copied().unwrap_or(NONE);
        group_of.push(g);
        if a.status == AllocStatus::Stopping {
            continue;
        }
        if !lost_nodes.is_empty() && lost_nodes.contains(&a.node) {
            out.lost.push(a.id.clone());
            continue;
        }
        if g == NONE || a.status == AllocStatus::Failed {
            out.stop.push(a.id.clone());
            continue;
        }
        live[g as usize] += 1;
        if a.version != desired[g as usize].version {
            other_version[g as usize] = true;
        }
    }
    // Surplus: stop the last allocations of each group over its count (pending ones
    // would be as good a choice; the last ones keep the choice stable between runs).
    let mut surplus: Vec<u32> = desired.iter().zip(&live).map(|(d, l)| l.saturating_sub(d.count)).collect();
    if surplus.iter().any(|s| *s > 0) {
        for (a, g) in allocs.iter().zip(&group_of).rev() {
            if *g == NONE || a.status == AllocStatus::Stopping || a.status == AllocStatus::Failed {
                continue;
            }
            let s = &mut surplus[*g as usize];
            if *s > 0 && !lost_nodes.contains(&a.node) {
                *s -= 1;
                out.stop.push(a.id.clone());
            }
        }
    }
    for (i, d) in desired.iter().enumerate() {
        if live[i] < d.count {
            out.place.push((i, d.count - live[i]));
        }
        if other_version[i] {
            out.deploy.push(i);
        }
    }
    out
}

/// An allocation as the placement engine counts it.
pub(crate) fn placement_allocation(a: &AllocRecord) -> Allocation {
    Allocation {
        ports: a.ports.iter().copied().collect(),
        volumes: a.volumes.clone(),
        ..Allocation::new(a.id.clone(), a.node.clone(), a.job.clone(), a.group.clone(), a.resources)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(id: &str, group: &str, version: u64, node: &str, status: AllocStatus) -> AllocRecord {
        AllocRecord {
            id: id.into(),
            job: "web".into(),
            group: group.into(),
            version,
            node: node.into(),
            status,
            ports: Vec::new(),
            since_ms: 0,
            volumes: Vec::new(),
            resources: Default::default(),
            restarts: 0,
            slot: None,
            address: None,
            prefer_address: None,
        }
    }

    fn want(group: &str, version: u64, count: u32) -> DesiredGroup {
        DesiredGroup { job: "web".into(), group: group.into(), version, count, ..DesiredGroup::default() }
    }

    #[test]
    fn a_matching_cluster_needs_nothing() {
        let allocs = vec![alloc("a", "http", 1, "n1", AllocStatus::Running), alloc("b", "http", 1, "n2", AllocStatus::Pending)];
        assert!(reconcile(&[want("http", 1, 2)], &allocs, &HashSet::new()).is_empty());
    }

    #[test]
    fn lost_and_failed_allocations_are_replaced_and_missing_ones_placed() {
        let allocs = vec![
            alloc("a", "http", 1, "n1", AllocStatus::Running),
            alloc("b", "http", 1, "gone", AllocStatus::Running),
            alloc("c", "http", 1, "n2", AllocStatus::Failed),
            alloc("d", "http", 1, "n2", AllocStatus::Stopping),
        ];
        let r = reconcile(&[want("http", 1, 4)], &allocs, &HashSet::from(["gone".to_owned()]));
        assert_eq!(r.lost, vec!["b"]);
        assert_eq!(r.stop, vec!["c"]);
        assert_eq!(r.place, vec![(0, 3)], "one runs; three to place (the stopping one does not count)");
        assert!(r.deploy.is_empty());
    }

    #[test]
    fn surplus_and_orphans_stop_and_other_versions_go_to_a_deployment() {
        let allocs = vec![
            alloc("a", "http", 1, "n1", AllocStatus::Running),
            alloc("b", "http", 2, "n1", AllocStatus::Running),
            alloc("c", "http", 2, "n2", AllocStatus::Running),
            alloc("x", "old-group", 1, "n1", AllocStatus::Running),
        ];
        let r = reconcile(&[want("http", 2, 2)], &allocs, &HashSet::new());
        assert_eq!(r.stop, vec!["x", "c"], "the orphan, then the last allocation over the count");
        assert!(r.place.is_empty());
        assert_eq!(r.deploy, vec![0], "a version-1 allocation is left to the deployment");
    }
}
