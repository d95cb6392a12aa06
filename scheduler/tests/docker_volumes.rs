//! Docker named volumes against the real engine: the volume conformance suite (create,
//! list, remove, tar export and all-or-nothing import), a volume mounted into a container
//! that serves its files, removal refused while mounted, and a volume moved between a
//! host directory and the engine both ways. Volumes and helper containers a test makes
//! are removed on drop, also when it fails.
#![cfg(feature = "docker")]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use keelson_scheduler::{
    conformance, copy_volume, DockerDriver, DockerVolumes, Driver, Error, LocalVolumes, PortMapping, TaskSpec, VolumeManager,
};

/// Removes this process's volumes and helper containers whose names contain `prefix`
/// when dropped (each test names its volumes `<prefix>…-<pid>-<n>`; tests run in parallel,
/// so each cleans only its own).
struct Cleanup(&'static str);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let tag = format!("-{}-", std::process::id());
        let ls = |args: &[&str]| -> Vec<String> {
            let out = Command::new("docker").args(args).output().expect("docker");
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter(|n| n.contains(&tag) && n.contains(self.0))
                .map(str::to_owned)
                .collect()
        };
        let containers = ls(&["ps", "-a", "--format", "{{.Names}}", "--filter", "label=keelson.managed"]);
        if !containers.is_empty() {
            let _ = Command::new("docker").args(["rm", "-f"]).args(&containers).output();
        }
        let volumes = ls(&["volume", "ls", "-q"]);
        if !volumes.is_empty() {
            let _ = Command::new("docker").args(["volume", "rm", "-f"]).args(&volumes).output();
        }
    }
}

async fn driver() -> DockerDriver {
    DockerDriver::connect().await.unwrap_or_else(|e| panic!("Docker Engine must run for these tests: {e}"))
}

fn docker_volume_exists(name: &str) -> bool {
    Command::new("docker").args(["volume", "inspect", name]).output().expect("docker").status.success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_volumes_pass_volume_conformance() {
    let (_vols, _foreign) = (Cleanup("vol-"), Cleanup("foreign-"));
    conformance::volumes_all(&driver().await.volumes()).await;
    // Someone else's volume is not keelson's to see or remove.
    let foreign = format!("foreign-{}-0", std::process::id());
    assert!(Command::new("docker").args(["volume", "create", &foreign]).output().expect("docker").status.success());
    let v = DockerVolumes::connect().await.expect("connect");
    assert!(matches!(v.get(&foreign).await, Err(Error::NotFound { .. })));
    assert!(matches!(v.remove(&foreign).await, Err(Error::NotFound { .. })));
    assert!(!v.list().await.expect("list").iter().any(|x| x.name == foreign));
    assert!(docker_volume_exists(&foreign), "left alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_volume_is_mounted_into_a_task_and_cannot_be_removed_while_in_use() {
    let _cleanup = Cleanup("site-");
    let image = keelson_testkit::docker::busybox_image()
        .unwrap_or_else(|e| panic!("the busybox test image: {e} (install busybox-static and run Docker Engine)"));
    let d = driver().await;
    let v = d.volumes();
    let name = format!("site-www-{}-1", std::process::id());
    let site = conformance::archive_of(&[("index.html", b"from a docker volume\n", 0o644)], &[]);
    let volume = v.import(&name, BTreeMap::new(), site).await.expect("import");
    let port = keelson_testkit::free_ports(1).expect("port")[0];
    let task = format!("site-web-{}-1", std::process::id());
    let spec = TaskSpec {
        image: Some(image),
        ports: vec![PortMapping::new(8080, port)],
        mounts: vec![volume.mount("/www", true)],
        ..TaskSpec::new(&task, ["httpd", "-f", "-p", "8080", "-h", "/www"])
    };
    d.start(spec).await.expect("start");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let body = keelson_testkit::http::get_when_up(addr, "localhost", "/index.html", Duration::from_secs(5)).await.expect("served").body;
    assert_eq!(body, "from a docker volume\n");
    assert!(matches!(v.remove(&name).await, Err(Error::Conflict { .. })), "a mounted volume is never removed");
    d.stop(&task, Duration::from_secs(2)).await.expect("stop");
    d.remove(&task).await.expect("remove task");
    v.remove(&name).await.expect("remove volume");
    assert!(!docker_volume_exists(&name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_moves_from_a_host_directory_into_docker_and_back() {
    let _cleanup = Cleanup("moving-");
    let docker = driver().await.volumes();
    let (a, b) = (tempfile::tempdir().expect("root a"), tempfile::tempdir().expect("root b"));
    let (local_a, local_b) = (LocalVolumes::new(a.path()).expect("a"), LocalVolumes::new(b.path()).expect("b"));
    let name = format!("moving-{}-1", std::process::id());
    let labels = BTreeMap::from([("app".to_owned(), "db".to_owned())]);
    let files: [(&str, &[u8], u32); 2] = [("pg/base/1", &[9u8; 50_000], 0o600), ("pg/VERSION", b"16\n", 0o644)];
    local_a.import(&name, labels.clone(), conformance::archive_of(&files, &[("current", "pg")])).await.expect("seed");
    let original = conformance::export_listing(&local_a, &name).await;

    let in_docker = copy_volume(&local_a, &docker, &name).await.expect("into docker");
    assert_eq!(in_docker.labels, labels, "labels travel with the volume");
    assert_eq!(conformance::export_listing(&docker, &name).await, original);
    copy_volume(&docker, &local_b, &name).await.expect("back out");
    assert_eq!(conformance::export_listing(&local_b, &name).await, original);
    assert_eq!(std::fs::read(b.path().join(&name).join("data/pg/VERSION")).expect("file on disk"), b"16\n");
    assert!(matches!(copy_volume(&local_a, &docker, &name).await, Err(Error::Conflict { .. })), "never overwritten");
    // No helper container outlives a transfer read to its end.
    let helpers =
        Command::new("docker").args(["ps", "-a", "--format", "{{.Names}}", "--filter", "name=keelson-volume-"]).output().expect("docker");
    assert!(!String::from_utf8_lossy(&helpers.stdout).contains(&name), "{}", String::from_utf8_lossy(&helpers.stdout));
    docker.remove(&name).await.expect("remove");
    assert!(!docker_volume_exists(&name));
}
