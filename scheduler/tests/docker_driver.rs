//! The Docker driver against the real engine with the busybox `FROM scratch` test image:
//! the driver conformance suite, ports, mounts, limits and labels, adoption by a second
//! driver (an agent restart) without duplicates, and the failure paths (missing image,
//! bad port, mount outside the volume root, host port taken, daemon away), each leaving
//! no container behind. Every container a test creates carries a per-test label and is
//! removed on drop, also when the test fails.
#![cfg(feature = "docker")]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use keelson_scheduler::{
    conformance, DockerDriver, Driver, Error, HealthCheck, Limits, MountSource, MountSpec, PortMapping, TaskHealth, TaskSpec, TaskState,
};

/// Removes every container labelled with this guard's run id when dropped.
struct Cleanup {
    run: String,
}

impl Cleanup {
    fn new(name: &str) -> Cleanup {
        Cleanup { run: format!("{name}-{}", std::process::id()) }
    }

    fn containers(&self) -> Vec<String> {
        keelson_testkit::docker::containers(&[&format!("label=keelson.test-run={}", self.run)])
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        keelson_testkit::docker::remove_containers(&[&format!("label=keelson.test-run={}", self.run)]);
    }
}

fn image() -> String {
    keelson_testkit::docker::busybox_image()
        .unwrap_or_else(|e| panic!("the busybox test image: {e} (install busybox-static and run Docker Engine)"))
}

fn sh(run: &str, image: &str, id: &str, script: &str) -> TaskSpec {
    TaskSpec { image: Some(image.to_owned()), ..TaskSpec::new(id, ["/bin/sh", "-c", script]) }.with_label("keelson.test-run", run)
}

async fn driver() -> DockerDriver {
    DockerDriver::connect().await.unwrap_or_else(|e| panic!("Docker Engine must run for these tests: {e}"))
}

fn docker_inspect(name: &str, format: &str) -> String {
    let out = Command::new("docker").args(["inspect", "--format", format, name]).output().expect("docker inspect");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_driver_passes_driver_conformance() {
    let guard = Cleanup::new("conformance");
    let image = image();
    let run = guard.run.clone();
    let spec = move |id: &str, script: &str| sh(&run, &image, id, script);
    conformance::driver_all(&driver().await, &spec).await;
    assert!(guard.containers().is_empty(), "the suite removes what it starts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_mounts_limits_and_labels_reach_the_container() {
    let guard = Cleanup::new("features");
    let root = tempfile::tempdir().expect("volume root");
    let www = root.path().join("www");
    std::fs::create_dir(&www).expect("mkdir");
    std::fs::write(www.join("index.html"), "from the volume\n").expect("write");
    let port = keelson_testkit::free_ports(1).expect("port")[0];
    let d = driver().await.with_volume_root(root.path());
    let spec = TaskSpec {
        ports: vec![PortMapping::new(8080, port)],
        mounts: vec![MountSpec { source: MountSource::HostDir(www.clone()), target: PathBuf::from("/www"), read_only: true }],
        limits: Some(Limits::new(500, 64)),
        ..sh(&guard.run, &image(), "web-1", "exec httpd -f -p 8080 -h /www")
    }
    .with_label("keelson.job", "web")
    .with_label("keelson.version", "3");
    let status = d.start(spec).await.expect("start");
    assert_eq!(status.state, TaskState::Running);
    assert_eq!(status.labels.get("keelson.job").map(String::as_str), Some("web"));
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let body = keelson_testkit::http::get_when_up(addr, "localhost", "/index.html", Duration::from_secs(5)).await.expect("served").body;
    assert_eq!(body, "from the volume\n", "httpd in the container serves the mounted volume on the published port");
    assert_eq!(docker_inspect("keelson-web-1", "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}"), format!("500000000 {}", 64 << 20));
    assert_eq!(
        docker_inspect("keelson-web-1", "{{range .HostConfig.PortBindings}}{{range .}}{{.HostIp}}:{{.HostPort}}{{end}}{{end}}"),
        format!("127.0.0.1:{port}"),
        "published on loopback by default, never on every interface"
    );
    d.stop("web-1", Duration::from_secs(2)).await.expect("stop");
    d.remove("web-1").await.expect("remove");
    assert!(guard.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_running_containers_and_never_duplicates_them() {
    let guard = Cleanup::new("adopt");
    let image = image();
    let first = driver().await;
    for id in ["adopt-1", "adopt-2"] {
        first.start(sh(&guard.run, &image, id, "while true; do sleep 1; done")).await.expect("start");
    }
    drop(first);
    // A new driver, as after an agent restart: it finds both, running, by label.
    let second = driver().await;
    let mine: Vec<_> =
        second.list().await.expect("list").into_iter().filter(|s| s.labels.get("keelson.test-run") == Some(&guard.run)).collect();
    assert_eq!(mine.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["adopt-1", "adopt-2"]);
    assert!(mine.iter().all(|s| s.state == TaskState::Running));
    assert!(
        matches!(second.start(sh(&guard.run, &image, "adopt-1", "true")).await, Err(Error::Conflict { .. })),
        "no second container for a running task"
    );
    assert_eq!(guard.containers().len(), 2, "none duplicated");
    for id in ["adopt-1", "adopt-2"] {
        second.stop(id, Duration::from_secs(1)).await.expect("stop");
        second.remove(id).await.expect("remove");
    }
    assert!(guard.containers().is_empty(), "none orphaned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_faults_are_typed_errors_that_leave_no_container_behind() {
    let guard = Cleanup::new("faults");
    let image = image();
    let d = driver().await;

    let missing = TaskSpec { image: Some("keelson-test/no-such-image:1".into()), ..sh(&guard.run, &image, "no-image", "true") };
    match d.start(missing).await {
        Err(Error::ImageUnavailable { image, .. }) => assert_eq!(image, "keelson-test/no-such-image:1"),
        other => panic!("a missing image: {other:?}"),
    }

    let bad_port = TaskSpec { ports: vec![PortMapping::new(0, 8080)], ..sh(&guard.run, &image, "bad-port", "true") };
    assert!(matches!(d.start(bad_port).await, Err(Error::InvalidInput { field: "port", .. })));

    let root = tempfile::tempdir().expect("root");
    let outside = tempfile::tempdir().expect("outside");
    let confined = driver().await.with_volume_root(root.path());
    let escape = TaskSpec {
        mounts: vec![MountSpec {
            source: MountSource::HostDir(outside.path().to_owned()),
            target: PathBuf::from("/data"),
            read_only: false,
        }],
        ..sh(&guard.run, &image, "escape", "true")
    };
    assert!(matches!(confined.start(escape).await, Err(Error::InvalidInput { field: "mount", .. })));
    let dotdot = TaskSpec {
        mounts: vec![MountSpec {
            source: MountSource::HostDir(root.path().join("../etc")),
            target: PathBuf::from("/data"),
            read_only: false,
        }],
        ..sh(&guard.run, &image, "dotdot", "true")
    };
    assert!(matches!(confined.start(dotdot).await, Err(Error::InvalidInput { field: "mount", .. })));

    // The host port is taken: the engine refuses at start; the created container goes.
    let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let clash = TaskSpec { ports: vec![PortMapping::new(8080, port)], ..sh(&guard.run, &image, "clash", "sleep 30") };
    assert!(d.start(clash).await.is_err(), "a taken host port fails the start");
    assert!(guard.containers().is_empty(), "no half-created containers: {:?}", guard.containers());

    // No daemon at this socket: unavailable, and retryable.
    let err = DockerDriver::connect_unix(&root.path().join("no-docker.sock")).await.expect_err("no daemon");
    assert!(matches!(err, Error::Unavailable { .. } | Error::Timeout { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(matches!(d.inspect("never-started").await, Err(Error::NotFound { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_containers_health_check_is_reported_starting_then_healthy_or_unhealthy() {
    let guard = Cleanup::new("health");
    let image = image();
    let d = driver().await;
    let check = |file: &str| HealthCheck {
        command: vec!["/bin/sh".into(), "-c".into(), format!("test -f {file}")],
        interval: Duration::from_millis(200),
        timeout: Duration::from_secs(1),
        retries: 2,
    };
    // Ready after a second: starting, then healthy.
    let ready =
        TaskSpec { health_check: Some(check("/ready")), ..sh(&guard.run, &image, "health-ok", "sleep 1; touch /ready; exec sleep 60") };
    assert_eq!(d.start(ready).await.expect("start").health, Some(TaskHealth::Starting));
    // Never ready: unhealthy after its retries.
    let never = TaskSpec { health_check: Some(check("/never")), ..sh(&guard.run, &image, "health-bad", "exec sleep 60") };
    d.start(never).await.expect("start");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, bad) = (d.inspect("health-ok").await.expect("ok"), d.inspect("health-bad").await.expect("bad"));
        if ok.health == Some(TaskHealth::Healthy) && bad.health == Some(TaskHealth::Unhealthy) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{:?} / {:?}", ok.health, bad.health);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Without a check there is no health to report; a bad check is refused up front.
    let plain = sh(&guard.run, &image, "health-none", "exec sleep 60");
    assert_eq!(d.start(plain).await.expect("start").health, None);
    let empty = TaskSpec {
        health_check: Some(HealthCheck { command: Vec::new(), ..check("x") }),
        ..sh(&guard.run, &image, "health-empty", "true")
    };
    assert!(matches!(d.start(empty).await, Err(Error::InvalidInput { field: "health check", .. })));
    for id in ["health-ok", "health-bad", "health-none"] {
        d.stop(id, Duration::from_secs(1)).await.expect("stop");
        d.remove(id).await.expect("remove");
    }
    assert!(guard.containers().is_empty(), "nothing left, the refused one included");
}

/// Removes a Docker network when dropped.
struct Network(String);

impl Drop for Network {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["network", "rm", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_joins_its_named_network_and_a_missing_network_leaves_nothing_behind() {
    let guard = Cleanup::new("network");
    let image = image();
    let d = driver().await;
    let net = Network(format!("keelson-test-net-{}", std::process::id()));
    let made = Command::new("docker").args(["network", "create", &net.0]).output().expect("docker network create");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let on_net = TaskSpec { network: Some(net.0.clone()), ..sh(&guard.run, &image, "net-1", "exec sleep 60") };
    d.start(on_net).await.expect("start on the network");
    let networks = docker_inspect("keelson-net-1", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}");
    assert_eq!(networks.trim(), net.0, "attached to the named network only");
    d.stop("net-1", Duration::from_secs(1)).await.expect("stop");
    d.remove("net-1").await.expect("remove");

    let nowhere = TaskSpec { network: Some(format!("no-such-net-{}", std::process::id())), ..sh(&guard.run, &image, "net-2", "true") };
    let err = d.start(nowhere).await.expect_err("no such network");
    assert!(matches!(err, Error::NotFound { kind: "network", .. }), "{err:?}");
    assert!(guard.containers().is_empty(), "the container that could not start was removed");
}

/// A container printing 200 KiB with no newline: its output comes in pieces of at most
/// 64 KiB, each marked partial but the one its newline ends, and counted in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_output_lines_are_cut_into_marked_pieces() {
    use futures::StreamExt;
    let guard = Cleanup::new("long-lines");
    let d = driver().await;
    let mut registry = prometheus_client::registry::Registry::default();
    d.register_metrics(&mut registry);
    d.start(sh(&guard.run, &image(), "long-1", "head -c 204800 /dev/zero | tr '\\0' a; echo; echo end")).await.expect("start");
    let lines: Vec<_> = tokio::time::timeout(Duration::from_secs(30), d.output("long-1").await.expect("output").collect::<Vec<_>>())
        .await
        .expect("the output ends with the task");
    let shape: Vec<(usize, bool)> = lines.iter().map(|l| (l.line.len(), l.partial)).collect();
    assert_eq!(shape, vec![(65_536, true), (65_536, true), (65_536, true), (8_192, false), (3, false)], "{shape:?}");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(text.contains("keelson_driver_output_lines_split_total 3"), "{text}");
    d.remove("long-1").await.expect("remove");
}

/// Published ports bind to the configured address only; every interface is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_ports_bind_to_the_configured_address_only() {
    let guard = Cleanup::new("publish");
    let www = tempfile::tempdir().expect("www");
    std::fs::write(www.path().join("index.html"), "here\n").expect("write");
    let port = keelson_testkit::free_ports(1).expect("port")[0];
    assert!(matches!(
        driver().await.with_publish_address("0.0.0.0".parse().expect("ip")),
        Err(keelson_scheduler::Error::InvalidInput { field: "publish address", .. })
    ));
    let d = driver().await.with_publish_address("127.0.0.3".parse().expect("ip")).expect("address").with_volume_root(www.path());
    let spec = TaskSpec {
        ports: vec![PortMapping::new(8080, port)],
        mounts: vec![MountSpec { source: MountSource::HostDir(www.path().to_owned()), target: PathBuf::from("/www"), read_only: true }],
        ..sh(&guard.run, &image(), "pub-1", "exec httpd -f -p 8080 -h /www")
    };
    d.start(spec).await.expect("start");
    assert_eq!(
        docker_inspect("keelson-pub-1", "{{range .HostConfig.PortBindings}}{{range .}}{{.HostIp}}:{{.HostPort}}{{end}}{{end}}"),
        format!("127.0.0.3:{port}")
    );
    let there = std::net::SocketAddr::from(([127, 0, 0, 3], port));
    let body = keelson_testkit::http::get_when_up(there, "localhost", "/index.html", Duration::from_secs(5)).await.expect("served").body;
    assert_eq!(body, "here\n");
    let elsewhere = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    assert!(tokio::net::TcpStream::connect(elsewhere).await.is_err(), "not published on another address");
    d.stop("pub-1", Duration::from_secs(2)).await.expect("stop");
    d.remove("pub-1").await.expect("remove");
}

/// The engine's follow stream can end before a container that wrote a lot and exited at
/// once has all its output sent (seen: 6,455 of 20,000 lines, no error). The driver reads
/// the rest: every line comes, once, in order, whichever way the race goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_read_while_a_task_runs_has_every_line_even_when_it_exits_right_after_a_burst() {
    use futures::StreamExt;
    let cleanup = Cleanup::new("burst");
    let d = driver().await;
    let script = "i=0; while [ $i -lt 20000 ]; do echo \"line $i of a burst\"; i=$((i+1)); done; echo done >&2";
    for round in 0..3 {
        let id = format!("burst-{round}-{}", std::process::id());
        d.start(sh(&cleanup.run, &image(), &id, script)).await.expect("start");
        let mut output = d.output(&id).await.expect("output");
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(line) = tokio::time::timeout(Duration::from_secs(60), output.next()).await.expect("the stream ends") {
            match line.stream {
                keelson_scheduler::OutputStream::Stdout => stdout.push(line.line),
                keelson_scheduler::OutputStream::Stderr => stderr.push(line.line),
            }
        }
        assert_eq!(stdout.len(), 20_000, "round {round}: every line (last: {:?})", stdout.last());
        assert!(stdout.iter().enumerate().all(|(i, l)| *l == format!("line {i} of a burst")), "round {round}: once each, in order");
        assert_eq!(stderr, ["done"]);
        d.remove(&id).await.expect("remove");
    }
}
