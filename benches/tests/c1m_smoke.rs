//! The c1m workload on a real etcd at 1,000 nodes, as a correctness smoke test: every
//! job is placed whole, the validator finds the stored state sound, and the sampled
//! agents' watches see their allocations. No timing is asserted: the figures belong to
//! the bench (`--bin c1m`, BENCHMARKS.md).
//!
//! Plans are made against the watch-fed `ClusterCache`, so the run grows linearly with
//! the allocations: 50,000 take seconds even in a debug build.

use std::sync::Arc;

use keelson_benches::c1m::{run, C1mConfig};
use keelson_discovery::{EtcdConfig, EtcdKv, KeyValue};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_allocations_on_a_thousand_nodes_commit_soundly() {
    let etcd = keelson_testkit::etcd::Etcd::start().unwrap_or_else(|e| panic!("etcd for this test: {e}"));
    let kv: Arc<dyn KeyValue> = Arc::new(EtcdKv::connect(EtcdConfig::new([etcd.client_url()])).await.expect("connect"));
    let config = C1mConfig { nodes: 1_000, jobs: 100, tasks: 500, big_jobs: 2, sample_nodes: 20 };
    let report = run(kv, "c1m-smoke", config, |_| {}).await.expect("the workload runs");
    assert_eq!(report.allocations, 52_000, "100 jobs of 500 tasks and 2 of 1,000");
    assert!(report.violations.is_empty(), "{:?}", &report.violations[..report.violations.len().min(5)]);
    // 20 of 1,000 nodes sampled: about 1,000 of the 50,000 allocations land on them.
    assert!(report.watch_delays.len() > 500, "the sampled watches saw their allocations: {}", report.watch_delays.len());
    eprintln!(
        "smoke: {:.0} allocations/s (debug build; not a figure), {:.2} writes and {:.0} bytes per allocation",
        report.allocs_per_s(),
        report.writes_per_alloc,
        report.bytes_per_alloc
    );
}
