//! Routes from a `Discovery` watch: instances tagged `keelson.http.host` (and
//! `keelson.tcp.port`) become routes, kept in step with the catalog.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures::StreamExt;
use keelson_discovery::{Discovery, Instance, Query};
use tokio::task::JoinHandle;

use crate::error::Result;
use crate::route::{Balancer, Endpoint, Host, PathPrefix, Route, RouteKey, UpstreamProtocol};
use crate::router::Router;
use crate::sources::status::SourceStatus;
use crate::sources::sync::sync_routes;

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

/// Groups instances into routes by their [`HTTP_HOST_TAG`]s (an instance with several
/// host tags is in a route for each) and [`HTTP_PATH_TAG`].
/// Instances without a host tag are ignored; ones with an invalid host or path, or a
/// non-IP address, are skipped with a warning (DNS names are not resolved on the
/// request path).
pub fn routes_from_instances(instances: &[Instance]) -> BTreeMap<RouteKey, Route> {
    let mut routes: BTreeMap<RouteKey, Route> = BTreeMap::new();
    for i in instances {
        let hosts = i.tags.iter().filter_map(|t| t.strip_prefix(HTTP_HOST_TAG).and_then(|rest| rest.strip_prefix('=')));
        for tag in hosts {
            add_host_route(&mut routes, i, tag);
        }
    }
    routes
}

/// Puts instance `i` into the route of host `tag` (and its path tag).
fn add_host_route(routes: &mut BTreeMap<RouteKey, Route>, i: &Instance, tag: &str) {
    let host = match Host::new(tag) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(service = %i.service, id = %i.id, error = %e, "ignoring instance with a bad host tag");
            return;
        }
    };
    let path = match i.tag_value(HTTP_PATH_TAG).map(PathPrefix::new).transpose() {
        Ok(p) => p.unwrap_or_default(),
        Err(e) => {
            tracing::warn!(service = %i.service, id = %i.id, error = %e, "ignoring instance with a bad path tag");
            return;
        }
    };
    let Some(endpoint) = endpoint_of(i) else { return };
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
                // A failure is logged inside; the next snapshot syncs again.
                let _ = sync_routes(router.as_ref(), owned, routes, "tcp from discovery").await;
            }
        }
    }))
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
            // A failure is logged inside; the next snapshot syncs again.
            let _ = sync_routes(router.as_ref(), &mut owned, routes_from_instances(&snapshot.instances), "http from discovery").await;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_with_several_host_tags_is_in_a_route_for_each() {
        let instance = Instance {
            service: keelson_discovery::ServiceName::new("shop").expect("name"),
            id: "i1".into(),
            address: "10.0.0.2".into(),
            port: 8080,
            tags: vec![format!("{HTTP_HOST_TAG}=shop.test"), format!("{HTTP_HOST_TAG}=www.shop.test"), format!("{HTTP_HOST_TAG}=Bad Host")],
            meta: Default::default(),
            health: keelson_discovery::Health::Passing,
        };
        let routes = routes_from_instances(&[instance]);
        let hosts: Vec<&str> = routes.keys().map(|(h, _)| h.as_str()).collect();
        assert_eq!(hosts, ["shop.test", "www.shop.test"], "each good host routed, the bad one skipped");
        assert!(routes.values().all(|r| r.endpoints.len() == 1));
    }
}
