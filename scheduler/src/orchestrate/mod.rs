//! Orchestration: what should run and the decisions that get it there. Specs, deployment
//! strategies as pure state machines, the reconciler, the cluster store on `KeyValue`
//! with optimistic plan commits, its watch-fed cache, the controller and one-off runs.
//! Placement is asked through `Arc<dyn Scheduler>`, never a concrete engine. Depends on
//! `placement` and the shared vocabulary; never on `runtime` (nodes read orchestration's
//! records, orchestration never reaches into a node).

pub(crate) mod cluster_cache;
pub(crate) mod cluster_store;
pub(crate) mod controller;
pub(crate) mod deployment;
pub(crate) mod metrics;
pub(crate) mod oneoff;
pub(crate) mod operations;
pub(crate) mod planner;
pub(crate) mod reconcile;
pub(crate) mod run_store;
pub(crate) mod runs;
pub(crate) mod snapshot;
pub(crate) mod spec;
pub(crate) mod store_check;
pub(crate) mod strategy;
