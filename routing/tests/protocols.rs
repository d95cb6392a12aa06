//! HTTP/2 (h2c and ALPN), gRPC trailers, WebSocket upgrades and TLS with SNI through the
//! proxy, each against a real server and a real client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keelson_routing::{CertStore, Endpoint, Error, Host, MemoryRouter, Proxy, ProxyConfig, Route, RouteChange, Router, UpstreamProtocol};
use keelson_testkit::http::{echo_server, request, websocket_echo};
use keelson_testkit::tls::{self, TestCert};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

struct Running {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_proxy(router: Arc<dyn Router>, config: ProxyConfig, certs: Option<Arc<CertStore>>) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy = Arc::new(Proxy::new(router, config));
    let shutdown = async move {
        let _ = stopped.await;
    };
    let task = match certs {
        None => tokio::spawn(proxy.serve(listener, shutdown)),
        Some(certs) => tokio::spawn(proxy.serve_tls(listener, certs, shutdown)),
    };
    Running { addr, stop, task }
}

async fn route(router: &MemoryRouter, route: Route) {
    router.apply(vec![RouteChange::Upsert(route)]).await.expect("apply");
}

fn host(name: &str) -> Host {
    Host::new(name).expect("host")
}

/// An HTTP/2 connection over any byte stream; requests go through the returned sender.
async fn h2_handshake<I>(io: I) -> hyper::client::conn::http2::SendRequest<Full<Bytes>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

fn h2_get(authority: &str, path: &str) -> Request<Full<Bytes>> {
    Request::builder().uri(format!("http://{authority}{path}")).body(Full::new(Bytes::new())).expect("request")
}

async fn body_text(resp: Response<Incoming>) -> String {
    String::from_utf8_lossy(&resp.into_body().collect().await.expect("body").to_bytes()).into_owned()
}

#[tokio::test]
async fn h2c_clients_multiplex_streams_to_an_http1_upstream() {
    let (up, _t) = echo_server("up-1").await.expect("echo");
    let router = Arc::new(MemoryRouter::new());
    route(&router, Route::new(host("h2.test"), vec![Endpoint::new("a", up)])).await;
    let proxy = start_proxy(router, ProxyConfig::default(), None).await;

    let sender = h2_handshake(TcpStream::connect(proxy.addr).await.expect("connect")).await;
    let streams = (0..10).map(|i| {
        let mut sender = sender.clone();
        async move {
            let resp = sender.send_request(h2_get("h2.test", &format!("/s/{i}"))).await.expect("h2 response");
            assert_eq!(resp.version(), Version::HTTP_2);
            assert_eq!(resp.status(), StatusCode::OK);
            body_text(resp).await
        }
    });
    for body in futures::future::join_all(streams).await {
        assert!(body.starts_with("up-1\n"), "{body}");
        // The HTTP/1.1 upstream needs a Host header, which HTTP/2 clients put in :authority.
        assert!(body.contains("host: h2.test\n"), "{body}");
        assert!(body.contains("x-forwarded-proto: http\n"), "{body}");
    }
    let _ = proxy.stop.send(());
    proxy.task.await.expect("proxy stopped");
}

/// A gRPC-shaped h2c upstream: answers with a body and `grpc-status` trailers, and tells
/// in a header what `te` it received.
async fn grpc_like_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let te = req.headers().get("te").map(|v| v.to_str().unwrap_or("?").to_owned()).unwrap_or_default();
                    let version = format!("{:?}", req.version());
                    let request_body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    trailers.insert("grpc-message", http::HeaderValue::from_static("served"));
                    let frames: Vec<Result<Frame<Bytes>, Infallible>> =
                        vec![Ok(Frame::data(Bytes::from([b"echo:".as_slice(), &request_body].concat()))), Ok(Frame::trailers(trailers))];
                    let resp = Response::builder()
                        .header("content-type", "application/grpc")
                        .header("x-saw-te", te)
                        .header("x-saw-version", version)
                        .body(StreamBody::new(futures::stream::iter(frames)))
                        .expect("response");
                    Ok::<_, Infallible>(resp)
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn grpc_passes_through_to_an_h2c_upstream_with_trailers() {
    let up = grpc_like_upstream().await;
    let router = Arc::new(MemoryRouter::new());
    route(&router, Route::new(host("grpc.test"), vec![Endpoint::new("g", up)]).with_upstream(UpstreamProtocol::H2c)).await;
    let proxy = start_proxy(router, ProxyConfig::default(), None).await;

    let mut sender = h2_handshake(TcpStream::connect(proxy.addr).await.expect("connect")).await;
    let req = Request::post("http://grpc.test/pkg.Service/Method")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-saw-te"], "trailers", "gRPC needs te: trailers end to end");
    assert_eq!(resp.headers()["x-saw-version"], "HTTP/2.0");
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().expect("trailers reach the client");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "served");
    assert_eq!(collected.to_bytes().as_ref(), b"echo:\0\0\0\0\x02hi");

    // An HTTP/1.1 client reaches the same h2c upstream; the proxy translates.
    let reply = request(proxy.addr, "GET", "grpc.test", "/plain", &[]).await.expect("h1 request");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["x-saw-version"], "HTTP/2.0");
    let _ = proxy.stop.send(());
}

async fn websocket_client(proxy: SocketAddr, url: &str) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(proxy).await.expect("connect");
    let req = url.into_client_request().expect("ws request");
    let (ws, resp) = tokio_tungstenite::client_async(req, stream).await.expect("websocket handshake through the proxy");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

async fn echo_round_trip(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>, text: &str) -> Option<String> {
    ws.send(Message::text(text)).await.ok()?;
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.ok()?? {
        Ok(Message::Text(t)) => Some(t.to_string()),
        _ => None,
    }
}

#[tokio::test]
async fn websockets_are_tunnelled_and_outlive_shutdown_only_for_the_grace() {
    let up = websocket_echo().await.expect("websocket server");
    let router = Arc::new(MemoryRouter::new());
    route(&router, Route::new(host("ws.test"), vec![Endpoint::new("w", up)])).await;
    let config = {
        let mut built = ProxyConfig::default();
        built.upgrade_drain_grace = Duration::from_millis(700);
        built
    };
    let proxy = start_proxy(router, config, None).await;

    let mut ws = websocket_client(proxy.addr, "ws://ws.test/chat").await;
    for i in 0..3 {
        let text = format!("hello {i}");
        assert_eq!(echo_round_trip(&mut ws, &text).await.as_deref(), Some(text.as_str()));
    }

    // Shutdown closes the listener at once but lets the WebSocket run for the grace.
    let _ = proxy.stop.send(());
    assert_eq!(echo_round_trip(&mut ws, "during drain").await.as_deref(), Some("during drain"), "WebSocket cut before its grace");
    tokio::time::timeout(Duration::from_secs(10), proxy.task).await.expect("proxy stops after the grace").expect("join");
    assert_eq!(echo_round_trip(&mut ws, "after grace").await, None, "WebSocket still open after the grace");
}

#[tokio::test]
async fn an_upgrade_the_upstream_declines_is_an_ordinary_response() {
    let (up, _t) = echo_server("plain").await.expect("echo");
    let router = Arc::new(MemoryRouter::new());
    route(&router, Route::new(host("up.test"), vec![Endpoint::new("p", up)])).await;
    let proxy = start_proxy(router, ProxyConfig::default(), None).await;
    let reply = request(proxy.addr, "GET", "up.test", "/", &[("connection", "upgrade"), ("upgrade", "websocket")]).await.expect("request");
    assert_eq!(reply.status, 200);
    // The offer was forwarded (the upstream decides), and declined by answering normally.
    assert!(reply.body.contains("upgrade: websocket\n"), "{}", reply.body);
    let _ = proxy.stop.send(());
}

// ---- TLS ----

fn test_cert(names: &[&str]) -> TestCert {
    tls::test_cert(names).expect("certificate")
}

async fn tls_connect(
    proxy: SocketAddr,
    sni: &str,
    roots: &[&TestCert],
) -> std::io::Result<(TlsStream<TcpStream>, CertificateDer<'static>, Option<Vec<u8>>)> {
    tls::handshake(proxy, sni, roots).await.map(|h| (h.stream, h.leaf, h.alpn))
}

async fn tls_setup() -> (Running, Arc<CertStore>, SocketAddr) {
    let (up, _t) = echo_server("secure").await.expect("echo");
    let router = Arc::new(MemoryRouter::new());
    route(&router, Route::new(host("a.test"), vec![Endpoint::new("a", up)])).await;
    route(&router, Route::new(host("x.b.test"), vec![Endpoint::new("b", up)])).await;
    let certs = CertStore::new();
    let proxy = start_proxy(router, ProxyConfig::default(), Some(certs.clone())).await;
    (proxy, certs, up)
}

#[tokio::test]
async fn tls_chooses_the_certificate_by_sni_and_negotiates_h2() {
    let (proxy, certs, _) = tls_setup().await;
    let a = test_cert(&["a.test"]);
    let b = test_cert(&["*.b.test"]);
    certs.set("a.test", a.chain_pem.as_bytes(), a.key_pem.as_bytes()).expect("set a");
    certs.set("*.b.test", b.chain_pem.as_bytes(), b.key_pem.as_bytes()).expect("set b");
    assert_eq!(certs.names(), vec!["*.b.test".to_owned(), "a.test".to_owned()]);

    let (tls, leaf, alpn) = tls_connect(proxy.addr, "a.test", &[&a, &b]).await.expect("TLS to a.test");
    assert_eq!(leaf, a.der, "a.test must get its own certificate");
    assert_eq!(alpn.as_deref(), Some(b"h2".as_slice()));
    let mut sender = h2_handshake(tls).await;
    let resp = sender.send_request(h2_get("a.test", "/over-tls")).await.expect("response");
    assert_eq!(resp.version(), Version::HTTP_2);
    let body = body_text(resp).await;
    assert!(body.contains("x-forwarded-proto: https\n"), "{body}");

    let (_, leaf, _) = tls_connect(proxy.addr, "x.b.test", &[&a, &b]).await.expect("TLS to x.b.test");
    assert_eq!(leaf, b.der, "the wildcard covers x.b.test");
    let _ = proxy.stop.send(());
}

#[tokio::test]
async fn unknown_sni_is_refused_without_a_fallback_and_served_with_one() {
    let (proxy, certs, _) = tls_setup().await;
    let a = test_cert(&["a.test"]);
    let fallback = test_cert(&["fallback.test"]);
    certs.set("a.test", a.chain_pem.as_bytes(), a.key_pem.as_bytes()).expect("set a");

    let refused = tls_connect(proxy.addr, "nobody.test", &[&a, &fallback]).await;
    assert!(refused.is_err(), "a handshake for an unknown name must fail without a fallback");
    // The refusal harmed nobody else.
    assert!(tls_connect(proxy.addr, "a.test", &[&a]).await.is_ok());

    certs.set_fallback(fallback.chain_pem.as_bytes(), fallback.key_pem.as_bytes()).expect("fallback");
    // The fallback's certificate names another host, so a verifying client still refuses
    // it; what matters is which certificate the proxy offered.
    let offered = tls_connect(proxy.addr, "nobody.test", &[&a, &fallback]).await;
    let message = offered.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("NotValidForName") || message.contains("not valid for name"),
        "expected the fallback certificate, got: {message}"
    );
    let _ = proxy.stop.send(());
}

#[tokio::test]
async fn certificate_rotation_keeps_open_connections_and_serves_new_handshakes() {
    let (proxy, certs, _) = tls_setup().await;
    let old = test_cert(&["a.test"]);
    let new = test_cert(&["a.test"]);
    certs.set("a.test", old.chain_pem.as_bytes(), old.key_pem.as_bytes()).expect("set old");

    let (tls, leaf, _) = tls_connect(proxy.addr, "a.test", &[&old, &new]).await.expect("TLS");
    assert_eq!(leaf, old.der);
    let mut open = h2_handshake(tls).await;
    assert_eq!(open.send_request(h2_get("a.test", "/1")).await.expect("before").status(), StatusCode::OK);

    certs.set("a.test", new.chain_pem.as_bytes(), new.key_pem.as_bytes()).expect("rotate");
    assert_eq!(open.send_request(h2_get("a.test", "/2")).await.expect("open connection survives rotation").status(), StatusCode::OK);
    let (_, leaf, _) = tls_connect(proxy.addr, "a.test", &[&old, &new]).await.expect("TLS after rotation");
    assert_eq!(leaf, new.der, "new handshakes get the rotated certificate");

    assert!(certs.remove("a.test"));
    assert!(tls_connect(proxy.addr, "a.test", &[&old, &new]).await.is_err(), "removed name refused");
    let _ = proxy.stop.send(());
}

#[test]
fn bad_certificates_are_typed_errors_and_keep_the_old_one() {
    let certs = CertStore::new();
    let good = test_cert(&["a.test"]);
    let other = test_cert(&["a.test"]);
    certs.set("a.test", good.chain_pem.as_bytes(), good.key_pem.as_bytes()).expect("good");
    let cases: [(&str, &[u8], &[u8]); 5] = [
        ("a.test", b"not pem", good.key_pem.as_bytes()),
        ("a.test", good.chain_pem.as_bytes(), b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
        ("a.test", good.chain_pem.as_bytes(), other.key_pem.as_bytes()),
        ("bad name!", good.chain_pem.as_bytes(), good.key_pem.as_bytes()),
        ("a.test", b"", good.key_pem.as_bytes()),
    ];
    for (name, chain, key) in cases {
        match certs.set(name, chain, key) {
            Err(Error::InvalidInput { .. }) => {}
            other => panic!("expected InvalidInput for {name:?}, got {other:?}"),
        }
    }
    assert_eq!(certs.names(), vec!["a.test".to_owned()], "failed sets change nothing");
}

#[tokio::test]
async fn the_protocol_tag_routes_grpc_services_from_discovery() {
    use keelson_discovery::{Discovery, MemoryDiscovery, Registration, ServiceName};
    let up = grpc_like_upstream().await;
    let discovery = Arc::new(MemoryDiscovery::memory());
    let router = Arc::new(MemoryRouter::new());
    let _follow = keelson_routing::follow_discovery(discovery.clone(), router.clone()).await.expect("follow");
    let reg = Registration::new(ServiceName::new("greeter").expect("name"), "g1", "127.0.0.1", up.port())
        .with_tag("keelson.http.host=greeter.test")
        .with_tag("keelson.http.protocol=h2c");
    let _h = discovery.register(reg).await.expect("register");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while router.snapshot().lookup("greeter.test").is_none() {
        assert!(tokio::time::Instant::now() < deadline, "route from discovery never appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(router.snapshot().lookup("greeter.test").map(|r| r.route().upstream), Some(UpstreamProtocol::H2c));
    let proxy = start_proxy(router, ProxyConfig::default(), None).await;
    let mut sender = h2_handshake(TcpStream::connect(proxy.addr).await.expect("connect")).await;
    let resp = sender.send_request(h2_get("greeter.test", "/pkg.Greeter/Hello")).await.expect("response");
    assert_eq!(resp.headers()["x-saw-version"], "HTTP/2.0");
    let _ = proxy.stop.send(());
}

#[tokio::test]
async fn a_websocket_outlives_its_endpoints_removal_only_for_the_grace() {
    let up = websocket_echo().await.expect("websocket server");
    let router = Arc::new(MemoryRouter::new());
    route(&router, Route::new(host("live.test"), vec![Endpoint::new("w", up)])).await;
    let config = {
        let mut built = ProxyConfig::default();
        built.upgrade_drain_grace = Duration::from_millis(700);
        built
    };
    let proxy = start_proxy(router.clone(), config, None).await;
    let mut ws = websocket_client(proxy.addr, "ws://live.test/").await;
    assert_eq!(echo_round_trip(&mut ws, "before").await.as_deref(), Some("before"));

    // A route update that keeps the endpoint changes nothing.
    route(&router, Route::new(host("live.test"), vec![Endpoint::new("w", up), Endpoint::new("other", up)])).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(echo_round_trip(&mut ws, "kept").await.as_deref(), Some("kept"), "an update keeping the endpoint closed the WebSocket");

    // Removing the endpoint starts the grace: still open at once, closed after it.
    route(&router, Route::new(host("live.test"), vec![Endpoint::new("other", up)])).await;
    assert_eq!(echo_round_trip(&mut ws, "in grace").await.as_deref(), Some("in grace"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while echo_round_trip(&mut ws, "still?").await.is_some() {
        assert!(tokio::time::Instant::now() < deadline, "WebSocket to a removed endpoint still open after 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = proxy.stop.send(());
}

/// A real gRPC service (tonic's `grpc.health.v1.Health`) behind the proxy, called by
/// tonic's generated client over HTTP/2: the status comes back in the message and
/// `grpc-status` in the trailers, through an h2c route.
#[tokio::test]
async fn a_real_grpc_call_passes_through() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_service_status("keelson.Test", tonic_health::ServingStatus::Serving).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper_util::service::TowerToHyperService::new(service.clone());
            tokio::spawn(hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service));
        }
    });
    let router = Arc::new(MemoryRouter::new());
    route(&router, Route::new(host("localhost"), vec![Endpoint::new("health", upstream)]).with_upstream(UpstreamProtocol::H2c)).await;
    let proxy = start_proxy(router, ProxyConfig::default(), None).await;

    let channel = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).http2_only(true).build_http::<tonic::body::Body>();
    let origin: http::Uri = format!("http://localhost:{}", proxy.addr.port()).parse().expect("origin");
    let mut client = HealthClient::with_origin(channel, origin);
    let reply = client.check(HealthCheckRequest { service: "keelson.Test".into() }).await.expect("gRPC call through the proxy");
    assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);
    let unknown = client.check(HealthCheckRequest { service: "nope".into() }).await.expect_err("unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "the grpc-status trailer made it back: {unknown:?}");
    let _ = proxy.stop.send(());
}
