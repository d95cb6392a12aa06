//! Per-class results cached across plans. Node classes never change inside a
//! `ClusterState`, so a constraint list's verdict per class, an affinity list's score per
//! class, and a spread target's value per class only need computing once; jobs of the
//! same shape (the common case) then cost no constraint evaluation at all (Nomad's
//! computed-class idea, kept across plans).

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::Result;
use crate::placement::constraints::Matcher;
use crate::placement::model::Node;
use crate::placement::model::{Affinity, Constraint};

/// Entries kept per cache before it is cleared, so a stream of unique job shapes cannot
/// grow memory without bound.
const MAX_ENTRIES: usize = 4096;

/// A compiled constraint list and its verdict per class.
#[derive(Debug)]
pub(crate) struct CompiledConstraints {
    pub(crate) matchers: Vec<Matcher>,
    /// Per class: the first class-level matcher the class fails.
    pub(crate) class_fail: Vec<Option<usize>>,
    /// Matchers that depend on the node id and are checked per node.
    pub(crate) per_node: Vec<usize>,
}

/// Affinity score per class, and the distinct scores from best to worst (the tiers a
/// group's tasks are placed in).
#[derive(Debug)]
pub(crate) struct AffinityScores {
    pub(crate) per_class: Vec<i32>,
    pub(crate) tiers: Vec<i32>,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct ClassCache {
    constraints: HashMap<Vec<Constraint>, Arc<CompiledConstraints>>,
    affinities: HashMap<Vec<Affinity>, Arc<AffinityScores>>,
    spread: HashMap<String, Arc<Vec<Option<String>>>>,
}

fn bound<K, V>(map: &mut HashMap<K, V>) {
    if map.len() >= MAX_ENTRIES {
        map.clear();
    }
}

impl ClassCache {
    /// The node-predicate constraints of `list` (distinct ones are skipped), compiled and
    /// evaluated per class.
    /// `class_rep` holds each class's representative node (an index into `nodes`).
    pub(crate) fn compiled_constraints(
        &mut self,
        class_rep: &[u32],
        nodes: &[Node],
        list: &[Constraint],
    ) -> Result<Arc<CompiledConstraints>> {
        let key: Vec<Constraint> = list.iter().filter(|c| !c.op.is_distinct()).cloned().collect();
        if let Some(hit) = self.constraints.get(&key) {
            return Ok(hit.clone());
        }
        let matchers = key.iter().map(|c| Matcher::compile("constraint", &c.target, c.op, &c.value)).collect::<Result<Vec<_>>>()?;
        let per_node = matchers.iter().enumerate().filter(|(_, m)| m.per_node()).map(|(i, _)| i).collect();
        let class_fail = class_rep
            .iter()
            .map(|&rep| matchers.iter().enumerate().find(|(_, m)| !m.per_node() && !m.matches(&nodes[rep as usize])).map(|(i, _)| i))
            .collect();
        let compiled = Arc::new(CompiledConstraints { matchers, class_fail, per_node });
        bound(&mut self.constraints);
        self.constraints.insert(key, compiled.clone());
        Ok(compiled)
    }

    /// Sum of matching affinity weights per class.
    pub(crate) fn affinity_scores(&mut self, class_rep: &[u32], nodes: &[Node], list: &[Affinity]) -> Result<Arc<AffinityScores>> {
        if let Some(hit) = self.affinities.get(list) {
            return Ok(hit.clone());
        }
        let matchers = list
            .iter()
            .map(|a| Ok((Matcher::compile("affinity", &a.target, a.op, &a.value)?, i32::from(a.weight))))
            .collect::<Result<Vec<_>>>()?;
        let per_class: Vec<i32> =
            class_rep.iter().map(|&rep| matchers.iter().filter(|(m, _)| m.matches(&nodes[rep as usize])).map(|(_, w)| w).sum()).collect();
        let mut tiers = per_class.clone();
        tiers.sort_unstable_by(|a, b| b.cmp(a));
        tiers.dedup();
        let scores = Arc::new(AffinityScores { per_class, tiers });
        bound(&mut self.affinities);
        self.affinities.insert(list.to_vec(), Arc::clone(&scores));
        Ok(scores)
    }

    /// The value of `target` per class.
    pub(crate) fn spread_values(&mut self, class_rep: &[u32], nodes: &[Node], target: &str) -> Arc<Vec<Option<String>>> {
        if let Some(hit) = self.spread.get(target) {
            return hit.clone();
        }
        let values = Arc::new(class_rep.iter().map(|&rep| nodes[rep as usize].target_value(target).map(str::to_owned)).collect());
        bound(&mut self.spread);
        self.spread.insert(target.to_owned(), Arc::clone(&values));
        values
    }
}
