//! Stored cluster records (written by another node, possibly newer, possibly broken): any
//! bytes under the keys a plan reads give typed errors from the view, the validator and
//! a reschedule, never a panic.
#![no_main]
use std::sync::Arc;

use keelson_discovery::{KeyValue, MemoryKv};
use keelson_scheduler::{ClusterStore, DesiredGroup, Resources};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let kv = Arc::new(MemoryKv::new());
        // The first byte picks where the rest lands.
        let key = match data.first().copied().unwrap_or(0) % 6 {
            0 => "f/nodes/n1",
            1 => "f/allocs/n1/a1",
            2 => "f/status/n1/a1",
            3 => "f/volumes/v1",
            4 => "f/journal/head",
            _ => "f/desired/web/g",
        };
        let _ = kv.put(key, data.get(1..).unwrap_or_default().to_vec(), None).await;
        let store = ClusterStore::new(kv, "f");
        let _ = store.view().await;
        let _ = store.check_stored().await;
        let desired = DesiredGroup {
            job: "web".into(),
            group: "g".into(),
            version: 1,
            count: 1,
            resources: Resources::new(1, 1),
            ..DesiredGroup::default()
        };
        let _ = store.reschedule(&[desired]).await;
    });
});
