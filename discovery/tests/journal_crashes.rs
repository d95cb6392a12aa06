//! A journal commit crashed at every possible call leaves the store exactly as before or
//! exactly as after, for readers at once and for the raw keys once it is finished.

use std::collections::BTreeMap;
use std::sync::Arc;

use keelson_discovery::conformance::TestKv;
use keelson_discovery::{Journal, KeyValue, MemoryKv, TxnOp};

type State = BTreeMap<String, Vec<u8>>;

async fn raw(kv: &dyn KeyValue, prefix: &str) -> State {
    kv.list(prefix).await.expect("list").entries.into_iter().map(|e| (e.key, e.value)).collect()
}

async fn read(journal: &Journal, prefix: &str) -> State {
    let r = journal.read(&[prefix.to_owned()]).await.expect("journal read");
    r.lists[0].entries.iter().map(|e| (e.key.clone(), e.value.clone())).collect()
}

#[tokio::test]
async fn a_commit_crashed_at_any_call_is_all_or_nothing() {
    let mut crash_points_after = 0;
    for crash_at in 0.. {
        // Small transaction limits: a commit of 40 writes takes the chunked path
        // (several chunks, several apply transactions).
        let store: Arc<dyn KeyValue> = Arc::new(TestKv::new(Arc::new(MemoryKv::new())).with_txn_limits(8, 2048));
        let journal = Journal::new(store.clone(), "j");
        let seed: Vec<TxnOp> = (0..5).map(|i| TxnOp::Put { key: format!("d/old{i}"), value: b"old".to_vec(), lease: None }).collect();
        let head = journal.read(&["d/".into()]).await.unwrap().head;
        journal.commit(head, Vec::new(), seed).await.unwrap();
        let before = raw(store.as_ref(), "d/").await;
        let mut writes: Vec<TxnOp> =
            (0..40).map(|i| TxnOp::Put { key: format!("d/new{i:02}"), value: vec![b'n'; 60], lease: None }).collect();
        writes.extend((0..5).map(|i| TxnOp::Delete { key: format!("d/old{i}") }));
        let mut after = State::new();
        for op in &writes {
            if let TxnOp::Put { key, value, .. } = op {
                after.insert(key.clone(), value.clone());
            }
        }

        let crashing = Arc::new(TestKv::new(store.clone()).crash_at(crash_at));
        let dying = Journal::new(crashing.clone(), "j");
        let head = journal.read(&["d/".into()]).await.unwrap().head;
        let result = dying.commit(head, Vec::new(), writes).await;
        if !crashing.crashed() {
            result.unwrap();
            assert_eq!(read(&journal, "d/").await, after);
            assert_eq!(raw(store.as_ref(), "d/").await, after);
            assert!(crash_at > 5, "the commit took several calls: {crash_at}");
            break;
        }
        // Readers at once: before or after, never between.
        let seen = read(&journal, "d/").await;
        assert!(seen == before || seen == after, "crash at call {crash_at}: a reader saw a partial commit ({} keys)", seen.len());
        if seen == after {
            crash_points_after += 1;
        }
        // Whoever comes next finishes a published commit; then the raw keys agree.
        journal.finish_pending().await.unwrap();
        journal.collect_garbage().await.unwrap();
        assert_eq!(raw(store.as_ref(), "d/").await, seen, "crash at call {crash_at}: finishing changed what readers saw");
        assert!(raw(store.as_ref(), "j/chunks/").await.is_empty(), "crash at call {crash_at}: chunks left behind");
    }
    assert!(crash_points_after > 0, "some crash points fell after the publish");
}

/// A write too large for any one transaction of the backend is refused before anything
/// is published: a published set that can never be applied would wedge every commit.
#[tokio::test]
async fn a_write_no_transaction_can_hold_is_refused_before_publishing() {
    let store: Arc<dyn KeyValue> = Arc::new(TestKv::new(Arc::new(MemoryKv::new())).with_txn_limits(8, 2048));
    let journal = Journal::new(store.clone(), "j");
    let head = journal.read(&["d/".into()]).await.unwrap().head;
    let mut writes: Vec<TxnOp> = (0..20).map(|i| TxnOp::Put { key: format!("d/k{i:02}"), value: vec![1; 50], lease: None }).collect();
    writes.push(TxnOp::Put { key: "d/huge".into(), value: vec![2; 3000], lease: None });
    assert!(matches!(journal.commit(head, Vec::new(), writes).await, Err(keelson_discovery::Error::TxnTooLarge { .. })));
    assert!(raw(store.as_ref(), "").await.is_empty(), "nothing written: no chunk, no head, no data");
}
