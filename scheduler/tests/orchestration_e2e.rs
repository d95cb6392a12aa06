//! End to end on real Docker: a 3-replica job of the busybox httpd test image placed by
//! the placement engine into cluster state, run by a node agent through the Docker
//! driver, registered in discovery with its route tag, and served through the keelson
//! router; then the agent restarts and adopts the running containers without
//! duplicating any. Every container is removed at the end, also when the test fails.
#![cfg(feature = "docker")]

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_discovery::{Discovery, KeyValue, MemoryDiscovery, MemoryKv};
use keelson_routing::{MemoryRouter, Proxy, ProxyConfig};
use keelson_scheduler::{
    AllocStatus, ClusterStore, DesiredGroup, DockerDriver, GroupSpec, Node, NodeAgent, Resources, ServiceSpec, TaskTemplate, NODE_LABEL,
};

/// Removes every container started for `node` when dropped.
struct Cleanup(String);

impl Cleanup {
    fn containers(&self) -> Vec<String> {
        let out =
            Command::new("docker").args(["ps", "-aq", "--filter", &format!("label={NODE_LABEL}={}", self.0)]).output().expect("docker ps");
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = self.containers();
        if !ids.is_empty() {
            let _ = Command::new("docker").args(["rm", "-f"]).args(&ids).output();
        }
    }
}

fn web(image: &str, version: u64) -> GroupSpec {
    let script = format!("mkdir -p /www && echo v{version} > /www/index.html && exec httpd -f -p 8080 -h /www");
    GroupSpec {
        desired: DesiredGroup { job: "web".into(), group: "http".into(), version, count: 3, resources: Resources::new(100, 64), ports: 1 },
        task: TaskTemplate {
            image: Some(image.to_owned()),
            command: vec!["/bin/sh".into(), "-c".into(), script],
            ..TaskTemplate::default()
        },
        service: Some(ServiceSpec {
            name: "web".into(),
            port: 8080,
            tags: vec!["keelson.http.host=web.test".into()],
            http_check: Some("/index.html".into()),
        }),
    }
}

async fn sync_until_running(agent: &NodeAgent, store: &ClusterStore, node: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        agent.sync().await.expect("agent sync");
        let allocs = store.allocations_on(node).await.expect("allocations");
        if allocs.iter().filter(|a| a.status == AllocStatus::Running).count() == n {
            return;
        }
        assert!(Instant::now() < deadline, "not all running: {allocs:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_on_docker_serves_through_the_router_and_survives_an_agent_restart() {
    let image = keelson_testkit::docker::busybox_image().unwrap_or_else(|e| panic!("the busybox test image: {e}"));
    let node = format!("e2e-{}", std::process::id());
    let guard = Cleanup(node.clone());
    let kv: Arc<dyn KeyValue> = Arc::new(MemoryKv::new());
    let store = ClusterStore::new(kv, "e2e");
    let _membership = store.join(&Node::new(node.clone(), Resources::new(4000, 4096)), Duration::from_secs(5)).await.expect("join");
    let spec = web(&image, 1);
    store.put_group(&spec).await.expect("group");
    let placed = store.reschedule(std::slice::from_ref(&spec.desired)).await.expect("place");
    assert_eq!(placed.placed.len(), 3);
    assert!(placed.placed.iter().all(|a| a.ports.len() == 1), "each gets a host port: {:?}", placed.placed);

    let discovery: Arc<dyn Discovery> = Arc::new(MemoryDiscovery::memory());
    let driver = Arc::new(DockerDriver::connect().await.unwrap_or_else(|e| panic!("Docker Engine must run: {e}")));
    let agent = NodeAgent::new(node.clone(), store.clone(), driver.clone(), Some(discovery.clone()), "127.0.0.1")
        .with_stop_grace(Duration::from_secs(1));
    sync_until_running(&agent, &store, &node, 3).await;

    // The router follows discovery: the three allocations serve web.test.
    let router = Arc::new(MemoryRouter::new());
    keelson_routing::follow_discovery(discovery.clone(), router.clone()).await.expect("follow discovery");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(Arc::new(Proxy::new(router, ProxyConfig::default())).serve(listener, std::future::pending()));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match keelson_testkit::http::get(addr, "web.test", "/").await {
            Ok(r) if r.status == 200 => break,
            other => assert!(Instant::now() < deadline, "web.test not served: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..30 {
        let r = keelson_testkit::http::get(addr, "web.test", "/").await.expect("request");
        assert_eq!((r.status, r.body.as_str()), (200, "v1\n"));
    }

    // The agent restarts: the new one adopts the three containers, starts none.
    drop(agent);
    let before: BTreeSet<String> = guard.containers().into_iter().collect();
    let agent = NodeAgent::new(node.clone(), store.clone(), driver, Some(discovery), "127.0.0.1").with_stop_grace(Duration::from_secs(1));
    let report = agent.sync().await.expect("sync after restart");
    assert!(report.started.is_empty() && report.stopped.is_empty(), "adopted, not restarted: {report:?}");
    let after: BTreeSet<String> = guard.containers().into_iter().collect();
    assert_eq!(before, after, "none duplicated, none orphaned");
    assert_eq!(after.len(), 3);
    for _ in 0..10 {
        let r = keelson_testkit::http::get(addr, "web.test", "/").await.expect("request");
        assert_eq!(r.status, 200);
    }

    // Scaled to zero: the agent stops and removes them, and the records go.
    let view = store.view().await.expect("view");
    let mut plan = view.plan();
    for a in &view.allocations {
        plan.put(keelson_scheduler::AllocRecord { status: AllocStatus::Stopping, ..a.clone() });
    }
    store.commit(&plan).await.expect("stop all");
    agent.sync().await.expect("sync stops");
    agent.sync().await.expect("sync forgets");
    assert!(guard.containers().is_empty(), "containers removed");
    assert!(store.allocations_on(&node).await.expect("allocations").is_empty(), "records forgotten");
}
