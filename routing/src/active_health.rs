//! Active health checks for every endpoint of a [`Router`]'s routes: TCP connects or
//! HTTP GETs on an interval, with rise/fall hysteresis, using the probes of
//! `keelson_discovery::health`. An endpoint that falls is taken out of rotation through
//! its shared [`EndpointStats`](crate::EndpointStats) (`is_probe_down`), not by rewriting
//! routes, so route sources (files, discovery) and the checker never overwrite each
//! other, and the verdict follows the endpoint across route updates.
//!
//! ```no_run
//! # fn demo(router: std::sync::Arc<keelson_routing::MemoryRouter>) -> keelson_routing::Result<()> {
//! use keelson_routing::{spawn_active_health, ActiveProbe};
//! let _checks = spawn_active_health(router, ActiveProbe::Http { path: "/healthz".into() }, Default::default())?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use keelson_discovery::health::{probe_once, CheckConfig, Probe, RiseFall};
use keelson_discovery::Health;
use tokio::task::JoinHandle;

use crate::balance::EndpointStats;
use crate::error::{Error, Result};
use crate::router::Router;

/// What each endpoint is probed with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActiveProbe {
    /// A TCP connect succeeds.
    Tcp,
    /// A GET of `path` answers 2xx or 3xx.
    Http {
        /// Path and query, starting with `/`.
        path: String,
    },
}

/// Probes every endpoint of `router`'s routes each `config.interval` until the handle is
/// aborted. Endpoints are probed concurrently, once each even if several routes share
/// them.
pub fn spawn_active_health(router: Arc<dyn Router>, probe: ActiveProbe, config: CheckConfig) -> Result<JoinHandle<()>> {
    if config.interval.is_zero() || config.timeout.is_zero() || config.rise == 0 || config.fall == 0 {
        return Err(Error::invalid(
            "health check",
            format!("{config:?}"),
            "interval and timeout must be positive, rise and fall at least 1",
        ));
    }
    if let ActiveProbe::Http { path } = &probe {
        if !path.starts_with('/') {
            return Err(Error::invalid("health check path", path, "must start with '/'"));
        }
    }
    Ok(tokio::spawn(async move {
        // Keyed by the stats' address: one state per live endpoint, whatever its routes.
        let mut states: HashMap<usize, (Arc<EndpointStats>, RiseFall)> = HashMap::new();
        let mut tick = tokio::time::interval(config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let targets = endpoints(router.as_ref());
            states.retain(|key, _| targets.iter().any(|(k, _, _)| k == key));
            let probes = targets.iter().map(|(_, addr, _)| {
                let p = match &probe {
                    ActiveProbe::Tcp => Probe::Tcp(*addr),
                    ActiveProbe::Http { path } => Probe::Http { addr: *addr, path: path.clone() },
                };
                async move { probe_once(&p, config.timeout).await }
            });
            let results = futures::future::join_all(probes).await;
            for ((key, addr, stats), ok) in targets.into_iter().zip(results) {
                let (stats, rise_fall) = states.entry(key).or_insert_with(|| (stats, RiseFall::new(config.rise, config.fall)));
                match rise_fall.observe(ok) {
                    Some(Health::Critical) => {
                        tracing::warn!(%addr, "endpoint failed its health checks; out of rotation");
                        stats.set_probe_down(true);
                    }
                    Some(_) if stats.is_probe_down() => {
                        tracing::info!(%addr, "endpoint passes its health checks again");
                        stats.set_probe_down(false);
                    }
                    _ => {}
                }
            }
        }
    }))
}

/// Every endpoint in the table once: (stats key, address, stats).
fn endpoints(router: &dyn Router) -> Vec<(usize, SocketAddr, Arc<EndpointStats>)> {
    let table = router.snapshot();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for route in table.routes() {
        let Some(entry) = table.get(&route.host, &route.path) else { continue };
        for e in &route.endpoints {
            if let Some(stats) = entry.stats(&e.id) {
                let key = Arc::as_ptr(stats) as usize;
                if seen.insert(key) {
                    out.push((key, e.addr, stats.clone()));
                }
            }
        }
    }
    out
}
