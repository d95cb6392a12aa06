//! HTTP/1.1 upgrades (WebSocket and others): the offer forwarded upstream, and after the
//! upstream's 101 the two upgraded connections joined until either side closes, shutdown's
//! grace runs out, or the endpoint leaves its route.

use std::net::SocketAddr;
use std::time::Duration;

use http::header::{HeaderMap, HeaderValue, CONNECTION, UPGRADE};
use http::{Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::proxy::checks::strip_hop_by_hop;
use crate::proxy::respond::{empty_body, error};
use crate::proxy::{Proxy, ProxyBody};
use crate::router::Router;

impl Proxy {
    /// The upstream switched protocols: answer the client with the same 101 and copy
    /// bytes both ways between the two upgraded connections until either side closes,
    /// or the drain grace runs out after shutdown began or after the endpoint left the
    /// route.
    pub(crate) fn join_upgrade(
        &self,
        mut resp: Response<Incoming>,
        upgrade: Option<(HeaderValue, Option<hyper::upgrade::OnUpgrade>)>,
        addr: SocketAddr,
        routed: Option<RoutedEndpoint>,
    ) -> Response<ProxyBody> {
        let Some((offer, Some(client_side))) = upgrade else {
            // 101 to a request that offered no upgrade breaks HTTP/1.1 framing.
            return error(StatusCode::BAD_GATEWAY, format!("upstream {addr} switched protocols without being asked"));
        };
        let upstream_side = hyper::upgrade::on(&mut resp);
        let close = self.close_tunnels.clone();
        let (router, grace) = (self.router.clone(), self.config.upgrade_drain_grace);
        // Resolves `grace` after the endpoint stopped being routed; never without one.
        let removed = async move {
            let Some(routed) = routed else { return std::future::pending().await };
            loop {
                tokio::time::sleep(ROUTE_RECHECK).await;
                if !routed.still_routed(router.as_ref()) {
                    tracing::debug!(%addr, grace = ?grace, "endpoint left its route; closing its upgraded connection after the grace");
                    tokio::time::sleep(grace).await;
                    return;
                }
            }
        };
        self.tunnels.spawn(async move {
            let (client_io, upstream_io) = match tokio::join!(client_side, upstream_side) {
                (Ok(c), Ok(u)) => (c, u),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::debug!(%addr, error = %e, "upgrade failed");
                    return;
                }
            };
            let (mut client_io, mut upstream_io) = (TokioIo::new(client_io), TokioIo::new(upstream_io));
            tokio::select! {
                copied = crate::proxy::tunnel::copy_both_ways(&mut client_io, &mut upstream_io) => {
                    if let Err(e) = copied {
                        tracing::debug!(%addr, error = %e, "upgraded connection ended with an error");
                    }
                }
                () = close.cancelled() => tracing::debug!(%addr, "upgraded connection closed by shutdown"),
                () = removed => tracing::debug!(%addr, "upgraded connection closed: its endpoint was removed"),
            }
        });
        let (mut parts, _) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(UPGRADE, offer);
        Response::from_parts(parts, empty_body())
    }
}

/// How often an upgraded connection checks that its endpoint is still routed.
const ROUTE_RECHECK: Duration = Duration::from_millis(500);

/// Where an upgraded connection was routed, to notice when its endpoint goes away.
#[derive(Debug)]
pub(crate) struct RoutedEndpoint {
    pub(crate) host: String,
    pub(crate) path: String,
    pub(crate) id: String,
}

impl RoutedEndpoint {
    fn still_routed(&self, router: &dyn Router) -> bool {
        router.snapshot().lookup_path(&self.host, &self.path).is_some_and(|r| r.route().endpoints.iter().any(|e| e.id == self.id))
    }
}

/// The protocol an HTTP/1.1 request offers to upgrade to, if it offers one properly
/// (`Upgrade` named in `Connection`).
pub(crate) fn upgrade_offer(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let offer = headers.get(UPGRADE)?;
    let connection_names_upgrade = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    connection_names_upgrade.then(|| offer.clone())
}
