//! Request heads from any client: arbitrary bytes on a connection to a running proxy
//! (one, started once, with a route to a small upstream). The proxy answers or closes,
//! never dies: after every input a good request still gets its answer.
#![no_main]
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keelson_routing::{Endpoint, Host, MemoryRouter, Proxy, ProxyConfig, Route, RouteChange, Router};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Served {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
}

fn served() -> &'static Served {
    static SERVED: OnceLock<Served> = OnceLock::new();
    SERVED.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let addr = rt.block_on(async {
            // The upstream: answers every request with a fixed 200 and closes.
            let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let up = upstream.local_addr().expect("addr");
            tokio::spawn(async move {
                loop {
                    let Ok((mut c, _)) = upstream.accept().await else { return };
                    tokio::spawn(async move {
                        let mut buf = [0u8; 8192];
                        let _ = tokio::time::timeout(Duration::from_millis(200), c.read(&mut buf)).await;
                        let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
                    });
                }
            });
            let router = Arc::new(MemoryRouter::new());
            router
                .apply(vec![RouteChange::Upsert(Route::new(Host::new("f.test").expect("host"), vec![Endpoint::new("u", up)]))])
                .await
                .expect("route");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let config = { let mut built = ProxyConfig::default(); built.header_read_timeout = Duration::from_millis(200); built };
            tokio::spawn(Arc::new(Proxy::new(router, config)).serve(listener, std::future::pending()));
            addr
        });
        Served { rt, addr }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = served();
    s.rt.block_on(async {
        if let Ok(mut c) = tokio::net::TcpStream::connect(s.addr).await {
            let _ = c.write_all(data).await;
            let mut buf = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_millis(100), c.read(&mut buf)).await;
        }
        let mut c = tokio::net::TcpStream::connect(s.addr).await.expect("the proxy still accepts");
        c.write_all(b"GET / HTTP/1.1\r\nhost: f.test\r\nconnection: close\r\n\r\n").await.expect("write");
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut answer)).await;
        assert!(read.is_ok() && answer.starts_with(b"HTTP/1.1 200"), "the proxy stopped answering after {data:?}");
    });
});
