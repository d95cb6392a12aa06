//! Where routes come from: a static routes file, or a `Discovery` watch with tags.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use std::sync::atomic::AtomicU64;

use futures::StreamExt;
use keelson_discovery::{Discovery, Instance, Query};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::task::JoinHandle;

use crate::balance::Balancer;
use crate::error::{Error, Result};
use crate::router::Router;
use crate::table::{Endpoint, Host, PathPrefix, Route, RouteChange, RouteKey, UpstreamProtocol};

/// The tag an instance carries to be routed: `keelson.http.host=<host>` (or `*.parent`).
pub const HTTP_HOST_TAG: &str = "keelson.http.host";
/// The path prefix an instance serves under its host: `keelson.http.path=/api`
/// (default `/`).
pub const HTTP_PATH_TAG: &str = "keelson.http.path";
/// An instance's weight for weighted balancing: `keelson.weight=<1..=100>`.
pub const WEIGHT_TAG: &str = "keelson.weight";
/// The route's balancer, from its first instance: `keelson.http.balancer=round_robin |
/// weighted | least_requests | peak_ewma`.
pub const BALANCER_TAG: &str = "keelson.http.balancer";
/// What the route's endpoints speak, from its first instance: `keelson.http.protocol=
/// http1 | h2c` (h2c for gRPC services).
pub const PROTOCOL_TAG: &str = "keelson.http.protocol";
/// The proxy port a TCP service is served on: `keelson.tcp.port=5432`.
pub const TCP_PORT_TAG: &str = "keelson.tcp.port";
/// The TLS server name routing to an instance on its TCP port (SNI passthrough):
/// `keelson.sni=db.example` or `*.example`; without it the instance is in the port's
/// default route.
pub const SNI_TAG: &str = "keelson.sni";

/// A routes file: `{"routes": [{"host": "...", "endpoints": [{"id": "...", "addr": "ip:port"}]}]}`,
/// optionally with `"tcp": [{"listen": "0.0.0.0:5432", "sni": "db.example", "endpoints": [...]}]`.
/// Unknown keys are rejected, so a typo is an error and not a silently ignored setting.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    /// HTTP routes.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// TCP routes, served by a [`crate::TcpProxy`] per listen address.
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
}

/// A TCP route: connections to `listen` whose TLS server name is `sni` (or, without
/// `sni`, every other connection) go to `endpoints`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpRoute {
    /// The listen address.
    pub listen: SocketAddr,
    /// The TLS server name (exact or `*.parent`); none for the listener's default.
    #[serde(default)]
    pub sni: Option<Host>,
    /// Upstream servers.
    pub endpoints: Vec<Endpoint>,
    /// How connections are spread (default round robin).
    #[serde(default)]
    pub balancer: Balancer,
}

impl TcpRoute {
    /// The route as its listener's [`crate::TcpProxy`] router holds it.
    pub fn to_route(&self) -> Result<Route> {
        let host = match &self.sni {
            Some(h) => h.clone(),
            None => Host::new(crate::TCP_DEFAULT_HOST)?,
        };
        Ok(Route::new(host, self.endpoints.clone()).with_balancer(self.balancer.clone()))
    }
}

impl RoutesFile {
    /// Parses a routes file from JSON text; errors carry serde's line and column.
    pub fn parse(text: &str) -> Result<Self> {
        let file: RoutesFile =
            serde_json::from_str(text).map_err(|e| Error::invalid("routes file", e.to_string(), "is not a valid routes file"))?;
        let mut keys = BTreeSet::new();
        for r in &file.routes {
            if !keys.insert((&r.host, &r.path)) {
                return Err(Error::invalid("route", format!("{}{}", r.host, r.path), "appears twice in the routes file"));
            }
        }
        let mut tcp_keys = BTreeSet::new();
        for t in &file.tcp {
            if !tcp_keys.insert((t.listen, &t.sni)) {
                let sni = t.sni.as_ref().map_or("default", Host::as_str);
                return Err(Error::invalid("TCP route", format!("{} {sni}", t.listen), "appears twice in the routes file"));
            }
        }
        Ok(file)
    }

    /// Reads and parses a routes file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Io { context: format!("reading routes file {}", path.display()), source })?;
        RoutesFile::parse(&text)
    }

    /// The changes that install these routes.
    pub fn changes(self) -> Vec<RouteChange> {
        self.routes.into_iter().map(RouteChange::Upsert).collect()
    }
}

/// Groups instances into routes by their [`HTTP_HOST_TAG`] and [`HTTP_PATH_TAG`].
/// Instances without a host tag are ignored; ones with an invalid host or path, or a
/// non-IP address, are skipped with a warning (DNS names are not resolved on the
/// request path).
pub fn routes_from_instances(instances: &[Instance]) -> BTreeMap<RouteKey, Route> {
    let mut routes: BTreeMap<RouteKey, Route> = BTreeMap::new();
    for i in instances {
        let Some(tag) = i.tag_value(HTTP_HOST_TAG) else { continue };
        let host = match Host::new(tag) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(service = %i.service, id = %i.id, error = %e, "ignoring instance with a bad host tag");
                continue;
            }
        };
        let path = match i.tag_value(HTTP_PATH_TAG).map(PathPrefix::new).transpose() {
            Ok(p) => p.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(service = %i.service, id = %i.id, error = %e, "ignoring instance with a bad path tag");
                continue;
            }
        };
        let Some(endpoint) = endpoint_of(i) else { continue };
        let balancer = balancer_of(i);
        let upstream = match i.tag_value(PROTOCOL_TAG) {
            Some("h2c") => UpstreamProtocol::H2c,
            _ => UpstreamProtocol::Http1,
        };
        routes
            .entry((host.clone(), path.clone()))
            .or_insert_with(|| Route::new(host, Vec::new()).with_path(path).with_balancer(balancer).with_upstream(upstream))
            .endpoints
            .push(endpoint);
    }
    routes
}

/// The endpoint an instance is, or `None` (with a warning) when its address is not an IP.
fn endpoint_of(i: &Instance) -> Option<Endpoint> {
    let Ok(ip) = i.address.parse::<IpAddr>() else {
        tracing::warn!(service = %i.service, id = %i.id, address = %i.address, "ignoring instance whose address is not an IP");
        return None;
    };
    let weight = match i.tag_value(WEIGHT_TAG).map(str::parse::<u32>) {
        None => 1,
        Some(Ok(w)) if (1..=100).contains(&w) => w,
        Some(_) => {
            tracing::warn!(service = %i.service, id = %i.id, "ignoring a weight tag outside 1..=100");
            1
        }
    };
    Some(Endpoint { id: format!("{}/{}", i.service, i.id), addr: SocketAddr::new(ip, i.port), healthy: i.health.is_healthy(), weight })
}

fn balancer_of(i: &Instance) -> Balancer {
    match i.tag_value(BALANCER_TAG) {
        Some("weighted") => Balancer::Weighted,
        Some("least_requests") => Balancer::LeastRequests,
        Some("peak_ewma") => Balancer::PeakEwma,
        _ => Balancer::RoundRobin,
    }
}

/// Groups instances tagged [`TCP_PORT_TAG`] into TCP routes per proxy port: the route of
/// the instance's [`SNI_TAG`] name, or the port's default route ([`crate::TCP_DEFAULT_HOST`]).
pub fn tcp_routes_from_instances(instances: &[Instance]) -> BTreeMap<u16, BTreeMap<RouteKey, Route>> {
    let mut ports: BTreeMap<u16, BTreeMap<RouteKey, Route>> = BTreeMap::new();
    for i in instances {
        let Some(tag) = i.tag_value(TCP_PORT_TAG) else { continue };
        let Ok(port) = tag.parse::<u16>() else {
            tracing::warn!(service = %i.service, id = %i.id, tag, "ignoring instance with a bad TCP port tag");
            continue;
        };
        let host = match Host::new(i.tag_value(SNI_TAG).unwrap_or(crate::TCP_DEFAULT_HOST)) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(service = %i.service, id = %i.id, error = %e, "ignoring instance with a bad SNI tag");
                continue;
            }
        };
        let Some(endpoint) = endpoint_of(i) else { continue };
        let balancer = balancer_of(i);
        ports
            .entry(port)
            .or_default()
            .entry((host.clone(), PathPrefix::root()))
            .or_insert_with(|| Route::new(host, Vec::new()).with_balancer(balancer))
            .endpoints
            .push(endpoint);
    }
    ports
}

/// Applies to `router` what turns `owned` into `wanted`; on success `owned` becomes
/// `wanted`. A failure (someone else removed one of our routes) is logged and `owned`
/// keeps only what the router still has, so the next snapshot re-syncs.
async fn sync_routes(router: &dyn Router, owned: &mut BTreeMap<RouteKey, Route>, wanted: BTreeMap<RouteKey, Route>, what: &str) {
    let mut changes: Vec<RouteChange> =
        wanted.iter().filter(|(k, r)| owned.get(*k) != Some(*r)).map(|(_, r)| RouteChange::Upsert(r.clone())).collect();
    changes.extend(owned.keys().filter(|k| !wanted.contains_key(*k)).cloned().map(|(h, p)| RouteChange::RemovePath(h, p)));
    if changes.is_empty() {
        return;
    }
    match router.apply(changes).await {
        Ok(version) => {
            tracing::info!(version, routes = wanted.len(), what, "routes follow discovery");
            *owned = wanted;
        }
        Err(e) => {
            tracing::warn!(error = %e, what, "could not apply routes from discovery");
            let table = router.snapshot();
            owned.retain(|(h, p), _| table.get(h, p).is_some());
        }
    }
}

/// Serves TCP routes from discovery: the first time an instance names a
/// [`TCP_PORT_TAG`] port, a [`crate::TcpProxy`] starts listening on `bind:port`; its
/// routes then follow the instances (by [`SNI_TAG`], or the default route). A port whose
/// instances are gone keeps listening with no routes (connections are closed at once).
/// Aborting the returned task closes every listener it opened (after `config`'s drain
/// grace for open connections).
pub async fn follow_discovery_tcp(
    discovery: Arc<dyn Discovery>,
    bind: IpAddr,
    config: crate::TcpProxyConfig,
    status: SourceStatus,
) -> Result<JoinHandle<()>> {
    let mut snapshots = discovery.watch(Query::all()).await?;
    Ok(tokio::spawn(async move {
        let stop = tokio_util::sync::CancellationToken::new();
        // Dropping the task (abort) cancels the token, which stops the listeners.
        let _stop_on_drop = stop.clone().drop_guard();
        let mut ports: BTreeMap<u16, (Arc<crate::MemoryRouter>, BTreeMap<RouteKey, Route>)> = BTreeMap::new();
        while let Some(snapshot) = snapshots.next().await {
            if let Some(e) = &snapshot.error {
                tracing::warn!(error = %e, "discovery is failing; keeping the last good TCP routes");
                status.failed();
                continue;
            }
            status.succeeded();
            let mut wanted = tcp_routes_from_instances(&snapshot.instances);
            for port in wanted.keys().filter(|p| !ports.contains_key(*p)).copied().collect::<Vec<_>>() {
                let addr = SocketAddr::new(bind, port);
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(listener) => {
                        let router = Arc::new(crate::MemoryRouter::new());
                        let proxy = Arc::new(crate::TcpProxy::new(router.clone(), config.clone()));
                        tokio::spawn(proxy.serve(listener, stop.clone().cancelled_owned()));
                        tracing::info!(%addr, "TCP listener opened for discovery routes");
                        ports.insert(port, (router, BTreeMap::new()));
                    }
                    // Retried with the next snapshot; the port's routes wait until then.
                    Err(e) => tracing::error!(%addr, error = %e, "cannot listen for TCP routes from discovery"),
                }
            }
            for (port, (router, owned)) in &mut ports {
                let routes = wanted.remove(port).unwrap_or_default();
                sync_routes(router.as_ref(), owned, routes, "tcp").await;
            }
        }
    }))
}

/// Whether a route source is current, as metrics: `keelson_route_source_stale` (1 while
/// the source fails and the last good routes are served), `keelson_route_source_errors_total`
/// and `keelson_route_source_last_success_seconds` (Unix time). Clones share the values.
#[derive(Debug, Clone, Default)]
pub struct SourceStatus {
    stale: Gauge,
    errors: Counter,
    last_success: Gauge<f64, AtomicU64>,
}

impl SourceStatus {
    /// A status that is not stale and has seen no success yet.
    pub fn new() -> Self {
        SourceStatus::default()
    }

    /// Whether the source is failing now.
    pub fn is_stale(&self) -> bool {
        self.stale.get() == 1
    }

    /// Failures seen (outages, each reported once by the watch).
    pub fn errors(&self) -> u64 {
        self.errors.get()
    }

    /// Registers the three metrics in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "keelson_route_source_stale",
            "1 while the route source fails and the last good routes are served",
            self.stale.clone(),
        );
        registry.register("keelson_route_source_errors", "Route source failures", self.errors.clone());
        registry.register(
            "keelson_route_source_last_success_seconds",
            "When the route source last answered, Unix time",
            self.last_success.clone(),
        );
    }

    fn succeeded(&self) {
        self.stale.set(0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.last_success.set(now);
    }

    fn failed(&self) {
        self.stale.set(1);
        self.errors.inc();
    }
}

/// Keeps `router` in step with `discovery`: every instance tagged `keelson.http.host=<h>`
/// becomes an endpoint of route `h`, marked unhealthy while its health is critical.
/// Only hosts this follower created are changed or removed. The watch resumes by itself
/// after backend errors, and an error never removes routes.
pub async fn follow_discovery(discovery: Arc<dyn Discovery>, router: Arc<dyn Router>) -> Result<JoinHandle<()>> {
    follow_discovery_with(discovery, router, SourceStatus::new()).await
}

/// [`follow_discovery`], reporting into `status` whether the routes are current.
pub async fn follow_discovery_with(discovery: Arc<dyn Discovery>, router: Arc<dyn Router>, status: SourceStatus) -> Result<JoinHandle<()>> {
    let mut snapshots = discovery.watch(Query::all()).await?;
    Ok(tokio::spawn(async move {
        let mut owned: BTreeMap<RouteKey, Route> = BTreeMap::new();
        while let Some(snapshot) = snapshots.next().await {
            if let Some(e) = &snapshot.error {
                // The snapshot is the last good view: keep the routes we have.
                tracing::warn!(error = %e, "discovery is failing; keeping the last good routes");
                status.failed();
                continue;
            }
            status.succeeded();
            sync_routes(router.as_ref(), &mut owned, routes_from_instances(&snapshot.instances), "http").await;
        }
    }))
}
