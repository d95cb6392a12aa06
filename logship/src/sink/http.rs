//! HTTP out: NDJSON, Loki's push API, or Elasticsearch's bulk API. A batch is
//! acknowledged by the server's 2xx answer to the request that carried it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;

use super::Sink;
use crate::error::{Error, Result};
use crate::record::Record;

/// What the request body looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpFormat {
    /// One JSON record per line ([`Record::to_json_line`]), `application/x-ndjson`.
    Ndjson,
    /// Loki's `POST /loki/api/v1/push` JSON: one stream per service, instance, stream and
    /// node; container and image as structured metadata (Loki 3).
    Loki,
    /// Elasticsearch's `POST /_bulk`: a `create` into `index` per record (data streams
    /// take only `create`), with `@timestamp`.
    ElasticsearchBulk {
        /// Index or data stream.
        index: String,
    },
}

/// Settings of an [`HttpSink`].
#[derive(Clone)]
#[non_exhaustive]
pub struct HttpSinkConfig {
    /// `http://` or `https://` URL the batches are POSTed to.
    pub url: String,
    /// Body format.
    pub format: HttpFormat,
    /// Sent as `Authorization: Bearer <token>`; never logged or shown by `Debug`.
    pub bearer_token: Option<String>,
    /// A request (connect, send, answer) gives up after this long (default 10 s).
    pub timeout: Duration,
    /// TLS for `https://` (roots, client certificate); default: no roots, so an
    /// `https://` URL needs one.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for HttpSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSinkConfig")
            .field("url", &self.url)
            .field("format", &self.format)
            .field("bearer_token", &self.bearer_token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HttpSinkConfig {
    /// Defaults, posting `format` to `url`.
    pub fn new(url: impl Into<String>, format: HttpFormat) -> Self {
        HttpSinkConfig { url: url.into(), format, bearer_token: None, timeout: Duration::from_secs(10), tls: None }
    }
}

type Client = hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Posts batches over HTTP (see [`HttpFormat`]). 408, 429 and 5xx answers and transport
/// errors are retryable; other answers are errors naming the status and the start of
/// the body. Items an Elasticsearch bulk answer rejects for good (a mapping conflict)
/// are counted as rejected; any it rejects for now (429) make the batch fail and go
/// again.
#[derive(Debug)]
pub struct HttpSink {
    config: HttpSinkConfig,
    uri: http::Uri,
    client: Client,
    requests: AtomicU64,
    rejected: AtomicU64,
}

impl HttpSink {
    /// A sink posting as `config` says.
    pub fn new(config: HttpSinkConfig) -> Result<Self> {
        let bad = |reason: String| Error::InvalidInput { field: "HTTP sink URL", value: config.url.clone(), reason };
        let uri: http::Uri = config.url.parse().map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") if config.tls.is_some() => {}
            Some("https") => return Err(bad("an https:// URL needs a TLS configuration (roots to trust)".into())),
            _ => return Err(bad("must start with http:// or https://".into())),
        }
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let tls = match &config.tls {
            Some(tls) => (**tls).clone(),
            None => rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| bad(e.to_string()))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().wrap_connector(http);
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(HttpSink { config, uri, client, requests: AtomicU64::new(0), rejected: AtomicU64::new(0) })
    }

    /// Requests sent so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Records a server rejected for good (Elasticsearch item errors other than 429).
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    fn body(&self, batch: &[Record]) -> (Vec<u8>, &'static str) {
        match &self.config.format {
            HttpFormat::Ndjson => {
                let mut text = String::with_capacity(batch.len() * 160);
                for r in batch {
                    r.write_json(&mut text);
                    text.push('\n');
                }
                (text.into_bytes(), "application/x-ndjson")
            }
            HttpFormat::Loki => (loki_body(batch), "application/json"),
            HttpFormat::ElasticsearchBulk { index } => {
                let action = serde_json::json!({ "create": { "_index": index } }).to_string();
                let mut text = String::with_capacity(batch.len() * 200);
                for r in batch {
                    text.push_str(&action);
                    text.push('\n');
                    let mut doc = serde_json::Map::new();
                    doc.insert("@timestamp".into(), humantime::format_rfc3339_nanos(r.timestamp).to_string().into());
                    if let Ok(serde_json::Value::Object(fields)) = serde_json::from_str::<serde_json::Value>(&r.to_json_line()) {
                        doc.extend(fields);
                    }
                    text.push_str(&serde_json::Value::Object(doc).to_string());
                    text.push('\n');
                }
                (text.into_bytes(), "application/x-ndjson")
            }
        }
    }
}

fn loki_body(batch: &[Record]) -> Vec<u8> {
    use serde_json::{json, Map, Value};
    let mut streams: Vec<(Value, Vec<Value>)> = Vec::new();
    for r in batch {
        let l = &*r.labels;
        let mut labels = Map::new();
        labels.insert("service".into(), l.service.clone().into());
        if !l.instance.is_empty() {
            labels.insert("instance".into(), l.instance.clone().into());
        }
        if let Some(node) = &l.node {
            labels.insert("node".into(), node.clone().into());
        }
        labels.insert("stream".into(), r.stream.as_str().into());
        let labels = Value::Object(labels);
        let nanos = r.timestamp.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let mut meta = Map::new();
        for (k, v) in [("container", &l.container), ("image", &l.image)] {
            if let Some(v) = v {
                meta.insert(k.into(), v.clone().into());
            }
        }
        if r.partial {
            meta.insert("partial".into(), "true".into());
        }
        let value = if meta.is_empty() { json!([nanos.to_string(), r.line]) } else { json!([nanos.to_string(), r.line, meta]) };
        match streams.iter_mut().find(|(s, _)| *s == labels) {
            Some((_, values)) => values.push(value),
            None => streams.push((labels, vec![value])),
        }
    }
    let streams: Vec<Value> = streams.into_iter().map(|(stream, values)| json!({ "stream": stream, "values": values })).collect();
    json!({ "streams": streams }).to_string().into_bytes()
}

#[async_trait]
impl Sink for HttpSink {
    fn name(&self) -> &'static str {
        "http"
    }

    fn capabilities(&self) -> super::SinkCapabilities {
        // Loki and Elasticsearch get the labels a stream or document holds; NDJSON all.
        super::SinkCapabilities::new(super::Acknowledgement::Stored, self.config.format == HttpFormat::Ndjson)
    }

    async fn send(&self, batch: &[Record]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let (body, content_type) = self.body(batch);
        let mut request = http::Request::post(self.uri.clone()).header(http::header::CONTENT_TYPE, content_type);
        if let Some(token) = &self.config.bearer_token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Full::new(Bytes::from(body))).map_err(|e| Error::InvalidInput {
            field: "HTTP request",
            value: self.config.url.clone(),
            reason: e.to_string(),
        })?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let timeout = self.config.timeout;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| Error::Io { context: format!("posting logs to {}", self.config.url), source: std::io::Error::other(e) })?;
            let status = response.status();
            let body = response.into_body().collect().await.map_err(|e| Error::Io {
                context: format!("reading the answer of {}", self.config.url),
                source: std::io::Error::other(e),
            })?;
            Ok::<_, Error>((status, body.to_bytes()))
        };
        let (status, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Error::Timeout { operation: format!("posting logs to {}", self.config.url), after: timeout })??;
        if !status.is_success() {
            return Err(Error::Rejected {
                status: status.as_u16(),
                url: self.config.url.clone(),
                body: String::from_utf8_lossy(&body).chars().take(200).collect(),
            });
        }
        if let HttpFormat::ElasticsearchBulk { .. } = self.config.format {
            self.check_bulk_items(&body)?;
        }
        Ok(())
    }

    /// Every batch was acknowledged by the answer to its request.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

impl HttpSink {
    /// A bulk answer is 200 even when items failed: items rejected for now fail the
    /// batch (it goes again); items rejected for good are counted.
    fn check_bulk_items(&self, body: &[u8]) -> Result<()> {
        let Ok(answer) = serde_json::from_slice::<serde_json::Value>(body) else { return Ok(()) };
        if answer.get("errors").and_then(|e| e.as_bool()) != Some(true) {
            return Ok(());
        }
        let statuses: Vec<u64> = answer
            .get("items")
            .and_then(|i| i.as_array())
            .map(|items| items.iter().filter_map(|i| i.as_object()?.values().next()?.get("status")?.as_u64()).collect())
            .unwrap_or_default();
        if statuses.iter().any(|s| *s == 429 || *s >= 500) {
            return Err(Error::Rejected {
                status: 429,
                url: self.config.url.clone(),
                body: "bulk items rejected for now; the batch goes again".into(),
            });
        }
        let failed = statuses.iter().filter(|s| **s >= 300).count() as u64;
        self.rejected.fetch_add(failed, Ordering::Relaxed);
        tracing::warn!(url = %self.config.url, failed, "bulk items rejected for good");
        Ok(())
    }
}
