//! The proxy's extension point used from outside the crate, as a team would: an auth
//! check that answers 401 before routing, a header added to what goes upstream, a header
//! on every response (the proxy's own errors included), and a custom log line.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keelson_routing::{
    Endpoint, Host, MemoryRouter, Proxy, ProxyBody, ProxyConfig, ProxyHooks, RequestCtx, RequestSummary, Route, RouteChange, Router,
};
use keelson_testkit::http::{echo_server, request};

/// Lets through only `authorization: Bearer <token>`, and tells the upstream who it was.
#[derive(Debug)]
struct BearerAuth {
    token: String,
}

#[async_trait]
impl ProxyHooks for BearerAuth {
    fn filters_requests(&self) -> bool {
        true
    }

    async fn request_filter(&self, request: &mut http::request::Parts, _ctx: &RequestCtx) -> Option<Response<ProxyBody>> {
        let expected = format!("Bearer {}", self.token);
        if request.headers.get(http::header::AUTHORIZATION).is_some_and(|v| v.as_bytes() == expected.as_bytes()) {
            // The credential stops here; the upstream learns only that it was checked.
            request.headers.remove(http::header::AUTHORIZATION);
            request.headers.insert("x-authenticated", HeaderValue::from_static("bearer"));
            return None;
        }
        let body = Full::new(Bytes::from_static(b"who are you?\n")).map_err(|never| match never {}).boxed();
        let mut answer = Response::new(body);
        *answer.status_mut() = StatusCode::UNAUTHORIZED;
        Some(answer)
    }
}

/// Adds a header on the way up and on the way back, and keeps a log line per request.
#[derive(Debug, Default)]
struct Stamp {
    lines: Mutex<Vec<String>>,
}

impl ProxyHooks for Stamp {
    fn upstream_request(&self, request: &mut http::request::Parts, ctx: &RequestCtx) {
        let route = ctx.route().unwrap_or("-").to_owned();
        request.headers.insert("x-route", HeaderValue::from_str(&route).expect("route names are header-safe"));
    }

    fn response_filter(&self, response: &mut http::response::Parts, _ctx: &RequestCtx) {
        response.headers.insert("x-served-by", HeaderValue::from_static("keelson"));
    }

    fn logging(&self, summary: &RequestSummary<'_>) {
        let upstream = summary.ctx.upstream().map_or_else(|| "-".to_owned(), |a| a.to_string());
        let line = format!("{} {} {} {}", summary.request.method, summary.request.uri.path(), summary.status.as_u16(), upstream);
        self.lines.lock().expect("lines").push(line);
    }
}

async fn start(proxy: Proxy) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(Arc::new(proxy).serve(listener, async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

#[tokio::test]
async fn hooks_check_auth_add_headers_and_log_without_touching_the_crate() {
    let (upstream, _server) = echo_server("up").await.expect("upstream");
    let router = Arc::new(MemoryRouter::new());
    router
        .apply(vec![RouteChange::Upsert(Route::new(Host::new("app.test").expect("host"), vec![Endpoint::new("a", upstream)]))])
        .await
        .expect("route");
    let stamp = Arc::new(Stamp::default());
    let proxy = Proxy::new(router.clone(), ProxyConfig::default())
        .with_hooks(Arc::new(BearerAuth { token: "s3cret".into() }))
        .with_hooks(stamp.clone());
    let (addr, _stop) = start(proxy).await;

    // No credential: answered by the hook, never routed; the response filter still runs.
    let denied = request(addr, "GET", "app.test", "/private", &[]).await.expect("denied");
    assert_eq!(denied.status, 401);
    assert_eq!(denied.body, "who are you?\n");
    assert_eq!(denied.headers.get("x-served-by").map(String::as_str), Some("keelson"));

    // With it: routed, the credential removed, the hooks' headers added upstream.
    let allowed = request(addr, "GET", "app.test", "/private", &[("authorization", "Bearer s3cret")]).await.expect("allowed");
    assert_eq!(allowed.status, 200);
    let seen: Vec<&str> = allowed.body.lines().collect();
    assert_eq!(seen[0], "up");
    assert!(seen.contains(&"x-authenticated: bearer"), "{seen:?}");
    assert!(seen.contains(&"x-route: app.test"), "{seen:?}");
    assert!(!seen.iter().any(|l| l.starts_with("authorization")), "the credential never leaves the proxy: {seen:?}");
    assert_eq!(allowed.headers.get("x-served-by").map(String::as_str), Some("keelson"));

    // The proxy's own error goes through the response filter too.
    let unrouted = request(addr, "GET", "nowhere.test", "/", &[("authorization", "Bearer s3cret")]).await.expect("404");
    assert_eq!(unrouted.status, 404);
    assert_eq!(unrouted.headers.get("x-served-by").map(String::as_str), Some("keelson"));

    let lines = stamp.lines.lock().expect("lines").clone();
    assert_eq!(lines, vec!["GET /private 401 -".to_owned(), format!("GET /private 200 {upstream}"), "GET / 404 -".to_owned()]);
}
