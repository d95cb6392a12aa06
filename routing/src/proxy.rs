//! An HTTP/1.1 reverse proxy on hyper that serves any [`Router`].
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
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, HOST};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::balance::OutlierPolicy;
use crate::metrics::ProxyMetrics;
use crate::router::Router;

/// The body type the proxy answers with.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Proxy timeouts and pool settings. Defaults suit a LAN upstream.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyConfig {
    /// Time to establish an upstream TCP connection (default 2 s).
    pub connect_timeout: Duration,
    /// Time from sending the request upstream to its response headers (default 30 s).
    pub upstream_timeout: Duration,
    /// Time a client has to send its request headers; protects against slowloris
    /// (default 10 s).
    pub header_read_timeout: Duration,
    /// How long an idle upstream connection stays pooled (default 90 s).
    pub pool_idle_timeout: Duration,
    /// Idle upstream connections kept per endpoint (default 64).
    pub pool_max_idle_per_host: usize,
    /// How long shutdown waits for in-flight requests (default 10 s).
    pub drain_timeout: Duration,
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
            header_read_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 64,
            drain_timeout: Duration::from_secs(10),
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
    config: ProxyConfig,
    budget: RetryBudget,
    metrics: ProxyMetrics,
}

/// Retries as a token bucket: each request deposits `ratio` tokens, time deposits
/// `floor_per_sec`; a retry takes one. Under a broad outage retries stay a small share of
/// traffic instead of multiplying it (a retry storm).
#[derive(Debug)]
struct RetryBudget {
    state: std::sync::Mutex<(f64, std::time::Instant)>,
    ratio: f64,
    floor_per_sec: f64,
}

impl RetryBudget {
    fn new(ratio: f64, floor_per_sec: f64) -> Self {
        RetryBudget { state: std::sync::Mutex::new((floor_per_sec, std::time::Instant::now())), ratio, floor_per_sec }
    }

    fn deposit(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = (s.0 + self.ratio).min(self.cap());
    }

    fn withdraw(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.floor_per_sec).min(self.cap());
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }

    fn cap(&self) -> f64 {
        (self.floor_per_sec * 10.0).max(10.0)
    }
}

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
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        let budget = RetryBudget::new(config.retry_ratio, config.retry_floor_per_sec);
        Proxy { router, client, config, budget, metrics: ProxyMetrics::default() }
    }

    /// Serves connections from `listener` until `shutdown` completes, then stops
    /// accepting and waits up to `drain_timeout` for in-flight requests.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.config.header_read_timeout)
            // hyper's parser enforces the head limit (431 and close) before a request
            // exists, so the per-request path does no header accounting.
            .max_header_size(self.config.max_header_bytes)
            .max_buf_size((self.config.max_header_bytes * 2).max(16 * 1024));
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
                    let proxy = self.clone();
                    let service = service_fn(move |req| {
                        let proxy = proxy.clone();
                        async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
                    });
                    let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(%peer, error = %e, "client connection ended with an error");
                        }
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        if tokio::time::timeout(self.config.drain_timeout, graceful.shutdown()).await.is_err() {
            tracing::warn!(timeout = ?self.config.drain_timeout, "drain timed out; closing remaining connections");
        }
    }

    /// Registers the proxy's metrics in `registry`: `keelson_proxy_requests_total{route,code}`
    /// (`route` empty when none matched), `keelson_proxy_response_seconds`,
    /// `keelson_proxy_retries_total`, `keelson_proxy_retries_denied_total` and
    /// `keelson_proxy_ejections_total`. They count from the proxy's creation.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.metrics.register(registry);
    }

    /// Handles one request from `client`.
    pub async fn handle(&self, req: Request<Incoming>, client: SocketAddr) -> Response<ProxyBody> {
        let started = std::time::Instant::now();
        let mut matched = None;
        let response = self.route_request(req, client, &mut matched).await;
        self.metrics.request(matched, response.status().as_u16(), started.elapsed());
        response
    }

    /// Routes one request; sets `matched` to the route's host once a route matched.
    async fn route_request(&self, req: Request<Incoming>, client: SocketAddr, matched: &mut Option<String>) -> Response<ProxyBody> {
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
        let Some(route) = table.lookup(&host) else {
            return error(StatusCode::NOT_FOUND, format!("no route for host {host}"));
        };
        *matched = Some(host.clone());
        let in_flight = route.in_flight();
        if in_flight >= self.config.max_in_flight_per_route {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("host {host} has {in_flight} requests in flight, the limit is {}", self.config.max_in_flight_per_route),
            );
        }
        // Consistent hashing keys on a request header; the other balancers need no key.
        let key = match &route.route().balancer {
            crate::Balancer::ConsistentHash { header } => req.headers().get(header.as_str()).map(|v| v.as_bytes().to_vec()),
            _ => None,
        };
        drop(table);
        self.budget.deposit();
        let retryable = is_idempotent(req.method()) && has_no_body(req.headers());
        let (parts, body) = req.into_parts();
        // A request with a body is sent once: a streamed body cannot be replayed.
        let mut body = if retryable { None } else { Some(body.boxed()) };
        let mut attempt = 0u32;
        loop {
            let table = self.router.snapshot();
            let Some(route) = table.lookup(&host) else {
                return error(StatusCode::NOT_FOUND, format!("no route for host {host}"));
            };
            let Some(picked) = route.pick_for(key.as_deref()) else {
                return error(StatusCode::SERVICE_UNAVAILABLE, format!("no healthy endpoint for host {host}"));
            };
            let addr = picked.endpoint.addr;
            let stats = picked.stats.clone();
            drop(table);
            let in_flight = crate::InFlight::start(stats.clone());
            let upstream_body = body.take().unwrap_or_else(empty_body);
            let upstream = match upstream_request(&parts, upstream_body, addr, client, &host) {
                Ok(r) => r,
                Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
            };
            match tokio::time::timeout(self.config.upstream_timeout, self.client.request(upstream)).await {
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
                    let (mut parts, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    return Response::from_parts(parts, body.boxed());
                }
            }
        }
    }
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

fn has_no_body(h: &HeaderMap) -> bool {
    !h.contains_key(http::header::TRANSFER_ENCODING) && h.get(http::header::CONTENT_LENGTH).is_none_or(|v| v.as_bytes() == b"0")
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
    addr: SocketAddr,
    client: SocketAddr,
    host: &str,
) -> Result<Request<ProxyBody>, String> {
    let mut parts = Request::new(()).into_parts().0;
    parts.method = original.method.clone();
    parts.uri = original.uri.clone();
    parts.headers = original.headers.clone();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(addr.to_string())
        .path_and_query(path)
        .build()
        .map_err(|e| format!("bad request target: {e}"))?;
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    let forwarded_for = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {}", client.ip()),
        None => client.ip().to_string(),
    };
    set(&mut parts.headers, "x-forwarded-for", &forwarded_for);
    set(&mut parts.headers, "x-forwarded-proto", "http");
    set(&mut parts.headers, "x-forwarded-host", host);
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
