//! `ServiceView`: a local, lock-free copy of discovery for hot paths.
//!
//! A proxy or a DNS server must not call a backend per request. The view follows a
//! [`Discovery`] watch in the background and keeps the healthy instances per service in an
//! immutable map behind `arc-swap`: a lookup is one atomic load and one hash probe,
//! never blocked by an update. Through backend errors the view keeps the last good
//! instances (the watch never empties them) and reports the error in [`ServiceView::error`].

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures::StreamExt;
use tokio::task::JoinHandle;

use crate::discovery::{Discovery, Instance, Query};
use crate::error::Result;

/// Healthy instances per service, as of a discovery version.
#[derive(Debug, Default)]
pub struct ViewSnapshot {
    /// Backend version it reflects.
    pub version: u64,
    /// Healthy instances by service name, each sorted by id.
    pub services: HashMap<String, Arc<[Instance]>>,
    /// The backend error this view is stale because of, if any.
    pub error: Option<String>,
}

/// A background-updated view of every service's healthy instances.
#[derive(Debug)]
#[must_use = "the view stops following the service when dropped"]
pub struct ServiceView {
    current: Arc<ArcSwap<ViewSnapshot>>,
    task: JoinHandle<()>,
}

impl ServiceView {
    /// Follows `discovery` (which must support queries over every service). Returns
    /// once the first snapshot is in.
    pub async fn follow(discovery: Arc<dyn Discovery>) -> Result<ServiceView> {
        let mut snapshots = discovery.watch(Query::all().healthy()).await?;
        let first = snapshots.next().await;
        let current = Arc::new(ArcSwap::from_pointee(first.map(build).unwrap_or_default()));
        let feed = current.clone();
        let task = tokio::spawn(async move {
            while let Some(s) = snapshots.next().await {
                feed.store(Arc::new(build(s)));
            }
        });
        Ok(ServiceView { current, task })
    }

    /// The healthy instances of `service` (empty if none). Lock-free.
    pub fn instances(&self, service: &str) -> Arc<[Instance]> {
        self.current.load().services.get(service).cloned().unwrap_or_else(|| Arc::from(Vec::new()))
    }

    /// The whole current view (an `Arc`; later updates never change it).
    pub fn snapshot(&self) -> Arc<ViewSnapshot> {
        self.current.load_full()
    }

    /// The backend error the view is stale because of, if any.
    pub fn error(&self) -> Option<String> {
        self.current.load().error.clone()
    }
}

impl Drop for ServiceView {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn build(s: crate::discovery::Snapshot) -> ViewSnapshot {
    let mut by: HashMap<String, Vec<Instance>> = HashMap::new();
    for i in s.instances {
        by.entry(i.service.to_string()).or_default().push(i);
    }
    ViewSnapshot { version: s.version, services: by.into_iter().map(|(k, v)| (k, Arc::from(v))).collect(), error: s.error }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Health, MemoryDiscovery, Registration, ServiceName};

    #[tokio::test]
    async fn follows_registrations_and_health() {
        let d = Arc::new(MemoryDiscovery::memory());
        let web = ServiceName::new("web").expect("name");
        let _a = d.register(Registration::new(web.clone(), "a", "127.0.0.1", 1)).await.expect("register");
        let view = ServiceView::follow(d.clone()).await.expect("view");
        assert_eq!(view.instances("web").len(), 1);
        assert!(view.instances("nope").is_empty());
        let _b = d.register(Registration::new(web.clone(), "b", "127.0.0.1", 2)).await.expect("register");
        d.set_health(&web, "a", Health::Critical).await.expect("health");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while view.instances("web").iter().map(|i| i.id.as_str()).collect::<Vec<_>>() != ["b"] {
            assert!(tokio::time::Instant::now() < deadline, "view did not follow");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(view.error().is_none());
    }
}
