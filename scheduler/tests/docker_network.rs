//! The Docker driver putting tasks on a keelson network: a container with no network of
//! the engine's, attached through its namespace to a netplumb bridge in the root
//! namespace (beside dockerd), reachable at its own address and at its published port.
#![cfg(feature = "docker")]

use std::sync::Arc;
use std::time::Duration;

use keelson_netplumb::{BridgeNetwork, KernelConfig, NetworkDriver, NetworkSpec};
use keelson_scheduler::{DockerDriver, Driver, PortMapping, TaskNetwork, TaskSpec, TaskState};

/// Removes the test's containers, then its networks and attachments, even on failure.
struct Cleanup {
    run: String,
    state: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        keelson_testkit::docker::remove_containers(&[&format!("label=keelson.test-run={}", self.run)]);
        let state = self.state.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let Ok(d) = BridgeNetwork::open(KernelConfig::in_dir(&state)) else { return };
                let _ = d.gc(&[]).await;
                for net in d.list().await.unwrap_or_default() {
                    let _ = d.delete_network(&net.spec.name).await;
                }
            });
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_on_a_keelson_network_get_their_own_address_and_published_ports() {
    let state = tempfile::tempdir().expect("state");
    let _cleanup = Cleanup { run: format!("knet-{}", std::process::id()), state: state.path().to_owned() };
    let run = format!("knet-{}", std::process::id());
    let image = keelson_testkit::docker::busybox_image().expect("busybox test image");
    let bridge = BridgeNetwork::open(KernelConfig::in_dir(state.path())).expect("bridge");
    let name = format!("dk{}", std::process::id() % 100_000);
    bridge.create_network(NetworkSpec::new(&name).with_subnet("10.218.0.0/24").with_masquerade()).await.expect("network");
    let driver = DockerDriver::connect().await.expect("Docker Engine").with_network(TaskNetwork::new(Arc::new(bridge.clone()), &name));
    let port = keelson_testkit::free_ports(1).expect("port")[0];
    let spec = TaskSpec {
        image: Some(image),
        ports: vec![PortMapping::new(8080, port)],
        ..TaskSpec::new("kn-1", ["/bin/sh", "-c", "mkdir -p /www && echo hi from kn-1 > /www/index.html && exec httpd -f -p 8080 -h /www"])
    }
    .with_label("keelson.test-run", &run);
    let status = driver.start(spec).await.expect("start");
    assert_eq!(status.state, TaskState::Running);
    let ip = status.address.expect("the task has an address of its own");
    assert!(ip.to_string().starts_with("10.218.0."), "{ip}");
    let mode = std::process::Command::new("docker")
        .args(["inspect", "--format", "{{.HostConfig.NetworkMode}}", "keelson-kn-1"])
        .output()
        .expect("inspect");
    assert_eq!(String::from_utf8_lossy(&mode.stdout).trim(), "none", "no network of the engine's");
    let own = keelson_testkit::http::get_when_up(std::net::SocketAddr::new(ip, 8080), "kn", "/index.html", Duration::from_secs(5))
        .await
        .expect("at its address");
    assert_eq!(own.body, "hi from kn-1\n");
    let published =
        keelson_testkit::http::get_when_up(std::net::SocketAddr::from(([127, 0, 0, 1], port)), "kn", "/index.html", Duration::from_secs(5))
            .await
            .expect("at its published port");
    assert_eq!(published.body, "hi from kn-1\n");
    assert_eq!(driver.inspect("kn-1").await.expect("inspect").address, Some(ip), "inspect reports the same address");

    driver.stop("kn-1", Duration::from_secs(2)).await.expect("stop");
    assert!(bridge.inspect(&name).await.expect("inspect").endpoints.is_empty(), "the address went back at stop");
    driver.remove("kn-1").await.expect("remove");
    bridge.delete_network(&name).await.expect("delete network");
}

/// A container the engine restarts in place gets a new namespace: the driver attaches
/// it again, with the port it published, when it next reports its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_restarted_in_place_is_attached_again_with_its_ports() {
    let state = tempfile::tempdir().expect("state");
    let run = format!("knet-restart-{}", std::process::id());
    let _cleanup = Cleanup { run: run.clone(), state: state.path().to_owned() };
    let image = keelson_testkit::docker::busybox_image().expect("busybox test image");
    let bridge = BridgeNetwork::open(KernelConfig::in_dir(state.path())).expect("bridge");
    let name = format!("dr{}", std::process::id() % 100_000);
    bridge.create_network(NetworkSpec::new(&name).with_subnet("10.220.0.0/24")).await.expect("network");
    let driver = DockerDriver::connect().await.expect("Docker Engine").with_network(TaskNetwork::new(Arc::new(bridge.clone()), &name));
    let port = keelson_testkit::free_ports(1).expect("port")[0];
    // Fails once (the engine restarts it in place, in a new namespace), then serves.
    let script = "if [ -f /once ]; then mkdir -p /www && echo second run > /www/index.html && exec httpd -f -p 8080 -h /www; fi; touch /once; exit 1";
    let spec = TaskSpec {
        image: Some(image),
        ports: vec![PortMapping::new(8080, port)],
        restart: Some(keelson_scheduler::RestartPolicy {
            max_restarts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        }),
        ..TaskSpec::new("kr-1", ["/bin/sh", "-c", script])
    }
    .with_label("keelson.test-run", &run);
    driver.start(spec).await.expect("start");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let s = driver.inspect("kr-1").await.expect("inspect");
        if s.restarts >= 1 && s.state == TaskState::Running && s.address.is_some() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "never restarted and attached again: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ip = status.address.expect("address");
    let own = keelson_testkit::http::get_when_up(std::net::SocketAddr::new(ip, 8080), "kr", "/index.html", Duration::from_secs(10))
        .await
        .expect("at its address");
    assert_eq!(own.body, "second run\n");
    let published = keelson_testkit::http::get_when_up(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        "kr",
        "/index.html",
        Duration::from_secs(10),
    )
    .await
    .expect("its port is published again");
    assert_eq!(published.body, "second run\n");
    driver.stop("kr-1", Duration::from_secs(2)).await.expect("stop");
    driver.remove("kr-1").await.expect("remove");
    bridge.delete_network(&name).await.expect("delete network");
}
