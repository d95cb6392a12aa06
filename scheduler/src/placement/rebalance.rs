//! Rebalancing: propose moves that empty whole nodes (what nomad#1635 asks for).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::placement::engine::Pass;
use crate::placement::model::{Job, Policy};
use crate::placement::state::ClusterState;

/// Move one allocation to another node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// Allocation id.
    pub allocation: String,
    /// Node it runs on now.
    pub from: String,
    /// Node it should run on.
    pub to: String,
}

/// A set of moves and the nodes they empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebalancePlan {
    /// Moves, in the order to perform them.
    pub moves: Vec<Move>,
    /// Nodes left with no allocation once the moves are done.
    pub freed_nodes: Vec<String>,
}

impl ClusterState {
    /// Proposes at most `max_moves` moves that leave whole nodes empty, without changing
    /// the state (a dry run). The least-loaded nodes are emptied first, onto nodes that
    /// already hold work (best fit), so the count of non-empty nodes drops. Every move
    /// honours its group's constraints, ports and distinct limits; allocations with
    /// volumes (their data is local) or whose job is not in `jobs` are never moved, and a
    /// node is only emptied if all of its allocations can move. Attempts are bounded by
    /// `2 × max_moves`, so the cost stays proportional to the budget.
    pub fn rebalance(&mut self, jobs: &[Job], max_moves: usize) -> Result<RebalancePlan> {
        let by_id: HashMap<&str, &Job> = jobs.iter().map(|j| (j.id.as_str(), j)).collect();
        let n = self.nodes.len();
        let mut candidates: Vec<u32> =
            (0..n as u32).filter(|&i| self.eligible[i as usize] && !self.node_allocs[i as usize].is_empty()).collect();
        candidates.sort_by_key(|&i| (self.node_allocs[i as usize].len(), std::cmp::Reverse(self.fit_key[i as usize]), i));
        let outer = self.journal.take();
        self.journal = Some(Vec::new());
        let mut exclude = vec![false; n];
        let mut plan = RebalancePlan::default();
        let mut attempts = 0usize;
        let budget = max_moves.saturating_mul(2);
        let mut result = Ok(());
        for cand in candidates {
            let slots = self.node_allocs[cand as usize].clone();
            if plan.moves.len() + slots.len() > max_moves || attempts + slots.len() > budget {
                continue;
            }
            attempts += slots.len();
            let mark = self.journal.as_ref().map_or(0, Vec::len);
            exclude[cand as usize] = true;
            match self.empty_node(cand, &slots, &by_id, &exclude) {
                Ok(Some(moves)) => {
                    plan.moves.extend(moves);
                    plan.freed_nodes.push(self.nodes[cand as usize].id.clone());
                }
                Ok(None) => {
                    self.rollback_to(mark);
                    exclude[cand as usize] = false;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.rollback_to(0);
        self.journal = outer;
        result.map(|()| plan)
    }

    /// Moves every allocation in `slots` off `node`; `None` if one cannot move.
    fn empty_node(&mut self, node: u32, slots: &[u32], jobs: &HashMap<&str, &Job>, exclude: &[bool]) -> Result<Option<Vec<Move>>> {
        let mut moves = Vec::with_capacity(slots.len());
        for &slot in slots {
            let Some(rec) = self.allocs[slot as usize].clone() else { continue };
            if !rec.volumes.is_empty() {
                return Ok(None);
            }
            let (job_id, group_name) = self.group_names[rec.group as usize].clone();
            let Some(job) = jobs.get(job_id.as_str()) else { return Ok(None) };
            let Some(group) = job.groups.iter().find(|g| g.name == group_name) else { return Ok(None) };
            if group.resources != rec.resources {
                // Not the job's current shape: the job file cannot tell us what it needs.
                return Ok(None);
            }
            self.remove_alloc(slot);
            let mut ctx = self.group_ctx(job, group)?;
            let pass = Pass { non_empty_only: true, exclude: Some(exclude), reuse_id: Some(&rec.id), ..Pass::default() };
            let mut out = Vec::new();
            if self.fill(&mut ctx, &pass, 1, Policy::Binpack, &mut std::iter::once(0), &mut out)? == 0 {
                return Ok(None);
            }
            moves.push(Move { allocation: rec.id, from: self.nodes[node as usize].id.clone(), to: out[0].node.clone() });
        }
        Ok(Some(moves))
    }
}
