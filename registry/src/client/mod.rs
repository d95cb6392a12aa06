//! A registry client (feature `client`): push and pull of blobs and manifests with
//! resumable chunked uploads, cross-repository mounts, parallel layers, progress
//! reporting, and basic or bearer (token-spec) authentication. Whole images move
//! between a registry and an OCI image layout directory ([`layout`]).
//!
//! ```no_run
//! use keelson_registry::client::{Client, ClientConfig, NoProgress};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keelson_registry::Error> {
//! let client = Client::new("http://127.0.0.1:5000", None, ClientConfig::default())?;
//! let repo = "team/app".parse()?;
//! let digest = client.push_oci_layout("./image".as_ref(), &repo, "v1", &[], &NoProgress).await?;
//! client.pull_oci_layout(&repo, "v1", "./copy".as_ref(), &NoProgress).await?;
//! # let _ = digest;
//! # Ok(())
//! # }
//! ```

mod auth;
pub mod layout;
mod progress;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

pub use auth::Credentials;
pub use progress::{NoProgress, Progress};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::reference::RepoName;

type ReqBody = UnsyncBoxBody<Bytes, std::io::Error>;
type Http = hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<HttpConnector>, ReqBody>;

/// How the client behaves.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Blobs moved at once when pushing or pulling an image.
    pub parallel: usize,
    /// Bytes per upload chunk: an interrupted upload resumes from the last chunk the
    /// registry acknowledged.
    pub chunk_size: u64,
    /// Attempts per chunk or blob before giving up.
    pub attempts: usize,
    /// Connection timeout.
    pub connect_timeout: Duration,
    /// Extra CA certificates (PEM) for HTTPS registries.
    pub ca_pem: Option<Vec<u8>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig { parallel: 4, chunk_size: 32 << 20, attempts: 5, connect_timeout: Duration::from_secs(10), ca_pem: None }
    }
}

/// What pushing a blob came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobPush {
    /// The repository already had it.
    Existed,
    /// Mounted from another repository: no bytes moved.
    Mounted,
    /// Uploaded.
    Uploaded,
}

/// A response read whole.
#[derive(Debug)]
pub struct RawResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// A registry client.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: Http,
    creds: Option<Credentials>,
    auth: Arc<Mutex<auth::AuthState>>,
    config: ClientConfig,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).field("user", &self.creds.as_ref().map(|c| &c.username)).finish()
    }
}

fn full(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed_unsync()
}

fn bad_config(field: &'static str, e: impl std::fmt::Display) -> Error {
    Error::InvalidInput { field, value: String::new(), reason: e.to_string() }
}

/// The spec's error body, read for its first code and message.
fn http_error(request: String, status: StatusCode, body: &[u8]) -> Error {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let first = parsed.as_ref().and_then(|v| v.get("errors")).and_then(|e| e.get(0));
    let field = |k: &str| first.and_then(|e| e.get(k)).and_then(|v| v.as_str()).unwrap_or("").to_owned();
    let message = if first.is_some() { field("message") } else { String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned() };
    Error::Http { request, status: status.as_u16(), code: field("code"), message }
}

fn scope_pull(repo: &RepoName) -> String {
    format!("repository:{repo}:pull")
}

fn scope_push(repo: &RepoName) -> String {
    format!("repository:{repo}:pull,push")
}

impl Client {
    /// A client of the registry at `base` (`http://host:port` or `https://…`).
    pub fn new(base: &str, creds: Option<Credentials>, config: ClientConfig) -> Result<Client> {
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) || base.parse::<http::Uri>().is_err() {
            return Err(Error::InvalidInput {
                field: "registry URL",
                value: base,
                reason: "must be http://host:port or https://host:port".into(),
            });
        }
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let mut roots = rustls::RootCertStore::empty();
        if let Some(pem) = &config.ca_pem {
            use rustls::pki_types::pem::PemObject;
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
                roots.add(cert.map_err(|e| bad_config("CA certificate", e))?).map_err(|e| bad_config("CA certificate", e))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad_config("TLS configuration", e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().wrap_connector(http);
        let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Client { base, http, creds, auth: Arc::default(), config })
    }

    /// Its configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    fn url(&self, path_and_query: &str) -> String {
        if path_and_query.starts_with("http://") || path_and_query.starts_with("https://") {
            path_and_query.to_owned()
        } else {
            format!("{}{path_and_query}", self.base)
        }
    }

    /// Sends the request (again after an authentication challenge, so its body is
    /// built by `body` each time), with credentials for `scopes`.
    async fn send(
        &self,
        method: &Method,
        path: &str,
        headers: &[(header::HeaderName, String)],
        body: &(dyn Fn() -> ReqBody + Sync),
        scopes: &[String],
    ) -> Result<Response<Incoming>> {
        let context = format!("{method} {path}");
        let mut challenged = false;
        loop {
            let mut req = Request::builder().method(method.clone()).uri(self.url(path));
            for (k, v) in headers {
                req = req.header(k, v);
            }
            if let Some(authorization) = auth::authorization(&self.auth, self.creds.as_ref(), scopes) {
                req = req.header(header::AUTHORIZATION, authorization);
            }
            let req = req.body(body()).map_err(|e| Error::Transport { context: context.clone(), reason: e.to_string() })?;
            let resp = self.http.request(req).await.map_err(|e| Error::Transport { context: context.clone(), reason: format!("{e:?}") })?;
            if resp.status() != StatusCode::UNAUTHORIZED || challenged {
                return Ok(resp);
            }
            challenged = true;
            let challenge = resp.headers().get(header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            if !auth::answer(self, &challenge, scopes).await? {
                return Ok(resp);
            }
        }
    }

    /// Sends a request with a body held in memory and reads the whole response.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(header::HeaderName, String)],
        body: Bytes,
        scopes: &[String],
    ) -> Result<RawResponse> {
        let resp = self.send(&method, path, headers, &|| full(body.clone()), scopes).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Error::Transport { context: format!("{method} {path}"), reason: e.to_string() })?
            .to_bytes();
        Ok(RawResponse { status, headers, body })
    }

    async fn expect(
        &self,
        method: Method,
        path: &str,
        headers: &[(header::HeaderName, String)],
        body: Bytes,
        scopes: &[String],
        ok: StatusCode,
    ) -> Result<RawResponse> {
        let r = self.raw(method.clone(), path, headers, body, scopes).await?;
        if r.status == ok {
            Ok(r)
        } else {
            Err(http_error(format!("{method} {path}"), r.status, &r.body))
        }
    }

    /// The size of `repo`'s blob `d`, if it has it.
    pub async fn blob_size(&self, repo: &RepoName, d: &Digest) -> Result<Option<u64>> {
        let path = format!("/v2/{repo}/blobs/{d}");
        let r = self.raw(Method::HEAD, &path, &[], Bytes::new(), &[scope_pull(repo)]).await?;
        match r.status {
            StatusCode::OK => Ok(r.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(http_error(format!("HEAD {path}"), s, &r.body)),
        }
    }

    /// Pushes the blob `d` of `size` bytes read from the file `path`: nothing if the
    /// repository has it, a mount if one of `mount_from` does, else a chunked upload that
    /// resumes from the registry's acknowledged offset after a failure.
    pub async fn push_blob_file(
        &self,
        repo: &RepoName,
        d: &Digest,
        path: &Path,
        size: u64,
        mount_from: &[RepoName],
        progress: &dyn Progress,
    ) -> Result<BlobPush> {
        if self.blob_size(repo, d).await?.is_some() {
            progress.done(d, true);
            return Ok(BlobPush::Existed);
        }
        let push = scope_push(repo);
        for from in mount_from.iter().filter(|f| *f != repo) {
            let scopes = [push.clone(), scope_pull(from)];
            let q = format!("/v2/{repo}/blobs/uploads/?mount={d}&from={from}");
            let r = self.raw(Method::POST, &q, &[], Bytes::new(), &scopes).await?;
            if r.status == StatusCode::CREATED {
                progress.done(d, true);
                return Ok(BlobPush::Mounted);
            }
            if r.status == StatusCode::ACCEPTED {
                // Not there to mount: the registry opened a session instead; use it.
                let location = location(&r.headers, &q)?;
                self.upload_chunks(repo, d, path, size, location, progress).await?;
                return Ok(BlobPush::Uploaded);
            }
        }
        let q = format!("/v2/{repo}/blobs/uploads/");
        let r = self.expect(Method::POST, &q, &[], Bytes::new(), &[push], StatusCode::ACCEPTED).await?;
        let location = location(&r.headers, &q)?;
        self.upload_chunks(repo, d, path, size, location, progress).await?;
        Ok(BlobPush::Uploaded)
    }

    async fn upload_chunks(
        &self,
        repo: &RepoName,
        d: &Digest,
        path: &Path,
        size: u64,
        mut location: String,
        progress: &dyn Progress,
    ) -> Result<()> {
        let scopes = [scope_push(repo)];
        progress.begin(d, size);
        let mut offset = 0u64;
        let mut failures = 0usize;
        let mut pauses = keelson_base::retry_pauses(Duration::from_millis(100), Duration::from_secs(5));
        while offset < size {
            let len = self.config.chunk_size.min(size - offset);
            let file = path.to_owned();
            let body = move || file_body(file.clone(), offset, len);
            let headers = [
                (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                (header::CONTENT_RANGE, format!("{offset}-{}", offset + len - 1)),
                (header::CONTENT_LENGTH, len.to_string()),
            ];
            match self.send(&Method::PATCH, &location, &headers, &body, &scopes).await {
                Ok(resp) if resp.status() == StatusCode::ACCEPTED => {
                    location = location_or(resp.headers(), &location);
                    offset += len;
                    progress.advance(d, len);
                    continue;
                }
                Ok(resp) if !retryable_status(resp.status()) => {
                    let status = resp.status();
                    let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    return Err(http_error(format!("PATCH {location}"), status, &body));
                }
                Ok(_) | Err(_) => {}
            }
            failures += 1;
            if failures >= self.config.attempts {
                return Err(Error::Transport { context: format!("uploading {d}"), reason: format!("{failures} attempts failed") });
            }
            if let Some(p) = pauses.next() {
                tokio::time::sleep(p).await;
            }
            // Ask the registry how much it holds, and go on from there.
            let status = self.expect(Method::GET, &location, &[], Bytes::new(), &scopes, StatusCode::NO_CONTENT).await?;
            let held = session_size(&status.headers);
            location = location_or(&status.headers, &location);
            if held > offset {
                progress.advance(d, held - offset);
            }
            offset = held.min(size);
        }
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{sep}digest={d}");
        self.expect(Method::PUT, &put, &[(header::CONTENT_LENGTH, "0".into())], Bytes::new(), &scopes, StatusCode::CREATED).await?;
        progress.done(d, false);
        Ok(())
    }

    /// Pushes a manifest under `reference` (a tag or its digest). Returns its digest.
    pub async fn push_manifest(&self, repo: &RepoName, reference: &str, bytes: Bytes, media_type: &str) -> Result<Digest> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let headers = [(header::CONTENT_TYPE, media_type.to_owned())];
        let r = self.expect(Method::PUT, &path, &headers, bytes.clone(), &[scope_push(repo)], StatusCode::CREATED).await?;
        let d = Digest::of(&bytes);
        if let Some(told) = r.headers.get("docker-content-digest").and_then(|v| v.to_str().ok()) {
            let told: Digest = told.parse().map_err(Error::from)?;
            if told != d {
                return Err(Error::DigestMismatch { expected: d, actual: told });
            }
        }
        Ok(d)
    }

    /// A manifest: its digest (checked against the reference if that is a digest),
    /// media type and bytes.
    pub async fn manifest(&self, repo: &RepoName, reference: &str) -> Result<(Digest, String, Bytes)> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let accept = crate::manifest::ACCEPTED.join(", ");
        let r = self.expect(Method::GET, &path, &[(header::ACCEPT, accept)], Bytes::new(), &[scope_pull(repo)], StatusCode::OK).await?;
        let d = Digest::of(&r.body);
        if let Ok(expected) = reference.parse::<Digest>() {
            if expected != d {
                return Err(Error::DigestMismatch { expected, actual: d });
            }
        }
        let media_type = r.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        Ok((d, media_type, r.body))
    }

    /// Downloads `repo`'s blob `d` into the file `dest`, resuming from what `dest`
    /// already holds (an interrupted pull) with a `Range` request, and verifies the
    /// digest before returning; a file that does not verify is removed.
    pub async fn pull_blob_to_file(&self, repo: &RepoName, d: &Digest, dest: &Path, progress: &dyn Progress) -> Result<u64> {
        let mut failures = 0;
        let mut begun = false;
        loop {
            match self.fetch_into(repo, d, dest, progress, &mut begun).await {
                Ok(()) => break,
                Err(e) if e.is_retryable() && failures + 1 < self.config.attempts => {
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(100 << failures.min(5))).await;
                }
                Err(e) => return Err(e),
            }
        }
        let actual = hash_file(dest).await?;
        if actual != *d {
            let _ = tokio::fs::remove_file(dest).await;
            return Err(Error::DigestMismatch { expected: *d, actual });
        }
        progress.done(d, false);
        Ok(tokio::fs::metadata(dest).await.map_err(|source| Error::Io { context: format!("reading {}", dest.display()), source })?.len())
    }

    async fn fetch_into(&self, repo: &RepoName, d: &Digest, dest: &Path, progress: &dyn Progress, begun: &mut bool) -> Result<()> {
        let path = format!("/v2/{repo}/blobs/{d}");
        let io = |what: &'static str| move |source| Error::Io { context: format!("{what} {}", dest.display()), source };
        let have = tokio::fs::metadata(dest).await.map(|m| m.len()).unwrap_or(0);
        let headers = if have > 0 { vec![(header::RANGE, format!("bytes={have}-"))] } else { Vec::new() };
        let resp = self.send(&Method::GET, &path, &headers, &|| full(Bytes::new()), &[scope_pull(repo)]).await?;
        let append = match resp.status() {
            StatusCode::PARTIAL_CONTENT => true,
            StatusCode::OK => false,
            // Nothing past what we hold: the file is whole (the digest check says so).
            StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => return Ok(()),
            s => {
                let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                return Err(http_error(format!("GET {path}"), s, &body));
            }
        };
        let length = resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if !*begun {
            progress.begin(d, length.unwrap_or(0) + if append { have } else { 0 });
            if append {
                progress.advance(d, have);
            }
            *begun = true;
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(!append)
            .append(append)
            .open(dest)
            .await
            .map_err(io("opening"))?;
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Error::Transport { context: format!("GET {path}"), reason: e.to_string() })?;
            if let Ok(data) = frame.into_data() {
                file.write_all(&data).await.map_err(io("writing"))?;
                progress.advance(d, data.len() as u64);
            }
        }
        file.flush().await.map_err(io("writing"))
    }

    /// Every tag of `repo`, following `Link` pages.
    pub async fn tags(&self, repo: &RepoName) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut next = Some(format!("/v2/{repo}/tags/list?n=1000"));
        while let Some(path) = next.take() {
            let r = self.expect(Method::GET, &path, &[], Bytes::new(), &[scope_pull(repo)], StatusCode::OK).await?;
            let v: serde_json::Value =
                serde_json::from_slice(&r.body).map_err(|e| Error::Transport { context: format!("GET {path}"), reason: e.to_string() })?;
            out.extend(v["tags"].as_array().into_iter().flatten().filter_map(|t| t.as_str().map(str::to_owned)));
            next = next_link(&r.headers);
        }
        Ok(out)
    }
}

fn retryable_status(s: StatusCode) -> bool {
    s.is_server_error() || s == StatusCode::RANGE_NOT_SATISFIABLE || s == StatusCode::REQUEST_TIMEOUT
}

/// How many bytes an upload session holds, from its `Range: 0-<last>` (distribution
/// writes `0-0` for an empty session, so a one-byte session cannot be told apart:
/// re-sending one byte is harmless).
fn session_size(h: &HeaderMap) -> u64 {
    let end = h
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.trim().trim_start_matches("bytes=").split_once('-').and_then(|(_, e)| e.trim().parse::<u64>().ok()));
    match end {
        None | Some(0) => 0,
        Some(e) => e + 1,
    }
}

/// The `<url>` of a `Link: <url>; rel="next"` header.
pub(crate) fn next_link(h: &HeaderMap) -> Option<String> {
    let l = h.get(header::LINK)?.to_str().ok()?;
    let (_, rest) = l.split_once('<')?;
    Some(rest.split_once('>')?.0.to_owned())
}

fn location_or(h: &HeaderMap, fallback: &str) -> String {
    h.get(header::LOCATION).and_then(|v| v.to_str().ok()).map_or_else(|| fallback.to_owned(), str::to_owned)
}

fn location(h: &HeaderMap, request: &str) -> Result<String> {
    h.get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| Error::Transport { context: format!("POST {request}"), reason: "the registry sent no Location".into() })
}

/// `len` bytes of `path` from `offset`, streamed.
fn file_body(path: std::path::PathBuf, offset: u64, len: u64) -> ReqBody {
    let stream = futures::stream::once(async move {
        let mut f = tokio::fs::File::open(&path).await?;
        f.seek(std::io::SeekFrom::Start(offset)).await?;
        Ok::<_, std::io::Error>(tokio_util::io::ReaderStream::with_capacity(f.take(len), 256 * 1024))
    })
    .try_flatten()
    .map_ok(Frame::data);
    BodyExt::boxed_unsync(StreamBody::new(stream))
}

pub(crate) async fn hash_file(path: &Path) -> Result<Digest> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || crate::store::hash_file_sync(&owned))
        .await
        .map_err(|e| Error::Io { context: format!("hashing {}", path.display()), source: std::io::Error::other(e) })?
        .map_err(|source| Error::Io { context: format!("reading {}", path.display()), source })
}
