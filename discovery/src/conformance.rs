//! Conformance scenarios every backend runs against a real server (feature `conformance`).
//!
//! Each scenario works under its own fresh prefix or service name, so scenarios can share
//! one server and run in parallel. They panic with a message on any deviation, which is
//! what a test wants. Call [`kv_all`] and [`discovery_all`] to run every scenario.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;

use crate::{Discovery, Error, Expect, Health, KeyValue, KvEventKind, Query, Registration, ServiceName};

/// A name unique to this process and call, usable as a key segment and a DNS label.
pub fn unique(base: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{base}-{}-{}-{}", std::process::id(), nanos % 100_000, COUNTER.fetch_add(1, Ordering::Relaxed))
}

async fn next_event(w: &mut crate::KvWatch) -> crate::KvEvent {
    tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("watch event within 5 s")
        .expect("watch stream open")
        .expect("watch event, not error")
}

/// Every `KeyValue` scenario.
pub async fn kv_all(kv: &dyn KeyValue) {
    kv_put_get_delete(kv).await;
    kv_compare_and_swap(kv).await;
    kv_list_prefix(kv).await;
    kv_watch_from_revision(kv).await;
    kv_watch_resume_without_duplicates(kv).await;
    kv_lease_expiry_deletes_and_notifies(kv).await;
    kv_keep_alive_and_revoke(kv).await;
    kv_rejects_bad_input(kv).await;
    kv_lock_is_exclusive(kv).await;
}

/// Put, get, overwrite, delete; revisions increase.
pub async fn kv_put_get_delete(kv: &dyn KeyValue) {
    let key = format!("{}/k", unique("conf-basic"));
    assert_eq!(kv.get(&key).await.unwrap(), None);
    let r1 = kv.put(&key, b"one".to_vec(), None).await.unwrap();
    let e1 = kv.get(&key).await.unwrap().expect("present after put");
    assert_eq!((e1.value.as_slice(), e1.version, e1.create_revision), (&b"one"[..], r1, r1));
    let r2 = kv.put(&key, b"two".to_vec(), None).await.unwrap();
    assert!(r2 > r1, "revision increases: {r1} then {r2}");
    let e2 = kv.get(&key).await.unwrap().expect("present");
    assert_eq!((e2.value.as_slice(), e2.version, e2.create_revision), (&b"two"[..], r2, r1));
    assert!(kv.delete(&key).await.unwrap(), "delete of a present key says true");
    assert!(!kv.delete(&key).await.unwrap(), "delete of an absent key says false");
    assert_eq!(kv.get(&key).await.unwrap(), None);
}

/// Create-if-absent, version CAS, and typed conflicts that store nothing.
pub async fn kv_compare_and_swap(kv: &dyn KeyValue) {
    let key = format!("{}/k", unique("conf-cas"));
    let v1 = kv.compare_and_swap(&key, Expect::Absent, b"a".to_vec(), None).await.unwrap();
    match kv.compare_and_swap(&key, Expect::Absent, b"b".to_vec(), None).await {
        Err(Error::Conflict { expected: None, actual: Some(actual), .. }) => assert_eq!(actual, v1),
        other => panic!("create of an existing key must conflict, got {other:?}"),
    }
    match kv.compare_and_swap(&key, Expect::Version(v1 + 1000), b"c".to_vec(), None).await {
        Err(Error::Conflict { expected: Some(e), actual: Some(a), .. }) => assert_eq!((e, a), (v1 + 1000, v1)),
        other => panic!("stale version must conflict, got {other:?}"),
    }
    assert_eq!(kv.get(&key).await.unwrap().unwrap().value, b"a", "a lost CAS stores nothing");
    let v2 = kv.compare_and_swap(&key, Expect::Version(v1), b"d".to_vec(), None).await.unwrap();
    assert!(v2 > v1);
    assert_eq!(kv.get(&key).await.unwrap().unwrap().value, b"d");
    kv.delete(&key).await.unwrap();
    assert!(matches!(kv.compare_and_swap(&key, Expect::Version(v2), b"e".to_vec(), None).await, Err(Error::Conflict { actual: None, .. })));
}

/// Prefix listing is exact and sorted, with a revision to watch from.
pub async fn kv_list_prefix(kv: &dyn KeyValue) {
    let p = unique("conf-list");
    for k in ["a/2", "a/1", "ab/1", "b/1"] {
        kv.put(&format!("{p}/{k}"), k.as_bytes().to_vec(), None).await.unwrap();
    }
    let list = kv.list(&format!("{p}/a/")).await.unwrap();
    let keys: Vec<&str> = list.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, vec![format!("{p}/a/1"), format!("{p}/a/2")]);
    assert!(list.entries.iter().all(|e| e.version <= list.revision), "list revision covers its entries");
    assert_eq!(kv.list(&format!("{p}/zzz/")).await.unwrap().entries, vec![]);
}

/// A watch from a past revision replays history in order, then follows live changes.
pub async fn kv_watch_from_revision(kv: &dyn KeyValue) {
    let p = unique("conf-watch");
    let r1 = kv.put(&format!("{p}/x"), b"1".to_vec(), None).await.unwrap();
    kv.put(&format!("{p}/y"), b"2".to_vec(), None).await.unwrap();
    kv.delete(&format!("{p}/x")).await.unwrap();
    kv.put(&format!("{p}-other/z"), b"not under the prefix".to_vec(), None).await.unwrap();
    if !kv.capabilities().watch_from_revision {
        // No history: a past revision with changes since must be reported, not papered over.
        assert!(
            matches!(kv.watch(&format!("{p}/"), Some(r1)).await, Err(Error::Compacted { .. })),
            "a backend without history reports Compacted"
        );
        let mut w = kv.watch(&format!("{p}/"), None).await.unwrap();
        let live = kv.put(&format!("{p}/z"), b"3".to_vec(), None).await.unwrap();
        let e = next_event(&mut w).await;
        assert_eq!((e.kind, e.key.as_str(), e.revision), (KvEventKind::Put, format!("{p}/z").as_str(), live));
        return;
    }
    let mut w = kv.watch(&format!("{p}/"), Some(r1)).await.unwrap();
    let seen: Vec<(KvEventKind, String)> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let e = next_event(&mut w).await;
            v.push((e.kind, e.key.trim_start_matches(&format!("{p}/")).to_owned()));
        }
        v
    };
    assert_eq!(seen, vec![(KvEventKind::Put, "x".into()), (KvEventKind::Put, "y".into()), (KvEventKind::Delete, "x".into())]);
    let live = kv.put(&format!("{p}/z"), b"3".to_vec(), None).await.unwrap();
    let e = next_event(&mut w).await;
    assert_eq!((e.kind, e.key.as_str(), e.revision, e.value.as_slice()), (KvEventKind::Put, format!("{p}/z").as_str(), live, &b"3"[..]));
}

/// Resuming from the last seen revision + 1 delivers the rest once, in order.
pub async fn kv_watch_resume_without_duplicates(kv: &dyn KeyValue) {
    let p = unique("conf-resume");
    let mut w = kv.watch(&format!("{p}/"), None).await.unwrap();
    let mut revs = Vec::new();
    for i in 0..3 {
        revs.push(kv.put(&format!("{p}/k{i}"), vec![i], None).await.unwrap());
    }
    let first = next_event(&mut w).await;
    assert_eq!(first.revision, revs[0]);
    drop(w);
    for i in 3..5 {
        revs.push(kv.put(&format!("{p}/k{i}"), vec![i], None).await.unwrap());
    }
    if !kv.capabilities().watch_from_revision {
        assert!(matches!(kv.watch(&format!("{p}/"), Some(first.revision + 1)).await, Err(Error::Compacted { .. })));
        return;
    }
    let mut w = kv.watch(&format!("{p}/"), Some(first.revision + 1)).await.unwrap();
    let mut got = Vec::new();
    for _ in 1..5 {
        got.push(next_event(&mut w).await.revision);
    }
    assert_eq!(got, revs[1..].to_vec(), "every later event exactly once, in order");
    assert!(tokio::time::timeout(Duration::from_millis(200), w.next()).await.is_err(), "no duplicate after the last event");
}

/// A lease not kept alive expires by itself: its keys are deleted and watchers see it.
pub async fn kv_lease_expiry_deletes_and_notifies(kv: &dyn KeyValue) {
    let p = unique("conf-lease");
    let key = format!("{p}/k");
    let ttl = kv.capabilities().min_lease_ttl.max(Duration::from_secs(2));
    let lease = kv.grant_lease(ttl).await.unwrap();
    kv.put(&key, b"v".to_vec(), Some(lease)).await.unwrap();
    assert_eq!(kv.get(&key).await.unwrap().unwrap().lease, Some(lease));
    let mut w = kv.watch(&format!("{p}/"), None).await.unwrap();
    let e = tokio::time::timeout(ttl * 3 + Duration::from_secs(4), w.next()).await.expect("lease expiry within 3 TTL").unwrap().unwrap();
    assert_eq!((e.kind, e.key.as_str()), (KvEventKind::Delete, key.as_str()));
    assert_eq!(kv.get(&key).await.unwrap(), None);
    assert!(matches!(kv.keep_alive(lease).await, Err(Error::NotFound { .. })), "an expired lease cannot be renewed");
}

/// Keep-alive holds a lease past its TTL; revoke deletes its keys at once.
pub async fn kv_keep_alive_and_revoke(kv: &dyn KeyValue) {
    let key = format!("{}/k", unique("conf-keep"));
    let ttl = kv.capabilities().min_lease_ttl.max(Duration::from_secs(2));
    let lease = kv.grant_lease(ttl).await.unwrap();
    kv.put(&key, b"v".to_vec(), Some(lease)).await.unwrap();
    for _ in 0..6 {
        tokio::time::sleep(ttl * 3 / 10).await;
        kv.keep_alive(lease).await.unwrap();
    }
    assert!(kv.get(&key).await.unwrap().is_some(), "kept alive past 1.5 TTL");
    kv.revoke_lease(lease).await.unwrap();
    assert_eq!(kv.get(&key).await.unwrap(), None, "revoke deletes the lease's keys");
    assert!(matches!(kv.revoke_lease(lease).await, Err(Error::NotFound { .. })));
}

/// Bad input gets a typed error and stores nothing.
pub async fn kv_rejects_bad_input(kv: &dyn KeyValue) {
    let key = format!("{}/k", unique("conf-bad"));
    assert!(matches!(kv.put("", b"v".to_vec(), None).await, Err(Error::InvalidInput { field: "key", .. })));
    let big = vec![0u8; crate::kv::MAX_VALUE_BYTES + 1];
    let err = kv.put(&key, big, None).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { field: "value", .. }), "{err}");
    assert!(err.to_string().contains(&key), "error names the key: {err}");
    assert!(matches!(kv.put(&key, b"v".to_vec(), Some(987_654_321)).await, Err(Error::NotFound { kind: "lease", .. })));
    assert!(matches!(kv.grant_lease(Duration::from_millis(10)).await, Err(Error::InvalidInput { field: "lease ttl", .. })));
    assert_eq!(kv.get(&key).await.unwrap(), None, "nothing partial stored");
}

/// A lock is held by one caller at a time; the next holder gets a larger fencing revision.
pub async fn kv_lock_is_exclusive(kv: &dyn KeyValue) {
    let name = unique("conf-lock");
    let ttl = kv.capabilities().min_lease_ttl.max(Duration::from_secs(5));
    let first = kv.lock(&name, ttl, Duration::from_secs(1)).await.unwrap();
    match kv.lock(&name, ttl, Duration::from_millis(300)).await {
        Err(Error::Timeout { operation: "lock", .. }) => {}
        other => panic!("second lock must time out while held, got {other:?}"),
    }
    let (second, ()) = tokio::join!(kv.lock(&name, ttl, Duration::from_secs(5)), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        kv.unlock(&first).await.unwrap();
    });
    let second = second.unwrap();
    assert!(second.revision > first.revision, "fencing revision grows");
    kv.unlock(&second).await.unwrap();
    assert!(matches!(kv.lock("bad/name", ttl, Duration::ZERO).await, Err(Error::InvalidInput { .. })));
}

/// Every `Discovery` scenario for backends that can register.
pub async fn discovery_all(d: &dyn Discovery) {
    discovery_register_and_lookup(d).await;
    discovery_health_filtering(d).await;
    discovery_deregister(d).await;
    discovery_ttl_expiry(d).await;
    discovery_watch_snapshots(d).await;
    discovery_rejects_bad_input(d).await;
}

fn service(base: &str) -> ServiceName {
    ServiceName::new(unique(base)).unwrap()
}

/// Registered instances are found by service and tag, sorted by id.
pub async fn discovery_register_and_lookup(d: &dyn Discovery) {
    let svc = service("reg");
    let _a = d.register(Registration::new(svc.clone(), "b", "127.0.0.1", 8081).with_tag("blue").with_meta("v", "1")).await.unwrap();
    let _b = d.register(Registration::new(svc.clone(), "a", "127.0.0.1", 8080).with_tag("green")).await.unwrap();
    let all = d.instances(&Query::service(svc.clone())).await.unwrap();
    assert_eq!(all.iter().map(|i| (i.id.as_str(), i.port)).collect::<Vec<_>>(), vec![("a", 8080), ("b", 8081)]);
    assert_eq!(all[1].meta.get("v").map(String::as_str), Some("1"));
    let blue = d.instances(&Query::service(svc.clone()).with_tag("blue")).await.unwrap();
    assert_eq!(blue.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), vec!["b"]);
    assert!(d.services().await.unwrap().contains(&svc));
}

/// Critical instances drop out of healthy lookups and come back when passing.
pub async fn discovery_health_filtering(d: &dyn Discovery) {
    let svc = service("health");
    let _a = d.register(Registration::new(svc.clone(), "a", "127.0.0.1", 1)).await.unwrap();
    let _b = d.register(Registration::new(svc.clone(), "b", "127.0.0.1", 2).with_initial_health(Health::Critical)).await.unwrap();
    assert_eq!(healthy(d, svc.clone()).await, vec!["a"]);
    d.set_health(&svc, "a", Health::Critical).await.unwrap();
    d.set_health(&svc, "b", Health::Warning).await.unwrap();
    assert_eq!(healthy(d, svc.clone()).await, vec!["b"], "warning counts as healthy, critical does not");
    assert_eq!(d.instances(&Query::service(svc.clone())).await.unwrap().len(), 2, "unfiltered lookup still sees both");
    d.set_health(&svc, "a", Health::Passing).await.unwrap();
    assert_eq!(healthy(d, svc).await, vec!["a", "b"]);
}

async fn healthy(d: &dyn Discovery, svc: ServiceName) -> Vec<String> {
    d.instances(&Query::service(svc).healthy()).await.unwrap().into_iter().map(|i| i.id).collect()
}

async fn next_snapshot(w: &mut crate::SnapshotStream) -> crate::Snapshot {
    tokio::time::timeout(Duration::from_secs(5), w.next()).await.expect("snapshot within 5 s").expect("stream open")
}

/// Deregistration removes at once; unknown instances are typed NotFound.
pub async fn discovery_deregister(d: &dyn Discovery) {
    let svc = service("dereg");
    let h = d.register(Registration::new(svc.clone(), "a", "127.0.0.1", 1)).await.unwrap();
    let _keep = d.register(Registration::new(svc.clone(), "b", "127.0.0.1", 2)).await.unwrap();
    h.deregister().await.unwrap();
    assert_eq!(d.instances(&Query::service(svc.clone())).await.unwrap().into_iter().map(|i| i.id).collect::<Vec<_>>(), vec!["b"]);
    d.deregister(&svc, "b").await.unwrap();
    assert!(matches!(d.deregister(&svc, "b").await, Err(Error::NotFound { .. })));
    assert!(matches!(d.set_health(&svc, "nope", Health::Passing).await, Err(Error::NotFound { .. })));
}

/// A registration whose handle is dropped leaves healthy lookups after its TTL; a held one
/// does not. (Backends may keep the expired instance listed as critical for a while, as
/// Consul does for at least a minute; healthy lookups are what consumers rely on.)
pub async fn discovery_ttl_expiry(d: &dyn Discovery) {
    let svc = service("ttl");
    let kept = d.register(Registration::new(svc.clone(), "kept", "127.0.0.1", 1).with_ttl(Duration::from_secs(2))).await.unwrap();
    let dropped = d.register(Registration::new(svc.clone(), "dropped", "127.0.0.1", 2).with_ttl(Duration::from_secs(2))).await.unwrap();
    drop(dropped);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ids: Vec<String> = d.instances(&Query::service(svc.clone()).healthy()).await.unwrap().into_iter().map(|i| i.id).collect();
        if ids == ["kept"] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "dropped registration still present after 10 s: {ids:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(d.instances(&Query::service(svc).healthy()).await.unwrap().len(), 1, "held registration outlives 1.5 TTL");
    kept.deregister().await.unwrap();
}

/// A watch emits the current snapshot, then one per change, with growing versions.
pub async fn discovery_watch_snapshots(d: &dyn Discovery) {
    let svc = service("watch");
    let _a = d.register(Registration::new(svc.clone(), "a", "127.0.0.1", 1)).await.unwrap();
    let mut w = d.watch(Query::service(svc.clone()).healthy()).await.unwrap();
    let s0 = next_snapshot(&mut w).await;
    assert_eq!(s0.instances.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), vec!["a"]);
    let _b = d.register(Registration::new(svc.clone(), "b", "127.0.0.1", 2)).await.unwrap();
    let s1 = next_snapshot(&mut w).await;
    assert_eq!(s1.instances.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), vec!["a", "b"]);
    assert!(s1.version > s0.version);
    d.set_health(&svc, "a", Health::Critical).await.unwrap();
    let s2 = next_snapshot(&mut w).await;
    assert_eq!(s2.instances.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), vec!["b"], "healthy watch drops critical instances");
    assert!(s2.version > s1.version);
}

/// Bad registrations get typed errors and register nothing.
pub async fn discovery_rejects_bad_input(d: &dyn Discovery) {
    let svc = service("bad");
    for (reg, field) in [
        (Registration::new(svc.clone(), "", "127.0.0.1", 1), "instance id"),
        (Registration::new(svc.clone(), "a/b", "127.0.0.1", 1), "instance id"),
        (Registration::new(svc.clone(), "a", "", 1), "address"),
        (Registration::new(svc.clone(), "a", "127.0.0.1", 0), "port"),
        (Registration::new(svc.clone(), "a", "127.0.0.1", 1).with_ttl(Duration::ZERO), "lease ttl"),
        (Registration::new(svc.clone(), "a", "127.0.0.1", 1).with_tag(""), "tag"),
        (Registration::new(svc.clone(), "a", "127.0.0.1", 1).with_tag("x".repeat(256)), "tag"),
        ((0..65).fold(Registration::new(svc.clone(), "a", "127.0.0.1", 1), |r, i| r.with_tag(format!("t{i}"))), "tags"),
        (Registration::new(svc.clone(), "a", "127.0.0.1", 1).with_meta("k", "v".repeat(513)), "meta value"),
        (Registration::new(svc.clone(), "a", "127.0.0.1", 1).with_meta("", "v"), "meta key"),
    ] {
        match d.register(reg).await {
            Err(Error::InvalidInput { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected InvalidInput for {field}, got {other:?}"),
        }
    }
    assert!(d.instances(&Query::service(svc)).await.unwrap().is_empty(), "nothing registered");
}

/// Every scenario for read-only backends (DNS): `service` must already hold exactly the
/// instances with `expected_ids` (set up in the backend's source of truth), all healthy.
pub async fn discovery_read_only_all(d: &dyn Discovery, service: &ServiceName, expected_ids: &[&str]) {
    let caps = d.capabilities();
    assert!(!caps.register && !caps.set_health, "a read-only backend says so in its capabilities");
    let mut ids: Vec<String> = d.instances(&Query::service(service.clone())).await.unwrap().into_iter().map(|i| i.id).collect();
    ids.sort();
    let mut want: Vec<String> = expected_ids.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    assert_eq!(ids, want, "lookup returns exactly the published instances");
    assert!(d.instances(&Query::service(service.clone()).healthy()).await.unwrap().iter().all(|i| i.health.is_healthy()));
    let absent = ServiceName::new(unique("absent")).unwrap();
    assert!(d.instances(&Query::service(absent)).await.unwrap().is_empty(), "an unknown service is empty, not an error");
    let mut w = d.watch(Query::service(service.clone())).await.unwrap();
    let first = next_snapshot(&mut w).await;
    assert_eq!(first.instances.len(), expected_ids.len(), "a watch starts with the current view");
    assert!(first.error.is_none());
    for result in [
        d.register(Registration::new(service.clone(), "x", "127.0.0.1", 1)).await.map(|_| ()),
        d.deregister(service, "x").await,
        d.set_health(service, "x", Health::Critical).await,
    ] {
        assert!(matches!(result, Err(Error::Unsupported { .. })), "writes are Unsupported, got {result:?}");
    }
}
