//! Idle clear-text connections are parked (hyper and its buffers dropped, the socket
//! kept) and come back for the client's next request; nothing the client sent or is
//! waiting for is lost, and parked connections still close on their idle timeout and on
//! shutdown. Driven over raw TCP, so every byte on the wire is the test's own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keelson_routing::{Endpoint, Host, MemoryRouter, Proxy, ProxyConfig, Route, RouteChange, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const QUIET: Duration = Duration::from_millis(100);

struct Edge {
    addr: SocketAddr,
    proxy: Arc<Proxy>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<()>,
}

/// A proxy in front of an echo upstream (`h.test`) and one that answers after 600 ms
/// (`slow.test`), parking after `QUIET`.
async fn edge(header_read_timeout: Duration) -> Edge {
    let (up, task) = keelson_testkit::http::echo_server("up").await.expect("upstream");
    std::mem::forget(task);
    let slow = slow_upstream().await;
    let router = Arc::new(MemoryRouter::new());
    router
        .apply(vec![
            RouteChange::Upsert(Route::new(Host::new("h.test").expect("host"), vec![Endpoint::new("up", up)])),
            RouteChange::Upsert(Route::new(Host::new("slow.test").expect("host"), vec![Endpoint::new("slow", slow)])),
        ])
        .await
        .expect("apply");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = {
        let mut built = ProxyConfig::default();
        built.park_idle_after = Some(QUIET);
        built.header_read_timeout = header_read_timeout;
        built.drain_timeout = Duration::from_secs(2);
        built
    };
    let proxy = Arc::new(Proxy::new(router, config));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(proxy.clone().serve(listener, async move {
        let _ = stopped.await;
    }));
    Edge { addr, proxy, stop: Some(stop), served }
}

/// An upstream that answers every request 600 ms late.
async fn slow_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|_req| async {
                tokio::time::sleep(Duration::from_millis(600)).await;
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(Bytes::from_static(b"late\n"))))
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    addr
}

fn parked(proxy: &Proxy) -> i64 {
    let mut registry = prometheus_client::registry::Registry::default();
    proxy.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    text.lines()
        .find_map(|l| l.strip_prefix("keelson_proxy_connections_parked "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the parked gauge is exported")
}

/// A keep-alive client that reads answers one at a time, keeping bytes that belong to
/// the next one (pipelined answers may arrive in one read).
struct Client {
    s: TcpStream,
    pending: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client { s: TcpStream::connect(addr).await.expect("connect"), pending: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write");
    }

    /// One whole response (headers and a Content-Length body).
    async fn response(&mut self) -> String {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = self.pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.pending[..end]).to_ascii_lowercase();
                let length: usize =
                    head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                if self.pending.len() >= end + 4 + length {
                    let answer: Vec<u8> = self.pending.drain(..end + 4 + length).collect();
                    return String::from_utf8_lossy(&answer).into_owned();
                }
            }
            let n = tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut buf)).await.expect("an answer within 5 s").expect("read");
            assert!(n > 0, "the proxy closed the connection; got so far: {}", String::from_utf8_lossy(&self.pending));
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Waits for the proxy to close the connection, with nothing more sent.
    async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut rest = Vec::new();
        matches!(tokio::time::timeout(limit, self.s.read_to_end(&mut rest)).await, Ok(Ok(0)))
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..100 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what} did not happen within 2 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_parked_and_serves_its_next_request() {
    let edge = edge(Duration::from_secs(10)).await;
    let mut s = Client::connect(edge.addr).await;
    for round in 0..3 {
        s.send(format!("GET /r{round} HTTP/1.1\r\nHost: h.test\r\n\r\n").as_bytes()).await;
        let answer = s.response().await;
        assert!(answer.starts_with("HTTP/1.1 200"), "round {round}: {answer}");
        assert!(!answer.to_ascii_lowercase().contains("connection: close"), "round {round}: keep-alive kept: {answer}");
        eventually("parking", || parked(&edge.proxy) == 1).await;
    }
    drop(s);
    eventually("the parked gauge falling when the client leaves", || parked(&edge.proxy) == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_split_across_quiet_periods_or_waiting_on_its_upstream_is_never_cut() {
    let edge = edge(Duration::from_secs(10)).await;
    let mut s = Client::connect(edge.addr).await;
    // Half a head, then silence for several periods: hyper holds those bytes, so the
    // connection must not be parked under them.
    s.send(b"GET /split HTTP/1.1\r\nHo").await;
    tokio::time::sleep(QUIET * 5).await;
    assert_eq!(parked(&edge.proxy), 0, "parked with half a request read");
    s.send(b"st: h.test\r\nX-Req: split\r\n\r\n").await;
    let answer = s.response().await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("x-req: split"), "{answer}");
    // A request whose upstream takes six quiet periods to answer.
    s.send(b"GET /late HTTP/1.1\r\nHost: slow.test\r\n\r\n").await;
    let answer = s.response().await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("late\n"), "{answer}");
    assert!(!answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    // Two pipelined requests in one write, both answered in order.
    s.send(b"GET / HTTP/1.1\r\nHost: h.test\r\nX-Req: p1\r\n\r\nGET / HTTP/1.1\r\nHost: h.test\r\nX-Req: p2\r\n\r\n").await;
    let (first, second) = (s.response().await, s.response().await);
    assert!(first.contains("x-req: p1") && second.contains("x-req: p2"), "{first}\n{second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_closes_after_the_idle_timeout_and_on_shutdown() {
    let mut edge = edge(Duration::from_millis(700)).await;
    let mut idle = Client::connect(edge.addr).await;
    idle.send(b"GET / HTTP/1.1\r\nHost: h.test\r\n\r\n").await;
    idle.response().await;
    eventually("parking", || parked(&edge.proxy) == 1).await;
    assert!(idle.closed_within(Duration::from_secs(3)).await, "closed after the idle timeout, with nothing sent");

    let mut waiting = Client::connect(edge.addr).await;
    waiting.send(b"GET / HTTP/1.1\r\nHost: h.test\r\n\r\n").await;
    waiting.response().await;
    eventually("parking", || parked(&edge.proxy) == 1).await;
    let _ = edge.stop.take().map(|stop| stop.send(()));
    tokio::time::timeout(Duration::from_secs(3), &mut edge.served).await.expect("shutdown does not wait on a parked connection").ok();
    assert!(waiting.closed_within(Duration::from_secs(1)).await, "closed on shutdown");
    assert_eq!(parked(&edge.proxy), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_connections_are_never_parked() {
    let edge = edge(Duration::from_secs(10)).await;
    let stream = TcpStream::connect(edge.addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("h2");
    tokio::spawn(conn);
    for round in 0..2 {
        let req = hyper::Request::get("http://h.test/h2").body(Empty::<Bytes>::new()).expect("request");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200, "round {round}");
        resp.into_body().collect().await.expect("body");
        tokio::time::sleep(QUIET * 4).await;
        assert_eq!(parked(&edge.proxy), 0, "an h2 connection was parked");
    }
}
