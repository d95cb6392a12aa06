//! Two `node-agent` processes (different node ids, one Docker engine) on a real etcd; one
//! is killed with SIGKILL and the controller in the surviving agent re-places its work
//! there within the lease TTL + 2 s, where that agent starts it. Nothing but the two
//! agent processes acts on the cluster after the setup. Every container of both nodes is removed at
//! the end, also when the test fails.
#![cfg(all(feature = "etcd", feature = "docker"))]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_discovery::{EtcdConfig, EtcdKv, KeyValue};
use keelson_scheduler::{
    AllocRecord, AllocStatus, ClusterStore, DesiredGroup, GroupSpec, Resources, ServiceSpec, TaskTemplate, NODE_LABEL,
};

/// An agent process, killed on drop; its node's containers are removed on drop too.
struct Agent {
    node: String,
    child: Child,
}

impl Agent {
    fn start(etcd: &str, node: &str) -> Agent {
        let child = Command::new(env!("CARGO_BIN_EXE_node-agent"))
            .args(["--etcd", etcd, "--node", node, "--cpu", "8000", "--memory", "8192", "--ttl-secs", "2", "--interval-ms", "200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("node-agent starts");
        Agent { node: node.to_owned(), child }
    }

    fn containers(&self) -> Vec<String> {
        let out = Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("label={NODE_LABEL}={}", self.node)])
            .output()
            .expect("docker ps");
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let ids = self.containers();
        if !ids.is_empty() {
            let _ = Command::new("docker").args(["rm", "-f"]).args(&ids).output();
        }
    }
}

fn web(image: &str) -> GroupSpec {
    GroupSpec {
        desired: DesiredGroup {
            job: "web".into(),
            group: "http".into(),
            version: 1,
            count: 4,
            resources: Resources::new(500, 64),
            ports: 1,
            volumes: Vec::new(),
        },
        task: TaskTemplate {
            image: Some(image.to_owned()),
            command: vec!["httpd".into(), "-f".into(), "-p".into(), "8080".into()],
            ..TaskTemplate::default()
        },
        service: Some(ServiceSpec { name: "web".into(), port: 8080, tags: Vec::new(), http_check: None }),
    }
}

async fn running_on(store: &ClusterStore, node: &str) -> usize {
    store.allocations_on(node).await.expect("allocations").iter().filter(|a| a.status == AllocStatus::Running).count()
}

async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, limit: Duration, mut done: impl FnMut() -> F) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_work_is_replaced_on_the_other_node_within_ttl_plus_2s() {
    let image = keelson_testkit::docker::busybox_image().unwrap_or_else(|e| panic!("the busybox test image: {e}"));
    let etcd = keelson_testkit::etcd::Etcd::start().unwrap_or_else(|e| panic!("etcd for this test: {e}"));
    let kv: Arc<dyn KeyValue> = Arc::new(EtcdKv::connect(EtcdConfig::new([etcd.client_url()])).await.expect("etcd"));
    let store = ClusterStore::new(kv, "keelson/cluster");
    let spec = web(&image);
    store.put_group(&spec).await.expect("group");
    let pid = std::process::id();
    let (a, b) = (format!("doomed-{pid}"), format!("survivor-{pid}"));
    let mut doomed = Agent::start(&etcd.client_url(), &a);
    let survivor = Agent::start(&etcd.client_url(), &b);
    wait_for("both nodes to join", Duration::from_secs(20), || async { store.view().await.map(|v| v.nodes.len() == 2).unwrap_or(false) })
        .await;

    // Two allocations on each node, placed by hand so the doomed node surely has work.
    let ports = keelson_testkit::free_ports(4).expect("ports");
    let view = store.view().await.expect("view");
    let mut plan = view.plan();
    for (i, port) in ports.iter().enumerate() {
        let node = if i < 2 { &a } else { &b };
        plan.put(AllocRecord {
            id: format!("web-{pid}-{i}"),
            job: "web".into(),
            group: "http".into(),
            version: 1,
            node: node.clone(),
            status: AllocStatus::Pending,
            ports: vec![*port],
            since_ms: 0,
            volumes: Vec::new(),
        });
    }
    store.commit(&plan).await.expect("commit");
    // The controllers in the agents keep the group at four from now on.
    let rolling = keelson_scheduler::Strategy::Rolling { max_surge: 1, max_unavailable: 0 };
    store.deploy(&spec, rolling, keelson_scheduler::Gates::default()).await.expect("group state");
    wait_for("four running allocations", Duration::from_secs(60), || async {
        running_on(&store, &a).await == 2 && running_on(&store, &b).await == 2
    })
    .await;

    doomed.child.kill().expect("SIGKILL the doomed agent");
    let killed = Instant::now();
    let bound = Duration::from_secs(2) + Duration::from_secs(2);
    // Re-placed: the lost node's records gone, four allocations on the survivor.
    loop {
        let view = store.view().await.expect("view");
        if !view.allocations.iter().any(|x| x.node == a) && view.allocations.iter().filter(|x| x.node == b).count() == 4 {
            break;
        }
        assert!(killed.elapsed() <= bound, "the lost node's work was not re-placed within TTL + 2 s: {:?}", view.allocations);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = killed.elapsed();
    assert!(took <= bound, "re-placed after {took:?}");
    wait_for("the survivor to run all four", Duration::from_secs(60), || async { running_on(&store, &b).await == 4 }).await;
    assert_eq!(survivor.containers().len(), 4);
    eprintln!("lost node's work re-placed {took:?} after SIGKILL (lease TTL 2 s)");
}
