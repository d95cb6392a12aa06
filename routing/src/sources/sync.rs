//! The one diff-and-apply every route source uses.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::route::{Route, RouteChange, RouteKey};
use crate::router::Router;

/// Applies to `router` what turns `owned` into `wanted` (upserts of new or changed routes,
/// removals of the rest; unchanged routes are not touched, so their balancer state stays);
/// on success `owned` becomes `wanted`. A failure (a route the table refuses, or one of
/// ours removed by someone else) is logged and returned, and `owned` keeps only what the
/// router still has, so the next sync starts from the truth.
pub(crate) async fn sync_routes(
    router: &dyn Router,
    owned: &mut BTreeMap<RouteKey, Route>,
    wanted: BTreeMap<RouteKey, Route>,
    what: &str,
) -> Result<usize> {
    let mut changes: Vec<RouteChange> =
        wanted.iter().filter(|(k, r)| owned.get(*k) != Some(*r)).map(|(_, r)| RouteChange::Upsert(r.clone())).collect();
    changes.extend(owned.keys().filter(|k| !wanted.contains_key(*k)).cloned().map(|(h, p)| RouteChange::RemovePath(h, p)));
    if changes.is_empty() {
        return Ok(0);
    }
    let count = changes.len();
    match router.apply(changes).await {
        Ok(version) => {
            tracing::info!(version, changes = count, routes = wanted.len(), what, "routes updated");
            *owned = wanted;
            Ok(count)
        }
        Err(e) => {
            tracing::warn!(error = %e, what, "routes not applied; keeping the routes in force");
            let table = router.snapshot();
            owned.retain(|(h, p), _| table.get(h, p).is_some());
            Err(e)
        }
    }
}
