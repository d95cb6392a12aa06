//! The cluster store's one-off runs: placing a run (through the store's scheduler,
//! counting every allocation and run) and the records its node's agent reads and writes
//! while the run goes ([`RunRecord`] under `runs/<node>/`, [`RunResult`] under
//! `run-results/`).

use crate::error::{validate_id, Error, Result};
use crate::orchestrate::cluster_store::{decode, encode, encode_over, kv_err, wall_clock_ms, ClusterStore, PlanCommit};
use crate::orchestrate::oneoff::OneOffRun;
use crate::orchestrate::runs::{RunRecord, RunResult, RunSpec};
use crate::placement::model::{Allocation, ClusterSnapshot, Job, TaskGroup};
use crate::records::Origin;

impl ClusterStore {
    /// Places `spec` on a node (the store's scheduler, counting every allocation and
    /// run) and records it for that node's agent. [`Error::Conflict`] if a run with this
    /// id exists or has a result; [`Error::Unplaced`] if no node can take it now.
    pub async fn submit_run(&self, spec: &RunSpec) -> Result<RunRecord> {
        validate_id("run id", &spec.id)?;
        validate_id("job id", &spec.job)?;
        if spec.time_limit.is_zero() {
            return Err(Error::invalid("time limit", "0s", "a run needs time to run"));
        }
        for _ in 0..5 {
            if self.run_result(&spec.id).await?.is_some() {
                return Err(Error::Conflict {
                    kind: "run",
                    name: spec.id.clone(),
                    reason: "a run with this id exists or has a result".into(),
                });
            }
            let view = self.view().await?;
            let runs = self.all_runs().await?;
            if runs.iter().any(|r| r.spec.id == spec.id) {
                return Err(Error::Conflict {
                    kind: "run",
                    name: spec.id.clone(),
                    reason: "a run with this id exists or has a result".into(),
                });
            }
            let lost = view.lost_nodes();
            let mut snapshot = ClusterSnapshot { nodes: view.nodes.clone(), volumes: view.volumes.clone(), ..ClusterSnapshot::default() };
            // What runs and live allocations hold (older allocation records carry no
            // resources and count as zero).
            snapshot.allocations = runs
                .iter()
                .filter(|r| !lost.contains(&r.node))
                .map(|r| Allocation::new(r.spec.id.clone(), r.node.clone(), r.spec.job.clone(), "run", r.spec.resources))
                .chain(
                    view.allocations
                        .iter()
                        .filter(|a| !lost.contains(&a.node) && a.status != crate::orchestrate::reconcile::AllocStatus::Failed)
                        .map(|a| Allocation::new(a.id.clone(), a.node.clone(), a.job.clone(), a.group.clone(), a.resources)),
                )
                .collect();
            let job = Job::new(spec.job.clone(), vec![TaskGroup::new("run", 1, spec.resources)]);
            let plan = self.scheduler().plan(&snapshot, &job)?;
            let Some(placement) = plan.placements.first() else {
                let reason = plan.unplaced.first().map_or_else(|| "no node".to_owned(), |u| format!("{:?}", u.explanation));
                return Err(Error::Unplaced { what: format!("run {}", spec.id), reason });
            };
            let record = RunRecord {
                spec: spec.clone(),
                node: placement.node.clone(),
                run: OneOffRun::new(spec.time_limit),
                submitted_ms: wall_clock_ms(),
            };
            let mut commit = view.plan();
            commit.put_run(record.clone());
            match self.commit(&commit).await {
                Ok(_) => return Ok(record),
                Err(Error::Stale { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Stale { kind: "plan", name: format!("run {} (5 attempts)", spec.id) })
    }

    /// The runs placed on `node`, with where each was read from (for write-backs).
    pub(crate) async fn runs_on_stored(&self, node: &str) -> Result<Vec<(RunRecord, Origin)>> {
        let list = self.kv.list(&self.key(&["runs", node, ""])).await.map_err(kv_err)?;
        list.entries.iter().map(|e| Ok((decode(&e.key, &e.value)?, Origin::of(e)))).collect()
    }

    async fn all_runs(&self) -> Result<Vec<RunRecord>> {
        let list = self.kv.list(&self.key(&["runs", ""])).await.map_err(kv_err)?;
        list.entries.iter().map(|e| decode(&e.key, &e.value)).collect()
    }

    /// The runs placed on `node` that have not ended.
    pub async fn runs_on(&self, node: &str) -> Result<Vec<RunRecord>> {
        let list = self.kv.list(&self.key(&["runs", node, ""])).await.map_err(kv_err)?;
        list.entries.iter().map(|e| decode(&e.key, &e.value)).collect()
    }

    /// A run's result, once it has ended.
    pub async fn run_result(&self, id: &str) -> Result<Option<RunResult>> {
        let key = self.key(&["run-results", id]);
        self.kv.get(&key).await.map_err(kv_err)?.map(|e| decode(&key, &e.value)).transpose()
    }

    /// Saves a run's state over the record it was read from (only its agent writes it
    /// after placement), keeping fields this version does not know.
    pub(crate) async fn save_run(&self, record: &RunRecord, origin: &Origin) -> Result<()> {
        let value = encode_over(Some(&origin.bytes), record)?;
        self.kv.put(&self.key(&["runs", &record.node, &record.spec.id]), value, None).await.map_err(kv_err)?;
        Ok(())
    }

    /// Keeps the result first, then drops the pending record: a crash in between leaves
    /// a record whose result exists, which the next pass just clears.
    pub(crate) async fn finish_run(&self, record: &RunRecord, result: &RunResult) -> Result<()> {
        self.kv.put(&self.key(&["run-results", &result.id]), encode(result)?, None).await.map_err(kv_err)?;
        self.forget_run(&record.node, &record.spec.id).await
    }

    pub(crate) async fn forget_run(&self, node: &str, id: &str) -> Result<()> {
        self.kv.delete(&self.key(&["runs", node, id])).await.map_err(kv_err)?;
        Ok(())
    }
}

impl PlanCommit {
    /// Adds a placed run.
    pub(crate) fn put_run(&mut self, record: RunRecord) {
        self.touch(&record.node);
        self.runs.push(record);
    }
}
