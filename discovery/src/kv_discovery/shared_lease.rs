//! One lease per TTL for every instance a [`KvDiscovery`](super::KvDiscovery) registers.
//!
//! Why: with a lease per instance, registering was two writes (grant, then put), each
//! paying the store's WAL fsync, and the grant competed with the put; register-to-watch
//! on etcd was 2.5–5 ms above etcd's own put-to-watch. With one lease per process and
//! TTL, registering is one put.
//!
//! What each instance keeps of its own liveness:
//! - its handle: dropping or releasing it deletes the record at once (a transaction
//!   that deletes only while the record is still on this process's lease, so a newer
//!   registration of the same id by another process is never removed);
//! - the process: when it dies, nothing renews the shared lease and all its instances
//!   expire together after the TTL, as before;
//! - a partition longer than the TTL: the lease is lost and every live instance is
//!   written back on a new one, keeping the health set meanwhile where the record
//!   survived.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::kv::{Compare, KeyValue, LeaseId, Txn};

use super::Record;

/// The shared leases of one `KvDiscovery` and its clones, one per TTL.
#[derive(Debug, Default)]
pub(super) struct SharedLeases {
    by_ttl: std::sync::Mutex<HashMap<Duration, Arc<SharedLease>>>,
}

impl SharedLeases {
    /// The lease for `ttl`, created (not yet granted) on first use.
    pub(super) fn for_ttl(&self, kv: &Arc<dyn KeyValue>, ttl: Duration) -> Arc<SharedLease> {
        let mut by_ttl = self.by_ttl.lock().unwrap_or_else(|p| p.into_inner());
        by_ttl
            .entry(ttl)
            .or_insert_with(|| {
                Arc::new(SharedLease { kv: kv.clone(), ttl, state: tokio::sync::Mutex::default(), renewer: Default::default() })
            })
            .clone()
    }

    /// Forgets `key` wherever it is registered: deregistered by name, it must not come
    /// back when a lost lease is replaced.
    pub(super) async fn forget(&self, key: &str) {
        let leases: Vec<Arc<SharedLease>> = self.by_ttl.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for lease in leases {
            lease.state.lock().await.members.remove(key);
        }
    }
}

/// One lease shared by every instance registered with its TTL.
#[derive(Debug)]
pub(super) struct SharedLease {
    kv: Arc<dyn KeyValue>,
    ttl: Duration,
    /// Held across the store calls that change which records the lease holds, so a
    /// release and a re-registration of the same key cannot interleave.
    state: tokio::sync::Mutex<LeaseState>,
    renewer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Debug, Default)]
struct LeaseState {
    /// `None` until the first registration, and while a lost lease could not be replaced.
    lease: Option<LeaseId>,
    /// Live registrations by key, each with the generation its handle holds.
    members: HashMap<String, Member>,
    next_generation: u64,
    /// Some record could not be written back after the lease was replaced: retry.
    rewrite_pending: bool,
}

#[derive(Debug)]
struct Member {
    generation: u64,
    record: Record,
}

impl Drop for SharedLease {
    fn drop(&mut self) {
        if let Some(task) = self.renewer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

impl SharedLease {
    /// Writes `record` at `key` on the shared lease (granting it first if need be) and
    /// returns the generation that [`SharedLease::release`] needs.
    pub(super) async fn register(self: &Arc<Self>, key: &str, record: Record) -> Result<u64> {
        let mut state = self.state.lock().await;
        let lease = match state.lease {
            Some(lease) => lease,
            None => {
                let lease = self.grant(&mut state).await?;
                self.start_renewer();
                lease
            }
        };
        let mut written = self.kv.put(key, record.encode(), Some(lease)).await;
        if matches!(written, Err(Error::NotFound { kind: "lease", .. })) {
            // Lost before the renewer noticed (the store restarted, say): replace it now.
            let lease = self.grant(&mut state).await?;
            self.rewrite(&mut state, lease).await;
            written = self.kv.put(key, record.encode(), Some(lease)).await;
        }
        written?;
        let generation = state.next_generation;
        state.next_generation += 1;
        state.members.insert(key.to_owned(), Member { generation, record });
        Ok(generation)
    }

    /// Deletes the record at `key` if it is still the registration of `generation` and
    /// still on this lease. A newer registration of the key (by this process or another)
    /// is left alone.
    pub(super) async fn release(&self, key: &str, generation: u64) -> Result<()> {
        let mut state = self.state.lock().await;
        match state.members.get(key) {
            Some(m) if m.generation == generation => {
                state.members.remove(key);
            }
            _ => return Ok(()),
        }
        let Some(lease) = state.lease else { return Ok(()) };
        match self.kv.txn(Txn::new().when(Compare::lease(key, lease)).delete(key)).await {
            Ok(_) | Err(Error::Fenced { .. } | Error::VersionMismatch { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn grant(&self, state: &mut LeaseState) -> Result<LeaseId> {
        let lease = self.kv.grant_lease(self.ttl).await?;
        state.lease = Some(lease);
        Ok(lease)
    }

    /// Starts the renewer once, when the lease is first granted. (Only registering starts
    /// it: the renewer itself replaces lost leases through `grant`.)
    fn start_renewer(self: &Arc<Self>) {
        let mut renewer = self.renewer.lock().unwrap_or_else(|p| p.into_inner());
        if renewer.is_none() {
            *renewer = Some(tokio::spawn(renew(Arc::downgrade(self), self.kv.clone(), self.ttl)));
        }
    }

    /// Puts every live record on `lease`, keeping the health a check set meanwhile where
    /// the record survived.
    async fn rewrite(&self, state: &mut LeaseState, lease: LeaseId) {
        state.rewrite_pending = false;
        for (key, member) in &state.members {
            let mut record = member.record.clone();
            if let Ok(Some(existing)) = self.kv.get(key).await {
                if let Ok(r) = Record::decode(&existing) {
                    record.health = r.health;
                }
            }
            if let Err(error) = self.kv.put(key, record.encode(), Some(lease)).await {
                tracing::warn!(%key, %error, "could not write the instance back on the new lease; will retry");
                state.rewrite_pending = true;
            }
        }
    }

    /// The lease `lost` is gone: grant a new one and write every live record back.
    async fn replace(&self, lost: LeaseId) {
        let mut state = self.state.lock().await;
        if state.lease != Some(lost) {
            return; // a registration replaced it already
        }
        tracing::warn!(lease = lost, backend = self.kv.backend(), instances = state.members.len(), "shared lease lost; re-creating");
        match self.grant(&mut state).await {
            Ok(lease) => self.rewrite(&mut state, lease).await,
            Err(error) => tracing::warn!(%error, "could not grant a new lease; will retry"),
        }
    }
}

/// Renews the lease every TTL/3 (etcd's advice: two renewals may fail before it is lost)
/// for as long as the `KvDiscovery` or a handle holds it.
async fn renew(shared: Weak<SharedLease>, kv: Arc<dyn KeyValue>, ttl: Duration) {
    // A zero period would make `interval` panic; a TTL that short is useless anyway.
    let mut ticker = tokio::time::interval((ttl / 3).max(Duration::from_millis(50)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(shared) = shared.upgrade() else { return };
        let (lease, pending) = {
            let state = shared.state.lock().await;
            (state.lease, state.rewrite_pending)
        };
        let Some(lease) = lease else { continue };
        match kv.keep_alive(lease).await {
            Ok(()) if pending => {
                let mut state = shared.state.lock().await;
                if state.lease == Some(lease) {
                    shared.rewrite(&mut state, lease).await;
                }
            }
            Ok(()) => {}
            Err(Error::NotFound { .. }) => shared.replace(lease).await,
            Err(error) => tracing::warn!(lease, %error, "lease renewal failed; will retry"),
        }
    }
}
