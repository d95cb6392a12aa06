//! A reverse proxy on hyper that serves any [`Router`].
//!
//! Clients speak HTTP/1.1 or HTTP/2 (h2c by prior knowledge in clear text, ALPN over TLS
//! with [`Proxy::serve_tls`]); upstreams speak HTTP/1.1 or, per route, h2c
//! ([`UpstreamProtocol`]), which carries gRPC with its trailers. HTTP/1.1 upgrades
//! (WebSocket and others) are tunnelled once the upstream answers 101.
//!
//! Per request: one lock-free snapshot load, one hash lookup, one atomic increment to pick
//! the endpoint. Upstream connections are pooled (keep-alive on by default). Errors get a
//! plain-text body that says what failed: 404 no route, 503 no healthy endpoint,
//! 502 upstream unreachable or broken, 504 upstream too slow.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, HOST, TE, UPGRADE};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::{AccessLog, AccessRecord};
use crate::balance::OutlierPolicy;
use crate::metrics::ProxyMetrics;
use crate::router::Router;
use crate::table::UpstreamProtocol;
use crate::tls::CertStore;

/// The body type the proxy answers with.
pub type ProxyBody = BoxBody<Bytes, crate::BodyError>;

/// Proxy timeouts and pool settings. Defaults suit a LAN upstream.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyConfig {
    /// Time to establish an upstream TCP connection (default 2 s).
    pub connect_timeout: Duration,
    /// Time from the request being sent upstream whole (its body included) to the
    /// response headers (default 30 s).
    pub upstream_timeout: Duration,
    /// Longest pause inside a request or response body being forwarded, and longest a
    /// write to a client may stay blocked (default 60 s): a client that stops uploading
    /// or stops reading, or an upstream that stops in the middle of its answer, is cut,
    /// and the other side sees the connection closed.
    pub body_idle_timeout: Duration,
    /// Time a client has to send its request headers; protects against slowloris. It is
    /// also the idle timeout of HTTP/1.1 keep-alive connections: one that sends nothing
    /// for this long is closed (default 10 s).
    pub header_read_timeout: Duration,
    /// How long an idle upstream connection stays pooled (default 90 s).
    pub pool_idle_timeout: Duration,
    /// Idle upstream connections kept per endpoint (default 64).
    pub pool_max_idle_per_host: usize,
    /// How long shutdown waits for in-flight requests (default 10 s).
    pub drain_timeout: Duration,
    /// How long upgraded connections (WebSockets) run on after shutdown began or after
    /// their endpoint left the route, so clients can finish and reconnect elsewhere
    /// (default 30 s).
    pub upgrade_drain_grace: Duration,
    /// Time a client has to complete the TLS handshake (default 10 s).
    pub tls_handshake_timeout: Duration,
    /// When failing endpoints are ejected (default: after 1 failure, 2 s doubling to 30 s).
    pub outlier: OutlierPolicy,
    /// Largest request head (request line and headers; default 32 KiB); larger gets 431
    /// and the connection is closed.
    pub max_header_bytes: usize,
    /// Circuit breaker: requests in flight to one route at most (default 1024, as
    /// Envoy's per-cluster default). Beyond it the proxy answers 503 at once instead of
    /// queueing more work on an upstream that is already behind.
    pub max_in_flight_per_route: u64,
    /// Retries per request at most (default 2). Only idempotent requests without a body
    /// are retried, only after a connect failure (nothing was sent), and only within the
    /// retry budget.
    pub max_retries: u32,
    /// Retries allowed as a share of requests (default 0.2), on top of `retry_floor_per_sec`.
    pub retry_ratio: f64,
    /// Retries allowed per second whatever the traffic (default 10).
    pub retry_floor_per_sec: f64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: Duration::from_secs(2),
            upstream_timeout: Duration::from_secs(30),
            body_idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 64,
            drain_timeout: Duration::from_secs(10),
            upgrade_drain_grace: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            outlier: OutlierPolicy::default(),
            max_header_bytes: 32 * 1024,
            max_in_flight_per_route: 1024,
            max_retries: 2,
            retry_ratio: 0.2,
            retry_floor_per_sec: 10.0,
        }
    }
}

/// A reverse proxy over a [`Router`].
#[derive(Debug)]
pub struct Proxy {
    router: Arc<dyn Router>,
    client: Client<HttpConnector, ProxyBody>,
    /// For routes whose upstream speaks h2c (gRPC): one multiplexed connection per endpoint.
    h2_client: Client<HttpConnector, ProxyBody>,
    /// Upgraded connections (WebSockets), which outlive their HTTP exchange.
    tunnels: TaskTracker,
    close_tunnels: CancellationToken,
    config: ProxyConfig,
    budget: RetryBudget,
    metrics: ProxyMetrics,
    access_log: Option<AccessLog>,
}

/// What routing a request found out, for metrics and the access log.
#[derive(Debug, Default)]
struct Outcome {
    /// The matched route's name.
    route: Option<String>,
    /// The last upstream tried.
    upstream: Option<SocketAddr>,
}

/// Retries as a token bucket: each request deposits `ratio` tokens, time deposits
/// `floor_per_sec`; a retry takes one. Under a broad outage retries stay a small share of
/// traffic instead of multiplying it (a retry storm).
#[derive(Debug)]
struct RetryBudget {
    bucket: crate::rate_limit::TokenBucket,
    ratio: f64,
}

impl RetryBudget {
    fn new(ratio: f64, floor_per_sec: f64) -> Self {
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

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Headers that describe one hop's connection and must not be forwarded (RFC 9110 7.6.1),
/// plus the legacy `proxy-connection` and `keep-alive`.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

impl Proxy {
    /// A proxy serving `router`'s routes.
    pub fn new(router: Arc<dyn Router>, config: ProxyConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new());
        let client = builder.build(connector.clone());
        let h2_client = builder.http2_only(true).build(connector);
        let budget = RetryBudget::new(config.retry_ratio, config.retry_floor_per_sec);
        Proxy {
            router,
            client,
            h2_client,
            tunnels: TaskTracker::new(),
            close_tunnels: CancellationToken::new(),
            config,
            budget,
            metrics: ProxyMetrics::default(),
            access_log: None,
        }
    }

    /// Counts into `other`'s metrics instead of its own: several proxies over one
    /// router (one runtime per core, say) then report as one.
    pub fn with_metrics_of(mut self, other: &Proxy) -> Self {
        self.metrics = other.metrics.clone();
        self
    }

    /// Logs every request to `log` (see [`AccessLog`]).
    pub fn with_access_log(mut self, log: AccessLog) -> Self {
        self.access_log = Some(log);
        self
    }

    /// The connection builder: HTTP/1.1 with upgrades and HTTP/2, told apart by the
    /// connection preface (h2c prior knowledge; over TLS ALPN has agreed already).
    fn server_builder(&self) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.header_read_timeout)
            // hyper's parser enforces the head limit (431 and close) before a request
            // exists, so the per-request path does no header accounting. The read
            // buffer bounds the head (8 KiB at least, hyper's minimum).
            .max_buf_size(self.config.max_header_bytes.max(8 * 1024));
        builder.http2().timer(TokioTimer::new()).max_header_list_size(u32::try_from(self.config.max_header_bytes).unwrap_or(u32::MAX));
        builder
    }

    /// Serves clear-text connections (HTTP/1.1, or h2c by prior knowledge) from
    /// `listener` until `shutdown` completes, then stops accepting and drains: in-flight
    /// requests get up to `drain_timeout`, upgraded connections `upgrade_drain_grace`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        self.serve_with(listener, None, shutdown).await;
    }

    /// Like [`Proxy::serve`], but terminates TLS first: the certificate is chosen by SNI
    /// from `certs` at each handshake (so [`CertStore::set`] rotates it for new
    /// connections without touching open ones) and ALPN picks HTTP/2 or HTTP/1.1.
    pub async fn serve_tls(self: Arc<Self>, listener: TcpListener, certs: Arc<CertStore>, shutdown: impl Future<Output = ()>) {
        let acceptor = tokio_rustls::TlsAcceptor::from(certs.server_config());
        self.serve_with(listener, Some(acceptor), shutdown).await;
    }

    async fn serve_with(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: impl Future<Output = ()>,
    ) {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let builder = self.server_builder();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Typically EMFILE: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let watcher = graceful.watcher();
                    let proxy = self.clone();
                    let builder = builder.clone();
                    match tls.clone() {
                        None => {
                            tokio::spawn(proxy.serve_connection(builder, watcher, stream, peer, false));
                        }
                        Some(acceptor) => {
                            tokio::spawn(async move {
                                match tokio::time::timeout(proxy.config.tls_handshake_timeout, acceptor.accept(stream)).await {
                                    Ok(Ok(stream)) => proxy.serve_connection(builder, watcher, stream, peer, true).await,
                                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                                }
                            });
                        }
                    }
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        if tokio::time::timeout(self.config.drain_timeout, graceful.shutdown()).await.is_err() {
            tracing::warn!(timeout = ?self.config.drain_timeout, "drain timed out; closing remaining connections");
        }
        self.tunnels.close();
        if tokio::time::timeout(self.config.upgrade_drain_grace, self.tunnels.wait()).await.is_err() {
            tracing::info!(open = self.tunnels.len(), grace = ?self.config.upgrade_drain_grace, "closing upgraded connections after the grace period");
            self.close_tunnels.cancel();
            self.tunnels.wait().await;
        }
    }

    async fn serve_connection<I>(
        self: Arc<Self>,
        builder: hyper_util::server::conn::auto::Builder<TokioExecutor>,
        watcher: hyper_util::server::graceful::Watcher,
        io: I,
        peer: SocketAddr,
        secure: bool,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let proxy = self;
        let proxy_idle = proxy.config.body_idle_timeout;
        // Formatted once per connection, not per request.
        let client = Arc::new(ClientInfo::new(peer, secure));
        let service = service_fn(move |req| {
            let (proxy, client) = (proxy.clone(), client.clone());
            async move { Ok::<_, Infallible>(proxy.handle_as(req, &client).await) }
        });
        let io = crate::watched_body::StallGuard::new(io, proxy_idle);
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        if let Err(e) = watcher.watch(conn.into_owned()).await {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
    }

    /// Registers the proxy's metrics in `registry`: `keelson_proxy_requests_total{route,code}`
    /// (`route` empty when none matched), `keelson_proxy_response_seconds`,
    /// `keelson_proxy_retries_total`, `keelson_proxy_retries_denied_total` and
    /// `keelson_proxy_ejections_total`. They count from the proxy's creation.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.metrics.register(registry);
        if let Some(log) = &self.access_log {
            registry.register(
                "keelson_proxy_access_log_dropped",
                "Access log records dropped because the writer fell behind",
                log.dropped_counter(),
            );
        }
    }

    /// Handles one request that arrived in clear text from `client`.
    pub async fn handle(&self, req: Request<Incoming>, client: SocketAddr) -> Response<ProxyBody> {
        self.handle_as(req, &ClientInfo::new(client, false)).await
    }

    /// Handles one request from `client`; `secure` if it came over TLS.
    async fn handle_as(&self, req: Request<Incoming>, client: &ClientInfo) -> Response<ProxyBody> {
        let started = std::time::Instant::now();
        // The access log needs the request's identity after the request is consumed.
        let logged = self.access_log.as_ref().map(|_| {
            let target = req.uri().path_and_query().map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
            (std::time::SystemTime::now(), req.method().to_string(), request_host(&req).unwrap_or_default(), target, req.version())
        });
        let mut outcome = Outcome::default();
        let response = self.route_request(req, client, &mut outcome).await;
        let took = started.elapsed();
        if let (Some(log), Some((at, method, host, target, version))) = (&self.access_log, logged) {
            log.record(AccessRecord {
                time: crate::access_log::timestamp(at),
                client: client.addr,
                protocol: format!("{version:?}"),
                method,
                host,
                target,
                status: response.status().as_u16(),
                route: outcome.route.clone(),
                upstream: outcome.upstream,
                duration_us: crate::access_log::micros(took),
            });
        }
        self.metrics.request(outcome.route, response.status().as_u16(), took);
        response
    }

    /// Routes one request; sets `matched` to the route's host once a route matched.
    async fn route_request(&self, req: Request<Incoming>, client: &ClientInfo, outcome: &mut Outcome) -> Response<ProxyBody> {
        let Some(host) = request_host(&req) else {
            return error(StatusCode::BAD_REQUEST, "missing or invalid Host header".to_owned());
        };
        if let Err(why) = check_path(req.uri().path()) {
            return error(StatusCode::BAD_REQUEST, format!("rejected path: {why}"));
        }
        // Request smuggling (Content-Length and Transfer-Encoding together, or two
        // differing Content-Lengths) is handled by hyper before we see the request: it
        // rejects differing lengths with 400, and for CL+TE it frames by
        // Transfer-Encoding alone, drops Content-Length and closes the connection after
        // answering, which RFC 9112 section 6.1 requires. tests/hostile.rs pins that down.
        let table = self.router.snapshot();
        let Some(route) = table.lookup_path(&host, req.uri().path()) else {
            return error(StatusCode::NOT_FOUND, format!("no route for host {host} and path {}", req.uri().path()));
        };
        outcome.route = Some(route.name().to_owned());
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
            crate::Balancer::ConsistentHash { header } => req.headers().get(header.as_str()).map(|v| v.as_bytes().to_vec()),
            _ => None,
        };
        let protocol = route.route().upstream;
        let offered = upgrade_offer(req.version(), req.headers());
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
        let retryable = is_idempotent(req.method()) && hyper::body::Body::is_end_stream(req.body());
        let (mut parts, body) = req.into_parts();
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
            outcome.upstream = Some(addr);
            let in_flight = crate::InFlight::start(stats.clone());
            let upstream_body = body.take().unwrap_or_else(empty_body);
            let body_pending = !hyper::body::Body::is_end_stream(&upstream_body);
            let upstream = match upstream_request(&parts, upstream_body, &authority, &forward) {
                Ok(r) => r,
                Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
            };
            let client = match protocol {
                UpstreamProtocol::Http1 => &self.client,
                UpstreamProtocol::H2c => &self.h2_client,
            };
            let answer = client.request(upstream);
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

impl Proxy {
    /// The upstream switched protocols: answer the client with the same 101 and copy
    /// bytes both ways between the two upgraded connections until either side closes,
    /// or the drain grace runs out after shutdown began or after the endpoint left the
    /// route.
    fn join_upgrade(
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
                copied = tokio::io::copy_bidirectional(&mut client_io, &mut upstream_io) => {
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
struct RoutedEndpoint {
    host: String,
    path: String,
    id: String,
}

impl RoutedEndpoint {
    fn still_routed(&self, router: &dyn Router) -> bool {
        router.snapshot().lookup_path(&self.host, &self.path).is_some_and(|r| r.route().endpoints.iter().any(|e| e.id == self.id))
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

/// The protocol an HTTP/1.1 request offers to upgrade to, if it offers one properly
/// (`Upgrade` named in `Connection`).
fn upgrade_offer(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
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

/// The client side of a connection, formatted once per connection.
#[derive(Debug)]
struct ClientInfo {
    addr: SocketAddr,
    /// The client's IP as a header value, for X-Forwarded-For.
    ip: HeaderValue,
    /// Whether the connection is TLS.
    secure: bool,
}

impl ClientInfo {
    fn new(addr: SocketAddr, secure: bool) -> Self {
        let ip = HeaderValue::from_str(&addr.ip().to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ClientInfo { addr, ip, secure }
    }
}

/// What the upstream request needs besides the client's request.
struct Forward<'a> {
    client: &'a ClientInfo,
    host: &'a str,
    upgrade: Option<HeaderValue>,
    protocol: UpstreamProtocol,
}

/// Rejects paths an upstream could resolve differently from the router: dot segments
/// (plain or percent-encoded), encoded slashes and backslashes, NUL. Forwarding them as
/// they are would let `/public/../admin` reach what `/admin` routing would have refused.
fn check_path(path: &str) -> Result<(), &'static str> {
    let lower = path.to_ascii_lowercase();
    if !path.starts_with('/') && path != "*" {
        return Err("must start with '/'");
    }
    if lower.contains("%2f") || lower.contains("%5c") || path.contains('\\') {
        return Err("encoded slash or backslash");
    }
    if lower.contains("%00") {
        return Err("NUL byte");
    }
    let decoded = lower.replace("%2e", ".");
    if decoded.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("dot segment");
    }
    Ok(())
}

/// RFC 9110 9.2.2: repeating these has the same effect as sending them once.
fn is_idempotent(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS | http::Method::TRACE | http::Method::PUT | http::Method::DELETE
    )
}

fn empty_body() -> ProxyBody {
    http_body_util::Empty::new().map_err(|never: Infallible| match never {}).boxed()
}

/// The host a request is for: the absolute-form URI's authority, else the Host header;
/// lower-cased, port removed. `None` if absent or malformed.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let authority = match req.uri().authority() {
        Some(a) => a.clone(),
        None => req.headers().get(HOST)?.to_str().ok()?.parse::<http::uri::Authority>().ok()?,
    };
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

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
    // the path is shared with the client's request, not re-parsed.
    let mut target = http::uri::Parts::default();
    target.scheme = Some(http::uri::Scheme::HTTP);
    target.authority = Some(endpoint.clone());
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

/// Removes hop-by-hop headers, including any header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn error(status: StatusCode, message: String) -> Response<ProxyBody> {
    tracing::debug!(%status, %message, "proxy error");
    let body = Full::new(Bytes::from(format!("keelson: {message}\n"))).map_err(|never: Infallible| match never {}).boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}
