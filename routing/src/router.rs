//! The `Router` trait and `MemoryRouter`, its embedded default.

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;

use crate::error::Result;
use crate::route::RouteChange;
use crate::table::RouteTable;

/// What a router supports.
///
/// A backend outside this crate starts from `default()` (nothing supported) and sets
/// the fields it supports: `let mut caps = RouterCapabilities::default(); caps.durable = true;`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouterCapabilities {
    /// Routes survive a restart.
    pub durable: bool,
}

/// The control surface the proxies serve from: apply changes, read a snapshot.
#[async_trait]
pub trait Router: Send + Sync + std::fmt::Debug {
    /// The router's name.
    fn name(&self) -> &'static str;

    /// What it supports.
    fn capabilities(&self) -> RouterCapabilities;

    /// Applies a batch of changes atomically; returns the new table version. On error
    /// nothing is applied.
    async fn apply(&self, changes: Vec<RouteChange>) -> Result<u64>;

    /// The current table. Cheap (an `Arc` clone), lock-free, and immutable: later
    /// changes never alter a snapshot already taken.
    fn snapshot(&self) -> Arc<RouteTable>;
}

/// Routes in memory behind an [`ArcSwap`]: readers never block writers or each other.
#[derive(Debug, Default)]
pub struct MemoryRouter {
    table: ArcSwap<RouteTable>,
    /// Serialises writers so no batch is lost between load and store.
    write: tokio::sync::Mutex<()>,
}

impl MemoryRouter {
    /// An empty router.
    pub fn new() -> Self {
        MemoryRouter::default()
    }
}

#[async_trait]
impl Router for MemoryRouter {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> RouterCapabilities {
        RouterCapabilities { durable: false }
    }

    async fn apply(&self, changes: Vec<RouteChange>) -> Result<u64> {
        let _guard = self.write.lock().await;
        let next = self.table.load().apply(&changes)?;
        let version = next.version();
        self.table.store(Arc::new(next));
        tracing::debug!(version, changes = changes.len(), "routes updated");
        Ok(version)
    }

    fn snapshot(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }
}
