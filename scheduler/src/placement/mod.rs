//! Placement: where tasks run. Pure and synchronous (no tokio, no I/O): the model, the
//! indexed cluster state, constraints and per-class caches, the engine, rebalancing, and
//! the [`Scheduler`](scheduler::Scheduler) trait. Depends only on the crate's shared
//! vocabulary (errors, records).

pub(crate) mod class_cache;
pub(crate) mod constraints;
pub(crate) mod engine;
pub(crate) mod model;
pub(crate) mod rebalance;
pub(crate) mod scheduler;
pub(crate) mod state;
