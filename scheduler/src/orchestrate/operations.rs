//! What an operator does to a running cluster, as store operations: plan a deploy
//! without applying it, scale or stop a group, mark a node ineligible or drain it.
//!
//! Operator settings of a node live under `node-settings/<node>`, apart from the node's
//! own record (`nodes/<node>`, on the agent's lease): an agent that restarts or joins
//! again reads them back, so a drained node stays drained. A change is written to both
//! in one transaction, the live record keeping its lease.

use std::collections::{BTreeMap, HashSet};

use keelson_discovery::{Compare, Expect, Txn};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::orchestrate::cluster_cache::ClusterCache;
use crate::orchestrate::cluster_store::{decode, encode_over, kv_err, wall_clock_ms, ClusterStore};
use crate::orchestrate::deployment::Phase;
use crate::orchestrate::reconcile::{placement_allocation, AllocRecord, AllocStatus, DesiredGroup};
use crate::orchestrate::spec::GroupSpec;
use crate::placement::model::{Allocation, ClusterSnapshot, Eligibility, Job, Node, Plan, TaskGroup, VolumeRequest};
use crate::placement::state::ClusterState;
use crate::records::Origin;

/// What an operator set on a node (`node-settings/<node>`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NodeSettings {
    #[serde(default)]
    pub(crate) eligibility: Eligibility,
}

/// What deploying a group version would do now ([`ClusterStore::plan_deploy`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeployPlan {
    /// Job id.
    pub job: String,
    /// Group name.
    pub group: String,
    /// The version planned.
    pub version: u64,
    /// The stable version running now (`None`: a new group).
    pub current: Option<u64>,
    /// Allocations of the group that the deploy replaces or removes (other versions, or
    /// over the new count), by id.
    pub stops: Vec<String>,
    /// Where each new allocation would go, with what the placement engine decided
    /// (nodes, evictions, and what did not fit, with the reasons).
    pub placement: Plan,
}

impl DeployPlan {
    /// Whether every allocation found a node.
    pub fn is_complete(&self) -> bool {
        self.placement.is_complete()
    }

    /// New allocations per node.
    pub fn per_node(&self) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        for p in &self.placement.placements {
            *out.entry(p.node.clone()).or_default() += 1;
        }
        out
    }
}

impl ClusterStore {
    fn node_settings_key(&self, node: &str) -> String {
        self.key(&["node-settings", node])
    }

    /// `nodes` with what operators set on them applied (one listing, however many
    /// nodes): what a node joins with.
    pub(crate) async fn with_settings(&self, nodes: &[Node]) -> Result<Vec<Node>> {
        let prefix = self.node_settings_key("");
        let list = self.kv.list(&prefix).await.map_err(kv_err)?;
        let mut settings = std::collections::HashMap::new();
        for e in &list.entries {
            settings.insert(&e.key[prefix.len()..], decode::<NodeSettings>(&e.key, &e.value)?);
        }
        Ok(nodes
            .iter()
            .map(|n| match settings.get(n.id.as_str()) {
                Some(s) => Node { eligibility: s.eligibility, ..n.clone() },
                None => n.clone(),
            })
            .collect())
    }

    /// Marks `node` eligible, ineligible (no new work; what runs stays) or draining (no
    /// new work, and the controller moves what runs elsewhere). Kept across the node's
    /// restarts. [`Error::NotFound`] if no such node is live and none was ever set.
    pub async fn set_eligibility(&self, node: &str, eligibility: Eligibility) -> Result<()> {
        crate::error::validate_id("node id", node)?;
        let node_key = self.key(&["nodes", node]);
        let settings_key = self.node_settings_key(node);
        for _ in 0..5 {
            let live = self.kv.get(&node_key).await.map_err(kv_err)?;
            let stored = self.kv.get(&settings_key).await.map_err(kv_err)?;
            if live.is_none() && stored.is_none() {
                return Err(Error::NotFound { kind: "node", name: node.to_owned() });
            }
            let settings_origin = stored.as_ref().map(Origin::of);
            let settings = NodeSettings { eligibility };
            let mut txn = Txn::new().when(Compare::key(&settings_key, Origin::expect(settings_origin.as_ref()))).put(
                &settings_key,
                encode_over(Origin::bytes(settings_origin.as_ref()), &settings)?,
                None,
            );
            if let Some(entry) = &live {
                let mut record: Node = decode(&node_key, &entry.value)?;
                record.eligibility = eligibility;
                txn = txn.when(Compare::key(&node_key, Expect::Version(entry.version))).put(
                    &node_key,
                    encode_over(Some(&entry.value), &record)?,
                    entry.lease,
                );
            }
            match self.write(txn).await {
                Ok(_) => return Ok(()),
                Err(Error::Stale { .. }) => continue, // the agent re-joined meanwhile
                Err(e) => return Err(e),
            }
        }
        Err(Error::Stale { kind: "node", name: node.to_owned() })
    }

    /// The live nodes (their lease is current), as their agents describe them.
    pub async fn nodes(&self) -> Result<Vec<Node>> {
        let list = self.kv.list(&self.key(&["nodes", ""])).await.map_err(kv_err)?;
        list.entries.iter().map(|e| decode(&e.key, &e.value)).collect()
    }

    /// How long ago each live node's agent last renewed its heartbeat lease, by node id,
    /// where the backend can tell ([`keelson_discovery::KeyValue::lease_ttl`]: etcd and memory, in etcd's
    /// whole seconds); empty where it cannot. One query per lease, not per node.
    pub async fn node_heartbeats(&self) -> Result<BTreeMap<String, std::time::Duration>> {
        let prefix = self.key(&["nodes", ""]);
        let list = self.kv.list(&prefix).await.map_err(kv_err)?;
        let mut by_lease = BTreeMap::new();
        let mut out = BTreeMap::new();
        for e in &list.entries {
            let Some(lease) = e.lease else { continue };
            let since = match by_lease.get(&lease) {
                Some(since) => *since,
                None => {
                    let since = match self.kv.lease_ttl(lease).await {
                        Ok(ttl) => Some(ttl.since_renewal()),
                        Err(keelson_discovery::Error::Unsupported { .. }) => return Ok(BTreeMap::new()),
                        Err(keelson_discovery::Error::NotFound { .. }) => None, // expired meanwhile
                        Err(e) => return Err(kv_err(e)),
                    };
                    by_lease.insert(lease, since);
                    since
                }
            };
            if let Some(since) = since {
                out.insert(e.key[prefix.len()..].to_owned(), since);
            }
        }
        Ok(out)
    }

    /// Sets how many allocations of a group run; the controller places or stops the
    /// difference. [`Error::Conflict`] while a deployment of the group is under way (it
    /// owns the count until it ends).
    pub async fn scale(&self, job: &str, group: &str, count: u32) -> Result<()> {
        self.with_group_state(job, group, |state| {
            if state.deployment.is_some() {
                return Err(Error::Conflict {
                    kind: "group",
                    name: format!("{job}/{group}"),
                    reason: "a deployment is under way; scale after it ends".into(),
                });
            }
            state.count = count;
            Ok(())
        })
        .await
    }

    /// Stops a group (count 0: the controller stops every allocation; deploying or
    /// scaling starts it again), or every group of `job` when `group` is `None`. Returns
    /// the groups stopped.
    pub async fn stop(&self, job: &str, group: Option<&str>) -> Result<Vec<String>> {
        let groups: Vec<String> = match group {
            Some(g) => vec![g.to_owned()],
            None => self.group_states().await?.into_iter().filter(|s| s.job == job).map(|s| s.group).collect(),
        };
        if groups.is_empty() {
            return Err(Error::NotFound { kind: "job", name: job.to_owned() });
        }
        for g in &groups {
            self.with_group_state(job, g, |state| {
                // A deployment under way goes back to the stable version (which then
                // stops); one already rolling back is left to finish.
                if let Some(d) = state.deployment.as_mut().filter(|d| !matches!(d.phase(), Phase::RollingBack { .. })) {
                    d.rollback("stopped by an operator")?;
                }
                state.count = 0;
                Ok(())
            })
            .await?;
        }
        Ok(groups)
    }

    /// Every group the controller keeps, in key order.
    pub async fn group_states(&self) -> Result<Vec<crate::GroupState>> {
        Ok(self.all_group_states().await?.into_iter().map(|(s, _)| s).collect())
    }

    /// What deploying `spec` would do on the cluster as it is now, without writing
    /// anything: which allocations go, where the new ones would be placed by the store's
    /// scheduler, and for any that fit nowhere, why (nodes filtered per constraint,
    /// dimension exhausted), as `nomad job plan` shows. The group's current allocations
    /// are counted as gone (a deployment replaces them), so the plan shows whether the
    /// new version fits beside everything else.
    pub async fn plan_deploy(&self, spec: &GroupSpec) -> Result<DeployPlan> {
        let d = &spec.desired;
        let view = self.view().await?;
        let lost = view.lost_nodes();
        let current = self.group_state(&d.job, &d.group).await?;
        let mine = |a: &AllocRecord| a.job == d.job && a.group == d.group;
        let stops = view
            .allocations
            .iter()
            .filter(|a| mine(a) && !lost.contains(&a.node) && !matches!(a.status, AllocStatus::Stopping))
            .map(|a| a.id.clone())
            .collect();
        let snapshot = ClusterSnapshot {
            nodes: view.nodes.clone(),
            volumes: view.volumes.clone(),
            allocations: view
                .allocations
                .iter()
                .filter(|a| !mine(a) && !lost.contains(&a.node) && a.status != AllocStatus::Failed)
                .map(|a| Allocation { resources: a.resources, ..placement_allocation(a) })
                .collect(),
        };
        let mut state = ClusterState::from_snapshot(&snapshot)?;
        let placement = self.scheduler().place_in(&mut state, &Job::new(d.job.clone(), vec![task_group(d, d.count, &d.volumes)]))?;
        Ok(DeployPlan {
            job: d.job.clone(),
            group: d.group.clone(),
            version: d.version,
            current: current.map(|s| s.stable),
            stops,
            placement,
        })
    }

    /// Marks the allocations of `groups` on draining nodes `Stopping`, so their agents
    /// stop them and the reschedule pass that follows places them elsewhere. Returns how
    /// many it marked; a lost race is left for the next tick.
    pub(crate) async fn drain_pass(&self, cache: Option<&ClusterCache>, groups: &[DesiredGroup]) -> Result<usize> {
        // Nodes first: most ticks find none draining and read nothing more.
        let draining: HashSet<String> = match cache {
            Some(cache) => cache.draining_nodes().into_iter().collect(),
            None => self.nodes().await?.into_iter().filter(|n| n.eligibility == Eligibility::Draining).map(|n| n.id).collect(),
        };
        if draining.is_empty() {
            return Ok(0);
        }
        // A drained node stays draining until an operator says otherwise: read the
        // whole cluster only while one still holds work to move (its own keys first).
        let ours = |a: &AllocRecord| groups.iter().any(|g| g.job == a.job && g.group == a.group);
        let movable = |a: &AllocRecord| ours(a) && matches!(a.status, AllocStatus::Pending | AllocStatus::Running);
        let mut any = false;
        for node in &draining {
            any |= self.allocations_on(node).await?.iter().any(movable);
        }
        if !any {
            return Ok(0);
        }
        let view = match cache {
            Some(cache) => cache.view().await?,
            None => self.view().await?,
        };
        let mut plan = view.plan();
        let now = wall_clock_ms();
        for a in view.allocations.iter().filter(|a| draining.contains(a.node.as_str()) && movable(a)) {
            tracing::info!(alloc = %a.id, node = %a.node, "moving off a draining node");
            plan.put(AllocRecord { status: AllocStatus::Stopping, since_ms: now, ..a.clone() });
        }
        let marked = plan.len();
        if marked == 0 {
            return Ok(0);
        }
        match self.commit(&plan).await {
            Ok(_) => Ok(marked),
            Err(Error::Stale { .. }) => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// The placement engine's task group for `n` allocations of `d` mounting `volumes`.
pub(crate) fn task_group(d: &DesiredGroup, n: u32, volumes: &[VolumeRequest]) -> TaskGroup {
    let mut group = TaskGroup::new(d.group.clone(), n, d.resources).with_dynamic_ports(d.ports);
    for v in volumes {
        group = group.with_volume(v.clone());
    }
    group.constraints.clone_from(&d.constraints);
    group.affinities.clone_from(&d.affinities);
    group.spread.clone_from(&d.spread);
    group
}
