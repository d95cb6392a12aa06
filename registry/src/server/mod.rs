//! The distribution-spec HTTP server (feature `server`): every endpoint of the OCI
//! distribution-spec v1.1 over a [`Registry`], with basic or bearer auth ([`Auth`]),
//! TLS, per-read timeouts on request bodies, and Prometheus metrics.
//!
//! ```no_run
//! use std::sync::Arc;
//! use keelson_registry::{Registry, RegistryConfig};
//! use keelson_registry::server::{Server, ServerConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = Arc::new(Registry::open_dir("/var/lib/keelson-registry".as_ref(), RegistryConfig::default())?);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:5000").await?;
//! Server::new(registry, ServerConfig::default()).serve(listener, std::future::pending()).await;
//! # Ok(())
//! # }
//! ```

mod auth;
mod body;
mod errors;
mod metrics;
mod range;
mod routes;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

pub use auth::{Access, Acl, Action, Auth, Grant, Htpasswd, Tokens};
pub use metrics::ServerMetrics;

use crate::digest::Digest;
use crate::error::Error;
use crate::manifest::OCI_INDEX;
use crate::reference::{Reference, RepoName};
use crate::service::Registry;
use crate::store::UploadId;
use auth::Verdict;
use body::Body;
use errors::ApiError;
use range::ReadRange;
use routes::Route;

/// Default page size of tag and catalog listings, and the largest `n` honoured.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 10_000;

/// How the server behaves.
#[derive(Debug)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Who may do what. Default: no authentication (bind to loopback then).
    pub auth: Auth,
    /// A request body read that waits longer than this fails (a stalled upload).
    pub body_idle_timeout: Duration,
    /// A client must send its request head within this.
    pub header_timeout: Duration,
    /// Serve HTTPS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { auth: Auth::None, body_idle_timeout: Duration::from_secs(30), header_timeout: Duration::from_secs(30), tls: None }
    }
}

impl ServerConfig {
    /// The defaults with `auth`.
    pub fn with_auth(auth: Auth) -> Self {
        ServerConfig { auth, ..ServerConfig::default() }
    }
}

/// A distribution-spec server over a registry.
#[derive(Debug, Clone)]
pub struct Server {
    registry: Arc<Registry>,
    config: Arc<ServerConfig>,
    metrics: Arc<ServerMetrics>,
}

type Reply = Result<Response<Body>, ApiError>;

fn reply(status: StatusCode) -> http::response::Builder {
    Response::builder().status(status).header("docker-distribution-api-version", "registry/2.0")
}

fn finish(b: http::response::Builder, body: Body) -> Reply {
    b.body(body).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string()))
}

fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri().query().map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn upload_location(repo: &RepoName, id: &UploadId) -> String {
    format!("/v2/{repo}/blobs/uploads/{id}")
}

fn range_header(size: u64) -> String {
    // As distribution does: "0-0" for an empty session.
    format!("0-{}", size.saturating_sub(1))
}

/// The `n` of a listing: absent means the default page, 0 an empty page.
fn page_size(q: &[(String, String)]) -> Result<usize, ApiError> {
    match param(q, "n") {
        None => Ok(DEFAULT_PAGE),
        Some(n) => n
            .parse::<usize>()
            .map(|n| n.min(MAX_PAGE))
            .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "PAGINATION_NUMBER_INVALID", format!("invalid n {n:?}"))),
    }
}

impl Server {
    /// A server for `registry`.
    pub fn new(registry: Arc<Registry>, config: ServerConfig) -> Server {
        Server { registry, config: Arc::new(config), metrics: Arc::new(ServerMetrics::default()) }
    }

    /// Its metrics, to register with a Prometheus registry.
    pub fn metrics(&self) -> &Arc<ServerMetrics> {
        &self.metrics
    }

    /// Accepts connections until `shutdown` completes, then lets open requests finish.
    pub async fn serve(self, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()>) {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let tls = self.config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        tokio::pin!(shutdown);
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of descriptors and the like: pause rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let server = self.clone();
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(self.config.header_timeout);
            let service = hyper::service::service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, std::convert::Infallible>(server.handle(req).await) }
            });
            match &tls {
                None => {
                    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    let conn = graceful.watch(conn);
                    tokio::spawn(conn);
                }
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    let header_timeout = self.config.header_timeout;
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        let Ok(Ok(tls)) = tokio::time::timeout(header_timeout, acceptor.accept(stream)).await else { return };
                        let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service);
                        let _ = watcher.watch(conn).await;
                    });
                }
            }
        }
        graceful.shutdown().await;
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let started = std::time::Instant::now();
        let response = match self.route(req).await {
            Ok(r) => r,
            Err(e) => {
                let mut b = reply(e.status).header(header::CONTENT_TYPE, "application/json");
                for (k, v) in &e.headers {
                    b = b.header(*k, v);
                }
                let body = if method == Method::HEAD { body::empty() } else { body::full(e.body()) };
                b.body(body).unwrap_or_else(|_| {
                    // A header we could not encode: say so rather than answer 200.
                    let mut r = Response::new(body::empty());
                    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    r
                })
            }
        };
        self.metrics.observe(&method, response.status(), started.elapsed());
        response
    }

    async fn route(&self, req: Request<Incoming>) -> Reply {
        let path = req.uri().path().to_owned();
        if path == "/token" {
            return self.token(&req);
        }
        let route = routes::parse(&path)?;
        let access = self.access(req.method(), &route);
        self.authorize(req.headers(), &access)?;
        if let (Route::Uploads(repo), Some(from)) = (&route, param(&query(&req), "from")) {
            // A mount reads from another repository: that needs pull there too.
            let from: RepoName = from.parse()?;
            if &from != repo {
                self.authorize(req.headers(), &Access::Repository(from.to_string(), Action::Pull))?;
            }
        }
        let method = req.method().clone();
        match (route, &method) {
            (Route::Base, &Method::GET | &Method::HEAD) => {
                finish(reply(StatusCode::OK).header(header::CONTENT_TYPE, "application/json"), body::full("{}"))
            }
            (Route::Catalog, &Method::GET) => self.catalog(&req),
            (Route::Tags(repo), &Method::GET) => self.tags(&req, &repo),
            (Route::Manifest(repo, r), &Method::GET | &Method::HEAD) => self.get_manifest(&repo, &r, method == Method::HEAD).await,
            (Route::Manifest(repo, r), &Method::PUT) => self.put_manifest(req, &repo, &r).await,
            (Route::Manifest(repo, r), &Method::DELETE) => {
                self.registry.delete_manifest(&repo, &r).await?;
                finish(reply(StatusCode::ACCEPTED), body::empty())
            }
            (Route::Blob(repo, d), &Method::GET | &Method::HEAD) => self.get_blob(&req, &repo, &d, method == Method::HEAD).await,
            (Route::Blob(repo, d), &Method::DELETE) => {
                self.registry.delete_blob(&repo, &d).await?;
                finish(reply(StatusCode::ACCEPTED), body::empty())
            }
            (Route::Uploads(repo), &Method::POST) => self.start_upload(req, &repo).await,
            (Route::Upload(repo, id), &Method::GET) => {
                let status = self.registry.upload_status(&repo, &id).await?;
                finish(
                    reply(StatusCode::NO_CONTENT)
                        .header(header::LOCATION, upload_location(&repo, &id))
                        .header(header::RANGE, range_header(status.size))
                        .header("docker-upload-uuid", id.as_str()),
                    body::empty(),
                )
            }
            (Route::Upload(repo, id), &Method::PATCH) => self.patch_upload(req, &repo, &id).await,
            (Route::Upload(repo, id), &Method::PUT) => self.finish_upload(req, &repo, &id).await,
            (Route::Upload(repo, id), &Method::DELETE) => {
                self.registry.cancel_upload(&repo, &id).await?;
                finish(reply(StatusCode::NO_CONTENT), body::empty())
            }
            (Route::Referrers(repo, d), &Method::GET) => self.referrers(&req, &repo, &d),
            (_, m) => Err(ApiError::unsupported(m, &path)),
        }
    }

    fn access(&self, method: &Method, route: &Route) -> Access {
        let Some(repo) = route.repo() else {
            return if *route == Route::Catalog { Access::Catalog } else { Access::Authenticated };
        };
        let action = match *method {
            Method::GET | Method::HEAD => Action::Pull,
            Method::DELETE if !matches!(route, Route::Upload(..)) => Action::Delete,
            _ => Action::Push,
        };
        Access::Repository(repo.to_string(), action)
    }

    fn authorize(&self, headers: &HeaderMap, access: &Access) -> Result<(), ApiError> {
        match self.config.auth.check(header_str(headers, header::AUTHORIZATION), access) {
            Verdict::Allowed => Ok(()),
            Verdict::Challenge(c) => {
                self.metrics.auth_failures.inc();
                Err(ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "authentication required").with_header("www-authenticate", c))
            }
            Verdict::Denied => {
                self.metrics.auth_failures.inc();
                Err(ApiError::new(StatusCode::FORBIDDEN, "DENIED", format!("access to {access:?} denied")))
            }
        }
    }

    fn token(&self, req: &Request<Incoming>) -> Reply {
        let q = query(req);
        let scopes: Vec<String> = q.iter().filter(|(k, _)| k == "scope").flat_map(|(_, v)| v.split(' ').map(str::to_owned)).collect();
        let Some(token) = self.config.auth.token(header_str(req.headers(), header::AUTHORIZATION), &scopes) else {
            self.metrics.auth_failures.inc();
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "valid credentials required")
                .with_header("www-authenticate", r#"Basic realm="keelson-registry""#));
        };
        let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string();
        finish(reply(StatusCode::OK).header(header::CONTENT_TYPE, "application/json"), body::full(body))
    }

    fn listing(&self, path: String, key: &str, page: crate::meta::Page, n: usize, extra: serde_json::Value) -> Reply {
        let mut b = reply(StatusCode::OK).header(header::CONTENT_TYPE, "application/json");
        if page.more {
            if let Some(last) = page.names.last() {
                let last: String = form_urlencoded::byte_serialize(last.as_bytes()).collect();
                b = b.header(header::LINK, format!("<{path}?n={n}&last={last}>; rel=\"next\""));
            }
        }
        let mut body = extra;
        body[key] = serde_json::json!(page.names);
        finish(b, body::full(body.to_string()))
    }

    fn catalog(&self, req: &Request<Incoming>) -> Reply {
        let q = query(req);
        let n = page_size(&q)?;
        let page = self.registry.catalog(param(&q, "last"), n)?;
        self.listing("/v2/_catalog".into(), "repositories", page, n, serde_json::json!({}))
    }

    fn tags(&self, req: &Request<Incoming>, repo: &RepoName) -> Reply {
        let q = query(req);
        let n = page_size(&q)?;
        let page = self.registry.tags(repo, param(&q, "last"), n)?;
        self.listing(format!("/v2/{repo}/tags/list"), "tags", page, n, serde_json::json!({"name": repo.as_str()}))
    }

    fn referrers(&self, req: &Request<Incoming>, repo: &RepoName, d: &Digest) -> Reply {
        let q = query(req);
        let artifact_type = param(&q, "artifactType");
        let manifests = self.registry.referrers(repo, d, artifact_type)?;
        let body = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        let mut b = reply(StatusCode::OK).header(header::CONTENT_TYPE, OCI_INDEX);
        if artifact_type.is_some() {
            b = b.header("oci-filters-applied", "artifactType");
        }
        finish(b, body::full(body.to_string()))
    }

    async fn get_manifest(&self, repo: &RepoName, r: &Reference, head: bool) -> Reply {
        let (d, info) = self.registry.resolve(repo, r)?;
        let b = reply(StatusCode::OK)
            .header(header::CONTENT_TYPE, &info.media_type)
            .header(header::CONTENT_LENGTH, info.size)
            .header("docker-content-digest", d.to_string())
            .header(header::ETAG, format!("\"{d}\""));
        if head {
            return finish(b, body::empty());
        }
        let (_, _, bytes) = self.registry.manifest(repo, &Reference::Digest(d)).await?;
        finish(b, body::full(bytes))
    }

    async fn put_manifest(&self, req: Request<Incoming>, repo: &RepoName, r: &Reference) -> Reply {
        let content_type = header_str(req.headers(), header::CONTENT_TYPE).unwrap_or("").to_owned();
        let limit = self.registry.config().max_manifest_size;
        let bytes = self.read_small_body(req, limit).await?;
        let d = self.registry.put_manifest(repo, r, bytes, &content_type).await?;
        let info = self.registry.resolve(repo, &Reference::Digest(d))?.1;
        let mut b = reply(StatusCode::CREATED)
            .header(header::LOCATION, format!("/v2/{repo}/manifests/{d}"))
            .header("docker-content-digest", d.to_string());
        if let Some(subject) = info.subject {
            b = b.header("oci-subject", subject.to_string());
        }
        finish(b, body::empty())
    }

    async fn read_small_body(&self, req: Request<Incoming>, limit: u64) -> Result<Vec<u8>, ApiError> {
        use tokio::io::AsyncReadExt;
        if let Some(len) = header_str(req.headers(), header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok()) {
            if len > limit {
                return Err(Error::TooLarge { what: "manifest", size: len, limit }.into());
            }
        }
        let mut out = Vec::new();
        let reader = body::reader(req.into_body(), self.config.body_idle_timeout);
        reader.take(limit + 1).read_to_end(&mut out).await.map_err(|source| Error::Io { context: "reading manifest".into(), source })?;
        if out.len() as u64 > limit {
            return Err(Error::TooLarge { what: "manifest", size: out.len() as u64, limit }.into());
        }
        Ok(out)
    }

    async fn get_blob(&self, req: &Request<Incoming>, repo: &RepoName, d: &Digest, head: bool) -> Reply {
        let stat = self.registry.blob(repo, d).await?.ok_or_else(|| Error::blob_not_found(d))?;
        let size = stat.size;
        let common = |status| {
            reply(status)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header("docker-content-digest", d.to_string())
                .header(header::ETAG, format!("\"{d}\""))
                .header(header::ACCEPT_RANGES, "bytes")
        };
        let range = if head { ReadRange::Whole } else { range::read_range(header_str(req.headers(), header::RANGE), size) };
        match range {
            ReadRange::Unsatisfiable => Err(Error::RangeNotSatisfiable { offset: size, size }.into()),
            ReadRange::Whole => {
                let b = common(StatusCode::OK).header(header::CONTENT_LENGTH, size);
                if head {
                    return finish(b, body::empty());
                }
                let reader = self.registry.read_blob(repo, d, 0, None).await?;
                finish(b, body::stream(reader))
            }
            ReadRange::Part(offset, len) => {
                let reader = self.registry.read_blob(repo, d, offset, Some(len)).await?;
                let b = common(StatusCode::PARTIAL_CONTENT)
                    .header(header::CONTENT_LENGTH, len)
                    .header(header::CONTENT_RANGE, format!("bytes {offset}-{}/{size}", offset + len - 1));
                finish(b, body::stream(reader))
            }
        }
    }

    fn blob_created(&self, repo: &RepoName, d: &Digest) -> Reply {
        finish(
            reply(StatusCode::CREATED)
                .header(header::LOCATION, format!("/v2/{repo}/blobs/{d}"))
                .header("docker-content-digest", d.to_string()),
            body::empty(),
        )
    }

    fn upload_accepted(&self, status: StatusCode, repo: &RepoName, id: &UploadId, size: u64) -> Reply {
        finish(
            reply(status)
                .header(header::LOCATION, upload_location(repo, id))
                .header(header::RANGE, range_header(size))
                .header("docker-upload-uuid", id.as_str())
                .header(header::CONTENT_LENGTH, 0),
            body::empty(),
        )
    }

    async fn start_upload(&self, req: Request<Incoming>, repo: &RepoName) -> Reply {
        let q = query(&req);
        if let (Some(mount), Some(from)) = (param(&q, "mount"), param(&q, "from")) {
            let d: Digest = mount.parse().map_err(Error::from)?;
            let from: RepoName = from.parse()?;
            if self.registry.mount(repo, &from, &d).await?.is_some() {
                return self.blob_created(repo, &d);
            }
            // Not there to mount: the spec says to fall back to a new session.
        }
        if let Some(digest) = param(&q, "digest") {
            let d: Digest = digest.parse().map_err(Error::from)?;
            let reader = self.counted(body::reader(req.into_body(), self.config.body_idle_timeout));
            self.registry.put_blob(repo, &d, reader).await?;
            return self.blob_created(repo, &d);
        }
        let id = self.registry.begin_upload(repo).await?;
        self.upload_accepted(StatusCode::ACCEPTED, repo, &id, 0)
    }

    /// Appends the request body, at the offset its `Content-Range` names if it has one
    /// (a chunk), else at the session's end (a stream).
    async fn append_body(&self, req: Request<Incoming>, repo: &RepoName, id: &UploadId) -> Result<u64, ApiError> {
        let current = self.registry.upload_status(repo, id).await?.size;
        let offset = match header_str(req.headers(), header::CONTENT_RANGE) {
            None => current,
            Some(cr) => {
                let (start, len) = range::chunk_range(cr)?;
                let declared = header_str(req.headers(), header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
                if declared.is_some_and(|l| l != len) {
                    return Err(Error::InvalidInput {
                        field: "Content-Range",
                        value: cr.to_owned(),
                        reason: format!("covers {len} bytes but Content-Length is {}", declared.unwrap_or(0)),
                    }
                    .into());
                }
                start
            }
        };
        let reader = self.counted(body::reader(req.into_body(), self.config.body_idle_timeout));
        Ok(self.registry.append(repo, id, offset, reader).await?)
    }

    async fn patch_upload(&self, req: Request<Incoming>, repo: &RepoName, id: &UploadId) -> Reply {
        let size = self.append_body(req, repo, id).await?;
        self.upload_accepted(StatusCode::ACCEPTED, repo, id, size)
    }

    async fn finish_upload(&self, req: Request<Incoming>, repo: &RepoName, id: &UploadId) -> Reply {
        let q = query(&req);
        let digest = param(&q, "digest").ok_or_else(|| Error::InvalidInput {
            field: "digest",
            value: String::new(),
            reason: "the closing PUT needs ?digest=".into(),
        })?;
        let d: Digest = digest.parse().map_err(Error::from)?;
        let has_body = header_str(req.headers(), header::CONTENT_LENGTH).is_none_or(|l| l != "0");
        if has_body {
            self.append_body(req, repo, id).await?;
        }
        self.registry.finish_upload(repo, id, &d).await?;
        self.blob_created(repo, &d)
    }

    fn counted(&self, reader: crate::store::BlobReader) -> crate::store::BlobReader {
        Box::new(metrics::CountingReader::new(reader, self.metrics.clone()))
    }
}

/// A TLS configuration serving `chain_pem` (leaf first) with `key_pem`, HTTP/1.1 only.
pub fn tls_config(chain_pem: &[u8], key_pem: &[u8]) -> crate::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad =
        |what: &'static str, e: &dyn std::fmt::Display| Error::InvalidInput { field: what, value: String::new(), reason: e.to_string() };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain_pem).collect::<Result<_, _>>().map_err(|e| bad("TLS certificate", &e))?;
    if chain.is_empty() {
        return Err(bad("TLS certificate", &"no certificate in the PEM"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad("TLS key", &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS configuration", &e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| bad("TLS certificate", &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
