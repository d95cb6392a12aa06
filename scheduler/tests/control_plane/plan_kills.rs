//! A process committing a 10,000-allocation plan to a real etcd is killed with SIGKILL
//! at random moments, ten times. After each kill, readers see none of the plan or all of
//! it, the independent validator finds the stored state sound, and the next controller
//! pass (collect_garbage) leaves the raw keys exactly as readers saw them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_discovery::{EtcdConfig, EtcdKv, KeyValue};
use keelson_scheduler::{AllocRecord, AllocStatus, ClusterStore};
use keelson_testkit::child::{mark, role, RoleChild};

const TEST: &str = "plan_kills::a_large_plan_commit_killed_at_random_moments_is_all_or_nothing";
const ETCD: &str = "KEELSON_TEST_KILL_ETCD";
const ROOT: &str = "KEELSON_TEST_KILL_ROOT";
const NODES: usize = 1000;
const PER_NODE: usize = 10;
const KILLS: usize = 10;

fn alloc(node: usize, k: usize) -> AllocRecord {
    AllocRecord {
        id: format!("a-{node}-{k}"),
        job: "big".into(),
        group: "g".into(),
        version: 1,
        node: format!("n{node}"),
        status: AllocStatus::Pending,
        ports: vec![20000 + k as u16],
        since_ms: 0,
        volumes: Vec::new(),
        resources: Default::default(),
        restarts: 0,
        slot: None,
        address: None,
        prefer_address: None,
    }
}

async fn connect(url: String) -> Arc<dyn KeyValue> {
    Arc::new(EtcdKv::connect(EtcdConfig::new([url])).await.expect("connect to etcd"))
}

/// The child's part: one plan of NODES × PER_NODE allocations, committed.
async fn committer() {
    let kv = connect(std::env::var(ETCD).expect("etcd url")).await;
    let store = ClusterStore::new(kv, std::env::var(ROOT).expect("root"));
    let mut plan = store.view().await.expect("view").plan();
    for node in 0..NODES {
        for k in 0..PER_NODE {
            plan.put(alloc(node, k));
        }
    }
    mark("committing");
    store.commit(&plan).await.expect("commit");
    mark("committed");
}

/// A small, seedable generator: the kill moments need not be good randomness, only spread.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_plan_commit_killed_at_random_moments_is_all_or_nothing() {
    if role().is_some() {
        return committer().await;
    }
    let etcd = keelson_testkit::etcd::Etcd::start().unwrap_or_else(|e| panic!("etcd for this test: {e}"));
    let kv = connect(etcd.client_url()).await;
    let want = NODES * PER_NODE;

    // An uninterrupted commit first: it says how long one takes, so kills land inside it.
    let child = RoleChild::start(TEST, "commit", &[(ETCD, etcd.client_url()), (ROOT, "kill/calibrate".into())]);
    child.wait_for("committing", Duration::from_secs(60));
    let began = Instant::now();
    child.wait_for("committed", Duration::from_secs(120));
    let full = began.elapsed();
    let store = ClusterStore::new(kv.clone(), "kill/calibrate");
    assert_eq!(store.view().await.expect("view").allocations.len(), want);

    let mut seed = u64::from(std::process::id()) | 1;
    let mut outcomes = [0usize; 2];
    for round in 0..KILLS {
        let root = format!("kill/round{round}");
        let mut child = RoleChild::start(TEST, "commit", &[(ETCD, etcd.client_url()), (ROOT, root.clone())]);
        child.wait_for("committing", Duration::from_secs(60));
        let at = Duration::from_millis(next_random(&mut seed) % (full.as_millis() as u64 * 12 / 10 + 1));
        tokio::time::sleep(at).await;
        child.kill();

        let store = ClusterStore::new(kv.clone(), root.as_str());
        let seen = store.view().await.expect("view").allocations.len();
        assert!(seen == 0 || seen == want, "round {round}, killed after {at:?}: readers saw {seen} of {want} allocations");
        outcomes[usize::from(seen == want)] += 1;
        let check = store.check_stored().await.expect("check");
        assert!(check.violations.is_empty(), "round {round}: {:?}", check.violations);
        // The next controller pass finishes a published plan or drops an unpublished one.
        store.collect_garbage().await.expect("collect");
        let check = store.check_stored().await.expect("check");
        assert!(check.violations.is_empty() && !check.pending_plan, "round {round} after the pass: {check:?}");
        assert_eq!(check.allocations, seen, "round {round}: the raw keys agree with what readers saw");
        assert!(kv.list(&format!("{root}/journal/chunks/")).await.expect("list").entries.is_empty(), "round {round}: chunks left");
    }
    eprintln!("{KILLS} kills in a {full:?} commit: {} before the publish, {} after", outcomes[0], outcomes[1]);
}
