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

mod checks;
mod forward;
mod hooks;
mod parking;
mod respond;
mod tunnel;
mod upgrade;
mod upstream_pool;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::balance::OutlierPolicy;
use crate::metrics::ProxyMetrics;
use crate::router::Router;
use crate::tls::CertStore;

pub use checks::strip_hop_by_hop;
use forward::RetryBudget;
pub use hooks::{ProxyHooks, RequestCtx, RequestSummary};

/// The body type the proxy answers with.
pub type ProxyBody = BoxBody<Bytes, crate::BodyError>;

/// hyper's server connection builder for HTTP/1.1 and HTTP/2.
type AutoBuilder = hyper_util::server::conn::auto::Builder<TokioExecutor>;

/// Proxy timeouts and pool settings. Defaults suit a LAN upstream.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
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
    /// A clear-text HTTP/1 connection quiet this long with every request answered is
    /// parked: hyper's connection and its 16 KiB of buffers are dropped, and the socket
    /// waits for the client's next request holding about 1 KiB (default 1 s; `None`
    /// keeps every connection's buffers for its whole life). See `keelson_proxy_connections_parked`.
    pub park_idle_after: Option<Duration>,
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
            park_idle_after: Some(Duration::from_secs(1)),
        }
    }
}

/// A reverse proxy over a [`Router`].
#[derive(Debug)]
pub struct Proxy {
    router: Arc<dyn Router>,
    /// HTTP/1.1 upstream connections, pooled per endpoint.
    pools: upstream_pool::UpstreamPools,
    /// For routes whose upstream speaks h2c (gRPC): one multiplexed connection per endpoint.
    h2_client: Client<HttpConnector, ProxyBody>,
    /// Upgraded connections (WebSockets), which outlive their HTTP exchange.
    tunnels: TaskTracker,
    close_tunnels: CancellationToken,
    config: ProxyConfig,
    budget: RetryBudget,
    metrics: ProxyMetrics,
    access_log: Option<AccessLog>,
    /// The embedder's hooks, in the order added.
    hooks: Vec<Arc<dyn ProxyHooks>>,
    /// Those of `hooks` with a request filter.
    request_filters: Vec<Arc<dyn ProxyHooks>>,
}

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
        let h2_client = builder.http2_only(true).build(connector);
        let pools = upstream_pool::UpstreamPools::new(config.connect_timeout, config.pool_idle_timeout, config.pool_max_idle_per_host);
        let budget = RetryBudget::new(config.retry_ratio, config.retry_floor_per_sec);
        Proxy {
            router,
            pools,
            h2_client,
            tunnels: TaskTracker::new(),
            close_tunnels: CancellationToken::new(),
            config,
            budget,
            metrics: ProxyMetrics::default(),
            access_log: None,
            hooks: Vec::new(),
            request_filters: Vec::new(),
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

    /// Runs `hooks` at each phase of every request (see [`ProxyHooks`]), after the
    /// built-in metrics and access log and after hooks added before.
    pub fn with_hooks(mut self, hooks: Arc<dyn ProxyHooks>) -> Self {
        if hooks.filters_requests() {
            self.request_filters.push(hooks.clone());
        }
        self.hooks.push(hooks);
        self
    }

    /// Every hook in order: the metrics, the access log if any, then the embedder's.
    fn all_hooks(&self) -> impl Iterator<Item = &dyn ProxyHooks> {
        let builtin = std::iter::once(&self.metrics as &dyn ProxyHooks).chain(self.access_log.iter().map(|l| l as &dyn ProxyHooks));
        builtin.chain(self.hooks.iter().map(|h| h.as_ref()))
    }

    /// The connection builder: HTTP/1.1 with upgrades and HTTP/2, told apart by the
    /// connection preface (h2c prior knowledge; over TLS ALPN has agreed already).
    fn server_builder(&self) -> AutoBuilder {
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
        // Connections finish their requests and end once `draining` is cancelled;
        // `connections` tells when they all have.
        let draining = CancellationToken::new();
        let connections = TaskTracker::new();
        let builder = Arc::new(self.server_builder());
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
                    let (proxy, builder, draining) = (self.clone(), builder.clone(), draining.clone());
                    match tls.clone() {
                        None => {
                            connections.spawn(proxy.serve_clear_text(builder, draining, stream, peer));
                        }
                        Some(acceptor) => {
                            connections.spawn(async move {
                                match tokio::time::timeout(proxy.config.tls_handshake_timeout, acceptor.accept(stream)).await {
                                    Ok(Ok(stream)) => proxy.serve_connection(&builder, &draining, stream, peer).await,
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
        draining.cancel();
        connections.close();
        if tokio::time::timeout(self.config.drain_timeout, connections.wait()).await.is_err() {
            tracing::warn!(timeout = ?self.config.drain_timeout, "drain timed out; closing remaining connections");
        }
        self.tunnels.close();
        if tokio::time::timeout(self.config.upgrade_drain_grace, self.tunnels.wait()).await.is_err() {
            tracing::info!(open = self.tunnels.len(), grace = ?self.config.upgrade_drain_grace, "closing upgraded connections after the grace period");
            self.close_tunnels.cancel();
            self.tunnels.wait().await;
        }
    }

    /// The service hyper calls for each request of one client connection.
    fn service(
        self: &Arc<Self>,
        client: &Arc<ClientInfo>,
    ) -> impl hyper::service::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible, Future: Send + 'static>
           + Clone
           + Send
           + 'static {
        let (proxy, client) = (self.clone(), client.clone());
        service_fn(move |req| {
            let (proxy, client) = (proxy.clone(), client.clone());
            async move { Ok::<_, Infallible>(proxy.handle_as(req, &client).await) }
        })
    }

    /// Serves one connection (TLS) with hyper until it ends, or until `draining`, then
    /// lets its requests finish.
    async fn serve_connection<I>(self: Arc<Self>, builder: &AutoBuilder, draining: &CancellationToken, io: I, peer: SocketAddr)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let client = Arc::new(ClientInfo::new(peer, true));
        let io = crate::watched_body::StallGuard::new(io, self.config.body_idle_timeout);
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), self.service(&client));
        tokio::pin!(conn);
        let ended = tokio::select! {
            ended = conn.as_mut() => ended,
            () = draining.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = ended {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
    }

    /// Serves a clear-text connection in sessions, parking it between them (see
    /// [`parking`]): the socket waits for the client's next request without hyper's
    /// buffers, and closes after `header_read_timeout` without one.
    async fn serve_clear_text(
        self: Arc<Self>,
        builder: Arc<AutoBuilder>,
        draining: CancellationToken,
        stream: TcpStream,
        peer: SocketAddr,
    ) {
        let client = Arc::new(ClientInfo::new(peer, false));
        let socket: parking::SharedSocket = Arc::new(std::sync::Mutex::new(stream));
        let activity = Arc::new(parking::Activity::default());
        let mut parked = None;
        loop {
            let waited = tokio::select! {
                waited = tokio::time::timeout(self.config.header_read_timeout, parking::readable(&socket)) => waited,
                () = draining.cancelled() => return,
            };
            drop(parked.take());
            match waited {
                Ok(Ok(true)) => activity.set_h2(),
                Ok(Ok(false)) => {}
                Ok(Err(_)) | Err(_) => return,
            }
            activity.new_session();
            let io = crate::watched_body::StallGuard::new(
                parking::SessionIo::new(socket.clone(), activity.clone()),
                self.config.body_idle_timeout,
            );
            // Boxed, so that what a session holds (hyper's connection and buffers) is
            // freed when it ends, not kept inside this task while it waits.
            if !Box::pin(self.session(&builder, &draining, io, &client, &activity)).await {
                return;
            }
            parked = Some(self.metrics.parked());
        }
    }

    /// One session: hyper serves the connection until it ends by itself (false), or
    /// until it has been quiet for `park_idle_after` and is ended to park (true).
    async fn session(
        self: &Arc<Self>,
        builder: &AutoBuilder,
        draining: &CancellationToken,
        io: crate::watched_body::StallGuard<parking::SessionIo>,
        client: &Arc<ClientInfo>,
        activity: &parking::Activity,
    ) -> bool {
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), self.service(client));
        tokio::pin!(conn);
        let check = self.config.park_idle_after.unwrap_or(Duration::MAX);
        let may_park = self.config.park_idle_after.is_some() && !activity.is_h2();
        let mut seen = activity.moves();
        let mut drained = false;
        loop {
            tokio::select! {
                ended = conn.as_mut() => {
                    if let Err(e) = ended {
                        tracing::debug!(peer = %client.addr, error = %e, "client connection ended with an error");
                    }
                    return activity.is_parking() && !drained;
                }
                () = tokio::time::sleep(check), if may_park && !activity.is_parking() && !drained => {
                    if activity.quiet_since(seen) {
                        activity.start_parking();
                        conn.as_mut().graceful_shutdown();
                    }
                    seen = activity.moves();
                }
                () = draining.cancelled(), if !drained => {
                    drained = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
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

    /// Handles one request from `client`, running the hooks around routing.
    async fn handle_as(&self, req: Request<Incoming>, client: &ClientInfo) -> Response<ProxyBody> {
        let (started, at) = (Instant::now(), SystemTime::now());
        let (mut parts, body) = req.into_parts();
        let mut ctx = RequestCtx::new(client.addr, client.secure);
        let mut answer = None;
        for hook in &self.request_filters {
            answer = hook.request_filter(&mut parts, &ctx).await;
            if answer.is_some() {
                break;
            }
        }
        let response = match answer {
            Some(response) => response,
            None => self.route_request(&mut parts, body, client, &mut ctx).await,
        };
        let (mut head, body) = response.into_parts();
        for hook in self.all_hooks() {
            hook.response_filter(&mut head, &ctx);
        }
        let summary = RequestSummary { at, request: &parts, ctx: &ctx, status: head.status, duration: started.elapsed() };
        for hook in self.all_hooks() {
            hook.logging(&summary);
        }
        Response::from_parts(head, body)
    }
}

/// The client side of a connection, formatted once per connection.
#[derive(Debug)]
pub(crate) struct ClientInfo {
    pub(crate) addr: SocketAddr,
    /// The client's IP as a header value, for X-Forwarded-For.
    pub(crate) ip: HeaderValue,
    /// Whether the connection is TLS.
    pub(crate) secure: bool,
}

impl ClientInfo {
    fn new(addr: SocketAddr, secure: bool) -> Self {
        let ip = HeaderValue::from_str(&addr.ip().to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ClientInfo { addr, ip, secure }
    }
}
