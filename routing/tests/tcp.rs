//! The TCP proxy against real TCP and TLS servers: default routes for plain TCP (also
//! server-speaks-first), SNI passthrough with the backend's own certificate reaching the
//! client, unknown names refused, and connect failures retried on another endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use keelson_routing::{Endpoint, Host, MemoryRouter, Route, RouteChange, Router, TcpProxy, TcpProxyConfig, TCP_DEFAULT_HOST};
use keelson_testkit::tls::{handshake, test_cert, TestCert};
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A TCP server that greets with `id` (server speaks first), then echoes.
async fn greeter(id: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if s.write_all(format!("{id}\n").as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A TLS server with `cert` that writes `id` after the handshake.
async fn tls_backend(id: &'static str, cert: &TestCert) -> SocketAddr {
    let chain = vec![cert.der.clone()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let _ = tls.write_all(format!("{id}\n").as_bytes()).await;
                    let _ = tls.flush().await;
                    let mut sink = [0u8; 64];
                    let _ = tls.read(&mut sink).await;
                }
            });
        }
    });
    addr
}

async fn start(router: Arc<MemoryRouter>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(Arc::new(TcpProxy::new(router, TcpProxyConfig::default())).serve(listener, std::future::pending()));
    addr
}

fn route(host: &str, endpoints: Vec<Endpoint>) -> RouteChange {
    RouteChange::Upsert(Route::new(Host::new(host).expect("host"), endpoints))
}

async fn first_line(addr: SocketAddr) -> (String, TcpStream) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), reader.read_line(&mut line)).await.expect("greeting in time").expect("read");
    (line.trim().to_owned(), reader.into_inner())
}

#[tokio::test]
async fn plain_tcp_goes_to_the_default_route_even_when_the_server_speaks_first() {
    let (a, b) = (greeter("a").await, greeter("b").await);
    let router = Arc::new(MemoryRouter::new());
    router.apply(vec![route(TCP_DEFAULT_HOST, vec![Endpoint::new("a", a), Endpoint::new("b", b)])]).await.expect("apply");
    let proxy = start(router).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (greeting, mut stream) = first_line(proxy).await;
        seen.push(greeting);
        stream.write_all(b"ping\n").await.expect("write");
        let mut echo = [0u8; 5];
        stream.read_exact(&mut echo).await.expect("echo");
        assert_eq!(&echo, b"ping\n");
    }
    seen.sort();
    assert_eq!(seen, vec!["a", "a", "b", "b"], "round robin over the default route");
}

#[tokio::test]
async fn sni_passthrough_reaches_the_backend_that_owns_the_name() {
    let (ca, cb) = (test_cert(&["a.test"]).expect("cert"), test_cert(&["*.b.test"]).expect("cert"));
    let (a, b) = (tls_backend("backend-a", &ca).await, tls_backend("backend-b", &cb).await);
    let router = Arc::new(MemoryRouter::new());
    router.apply(vec![route("a.test", vec![Endpoint::new("a", a)]), route("*.b.test", vec![Endpoint::new("b", b)])]).await.expect("apply");
    let proxy = start(router).await;

    for (sni, cert, id) in [("a.test", &ca, "backend-a"), ("x.b.test", &cb, "backend-b")] {
        let h = handshake(proxy, sni, &[&ca, &cb]).await.expect("end-to-end TLS through the proxy");
        assert_eq!(&h.leaf, &cert.der, "{sni}: the backend's own certificate, the proxy does not terminate");
        let mut line = String::new();
        BufReader::new(h.stream).read_line(&mut line).await.expect("read");
        assert_eq!(line.trim(), id);
    }
    assert!(handshake(proxy, "c.test", &[&ca, &cb]).await.is_err(), "no route for the name: the connection is closed");
}

#[tokio::test]
async fn a_refused_connect_is_retried_on_another_endpoint() {
    let live = greeter("live").await;
    let dead: SocketAddr = ([127, 0, 0, 1], keelson_testkit::free_port().expect("port")).into();
    let router = Arc::new(MemoryRouter::new());
    router.apply(vec![route(TCP_DEFAULT_HOST, vec![Endpoint::new("dead", dead), Endpoint::new("live", live)])]).await.expect("apply");
    let proxy = start(router.clone()).await;
    for _ in 0..6 {
        assert_eq!(first_line(proxy).await.0, "live");
    }
    let table = router.snapshot();
    let stats = table.lookup(TCP_DEFAULT_HOST).and_then(|r| r.stats("dead")).expect("stats");
    assert!(stats.is_ejected(), "the refusing endpoint is ejected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_routes_and_listeners_follow_discovery_tags() {
    use keelson_discovery::{Discovery, MemoryDiscovery, Registration, ServiceName};
    let plain = greeter("plain").await;
    let cert = test_cert(&["db.test"]).expect("cert");
    let tls = tls_backend("tls-db", &cert).await;
    let discovery = Arc::new(MemoryDiscovery::memory());
    let port = keelson_testkit::free_port().expect("port");
    let proxy: SocketAddr = ([127, 0, 0, 1], port).into();
    let follow = keelson_routing::follow_discovery_tcp(
        discovery.clone(),
        [127, 0, 0, 1].into(),
        TcpProxyConfig::default(),
        keelson_routing::SourceStatus::new(),
    )
    .await
    .expect("follow");
    let port_tag = format!("keelson.tcp.port={port}");
    let reg = |service: &str, id: &str, addr: SocketAddr| {
        Registration::new(ServiceName::new(service).expect("name"), id, "127.0.0.1", addr.port()).with_tag(port_tag.clone())
    };
    let _plain = discovery.register(reg("cache", "c1", plain)).await.expect("register");
    let _tls = discovery.register(reg("db", "d1", tls).with_tag("keelson.sni=db.test")).await.expect("register");

    // The listener opens when the tag first appears.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while TcpStream::connect(proxy).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "no listener on the tagged port");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let h = handshake(proxy, "db.test", &[&cert]).await.expect("SNI route from the keelson.sni tag");
    assert_eq!(h.leaf, cert.der);
    // A client that is not TLS goes to the port's default route; its greeting waits for
    // the SNI timeout only if the client says nothing, so send a byte first.
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(b"\n").await.expect("write");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).await.expect("read");
    assert_eq!(line.trim(), "plain");

    discovery.deregister(&ServiceName::new("cache").expect("name"), "c1").await.expect("deregister");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut s = TcpStream::connect(proxy).await.expect("the listener stays");
        s.write_all(b"\n").await.expect("write");
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), s.read_to_end(&mut buf)).await;
        if buf.is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "default route still served after deregistration");
    }
    follow.abort();
}

/// 8 MiB each way at once through an echoing backend, then a half-close: every byte
/// arrives in order and the end of stream travels through, with splice(2) and with the
/// user-space copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_streams_cross_intact_both_ways_and_half_close_passes_through() {
    for zero_copy in [true, false] {
        let backend = greeter("echo").await;
        let router = Arc::new(MemoryRouter::new());
        router.apply(vec![route(TCP_DEFAULT_HOST, vec![Endpoint::new("e", backend)])]).await.expect("apply");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let config = {
            let mut built = TcpProxyConfig::default();
            built.zero_copy = zero_copy;
            built
        };
        tokio::spawn(Arc::new(TcpProxy::new(router, config)).serve(listener, std::future::pending()));

        let (greeting, stream) = first_line(addr).await;
        assert_eq!(greeting, "echo");
        const LEN: usize = 8 << 20;
        let payload: Vec<u8> = (0..LEN).map(|i| (i * 7 % 251) as u8).collect();
        let (mut r, mut w) = stream.into_split();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(100_000) {
                w.write_all(chunk).await.expect("write");
            }
            // Half-close: the proxy must pass the end of stream on and keep reading.
            w.shutdown().await.expect("shutdown");
            w
        });
        let mut back = Vec::with_capacity(LEN);
        tokio::time::timeout(std::time::Duration::from_secs(30), r.read_to_end(&mut back))
            .await
            .expect("the echo ends after the half-close")
            .expect("read");
        writer.await.expect("writer");
        assert_eq!(back.len(), LEN, "zero_copy {zero_copy}: bytes lost or added");
        assert!(back == payload, "zero_copy {zero_copy}: bytes changed or reordered");
    }
}
