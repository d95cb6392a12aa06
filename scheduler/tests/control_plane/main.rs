//! The control plane under crashes, pauses and upgrades (issue 12), in one test binary
//! (each binary costs a link; these share their dependencies):
//! - `cluster_cache`: the watch-fed cache matches the store, and plans from it are sound;
//! - `plan_crashes`: a commit crashed at every call is all or nothing;
//! - `plan_kills`: SIGKILL of a process committing 10,000 allocations to real etcd;
//! - `controller_failover`: a leader SIGSTOPped past its TTL is fenced off;
//! - `record_upgrades`: records from a newer writer survive reads and write-backs;
//! - `stored_state`: no panic from stored state (property tests).

mod cluster_cache;
mod controller_failover;
mod plan_crashes;
mod plan_kills;
mod record_upgrades;
mod stored_state;
