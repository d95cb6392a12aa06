//! Each trait, implemented outside its crate (`keelson-conformance-outside`), passes that
//! trait's conformance suite; the call counters show the suites ran through the wrapper.

use std::sync::Arc;

use keelson_conformance_outside::{
    OutsideBlobStore, OutsideDiscovery, OutsideDriver, OutsideKv, OutsideNetwork, OutsideRouter, OutsideScheduler, OutsideSink,
    OutsideSource, OutsideVolumes,
};
use keelson_logship::{Record, Stream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_key_value_store_passes_kv_conformance() {
    let kv = Arc::new(OutsideKv::default());
    keelson_discovery::conformance::kv_all_shared(kv.clone()).await;
    assert!(kv.calls.count() > 100, "the suite went through the wrapper: {}", kv.calls.count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_discovery_passes_discovery_conformance() {
    let d = OutsideDiscovery::default();
    keelson_discovery::conformance::discovery_all(&d).await;
    assert!(d.calls.count() > 10);
}

#[test]
fn an_outside_scheduler_passes_scheduler_conformance() {
    let s = OutsideScheduler::default();
    keelson_scheduler::conformance::scheduler_all(&s);
    assert!(s.calls.count() > 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_driver_passes_driver_conformance() {
    let d = OutsideDriver::default();
    keelson_scheduler::conformance::driver_all(&d, &|id, script| keelson_scheduler::TaskSpec::new(id, ["/bin/sh", "-c", script])).await;
    assert!(d.calls.count() > 10);
}

#[tokio::test]
async fn outside_volumes_pass_volume_conformance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = OutsideVolumes::new(dir.path()).expect("root");
    keelson_scheduler::conformance::volumes_all(&v).await;
    assert!(v.calls.count() > 10);
}

#[tokio::test]
async fn an_outside_router_passes_router_conformance() {
    let r = OutsideRouter::default();
    keelson_routing::conformance::router_all(&r).await;
    assert!(r.calls.count() > 3);
}

#[tokio::test]
async fn an_outside_network_driver_passes_network_conformance() {
    let n = OutsideNetwork::default();
    let fixture = keelson_netplumb::conformance::Fixture {
        network: &|name, _| keelson_netplumb::NetworkSpec::new(name),
        endpoint: &|net, id| keelson_netplumb::EndpointSpec::new(net, id),
    };
    keelson_netplumb::conformance::network_all(&n, &fixture).await;
    assert!(n.calls.count() > 3);
}

#[tokio::test]
async fn an_outside_blob_store_passes_store_conformance() {
    let s = OutsideBlobStore::default();
    keelson_registry::conformance::store_all(&s).await;
    assert!(s.calls.count() > 5);
}

#[tokio::test]
async fn an_outside_source_passes_source_conformance() {
    let expected: Vec<Record> = (0..20).map(|i| Record::now("conf-svc", "i0", Stream::Stdout, format!("line {i}"))).collect();
    let mut source = OutsideSource::new(expected.clone());
    keelson_logship::conformance::source_all(&mut source, &expected).await;
    assert!(source.calls.count() >= 1);
    assert_eq!(source.acked, 20, "the acknowledgement reached the source");
    let saved = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let open = || -> Box<dyn keelson_logship::Source> { Box::new(OutsideSource::with_checkpoint(expected.clone(), saved.clone())) };
    keelson_logship::conformance::source_resumes_after_its_checkpoint(&open, &expected).await;
}

#[tokio::test]
async fn an_outside_sink_passes_sink_conformance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = OutsideSink::new(dir.path()).expect("sink");
    let root = dir.path().to_owned();
    let read_back = move |service: &str| -> Vec<Record> {
        std::fs::read_to_string(root.join(format!("{service}.log")))
            .unwrap_or_default()
            .lines()
            .map(|l| Record::from_json(l).expect("every line is a record"))
            .collect()
    };
    keelson_logship::conformance::sink_all(&sink, &read_back).await;
    assert!(sink.calls.count() > 2);
}
