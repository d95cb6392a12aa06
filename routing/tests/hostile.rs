//! Hostile input, sent over raw TCP: each rejected with the right status, without
//! affecting other clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keelson_routing::{Endpoint, Host, MemoryRouter, Proxy, ProxyConfig, Route, RouteChange, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn proxy() -> SocketAddr {
    let (up, task) = keelson_testkit::http::echo_server("up").await.expect("upstream");
    // The upstream lives as long as the test process.
    std::mem::forget(task);
    let router = Arc::new(MemoryRouter::new());
    router
        .apply(vec![RouteChange::Upsert(Route::new(Host::new("h.test").expect("host"), vec![Endpoint::new("up", up)]))])
        .await
        .expect("apply");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = {
        let mut built = ProxyConfig::default();
        built.header_read_timeout = Duration::from_millis(500);
        built
    };
    tokio::spawn(Arc::new(Proxy::new(router, config)).serve(listener, std::future::pending()));
    addr
}

/// Sends raw bytes and returns the whole answer; the server must close the
/// connection within 5 s (every request here either says `Connection: close` or is
/// one the server has to hang up on).
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.is_ok();
    assert!(closed, "the proxy kept the connection open after answering: {}", String::from_utf8_lossy(&out));
    String::from_utf8_lossy(&out).into_owned()
}

fn status(answer: &str) -> &str {
    answer.lines().next().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_are_rejected_and_the_connection_closed() {
    let addr = proxy().await;
    let both = raw(addr, b"POST / HTTP/1.1\r\nHost: h.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h.test\r\n\r\n").await;
    // RFC 9112 6.1: frame by Transfer-Encoding alone (or reject), and close the
    // connection after answering, so the bytes after the chunked body are never parsed
    // as a second request.
    assert!(status(&both).starts_with("HTTP/1.1 200") || status(&both).starts_with("HTTP/1.1 400"), "{both}");
    assert_eq!(both.matches("HTTP/1.1 ").count(), 1, "the smuggled request was served: {both}");
    assert!(!both.contains("/smuggled"), "{both}");
    let dup = raw(addr, b"POST / HTTP/1.1\r\nHost: h.test\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde").await;
    assert!(status(&dup).starts_with("HTTP/1.1 400"), "{dup}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_paths_are_checked() {
    let addr = proxy().await;
    let mut big = b"GET / HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 40_000));
    big.extend(b"\r\n\r\n");
    let answer = raw(addr, &big).await;
    assert!(status(&answer).starts_with("HTTP/1.1 431"), "{}", status(&answer));
    for path in ["/a/../b", "/%2e%2e/etc/passwd", "/a/%2E/b", "/a%2fb", "/a\\b", "/x%00"] {
        let answer = raw(addr, format!("GET {path} HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n\r\n").as_bytes()).await;
        assert!(status(&answer).starts_with("HTTP/1.1 400"), "{path}: {}", status(&answer));
    }
    let ok = raw(addr, b"GET /fine/path.html?q=a/../b HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n\r\n").await;
    assert!(status(&ok).starts_with("HTTP/1.1 200"), "dots in the query are fine: {}", status(&ok));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_without_hurting_other_clients() {
    let addr = proxy().await;
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: h.test\r\nX-Slow: ").await.expect("write");
    // Meanwhile a normal client is served at once.
    let t0 = tokio::time::Instant::now();
    let r = keelson_testkit::http::get(addr, "h.test", "/").await.expect("response");
    assert_eq!(r.status, 200);
    assert!(t0.elapsed() < Duration::from_millis(400));
    // The slow one is cut off after the header timeout (500 ms here).
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "slow client still connected after 3 s");
    assert!(t0.elapsed() >= Duration::from_millis(450), "cut off too early: {:?}", t0.elapsed());
}

#[tokio::test]
async fn invalid_host_is_400() {
    let addr = proxy().await;
    let answer = raw(addr, b"GET / HTTP/1.1\r\nHost: bad host\r\nConnection: close\r\n\r\n").await;
    assert!(status(&answer).starts_with("HTTP/1.1 400"), "{}", status(&answer));
}

/// An idle keep-alive connection is closed once it has sent nothing for the header
/// timeout: idle clients cannot hold connections (and their buffers) forever.
#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let addr = proxy().await;
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: h.test\r\n\r\n").await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.expect("response");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    // Now idle: the proxy must hang up well within 5 s (its header timeout is 500 ms).
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "idle keep-alive connection still open after 5 s");
}
