//! The embedded defaults pass every conformance scenario.

use keelson_scheduler::{conformance, LocalVolumes, PlacementEngine, ProcessDriver, TaskSpec};

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

#[tokio::test]
async fn local_volumes_pass_volume_conformance() {
    let dir = tempfile::tempdir().expect("tempdir");
    conformance::volumes_all(&LocalVolumes::new(dir.path()).expect("root")).await;
}
