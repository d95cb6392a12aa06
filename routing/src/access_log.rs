//! A buffered, structured access log: one JSON object per line per request.
//!
//! The request path only hands a record to a bounded channel (`try_send`, no I/O, no
//! lock held across an await); a writer task batches records into a buffered file and
//! flushes after each batch. When the writer falls behind, records are dropped and
//! counted (`keelson_proxy_access_log_dropped_total`) rather than slowing the proxy.
//!
//! ```no_run
//! # async fn demo(router: std::sync::Arc<keelson_routing::MemoryRouter>) -> keelson_routing::Result<()> {
//! use keelson_routing::{AccessLog, Proxy, ProxyConfig};
//! let (log, _writer) = AccessLog::to_file("access.log".as_ref(), 65_536).await?;
//! let proxy = Proxy::new(router, ProxyConfig::default()).with_access_log(log);
//! # let _ = proxy; Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::proxy::{ProxyHooks, RequestSummary};

/// One request as the access log records it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AccessRecord {
    /// When the request arrived, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The client's address.
    pub client: SocketAddr,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub protocol: String,
    /// Request method.
    pub method: String,
    /// The host asked for (lower-case, no port); empty if the request had none.
    pub host: String,
    /// Path and query.
    pub target: String,
    /// Response status.
    pub status: u16,
    /// The matched route's name, if any.
    pub route: Option<String>,
    /// The upstream that answered (the last one tried), if any.
    pub upstream: Option<SocketAddr>,
    /// Time to the response head, in microseconds.
    pub duration_us: u64,
}

/// The sending side of the access log; cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<AccessRecord>,
    dropped: Counter,
}

impl AccessLog {
    /// Appends to `path` (created if missing). `capacity` records may wait for the
    /// writer; beyond that they are dropped and counted. The writer task ends when every
    /// `AccessLog` clone is gone, after writing what it holds.
    pub async fn to_file(path: &Path, capacity: usize) -> Result<(Self, JoinHandle<()>)> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(|source| Error::Io { context: format!("opening access log {}", path.display()), source })?;
        Ok(Self::to_writer(file, capacity))
    }

    /// Like [`AccessLog::to_file`], onto any writer.
    pub fn to_writer<W>(writer: W, capacity: usize) -> (Self, JoinHandle<()>)
    where
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<AccessRecord>(capacity.max(1));
        let task = tokio::spawn(async move {
            let mut out = tokio::io::BufWriter::with_capacity(64 * 1024, writer);
            let mut batch = Vec::with_capacity(256);
            let mut line = Vec::with_capacity(256);
            while rx.recv_many(&mut batch, 256).await > 0 {
                for record in batch.drain(..) {
                    line.clear();
                    if serde_json::to_writer(&mut line, &record).is_ok() {
                        line.push(b'\n');
                        if let Err(e) = out.write_all(&line).await {
                            tracing::warn!(error = %e, "access log write failed");
                        }
                    }
                }
                if let Err(e) = out.flush().await {
                    tracing::warn!(error = %e, "access log flush failed");
                }
            }
        });
        (AccessLog { tx, dropped: Counter::default() }, task)
    }

    /// Queues a record without waiting; a full queue drops it (and counts it).
    pub fn record(&self, record: AccessRecord) {
        if self.tx.try_send(record).is_err() {
            self.dropped.inc();
        }
    }

    /// Records dropped because the writer fell behind (or stopped).
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    pub(crate) fn dropped_counter(&self) -> Counter {
        self.dropped.clone()
    }
}

/// `time` for a record: RFC 3339 UTC with milliseconds.
fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The access log is a hook: one record per request, from its summary.
impl ProxyHooks for AccessLog {
    fn logging(&self, summary: &RequestSummary<'_>) {
        let request = summary.request;
        self.record(AccessRecord {
            time: timestamp(summary.at),
            client: summary.ctx.client(),
            protocol: format!("{:?}", request.version),
            method: request.method.to_string(),
            host: summary.ctx.host().unwrap_or_default().to_owned(),
            target: request.uri.path_and_query().map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            status: summary.status.as_u16(),
            route: summary.ctx.route().map(str::to_owned),
            upstream: summary.ctx.upstream(),
            duration_us: micros(summary.duration),
        });
    }
}
