//! The watch-fed `ClusterCache`: it shows what a fresh read of the store shows (after
//! commits, status reports, node loss and a re-list past compaction), plans made from
//! it are as sound as plans made from a fresh view when planners race, and a write set
//! left half-applied by a dead committer holds plans back until it is finished.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::conformance::TestKv;
use keelson_discovery::{EtcdConfig, EtcdKv, KeyValue, MemoryKv};
use keelson_scheduler::{AllocRecord, AllocStatus, ClusterCache, ClusterStore, ClusterView, DesiredGroup, Node, Resources};

/// What a view shows, in a form two views can be compared in: nodes, then allocations
/// as `node/id status`, then volumes as `name@node`.
fn summary(view: &ClusterView) -> [BTreeSet<String>; 3] {
    [
        view.nodes.iter().map(|n| n.id.clone()).collect(),
        view.allocations.iter().map(|a| format!("{}/{} {:?}", a.node, a.id, a.status)).collect(),
        view.volumes.iter().map(|v| format!("{}@{}", v.name, v.node)).collect(),
    ]
}

/// Waits until the cache shows what the store shows; fails after 10 s with both.
async fn converges(cache: &ClusterCache, store: &ClusterStore) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let want = summary(&store.view().await.expect("store view"));
        let got = summary(&cache.view().await.expect("cache view"));
        if got == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the cache did not converge:\n cache {got:?}\n store {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn group(job: &str, count: u32, cpu: u64) -> DesiredGroup {
    DesiredGroup { job: job.into(), group: "g".into(), version: 1, count, resources: Resources::new(cpu, 64), ..DesiredGroup::default() }
}

async fn follows_the_store(kv: Arc<dyn KeyValue>) {
    let store = ClusterStore::new(kv, "cache-test");
    let ttl = Duration::from_secs(30);
    let nodes: Vec<Node> = (0..4).map(|i| Node::new(format!("n{i}"), Resources::new(1_000, 4_096))).collect();
    let members = store.join_all(&nodes[..3], ttl).await.expect("join");
    let cache = ClusterCache::start(&store).await.expect("cache");
    converges(&cache, &store).await;

    // A plan committed through the store, not the cache.
    let pass = store.reschedule(&[group("web", 6, 100)]).await.expect("reschedule");
    assert_eq!(pass.placed.len(), 6);
    converges(&cache, &store).await;

    // A node joins; an agent reports; a plan through the cache stops one allocation.
    let late = store.join(&nodes[3], ttl).await.expect("join");
    let failed = pass.placed[1].clone();
    store.report(&AllocRecord { status: AllocStatus::Running, ..pass.placed[0].clone() }).await.expect("report");
    store.report(&AllocRecord { status: AllocStatus::Failed, ..failed.clone() }).await.expect("report");
    converges(&cache, &store).await;
    let pass = store.reschedule_with(&cache, &[group("web", 6, 100)]).await.expect("reschedule from the cache");
    assert_eq!(pass.stopped, vec![failed.id], "the failed allocation stops");
    assert_eq!(pass.placed.len(), 1, "and is replaced");
    converges(&cache, &store).await;

    // Node loss: its allocations go, replaced elsewhere.
    late.leave().await.expect("leave");
    members.leave().await.expect("leave");
    let back = store.join(&Node::new("n9", Resources::new(1_000, 4_096)), ttl).await.expect("a new node");
    converges(&cache, &store).await;
    let pass = store.reschedule_with(&cache, &[group("web", 6, 100)]).await.expect("reschedule after loss");
    assert_eq!(pass.lost.len(), 6, "allocations of the lost nodes are removed");
    assert_eq!(pass.placed.len(), 6, "and placed on the live node");
    converges(&cache, &store).await;
    let check = store.check_stored().await.expect("check");
    assert!(check.violations.is_empty(), "{:?}", check.violations);
    drop(back);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_follows_the_store_in_memory() {
    follows_the_store(Arc::new(MemoryKv::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_follows_the_store_on_etcd() {
    let etcd = keelson_testkit::etcd::Etcd::start().unwrap_or_else(|e| panic!("etcd for this test: {e}"));
    let kv = EtcdKv::connect(EtcdConfig::new([etcd.client_url()])).await.expect("connect");
    follows_the_store(Arc::new(kv)).await;
}

/// Planners race on tight nodes, each through its own cache (one controller leads at a
/// time, but a deposed one may still be planning): every group is placed whole, and the
/// stored state holds no overcommitted node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planners_racing_through_caches_never_overcommit() {
    let etcd = keelson_testkit::etcd::Etcd::start().unwrap_or_else(|e| panic!("etcd for this test: {e}"));
    let kv: Arc<dyn KeyValue> = Arc::new(EtcdKv::connect(EtcdConfig::new([etcd.client_url()])).await.expect("connect"));
    let store = ClusterStore::new(kv.clone(), "race");
    // 20 nodes of 10 slots; 4 planners × 10 jobs × 4 tasks = 160 of the 200 slots.
    let nodes: Vec<Node> = (0..20).map(|i| Node::new(format!("n{i:02}"), Resources::new(1_000, 10_240))).collect();
    let _members = store.join_all(&nodes, Duration::from_secs(30)).await.expect("join");
    let mut planners = Vec::new();
    for p in 0..4 {
        let store = ClusterStore::new(kv.clone(), "race");
        planners.push(tokio::spawn(async move {
            let cache = ClusterCache::start(&store).await.expect("cache");
            let mut replans = 0;
            for j in 0..10 {
                let pass = store.reschedule_with(&cache, &[group(&format!("p{p}-j{j}"), 4, 100)]).await.expect("reschedule");
                assert_eq!(pass.placed.len(), 4, "planner {p} job {j} placed whole");
                replans += pass.replans;
            }
            replans
        }));
    }
    let mut replans = 0;
    for p in planners {
        replans += p.await.expect("planner");
    }
    let check = store.check_stored().await.expect("check");
    assert_eq!(check.allocations, 160);
    assert!(check.violations.is_empty(), "{:?}", check.violations);
    eprintln!("{replans} plans were made again after losing a race");
}

/// A watch that falls behind the store's history lists again and carries on.
#[tokio::test(flavor = "current_thread")]
async fn a_cache_lists_again_when_its_watch_falls_past_compaction() {
    // 16 events of history: the cache's watch cannot run while this test does not yield
    // (one thread), so 1,500 writes in a row leave it far behind.
    let kv: Arc<dyn KeyValue> = Arc::new(MemoryKv::with_history(16));
    let store = ClusterStore::new(kv, "compacted");
    let _members = store.join_all(&[Node::new("n1", Resources::new(100_000, 100_000))], Duration::from_secs(30)).await.expect("join");
    let pass = store.reschedule(&[group("web", 3, 100)]).await.expect("reschedule");
    let cache = ClusterCache::start(&store).await.expect("cache");
    for i in 0..1_500u64 {
        let a = &pass.placed[(i % 3) as usize];
        store.report(&AllocRecord { status: AllocStatus::Running, since_ms: i, ..a.clone() }).await.expect("report");
    }
    converges(&cache, &store).await;
    assert_eq!(cache.relists(), 1, "listed once more, after the watch reported the compaction");
    let pass = store.reschedule_with(&cache, &[group("web", 4, 100)]).await.expect("reschedule from the relisted cache");
    assert_eq!(pass.placed.len(), 1);
}

/// A committer that died after publishing a large plan, before applying it: a plan
/// through a cache waits, finishes the write set, and plans on top of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_applied_plan_is_finished_before_the_cache_plans() {
    let mut found = false;
    for crash_at in 0..200 {
        let inner: Arc<dyn KeyValue> = Arc::new(MemoryKv::new());
        let store = ClusterStore::new(inner.clone(), "pending");
        let nodes: Vec<Node> = (0..5).map(|i| Node::new(format!("n{i}"), Resources::new(100_000, 100_000))).collect();
        let _members = store.join_all(&nodes, Duration::from_secs(30)).await.expect("join");
        // 300 allocations: more than one transaction holds, so published, then applied.
        let dying = ClusterStore::new(Arc::new(TestKv::new(inner.clone()).crash_at(crash_at)), "pending");
        // A committer that dies after publishing reports success (the plan is
        // committed); its write set stays pending until someone finishes it.
        let result = dying.reschedule(&[group("big", 300, 10)]).await;
        if !store.check_stored().await.expect("check").pending_plan {
            if result.is_ok() {
                break;
            }
            continue;
        }
        found = true;
        let cache = ClusterCache::start(&store).await.expect("cache");
        let pass = store.reschedule_with(&cache, &[group("big", 300, 10), group("small", 2, 10)]).await.expect("plans after finishing it");
        assert_eq!(pass.placed.len(), 2, "the 300 published allocations were seen: only the small group is placed");
        let check = store.check_stored().await.expect("check");
        assert!(!check.pending_plan);
        assert_eq!(check.allocations, 302);
        assert!(check.violations.is_empty(), "{:?}", check.violations);
        break;
    }
    assert!(found, "some crash point left a published, unapplied plan");
}
