//! The process driver running tasks in network namespaces of their own on a keelson
//! bridge, inside a namespace that plays the host: attached before the task starts,
//! reachable at its own address and its published port, gone after remove.
#![cfg(feature = "netns")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_netplumb::{BridgeNetwork, KernelConfig, NetworkDriver, NetworkSpec};
use keelson_scheduler::{Driver, PortMapping, ProcessDriver, TaskNetwork, TaskSpec, TaskState};
use keelson_testkit::netns::Netns;

/// An HTTP/1.0 GET from inside the namespace at `ns`, retried until `limit`.
fn get_in(ns: &Path, to: SocketAddr, limit: Duration) -> String {
    let file = std::fs::File::open(ns).expect("netns");
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let deadline = Instant::now() + limit;
        loop {
            let attempt = (|| -> std::io::Result<String> {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            })();
            match attempt {
                Ok(body) => return body,
                Err(e) => assert!(Instant::now() < deadline, "GET {to}: {e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .join()
    .expect("thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_tasks_get_a_namespace_of_their_own_on_a_keelson_network() {
    let busybox = keelson_testkit::require("busybox", "busybox-static").expect("busybox");
    let host = Netns::create("kpph").expect("host namespace");
    let state = tempfile::tempdir().expect("state");
    let mut config = KernelConfig::in_dir(state.path().join("netplumb"));
    config.host_netns = Some(host.path());
    let bridge = BridgeNetwork::open(config).expect("bridge");
    bridge.create_network(NetworkSpec::new("pn").with_subnet("10.219.0.0/24")).await.expect("network");
    let netns_dir = state.path().join("netns");
    let driver = ProcessDriver::new().without_limits().with_network(TaskNetwork::new(Arc::new(bridge.clone()), "pn"), &netns_dir);
    assert!(driver.capabilities().publishes_ports);
    let www = state.path().join("www");
    std::fs::create_dir(&www).expect("www");
    std::fs::write(www.join("index.html"), "from a process task\n").expect("index");
    let bb = busybox.display().to_string();
    let mut spec = TaskSpec::new("pt-1", [bb.as_str(), "httpd", "-f", "-p", "$PORT"]);
    spec.command = vec![bb.clone(), "sh".into(), "-c".into(), format!("exec {bb} httpd -f -p $PORT -h {}", www.display())];
    spec.ports = vec![PortMapping::new(8080, 18700)];
    let status = driver.start(spec).await.expect("start");
    assert_eq!(status.state, TaskState::Running);
    let ip = driver.inspect("pt-1").await.expect("inspect").address.expect("an address of its own");
    assert!(ip.to_string().starts_with("10.219.0."), "{ip}");
    assert!(netns_dir.join("pt-1").exists(), "its namespace is bound");
    let own = get_in(&host.path(), SocketAddr::new(ip, 8080), Duration::from_secs(10));
    assert!(own.ends_with("from a process task\n"), "served at its address on its own port (PORT=8080): {own}");
    let published = get_in(&host.path(), SocketAddr::from(([127, 0, 0, 1], 18700)), Duration::from_secs(10));
    assert!(published.ends_with("from a process task\n"), "and at the host's published port: {published}");

    driver.stop("pt-1", Duration::from_secs(2)).await.expect("stop");
    driver.remove("pt-1").await.expect("remove");
    assert!(!netns_dir.join("pt-1").exists(), "its namespace went with it");
    assert!(bridge.inspect("pn").await.expect("inspect").endpoints.is_empty(), "and its address");
    bridge.delete_network("pn").await.expect("delete");
}
