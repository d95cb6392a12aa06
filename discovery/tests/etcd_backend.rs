//! The etcd backend against real etcd (Debian's etcd-server, started by testkit):
//! both conformance suites, bytes, timeouts, compaction, and leader failover.
#![cfg(feature = "etcd")]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use keelson_discovery::{
    conformance, Discovery, Error, EtcdConfig, EtcdKv, KeyValue, KvDiscovery, KvEventKind, Query, Registration, ServiceName,
};
use keelson_testkit::etcd::{Etcd, EtcdCluster};

async fn connect(urls: Vec<String>) -> EtcdKv {
    EtcdKv::connect(EtcdConfig::new(urls)).await.expect("connects to etcd")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_passes_kv_conformance() {
    let etcd = Etcd::start().expect("etcd");
    conformance::kv_all_shared(std::sync::Arc::new(connect(vec![etcd.client_url()]).await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_passes_discovery_conformance() {
    let etcd = Etcd::start().expect("etcd");
    let kv = Arc::new(connect(vec![etcd.client_url()]).await);
    conformance::discovery_all(&KvDiscovery::new(kv)).await;
}

#[tokio::test]
async fn values_are_bytes_and_round_trip_exactly() {
    let etcd = Etcd::start().expect("etcd");
    let kv = connect(vec![etcd.client_url()]).await;
    let bytes: Vec<u8> = (0..=255u8).chain([0xff, 0xfe, 0x00, 0xc3]).collect();
    kv.put("bin/k", bytes.clone(), None).await.expect("put");
    assert_eq!(kv.get("bin/k").await.expect("get").expect("present").value, bytes);
    let mut w = kv.watch("bin/", None).await.expect("watch");
    kv.put("bin/k", vec![0x80, 0x81], None).await.expect("put");
    assert_eq!(w.next().await.expect("event").expect("ok").value, vec![0x80, 0x81]);
}

#[tokio::test]
async fn unreachable_etcd_fails_with_unavailable_within_the_timeout() {
    let dead = keelson_testkit::free_port().expect("port");
    let mut config = EtcdConfig::new([format!("http://127.0.0.1:{dead}")]);
    config.request_timeout = Duration::from_millis(500);
    config.connect_timeout = Duration::from_millis(500);
    let t0 = Instant::now();
    let result = match EtcdKv::connect(config).await {
        Err(e) => Err(e),
        Ok(kv) => kv.get("k").await.map(|_| ()),
    };
    assert!(t0.elapsed() < Duration::from_secs(3), "took {:?}", t0.elapsed());
    match result {
        Err(e @ Error::Unavailable { .. }) => assert!(e.is_retryable()),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(format!("{:?}", {
        let mut built = EtcdConfig::new(["x"]);
        built.credentials = Some(("root".into(), "s3cret".into()));
        built
    })
    .contains("<redacted>"));
}

#[tokio::test]
async fn compacted_revisions_are_typed_and_discovery_relists() {
    let etcd = Etcd::start().expect("etcd");
    let kv = Arc::new(connect(vec![etcd.client_url()]).await);
    let first = kv.put("c/a", b"1".to_vec(), None).await.expect("put");
    let mut last = first;
    for i in 0..5u8 {
        last = kv.put("c/b", vec![i], None).await.expect("put");
    }
    etcd.request("POST", "/v3/kv/compaction", &format!("{{\"revision\":\"{last}\",\"physical\":true}}")).expect("compact");
    match kv.watch("c/", Some(first)).await {
        Err(Error::Compacted { requested, oldest }) => {
            assert_eq!((requested, oldest), (first, last), "etcd keeps the compaction revision itself")
        }
        Err(e) => panic!("expected Compacted, got {e}"),
        Ok(_) => panic!("expected Compacted, got a watch"),
    }
    // Discovery over etcd keeps a correct view across compactions.
    let d = KvDiscovery::new(kv.clone());
    let svc = ServiceName::new("compacted").expect("name");
    let _a = d.register(Registration::new(svc.clone(), "a", "127.0.0.1", 1)).await.expect("register");
    let mut snaps = d.watch(Query::service(svc.clone())).await.expect("watch");
    assert_eq!(snaps.next().await.expect("snapshot").instances.len(), 1);
    let _b = d.register(Registration::new(svc, "b", "127.0.0.1", 2)).await.expect("register");
    let s = tokio::time::timeout(Duration::from_secs(5), snaps.next()).await.expect("in time").expect("open");
    assert_eq!(s.instances.len(), 2);
}

/// Kill the leader of a 3-member cluster while a watch is open and writes keep coming:
/// the watch loses no event, repeats none, and catches up within 2 s of each write;
/// writes through the surviving members succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_leader_loss_without_gaps_or_duplicates() {
    let mut cluster = EtcdCluster::start(3).expect("3-member etcd");
    let urls = cluster.client_urls();
    let writer = connect(urls.clone()).await;
    let watcher = connect(urls).await;
    let mut events = watcher.watch("fo/", None).await.expect("watch");
    let leader = cluster.leader().expect("leader");

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let writes = tokio::spawn(async move {
        for i in 0..60u32 {
            if i == 20 {
                // Signal the kill point; the test body kills the leader.
                let _ = tx.send(("KILL".into(), Instant::now()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let key = format!("fo/{i:03}");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match writer.put(&key, vec![1], None).await {
                    Ok(_) => break,
                    Err(e) if e.is_retryable() && Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                    Err(e) => panic!("write {key} failed: {e}"),
                }
            }
            let _ = tx.send((key, Instant::now()));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    });

    let mut written: Vec<(String, Instant)> = Vec::new();
    let mut seen: Vec<(String, u64, Instant)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 60 && Instant::now() < deadline {
        tokio::select! {
            Some((key, at)) = rx.recv() => {
                if key == "KILL" {
                    cluster.kill(leader);
                } else {
                    written.push((key, at));
                }
            }
            ev = tokio::time::timeout(Duration::from_secs(5), events.next()) => {
                let Ok(Some(ev)) = ev else { continue };
                let ev = ev.expect("watch yields events, not errors");
                assert_eq!(ev.kind, KvEventKind::Put);
                seen.push((ev.key, ev.revision, Instant::now()));
            }
        }
    }
    writes.await.expect("writer finished");
    while let Ok((key, at)) = rx.try_recv() {
        written.push((key, at));
    }
    let keys: Vec<&str> = seen.iter().map(|(k, _, _)| k.as_str()).collect();
    let expected: Vec<String> = (0..60).map(|i| format!("fo/{i:03}")).collect();
    assert_eq!(keys, expected.iter().map(String::as_str).collect::<Vec<_>>(), "every write seen once, in order");
    assert!(seen.windows(2).all(|w| w[0].1 < w[1].1), "revisions strictly increase");
    assert_eq!(seen.iter().map(|s| &s.0).collect::<BTreeSet<_>>().len(), 60, "no duplicates");
    let worst = written
        .iter()
        .filter_map(|(k, at)| seen.iter().find(|s| &s.0 == k).map(|s| s.2.saturating_duration_since(*at)))
        .max()
        .unwrap_or_default();
    assert!(worst <= Duration::from_secs(2), "an event arrived {worst:?} after its write");
}

/// A response past the client's limit is a typed, non-retryable error that says so (not
/// an empty "invalid request" that a loop would retry forever).
#[tokio::test]
async fn an_oversized_response_is_a_typed_error_and_the_limit_is_configurable() {
    let etcd = Etcd::start().expect("etcd");
    let small = EtcdKv::connect({
        let mut built = EtcdConfig::new([etcd.client_url()]);
        built.max_message_bytes = 1024 * 1024;
        built
    })
    .await
    .expect("connect");
    for i in 0..4 {
        small.put(&format!("big/{i}"), vec![b'x'; 400 * 1024], None).await.expect("put");
    }
    match small.list("big/").await {
        Err(e @ Error::ResponseTooLarge { .. }) => {
            assert!(!e.is_retryable());
            assert!(e.to_string().contains("too large"), "{e}");
        }
        other => panic!("1.6 MB past a 1 MiB limit must be ResponseTooLarge, got {other:?}"),
    }
    let default = connect(vec![etcd.client_url()]).await;
    assert_eq!(default.list("big/").await.expect("the default limit takes it").entries.len(), 4);
}

/// etcd stopped under an open watch: the raw watch reports the outage (once) and then
/// delivers the writes made after etcd came back; a discovery watch sends the last good
/// view with the error within 10 s, and a snapshot without it as soon as etcd is back,
/// with no change needed to clear it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_is_reported_on_watches_and_cleared_when_it_returns() {
    let mut etcd = Etcd::start().expect("etcd");
    let kv: Arc<dyn KeyValue> = Arc::new(connect(vec![etcd.client_url()]).await);
    let d = KvDiscovery::new(kv.clone());
    let svc = ServiceName::new("outage").expect("name");
    let _a = d.register(Registration::new(svc.clone(), "a", "127.0.0.1", 1)).await.expect("register");
    let mut snaps = d.watch(Query::service(svc.clone())).await.expect("watch");
    assert_eq!(snaps.next().await.expect("snapshot").instances.len(), 1);
    let mut raw = kv.watch("raw/", None).await.expect("raw watch");

    etcd.stop();
    let stopped = Instant::now();
    let snap = tokio::time::timeout(Duration::from_secs(10), snaps.next()).await.expect("the outage within 10 s").expect("open");
    assert!(snap.error.is_some(), "the snapshot says the view is stale");
    assert_eq!(snap.instances.len(), 1, "the last good view is kept");
    match tokio::time::timeout(Duration::from_secs(10), raw.next()).await.expect("the outage within 10 s") {
        Some(Err(e)) => assert!(e.is_retryable(), "an outage is retryable: {e}"),
        other => panic!("expected the outage on the raw watch, got {other:?}"),
    }
    eprintln!("outage reported {:?} after etcd stopped", stopped.elapsed());

    etcd.start_again().expect("etcd again");
    let snap = tokio::time::timeout(Duration::from_secs(15), snaps.next()).await.expect("recovery within 15 s").expect("open");
    assert!(snap.error.is_none(), "back: not stale any more, {:?}", snap.error);
    assert_eq!(snap.instances.len(), 1);
    kv.put("raw/after", b"1".to_vec(), None).await.expect("put after the outage");
    let ev = tokio::time::timeout(Duration::from_secs(10), raw.next()).await.expect("event after recovery").expect("open");
    assert_eq!(ev.expect("an event").key, "raw/after", "the raw watch resumed by itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_move_to_a_live_member_when_the_one_in_use_dies() {
    let mut cluster = EtcdCluster::start(3).expect("3-member etcd");
    let urls = cluster.client_urls();
    // A dead endpoint first: connecting skips it.
    let dead = format!("http://127.0.0.1:{}", keelson_testkit::free_port().expect("port"));
    let kv = connect([vec![dead], urls].concat()).await;
    kv.put("mv/before", b"1".to_vec(), None).await.expect("put on the first live member");
    let lease = kv.grant_lease(Duration::from_secs(10)).await.expect("lease");
    // The member in use is the first live one: kill it. Every request after its
    // connection is gone goes to another member, none fails.
    // (Once the others have a leader: if it led, writes wait for an election, which is
    // the watch test's subject, not this one's.)
    cluster.kill(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.leader().is_err() {
        assert!(Instant::now() < deadline, "no leader after the kill");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..20 {
        let key = format!("mv/{i}");
        kv.put(&key, vec![i as u8], None).await.unwrap_or_else(|e| panic!("put {key} after the member died: {e}"));
        assert_eq!(kv.get(&key).await.expect("get").map(|e| e.value), Some(vec![i as u8]));
    }
    kv.keep_alive(lease).await.expect("the lease is kept alive through another member");
    let list = kv.list("mv/").await.expect("list");
    assert_eq!(list.entries.len(), 21);
}
