//! Tiny HTTP helpers for tests: a one-shot client and an echo upstream.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::tools::TestkitError;

/// A response read to the end.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers (lower-case names; repeated ones joined with ", ").
    pub headers: BTreeMap<String, String>,
    /// Body as text.
    pub body: String,
}

/// Sends one request over a fresh connection to `addr` with the given `Host` and extra
/// headers, and reads the whole response (10 s limit).
pub async fn request(addr: SocketAddr, method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> Result<Reply, TestkitError> {
    send(addr, method, host, path, headers, Bytes::new()).await
}

/// Like [`request`] with a body, and `Host: test`.
pub async fn request_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Reply, TestkitError> {
    send(addr, method, "test", path, headers, Bytes::from(body)).await
}

async fn send(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Reply, TestkitError> {
    let fail = |detail: String| TestkitError::Failed { what: format!("{method} http://{host}{path} via {addr}"), detail };
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| fail(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| fail(e.to_string()))?;
        tokio::spawn(conn);
        let mut req = http::Request::builder().method(method).uri(path).header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).map_err(|e| fail(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| fail(e.to_string()))?;
        let status = resp.status().as_u16();
        let mut headers = BTreeMap::new();
        for (k, v) in resp.headers() {
            let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
            headers.entry(k.as_str().to_owned()).and_modify(|e: &mut String| *e = format!("{e}, {v}")).or_insert(v);
        }
        let body = resp.into_body().collect().await.map_err(|e| fail(e.to_string()))?.to_bytes();
        Ok(Reply { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.map_err(|_| fail("no response within 10 s".into()))?
}

/// `GET path` with `Host: host`.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<Reply, TestkitError> {
    request(addr, "GET", host, path, &[]).await
}

/// GETs `path` until the server answers (a task that is still starting), for up to
/// `limit`; the last error if it never does.
pub async fn get_when_up(addr: SocketAddr, host: &str, path: &str, limit: std::time::Duration) -> Result<Reply, TestkitError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match get(addr, host, path).await {
            Ok(reply) => return Ok(reply),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

/// Starts an upstream on 127.0.0.1 that answers every request with status 200 and a
/// body of `id` on the first line followed by one `name: value` line per request
/// header. Runs until the returned task is aborted.
pub async fn echo_server(id: &str) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), TestkitError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(crate::tools::io("binding echo server"))?;
    let addr = listener.local_addr().map_err(crate::tools::io("echo server address"))?;
    let id = id.to_owned();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let id = id.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let mut body = format!("{id}\n");
                    for (k, v) in req.headers() {
                        body.push_str(&format!("{}: {}\n", k, String::from_utf8_lossy(v.as_bytes())));
                    }
                    async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok((addr, task))
}

/// Starts a WebSocket server on 127.0.0.1 (tokio-tungstenite) that echoes every text
/// message. Runs for the life of the test process.
pub async fn websocket_echo() -> Result<SocketAddr, TestkitError> {
    use futures::{SinkExt, StreamExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(crate::tools::io("binding WebSocket server"))?;
    let addr = listener.local_addr().map_err(crate::tools::io("WebSocket server address"))?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}
