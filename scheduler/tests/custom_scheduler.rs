//! Orchestration takes its scheduler as `Arc<dyn Scheduler>`: a team's own placement
//! plugs into the cluster store, and deployments, reschedules (from the store and from a
//! watch-fed cache) and one-off runs all place through it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::MemoryKv;
use keelson_scheduler::{
    ClusterCache, ClusterSnapshot, ClusterStore, DesiredGroup, Error, Job, Node, Placement, Plan, Resources, RunSpec, Scheduler,
    SchedulerCapabilities, ScoreBreakdown, TaskTemplate,
};

/// Places every task on the node whose id sorts last and has room: the opposite of what
/// the embedded engine's best fit does on the cluster below (it fills the smallest node).
#[derive(Debug, Default)]
struct LastNodeFirst {
    plans: AtomicUsize,
}

impl Scheduler for LastNodeFirst {
    fn name(&self) -> &'static str {
        "last-node-first"
    }

    fn capabilities(&self) -> SchedulerCapabilities {
        SchedulerCapabilities::default()
    }

    fn plan(&self, snapshot: &ClusterSnapshot, job: &Job) -> keelson_scheduler::Result<Plan> {
        self.plans.fetch_add(1, Ordering::Relaxed);
        let mut nodes: Vec<&Node> = snapshot.nodes.iter().collect();
        nodes.sort_by(|a, b| b.id.cmp(&a.id));
        let mut used: Vec<Resources> = nodes
            .iter()
            .map(|n| {
                snapshot.allocations.iter().filter(|a| a.node == n.id).fold(Resources::default(), |sum, a| {
                    Resources::new(sum.cpu_millis + a.resources.cpu_millis, sum.memory_mb + a.resources.memory_mb)
                })
            })
            .collect();
        let mut plan = Plan::default();
        for group in &job.groups {
            for index in 0..group.count {
                let r = group.resources;
                let Some(i) = (0..nodes.len()).find(|&i| {
                    used[i].cpu_millis + r.cpu_millis <= nodes[i].capacity.cpu_millis
                        && used[i].memory_mb + r.memory_mb <= nodes[i].capacity.memory_mb
                }) else {
                    continue;
                };
                used[i] = Resources::new(used[i].cpu_millis + r.cpu_millis, used[i].memory_mb + r.memory_mb);
                plan.placements.push(Placement {
                    group: group.name.clone(),
                    index,
                    node: nodes[i].id.clone(),
                    resources: r,
                    ports: Vec::new(),
                    volumes: Vec::new(),
                    score: ScoreBreakdown::default(),
                });
            }
        }
        Ok(plan)
    }
}

fn group(job: &str, count: u32) -> DesiredGroup {
    DesiredGroup { job: job.into(), group: "g".into(), version: 1, count, resources: Resources::new(500, 128), ..Default::default() }
}

async fn cluster(scheduler: Arc<LastNodeFirst>) -> (ClusterStore, keelson_scheduler::NodeMembership) {
    let store = ClusterStore::new(Arc::new(MemoryKv::new()), "custom").with_scheduler(scheduler);
    // Best fit would fill the small node n1 first; the custom scheduler starts at n3.
    let nodes = [
        Node::new("n1", Resources::new(1000, 512)),
        Node::new("n2", Resources::new(4000, 4096)),
        Node::new("n3", Resources::new(1000, 512)),
    ];
    let members = store.join_all(&nodes, Duration::from_secs(30)).await.expect("join");
    (store, members)
}

#[tokio::test]
async fn reschedules_place_through_the_plugged_in_scheduler() {
    let scheduler = Arc::new(LastNodeFirst::default());
    let (store, _members) = cluster(scheduler.clone()).await;
    assert_eq!(store.scheduler().name(), "last-node-first");
    let pass = store.reschedule(&[group("web", 3)]).await.expect("reschedule");
    let nodes: Vec<&str> = pass.placed.iter().map(|a| a.node.as_str()).collect();
    assert_eq!(nodes, ["n3", "n3", "n2"], "n3 takes two, then n2 (sorted last first, with room)");
    assert!(scheduler.plans.load(Ordering::Relaxed) >= 1);
    assert!(store.check_stored().await.expect("check").violations.is_empty());

    // From a watch-fed cache, the next group sees the first one's allocations.
    let cache = ClusterCache::start(&store).await.expect("cache");
    let pass = store.reschedule_with(&cache, &[group("web", 3), group("api", 2)]).await.expect("reschedule");
    let nodes: Vec<&str> = pass.placed.iter().map(|a| a.node.as_str()).collect();
    assert_eq!(nodes, ["n2", "n2"], "n3 is full; the api group goes to n2");
}

#[tokio::test]
async fn runs_place_through_the_plugged_in_scheduler() {
    let scheduler = Arc::new(LastNodeFirst::default());
    let (store, _members) = cluster(scheduler.clone()).await;
    let spec = RunSpec {
        id: "once".into(),
        job: "batch".into(),
        task: TaskTemplate { command: vec!["true".into()], ..Default::default() },
        resources: Resources::new(100, 32),
        time_limit: Duration::from_secs(5),
    };
    let record = store.submit_run(&spec).await.expect("submit");
    assert_eq!(record.node, "n3");
    assert_eq!(scheduler.plans.load(Ordering::Relaxed), 1);
}

/// A plan naming a node the cluster does not have is refused, not stored.
#[derive(Debug)]
struct Confused;

impl Scheduler for Confused {
    fn name(&self) -> &'static str {
        "confused"
    }

    fn capabilities(&self) -> SchedulerCapabilities {
        SchedulerCapabilities::default()
    }

    fn plan(&self, _: &ClusterSnapshot, job: &Job) -> keelson_scheduler::Result<Plan> {
        let mut plan = Plan::default();
        plan.placements.push(Placement {
            group: job.groups[0].name.clone(),
            index: 0,
            node: "nowhere".into(),
            resources: job.groups[0].resources,
            ports: Vec::new(),
            volumes: Vec::new(),
            score: ScoreBreakdown::default(),
        });
        Ok(plan)
    }
}

#[tokio::test]
async fn a_plan_for_an_unknown_node_is_an_error_and_nothing_is_stored() {
    let store = ClusterStore::new(Arc::new(MemoryKv::new()), "confused").with_scheduler(Arc::new(Confused));
    let _member = store.join(&Node::new("n1", Resources::new(1000, 512)), Duration::from_secs(30)).await.expect("join");
    let err = store.reschedule(&[group("web", 1)]).await.expect_err("unknown node");
    assert!(matches!(&err, Error::InvalidInput { value, .. } if value == "nowhere"), "{err:?}");
    assert!(store.view().await.expect("view").allocations.is_empty());
}
