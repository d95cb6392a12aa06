//! The embedded defaults pass every conformance scenario.

use keelson_scheduler::{conformance, Driver, LocalVolumes, PlacementEngine, ProcessDriver, TaskSpec};

fn sh(id: &str, script: &str) -> TaskSpec {
    TaskSpec::new(id, ["/bin/sh", "-c", script])
}

#[test]
fn placement_engine_passes_scheduler_conformance() {
    conformance::scheduler_all(&PlacementEngine::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_driver_passes_driver_conformance() {
    conformance::driver_all(&ProcessDriver::new(), &sh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_process_driver_passes_driver_conformance() {
    let dir = tempfile::tempdir().expect("state dir");
    conformance::driver_all(&ProcessDriver::persistent(dir.path()).await.expect("driver"), &sh).await;
}

#[tokio::test]
async fn local_volumes_pass_volume_conformance() {
    let dir = tempfile::tempdir().expect("tempdir");
    conformance::volumes_all(&LocalVolumes::new(dir.path()).expect("root")).await;
}

#[tokio::test]
async fn the_process_driver_refuses_isolation_it_cannot_give() {
    let spec = TaskSpec { limits: Some(keelson_scheduler::Limits::new(100, 64)), ..sh("limited", "true") };
    let err = ProcessDriver::new().without_limits().start(spec).await.expect_err("no limits without control groups");
    assert!(matches!(err, keelson_scheduler::Error::Unsupported { backend: "process", .. }), "{err:?}");
}
