//! A journal commit crashed at every possible call leaves the store exactly as before or
//! exactly as after, for readers at once and for the raw keys once it is finished.

use std::collections::BTreeMap;
use std::sync::Arc;

use keelson_discovery::conformance::CrashingKv;
use keelson_discovery::{Journal, KeyValue, KvCapabilities, MemoryKv, TxnOp};

type State = BTreeMap<String, Vec<u8>>;

async fn raw(kv: &dyn KeyValue, prefix: &str) -> State {
    kv.list(prefix).await.expect("list").entries.into_iter().map(|e| (e.key, e.value)).collect()
}

async fn read(journal: &Journal, prefix: &str) -> State {
    let r = journal.read(&[prefix.to_owned()]).await.expect("journal read");
    r.lists[0].entries.iter().map(|e| (e.key.clone(), e.value.clone())).collect()
}

/// A MemoryKv with small transaction limits, so that a commit of 40 writes takes the
/// chunked path (several chunks, several apply transactions).
#[derive(Debug, Default)]
struct SmallTxns(MemoryKv);

#[async_trait::async_trait]
impl KeyValue for SmallTxns {
    fn backend(&self) -> &'static str {
        "small-txns"
    }
    fn capabilities(&self) -> KvCapabilities {
        self.0.capabilities().with_txn_limits(8, 2048)
    }
    async fn get(&self, key: &str) -> keelson_discovery::Result<Option<keelson_discovery::KvEntry>> {
        self.0.get(key).await
    }
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<u64>) -> keelson_discovery::Result<u64> {
        self.0.put(key, value, lease).await
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expect: keelson_discovery::Expect,
        value: Vec<u8>,
        lease: Option<u64>,
    ) -> keelson_discovery::Result<u64> {
        self.0.compare_and_swap(key, expect, value, lease).await
    }
    async fn delete(&self, key: &str) -> keelson_discovery::Result<bool> {
        self.0.delete(key).await
    }
    async fn txn(&self, txn: keelson_discovery::Txn) -> keelson_discovery::Result<u64> {
        txn.validate("small-txns", &self.capabilities())?;
        self.0.txn(txn).await
    }
    async fn list(&self, prefix: &str) -> keelson_discovery::Result<keelson_discovery::KvList> {
        self.0.list(prefix).await
    }
    async fn watch(&self, prefix: &str, from: Option<u64>) -> keelson_discovery::Result<keelson_discovery::KvWatch> {
        self.0.watch(prefix, from).await
    }
    async fn grant_lease(&self, ttl: std::time::Duration) -> keelson_discovery::Result<u64> {
        self.0.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: u64) -> keelson_discovery::Result<()> {
        self.0.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: u64) -> keelson_discovery::Result<()> {
        self.0.revoke_lease(lease).await
    }
}

#[tokio::test]
async fn a_commit_crashed_at_any_call_is_all_or_nothing() {
    let mut crash_points_after = 0;
    for crash_at in 0.. {
        let store: Arc<dyn KeyValue> = Arc::new(SmallTxns::default());
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

        let crashing = Arc::new(CrashingKv::new(store.clone(), crash_at));
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
