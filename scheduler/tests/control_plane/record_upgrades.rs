//! Nodes are upgraded one at a time: records written by a newer keelson, with fields this
//! version does not know, are read, and written back by this version without losing
//! those fields. Every record this version writes carries its schema version.

use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::{KeyValue, MemoryKv};
use keelson_scheduler::{
    AllocStatus, ClusterStore, DesiredGroup, Gates, GroupSpec, Node, Resources, Strategy, TaskTemplate, SCHEMA_VERSION,
};
use serde_json::{json, Value};

async fn raw(kv: &dyn KeyValue, key: &str) -> Value {
    serde_json::from_slice(&kv.get(key).await.expect("get").expect("present").value).expect("json")
}

/// Adds `extra` at `pointer` (an object) in the JSON stored at `key`.
async fn add_fields(kv: &dyn KeyValue, key: &str, pointer: &str, extra: Value) {
    let mut v = raw(kv, key).await;
    let target = v.pointer_mut(pointer).and_then(Value::as_object_mut).expect("object at pointer");
    target.extend(extra.as_object().expect("object").clone());
    kv.put(key, serde_json::to_vec(&v).expect("json"), None).await.expect("put");
}

fn spec(version: u64) -> GroupSpec {
    GroupSpec {
        desired: DesiredGroup {
            job: "app".into(),
            group: "w".into(),
            version,
            count: 2,
            resources: Resources::new(100, 16),
            ..DesiredGroup::default()
        },
        task: TaskTemplate { command: vec!["/bin/true".into()], ..TaskTemplate::default() },
        service: None,
        release: None,
    }
}

#[tokio::test]
async fn fields_from_a_newer_writer_survive_reads_and_write_backs() {
    let kv: Arc<dyn KeyValue> = Arc::new(MemoryKv::new());
    let store = ClusterStore::new(kv.clone(), "up");
    let _n1 = store.join(&Node::new("n1", Resources::new(4000, 4096)), Duration::from_secs(30)).await.expect("join");
    assert_eq!(raw(kv.as_ref(), "up/nodes/n1").await["schema"], SCHEMA_VERSION, "records carry their schema version");

    // A newer node's record and a newer plan's allocation, with fields at several depths.
    add_fields(kv.as_ref(), "up/nodes/n1", "", json!({"zone_v9": "eu-1"})).await;
    add_fields(kv.as_ref(), "up/nodes/n1", "/capacity", json!({"gpus": 2})).await;
    store.deploy(&spec(1), Strategy::default(), Gates::default()).await.expect("deploy v1");
    let placed = store.reschedule(&[spec(1).desired]).await.expect("place").placed;
    assert_eq!(placed.len(), 2);
    let key = format!("up/allocs/n1/{}", placed[0].id);
    add_fields(kv.as_ref(), &key, "", json!({"priority_class": "gold", "schema": 7})).await;

    // This version reads them all.
    let view = store.view().await.expect("a view over newer records");
    assert_eq!(view.nodes.len(), 1);
    assert_eq!(view.allocations.len(), 2);

    // It marks the allocation stopping: the newer fields stay, its own change lands.
    let mut plan = view.plan();
    let a = view.allocations.iter().find(|a| a.id == placed[0].id).expect("alloc").clone();
    plan.put(keelson_scheduler::AllocRecord { status: AllocStatus::Stopping, ..a });
    store.commit(&plan).await.expect("commit");
    let after = raw(kv.as_ref(), &key).await;
    assert_eq!(after["status"], "Stopping");
    assert_eq!(after["priority_class"], "gold", "the newer field survived the write-back: {after}");
    assert_eq!(after["schema"], SCHEMA_VERSION, "stamped by the writer that wrote it last");

    // The controller's group record, with a newer field inside the deployment, is updated
    // by a deploy and a rollback without losing it.
    let state_key = "up/desired/app/w";
    add_fields(kv.as_ref(), state_key, "", json!({"owner_team": "payments"})).await;
    store.deploy(&spec(2), Strategy::default(), Gates::default()).await.expect("deploy v2");
    add_fields(kv.as_ref(), state_key, "/deployment", json!({"approver": "ana"})).await;
    store.rollback("app", "w", "testing").await.expect("rollback");
    let state = raw(kv.as_ref(), state_key).await;
    assert_eq!(state["owner_team"], "payments", "{state}");
    assert_eq!(state["deployment"]["approver"], "ana", "{state}");
    assert!(store.group_state("app", "w").await.expect("state").expect("present").deployment.is_some());
}
