//! The controller on the embedded store with two nodes running process tasks: the first
//! version runs at once, a rolling update succeeds, a failing version rolls back by
//! itself, a canary waits for its promotion, a second deployment during one is refused,
//! a failed allocation is replaced, and a lost node's work moves within TTL + 2 s. Two
//! controllers run side by side; the lock lets one act at a time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_discovery::MemoryKv;
use keelson_scheduler::{
    AllocStatus, ClusterStore, Controller, DesiredGroup, Driver, Error, Gates, GroupSpec, Node, NodeAgent, OrchestrationMetrics, Phase,
    ProcessDriver, Resources, Strategy, TaskTemplate,
};

fn spec(version: u64, script: &str) -> GroupSpec {
    GroupSpec {
        desired: DesiredGroup {
            job: "app".into(),
            group: "w".into(),
            version,
            count: 3,
            resources: Resources::new(100, 16),
            ..DesiredGroup::default()
        },
        task: TaskTemplate {
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: BTreeMap::from([("VERSION".to_owned(), version.to_string())]),
            ..TaskTemplate::default()
        },
        service: None,
        release: None,
    }
}

const SERVE: &str = "while true; do sleep 0.1; done";

fn gates() -> Gates {
    {
        let mut built = Gates::default();
        built.min_healthy_time = Duration::from_millis(300);
        built.healthy_deadline = Duration::from_secs(3);
        built.progress_deadline = Duration::from_secs(20);
        built.auto_rollback = true;
        built
    }
}

struct Cluster {
    store: ClusterStore,
    controllers: [Controller; 2],
    agents: Vec<NodeAgent>,
    drivers: Vec<Arc<ProcessDriver>>,
}

impl Cluster {
    /// One round: both controllers, then every agent.
    async fn round(&self) {
        let (a, b) = tokio::join!(self.controllers[0].tick(), self.controllers[1].tick());
        let (a, b) = (a.expect("controller 0"), b.expect("controller 1"));
        assert!(a.acted || b.acted, "one of them holds the lock");
        for agent in &self.agents {
            agent.sync().await.expect("agent");
        }
    }

    async fn until(&self, what: &str, limit: Duration, mut done: impl FnMut(&[keelson_scheduler::AllocRecord]) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            self.round().await;
            let allocs = self.store.view().await.expect("view").allocations;
            if done(&allocs) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {allocs:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn settled(&self, what: &str) -> keelson_scheduler::GroupState {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.round().await;
            let state = self.store.group_state("app", "w").await.expect("state").expect("group");
            if state.deployment.is_none() {
                return state;
            }
            assert!(Instant::now() < deadline, "{what}: still {:?}", state.deployment.map(|d| d.phase().clone()));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn running(allocs: &[keelson_scheduler::AllocRecord], version: u64) -> usize {
    allocs.iter().filter(|a| a.status == AllocStatus::Running && a.version == version).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_runs_deploys_rolls_back_promotes_and_replaces_lost_work() {
    let store = ClusterStore::new(Arc::new(MemoryKv::new()), "ctl");
    // Small n1 and n2 fill first (best fit), so n2 is sure to hold work when it dies.
    let _n1 = store.join(&Node::new("n1", Resources::new(250, 1024)), Duration::from_secs(30)).await.expect("join");
    let n2 = store.join(&Node::new("n2", Resources::new(250, 1024)), Duration::from_secs(2)).await.expect("join");
    let _n3 = store.join(&Node::new("n3", Resources::new(2000, 1024)), Duration::from_secs(30)).await.expect("join");
    let drivers = vec![Arc::new(ProcessDriver::new()), Arc::new(ProcessDriver::new()), Arc::new(ProcessDriver::new())];
    let metrics = OrchestrationMetrics::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let agents = ["n1", "n2", "n3"]
        .iter()
        .zip(&drivers)
        .map(|(n, d)| NodeAgent::new(*n, store.clone(), d.clone(), None, "127.0.0.1").with_metrics(metrics.clone()))
        .collect();
    let controller = || Controller::new(store.clone()).with_metrics(metrics.clone());
    let c = Cluster { store: store.clone(), controllers: [controller(), controller()], agents, drivers };
    let rolling = Strategy::Rolling { max_surge: 1, max_unavailable: 0 };

    // The first version runs at once.
    let first = store.deploy(&spec(1, SERVE), rolling.clone(), gates()).await.expect("v1");
    assert!(first.deployment.is_none() && first.stable == 1);
    c.until("v1 running", Duration::from_secs(20), |a| running(a, 1) == 3).await;

    // A rolling update succeeds.
    store.deploy(&spec(2, SERVE), rolling.clone(), gates()).await.expect("v2");
    let state = c.settled("rolling to v2").await;
    assert_eq!((state.stable, state.last_outcome), (2, Some(Phase::Succeeded)));
    c.until("v2 everywhere", Duration::from_secs(20), |a| running(a, 2) == 3 && a.iter().all(|x| x.version == 2)).await;

    // A version that exits at once fails its gate and rolls back by itself.
    store.deploy(&spec(3, "exit 1"), rolling.clone(), gates()).await.expect("v3");
    let state = c.settled("v3 rolling back").await;
    assert_eq!(state.stable, 2);
    assert!(matches!(state.last_outcome, Some(Phase::RolledBack { .. })), "{:?}", state.last_outcome);
    c.until("v2 still everywhere", Duration::from_secs(20), |a| running(a, 2) == 3 && a.iter().all(|x| x.version == 2)).await;

    // A canary waits for a person; meanwhile another deployment is refused.
    let canary = Strategy::Canary { canaries: 1, auto_promote: false, max_surge: 1, max_unavailable: 0 };
    store.deploy(&spec(4, SERVE), canary, gates()).await.expect("v4");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        c.round().await;
        let state = store.group_state("app", "w").await.expect("state").expect("group");
        if state.deployment.as_ref().is_some_and(|d| d.phase() == &Phase::AwaitingPromotion) {
            break;
        }
        assert!(Instant::now() < deadline, "canary never healthy: {state:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(store.deploy(&spec(5, SERVE), rolling.clone(), gates()).await, Err(Error::Conflict { .. })));
    store.promote("app", "w").await.expect("promote");
    let state = c.settled("v4 after promotion").await;
    assert_eq!((state.stable, state.last_outcome), (4, Some(Phase::Succeeded)));
    assert!(matches!(store.promote("app", "w").await, Err(Error::NotFound { .. })), "nothing to promote now");

    // A failed allocation (its process killed outside keelson) is replaced.
    c.until("v4 everywhere", Duration::from_secs(20), |a| running(a, 4) == 3 && a.iter().all(|x| x.version == 4)).await;
    let victim = store.view().await.expect("view").allocations.into_iter().next().expect("an allocation");
    let node_index = ["n1", "n2", "n3"].iter().position(|n| *n == victim.node).expect("known node");
    c.drivers[node_index].stop(&victim.id, Duration::from_secs(1)).await.expect("kill it");
    c.until("replaced", Duration::from_secs(20), |a| running(a, 4) == 3 && !a.iter().any(|x| x.id == victim.id)).await;

    // n2 dies (its lease lapses, its agent is gone): its work is re-placed within TTL + 2 s.
    let on_n2 = store.allocations_on("n2").await.expect("n2").len();
    let killed = Instant::now();
    drop(n2);
    let mut agents = c.agents;
    drop(agents.remove(1));
    let c = Cluster { agents, ..c };
    c.until("n2's work re-placed", Duration::from_secs(4), |a| !a.iter().any(|x| x.node == "n2") && a.len() >= 3).await;
    assert!(killed.elapsed() <= Duration::from_secs(4), "took {:?}", killed.elapsed());
    assert!(on_n2 > 0, "the scenario needs work on n2");
    c.until("running again", Duration::from_secs(20), |a| running(a, 4) == 3).await;

    // What happened shows in the metrics.
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    let value = |line_start: &str| -> f64 {
        text.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0.0)
    };
    assert_eq!(value("keelson_controller_deployments_ended_total{outcome=\"Succeeded\"}"), 2.0, "{text}");
    assert_eq!(value("keelson_controller_deployments_ended_total{outcome=\"RolledBack\"}"), 1.0, "{text}");
    assert!(value("keelson_controller_lost_allocations_total") >= on_n2 as f64, "{text}");
    assert!(value("keelson_agent_tasks_started_total") >= 12.0, "{text}");
    assert!(value("keelson_agent_status_reports_total{status=\"Failed\"}") >= 1.0, "{text}");
}

/// An agent running with a long interval starts a newly placed allocation at once: it
/// watches its own node's allocation keys and syncs when a plan changes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_starts_new_work_when_its_watch_sees_the_plan_not_at_its_next_tick() {
    let store = ClusterStore::new(Arc::new(MemoryKv::new()), "woken");
    let _n1 = store.join(&Node::new("n1", Resources::new(1_000, 1_024)), Duration::from_secs(30)).await.expect("join");
    let driver = Arc::new(ProcessDriver::new());
    let agent = Arc::new(NodeAgent::new("n1", store.clone(), driver.clone(), None, "127.0.0.1"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(agent.clone().run(Duration::from_secs(3600), async move {
        let _ = stopped.await;
    }));
    // Past the agent's first (immediate) tick: from here on only its watch can wake it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    store.put_group(&spec(1, SERVE)).await.expect("group");
    let submitted = Instant::now();
    let pass = store.reschedule(&[DesiredGroup { count: 1, ..spec(1, SERVE).desired }]).await.expect("place");
    assert_eq!(pass.placed.len(), 1);
    loop {
        let tasks = driver.list().await.expect("list");
        if tasks.iter().any(|t| t.id == pass.placed[0].id) {
            break;
        }
        assert!(submitted.elapsed() < Duration::from_secs(5), "the agent did not start the allocation within 5 s of the plan");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    running.await.expect("agent loop");
    for t in driver.list().await.expect("list") {
        let _ = driver.stop(&t.id, Duration::from_secs(1)).await;
    }
}

/// A node agent whose cluster store is unreachable says so in its metrics
/// (`keelson_agent_store_unreachable 1`) and clears it once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reports_an_unreachable_store_in_its_metrics_until_it_returns() {
    let mut etcd = keelson_testkit::etcd::Etcd::start().unwrap_or_else(|e| panic!("etcd for this test: {e}"));
    let config = {
        let mut built = keelson_discovery::EtcdConfig::new([etcd.client_url()]);
        built.request_timeout = Duration::from_secs(1);
        built
    };
    let kv = keelson_discovery::EtcdKv::connect(config).await.expect("connect");
    let store = ClusterStore::new(Arc::new(kv), "outage");
    let metrics = OrchestrationMetrics::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let agent = NodeAgent::new("n1", store, Arc::new(ProcessDriver::new()), None, "127.0.0.1").with_metrics(metrics);
    let text = |registry: &prometheus_client::registry::Registry| {
        let mut t = String::new();
        prometheus_client::encoding::text::encode(&mut t, registry).expect("encode");
        t
    };
    agent.sync().await.expect("sync with etcd up");
    assert!(text(&registry).contains("keelson_agent_store_unreachable 0"));

    etcd.stop();
    let err = agent.sync().await.expect_err("etcd is down");
    assert!(err.is_retryable(), "an outage is retryable: {err}");
    assert!(text(&registry).contains("keelson_agent_store_unreachable 1"), "{}", text(&registry));

    etcd.start_again().expect("etcd again");
    let deadline = Instant::now() + Duration::from_secs(15);
    while agent.sync().await.is_err() {
        assert!(Instant::now() < deadline, "the agent did not reach etcd again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(text(&registry).contains("keelson_agent_store_unreachable 0"));
}
