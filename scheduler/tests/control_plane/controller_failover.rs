//! Two controller processes on a real etcd. The leader is stopped with SIGSTOP in the
//! middle of a write, past its lock's TTL; the other takes over and places the work;
//! the first is continued: its write is fenced off (nothing of it lands), it notices,
//! and it steps down.
//!
//! The controllers are this test binary run again with a role in the environment, so
//! they are real processes with their own lease renewals, paused by the kernel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_discovery::conformance::TestKv;
use keelson_discovery::{EtcdConfig, EtcdKv, KeyValue};
use keelson_scheduler::{ClusterStore, Controller, DesiredGroup, GroupSpec, Node, Resources, Strategy, TaskTemplate};

use keelson_testkit::child::{mark, role, RoleChild};

const TEST: &str = "controller_failover::a_controller_paused_past_its_ttl_is_fenced_off_and_steps_down";
const ETCD: &str = "KEELSON_TEST_CONTROLLER_ETCD";
const ROOT: &str = "failover";
const TTL: Duration = Duration::from_secs(2);

/// The child's part: lead once and say how it ended.
async fn controller_role(role: &str) {
    let url = std::env::var(ETCD).expect("etcd url in the environment");
    let etcd: Arc<dyn KeyValue> = Arc::new(EtcdKv::connect(EtcdConfig::new([url])).await.expect("connect"));
    // The slow one says when it is about to write, then waits a second: the window in
    // which the test pauses it.
    let kv: Arc<dyn KeyValue> = if role == "slow" {
        let kv = TestKv::new(etcd)
            .before_txn(|| {
                mark("txn-delayed");
                Box::pin(tokio::time::sleep(Duration::from_secs(1)))
            })
            .after_txn(|result| mark(format!("txn-result {}", if result.is_ok() { "ok".to_owned() } else { format!("{result:?}") })));
        Arc::new(kv)
    } else {
        etcd
    };
    let controller = Controller::new(ClusterStore::new(kv, ROOT)).with_lock_ttl(TTL);
    mark("started");
    let outcome = controller.lead(Duration::from_millis(200), std::future::pending()).await;
    mark(format!("outcome {outcome:?}"));
}

fn group() -> GroupSpec {
    GroupSpec {
        desired: DesiredGroup {
            job: "app".into(),
            group: "w".into(),
            version: 1,
            count: 3,
            resources: Resources::new(100, 16),
            ..DesiredGroup::default()
        },
        task: TaskTemplate { command: vec!["/bin/true".into()], ..TaskTemplate::default() },
        service: None,
        release: None,
    }
}

async fn alloc_ids(store: &ClusterStore) -> Vec<String> {
    let mut ids: Vec<String> = store.view().await.expect("view").allocations.into_iter().map(|a| a.id).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_paused_past_its_ttl_is_fenced_off_and_steps_down() {
    if let Some(role) = role() {
        return controller_role(&role).await;
    }
    let etcd = keelson_testkit::etcd::Etcd::start().unwrap_or_else(|e| panic!("etcd for this test: {e}"));
    let kv: Arc<dyn KeyValue> = Arc::new(EtcdKv::connect(EtcdConfig::new([etcd.client_url()])).await.expect("connect"));
    let store = ClusterStore::new(kv.clone(), ROOT);
    let _n1 = store.join(&Node::new("n1", Resources::new(4000, 4096)), Duration::from_secs(30)).await.expect("join");
    let _n2 = store.join(&Node::new("n2", Resources::new(4000, 4096)), Duration::from_secs(30)).await.expect("join");
    store.deploy(&group(), Strategy::default(), keelson_scheduler::Gates::default()).await.expect("deploy");

    // The first controller leads and starts writing its plan; it is paused right there.
    let first = RoleChild::start(TEST, "slow", &[(ETCD, etcd.client_url())]);
    first.wait_for("txn-delayed", Duration::from_secs(20));
    first.signal(nix::sys::signal::Signal::SIGSTOP);
    let paused = Instant::now();

    // The second takes over once the first's lock expires, and places the work.
    let second = RoleChild::start(TEST, "fast", &[(ETCD, etcd.client_url())]);
    second.wait_for("started", Duration::from_secs(20));
    let placed = loop {
        let ids = alloc_ids(&store).await;
        if ids.len() == 3 {
            break ids;
        }
        assert!(paused.elapsed() < TTL + Duration::from_secs(15), "the second controller did not take over: {ids:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(paused.elapsed() >= TTL, "it could only act once the first's lock expired");

    // The first wakes up: its write is refused by the fence, and it steps down.
    first.signal(nix::sys::signal::Signal::SIGCONT);
    let result = first.wait_for("txn-result", Duration::from_secs(10));
    assert!(result.contains("Fenced"), "the paused leader's write must be fenced off, got {result}");
    assert_eq!(first.wait_for("outcome", Duration::from_secs(10)), "outcome Lost");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(alloc_ids(&store).await, placed, "nothing of the paused leader's plan landed");
    assert_eq!(store.view().await.expect("view").allocations.len(), 3, "the group is at its count, not twice it");
}
