//! No panic from stored state: deployments and allocation records read back from the
//! cluster store may have been written by another version, by hand, or corrupted. Fed
//! at random to the state machines and the store's readers, they give valid transitions
//! or typed errors, never a panic or an overflow.

use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::{KeyValue, MemoryKv};
use keelson_scheduler::{Action, AllocHealth, AllocView, ClusterStore, Deployment, Gates, Strategy as DeployStrategy};
use proptest::prelude::*;
use serde_json::{json, Value};

fn strategies() -> Vec<DeployStrategy> {
    vec![
        DeployStrategy::Rolling { max_surge: 1, max_unavailable: 0 },
        DeployStrategy::Canary { canaries: 2, auto_promote: false, max_surge: 1, max_unavailable: 1 },
        DeployStrategy::Recreate,
        DeployStrategy::BlueGreen { rollback_window: Duration::from_secs(60) },
    ]
}

fn phases() -> Vec<Value> {
    vec![
        json!("Canary"),
        json!("AwaitingPromotion"),
        json!("Rolling"),
        json!("Recreating"),
        json!("Green"),
        json!({"Verifying": {"switched_at": 5}}),
        json!({"RollingBack": {"reason": "r"}}),
        json!("Succeeded"),
        json!({"RolledBack": {"reason": "r"}}),
        json!({"Failed": {"reason": "r"}}),
    ]
}

fn health(kind: u8, since: u64) -> AllocHealth {
    match kind % 4 {
        0 => AllocHealth::Starting { since },
        1 => AllocHealth::Healthy { since },
        2 => AllocHealth::Failed,
        _ => AllocHealth::Stopping,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any stored deployment (any phase with any strategy, counts up to u32::MAX, any
    /// clock) steps without panicking; what it asks for is well formed.
    #[test]
    fn any_stored_deployment_steps_without_panicking(
        strategy in 0usize..4,
        phase in 0usize..10,
        count in prop_oneof![0u32..6, Just(u32::MAX), Just(u32::MAX - 1)],
        surge in prop_oneof![0u32..3, Just(u32::MAX)],
        best in prop_oneof![0u32..6, Just(u32::MAX)],
        from in proptest::option::of(0u64..3),
        to in 0u64..3,
        last_progress in prop_oneof![0u64..10, Just(u64::MAX)],
        now in prop_oneof![0u64..10_000_000, Just(u64::MAX)],
        allocs in proptest::collection::vec((0u64..3, 0u8..4, 0u64..10_000_000), 0..12),
        ret in 0usize..2,
    ) {
        let base = Deployment::new(Some(7), 8, 3, strategies()[strategy].clone(), Gates::default(), false, 0).expect("deployment");
        let mut stored = serde_json::to_value(&base).expect("json");
        // Another strategy's limits, any phase, any counters: as a hand-edited record might.
        let other = serde_json::to_value(&strategies()[(strategy + phase) % 4]).expect("json");
        stored["strategy"] = other;
        if let Some(s) = stored["strategy"].as_object_mut() {
            for k in ["max_surge", "canaries"] {
                if s.contains_key(k) {
                    s.insert(k.into(), json!(surge));
                }
            }
        }
        stored["phase"] = phases()[phase].clone();
        stored["count"] = json!(count);
        stored["best"] = json!(best);
        stored["from"] = json!(from);
        stored["to"] = json!(to);
        stored["last_progress"] = json!(last_progress);
        stored["ret"] = json!(["StopNew", "Redeploy"][ret]);
        let Ok(mut d) = serde_json::from_value::<Deployment>(stored) else { return Ok(()) };
        let views: Vec<AllocView> =
            allocs.iter().enumerate().map(|(i, (v, h, since))| AllocView::new(format!("a{i}"), *v, health(*h, *since))).collect();
        for step in 0..3 {
            for action in d.step(&views, now.saturating_add(step)) {
                match action {
                    Action::Start { count: n, .. } => prop_assert!(n > 0 && n <= count, "start {n} of {count}"),
                    Action::Stop { ids } => prop_assert!(ids.iter().all(|id| views.iter().any(|v| &v.id == id)), "stops only what exists"),
                }
            }
        }
    }

    /// Allocation and node records of any shape give a view or a typed error.
    #[test]
    fn any_stored_record_reads_as_a_view_or_a_typed_error(
        value in prop_oneof![
            Just(json!(null)),
            Just(json!({"id": "a", "job": "j", "group": "g", "version": -1, "node": "n1", "status": "Pending"})),
            Just(json!({"id": "a", "job": "j", "group": "g", "version": 1, "node": "n1", "status": "Exploded"})),
            Just(json!({"id": "a", "job": "j", "group": "g", "version": 1, "node": "n1", "status": "Pending", "ports": [70000]})),
            Just(json!([1, 2, 3])),
            ".*".prop_map(Value::String),
        ],
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
        raw_bytes in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let kv: Arc<dyn KeyValue> = Arc::new(MemoryKv::new());
            let bytes = if raw_bytes { garbage } else { serde_json::to_vec(&value).expect("json") };
            kv.put("s/allocs/n1/a", bytes.clone(), None).await.expect("put");
            kv.put("s/nodes/n1", bytes, None).await.expect("put");
            let store = ClusterStore::new(kv, "s");
            match store.view().await {
                Ok(_) => {}
                Err(e) => assert!(matches!(e, keelson_scheduler::Error::Backend { .. }), "{e:?}"),
            }
            let _ = store.allocations_on("n1").await;
        });
    }
}
