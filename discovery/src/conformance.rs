//! Conformance scenarios every backend runs against a real server (feature `conformance`).
//!
//! Each scenario works under its own fresh prefix or service name, so scenarios can share
//! one server and run in parallel. They panic with a message on any deviation, which is
//! what a test wants. Call [`kv_all`] and [`discovery_all`] to run every scenario.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;

use crate::{Compare, Discovery, Error, Expect, Health, KeyValue, KvEventKind, Query, Registration, ServiceName, Txn};

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
    kv_lease_ttl_tells_the_time_since_renewal(kv).await;
    kv_rejects_bad_input(kv).await;
    kv_lock_is_exclusive(kv).await;
    kv_txn_all_or_nothing(kv).await;
    kv_txn_lease_fence(kv).await;
    kv_txn_limits(kv).await;
    kv_txn_concurrent_writers(kv).await;
    kv_list_pages(kv).await;
}

/// Every scenario that needs the store shared (`LockGuard` holds an `Arc`).
pub async fn kv_all_shared(kv: std::sync::Arc<dyn KeyValue>) {
    kv_all(kv.as_ref()).await;
    kv_lock_guard_holds_and_reports_loss(kv.clone()).await;
    kv_journal_commits_whole(kv).await;
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
        Err(Error::VersionMismatch { expected: None, actual: Some(actual), .. }) => assert_eq!(actual, v1),
        other => panic!("create of an existing key must conflict, got {other:?}"),
    }
    match kv.compare_and_swap(&key, Expect::Version(v1 + 1000), b"c".to_vec(), None).await {
        Err(Error::VersionMismatch { expected: Some(e), actual: Some(a), .. }) => assert_eq!((e, a), (v1 + 1000, v1)),
        other => panic!("stale version must conflict, got {other:?}"),
    }
    assert_eq!(kv.get(&key).await.unwrap().unwrap().value, b"a", "a lost CAS stores nothing");
    let v2 = kv.compare_and_swap(&key, Expect::Version(v1), b"d".to_vec(), None).await.unwrap();
    assert!(v2 > v1);
    assert_eq!(kv.get(&key).await.unwrap().unwrap().value, b"d");
    kv.delete(&key).await.unwrap();
    assert!(matches!(
        kv.compare_and_swap(&key, Expect::Version(v2), b"e".to_vec(), None).await,
        Err(Error::VersionMismatch { actual: None, .. })
    ));
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

/// A lease's TTL tells how long ago it was renewed (or `Unsupported`, said plainly);
/// a revoked lease is `NotFound`.
pub async fn kv_lease_ttl_tells_the_time_since_renewal(kv: &dyn KeyValue) {
    let ttl = kv.capabilities().min_lease_ttl.max(Duration::from_secs(3));
    let lease = kv.grant_lease(ttl).await.unwrap();
    let first = match kv.lease_ttl(lease).await {
        Err(Error::Unsupported { .. }) => {
            kv.revoke_lease(lease).await.unwrap();
            return;
        }
        other => other.unwrap(),
    };
    assert!(first.granted >= ttl && first.remaining <= first.granted, "{first:?} for a TTL of {ttl:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let later = kv.lease_ttl(lease).await.unwrap();
    assert!(later.since_renewal() >= Duration::from_secs(1), "time passes without renewal: {later:?}");
    kv.keep_alive(lease).await.unwrap();
    let renewed = kv.lease_ttl(lease).await.unwrap();
    assert!(renewed.since_renewal() < later.since_renewal(), "a renewal resets it: {renewed:?} after {later:?}");
    kv.revoke_lease(lease).await.unwrap();
    assert!(matches!(kv.lease_ttl(lease).await, Err(Error::NotFound { .. })), "a revoked lease is gone");
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
    let name = format!("{}/lock", unique("conf-lock"));
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
    assert!(matches!(kv.lock("", ttl, Duration::ZERO).await, Err(Error::InvalidInput { .. })));
}

/// A transaction's writes land together at one revision, or (a compare failing, a
/// lease missing) not at all, with an error naming the compare that failed.
pub async fn kv_txn_all_or_nothing(kv: &dyn KeyValue) {
    let p = unique("conf-txn");
    let (a, b, c) = (format!("{p}/a"), format!("{p}/b"), format!("{p}/c"));
    let va = kv.put(&a, b"a1".to_vec(), None).await.unwrap();
    let vb = kv.put(&b, b"b1".to_vec(), None).await.unwrap();
    let mut w = kv.watch(&format!("{p}/"), None).await.unwrap();
    let stale = Txn::new()
        .when(Compare::key(&a, Expect::Version(va)))
        .when(Compare::key(&b, Expect::Version(vb + 1000)))
        .put(&a, b"a2".to_vec(), None)
        .put(&c, b"c2".to_vec(), None)
        .delete(&b);
    match kv.txn(stale).await {
        Err(Error::VersionMismatch { key, expected, actual }) => {
            assert_eq!((key, expected, actual), (b.clone(), Some(vb + 1000), Some(vb)))
        }
        other => panic!("a failing compare must name its key, got {other:?}"),
    }
    let absent = Txn::new().when(Compare::key(&c, Expect::Version(1))).put(&a, b"a2".to_vec(), None);
    assert!(matches!(kv.txn(absent).await, Err(Error::VersionMismatch { actual: None, .. })), "a version compare on an absent key fails");
    let exists = Txn::new().when(Compare::key(&a, Expect::Absent)).put(&c, b"c2".to_vec(), None);
    assert!(matches!(kv.txn(exists).await, Err(Error::VersionMismatch { expected: None, actual: Some(_), .. })));
    let bad_lease = Txn::new().put(&c, b"c2".to_vec(), None).put(&a, b"a2".to_vec(), Some(987_654_321));
    assert!(matches!(kv.txn(bad_lease).await, Err(Error::NotFound { kind: "lease", .. })), "a missing lease is named");
    assert_eq!(kv.get(&a).await.unwrap().unwrap().value, b"a1", "a failed txn writes nothing");
    assert_eq!(kv.get(&b).await.unwrap().unwrap().value, b"b1");
    assert_eq!(kv.get(&c).await.unwrap(), None);

    let ok = Txn::new()
        .when(Compare::key(&a, Expect::Version(va)))
        .when(Compare::key(&b, Expect::Version(vb)))
        .when(Compare::key(&c, Expect::Absent))
        .put(&a, b"a2".to_vec(), None)
        .put(&c, b"c2".to_vec(), None)
        .delete(&b);
    let r = kv.txn(ok).await.unwrap();
    let (ea, ec) = (kv.get(&a).await.unwrap().unwrap(), kv.get(&c).await.unwrap().unwrap());
    assert_eq!((ea.value.as_slice(), ec.value.as_slice()), (&b"a2"[..], &b"c2"[..]));
    assert_eq!((ea.version, ec.version), (r, r), "every write of a txn lands at its revision");
    assert_eq!(kv.get(&b).await.unwrap(), None);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = next_event(&mut w).await;
        seen.push((e.key, e.revision, e.kind == KvEventKind::Put));
    }
    seen.sort();
    let want = vec![(a.clone(), r, true), (b.clone(), r, false), (c.clone(), r, true)];
    assert_eq!(seen, want, "watchers see the txn's writes at one revision");
    assert!(tokio::time::timeout(Duration::from_millis(200), w.next()).await.is_err(), "failed txns emitted no events");
    let twice = Txn::new().put(&a, b"x".to_vec(), None).delete(&a);
    assert!(matches!(kv.txn(twice).await, Err(Error::InvalidInput { .. })), "a key written twice in one txn is refused");
}

/// A compare on a lock's lease fences writes: they land while the lease holds the
/// key and fail with `Fenced` (writing nothing) once it does not.
pub async fn kv_txn_lease_fence(kv: &dyn KeyValue) {
    let p = unique("conf-fence");
    let (lock_key, data) = (format!("{p}/lock"), format!("{p}/data"));
    let ttl = kv.capabilities().min_lease_ttl.max(Duration::from_secs(5));
    let lock = kv.lock(&lock_key, ttl, Duration::from_secs(1)).await.unwrap();
    let fenced = |v: &'static [u8]| Txn::new().when(Compare::lease(&lock_key, lock.lease)).put(&data, v.to_vec(), None);
    kv.txn(fenced(b"1")).await.unwrap();
    assert_eq!(kv.get(&data).await.unwrap().unwrap().value, b"1");
    kv.unlock(&lock).await.unwrap();
    match kv.txn(fenced(b"2")).await {
        Err(Error::Fenced { key, lease }) => assert_eq!((key, lease), (lock_key.clone(), lock.lease)),
        other => panic!("a write fenced by a released lock must fail, got {other:?}"),
    }
    // Another holder now: the old lease still does not pass the fence.
    let next = kv.lock(&lock_key, ttl, Duration::from_secs(1)).await.unwrap();
    assert!(matches!(kv.txn(fenced(b"3")).await, Err(Error::Fenced { .. })));
    assert_eq!(kv.get(&data).await.unwrap().unwrap().value, b"1", "fenced writes store nothing");
    kv.unlock(&next).await.unwrap();
}

/// A transaction past the backend's stated limits is refused whole with `TxnTooLarge`.
pub async fn kv_txn_limits(kv: &dyn KeyValue) {
    let p = unique("conf-txn-limits");
    let caps = kv.capabilities();
    let mut many = Txn::new();
    for i in 0..=caps.max_txn_ops {
        many = many.put(format!("{p}/k{i}"), b"v".to_vec(), None);
    }
    match kv.txn(many).await {
        Err(Error::TxnTooLarge { ops, max_ops, .. }) => assert_eq!((ops, max_ops), (caps.max_txn_ops + 1, caps.max_txn_ops)),
        other => panic!("{} operations must be refused, got {other:?}", caps.max_txn_ops + 1),
    }
    let mut exact = Txn::new();
    for i in 0..caps.max_txn_ops {
        exact = exact.put(format!("{p}/k{i}"), b"v".to_vec(), None);
    }
    kv.txn(exact).await.unwrap();
    assert_eq!(kv.list(&format!("{p}/")).await.unwrap().entries.len(), caps.max_txn_ops, "a txn at the limit lands whole");
    let value = vec![7u8; crate::kv::MAX_VALUE_BYTES.min(caps.max_txn_bytes / 2)];
    let mut big = Txn::new();
    for i in 0..caps.max_txn_bytes / value.len() + 1 {
        big = big.put(format!("{p}/big{i}"), value.clone(), None);
    }
    assert!(matches!(kv.txn(big).await, Err(Error::TxnTooLarge { .. })), "bytes past the limit are refused");
    assert!(kv.list(&format!("{p}/big")).await.unwrap().entries.is_empty(), "nothing of a refused txn is stored");
}

/// Writers racing on overlapping keys with compare-all-then-write transactions lose no
/// update: each pair of counters moves together, and every success is counted once.
pub async fn kv_txn_concurrent_writers(kv: &dyn KeyValue) {
    const WRITERS: u64 = 4;
    const ROUNDS: u64 = 8;
    let p = unique("conf-txn-race");
    let keys: Vec<String> = (0..3).map(|i| format!("{p}/counter{i}")).collect();
    let writer = |w: u64| {
        let (k1, k2) = (keys[(w % 3) as usize].clone(), keys[((w + 1) % 3) as usize].clone());
        async move {
            let mut conflicts = 0u64;
            for _ in 0..ROUNDS {
                loop {
                    let (e1, e2) = (kv.get(&k1).await.unwrap(), kv.get(&k2).await.unwrap());
                    let count =
                        |e: &Option<crate::KvEntry>| e.as_ref().map_or(0, |e| String::from_utf8_lossy(&e.value).parse::<u64>().unwrap());
                    let expect = |e: &Option<crate::KvEntry>| e.as_ref().map_or(Expect::Absent, |e| Expect::Version(e.version));
                    let txn = Txn::new()
                        .when(Compare::key(&k1, expect(&e1)))
                        .when(Compare::key(&k2, expect(&e2)))
                        .put(&k1, (count(&e1) + 1).to_string().into_bytes(), None)
                        .put(&k2, (count(&e2) + 1).to_string().into_bytes(), None);
                    match kv.txn(txn).await {
                        Ok(_) => break,
                        Err(Error::VersionMismatch { .. }) => conflicts += 1,
                        Err(e) => panic!("racing txn failed: {e}"),
                    }
                }
            }
            conflicts
        }
    };
    let conflicts: u64 = futures::future::join_all((0..WRITERS).map(writer)).await.into_iter().sum();
    let mut counts = Vec::new();
    for k in &keys {
        counts.push(kv.get(k).await.unwrap().map_or(0, |e| String::from_utf8_lossy(&e.value).parse::<u64>().unwrap()));
    }
    // Writer w bumps counters w % 3 and (w + 1) % 3 ROUNDS times each.
    let mut want = [0u64; 3];
    for w in 0..WRITERS {
        want[(w % 3) as usize] += ROUNDS;
        want[((w + 1) % 3) as usize] += ROUNDS;
    }
    assert_eq!(counts, want.to_vec(), "no lost update ({conflicts} conflicts retried)");
}

/// A `LockGuard` keeps its lock past the TTL, fences writes while held, and reports the
/// loss (and its writes fail) once its lease is gone.
pub async fn kv_lock_guard_holds_and_reports_loss(kv: std::sync::Arc<dyn KeyValue>) {
    let p = unique("conf-guard");
    let (key, data) = (format!("{p}/lock"), format!("{p}/data"));
    let ttl = kv.capabilities().min_lease_ttl.max(Duration::from_secs(2));
    let guard = crate::LockGuard::acquire(kv.clone(), &key, ttl, Duration::from_secs(1)).await.unwrap();
    tokio::time::sleep(ttl * 3 / 2).await;
    assert!(guard.is_held(), "renewed past 1.5 TTL");
    assert_eq!(kv.get(&key).await.unwrap().map(|e| e.lease), Some(Some(guard.lease())), "the lock key is still there");
    match crate::LockGuard::acquire(kv.clone(), &key, ttl, Duration::from_millis(200)).await {
        Err(Error::Timeout { .. }) => {}
        other => panic!("a held guard keeps others out, got {other:?}"),
    }
    kv.txn(Txn::new().when(guard.fence()).put(&data, b"held".to_vec(), None)).await.unwrap();
    // Someone (an operator, or the store after a pause) takes the lease away.
    kv.revoke_lease(guard.lease()).await.unwrap();
    tokio::time::timeout(ttl, guard.lost()).await.expect("the loss is reported within a TTL");
    assert!(!guard.is_held());
    let late = kv.txn(Txn::new().when(guard.fence()).put(&data, b"late".to_vec(), None)).await;
    assert!(matches!(late, Err(Error::Fenced { .. })), "writes after the loss are fenced, got {late:?}");
    assert_eq!(kv.get(&data).await.unwrap().unwrap().value, b"held");
    // Released guards free the lock at once for the next holder.
    let next = crate::LockGuard::acquire(kv.clone(), &key, ttl, Duration::from_secs(1)).await.unwrap();
    assert!(next.revision() > guard.revision());
    drop(guard);
    next.release().await.unwrap();
    crate::LockGuard::acquire(kv.clone(), &key, ttl, Duration::from_millis(500)).await.expect("released at once").release().await.unwrap();
}

/// A journal commit of three transactions' worth of writes is seen whole or not at all by
/// readers racing it, and a commit based on a stale read conflicts on the head.
pub async fn kv_journal_commits_whole(kv: std::sync::Arc<dyn KeyValue>) {
    let p = unique("conf-journal");
    let journal = crate::Journal::new(kv.clone(), &format!("{p}/journal"));
    let data = format!("{p}/data/");
    let first = journal.read(std::slice::from_ref(&data)).await.unwrap();
    let old: Vec<crate::TxnOp> =
        (0..10).map(|i| crate::TxnOp::Put { key: format!("{data}old{i:04}"), value: b"old".to_vec(), lease: None }).collect();
    journal.commit(first.head, Vec::new(), old).await.unwrap();
    let base = journal.read(std::slice::from_ref(&data)).await.unwrap();
    assert_eq!(base.lists[0].entries.len(), 10);
    assert!(
        matches!(journal.commit(first.head, Vec::new(), Vec::new()).await, Err(Error::VersionMismatch { .. })),
        "a commit on a stale read conflicts on the head"
    );

    // Large: puts past three transactions, and deletes of every old key.
    let n = kv.capabilities().max_txn_ops * 3;
    let mut writes: Vec<crate::TxnOp> =
        (0..n).map(|i| crate::TxnOp::Put { key: format!("{data}new{i:04}"), value: vec![b'n'; 200], lease: None }).collect();
    writes.extend((0..10).map(|i| crate::TxnOp::Delete { key: format!("{data}old{i:04}") }));
    let done = std::sync::atomic::AtomicBool::new(false);
    let reader = async {
        let mut reads = 0;
        while !done.load(Ordering::SeqCst) || reads == 0 {
            let r = journal.read(std::slice::from_ref(&data)).await.unwrap();
            let new = r.lists[0].entries.iter().filter(|e| e.key.contains("/new")).count();
            let old = r.lists[0].entries.iter().filter(|e| e.key.contains("/old")).count();
            assert!((new, old) == (0, 10) || (new, old) == (n, 0), "a reader saw a partial commit: {new} new, {old} old");
            reads += 1;
            // An in-process store never makes a call wait: let the writer run.
            tokio::task::yield_now().await;
        }
        reads
    };
    let writer = async {
        let r = journal.commit(base.head, Vec::new(), writes).await;
        done.store(true, Ordering::SeqCst);
        r
    };
    let (reads, committed) = tokio::join!(reader, writer);
    committed.unwrap();
    let after = journal.read(std::slice::from_ref(&data)).await.unwrap();
    assert_eq!(after.lists[0].entries.len(), n, "every write applied ({reads} racing reads were whole)");
    assert!(after.lists[0].entries.iter().all(|e| e.version > 0), "applied entries have their revisions");
    assert!(!journal.finish_pending().await.unwrap(), "nothing left pending");
    assert_eq!(journal.collect_garbage().await.unwrap(), 0, "no chunk left behind");
}

/// Pages of a listing are sorted, at most `limit` long, and pick up after the given key;
/// a page at the first page's revision either serves that revision or says it cannot;
/// `list_paged` gives the whole prefix.
pub async fn kv_list_pages(kv: &dyn KeyValue) {
    let p = unique("conf-pages");
    for i in 0..25 {
        kv.put(&format!("{p}/k{i:02}"), vec![i], None).await.unwrap();
    }
    kv.put(&format!("{p}-other/x"), b"outside".to_vec(), None).await.unwrap();
    let prefix = format!("{p}/");
    let first = kv.list_page(&prefix, None, 10, None).await.unwrap();
    let keys = |l: &crate::KvList| l.entries.iter().map(|e| e.key.trim_start_matches(&prefix).to_owned()).collect::<Vec<_>>();
    assert_eq!(keys(&first), (0..10).map(|i| format!("k{i:02}")).collect::<Vec<_>>());
    let second = kv.list_page(&prefix, first.entries.last().map(|e| e.key.as_str()), 10, Some(first.revision)).await.unwrap();
    assert_eq!(keys(&second), (10..20).map(|i| format!("k{i:02}")).collect::<Vec<_>>());
    // A write after the first page: a page at its revision does not show it, or is refused.
    kv.put(&format!("{p}/k20a"), b"late".to_vec(), None).await.unwrap();
    match kv.list_page(&prefix, second.entries.last().map(|e| e.key.as_str()), 10, Some(first.revision)).await {
        Ok(third) => assert_eq!(keys(&third), (20..25).map(|i| format!("k{i:02}")).collect::<Vec<_>>(), "as of the first page"),
        Err(Error::Compacted { .. }) => {}
        Err(e) => panic!("a page at an old revision: {e}"),
    }
    let all = crate::list_paged(kv, &prefix).await.unwrap();
    assert_eq!(all.entries.len(), 26);
    assert!(all.entries.windows(2).all(|w| w[0].key < w[1].key), "sorted");
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

/// A `KeyValue` wrapper for tests that need a store to misbehave in one controlled
/// way, so each test does not hand-write its own forwarding wrapper:
/// - [`TestKv::crash_at`]: behaves like the inner store until its N-th call (counting
///   from 0), then fails every call with `Unavailable`, as a process killed at that
///   moment would: what it had sent stays sent, nothing after reaches the store;
/// - [`TestKv::with_txn_limits`]: reports (and enforces) smaller transaction limits;
/// - [`TestKv::before_txn`], [`TestKv::after_txn`]: hooks around each transaction (a
///   delay that opens a window for a test to pause the process in; its result);
/// - [`TestKv::writes`]: counts keys and bytes written.
pub struct TestKv {
    inner: std::sync::Arc<dyn KeyValue>,
    crash_at: u64,
    calls: AtomicU64,
    limits: Option<(usize, usize)>,
    before_txn: Option<TxnHook>,
    after_txn: Option<TxnResultHook>,
    written_keys: AtomicU64,
    written_bytes: AtomicU64,
}

/// What [`TestKv::before_txn`] runs.
pub type TxnHook = Box<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>;
/// What [`TestKv::after_txn`] runs.
pub type TxnResultHook = Box<dyn Fn(&crate::Result<u64>) + Send + Sync>;

impl std::fmt::Debug for TestKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestKv").field("inner", &self.inner).field("crash_at", &self.crash_at).field("limits", &self.limits).finish()
    }
}

impl TestKv {
    /// Wraps `inner`, changing nothing yet.
    pub fn new(inner: std::sync::Arc<dyn KeyValue>) -> Self {
        TestKv {
            inner,
            crash_at: u64::MAX,
            calls: AtomicU64::new(0),
            limits: None,
            before_txn: None,
            after_txn: None,
            written_keys: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
        }
    }

    /// Crashes at call `n` (see the type docs).
    pub fn crash_at(mut self, n: u64) -> Self {
        self.crash_at = n;
        self
    }

    /// Reports and enforces these transaction limits.
    pub fn with_txn_limits(mut self, max_ops: usize, max_bytes: usize) -> Self {
        self.limits = Some((max_ops, max_bytes));
        self
    }

    /// Runs `hook` before each transaction.
    pub fn before_txn(mut self, hook: impl Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync + 'static) -> Self {
        self.before_txn = Some(Box::new(hook));
        self
    }

    /// Runs `hook` with each transaction's result.
    pub fn after_txn(mut self, hook: impl Fn(&crate::Result<u64>) + Send + Sync + 'static) -> Self {
        self.after_txn = Some(Box::new(hook));
        self
    }

    /// Calls made so far (including failed ones).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Whether the crash point was reached.
    pub fn crashed(&self) -> bool {
        self.calls() > self.crash_at
    }

    /// Keys written (puts and deletes, in transactions or not) and their bytes, so far.
    pub fn writes(&self) -> (u64, u64) {
        (self.written_keys.load(Ordering::Relaxed), self.written_bytes.load(Ordering::Relaxed))
    }

    fn call(&self) -> crate::Result<()> {
        if self.calls.fetch_add(1, Ordering::SeqCst) >= self.crash_at {
            return Err(Error::Unavailable { backend: "crashing", reason: "the process crashed".into() });
        }
        Ok(())
    }

    fn wrote(&self, key: &str, value: usize) {
        self.written_keys.fetch_add(1, Ordering::Relaxed);
        self.written_bytes.fetch_add((key.len() + value) as u64, Ordering::Relaxed);
    }
}

#[async_trait::async_trait]
impl KeyValue for TestKv {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn capabilities(&self) -> crate::KvCapabilities {
        let caps = self.inner.capabilities();
        match self.limits {
            Some((ops, bytes)) => caps.with_txn_limits(ops, bytes),
            None => caps,
        }
    }
    async fn get(&self, key: &str) -> crate::Result<Option<crate::KvEntry>> {
        self.call()?;
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<crate::LeaseId>) -> crate::Result<u64> {
        self.call()?;
        self.wrote(key, value.len());
        self.inner.put(key, value, lease).await
    }
    async fn compare_and_swap(&self, key: &str, expect: Expect, value: Vec<u8>, lease: Option<crate::LeaseId>) -> crate::Result<u64> {
        self.call()?;
        self.wrote(key, value.len());
        self.inner.compare_and_swap(key, expect, value, lease).await
    }
    async fn delete(&self, key: &str) -> crate::Result<bool> {
        self.call()?;
        self.wrote(key, 0);
        self.inner.delete(key).await
    }
    async fn txn(&self, txn: Txn) -> crate::Result<u64> {
        self.call()?;
        if self.limits.is_some() {
            txn.validate(self.backend(), &self.capabilities())?;
        }
        if let Some(hook) = &self.before_txn {
            hook().await;
        }
        for op in &txn.ops {
            match op {
                crate::TxnOp::Put { key, value, .. } => self.wrote(key, value.len()),
                crate::TxnOp::Delete { key } => self.wrote(key, 0),
            }
        }
        let result = self.inner.txn(txn).await;
        if let Some(hook) = &self.after_txn {
            hook(&result);
        }
        result
    }
    async fn list(&self, prefix: &str) -> crate::Result<crate::KvList> {
        self.call()?;
        self.inner.list(prefix).await
    }
    async fn list_page(&self, prefix: &str, after: Option<&str>, limit: usize, revision: Option<u64>) -> crate::Result<crate::KvList> {
        // Forwarded, not the default (a whole listing cut down): paging must stay paging
        // through the wrapper, or a large prefix passes the client's message limit.
        self.call()?;
        self.inner.list_page(prefix, after, limit, revision).await
    }
    async fn watch(&self, prefix: &str, from: Option<u64>) -> crate::Result<crate::KvWatch> {
        self.call()?;
        self.inner.watch(prefix, from).await
    }
    async fn grant_lease(&self, ttl: Duration) -> crate::Result<crate::LeaseId> {
        self.call()?;
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: crate::LeaseId) -> crate::Result<()> {
        self.call()?;
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: crate::LeaseId) -> crate::Result<()> {
        self.call()?;
        self.inner.revoke_lease(lease).await
    }

    async fn lease_ttl(&self, lease: crate::LeaseId) -> crate::Result<crate::LeaseTtl> {
        self.call()?;
        self.inner.lease_ttl(lease).await
    }
}
