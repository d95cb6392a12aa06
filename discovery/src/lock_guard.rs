//! `LockGuard`: a lock that stays held while its holder works, says when it is lost,
//! and fences every write made under it.
//!
//! A lock on a lease alone is not enough for a control plane: a holder paused past the
//! lease's TTL (a long GC, SIGSTOP, a VM migration) wakes up believing it still holds the
//! lock while another process has taken it. The guard renews the lease at a third of its
//! TTL, turns "the lease is gone" or "no renewal succeeded for a whole TTL" into a loss its
//! holder can await, and hands out [`LockGuard::fence`]: a compare that a [`crate::Txn`]
//! carries so the store itself refuses a former holder's writes ([`crate::Error::Fenced`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::kv::{Compare, KeyValue, KvLock, LeaseId};

/// A held lock, renewed in the background until it is released, dropped or lost.
#[derive(Debug)]
#[must_use = "the lock is released when the guard is dropped"]
pub struct LockGuard {
    kv: Arc<dyn KeyValue>,
    lock: KvLock,
    lost: watch::Receiver<bool>,
    renewer: JoinHandle<()>,
    released: bool,
}

impl LockGuard {
    /// Takes the lock at `key` (see [`KeyValue::lock`]), waiting up to `wait`, and keeps
    /// its lease of `ttl` alive. [`Error::Timeout`] if another holder kept it all along.
    pub async fn acquire(kv: Arc<dyn KeyValue>, key: &str, ttl: Duration, wait: Duration) -> Result<LockGuard> {
        let lock = kv.lock(key, ttl, wait).await?;
        let (tx, lost) = watch::channel(false);
        let renewer = tokio::spawn(renew(kv.clone(), lock.clone(), ttl, tx));
        Ok(LockGuard { kv, lock, lost, renewer, released: false })
    }

    /// The lock key.
    pub fn key(&self) -> &str {
        &self.lock.key
    }

    /// The lease holding it.
    pub fn lease(&self) -> LeaseId {
        self.lock.lease
    }

    /// The revision it was taken at (a later holder's is larger).
    pub fn revision(&self) -> u64 {
        self.lock.revision
    }

    /// The compare that fences a write: add it to every [`crate::Txn`] made under this
    /// lock, and the write lands only while this guard's lease still holds the key.
    pub fn fence(&self) -> Compare {
        Compare::lease(self.lock.key.clone(), self.lock.lease)
    }

    /// Whether the lock is still believed held (false once lost; never true again).
    pub fn is_held(&self) -> bool {
        !*self.lost.borrow()
    }

    /// Resolves once the lock is lost: its lease expired or was revoked, or no renewal
    /// succeeded for a whole TTL (the store may have expired it: assume the worst).
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        // An error means the renewer ended without saying "lost": it was aborted by
        // release or drop, which only happen through `self`, so wait forever then.
        if rx.wait_for(|lost| *lost).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Releases the lock now (revokes its lease) instead of letting it expire.
    pub async fn release(mut self) -> Result<()> {
        self.renewer.abort();
        self.released = true;
        match self.kv.revoke_lease(self.lock.lease).await {
            // Already expired: released all the same.
            Ok(()) | Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.renewer.abort();
        // Release promptly if a runtime is there to do it; otherwise the lease expires.
        if !self.released {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                let (kv, lease) = (self.kv.clone(), self.lock.lease);
                handle.spawn(async move {
                    let _ = kv.revoke_lease(lease).await;
                });
            }
        }
    }
}

async fn renew(kv: Arc<dyn KeyValue>, lock: KvLock, ttl: Duration, lost: watch::Sender<bool>) {
    let period = (ttl / 3).max(Duration::from_millis(50));
    let mut last_renewed = Instant::now();
    loop {
        tokio::time::sleep(period).await;
        // A pause (SIGSTOP, a stalled VM) shows as a sleep that overslept: past a whole
        // TTL since the last renewal, the store may have handed the lock to someone else.
        if last_renewed.elapsed() >= ttl {
            tracing::warn!(key = %lock.key, lease = lock.lease, "lock not renewed for a whole TTL; it is lost");
            let _ = lost.send(true);
            return;
        }
        match kv.keep_alive(lock.lease).await {
            Ok(()) => last_renewed = Instant::now(),
            Err(Error::NotFound { .. }) => {
                tracing::warn!(key = %lock.key, lease = lock.lease, "lock lease expired; the lock is lost");
                let _ = lost.send(true);
                return;
            }
            Err(e) => tracing::warn!(key = %lock.key, error = %e, "lock renewal failed; retrying"),
        }
    }
}
