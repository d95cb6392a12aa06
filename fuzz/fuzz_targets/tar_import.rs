//! Volume archives from a peer: any bytes imported into a local volume manager either
//! import inside the volume or fail with a typed error and leave nothing.
#![no_main]
use std::collections::BTreeMap;

use keelson_scheduler::{LocalVolumes, VolumeManager};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let dir = tempfile_dir();
    rt.block_on(async {
        let volumes = LocalVolumes::new(&dir).expect("root");
        let tar = keelson_scheduler::conformance::chunked(data.to_vec());
        if volumes.import("v", BTreeMap::new(), tar).await.is_err() {
            assert!(volumes.list().await.expect("list").is_empty(), "a failed import leaves nothing");
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
});

fn tempfile_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("keelson-fuzz-tar-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}
