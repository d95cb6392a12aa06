//! The c1m workload: nodes registered through the cluster store, then jobs of identical
//! tasks each placed and committed by `ClusterStore::reschedule_with` against a watch-fed
//! `ClusterCache`, as the leading controller does for a steady group. Shared by the `c1m` bench and its smoke test.
//!
//! It measures allocations committed per second end to end, the store's writes and bytes
//! per allocation (counted by a wrapper around the `KeyValue`), commit latency per job,
//! and the delay from a job's commit to the watch of a node agent on a sampled node
//! seeing its allocations; and it checks the stored state with the independent
//! validator before it reports.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use keelson_discovery::conformance::TestKv;
use keelson_discovery::{KeyValue, KvEventKind};
use keelson_scheduler::{ClusterCache, ClusterStore, DesiredGroup, Node, Resources};

/// Nomad's published C1M rate: 1,000,000 containers on 5,000 hosts in under 5 minutes.
/// About 3,750 placements a second; published by HashiCorp, not measured here.
pub const NOMAD_C1M_ALLOCS_PER_S: f64 = 3_750.0;

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct C1mConfig {
    /// Nodes registered.
    pub nodes: usize,
    /// Jobs submitted.
    pub jobs: usize,
    /// Tasks per job.
    pub tasks: u32,
    /// Jobs of [`BIG_JOB_TASKS`] tasks committed after the others, for the commit latency
    /// of a large job.
    pub big_jobs: usize,
    /// Nodes whose allocations a watch follows (the agent's view).
    pub sample_nodes: usize,
}

/// What it measured.
#[derive(Clone, Debug, Default)]
pub struct C1mReport {
    /// Allocations committed.
    pub allocations: usize,
    /// Wall time of the job loop.
    pub elapsed: Duration,
    /// Keys written (puts and deletes) per allocation.
    pub writes_per_alloc: f64,
    /// Bytes of keys and values written per allocation.
    pub bytes_per_alloc: f64,
    /// Commit latency of one job (read, placement, commit), sorted.
    pub commit_latencies: Vec<Duration>,
    /// The same for the jobs of [`BIG_JOB_TASKS`] tasks, sorted.
    pub big_commit_latencies: Vec<Duration>,
    /// Delays until the watches on the sampled nodes saw their allocations, sorted,
    /// counted from the job's submission (before it was planned): an upper bound of the
    /// delay from commit to watch, which lies inside it.
    pub watch_delays: Vec<Duration>,
    /// How many of those the watch saw before the commit call had returned.
    pub seen_before_return: usize,
    /// Broken invariants found by the validator (empty: sound).
    pub violations: Vec<String>,
}

impl C1mReport {
    /// Allocations per second.
    pub fn allocs_per_s(&self) -> f64 {
        self.allocations as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Tasks of each of the big jobs.
pub const BIG_JOB_TASKS: u32 = 1_000;

/// The `q` quantile of sorted `v`.
pub fn quantile(v: &[Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Node `i`: room for 1.25 times its share of the allocations.
fn node(i: usize, per_node: u64) -> Node {
    let room = per_node * 5 / 4 + 1;
    Node::new(format!("n{i:05}"), Resources::new(room * 100, room * 64))
}

/// Runs the workload on `kv` under `root`; `progress` is called after each job.
pub async fn run(kv: Arc<dyn KeyValue>, root: &str, config: C1mConfig, mut progress: impl FnMut(usize)) -> Result<C1mReport, String> {
    // Counts the keys and bytes that reach the store.
    let counting = Arc::new(TestKv::new(kv));
    let store = ClusterStore::new(counting.clone(), root);
    let total = config.jobs * config.tasks as usize + config.big_jobs * BIG_JOB_TASKS as usize;
    let per_node = (total / config.nodes.max(1)) as u64 + 1;
    let nodes: Vec<Node> = (0..config.nodes).map(|i| node(i, per_node)).collect();
    let _membership = store.join_all(&nodes, Duration::from_secs(60)).await.map_err(|e| format!("joining nodes: {e}"))?;
    // The controller's copy of the cluster, kept by a watch: plans read it, not the store.
    let cache = ClusterCache::start(&store).await.map_err(|e| format!("starting the cluster cache: {e}"))?;

    // Agents' watches on sampled nodes: when each allocation key was first seen.
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let step = (config.nodes / config.sample_nodes.max(1)).max(1);
    let mut watchers = Vec::new();
    for n in nodes.iter().step_by(step).take(config.sample_nodes) {
        let prefix = format!("{root}/allocs/{}/", n.id);
        let mut events = counting.watch(&prefix, None).await.map_err(|e| format!("watching {prefix}: {e}"))?;
        let seen = seen.clone();
        watchers.push(tokio::spawn(async move {
            while let Some(Ok(ev)) = events.next().await {
                if ev.kind == KvEventKind::Put {
                    let id = ev.key.rsplit('/').next().unwrap_or_default().to_owned();
                    seen.lock().unwrap_or_else(|p| p.into_inner()).entry(id).or_insert_with(Instant::now);
                }
            }
        }));
    }

    let (writes0, bytes0) = counting.writes();
    let mut report = C1mReport::default();
    let mut committed: HashMap<String, (Instant, Instant)> = HashMap::new();
    let began = Instant::now();
    let sizes = std::iter::repeat_n(config.tasks, config.jobs).chain(std::iter::repeat_n(BIG_JOB_TASKS, config.big_jobs));
    for (j, tasks) in sizes.enumerate() {
        let desired = DesiredGroup {
            job: format!("job{j:05}"),
            group: "g".into(),
            version: 1,
            count: tasks,
            resources: Resources::new(100, 64),
            ..DesiredGroup::default()
        };
        let t = Instant::now();
        let pass = store.reschedule_with(&cache, std::slice::from_ref(&desired)).await.map_err(|e| format!("job {j}: {e}"))?;
        let done = Instant::now();
        if j < config.jobs {
            report.commit_latencies.push(done - t);
        } else {
            report.big_commit_latencies.push(done - t);
        }
        if pass.placed.len() != tasks as usize {
            return Err(format!("job {j}: placed {} of {tasks} tasks", pass.placed.len()));
        }
        report.allocations += pass.placed.len();
        for a in pass.placed {
            committed.insert(a.id, (t, done));
        }
        progress(j + 1);
    }
    report.elapsed = began.elapsed();
    let (writes, bytes) = counting.writes();
    report.writes_per_alloc = (writes - writes0) as f64 / report.allocations.max(1) as f64;
    report.bytes_per_alloc = (bytes - bytes0) as f64 / report.allocations.max(1) as f64;

    // Let the sampled watches catch up, then match what they saw with the commits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for w in watchers {
        w.abort();
    }
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for (id, at) in &seen {
        if let Some((submitted, returned)) = committed.get(id) {
            report.seen_before_return += usize::from(at < returned);
            report.watch_delays.push(at.saturating_duration_since(*submitted));
        }
    }
    report.commit_latencies.sort();
    report.big_commit_latencies.sort();
    report.watch_delays.sort();
    let check = store.check_stored().await.map_err(|e| format!("validating: {e}"))?;
    report.violations = check.violations;
    if check.allocations != report.allocations {
        report.violations.push(format!("{} allocations stored, {} committed", check.allocations, report.allocations));
    }
    Ok(report)
}
