//! The CLI's side of the controller's API ([`super::api`]): JSON requests, and the
//! streamed text answers (builds, logs, runs) line by line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};

/// The file `minipaas up` writes into its data folder.
pub const UP_FILE: &str = "up.json";

/// Where a running platform is, as `<data-dir>/up.json` says (the CLI's default target).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpFile {
    /// The `minipaas up` process.
    pub pid: u32,
    /// The controller (`http://127.0.0.1:port`).
    pub controller: String,
    /// The file holding the controller's token.
    pub token_file: PathBuf,
    /// Where edge serves apps' domains.
    pub edge: SocketAddr,
    /// Where edge serves them over HTTPS (certificates from ACME), if it does.
    #[serde(default)]
    pub edge_tls: Option<SocketAddr>,
    /// The registry, as image names spell it.
    pub registry: String,
    /// etcd's client URL.
    pub etcd: String,
    /// logd.
    pub logd: String,
    /// The apps' git repositories (`git push <git_root>/<app>.git main`).
    pub git_root: PathBuf,
    /// The node's name.
    pub node: String,
}

impl UpFile {
    /// Reads `<data_dir>/up.json`.
    pub fn read(data_dir: &Path) -> Result<UpFile, String> {
        let file = data_dir.join(UP_FILE);
        let text = std::fs::read_to_string(&file)
            .map_err(|e| format!("{}: {e} (is `minipaas up` running with this --data-dir?)", file.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))
    }
}

/// A connection to a controller.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    token: Option<String>,
    user: String,
    http: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

/// Why a request failed: the controller's own message when it answered.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The controller could not be reached.
    #[error("controller at {base}: {reason}")]
    Unreachable {
        /// Its address.
        base: String,
        /// Why.
        reason: String,
    },
    /// It answered with an error.
    #[error("{message} (HTTP {status})")]
    Refused {
        /// The status.
        status: u16,
        /// Its `error` message.
        message: String,
    },
}

impl Client {
    /// A client of the controller at `base` (`http://host:port`), acting as `user`.
    pub fn new(base: &str, token: Option<String>, user: &str) -> Result<Client, ClientError> {
        let base = base.trim_end_matches('/').to_owned();
        let uri: hyper::Uri = base.parse().map_err(|e| ClientError::Unreachable { base: base.clone(), reason: format!("{e}") })?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(ClientError::Unreachable { base, reason: "expected http://host:port".into() });
        }
        let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        Ok(Client { base, token, user: user.to_owned(), http })
    }

    async fn send(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let mut req = hyper::Request::builder().method(method).uri(format!("{}{path}", self.base)).header("x-minipaas-user", &self.user);
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| ClientError::Unreachable { base: self.base.clone(), reason: e.to_string() })?;
        let response = self
            .http
            .request(req)
            .await
            .map_err(|e| ClientError::Unreachable { base: self.base.clone(), reason: format!("{e} (is `minipaas up` running?)") })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let text = response.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&text).trim().to_owned());
        Err(ClientError::Refused { status, message })
    }

    /// A request whose answer is JSON.
    pub async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let body = body.map(|b| Bytes::from(b.to_string()));
        self.call_raw(method, path, body).await
    }

    /// A request with a body as it is (a manifest, a secret's value); its answer is JSON.
    pub async fn call_raw(&self, method: hyper::Method, path: &str, body: Option<Bytes>) -> Result<serde_json::Value, ClientError> {
        let response = self.send(method, path, body).await?;
        let text = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Unreachable { base: self.base.clone(), reason: e.to_string() })?
            .to_bytes();
        serde_json::from_slice(&text).map_err(|e| ClientError::Unreachable { base: self.base.clone(), reason: format!("answer: {e}") })
    }

    /// A request whose answer is streamed text: `line` gets each line as it arrives.
    pub async fn stream(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<&serde_json::Value>,
        line: &mut dyn FnMut(&str),
    ) -> Result<(), ClientError> {
        let response = self.send(method, path, body.map(|b| Bytes::from(b.to_string()))).await?;
        let mut body = response.into_body();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Unreachable { base: self.base.clone(), reason: e.to_string() })?;
            if let Some(data) = frame.data_ref() {
                pending.extend_from_slice(data);
                while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
                    let l: Vec<u8> = pending.drain(..=nl).collect();
                    line(String::from_utf8_lossy(&l[..l.len() - 1]).as_ref());
                }
            }
        }
        if !pending.is_empty() {
            line(String::from_utf8_lossy(&pending).as_ref());
        }
        Ok(())
    }
}
