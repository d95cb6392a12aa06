//! Moving a volume to another node: the source node serves its volumes as tar streams
//! over HTTP ([`serve_volumes`]), the destination pulls one into its own manager
//! ([`fetch_volume`]). [`copy_volume`] does the same between two managers in one process
//! (a local directory into a Docker volume, say).
//!
//! `GET /v1/volumes/<name>` answers `200` with `content-type: application/x-tar`, the
//! volume's labels as JSON in `x-keelson-volume-labels`, and the archive as a chunked
//! body; `404` for an unknown volume and `400` for a bad name. An error while the
//! archive streams aborts the connection, so the receiver sees an incomplete body and
//! imports nothing. Every request must carry `authorization: Bearer <token>`
//! ([`VolumeServer::with_token`]; `401` otherwise, compared in constant time): a server
//! without a token refuses to start unless told [`VolumeServer::insecure_no_auth`]. With
//! [`VolumeServer::with_tls`] the bytes are encrypted (rustls); without it, serve on the
//! nodes' private network (or the overlay) only.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::error::{Error, Result};
use crate::runtime::volume_archive::TarStream;
use crate::runtime::volumes::{Volume, VolumeManager};

/// The path prefix volumes are served under.
pub const VOLUME_PATH: &str = "/v1/volumes/";
const LABELS_HEADER: &str = "x-keelson-volume-labels";
/// A transfer that sends nothing for this long is abandoned.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

fn text(status: StatusCode, message: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(message)).map_err(|never: Infallible| match never {}).boxed_unsync());
    *r.status_mut() = status;
    r
}

async fn answer(volumes: Arc<dyn VolumeManager>, req: Request<Incoming>) -> Response<Body> {
    let Some(name) = req.uri().path().strip_prefix(VOLUME_PATH).map(str::to_owned) else {
        return text(StatusCode::NOT_FOUND, format!("volumes are under {VOLUME_PATH}\n"));
    };
    if req.method() != hyper::Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    let exported = match volumes.get(&name).await {
        Ok(v) => volumes.export(&name).await.map(|tar| (v, tar)),
        Err(e) => Err(e),
    };
    match exported {
        Ok((volume, tar)) => {
            tracing::info!(volume = %name, "serving a volume export");
            let labels = serde_json::to_string(&volume.labels).unwrap_or_else(|_| "{}".into());
            let body = BodyExt::boxed_unsync(StreamBody::new(tar.map_ok(Frame::data)));
            let mut r = Response::new(body);
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/x-tar"));
            if let Ok(v) = hyper::header::HeaderValue::from_str(&labels) {
                r.headers_mut().insert(LABELS_HEADER, v);
            }
            r
        }
        Err(e @ Error::NotFound { .. }) => text(StatusCode::NOT_FOUND, format!("{e}\n")),
        Err(e @ Error::InvalidInput { .. }) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// Serves `volumes` on `listener` to clients that present `token`, until `shutdown`
/// completes (transfers under way are cut: the receivers discard them).
pub async fn serve_volumes(
    listener: TcpListener,
    volumes: Arc<dyn VolumeManager>,
    token: &str,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    VolumeServer::new(volumes).with_token(token)?.serve(listener, shutdown).await
}

/// A volume server with options.
#[derive(Clone)]
#[must_use = "the server stops when this is dropped"]
pub struct VolumeServer {
    volumes: Arc<dyn VolumeManager>,
    token: Option<Arc<str>>,
    insecure: bool,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for VolumeServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeServer")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("insecure", &self.insecure)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// How [`fetch_volume_with`] reaches a volume server.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct FetchOptions {
    /// The server's bearer token.
    pub token: Option<String>,
    /// TLS: the client configuration (roots to trust) and the server's name as its
    /// certificate states it.
    pub tls: Option<(Arc<rustls::ClientConfig>, String)>,
}

impl std::fmt::Debug for FetchOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchOptions")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.as_ref().map(|(_, name)| name))
            .finish()
    }
}

/// Equal in time independent of where the first difference is (a token check must not
/// tell an attacker how much of a guess was right).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl VolumeServer {
    /// A server of `volumes`; give it a token ([`VolumeServer::with_token`]) before
    /// serving.
    pub fn new(volumes: Arc<dyn VolumeManager>) -> Self {
        VolumeServer { volumes, token: None, insecure: false, tls: None }
    }

    /// Serves without a token: anyone who reaches the port reads every volume. Only for
    /// a network nothing else can reach; [`VolumeServer::serve`] refuses otherwise.
    pub fn insecure_no_auth(mut self) -> Self {
        self.insecure = true;
        self
    }

    /// Serves over TLS with `config` (its certificate and key).
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(tokio_rustls::TlsAcceptor::from(config));
        self
    }

    /// Requires `authorization: Bearer <token>` on every request. [`Error::InvalidInput`]
    /// for an empty token or one that cannot be a header value.
    pub fn with_token(mut self, token: &str) -> Result<Self> {
        if token.is_empty() || hyper::header::HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
            return Err(Error::invalid("volume transfer token", "", "must be non-empty visible ASCII"));
        }
        self.token = Some(token.into());
        Ok(self)
    }

    fn admits(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else { return true };
        let given = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        given.is_some_and(|g| same_secret(g, token.as_bytes()))
    }

    /// Serves until `shutdown` completes. [`Error::InvalidInput`] at once, serving
    /// nothing, without a token unless [`VolumeServer::insecure_no_auth`] was said.
    pub async fn serve(self, listener: TcpListener, shutdown: impl std::future::Future<Output = ()> + Send) -> Result<()> {
        if self.token.is_none() && !self.insecure {
            return Err(Error::invalid(
                "volume server token",
                "",
                "is required: without one anyone who reaches the port reads every volume (say insecure_no_auth to allow that)",
            ));
        }
        let server = Arc::new(self);
        tokio::pin!(shutdown);
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting a volume transfer connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let server = server.clone();
            let tls = server.tls.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let server = server.clone();
                    async move {
                        if !server.admits(&req) {
                            tracing::warn!(%peer, "volume transfer refused: missing or wrong token");
                            return Ok::<_, Infallible>(text(StatusCode::UNAUTHORIZED, "a valid bearer token is required\n".into()));
                        }
                        Ok::<_, Infallible>(answer(server.volumes.clone(), req).await)
                    }
                });
                let served = match &tls {
                    None => hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await,
                    Some(acceptor) => match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await,
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, error = %e, "volume transfer TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(%peer, "volume transfer TLS handshake timed out");
                            return;
                        }
                    },
                };
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "volume transfer connection ended");
                }
            });
            while connections.try_join_next().is_some() {}
        }
        connections.shutdown().await;
        Ok(())
    }
}

fn unavailable(addr: SocketAddr, reason: impl std::fmt::Display) -> Error {
    Error::Unavailable { backend: "volume transfer", reason: format!("{addr}: {reason}") }
}

/// Pulls volume `name` from the node serving volumes at `addr` into `into` (with the
/// source's labels). All or nothing, as [`VolumeManager::import`]; [`Error::NotFound`]
/// if the source has no such volume, [`Error::Conflict`] if `into` already has it.
pub async fn fetch_volume(addr: SocketAddr, name: &str, into: &dyn VolumeManager) -> Result<Volume> {
    fetch_volume_with_token(addr, name, into, None).await
}

/// [`fetch_volume`] from a server that wants a token; [`Error::Denied`] if it refuses it.
pub async fn fetch_volume_with_token(addr: SocketAddr, name: &str, into: &dyn VolumeManager, token: Option<&str>) -> Result<Volume> {
    fetch_volume_with(addr, name, into, &FetchOptions { token: token.map(str::to_owned), tls: None }).await
}

/// A request sender over plain TCP or TLS.
async fn connect(
    addr: SocketAddr,
    tls: Option<&(Arc<rustls::ClientConfig>, String)>,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| Error::Timeout { operation: "connecting to a volume source", after: CONNECT_TIMEOUT })?
        .map_err(|e| unavailable(addr, e))?;
    macro_rules! handshake {
        ($io:expr) => {{
            let (sender, connection) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new($io)).await.map_err(|e| unavailable(addr, e))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "volume transfer client connection ended");
                }
            });
            sender
        }};
    }
    Ok(match tls {
        None => handshake!(stream),
        Some((config, server_name)) => {
            let name = rustls::pki_types::ServerName::try_from(server_name.clone())
                .map_err(|e| Error::invalid("volume server name", server_name, e.to_string()))?;
            let tls = tokio::time::timeout(CONNECT_TIMEOUT, tokio_rustls::TlsConnector::from(config.clone()).connect(name, stream))
                .await
                .map_err(|_| Error::Timeout { operation: "TLS handshake with a volume source", after: CONNECT_TIMEOUT })?
                .map_err(|e| Error::Denied {
                    operation: "volume transfer",
                    reason: format!("TLS with {addr} ({server_name}) failed: {e}"),
                })?;
            handshake!(tls)
        }
    })
}

/// [`fetch_volume`] with a token and TLS as `options` say. [`Error::Denied`] if the
/// server refuses the token or its certificate is not trusted for its name.
pub async fn fetch_volume_with(addr: SocketAddr, name: &str, into: &dyn VolumeManager, options: &FetchOptions) -> Result<Volume> {
    crate::error::validate_id("volume name", name)?;
    let token = options.token.as_deref();
    let mut sender = connect(addr, options.tls.as_ref()).await?;
    let mut request = Request::get(format!("{VOLUME_PATH}{name}"))
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::new())
        .map_err(|e| Error::invalid("volume name", name, e.to_string()))?;
    if let Some(token) = token {
        let value = hyper::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| Error::invalid("volume transfer token", "", "must be visible ASCII"))?;
        request.headers_mut().insert(hyper::header::AUTHORIZATION, value);
    }
    let response = tokio::time::timeout(IDLE_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| Error::Timeout { operation: "volume transfer response", after: IDLE_TIMEOUT })?
        .map_err(|e| unavailable(addr, e))?;
    match response.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => return Err(Error::NotFound { kind: "volume", name: format!("{name} on {addr}") }),
        StatusCode::UNAUTHORIZED => {
            return Err(Error::Denied { operation: "volume transfer", reason: format!("{addr} refused the token") })
        }
        status => {
            let detail = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            return Err(unavailable(addr, format!("{status}: {}", String::from_utf8_lossy(&detail).trim())));
        }
    }
    let labels: BTreeMap<String, String> =
        response.headers().get(LABELS_HEADER).and_then(|v| serde_json::from_slice(v.as_bytes()).ok()).unwrap_or_default();
    let body = response.into_body().into_data_stream().map_err(std::io::Error::other);
    // A source that stalls fails the import instead of hanging it.
    let body = tokio_stream::StreamExt::timeout(body, IDLE_TIMEOUT).map(|item| match item {
        Ok(chunk) => chunk,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "volume transfer stalled")),
    });
    let tar: TarStream = Box::pin(body);
    into.import(name, labels, tar).await
}

/// Copies volume `name` from one manager to another (same name and labels). Stop the
/// volume's writers first for a consistent copy.
pub async fn copy_volume(from: &dyn VolumeManager, to: &dyn VolumeManager, name: &str) -> Result<Volume> {
    let source = from.get(name).await?;
    let tar = from.export(name).await?;
    to.import(name, source.labels, tar).await
}
