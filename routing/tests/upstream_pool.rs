//! Upstream connections are pooled per endpoint: reused while the upstream keeps them,
//! replaced without a failed request when it closes them while idle.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keelson_routing::{Endpoint, Host, MemoryRouter, Proxy, ProxyConfig, Route, RouteChange, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An upstream that answers `per_connection` requests on each connection, then closes
/// it without saying so (no `Connection: close`), and counts the connections it took.
async fn upstream(per_connection: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                for _ in 0..per_connection {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |p| p + 4);
                    buf.drain(..end);
                    if stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

async fn proxy_to(up: SocketAddr) -> SocketAddr {
    let router = Arc::new(MemoryRouter::new());
    router
        .apply(vec![RouteChange::Upsert(Route::new(Host::new("h.test").expect("host"), vec![Endpoint::new("up", up)]))])
        .await
        .expect("apply");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(Arc::new(Proxy::new(router, ProxyConfig::default())).serve(listener, std::future::pending()));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused_and_an_idle_close_fails_no_request() {
    let (keeps, kept_conns) = upstream(usize::MAX).await;
    let addr = proxy_to(keeps).await;
    for i in 0..20 {
        let reply = keelson_testkit::http::get(addr, "h.test", "/").await.expect("request");
        assert_eq!(reply.status, 200, "request {i}");
    }
    assert_eq!(kept_conns.load(Ordering::Relaxed), 1, "sequential requests share one upstream connection");

    let (closes, closed_conns) = upstream(1).await;
    let addr = proxy_to(closes).await;
    for i in 0..20 {
        let reply = keelson_testkit::http::get(addr, "h.test", "/").await.expect("request");
        assert_eq!(reply.status, 200, "request {i} after the upstream closed its idle connection");
        // Time for the connection's task to see the close before the next checkout.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(closed_conns.load(Ordering::Relaxed), 20, "a new connection for each request");
}
