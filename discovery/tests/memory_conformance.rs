//! The embedded backends pass every conformance scenario.

use keelson_discovery::{conformance, MemoryDiscovery, MemoryKv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_kv_passes_kv_conformance() {
    conformance::kv_all_shared(std::sync::Arc::new(MemoryKv::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_discovery_passes_discovery_conformance() {
    conformance::discovery_all(&MemoryDiscovery::memory()).await;
}
