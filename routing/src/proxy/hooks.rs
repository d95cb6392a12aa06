//! The proxy's extension point: hooks called at fixed phases of every request, in the
//! manner of Pingora's `ProxyHttp`. Each phase has a default that does nothing, so a hook
//! overrides only what it needs. The metrics and the access log are hooks too.
//!
//! Phases, in order:
//! 1. [`ProxyHooks::request_filter`]: the client's request head, before routing; may
//!    change it, or answer it (an auth check's 401) so it never goes upstream.
//! 2. [`ProxyHooks::upstream_request`]: the request about to go to the chosen endpoint,
//!    after hop-by-hop headers are stripped and `X-Forwarded-*` set; once per attempt.
//! 3. [`ProxyHooks::response_filter`]: the response head about to go to the client,
//!    whoever made it (the upstream, the proxy's own error, a request filter).
//! 4. [`ProxyHooks::logging`]: once per request, after its response head is decided.
//!
//! An auth check and a header, from outside the crate (`tests/hooks.rs` runs a fuller
//! one against a real upstream):
//!
//! ```
//! use std::sync::Arc;
//! use keelson_routing::{MemoryRouter, Proxy, ProxyBody, ProxyConfig, ProxyHooks, RequestCtx};
//!
//! #[derive(Debug)]
//! struct ApiKey(String);
//!
//! #[async_trait::async_trait]
//! impl ProxyHooks for ApiKey {
//!     fn filters_requests(&self) -> bool {
//!         true
//!     }
//!
//!     async fn request_filter(&self, req: &mut http::request::Parts, _: &RequestCtx) -> Option<http::Response<ProxyBody>> {
//!         if req.headers.get("x-api-key").is_some_and(|k| k.as_bytes() == self.0.as_bytes()) {
//!             return None; // on to routing
//!         }
//!         use http_body_util::BodyExt;
//!         let body = http_body_util::Empty::new().map_err(|never: std::convert::Infallible| match never {}).boxed();
//!         let mut denied = http::Response::new(body);
//!         *denied.status_mut() = http::StatusCode::UNAUTHORIZED;
//!         Some(denied)
//!     }
//!
//!     fn upstream_request(&self, req: &mut http::request::Parts, _: &RequestCtx) {
//!         req.headers.remove("x-api-key");
//!         req.headers.insert("x-authenticated", http::HeaderValue::from_static("api-key"));
//!     }
//! }
//!
//! let router = Arc::new(MemoryRouter::new());
//! let proxy = Proxy::new(router, ProxyConfig::default()).with_hooks(Arc::new(ApiKey("s3cret".into())));
//! # let _ = proxy;
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use http::{Response, StatusCode};

use crate::proxy::ProxyBody;

/// What the proxy knows about a request beyond its head, as it learns it.
#[derive(Clone, Debug)]
pub struct RequestCtx {
    client: SocketAddr,
    secure: bool,
    host: Option<String>,
    route: Option<Arc<str>>,
    upstream: Option<SocketAddr>,
}

impl RequestCtx {
    pub(crate) fn new(client: SocketAddr, secure: bool) -> Self {
        RequestCtx { client, secure, host: None, route: None, upstream: None }
    }

    pub(crate) fn set_host(&mut self, host: String) {
        self.host = Some(host);
    }

    pub(crate) fn set_route(&mut self, route: Arc<str>) {
        self.route = Some(route);
    }

    pub(crate) fn set_upstream(&mut self, upstream: SocketAddr) {
        self.upstream = Some(upstream);
    }

    /// The client's address.
    pub fn client(&self) -> SocketAddr {
        self.client
    }

    /// Whether the client connected over TLS.
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// The host asked for (lower-case, no port), once the request passed its checks.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// The matched route's name (`host` or `host/path`), once routed.
    pub fn route(&self) -> Option<&str> {
        self.route.as_deref()
    }

    pub(crate) fn route_shared(&self) -> Option<&Arc<str>> {
        self.route.as_ref()
    }

    /// The upstream of the last attempt, once one was made.
    pub fn upstream(&self) -> Option<SocketAddr> {
        self.upstream
    }
}

/// One finished request, for [`ProxyHooks::logging`].
#[derive(Debug)]
pub struct RequestSummary<'a> {
    /// When the request head arrived.
    pub at: SystemTime,
    /// The client's request head (method, target, version, headers).
    pub request: &'a http::request::Parts,
    /// What the proxy learnt (host, route, upstream).
    pub ctx: &'a RequestCtx,
    /// The status answered.
    pub status: StatusCode,
    /// Time from the request head to the response head, retries included.
    pub duration: Duration,
}

/// Hooks into every request a [`Proxy`](crate::Proxy) handles; add them with
/// [`Proxy::with_hooks`](crate::Proxy::with_hooks). Hooks run in the order added, after
/// the built-in metrics and access log. They run on the request path: keep them quick,
/// and do no blocking I/O.
#[async_trait]
pub trait ProxyHooks: Send + Sync + std::fmt::Debug + 'static {
    /// Whether [`ProxyHooks::request_filter`] does anything. Only hooks that say so are
    /// asked, so hooks without a filter cost the request path no allocation.
    fn filters_requests(&self) -> bool {
        false
    }

    /// Before routing: inspect or change the client's request head. Returning a response
    /// answers the request with it (the later hooks' `response_filter` and `logging`
    /// still run); `None` goes on to routing.
    async fn request_filter(&self, _request: &mut http::request::Parts, _ctx: &RequestCtx) -> Option<Response<ProxyBody>> {
        None
    }

    /// The request about to go upstream: add, change or remove headers, or change the
    /// path. Called once per attempt (a retry is a second attempt).
    fn upstream_request(&self, _request: &mut http::request::Parts, _ctx: &RequestCtx) {}

    /// The response head about to go to the client.
    fn response_filter(&self, _response: &mut http::response::Parts, _ctx: &RequestCtx) {}

    /// Once per request, when its response head is decided.
    fn logging(&self, _summary: &RequestSummary<'_>) {}
}
