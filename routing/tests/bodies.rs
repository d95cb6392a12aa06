//! Every request body reaches the upstream whole, whatever the method and the framing:
//! GET with a body, POST, PUT, PATCH, DELETE and OPTIONS, each sent over HTTP/1.1 with a
//! content-length, HTTP/1.1 chunked, HTTP/2 with and without a content-length, to an
//! HTTP/1.1 and an h2c upstream; the upstream checks every byte by SHA-256. A 1 GiB
//! upload to an upstream that reads at 10 MiB/s streams through with bounded memory.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keelson_routing::{Endpoint, Host, MemoryRouter, Proxy, ProxyConfig, Route, RouteChange, Router, UpstreamProtocol};
use sha2::{Digest, Sha256};

type ClientBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// An upstream (HTTP/1.1 and h2c on one port) answering `<method> <bytes> <sha256>` of
/// what it received; with `pace`, it reads the body at about that many bytes a second.
async fn digest_upstream(pace: Option<u64>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| async move {
                    let method = req.method().clone();
                    let mut body = req.into_body();
                    let (mut hash, mut len) = (Sha256::new(), 0u64);
                    let began = tokio::time::Instant::now();
                    while let Some(frame) = body.frame().await {
                        let Ok(frame) = frame else { break };
                        if let Ok(data) = frame.into_data() {
                            hash.update(&data);
                            len += data.len() as u64;
                            if let Some(rate) = pace {
                                // Sleep until `len` bytes are due at `rate`: a slow reader.
                                tokio::time::sleep_until(began + Duration::from_secs_f64(len as f64 / rate as f64)).await;
                            }
                        }
                    }
                    let text = format!("{method} {len} {}", hex::encode(hash.finalize()));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

async fn start_proxy(router: Arc<dyn Router>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let proxy = Arc::new(Proxy::new(router, ProxyConfig::default()));
    tokio::spawn(proxy.serve(listener, std::future::pending()));
    addr
}

#[derive(Clone, Copy, Debug)]
enum Framing {
    Http1Length,
    Http1Chunked,
    Http2Length,
    Http2NoLength,
}

/// `data` as a body: with a known length (content-length), or streamed in chunks whose
/// total is unknown (chunked on HTTP/1.1; no content-length on HTTP/2).
fn body(data: &Bytes, known_length: bool) -> ClientBody {
    if known_length {
        return Full::new(data.clone()).boxed();
    }
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> = data.chunks(7_000).map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
    StreamBody::new(futures::stream::iter(chunks)).boxed()
}

async fn send(proxy: SocketAddr, framing: Framing, method: Method, host: &str, data: &Bytes) -> (StatusCode, String) {
    let stream = tokio::net::TcpStream::connect(proxy).await.expect("connect");
    let known = matches!(framing, Framing::Http1Length | Framing::Http2Length);
    let mut req = Request::builder().method(method).uri(format!("http://{host}/upload")).header("host", host);
    match framing {
        Framing::Http2Length => req = req.header("content-length", data.len()),
        // hyper's client would send a GET's streamed body as no body at all; curl's
        // `-H 'Transfer-Encoding: chunked'` says it outright, as here.
        Framing::Http1Chunked => req = req.header("transfer-encoding", "chunked"),
        _ => {}
    }
    let req = req.body(body(data, known)).expect("request");
    let resp = match framing {
        Framing::Http1Length | Framing::Http1Chunked => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("h1");
            tokio::spawn(conn);
            sender.send_request(req).await.expect("response")
        }
        Framing::Http2Length | Framing::Http2NoLength => {
            let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("h2");
            tokio::spawn(conn);
            sender.send_request(req).await.expect("response")
        }
    };
    let status = resp.status();
    let text = String::from_utf8_lossy(&resp.into_body().collect().await.expect("body").to_bytes()).into_owned();
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_body_arrives_whole_for_every_method_framing_and_upstream() {
    let upstream = digest_upstream(None).await;
    let router = Arc::new(MemoryRouter::new());
    let routes = vec![
        RouteChange::Upsert(Route::new(Host::new("h1.test").expect("host"), vec![Endpoint::new("u", upstream)])),
        RouteChange::Upsert(
            Route::new(Host::new("h2c.test").expect("host"), vec![Endpoint::new("u", upstream)]).with_upstream(UpstreamProtocol::H2c),
        ),
    ];
    router.apply(routes).await.expect("routes");
    let proxy = start_proxy(router).await;
    // 100 KiB of varied bytes: more than one HTTP/2 window frame, and not all zeros.
    let data: Bytes = (0..100 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<u8>>().into();
    let want = hex::encode(Sha256::digest(&data));
    let methods = [Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS];
    let framings = [Framing::Http1Length, Framing::Http1Chunked, Framing::Http2Length, Framing::Http2NoLength];
    let mut failures = Vec::new();
    for host in ["h1.test", "h2c.test"] {
        for framing in framings {
            for method in &methods {
                let (status, text) = send(proxy, framing, method.clone(), host, &data).await;
                let expected = format!("{method} {} {want}", data.len());
                if status != StatusCode::OK || text != expected {
                    failures.push(format!("{host} {framing:?} {method}: {status} {text}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of 48 cases lost bytes:\n{}", failures.len(), failures.join("\n"));
}

/// 1 GiB through the proxy to an upstream reading at 10 MiB/s: the proxy streams it
/// (backpressure from the upstream reaches the client) instead of buffering it; this
/// process (client, proxy and upstream together) grows by at most 32 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_to_a_slow_upstream_streams_with_bounded_memory() {
    const TOTAL: u64 = 1 << 30;
    const CHUNK: usize = 256 * 1024;
    let upstream = digest_upstream(Some(10 << 20)).await;
    let router = Arc::new(MemoryRouter::new());
    router
        .apply(vec![RouteChange::Upsert(Route::new(Host::new("big.test").expect("host"), vec![Endpoint::new("u", upstream)]))])
        .await
        .expect("routes");
    let proxy = start_proxy(router).await;
    let rss = keelson_testkit::memory::PeakRss::start(Duration::from_millis(100));
    // The chunk is the same each time: the client holds 256 KiB, whatever it sends.
    let chunk = Bytes::from(vec![0x5a; CHUNK]);
    let mut hash = Sha256::new();
    for _ in 0..TOTAL / CHUNK as u64 {
        hash.update(&chunk);
    }
    let want = hex::encode(hash.finalize());
    let frames = futures::stream::iter((0..TOTAL / CHUNK as u64).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))));
    let stream = tokio::net::TcpStream::connect(proxy).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("h1");
    tokio::spawn(conn);
    let req = Request::builder()
        .method(Method::PUT)
        .uri("http://big.test/upload")
        .header("host", "big.test")
        .body(StreamBody::new(frames).boxed())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status();
    let text = String::from_utf8_lossy(&resp.into_body().collect().await.expect("body").to_bytes()).into_owned();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text, format!("PUT {TOTAL} {want}"), "every byte arrived");
    let grew = rss.growth();
    eprintln!("RSS grew by {} KiB during the upload", grew / 1024);
    assert!(grew <= 32 << 20, "the upload was buffered: RSS grew by {} MiB", grew >> 20);
}

/// A proxy whose idle timeout for bodies and blocked writes is `idle`.
async fn start_proxy_with_idle(router: Arc<dyn Router>, idle: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let proxy = Arc::new(Proxy::new(router, {
        let mut built = ProxyConfig::default();
        built.body_idle_timeout = idle;
        built
    }));
    tokio::spawn(proxy.serve(listener, std::future::pending()));
    addr
}

async fn route_to(host: &str, upstream: SocketAddr) -> Arc<MemoryRouter> {
    let router = Arc::new(MemoryRouter::new());
    router
        .apply(vec![RouteChange::Upsert(Route::new(Host::new(host).expect("host"), vec![Endpoint::new("u", upstream)]))])
        .await
        .expect("routes");
    router
}

/// Reads an HTTP/1.1 request head from `stream` (up to the blank line).
async fn read_head(stream: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
}

/// An upstream that answers with a 1 MB content-length, sends 1,000 bytes of it and
/// then nothing, holding the connection open: the client sees its response cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_mid_response_is_cut_and_the_client_sees_it() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        read_head(&mut stream).await;
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n").await;
        let _ = stream.write_all(&[b'x'; 1000]).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(stream);
    });
    let proxy = start_proxy_with_idle(route_to("hang.test", upstream).await, Duration::from_millis(500)).await;
    let stream = tokio::net::TcpStream::connect(proxy).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("h1");
    tokio::spawn(conn);
    let req = Request::builder().uri("http://hang.test/").header("host", "hang.test").body(Full::new(Bytes::new())).expect("req");
    let resp = sender.send_request(req).await.expect("response head");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await.expect("cut, not hung");
    assert!(body.is_err(), "the client sees the response cut short");
}

/// A client that sends 10 KB of a 1 MB upload and then nothing: the proxy cuts the
/// request, the upstream sees its connection closed mid-body, and the client is answered
/// or closed, all within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_uploading_is_cut_and_the_upstream_sees_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<Result<u64, String>>();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let service = service_fn(move |req: Request<Incoming>| {
            let seen = seen_tx.clone();
            async move {
                let mut body = req.into_body();
                let mut len = 0u64;
                let outcome = loop {
                    match body.frame().await {
                        Some(Ok(f)) => len += f.into_data().map_or(0, |d| d.len() as u64),
                        Some(Err(e)) => break Err(e.to_string()),
                        None => break Ok(len),
                    }
                };
                let _ = seen.send(outcome);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
            }
        });
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
    });
    let proxy = start_proxy_with_idle(route_to("slow.test", upstream).await, Duration::from_millis(500)).await;
    let mut client = tokio::net::TcpStream::connect(proxy).await.expect("connect");
    client.write_all(b"PUT /upload HTTP/1.1\r\nhost: slow.test\r\ncontent-length: 1000000\r\n\r\n").await.expect("head");
    client.write_all(&[b'y'; 10_000]).await.expect("part of the body");
    let seen = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv()).await.expect("the upstream hears of it").expect("sent");
    assert!(seen.is_err(), "the upstream saw the upload cut, not a complete body: {seen:?}");
    let mut answer = Vec::new();
    // Closed by a reset is as good as closed by a FIN here: the point is that it ends.
    let _closed =
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer)).await.expect("answered or closed, not hung");
    let text = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || text.starts_with("HTTP/1.1 5"), "an error or a closed connection: {text}");
}

/// A client that asks for a large response and never reads it: once the proxy's writes
/// have been blocked for the idle timeout, it closes the client's connection and drops
/// the upstream's response, which the upstream sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_and_the_upstream_released() {
    use tokio::io::AsyncWriteExt;
    struct Dropped(Option<tokio::sync::oneshot::Sender<()>>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }
    let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
    let dropped_tx = Arc::new(std::sync::Mutex::new(Some(dropped_tx)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let service = service_fn(move |_req: Request<Incoming>| {
            let guard = Dropped(dropped_tx.lock().expect("lock").take());
            async move {
                // An endless body: it ends only when the proxy lets go of it.
                let chunk = Bytes::from(vec![b'z'; 64 * 1024]);
                let frames = futures::stream::repeat_with(move || {
                    let _keep = &guard;
                    Ok::<_, Infallible>(Frame::data(chunk.clone()))
                });
                Ok::<_, Infallible>(Response::new(StreamBody::new(frames)))
            }
        });
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
    });
    let proxy = start_proxy_with_idle(route_to("big.test", upstream).await, Duration::from_millis(500)).await;
    let mut client = tokio::net::TcpStream::connect(proxy).await.expect("connect");
    client.write_all(b"GET / HTTP/1.1\r\nhost: big.test\r\n\r\n").await.expect("request");
    // Never read: the socket buffers fill, the proxy's writes block, and it must give up.
    tokio::time::timeout(Duration::from_secs(10), dropped_rx).await.expect("the proxy let go of the upstream's response").expect("sent");
}
