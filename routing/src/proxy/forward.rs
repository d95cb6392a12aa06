//! Forwarding one HTTP request: route lookup, the route's circuit breaker and rate limit,
//! endpoint choice, the upstream request, timeouts, passive health, and retries within a
//! budget.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST, TE, UPGRADE};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::proxy::checks::{check_path, request_host, strip_hop_by_hop};
use crate::proxy::hooks::RequestCtx;
use crate::proxy::respond::{empty_body, error, root_cause};
use crate::proxy::upgrade::{upgrade_offer, RoutedEndpoint};
use crate::proxy::upstream_pool::UpstreamError;
use crate::proxy::{ClientInfo, Proxy, ProxyBody};
use crate::route::UpstreamProtocol;

impl Proxy {
    /// Routes one request and forwards it; notes the host, route and upstream in `ctx`
    /// as it learns them.
    pub(crate) async fn route_request(
        &self,
        parts: &mut http::request::Parts,
        body: Incoming,
        client: &ClientInfo,
        ctx: &mut RequestCtx,
    ) -> Response<ProxyBody> {
        let Some(host) = request_host(parts) else {
            return error(StatusCode::BAD_REQUEST, "missing or invalid Host header".to_owned());
        };
        ctx.set_host(host.clone());
        if let Err(why) = check_path(parts.uri.path()) {
            return error(StatusCode::BAD_REQUEST, format!("rejected path: {why}"));
        }
        // Request smuggling (Content-Length and Transfer-Encoding together, or two
        // differing Content-Lengths) is handled by hyper before we see the request: it
        // rejects differing lengths with 400, and for CL+TE it frames by
        // Transfer-Encoding alone, drops Content-Length and closes the connection after
        // answering, which RFC 9112 section 6.1 requires. tests/hostile.rs pins that down.
        let table = self.router.snapshot();
        let Some(route) = table.lookup_path(&host, parts.uri.path()) else {
            return error(StatusCode::NOT_FOUND, format!("no route for host {host} and path {}", parts.uri.path()));
        };
        ctx.set_route(route.shared_name());
        let in_flight = route.in_flight();
        if in_flight >= self.config.max_in_flight_per_route {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("route {} has {in_flight} requests in flight, the limit is {}", route.name(), self.config.max_in_flight_per_route),
            );
        }
        if !route.admit() {
            let mut resp = error(StatusCode::TOO_MANY_REQUESTS, format!("route {} is over its rate limit", route.name()));
            resp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            return resp;
        }
        // Consistent hashing keys on a request header; the other balancers need no key.
        let key = match &route.route().balancer {
            crate::Balancer::ConsistentHash { header } => parts.headers.get(header.as_str()).map(|v| v.as_bytes().to_vec()),
            _ => None,
        };
        let protocol = route.route().upstream;
        let offered = upgrade_offer(parts.version, &parts.headers);
        // The first attempt uses the snapshot the checks above used; only a retry loads
        // a new one (the routes may have changed meanwhile).
        let Some(first) = Target::pick(route, key.as_deref(), offered.is_some()) else {
            return error(StatusCode::SERVICE_UNAVAILABLE, format!("no healthy endpoint for host {host}"));
        };
        let mut next = Some(first);
        drop(table);
        self.budget.deposit();
        // Whether there is a body is a property of the body, never of the method or the
        // headers: an HTTP/2 PUT or DELETE may carry one with no content-length.
        let retryable = is_idempotent(&parts.method) && hyper::body::Body::is_end_stream(&body);
        // An HTTP/1.1 upgrade (WebSocket): forward the offer, and if the upstream accepts
        // with 101, join the two upgraded connections.
        let upgrade = offered.map(|offer| (offer, parts.extensions.remove::<hyper::upgrade::OnUpgrade>()));
        // HTTP/2 has no Upgrade (RFC 9113 8.2.2), so an h2c upstream is never offered one.
        let offer = upgrade.as_ref().filter(|_| protocol == UpstreamProtocol::Http1).map(|u| u.0.clone());
        let forward = Forward { client, host: &host, upgrade: offer, protocol };
        // A request with a body is sent once: a streamed body cannot be replayed.
        // A stalled upload is cut after the idle timeout; its end starts the clock on the
        // upstream's answer (an upload to a slow reader can take longer than that).
        // A retryable request has no body: nothing to watch, nothing to allocate.
        let (mut body, mut sent) = if retryable {
            (None, None)
        } else {
            let (watched, sent) = crate::watched_body::Watched::new(body, "request", self.config.body_idle_timeout).with_end_signal();
            (Some(watched.boxed()), Some(sent))
        };
        let mut attempt = 0u32;
        loop {
            let target = match next.take() {
                Some(t) => t,
                None => {
                    let table = self.router.snapshot();
                    let Some(route) = table.lookup_path(&host, parts.uri.path()) else {
                        return error(StatusCode::NOT_FOUND, format!("no route for host {host} and path {}", parts.uri.path()));
                    };
                    let Some(t) = Target::pick(route, key.as_deref(), upgrade.is_some()) else {
                        return error(StatusCode::SERVICE_UNAVAILABLE, format!("no healthy endpoint for host {host}"));
                    };
                    t
                }
            };
            let Target { addr, authority, stats, endpoint_id } = target;
            ctx.set_upstream(addr);
            let in_flight = crate::InFlight::start(stats.clone());
            let upstream_body = body.take().unwrap_or_else(empty_body);
            let body_pending = !hyper::body::Body::is_end_stream(&upstream_body);
            let upstream = match upstream_request(parts, upstream_body, &authority, &forward) {
                Ok(r) => r,
                Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
            };
            let (mut head, upstream_body) = upstream.into_parts();
            for hook in self.all_hooks() {
                hook.upstream_request(&mut head, ctx);
            }
            let upstream = Request::from_parts(head, upstream_body);
            let answer = async {
                match protocol {
                    UpstreamProtocol::Http1 => self.pools.request(addr, upstream).await,
                    UpstreamProtocol::H2c => self.h2_client.request(upstream).await.map_err(UpstreamError::from),
                }
            };
            let timed = async {
                tokio::pin!(answer);
                // Until the request is sent whole, only the body's idle timeout applies.
                if let Some(sent) = sent.take().filter(|_| body_pending) {
                    tokio::select! {
                        r = &mut answer => return Ok(r),
                        _ = sent => {}
                    }
                }
                tokio::time::timeout(self.config.upstream_timeout, answer).await
            };
            match timed.await {
                Err(_) => {
                    if stats.record_failure(&self.config.outlier) {
                        self.metrics.ejection();
                        tracing::warn!(%addr, %host, "upstream ejected after timing out");
                    }
                    in_flight.fail(self.config.upstream_timeout);
                    return error(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("upstream {addr} for host {host} did not answer within {:?}", self.config.upstream_timeout),
                    );
                }
                Ok(Err(e)) => {
                    // A failure counts as a slow answer too, so latency-aware balancing backs off.
                    if stats.record_failure(&self.config.outlier) {
                        self.metrics.ejection();
                        tracing::warn!(%addr, %host, "upstream ejected after failing");
                    }
                    in_flight.fail(self.config.connect_timeout);
                    // Only a connect failure guarantees nothing reached the upstream.
                    if e.is_connect() && retryable && attempt < self.config.max_retries {
                        if self.budget.withdraw() {
                            self.metrics.retry();
                            attempt += 1;
                            continue;
                        }
                        self.metrics.retry_denied();
                    }
                    let what = if e.is_connect() { "is unreachable" } else { "failed" };
                    return error(StatusCode::BAD_GATEWAY, format!("upstream {addr} for host {host} {what}: {}", root_cause(&e)));
                }
                Ok(Ok(resp)) => {
                    stats.record_success();
                    in_flight.finish();
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        let routed = endpoint_id.map(|id| RoutedEndpoint { host: host.clone(), path: parts.uri.path().to_owned(), id });
                        return self.join_upgrade(resp, upgrade, addr, routed);
                    }
                    let (mut parts, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    let body = crate::watched_body::Watched::new(body, "response", self.config.body_idle_timeout);
                    return Response::from_parts(parts, body.boxed());
                }
            }
        }
    }
}

/// Retries as a token bucket: each request deposits `ratio` tokens, time deposits
/// `floor_per_sec`; a retry takes one. Under a broad outage retries stay a small share of
/// traffic instead of multiplying it (a retry storm).
#[derive(Debug)]
pub(crate) struct RetryBudget {
    bucket: crate::rate_limit::TokenBucket,
    ratio: f64,
}

impl RetryBudget {
    pub(crate) fn new(ratio: f64, floor_per_sec: f64) -> Self {
        // Ten seconds of the floor saved up at most (at least ten retries).
        let capacity = (floor_per_sec * 10.0).max(10.0);
        RetryBudget { bucket: crate::rate_limit::TokenBucket::new(floor_per_sec, capacity, floor_per_sec), ratio }
    }

    fn deposit(&self) {
        self.bucket.deposit(self.ratio);
    }

    fn withdraw(&self) -> bool {
        self.bucket.try_take()
    }
}

/// The endpoint one attempt goes to, taken out of a snapshot so the snapshot can go.
struct Target {
    addr: SocketAddr,
    authority: http::uri::Authority,
    stats: Arc<crate::EndpointStats>,
    /// Only for upgrades, which watch whether their endpoint stays routed.
    endpoint_id: Option<String>,
}

impl Target {
    fn pick(route: &crate::RouteEntry, key: Option<&[u8]>, upgrade: bool) -> Option<Target> {
        let picked = route.pick_for(key)?;
        Some(Target {
            addr: picked.endpoint.addr,
            authority: picked.authority.clone(),
            stats: picked.stats,
            endpoint_id: upgrade.then(|| picked.endpoint.id.clone()),
        })
    }
}

/// What the upstream request needs besides the client's request.
struct Forward<'a> {
    client: &'a ClientInfo,
    host: &'a str,
    upgrade: Option<HeaderValue>,
    protocol: UpstreamProtocol,
}

/// RFC 9110 9.2.2: repeating these has the same effect as sending them once.
fn is_idempotent(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS | http::Method::TRACE | http::Method::PUT | http::Method::DELETE
    )
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

fn upstream_request(
    original: &http::request::Parts,
    body: ProxyBody,
    endpoint: &http::uri::Authority,
    fwd: &Forward<'_>,
) -> Result<Request<ProxyBody>, String> {
    let mut parts = Request::new(()).into_parts().0;
    parts.method = original.method.clone();
    parts.headers = original.headers.clone();
    // Built from parts: the endpoint's authority is parsed once per route update, and
    // the path is shared with the client's request, not re-parsed. HTTP/1.1 upstreams get
    // the origin form (the pool knows the address); the HTTP/2 client needs the
    // authority to pick its connection.
    let mut target = http::uri::Parts::default();
    if fwd.protocol == UpstreamProtocol::H2c {
        target.scheme = Some(http::uri::Scheme::HTTP);
        target.authority = Some(endpoint.clone());
    }
    target.path_and_query = Some(original.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
    parts.uri = Uri::from_parts(target).map_err(|e| format!("bad request target: {e}"))?;
    parts.version = match fwd.protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::H2c => Version::HTTP_2,
    };
    // TE is hop-by-hop, but gRPC needs `te: trailers` to reach its HTTP/2 server, and
    // HTTP/2 allows exactly that value (RFC 9113 8.2.2). HTTP/1.1 upstreams never see it.
    let te_trailers =
        fwd.protocol == UpstreamProtocol::H2c && original.headers.get(TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(&mut parts.headers);
    if te_trailers {
        parts.headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    // hyper's HTTP/1.1 client frames a body of unknown length as chunked, except for GET,
    // HEAD and CONNECT, where it would send none at all: say chunked ourselves, so a GET
    // with a streamed body (chunked, or HTTP/2 without a length) arrives whole.
    let unknown_length = !hyper::body::Body::is_end_stream(&body) && hyper::body::Body::size_hint(&body).exact().is_none();
    if fwd.protocol == UpstreamProtocol::Http1 && unknown_length && !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        parts.headers.insert(http::header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    if let Some(offer) = &fwd.upgrade {
        parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(UPGRADE, offer.clone());
    }
    // HTTP/2 clients name the host in :authority, not Host; an HTTP/1.1 upstream needs Host.
    if !parts.headers.contains_key(HOST) {
        if let Some(authority) = original.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(HOST, v);
            }
        }
    }
    let forwarded_for = match parts.headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) => HeaderValue::from_str(&format!("{prior}, {}", fwd.client.addr.ip())).unwrap_or_else(|_| fwd.client.ip.clone()),
        None => fwd.client.ip.clone(),
    };
    parts.headers.insert(X_FORWARDED_FOR, forwarded_for);
    let proto = if fwd.client.secure { "https" } else { "http" };
    parts.headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static(proto));
    set(&mut parts.headers, "x-forwarded-host", fwd.host);
    Ok(Request::from_parts(parts, body))
}

fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}
