//! Behaviour of the embedded backends that the shared scenarios cannot force:
//! compaction, watch errors, and health checks against real sockets.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keelson_discovery::health::{CheckConfig, HealthChecker, Probe};
use keelson_discovery::{Discovery, Error, Health, KeyValue, KvDiscovery, MemoryKv, Query, Registration, ServiceName};

#[tokio::test]
async fn watch_from_a_compacted_revision_is_a_typed_error() {
    let kv = MemoryKv::with_history(3);
    let first = kv.put("k/a", b"1".to_vec(), None).await.expect("put");
    for i in 0..5u8 {
        kv.put("k/b", vec![i], None).await.expect("put");
    }
    match kv.watch("k/", Some(first)).await {
        Err(Error::Compacted { requested, oldest }) => assert_eq!((requested, oldest), (first, kv.revision() - 2)),
        Err(other) => panic!("expected Compacted, got {other}"),
        Ok(_) => panic!("expected Compacted, got a watch"),
    }
    // The documented recovery: list, then watch from the list's revision + 1.
    let list = kv.list("k/").await.expect("list");
    let mut w = kv.watch("k/", Some(list.revision + 1)).await.expect("watch after re-list");
    let rev = kv.put("k/c", b"x".to_vec(), None).await.expect("put");
    assert_eq!(w.next().await.expect("event").expect("ok").revision, rev);
}

#[tokio::test]
async fn discovery_watch_survives_compaction_without_emptying() {
    // History of 2 events: the watch's position is compacted away almost at once, so the
    // watch must re-list; it must never emit an empty set while the instance exists.
    let kv = Arc::new(MemoryKv::with_history(2));
    let d = KvDiscovery::new(kv.clone());
    let svc = ServiceName::new("compacted").expect("name");
    let _h = d.register(Registration::new(svc.clone(), "a", "127.0.0.1", 1)).await.expect("register");
    let mut w = d.watch(Query::service(svc.clone())).await.expect("watch");
    assert_eq!(w.next().await.expect("snapshot").instances.len(), 1);
    for i in 0..50 {
        kv.put(&format!("noise/{i}"), vec![0], None).await.expect("noise");
    }
    let _h2 = d.register(Registration::new(svc.clone(), "b", "127.0.0.1", 2)).await.expect("register");
    let snap = tokio::time::timeout(Duration::from_secs(5), w.next()).await.expect("snapshot in time").expect("open");
    assert_eq!(snap.instances.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), vec!["a", "b"]);
}

#[tokio::test]
async fn tcp_check_marks_dead_instance_critical_and_back() {
    let d: Arc<dyn Discovery> = Arc::new(KvDiscovery::memory());
    let svc = ServiceName::new("tcp-checked").expect("name");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let _h = d.register(Registration::new(svc.clone(), "a", "127.0.0.1", addr.port())).await.expect("register");
    let cfg = {
        let mut built = CheckConfig::default();
        built.interval = Duration::from_millis(100);
        built.timeout = Duration::from_millis(200);
        built.rise = 2;
        built.fall = 2;
        built
    };
    let _check = HealthChecker::spawn(d.clone(), svc.clone(), "a".into(), Probe::Tcp(addr), cfg).expect("check");
    drop(listener);
    wait_for_health(&*d, &svc, Health::Critical).await;
    let _listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
    wait_for_health(&*d, &svc, Health::Passing).await;
}

#[tokio::test]
async fn http_check_requires_a_good_status() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d: Arc<dyn Discovery> = Arc::new(KvDiscovery::memory());
    let svc = ServiceName::new("http-checked").expect("name");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let status = Arc::new(std::sync::atomic::AtomicU16::new(500));
    let server_status = status.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let code = server_status.load(std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes()).await;
            });
        }
    });
    let _h = d.register(Registration::new(svc.clone(), "a", "127.0.0.1", addr.port())).await.expect("register");
    let cfg = {
        let mut built = CheckConfig::default();
        built.interval = Duration::from_millis(100);
        built.timeout = Duration::from_millis(500);
        built.rise = 1;
        built.fall = 1;
        built
    };
    let _check =
        HealthChecker::spawn(d.clone(), svc.clone(), "a".into(), Probe::Http { addr, path: "/health".into() }, cfg).expect("check");
    wait_for_health(&*d, &svc, Health::Critical).await;
    status.store(204, std::sync::atomic::Ordering::SeqCst);
    wait_for_health(&*d, &svc, Health::Passing).await;
}

#[tokio::test]
async fn a_failing_instance_drops_out_within_two_intervals_and_returns_after_rise() {
    let d: Arc<dyn Discovery> = Arc::new(KvDiscovery::memory());
    let svc = ServiceName::new("timed").expect("name");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let _h = d.register(Registration::new(svc.clone(), "a", "127.0.0.1", addr.port())).await.expect("register");
    let interval = Duration::from_millis(300);
    let cfg = {
        let mut built = CheckConfig::default();
        built.interval = interval;
        built.timeout = Duration::from_millis(200);
        built.rise = 3;
        built.fall = 2;
        built
    };
    let _check = HealthChecker::spawn(d.clone(), svc.clone(), "a".into(), Probe::Tcp(addr), cfg).expect("check");
    tokio::time::sleep(interval * 4).await;
    drop(listener);
    let t0 = tokio::time::Instant::now();
    wait_for_health(&*d, &svc, Health::Critical).await;
    let dropped = t0.elapsed();
    // Two failed probes at most two intervals apart, plus scheduling slack.
    assert!(dropped <= interval * 2 + Duration::from_millis(250), "dropped out after {dropped:?}");
    assert!(d.instances(&Query::service(svc.clone()).healthy()).await.expect("lookup").is_empty());
    let _listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
    let t1 = tokio::time::Instant::now();
    wait_for_health(&*d, &svc, Health::Passing).await;
    let back = t1.elapsed();
    // Three passes are needed: not before the second interval, not much after the third.
    assert!(back >= interval * 2 - Duration::from_millis(50), "came back after {back:?}, before rise = 3 passes");
    assert!(back <= interval * 3 + Duration::from_millis(250), "came back after {back:?}");
}

async fn wait_for_health(d: &dyn Discovery, svc: &ServiceName, want: Health) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = d.instances(&Query::service(svc.clone())).await.expect("lookup")[0].health;
        if got == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "health stayed {got:?}, wanted {want:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Catalog records written by a newer keelson (fields this version does not know) are
/// read, and a health update writes them back with those fields and this schema.
#[tokio::test]
async fn catalog_records_keep_a_newer_writers_fields_through_a_health_update() {
    let kv = Arc::new(MemoryKv::new());
    let d = KvDiscovery::new(kv.clone());
    let web = ServiceName::new("web").expect("name");
    let _handle = d.register(Registration::new(web.clone(), "web-1", "127.0.0.1", 8080)).await.expect("register");
    let entry = kv.list("").await.expect("list").entries.into_iter().find(|e| e.key.ends_with("/web-1")).expect("the record");
    let mut record: serde_json::Value = serde_json::from_slice(&entry.value).expect("json");
    assert_eq!(record["schema"], 1, "records carry their schema version");
    record["zone_v2"] = "eu-1".into();
    record["schema"] = 2.into();
    kv.put(&entry.key, serde_json::to_vec(&record).expect("json"), entry.lease).await.expect("put");

    assert_eq!(d.instances(&Query::service(web.clone())).await.expect("read a newer record").len(), 1);
    d.set_health(&web, "web-1", Health::Critical).await.expect("health");
    let after: serde_json::Value = serde_json::from_slice(&kv.get(&entry.key).await.expect("get").expect("present").value).expect("json");
    assert_eq!(after["zone_v2"], "eu-1", "the newer field survived: {after}");
    assert_eq!(after["health"], "critical");
    assert_eq!(after["schema"], 1, "stamped by the writer that wrote it last");
}
