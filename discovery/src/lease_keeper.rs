//! Keeps a lease alive from a background task, for as long as the keeper lives.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::kv::{KeyValue, LeaseId};

/// Renews a lease every `ttl / 3` until dropped (etcd's advice; two renewals may fail
/// before the lease is lost). Dropping the keeper stops renewing, so the lease and its
/// keys expire after their TTL, as they would if the process died.
#[derive(Debug)]
#[must_use = "the lease stops being renewed when the keeper is dropped"]
pub struct LeaseKeeper {
    task: JoinHandle<()>,
    lease: LeaseId,
}

impl LeaseKeeper {
    /// Starts renewing `lease`. `on_lost` runs if the backend says the lease is gone
    /// (expired during a partition, say); it may re-create what the lease held and return
    /// the new lease to keep alive, or `None` to stop.
    pub fn spawn<F, Fut>(kv: Arc<dyn KeyValue>, lease: LeaseId, ttl: Duration, mut on_lost: F) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Option<LeaseId>> + Send,
    {
        let task = tokio::spawn(async move {
            let mut current = lease;
            // A zero period would make `interval` panic; a TTL that short is useless anyway.
            let mut ticker = tokio::time::interval((ttl / 3).max(Duration::from_millis(50)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                match kv.keep_alive(current).await {
                    Ok(()) => {}
                    Err(crate::Error::NotFound { .. }) => {
                        tracing::warn!(lease = current, backend = kv.backend(), "lease lost; re-creating");
                        match on_lost().await {
                            Some(next) => current = next,
                            None => return,
                        }
                    }
                    Err(e) => tracing::warn!(lease = current, error = %e, "lease renewal failed; will retry"),
                }
            }
        });
        LeaseKeeper { task, lease }
    }

    /// The lease first given to the keeper.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}
