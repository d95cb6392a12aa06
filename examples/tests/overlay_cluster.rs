//! A cluster across hosts on the overlay, end to end with the real binaries: two
//! `node-agent`s, each inside its own network namespace acting as a host with its own
//! underlay address, on one etcd (reached over the underlay), both with
//! `--network overlay`. A client task on host 1 calls the api task on host 2 by its
//! overlay address and by name through `dns-catalog` on host 1; `edge` on host 1 routes
//! to the instance on host 2. Containers, agents, servers and namespaces go on drop,
//! also when the test fails.
#![cfg(all(feature = "etcd", feature = "docker"))]

use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_discovery::{Discovery, EtcdConfig, EtcdKv, KeyValue, KvDiscovery, Query, ServiceName};
use keelson_scheduler::{
    AllocRecord, AllocStatus, ClusterStore, DesiredGroup, GroupSpec, Resources, ServiceSpec, TaskTemplate, NODE_LABEL,
};
use keelson_testkit::netns::{Netns, Underlay};

/// A process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes a node's containers on drop.
struct NodeContainers(String);

impl Drop for NodeContainers {
    fn drop(&mut self) {
        keelson_testkit::docker::remove_containers(&[&format!("label={NODE_LABEL}={}", self.0)]);
    }
}

fn in_host(host: &Netns, program: &str, args: &[&str], log: &std::path::Path) -> Proc {
    Proc(host.spawn(std::path::Path::new(program), args, log).unwrap_or_else(|e| panic!("{e}")))
}

fn group(job: &str, image: &str, script: &str, service: Option<ServiceSpec>) -> GroupSpec {
    GroupSpec {
        desired: DesiredGroup {
            job: job.into(),
            group: "main".into(),
            version: 1,
            count: 1,
            resources: Resources::new(200, 64),
            ports: u16::from(service.is_some()),
            volumes: Vec::new(),
            ..DesiredGroup::default()
        },
        task: TaskTemplate {
            image: Some(image.to_owned()),
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            ..TaskTemplate::default()
        },
        service,
        release: None,
    }
}

fn docker_exec(container: &str, args: &[&str]) -> String {
    let out = Command::new("docker").arg("exec").arg(container).args(args).output().expect("docker exec");
    format!(
        "{}{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        if out.status.success() { String::new() } else { format!(" ({})", out.status) }
    )
}

async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, limit: Duration, mut done: impl FnMut() -> F) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_on_two_hosts_reach_each_other_over_the_overlay_by_address_name_and_edge() {
    let image = keelson_testkit::docker::busybox_image().unwrap_or_else(|e| panic!("the busybox test image: {e}"));
    let mut ul = Underlay::create(2, "198.18.61").expect("underlay");
    let root = ul.join_root().expect("the test on the underlay");
    let etcd = keelson_testkit::etcd::Etcd::start_on(root, &[]).expect("etcd on the underlay");
    let url = etcd.client_url();
    let kv: Arc<dyn KeyValue> = Arc::new(EtcdKv::connect(EtcdConfig::new([url.clone()])).await.expect("etcd"));
    let store = ClusterStore::new(kv.clone(), "keelson/cluster");
    let logs = tempfile::tempdir().expect("logs");
    let pid = std::process::id();
    let nodes: Vec<String> = (1..=2).map(|i| format!("ovl{i}-{pid}")).collect();
    let _containers: Vec<NodeContainers> = nodes.iter().map(|n| NodeContainers(n.clone())).collect();
    let mut agents = Vec::new();
    for (i, host) in ul.hosts.iter().enumerate() {
        let state = logs.path().join(format!("netplumb{i}"));
        let addr = ul.addresses[i].to_string();
        let ports = format!("{}-{}", 27000 + 100 * i, 27099 + 100 * i);
        let args = [
            "--etcd",
            &url,
            "--node",
            &nodes[i],
            "--address",
            &addr,
            "--cpu",
            "8000",
            "--memory",
            "8192",
            "--ttl",
            "5s",
            "--interval",
            "200ms",
            "--ports",
            &ports,
            "--network",
            "overlay",
            "--network-subnet",
            "10.246.0.0/16",
            "--network-name",
            "ovl",
            "--network-state-dir",
            state.to_str().expect("utf-8"),
            // Tasks resolve with dns-catalog at their own host's address.
            "--network-dns",
            &addr,
        ];
        agents.push(in_host(host, env!("CARGO_BIN_EXE_node-agent"), &args, &logs.path().join(format!("agent{i}.log"))));
    }
    let agent_logs = || {
        (0..2)
            .map(|i| std::fs::read_to_string(logs.path().join(format!("agent{i}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    wait_for("both agents to join", Duration::from_secs(30), || async { store.view().await.map(|v| v.nodes.len() == 2).unwrap_or(false) })
        .await;

    let api = group(
        "api",
        &image,
        "mkdir -p /www && echo api-on-host2 > /www/index.html && exec httpd -f -p 8080 -h /www",
        Some(ServiceSpec { name: "api".into(), port: 8080, tags: vec!["keelson.http.host=api.test".into()], http_check: None }),
    );
    let client = group("client", &image, "exec sleep 3600", None);
    for g in [&api, &client] {
        store.put_group(g).await.expect("group");
    }
    // Placed by hand: the api on host 2, the client on host 1.
    let view = store.view().await.expect("view");
    let mut plan = view.plan();
    for (job, node, ports) in [("api", &nodes[1], vec![27100]), ("client", &nodes[0], vec![])] {
        plan.put(AllocRecord {
            id: format!("{job}-{pid}"),
            job: job.into(),
            group: "main".into(),
            version: 1,
            node: node.clone(),
            status: AllocStatus::Pending,
            ports,
            since_ms: 0,
            volumes: Vec::new(),
            resources: Default::default(),
            restarts: 0,
            slot: None,
            address: None,
            prefer_address: None,
        });
    }
    store.commit(&plan).await.expect("commit");
    for g in [&api, &client] {
        store.deploy(g, keelson_scheduler::Strategy::Recreate, keelson_scheduler::Gates::default()).await.expect("deploy");
    }
    wait_for("both tasks running", Duration::from_secs(60), || async {
        store.view().await.map(|v| v.allocations.iter().filter(|a| a.status == AllocStatus::Running).count() == 2).unwrap_or(false)
    })
    .await;

    // The api registered at its overlay address, on host 2's subnet.
    let discovery = KvDiscovery::new(kv.clone());
    let name = ServiceName::new("api").expect("name");
    let deadline = Instant::now() + Duration::from_secs(20);
    let instances = loop {
        let found = discovery.instances(&Query::service(name.clone())).await.unwrap_or_default();
        if !found.is_empty() {
            break found;
        }
        assert!(Instant::now() < deadline, "the api never reached the catalog\n{}", agent_logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let api_ip = instances[0].address.clone();
    assert!(api_ip.starts_with("10.246."), "registered at its overlay address: {instances:?}\n{}", agent_logs());
    assert_eq!(instances[0].port, 8080);

    // By address, from the client on host 1, across the overlay.
    let client_container = format!("keelson-client-{pid}");
    // (busybox's wget and nslookup in the static image segfault resolving names: plain
    // HTTP/1.0 over nc instead.)
    let get = format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {api_ip} 8080 | tail -n 1");
    let body = docker_exec(&client_container, &["sh", "-c", &get]);
    if body.trim() != "api-on-host2" {
        for cmd in [&["ip", "addr"][..], &["ip", "route"], &["ping", "-c", "1", "-W", "2", &api_ip]] {
            eprintln!("client {cmd:?}: {}", docker_exec(&client_container, cmd).replace('\n', " | "));
        }
        for h in &ul.hosts {
            eprintln!(
                "{}: {}\n{}\n{}",
                h.name(),
                h.exec("ip", &["route"]).unwrap_or_default(),
                h.exec("ip", &["-br", "link"]).unwrap_or_default(),
                h.exec("nft", &["list", "ruleset"]).unwrap_or_default()
            );
        }
    }
    assert_eq!(body.trim(), "api-on-host2", "client on host 1 -> api on host 2 by address\n{}", agent_logs());

    // By name, through dns-catalog on host 1 (at host 1's underlay address, port 53),
    // the name server the agent wrote into the client's resolv.conf.
    let h1 = ul.addresses[0].to_string();
    let _dns = in_host(
        &ul.hosts[0],
        env!("CARGO_BIN_EXE_dns-catalog"),
        &["--etcd", &url, "--listen", &format!("{h1}:53")],
        &logs.path().join("dns.log"),
    );
    let inspect = Command::new("docker")
        .args(["inspect", "--format", "{{json .HostConfig.Dns}} {{.HostConfig.NetworkMode}} {{.ResolvConfPath}}", &client_container])
        .output()
        .expect("inspect");
    assert_eq!(
        docker_exec(&client_container, &["cat", "/etc/resolv.conf"]).trim(),
        format!("nameserver {h1}"),
        "{}",
        String::from_utf8_lossy(&inspect.stdout)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = docker_exec(&client_container, &["nslookup", "api.service.keelson"]);
        if answer.contains(api_ip.as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "dns-catalog on host 1 never answered with {api_ip}: {answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // edge on host 1 routes to the instance on host 2.
    let edge_listen = format!("{h1}:8088");
    let _edge =
        in_host(&ul.hosts[0], env!("CARGO_BIN_EXE_edge"), &["--etcd", &url, "--listen", &edge_listen], &logs.path().join("edge.log"));
    let got = keelson_testkit::http::get_when_up(edge_listen.parse().expect("addr"), "api.test", "/index.html", Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("edge on host 1: {e}\n{}", std::fs::read_to_string(logs.path().join("edge.log")).unwrap_or_default()));
    assert_eq!(got.body.trim(), "api-on-host2", "edge on host 1 -> api on host 2");
    drop(agents);
}
