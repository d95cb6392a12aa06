//! Plan commits that die half-way: a store that fails from its N-th call on, for every N
//! through a commit of a plan too large for one transaction, leaves the cluster state
//! exactly as before or exactly as after, for readers at once and in the raw keys once
//! the next controller pass has finished what was published.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::conformance::TestKv;
use keelson_discovery::{KeyValue, MemoryKv};
use keelson_scheduler::{AllocRecord, AllocStatus, ClusterStore, Node, Resources};

fn alloc(id: String, node: &str, port: u16) -> AllocRecord {
    AllocRecord {
        id,
        job: "web".into(),
        group: "http".into(),
        version: 2,
        node: node.into(),
        status: AllocStatus::Pending,
        ports: vec![port],
        since_ms: 0,
        volumes: Vec::new(),
        resources: Default::default(),
        restarts: 0,
        slot: None,
        address: None,
        prefer_address: None,
    }
}

async fn ids(store: &ClusterStore) -> BTreeSet<String> {
    store.view().await.expect("view").allocations.into_iter().map(|a| a.id).collect()
}

async fn raw_alloc_keys(kv: &dyn KeyValue) -> usize {
    kv.list("c/allocs/").await.expect("list").entries.len()
}

#[tokio::test]
async fn a_plan_commit_crashed_at_any_call_is_all_or_nothing() {
    let mut outcomes = (0, 0);
    for crash_at in 0.. {
        let kv: Arc<dyn KeyValue> = Arc::new(MemoryKv::new());
        let store = ClusterStore::new(kv.clone(), "c");
        let ttl = Duration::from_secs(60);
        let mut members = Vec::new();
        for n in ["n1", "n2", "n3"] {
            members.push(store.join(&Node::new(n, Resources::new(100_000, 100_000)), ttl).await.expect("join"));
        }
        // Version 1 runs two allocations; one is reported running by its agent.
        let mut seed = store.view().await.expect("view").plan();
        seed.put(alloc("old-1".into(), "n1", 20000));
        seed.put(alloc("old-2".into(), "n2", 20000));
        store.commit(&seed).await.expect("seed");
        store.report(&AllocRecord { status: AllocStatus::Running, ..alloc("old-1".into(), "n1", 20000) }).await.expect("report");
        let before = ids(&store).await;

        // Version 2: 300 allocations (past etcd's 128 operations), the old ones removed.
        let view = store.view().await.expect("view");
        let mut plan = view.plan();
        for i in 0..300u16 {
            plan.put(alloc(format!("new-{i:03}"), ["n1", "n2", "n3"][usize::from(i % 3)], 21000 + i));
        }
        plan.delete("n1", "old-1");
        plan.delete("n2", "old-2");
        let after: BTreeSet<String> = (0..300).map(|i| format!("new-{i:03}")).collect();

        let crashing = Arc::new(TestKv::new(kv.clone()).crash_at(crash_at));
        let dying = ClusterStore::new(crashing.clone(), "c");
        let result = dying.commit(&plan).await;
        if !crashing.crashed() {
            result.expect("the commit without a crash");
            assert_eq!(ids(&store).await, after);
            assert!(crash_at > 4, "a chunked commit takes several calls, not {crash_at}");
            break;
        }
        let seen = ids(&store).await;
        assert!(seen == before || seen == after, "crash at call {crash_at}: readers saw {} allocations", seen.len());
        if seen == after {
            outcomes.1 += 1;
        } else {
            outcomes.0 += 1;
        }
        // The next controller pass finishes what was published and drops what was not.
        store.collect_garbage().await.expect("collect");
        assert_eq!(ids(&store).await, seen, "crash at call {crash_at}: finishing changed the state readers saw");
        assert_eq!(raw_alloc_keys(kv.as_ref()).await, seen.len(), "crash at call {crash_at}: raw keys agree");
        assert!(kv.list("c/journal/chunks/").await.expect("list").entries.is_empty(), "crash at call {crash_at}: chunks left");
        assert!(
            kv.list("c/status/").await.expect("list").entries.iter().all(|e| seen.iter().any(|id| e.key.ends_with(id.as_str()))),
            "crash at call {crash_at}: a status key outlived its allocation"
        );
    }
    assert!(outcomes.0 > 0 && outcomes.1 > 0, "crashes fell both before and after the publish: {outcomes:?}");
}
