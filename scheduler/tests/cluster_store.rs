//! Cluster state through `KeyValue`, on the embedded `MemoryKv` and on a real etcd:
//! optimistic plan commits (of two conflicting plans one commits and the other, stale,
//! writes nothing and re-plans), and node loss (a node that stops renewing its lease has
//! its allocations re-placed on the others within the lease TTL + 2 s).

use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_discovery::{EtcdConfig, EtcdKv, KeyValue, MemoryKv};
use keelson_scheduler::{
    AllocRecord, AllocStatus, ClusterStore, DesiredGroup, Error, HostVolume, Node, Resources, VolumeAccess, VolumeMount, VolumeRequest,
};

fn alloc(id: &str, node: &str) -> AllocRecord {
    AllocRecord {
        id: id.into(),
        job: "web".into(),
        group: "http".into(),
        version: 1,
        node: node.into(),
        status: AllocStatus::Pending,
        ports: Vec::new(),
        since_ms: 0,
        volumes: Vec::new(),
        resources: Default::default(),
        restarts: 0,
        slot: None,
        address: None,
        prefer_address: None,
    }
}

fn web(count: u32) -> DesiredGroup {
    DesiredGroup {
        job: "web".into(),
        group: "http".into(),
        version: 1,
        count,
        resources: Resources::new(100, 64),
        ports: 1,
        volumes: Vec::new(),
        ..DesiredGroup::default()
    }
}

async fn conflicting_plans_one_commits_the_other_replans(kv: Arc<dyn KeyValue>) {
    let store = ClusterStore::new(kv, "test/plans");
    let (first, second) = (store.view().await.expect("view"), store.view().await.expect("view"));
    let mut a = first.plan();
    a.put(alloc("a1", "n1"));
    let mut b = second.plan();
    b.put(alloc("b1", "n2"));
    b.put(alloc("b2", "n1"));
    store.commit(&a).await.expect("the first plan commits");
    assert!(matches!(store.commit(&b).await, Err(Error::Stale { .. })), "the second saw n1 before the first changed it");
    let after = store.view().await.expect("view");
    let ids: Vec<&str> = after.allocations.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["a1"], "the stale plan wrote nothing, not even on n2");
    // Re-planned from a fresh view, it commits.
    let mut again = after.plan();
    again.put(alloc("b1", "n2"));
    again.put(alloc("b2", "n1"));
    store.commit(&again).await.expect("the re-plan commits");
    // Plans on different nodes do not conflict.
    let (v1, v2) = (store.view().await.expect("view"), store.view().await.expect("view"));
    let (mut c, mut d) = (v1.plan(), v2.plan());
    c.put(alloc("c1", "n3"));
    d.put(alloc("d1", "n4"));
    store.commit(&c).await.expect("c");
    store.commit(&d).await.expect("d: another node, no conflict");
    assert_eq!(store.allocations_on("n1").await.expect("n1").len(), 2);
}

async fn a_lost_node_has_its_work_replaced_within_ttl_plus_2s(kv: Arc<dyn KeyValue>) {
    let store = ClusterStore::new(kv, "test/loss");
    let ttl = Duration::from_secs(2);
    let doomed = store.join(&Node::new("doomed", Resources::new(4000, 4096)), ttl).await.expect("join");
    let _survivor = store.join(&Node::new("survivor", Resources::new(4000, 4096)), ttl).await.expect("join");
    let desired = [web(4)];
    let first = store.reschedule(&desired).await.expect("initial placement");
    assert_eq!(first.placed.len(), 4);
    // Spread is not asked for, so force some work onto the node that will die.
    let view = store.view().await.expect("view");
    if !view.allocations.iter().any(|a| a.node == "doomed") {
        let mut plan = view.plan();
        let moved = view.allocations[0].clone();
        plan.delete(&moved.node, &moved.id);
        plan.put(AllocRecord { node: "doomed".into(), ..moved });
        store.commit(&plan).await.expect("move one");
    }
    let on_doomed = store.allocations_on("doomed").await.expect("list").len();
    assert!(on_doomed > 0);
    // The node stops renewing its lease, as after SIGKILL of its agent.
    let killed = Instant::now();
    drop(doomed);
    let moved = loop {
        let pass = store.reschedule(&desired).await.expect("reschedule");
        if !pass.lost.is_empty() {
            break pass;
        }
        assert!(killed.elapsed() < ttl + Duration::from_secs(2), "not re-placed within TTL + 2 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = killed.elapsed();
    assert!(took <= ttl + Duration::from_secs(2), "re-placed after {took:?}");
    assert_eq!(moved.lost.len(), on_doomed);
    assert!(moved.placed.iter().all(|a| a.node == "survivor"), "{:?}", moved.placed);
    let view = store.view().await.expect("view");
    assert_eq!(view.allocations.len(), 4, "all four run again, none twice: {:?}", view.allocations);
    assert!(view.allocations.iter().all(|a| a.node == "survivor"));
    assert!(store.reschedule(&desired).await.expect("steady").placed.is_empty(), "a steady cluster needs nothing");
}

fn volume(name: &str, read_only: bool) -> VolumeRequest {
    VolumeRequest { name: name.into(), access: VolumeAccess::SingleWriter, read_only, per_task: false }
}

async fn volumes_pin_work_to_their_node_and_move_with_it(kv: Arc<dyn KeyValue>) {
    let store = ClusterStore::new(kv, "test/volumes");
    let ttl = Duration::from_secs(30);
    let _n1 = store.join(&Node::new("n1", Resources::new(4000, 4096)), ttl).await.expect("join");
    let _n2 = store.join(&Node::new("n2", Resources::new(4000, 4096)), ttl).await.expect("join");
    let db = |group: &str, count: u32, read_only: bool| DesiredGroup {
        job: "db".into(),
        group: group.into(),
        version: 1,
        count,
        resources: Resources::new(100, 64),
        volumes: vec![volume("pgdata", read_only)],
        ..DesiredGroup::default()
    };
    // The first placement creates the volume where the task lands and records its home.
    let first = store.reschedule(&[db("pg", 1, false)]).await.expect("place");
    let home = first.placed[0].node.clone();
    assert_eq!(first.placed[0].volumes, vec![VolumeMount { name: "pgdata".into(), read_only: false }]);
    let recorded = store.volume_home("pgdata").await.expect("home").expect("recorded");
    assert_eq!((recorded.node.as_str(), recorded.access), (home.as_str(), VolumeAccess::SingleWriter));
    // Readers of the volume follow it to its node.
    let readers = store.reschedule(&[db("pg", 1, false), db("backup", 2, true)]).await.expect("readers");
    assert_eq!(readers.placed.len(), 2);
    assert!(readers.placed.iter().all(|a| a.node == home), "{:?}", readers.placed);
    // A second writer of a single-writer volume is not placed anywhere.
    let writers = store.reschedule(&[db("pg", 1, false), db("backup", 2, true), db("other-writer", 1, false)]).await.expect("writer");
    assert!(writers.placed.is_empty(), "{:?}", writers.placed);

    // Moving it: refused while mounted; once its tasks are gone, re-homed, and the next
    // placement follows it to the other node.
    let elsewhere = if home == "n1" { "n2" } else { "n1" };
    let moved = HostVolume { name: "pgdata".into(), node: elsewhere.into(), access: VolumeAccess::SingleWriter };
    assert!(matches!(store.rehome_volume(&moved).await, Err(Error::Conflict { .. })), "mounted volumes stay");
    for a in store.view().await.expect("view").allocations {
        store.forget(&a).await.expect("forget");
    }
    store.rehome_volume(&moved).await.expect("rehome");
    let again = store.reschedule(&[db("pg", 1, false)]).await.expect("place again");
    assert_eq!(again.placed[0].node, elsewhere);
    let unknown = HostVolume { name: "no-such".into(), ..moved.clone() };
    assert!(matches!(store.rehome_volume(&unknown).await, Err(Error::NotFound { .. })));

    // Two plans creating the same volume on different nodes: one home wins.
    let (v1, v2) = (store.view().await.expect("view"), store.view().await.expect("view"));
    let (mut a, mut b) = (v1.plan(), v2.plan());
    a.new_volume(HostVolume { name: "fresh".into(), node: "n1".into(), access: VolumeAccess::SingleWriter });
    b.new_volume(HostVolume { name: "fresh".into(), node: "n2".into(), access: VolumeAccess::SingleWriter });
    store.commit(&a).await.expect("first home");
    assert!(matches!(store.commit(&b).await, Err(Error::Stale { .. })));
    assert_eq!(store.volume_home("fresh").await.expect("home").expect("recorded").node, "n1");
}

async fn each_replica_keeps_its_own_volume(kv: Arc<dyn KeyValue>) {
    let store = ClusterStore::new(kv, "test/per-task");
    let ttl = Duration::from_secs(30);
    let mut members = Vec::new();
    for n in ["n1", "n2", "n3"] {
        members.push(store.join(&Node::new(n, Resources::new(150, 4096)), ttl).await.expect("join"));
    }
    let db = DesiredGroup {
        job: "db".into(),
        group: "replica".into(),
        version: 1,
        count: 3,
        resources: Resources::new(100, 64),
        volumes: vec![VolumeRequest { per_task: true, ..volume("data", false) }],
        ..DesiredGroup::default()
    };
    assert!(db.single_writer(), "per-task volumes have one writer each");
    let first = store.reschedule(std::slice::from_ref(&db)).await.expect("place");
    let mut names: Vec<String> = first.placed.iter().map(|a| a.volumes[0].name.clone()).collect();
    names.sort();
    assert_eq!(names, ["data-0", "data-1", "data-2"]);
    for a in &first.placed {
        let home = store.volume_home(&a.volumes[0].name).await.expect("home").expect("recorded");
        assert_eq!(home.node, a.node, "each volume lives where its replica landed");
    }
    // Replica 1 fails: its replacement mounts data-1, on data-1's node.
    let failed = first.placed.iter().find(|a| a.volumes[0].name == "data-1").expect("replica 1").clone();
    store.report(&AllocRecord { status: AllocStatus::Failed, ..failed.clone() }).await.expect("report");
    let again = store.reschedule(std::slice::from_ref(&db)).await.expect("replace");
    assert_eq!(again.stopped, vec![failed.id.clone()], "the failed one is stopped");
    assert_eq!(again.placed.len(), 1);
    assert_eq!(again.placed[0].volumes[0].name, "data-1");
    assert_eq!(again.placed[0].node, failed.node, "pinned to its volume");
    // Steady: nothing more to place, and no fourth volume appears.
    store.forget(&failed).await.expect("forget");
    assert!(store.reschedule(std::slice::from_ref(&db)).await.expect("steady").placed.is_empty());
    assert!(store.volume_home("data-3").await.expect("home").is_none());
}

/// A slot whose allocation stopped (a stop-first update) goes back to the node it ran on
/// and asks for the address it had there; with no room on that node it goes elsewhere
/// and asks for nothing (another host's subnet: the address changes).
async fn a_replaced_slot_goes_back_to_its_node_and_address(kv: Arc<dyn KeyValue>) {
    let store = ClusterStore::new(kv, "test/slots");
    let ttl = Duration::from_secs(30);
    let mut members = Vec::new();
    for n in ["n1", "n2", "n3"] {
        members.push(store.join(&Node::new(n, Resources::new(150, 4096)), ttl).await.expect("join"));
    }
    let desired = [web(2)];
    let first = store.reschedule(&desired).await.expect("place");
    let mut slots: Vec<Option<u32>> = first.placed.iter().map(|a| a.slot).collect();
    slots.sort();
    assert_eq!(slots, [Some(0), Some(1)], "each allocation takes a slot of its own");
    let old = first.placed.iter().find(|a| a.slot == Some(0)).expect("slot 0").clone();
    let had: std::net::IpAddr = "10.246.3.7".parse().expect("ip");
    // Its agent reports it running at its address; then an update stops it and the agent
    // forgets it once it is gone.
    store.report(&AllocRecord { status: AllocStatus::Running, address: Some(had), ..old.clone() }).await.expect("report");
    let seen = store.view().await.expect("view");
    assert_eq!(seen.allocations.iter().find(|a| a.id == old.id).and_then(|a| a.address), Some(had), "the view shows the address");
    let stopping = AllocRecord { status: AllocStatus::Stopping, ..old.clone() };
    let mut plan = seen.plan();
    plan.put(stopping.clone());
    store.commit(&plan).await.expect("stop");
    let forgotten = store.allocations_on(&old.node).await.expect("allocs").into_iter().find(|a| a.id == old.id).expect("still there");
    assert_eq!(forgotten.address, Some(had), "a stopping allocation keeps its reported address");
    store.forget(&forgotten).await.expect("forget");
    let homes = store.slot_homes("web", "http").await.expect("homes");
    assert_eq!(homes.get(&0).map(|h| (h.node.as_str(), h.address)), Some((old.node.as_str(), Some(had))));

    let back = store.reschedule(&desired).await.expect("replace");
    assert_eq!(back.placed.len(), 1);
    let new = &back.placed[0];
    assert_eq!((new.slot, new.node.as_str(), new.prefer_address), (Some(0), old.node.as_str(), Some(had)), "back home: {new:?}");

    // The same again, with the slot's node full: it goes to the empty node, asking for
    // no address.
    let mut plan = store.view().await.expect("view").plan();
    plan.put(AllocRecord { status: AllocStatus::Stopping, ..new.clone() });
    store.commit(&plan).await.expect("stop");
    store.forget(&AllocRecord { address: Some(had), ..new.clone() }).await.expect("forget");
    let mut plan = store.view().await.expect("view").plan();
    plan.put(AllocRecord { job: "blocker".into(), group: "b".into(), resources: Resources::new(100, 64), ..alloc("blocker-1", &old.node) });
    store.commit(&plan).await.expect("fill the slot's node");
    let moved = store.reschedule(&desired).await.expect("replace elsewhere");
    assert_eq!(moved.placed.len(), 1);
    let other = first.placed.iter().find(|a| a.slot == Some(1)).expect("slot 1");
    assert_eq!(moved.placed[0].slot, Some(0));
    assert!(moved.placed[0].node != old.node && moved.placed[0].node != other.node, "on the empty node: {:?}", moved.placed[0]);
    assert_eq!(moved.placed[0].prefer_address, None, "another node, another subnet: no address asked for");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_kv_puts_a_replaced_slot_back_on_its_node_at_its_address() {
    a_replaced_slot_goes_back_to_its_node_and_address(Arc::new(MemoryKv::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_puts_a_replaced_slot_back_on_its_node_at_its_address() {
    let (_etcd, kv) = etcd().await;
    a_replaced_slot_goes_back_to_its_node_and_address(kv).await;
}

/// Groups placed one at a time (one `reschedule` per job, as a bench or a second
/// controller might) still see what the others hold: allocations record their resources.
#[tokio::test]
async fn groups_placed_separately_never_overcommit_a_node() {
    let store = ClusterStore::new(Arc::new(MemoryKv::new()), "test/accounting");
    let _n1 = store.join(&Node::new("n1", Resources::new(1000, 1024)), Duration::from_secs(30)).await.expect("join");
    let group = |job: &str| DesiredGroup { job: job.into(), count: 6, ..web(6) };
    assert_eq!(store.reschedule(&[group("a")]).await.expect("a").placed.len(), 6, "600 of 1000 millicores");
    let b = store.reschedule(&[group("b")]).await.expect("b");
    assert_eq!(b.placed.len(), 4, "only 400 millicores are left for b: {:?}", b.placed);
    let check = store.check_stored().await.expect("check");
    assert!(check.violations.is_empty(), "{:?}", check.violations);
    assert_eq!(check.allocations, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_kv_gives_each_replica_its_own_volume() {
    each_replica_keeps_its_own_volume(Arc::new(MemoryKv::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_gives_each_replica_its_own_volume() {
    let (_etcd, kv) = etcd().await;
    each_replica_keeps_its_own_volume(kv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_kv_keeps_work_beside_its_volumes() {
    volumes_pin_work_to_their_node_and_move_with_it(Arc::new(MemoryKv::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_keeps_work_beside_its_volumes() {
    let (_etcd, kv) = etcd().await;
    volumes_pin_work_to_their_node_and_move_with_it(kv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_kv_commits_plans_optimistically() {
    conflicting_plans_one_commits_the_other_replans(Arc::new(MemoryKv::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_kv_replaces_the_work_of_a_lost_node() {
    a_lost_node_has_its_work_replaced_within_ttl_plus_2s(Arc::new(MemoryKv::new())).await;
}

async fn etcd() -> (keelson_testkit::etcd::Etcd, Arc<dyn KeyValue>) {
    let etcd = keelson_testkit::etcd::Etcd::start().unwrap_or_else(|e| panic!("etcd for this test: {e}"));
    let kv = EtcdKv::connect(EtcdConfig::new([etcd.client_url()])).await.expect("connect to etcd");
    (etcd, Arc::new(kv))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_commits_plans_optimistically() {
    let (_etcd, kv) = etcd().await;
    conflicting_plans_one_commits_the_other_replans(kv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_replaces_the_work_of_a_lost_node() {
    let (_etcd, kv) = etcd().await;
    a_lost_node_has_its_work_replaced_within_ttl_plus_2s(kv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_is_a_retryable_typed_error_and_the_agent_leaves_running_work_alone() {
    let (etcd, kv) = etcd().await;
    let store = ClusterStore::new(kv, "test/down");
    let _member = store.join(&Node::new("n1", Resources::new(4000, 4096)), Duration::from_secs(30)).await.expect("join");
    let group = keelson_scheduler::GroupSpec {
        desired: DesiredGroup {
            job: "batch".into(),
            group: "w".into(),
            version: 1,
            count: 1,
            resources: Resources::new(100, 16),
            ..DesiredGroup::default()
        },
        task: keelson_scheduler::TaskTemplate {
            command: vec!["/bin/sh".into(), "-c".into(), "while true; do sleep 0.1; done".into()],
            ..Default::default()
        },
        service: None,
        release: None,
    };
    store.put_group(&group).await.expect("group");
    store.reschedule(std::slice::from_ref(&group.desired)).await.expect("place");
    let driver = Arc::new(keelson_scheduler::ProcessDriver::new());
    let agent = keelson_scheduler::NodeAgent::new("n1", store.clone(), driver.clone(), None, "127.0.0.1");
    let report = agent.sync().await.expect("sync");
    assert_eq!(report.started.len(), 1);

    drop(etcd); // the cluster store goes away
    let began = Instant::now();
    let err = store.view().await.expect_err("no etcd");
    assert!(err.is_retryable(), "{err:?}");
    assert!(matches!(err, Error::Unavailable { .. } | Error::Timeout { .. }), "{err:?}");
    let err = agent.sync().await.expect_err("an agent pass cannot read its work");
    assert!(err.is_retryable(), "{err:?}");
    assert!(began.elapsed() < Duration::from_secs(30), "errors come in bounded time: {:?}", began.elapsed());
    // Not knowing is not a reason to stop anything: the task runs on.
    let tasks = keelson_scheduler::Driver::list(driver.as_ref()).await.expect("list");
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].state, keelson_scheduler::TaskState::Running);
}

/// A snapshot holds what should run (not the lease-bound nodes); restored into an empty
/// root it gives the same view; a root that holds state is refused, naming a key.
#[tokio::test]
async fn a_snapshot_restores_what_should_run_into_an_empty_root() {
    let kv: Arc<dyn KeyValue> = Arc::new(MemoryKv::new());
    let store = ClusterStore::new(kv.clone(), "snap");
    let _member = store.join(&Node::new("n1", Resources::new(4000, 4096)), Duration::from_secs(30)).await.expect("join");
    store.reschedule(&[web(3)]).await.expect("placed");
    let before = store.view().await.expect("view");
    let snapshot = store.snapshot().await.expect("snapshot");
    assert!(snapshot.entries.iter().all(|e| !e.key.starts_with("nodes/")), "lease-bound keys stay out");
    assert!(snapshot.entries.iter().filter(|e| e.key.starts_with("allocs/n1/")).count() == 3, "{:?}", snapshot.entries);

    // Through its file form, into a root that holds state: refused, nothing written.
    let text = serde_json::to_string(&snapshot).expect("to JSON");
    let read: keelson_scheduler::StoreSnapshot = serde_json::from_str(&text).expect("from JSON");
    match store.restore(&read).await {
        Err(Error::Conflict { reason, .. }) => assert!(reason.contains("snap/"), "{reason}"),
        other => panic!("a full root must be refused: {other:?}"),
    }

    // Lost: everything but the node's own key. Restored: the same allocations.
    for e in kv.list("snap/").await.expect("list").entries.iter().filter(|e| !e.key.starts_with("snap/nodes/")) {
        kv.delete(&e.key).await.expect("delete");
    }
    assert!(store.view().await.expect("view").allocations.is_empty());
    let written = store.restore(&read).await.expect("restore");
    assert_eq!(written, snapshot.entries.len());
    let after = store.view().await.expect("view");
    assert_eq!(after.allocations, before.allocations);
    assert_eq!(after.nodes, before.nodes);

    let mut wrong = read.clone();
    wrong.format = "something-else/9".into();
    assert!(matches!(store.restore(&wrong).await, Err(Error::InvalidInput { .. })), "an unknown format is refused");
}

/// An operator's drain outlives the agent: the node joins again still draining, and the
/// controller moves its work away; eligible again, it takes work.
#[tokio::test]
async fn a_drained_node_stays_drained_across_its_agents_restart() {
    let kv: Arc<dyn KeyValue> = Arc::new(MemoryKv::new());
    let store = ClusterStore::new(kv, "drain");
    let node = Node::new("n1", Resources::new(4000, 4096));
    let member = store.join(&node, Duration::from_secs(30)).await.expect("join");
    assert!(matches!(store.set_eligibility("nope", keelson_scheduler::Eligibility::Draining).await, Err(Error::NotFound { .. })));
    store.set_eligibility("n1", keelson_scheduler::Eligibility::Draining).await.expect("drain");
    assert_eq!(store.nodes().await.expect("nodes")[0].eligibility, keelson_scheduler::Eligibility::Draining, "the live record too");
    member.leave().await.expect("leave");
    let _member = store.join(&node, Duration::from_secs(30)).await.expect("join again");
    assert_eq!(store.nodes().await.expect("nodes")[0].eligibility, keelson_scheduler::Eligibility::Draining, "kept across the restart");
    let pass = store.reschedule(&[web(2)]).await.expect("pass");
    assert!(pass.placed.is_empty(), "nothing is placed on a draining node: {pass:?}");
    store.set_eligibility("n1", keelson_scheduler::Eligibility::Eligible).await.expect("eligible");
    assert_eq!(store.reschedule(&[web(2)]).await.expect("pass").placed.len(), 2);
}
