//! How `KvDiscovery` keeps each instance's liveness while the instances of a process share
//! one lease per TTL (one write per registration): on the in-process store and on a real
//! etcd.

use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::{Discovery, KeyValue, KvDiscovery, MemoryKv, Query, Registration, ServiceName};

const TTL: Duration = Duration::from_secs(2);

fn service(name: &str) -> ServiceName {
    ServiceName::new(name).expect("valid name")
}

fn key(svc: &ServiceName, id: &str) -> String {
    format!("keelson/services/{svc}/{id}")
}

async fn ids(d: &KvDiscovery, svc: &ServiceName) -> Vec<String> {
    d.instances(&Query::service(svc.clone())).await.expect("instances").into_iter().map(|i| i.id).collect()
}

/// Polls until `want` holds, failing after `within`.
async fn eventually(what: &str, within: Duration, mut want: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !want().await {
        assert!(tokio::time::Instant::now() < deadline, "{what} did not happen within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two registrations with the same TTL sit on one lease (so the second was one put, no
/// grant); another TTL gets its own.
async fn instances_of_one_process_share_a_lease_per_ttl(kv: Arc<dyn KeyValue>) {
    let d = KvDiscovery::new(kv.clone());
    let svc = service("shared");
    let _a = d.register(Registration::new(svc.clone(), "a", "127.0.0.1", 1).with_ttl(TTL)).await.expect("succeeds");
    let _b = d.register(Registration::new(svc.clone(), "b", "127.0.0.1", 2).with_ttl(TTL)).await.expect("succeeds");
    let _c = d.register(Registration::new(svc.clone(), "c", "127.0.0.1", 3).with_ttl(TTL * 2)).await.expect("succeeds");
    let lease = |id: &'static str| {
        let (kv, key) = (kv.clone(), key(&svc, id));
        async move { kv.get(&key).await.expect("succeeds").expect("record").lease.expect("on a lease") }
    };
    assert_eq!(lease("a").await, lease("b").await, "same TTL, same lease");
    assert_ne!(lease("a").await, lease("c").await, "another TTL, another lease");
}

/// Dropping one handle deletes that record at once (well before the TTL), and only it.
async fn a_dropped_handle_deletes_its_record_at_once(kv: Arc<dyn KeyValue>) {
    let d = KvDiscovery::new(kv);
    let svc = service("dropped");
    let kept =
        d.register(Registration::new(svc.clone(), "kept", "127.0.0.1", 1).with_ttl(Duration::from_secs(30))).await.expect("succeeds");
    let dropped =
        d.register(Registration::new(svc.clone(), "gone", "127.0.0.1", 2).with_ttl(Duration::from_secs(30))).await.expect("succeeds");
    drop(dropped);
    eventually("the dropped record's deletion", Duration::from_secs(5), async || ids(&d, &svc).await == ["kept"]).await;
    kept.deregister().await.expect("succeeds");
    assert!(ids(&d, &svc).await.is_empty());
}

/// A handle dropped and the same id registered again at once: the new record stays (the
/// drop's delete must not remove it), and so does one another process wrote over ours.
async fn a_release_never_removes_a_newer_registration(kv: Arc<dyn KeyValue>) {
    let d = KvDiscovery::new(kv.clone());
    let svc = service("again");
    for round in 0..20 {
        let old = d.register(Registration::new(svc.clone(), "x", "127.0.0.1", 1).with_ttl(TTL)).await.expect("succeeds");
        drop(old);
        let new = d.register(Registration::new(svc.clone(), "x", "127.0.0.1", 2).with_ttl(TTL)).await.expect("succeeds");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(ids(&d, &svc).await, ["x"], "round {round}: the newer registration was deleted");
        new.deregister().await.expect("succeeds");
    }
    // Another process (another KvDiscovery, its own lease) takes over the id.
    let other = KvDiscovery::new(kv);
    let mine = d.register(Registration::new(svc.clone(), "y", "127.0.0.1", 1).with_ttl(TTL)).await.expect("succeeds");
    let theirs = other.register(Registration::new(svc.clone(), "y", "127.0.0.1", 9).with_ttl(TTL)).await.expect("succeeds");
    mine.deregister().await.expect("succeeds");
    let left = d.instances(&Query::service(svc.clone())).await.expect("succeeds");
    assert_eq!(left.iter().map(|i| (i.id.as_str(), i.port)).collect::<Vec<_>>(), [("y", 9)], "the other process's record stays");
    theirs.deregister().await.expect("succeeds");
}

/// A process that stops renewing (its runtime gone, as when it dies) loses all its
/// instances together after the TTL.
async fn a_process_that_stops_renewing_loses_its_instances_after_the_ttl(kv: Arc<dyn KeyValue>) {
    let svc = service("died");
    let process = {
        let (kv, svc) = (kv.clone(), svc.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("succeeds");
            let handles = rt.block_on(async {
                let d = KvDiscovery::new(kv);
                let a = d.register(Registration::new(svc.clone(), "a", "127.0.0.1", 1).with_ttl(TTL)).await.expect("succeeds");
                let b = d.register(Registration::new(svc.clone(), "b", "127.0.0.1", 2).with_ttl(TTL)).await.expect("succeeds");
                (a, b)
            });
            // The "process" dies: its tasks stop, and its handles never run a release.
            drop(rt);
            std::mem::forget(handles);
        })
    };
    process.join().expect("succeeds");
    let d = KvDiscovery::new(kv);
    assert_eq!(ids(&d, &svc).await, ["a", "b"], "listed while the lease runs");
    let started = tokio::time::Instant::now();
    eventually("expiry of the dead process's instances", TTL * 4, async || ids(&d, &svc).await.is_empty()).await;
    assert!(started.elapsed() >= TTL / 4, "gone too soon to be the lease's expiry: {:?}", started.elapsed());
}

/// The shared lease is lost (revoked here, as a partition longer than the TTL would):
/// every live instance is written back on a new lease.
async fn a_lost_lease_is_replaced_and_every_instance_written_back(kv: Arc<dyn KeyValue>) {
    let d = KvDiscovery::new(kv.clone());
    let svc = service("lost");
    let _a = d.register(Registration::new(svc.clone(), "a", "127.0.0.1", 1).with_ttl(TTL)).await.expect("succeeds");
    let _b = d.register(Registration::new(svc.clone(), "b", "127.0.0.1", 2).with_ttl(TTL)).await.expect("succeeds");
    let lost = kv.get(&key(&svc, "a")).await.expect("succeeds").expect("succeeds").lease.expect("succeeds");
    kv.revoke_lease(lost).await.expect("succeeds");
    assert!(ids(&d, &svc).await.is_empty(), "revoking the lease deleted both records");
    eventually("both records back on a new lease", TTL * 3, async || ids(&d, &svc).await == ["a", "b"]).await;
    let now = kv.get(&key(&svc, "b")).await.expect("succeeds").expect("succeeds").lease.expect("succeeds");
    assert_ne!(now, lost);
}

async fn all(kv: Arc<dyn KeyValue>) {
    instances_of_one_process_share_a_lease_per_ttl(kv.clone()).await;
    a_dropped_handle_deletes_its_record_at_once(kv.clone()).await;
    a_release_never_removes_a_newer_registration(kv.clone()).await;
    a_process_that_stops_renewing_loses_its_instances_after_the_ttl(kv.clone()).await;
    a_lost_lease_is_replaced_and_every_instance_written_back(kv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_liveness_on_the_memory_store() {
    all(Arc::new(MemoryKv::new())).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_liveness_on_etcd() {
    let etcd = keelson_testkit::etcd::Etcd::start().expect("etcd");
    let kv = keelson_discovery::EtcdKv::connect(keelson_discovery::EtcdConfig::new([etcd.client_url()])).await.expect("etcd");
    all(Arc::new(kv)).await;
}
