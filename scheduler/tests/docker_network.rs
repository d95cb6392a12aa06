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

    // Its replacement asks for the address it had, and gets it.
    let again = TaskSpec {
        image: Some(keelson_testkit::docker::busybox_image().expect("image")),
        address: Some(ip),
        ..TaskSpec::new("kn-2", ["/bin/sh", "-c", "exec sleep 60"])
    }
    .with_label("keelson.test-run", &run);
    assert_eq!(driver.start(again).await.expect("start").address, Some(ip), "the address asked for");
    driver.stop("kn-2", Duration::from_secs(1)).await.expect("stop");
    driver.remove("kn-2").await.expect("remove");

    // A task that exits before it can be attached ran without its network: it started,
    // and its exit is its result (a one-off run failing at once, say).
    let quick = TaskSpec {
        image: Some(keelson_testkit::docker::busybox_image().expect("image")),
        ..TaskSpec::new("kn-3", ["/bin/sh", "-c", "echo no config >&2; exit 3"])
    }
    .with_label("keelson.test-run", &run);
    driver.start(quick).await.expect("a task that exits at once still started");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let exited = loop {
        let s = driver.inspect("kn-3").await.expect("inspect");
        if s.state.is_exited() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "kn-3 never exited: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(matches!(exited.state, TaskState::Exited { code: Some(3), .. }), "{exited:?}");
    driver.remove("kn-3").await.expect("remove");
    assert!(bridge.inspect(&name).await.expect("inspect").endpoints.is_empty(), "nothing stays attached");
    bridge.delete_network(&name).await.expect("delete network");
}
