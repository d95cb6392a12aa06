//! End to end on real Docker: a 3-replica job of the busybox httpd test image placed by
//! the placement engine into cluster state, run by a node agent through the Docker
//! driver, registered in discovery with its route tag, and served through the keelson
//! router; then the agent restarts and adopts the running containers without
//! duplicating any. Rolling, canary and blue/green deployments under load, and a stateful
//! service on a single-writer volume updated stop-first and moved to another node with
//! its data. Every container and volume is removed at the end, also when a test fails.
#![cfg(feature = "docker")]

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_discovery::{Discovery, KeyValue, MemoryDiscovery, MemoryKv};
use keelson_routing::{MemoryRouter, Proxy, ProxyConfig};
use keelson_scheduler::{
    fetch_volume_with_token, serve_volumes, wall_clock_ms, AllocRecord, AllocStatus, ClusterStore, Deployment, DesiredGroup, DockerDriver,
    Gates, GroupSpec, HostVolume, LocalVolumes, Node, NodeAgent, Phase, PortRange, Resources, ServiceSpec, Strategy, TaskTemplate,
    VolumeAccess, VolumeManager, VolumeRequest, NODE_LABEL,
};

/// Removes every container started for `node` when dropped.
struct Cleanup(String);

impl Cleanup {
    fn containers(&self) -> Vec<String> {
        keelson_testkit::docker::containers(&[&format!("label={NODE_LABEL}={}", self.0)])
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        keelson_testkit::docker::remove_containers(&[&format!("label={NODE_LABEL}={}", self.0)]);
    }
}

fn web(image: &str, version: u64) -> GroupSpec {
    let script = format!("mkdir -p /www && echo v{version} > /www/index.html && exec httpd -f -p 8080 -h /www");
    GroupSpec {
        desired: DesiredGroup {
            job: "web".into(),
            group: "http".into(),
            version,
            count: 3,
            resources: Resources::new(100, 64),
            ports: 1,
            volumes: Vec::new(),
            ..DesiredGroup::default()
        },
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
        release: None,
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

/// A one-node platform: cluster state in memory, a node agent on Docker, discovery and
/// the router serving `web.test`, with group `web` version 1 running and served.
struct Platform {
    guard: Cleanup,
    node: String,
    store: ClusterStore,
    agent: NodeAgent,
    driver: Arc<DockerDriver>,
    discovery: Arc<dyn Discovery>,
    image: String,
    addr: std::net::SocketAddr,
    _membership: keelson_scheduler::NodeMembership,
}

/// `ports`: the node's first dynamic host port; each test gets its own range (below the
/// kernel's ephemeral range), since tests run at once on one Docker host.
async fn platform(name: &str, ports: u16) -> Platform {
    let image = keelson_testkit::docker::busybox_image().unwrap_or_else(|e| panic!("the busybox test image: {e}"));
    let node = format!("{name}-{}", std::process::id());
    let guard = Cleanup(node.clone());
    let kv: Arc<dyn KeyValue> = Arc::new(MemoryKv::new());
    let store = ClusterStore::new(kv, "e2e");
    let node_spec =
        Node { dynamic_ports: PortRange { start: ports, end: ports + 100 }, ..Node::new(node.clone(), Resources::new(4000, 4096)) };
    let membership = store.join(&node_spec, Duration::from_secs(5)).await.expect("join");
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
    Platform { guard, node, store, agent, driver, discovery, image, addr, _membership: membership }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_on_docker_serves_through_the_router_and_survives_an_agent_restart() {
    let Platform { guard, node, store, agent, driver, discovery, addr, _membership, .. } = platform("e2e", 21_000).await;
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
        plan.put(AllocRecord { status: AllocStatus::Stopping, ..a.clone() });
    }
    store.commit(&plan).await.expect("stop all");
    agent.sync().await.expect("sync stops");
    agent.sync().await.expect("sync forgets");
    assert!(guard.containers().is_empty(), "containers removed");
    assert!(store.allocations_on(&node).await.expect("allocations").is_empty(), "records forgotten");
}

/// A client sending GETs through the router until stopped: (failures, bodies seen).
fn client(
    addr: std::net::SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<String>, BTreeSet<String>)> {
    tokio::spawn(async move {
        let (mut failures, mut bodies) = (Vec::new(), BTreeSet::new());
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match keelson_testkit::http::get(addr, "web.test", "/").await {
                Ok(r) if r.status == 200 => {
                    bodies.insert(r.body);
                }
                other => failures.push(format!("{other:?}")),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (failures, bodies)
    })
}

/// Lets the agent finish stopping what a rollback stopped, then checks only `version`
/// is left.
async fn only_version_left(p: &Platform, version: u64) {
    for _ in 0..3 {
        p.agent.sync().await.expect("sync");
    }
    let versions: BTreeSet<u64> = p.store.allocations_on(&p.node).await.expect("allocs").iter().map(|a| a.version).collect();
    assert_eq!(versions, BTreeSet::from([version]));
}

/// Stops the client and asserts it saw no failure; returns the bodies it saw.
async fn no_failed_requests(
    stop: Arc<std::sync::atomic::AtomicBool>,
    load: tokio::task::JoinHandle<(Vec<String>, BTreeSet<String>)>,
) -> BTreeSet<String> {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (failures, bodies) = load.await.expect("client");
    assert!(failures.is_empty(), "{} failed requests, first: {:?} last {:?}", failures.len(), failures.first(), failures.last());
    bodies
}

/// Steps the deployment and the agent until the deployment is over.
async fn deploy(p: &Platform, deployment: &mut Deployment) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !deployment.phase().is_terminal() {
        assert!(Instant::now() < deadline, "deployment stuck at {:?}", deployment.phase());
        p.store.advance(deployment, "web", "http", wall_clock_ms()).await.expect("advance");
        p.agent.sync().await.expect("agent sync");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn gates() -> Gates {
    {
        let mut built = Gates::default();
        built.min_healthy_time = Duration::from_secs(1);
        built.healthy_deadline = Duration::from_secs(8);
        built.progress_deadline = Duration::from_secs(30);
        built.auto_rollback = true;
        built
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_and_automatic_rollback_serve_every_request() {
    let p = platform("rolling", 22_000).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = client(p.addr, stop.clone());

    // Version 2, one extra at a time, never below three healthy.
    p.store.put_group(&web(&p.image, 2)).await.expect("v2");
    let strategy = Strategy::Rolling { max_surge: 1, max_unavailable: 0 };
    let mut to_v2 = Deployment::new(Some(1), 2, 3, strategy.clone(), gates(), false, wall_clock_ms()).expect("deployment");
    deploy(&p, &mut to_v2).await;
    assert_eq!(to_v2.phase(), &Phase::Succeeded);
    let versions: BTreeSet<u64> = p.store.allocations_on(&p.node).await.expect("allocs").iter().map(|a| a.version).collect();
    assert_eq!(versions, BTreeSet::from([2]));

    // Version 3 never passes its health check (no index.html): stopped at the gate and
    // rolled back to 2, which keeps serving.
    let mut broken = web(&p.image, 3);
    broken.task.command = vec!["/bin/sh".into(), "-c".into(), "mkdir -p /www && exec httpd -f -p 8080 -h /www".into()];
    p.store.put_group(&broken).await.expect("v3");
    let mut to_v3 = Deployment::new(Some(2), 3, 3, strategy, gates(), false, wall_clock_ms()).expect("deployment");
    deploy(&p, &mut to_v3).await;
    assert!(matches!(to_v3.phase(), Phase::RolledBack { .. }), "{:?}", to_v3.phase());
    only_version_left(&p, 2).await;
    let bodies = no_failed_requests(stop, load).await;
    assert_eq!(bodies, BTreeSet::from(["v1\n".to_owned(), "v2\n".to_owned()]), "v3 never served");
    drop(p.guard);
}

/// Requests until `want` is the only body seen in 20 in a row (routing has caught up).
async fn served_only(addr: std::net::SocketAddr, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut streak = 0;
    while streak < 20 {
        let r = keelson_testkit::http::get(addr, "web.test", "/").await.expect("request");
        streak = if r.status == 200 && r.body == want { streak + 1 } else { 0 };
        assert!(Instant::now() < deadline, "{want:?} not the only answer; last {:?}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_with_manual_promotion_then_blue_green_switch_and_rollback_in_the_window() {
    let p = platform("bluegreen", 23_000).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = client(p.addr, stop.clone());

    // Canary: one v2 beside three v1, then a person promotes.
    p.store.put_group(&web(&p.image, 2)).await.expect("v2");
    let canary = Strategy::Canary { canaries: 1, auto_promote: false, max_surge: 1, max_unavailable: 0 };
    let mut to_v2 = Deployment::new(Some(1), 2, 3, canary, gates(), false, wall_clock_ms()).expect("deployment");
    let deadline = Instant::now() + Duration::from_secs(60);
    while to_v2.phase() != &Phase::AwaitingPromotion {
        assert!(Instant::now() < deadline, "canary stuck at {:?}", to_v2.phase());
        p.store.advance(&mut to_v2, "web", "http", wall_clock_ms()).await.expect("advance");
        p.agent.sync().await.expect("sync");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let allocs = p.store.allocations_on(&p.node).await.expect("allocs");
    assert_eq!(allocs.iter().filter(|a| a.version == 2).count(), 1, "one canary");
    assert_eq!(allocs.iter().filter(|a| a.version == 1 && a.status == AllocStatus::Running).count(), 3, "the old set whole");
    to_v2.promote().expect("promote");
    deploy(&p, &mut to_v2).await;
    assert_eq!(to_v2.phase(), &Phase::Succeeded);
    served_only(p.addr, "v2\n").await;

    // Blue/green to v3: green starts unseen, traffic switches when all of it is healthy,
    // then a rollback inside the window sends traffic back to blue at once.
    p.store.put_group(&web(&p.image, 3)).await.expect("v3");
    let blue_green = Strategy::BlueGreen { rollback_window: Duration::from_secs(300) };
    let mut to_v3 = Deployment::new(Some(2), 3, 3, blue_green, gates(), false, wall_clock_ms()).expect("deployment");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(to_v3.phase(), Phase::Verifying { .. }) {
        assert!(Instant::now() < deadline, "blue/green stuck at {:?}", to_v3.phase());
        p.store.advance(&mut to_v3, "web", "http", wall_clock_ms()).await.expect("advance");
        p.agent.sync().await.expect("sync");
        let r = keelson_testkit::http::get(p.addr, "web.test", "/").await.expect("request");
        if !matches!(to_v3.phase(), Phase::Verifying { .. }) {
            assert_eq!(r.body, "v2\n", "green serves nothing before the switch");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p.agent.sync().await.expect("sync registers green");
    served_only(p.addr, "v3\n").await;
    to_v3.rollback("errors after the switch").expect("rollback");
    p.store.advance(&mut to_v3, "web", "http", wall_clock_ms()).await.expect("advance");
    p.agent.sync().await.expect("sync");
    served_only(p.addr, "v2\n").await;
    deploy(&p, &mut to_v3).await;
    assert!(matches!(to_v3.phase(), Phase::RolledBack { .. }), "{:?}", to_v3.phase());
    only_version_left(&p, 2).await;
    no_failed_requests(stop, load).await;
    drop(p.guard);
}

/// A stateful group: one allocation serving its single-writer volume over HTTP. The first
/// version to run writes `/data/first`; every version writes `/data/current`.
fn stateful(image: &str, volume: &str, version: u64) -> GroupSpec {
    let script =
        format!("[ -f /data/first ] || echo v{version} > /data/first; echo v{version} > /data/current; exec httpd -f -p 8080 -h /data");
    GroupSpec {
        desired: DesiredGroup {
            job: "kv".into(),
            group: "store".into(),
            version,
            count: 1,
            resources: Resources::new(100, 64),
            ports: 1,
            volumes: vec![VolumeRequest { name: volume.into(), access: VolumeAccess::SingleWriter, read_only: false, per_task: false }],
            ..DesiredGroup::default()
        },
        task: TaskTemplate {
            image: Some(image.to_owned()),
            command: vec!["/bin/sh".into(), "-c".into(), script],
            mounts: std::collections::BTreeMap::from([(volume.to_owned(), std::path::PathBuf::from("/data"))]),
            ..TaskTemplate::default()
        },
        service: Some(ServiceSpec { name: "kv".into(), port: 8080, tags: Vec::new(), http_check: Some("/current".into()) }),
        release: None,
    }
}

/// GET `path` from the group's one running allocation, straight at its host port.
async fn read_stateful(store: &ClusterStore, node: &str, path: &str) -> String {
    let allocs = store.allocations_on(node).await.expect("allocations");
    let running: Vec<_> = allocs.iter().filter(|a| a.status == AllocStatus::Running).collect();
    assert_eq!(running.len(), 1, "{allocs:?}");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], running[0].ports[0]));
    keelson_testkit::http::get(addr, "kv", path).await.expect("request").body
}

/// Removes a Docker volume when dropped.
struct VolumeCleanup(String);

impl Drop for VolumeCleanup {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["volume", "rm", "-f", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_service_keeps_its_volume_through_a_stop_first_update_and_moves_with_it() {
    let image = keelson_testkit::docker::busybox_image().unwrap_or_else(|e| panic!("the busybox test image: {e}"));
    let pid = std::process::id();
    let (node_a, node_b) = (format!("stateful-a-{pid}"), format!("stateful-b-{pid}"));
    let (guard_a, guard_b) = (Cleanup(node_a.clone()), Cleanup(node_b.clone()));
    let volume = format!("kvdata-{pid}");
    let _volume_guard = VolumeCleanup(volume.clone());
    let store = ClusterStore::new(Arc::new(MemoryKv::new()), "stateful");
    let node = |id: &str, ports: u16| Node {
        dynamic_ports: PortRange { start: ports, end: ports + 100 },
        ..Node::new(id, Resources::new(4000, 4096))
    };
    // Only node A is in the cluster at first, so the volume is created there.
    let member_a = store.join(&node(&node_a, 24_000), Duration::from_secs(30)).await.expect("join a");
    let driver = Arc::new(DockerDriver::connect().await.unwrap_or_else(|e| panic!("Docker Engine must run: {e}")));
    let docker_volumes = Arc::new(driver.volumes());
    let agent_a = NodeAgent::new(node_a.clone(), store.clone(), driver.clone(), None, "127.0.0.1")
        .with_stop_grace(Duration::from_secs(1))
        .with_volumes(docker_volumes.clone());
    let v1 = stateful(&image, &volume, 1);
    store.put_group(&v1).await.expect("group");
    store.reschedule(std::slice::from_ref(&v1.desired)).await.expect("place");
    sync_until_running(&agent_a, &store, &node_a, 1).await;
    assert_eq!(store.volume_home(&volume).await.expect("home").expect("recorded").node, node_a);
    assert_eq!(read_stateful(&store, &node_a, "/first").await, "v1\n");

    // v2 asks for a surge; the single-writer volume makes it stop-first: never two writers.
    let v2 = stateful(&image, &volume, 2);
    store.put_group(&v2).await.expect("v2");
    assert!(v2.desired.single_writer());
    let surge = Strategy::Rolling { max_surge: 1, max_unavailable: 0 };
    let mut update = Deployment::new(Some(1), 2, 1, surge, gates(), v2.desired.single_writer(), wall_clock_ms()).expect("deployment");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !update.phase().is_terminal() {
        assert!(Instant::now() < deadline, "stuck at {:?}", update.phase());
        store.advance(&mut update, "kv", "store", wall_clock_ms()).await.expect("advance");
        agent_a.sync().await.expect("sync");
        let running = guard_a.containers().len();
        assert!(running <= 1, "{running} containers share a single-writer volume");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(update.phase(), &Phase::Succeeded);
    sync_until_running(&agent_a, &store, &node_a, 1).await;
    assert_eq!(read_stateful(&store, &node_a, "/first").await, "v1\n", "the data outlived the update");
    assert_eq!(read_stateful(&store, &node_a, "/current").await, "v2\n");

    // Move it to node B: stop it, pull the volume over HTTP into B's volume root, re-home
    // it, and the next placement puts the service on B with its data.
    let root_b = tempfile::tempdir().expect("node b volume root");
    let volumes_b = Arc::new(LocalVolumes::new(root_b.path()).expect("root"));
    let member_b = store.join(&node(&node_b, 25_000), Duration::from_secs(30)).await.expect("join b");
    let agent_b = NodeAgent::new(node_b.clone(), store.clone(), driver.clone(), None, "127.0.0.1")
        .with_stop_grace(Duration::from_secs(1))
        .with_volumes(volumes_b.clone());
    let view = store.view().await.expect("view");
    let mut stop = view.plan();
    for a in &view.allocations {
        stop.put(AllocRecord { status: AllocStatus::Stopping, ..a.clone() });
    }
    store.commit(&stop).await.expect("stop");
    agent_a.sync().await.expect("sync stops");
    assert!(store.allocations_on(&node_a).await.expect("allocs").is_empty());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let source = listener.local_addr().expect("addr");
    let served: Arc<dyn VolumeManager> = docker_volumes.clone();
    let server = tokio::spawn(serve_volumes(listener, served, "e2e-token", std::future::pending()));
    fetch_volume_with_token(source, &volume, volumes_b.as_ref(), Some("e2e-token")).await.expect("pull the volume to B");
    server.abort();
    store
        .rehome_volume(&HostVolume { name: volume.clone(), node: node_b.clone(), access: VolumeAccess::SingleWriter })
        .await
        .expect("rehome");
    let placed = store.reschedule(std::slice::from_ref(&v2.desired)).await.expect("place on b");
    assert_eq!(placed.placed.iter().map(|a| a.node.as_str()).collect::<Vec<_>>(), [node_b.as_str()]);
    sync_until_running(&agent_b, &store, &node_b, 1).await;
    assert_eq!(read_stateful(&store, &node_b, "/first").await, "v1\n", "the data moved with the service");
    assert_eq!(read_stateful(&store, &node_b, "/current").await, "v2\n");

    // Scaled to zero on B; then nothing of the test is left on either node.
    let view = store.view().await.expect("view");
    let mut stop = view.plan();
    for a in &view.allocations {
        stop.put(AllocRecord { status: AllocStatus::Stopping, ..a.clone() });
    }
    store.commit(&stop).await.expect("stop");
    agent_b.sync().await.expect("sync stops");
    assert!(guard_a.containers().is_empty() && guard_b.containers().is_empty());
    docker_volumes.remove(&volume).await.expect("remove the old copy");
    drop((member_a, member_b));
}
