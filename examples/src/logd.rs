//! `logd`: the platform's log server. Node agents (and `logship`) POST records as NDJSON;
//! logd keeps them in one rotated JSON-lines file per service and answers queries and
//! follow streams by service, instance and time, for `keelson-ctl logs`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use keelson_examples::logd::{serve, LogdConfig};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7070").await?;
//! let config = LogdConfig::new("/var/lib/keelson/logd", Some("a-long-random-token".into()));
//! serve(listener, config, std::future::pending()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! - `POST /v1/push` (bearer token): NDJSON records; `204` once they are synced to disk
//!   (so a shipper's acknowledgement means the records are on logd's disk), `400`
//!   naming the first bad line, `413` over the size cap, `401` without the token.
//! - `GET /v1/logs?service=web.http&instance=…&since=…&tail=…&follow=1` (bearer token):
//!   NDJSON, oldest first; `service` may end in `*` (`shop.*` is every group of job
//!   `shop`); `since` is RFC 3339 or a duration back from now (`5m`); with `follow`, new
//!   records stream as they arrive.
//! - `GET /healthz`: `200 ok`.
//! - With [`LogdConfig::syslog`]: syslog over TLS with client certificates (RFC 5425,
//!   octet counted), APP-NAME as the service, through a disk queue into the same files.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Frame;
use keelson_logship::{FileSink, FileSinkConfig, Record, Sink};

/// Settings of [`serve`].
#[derive(Clone)]
#[non_exhaustive]
pub struct LogdConfig {
    /// Where the per-service files live.
    pub dir: PathBuf,
    /// The bearer token pushes and queries must carry; `None` serves anyone who reaches
    /// the listener (only for a network nothing else reaches).
    pub token: Option<String>,
    /// Largest push body (default 16 MiB).
    pub max_body: usize,
    /// Records a query returns at most before following (default 100,000, the newest).
    pub max_history: usize,
    /// Rotation of the per-service files.
    pub files: FileSinkConfig,
    /// Also receive syslog here: the address and the TLS configuration (which should
    /// verify client certificates: anyone who completes the handshake may write).
    pub syslog: Option<(std::net::SocketAddr, Arc<rustls::ServerConfig>)>,
}

impl std::fmt::Debug for LogdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogdConfig")
            .field("dir", &self.dir)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

impl LogdConfig {
    /// Defaults, keeping files in `dir`.
    pub fn new(dir: impl Into<PathBuf>, token: Option<String>) -> Self {
        LogdConfig { dir: dir.into(), token, max_body: 16 << 20, max_history: 100_000, files: FileSinkConfig::default(), syslog: None }
    }
}

/// Why logd could not start.
#[derive(Debug, thiserror::Error)]
pub enum LogdError {
    /// The directory could not be used.
    #[error("logd directory: {0}")]
    Store(#[from] keelson_logship::Error),
    /// The syslog listener could not start.
    #[error("logd syslog listener: {0}")]
    Syslog(keelson_logship::Error),
}

struct State {
    config: LogdConfig,
    sink: Arc<FileSink>,
    /// One push at a time: a batch is written and synced whole before the next.
    writing: tokio::sync::Mutex<()>,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn text(status: u16, body: impl Into<String>) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body.into())).boxed());
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r
}

/// Serves logd on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: LogdConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), LogdError> {
    let sink = Arc::new(FileSink::with_config(&config.dir, config.files.clone())?);
    if let Some((addr, tls)) = &config.syslog {
        let mut syslog = keelson_logship::SyslogSourceConfig::new(config.dir.join(".syslog-queue"));
        syslog.tcp = Some(*addr);
        syslog.tls = Some(tls.clone());
        let source = keelson_logship::SyslogSource::start(syslog).await.map_err(LogdError::Syslog)?;
        tokio::spawn(ship_syslog(source, sink.clone()));
    }
    let state = Arc::new(State { config, sink, writing: tokio::sync::Mutex::new(()) });
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "logd accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(&state, req).await) }
        });
        tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service));
    }
}

/// Moves what syslog senders sent into the files, for as long as logd runs.
async fn ship_syslog(source: keelson_logship::SyslogSource, sink: Arc<FileSink>) {
    let mut source = keelson_logship::transform::Transformed::new(source, vec![Box::new(FileNames)]);
    let Ok(mut shipper) = keelson_logship::Shipper::new(keelson_logship::ShipConfig::default()) else { return };
    loop {
        if let Err(e) = shipper.run(&mut source, &*sink).await {
            tracing::error!(error = %e, "storing syslog records failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// A sender names the service (APP-NAME): one that cannot name a file becomes `syslog`,
/// or has its other characters replaced, so one bad sender cannot stop the pipeline.
#[derive(Debug)]
struct FileNames;

impl keelson_logship::transform::Transform for FileNames {
    fn apply(&mut self, mut item: keelson_logship::transform::Item, out: &mut Vec<keelson_logship::transform::Item>) {
        if keelson_logship::validate_service(item.record.service()).is_err() {
            let mut labels = (*item.record.labels).clone();
            let cleaned: String = labels
                .service
                .chars()
                .take(128)
                .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '_' })
                .collect();
            labels.service = if keelson_logship::validate_service(&cleaned).is_ok() { cleaned } else { "syslog".into() };
            item.record.labels = Arc::new(labels);
        }
        out.push(item);
    }
}

/// Whether `req` carries the token (compared in constant time).
fn authorized(config: &LogdConfig, req: &hyper::Request<hyper::body::Incoming>) -> bool {
    let Some(token) = &config.token else { return true };
    let given = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|g| g.len() == token.len() && g.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0)
}

async fn handle(state: &Arc<State>, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Body> {
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        return text(200, "ok\n");
    }
    if !authorized(&state.config, &req) {
        return text(401, "a bearer token is required\n");
    }
    match (req.method().as_str(), path.as_str()) {
        ("POST", "/v1/push") => push(state, req).await,
        ("GET", "/v1/logs") => match Query::parse(req.uri().query().unwrap_or("")) {
            Ok(q) => query(state.clone(), q).await,
            Err(e) => text(400, format!("{e}\n")),
        },
        _ => text(404, "try POST /v1/push or GET /v1/logs\n"),
    }
}

async fn push(state: &State, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Body> {
    let body = match Limited::new(req.into_body(), state.config.max_body).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return text(413, format!("a push holds at most {} bytes\n", state.config.max_body))
        }
        Err(e) => return text(400, format!("reading the body: {e}\n")),
    };
    let Ok(body) = std::str::from_utf8(&body) else { return text(400, "the body is not UTF-8\n") };
    let mut records = Vec::new();
    for (n, line) in body.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match Record::from_json(line) {
            Ok(r) => records.push(r),
            Err(e) => return text(400, format!("line {}: {e}\n", n + 1)),
        }
    }
    let _one_at_a_time = state.writing.lock().await;
    let written = match state.sink.send(&records).await {
        Ok(()) => state.sink.flush().await,
        Err(e) => Err(e),
    };
    match written {
        Ok(()) => text(204, ""),
        Err(e @ keelson_logship::Error::InvalidInput { .. }) => text(400, format!("{e}\n")),
        Err(e) => {
            tracing::error!(error = %e, "logd cannot store a push");
            text(500, "storing failed; send again\n")
        }
    }
}

/// A query's parameters.
#[derive(Debug, Clone, PartialEq)]
struct Query {
    service: String,
    instance: Option<String>,
    since: Option<SystemTime>,
    tail: Option<usize>,
    follow: bool,
}

impl Query {
    fn parse(query: &str) -> Result<Query, String> {
        let mut q = Query { service: String::new(), instance: None, since: None, tail: None, follow: false };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "service" => q.service = v,
                "instance" => q.instance = Some(v),
                "since" => {
                    q.since = Some(match humantime::parse_rfc3339_weak(&v) {
                        Ok(t) => t,
                        Err(_) => {
                            let back = humantime::parse_duration(&v)
                                .map_err(|_| format!("since {v:?}: expected RFC 3339 or a duration like 5m"))?;
                            SystemTime::now() - back
                        }
                    })
                }
                "tail" => q.tail = Some(v.parse().map_err(|_| format!("tail {v:?}: expected a number"))?),
                "follow" => q.follow = matches!(v.as_str(), "" | "1" | "true"),
                other => return Err(format!("unknown parameter {other:?}")),
            }
        }
        let name = q.service.strip_suffix('*').unwrap_or(&q.service);
        if name.is_empty() && q.service != "*" {
            return Err("service is required (a name, or a prefix ending in *)".into());
        }
        if !name.is_empty() && !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
            return Err(format!("service {:?}: only A-Za-z0-9_.- and a final *", q.service));
        }
        Ok(q)
    }

    fn services(&self, dir: &Path) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log").map(str::to_owned))
            .filter(|s| match self.service.strip_suffix('*') {
                Some(prefix) => s.starts_with(prefix),
                None => *s == self.service,
            })
            .collect();
        out.sort();
        out
    }

    fn matches(&self, r: &Record) -> bool {
        self.instance.as_ref().is_none_or(|i| r.instance() == i) && self.since.is_none_or(|t| r.timestamp >= t)
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                Ok(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where following a service's live file stands.
struct Followed {
    path: PathBuf,
    file: Option<std::fs::File>,
    inode: u64,
    offset: u64,
}

/// Complete lines of `file` from `offset`; the offset after the last one.
fn read_lines(file: &std::fs::File, offset: u64) -> (Vec<Record>, u64) {
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    if size <= offset {
        return (Vec::new(), offset.min(size));
    }
    let mut buf = vec![0; (size - offset) as usize];
    let Ok(n) = file.read_at(&mut buf, offset) else { return (Vec::new(), offset) };
    buf.truncate(n);
    let end = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let records = String::from_utf8_lossy(&buf[..end]).lines().filter_map(|l| Record::from_json(l).ok()).collect();
    (records, offset + end as u64)
}

async fn query(state: Arc<State>, q: Query) -> hyper::Response<Body> {
    let dir = state.config.dir.clone();
    let cap = q.tail.unwrap_or(state.config.max_history).min(state.config.max_history);
    let q2 = q.clone();
    let history = tokio::task::spawn_blocking(move || {
        let mut kept: VecDeque<Record> = VecDeque::new();
        let mut followed = Vec::new();
        for service in q2.services(&dir) {
            let live = dir.join(format!("{service}.log"));
            let mut rotated: Vec<PathBuf> = (1..=64).map(|n| dir.join(format!("{service}.log.{n}"))).filter(|p| p.exists()).collect();
            rotated.reverse();
            for path in rotated {
                if let Ok(f) = std::fs::File::open(&path) {
                    kept.extend(read_lines(&f, 0).0.into_iter().filter(|r| q2.matches(r)));
                }
            }
            if let Ok(f) = std::fs::File::open(&live) {
                let (records, offset) = read_lines(&f, 0);
                kept.extend(records.into_iter().filter(|r| q2.matches(r)));
                let inode = f.metadata().map(|m| m.ino()).unwrap_or(0);
                followed.push(Followed { path: live, file: Some(f), inode, offset });
            }
            while kept.len() > cap {
                kept.pop_front();
            }
        }
        let mut kept: Vec<Record> = kept.into();
        kept.sort_by_key(|r| r.timestamp);
        (kept, followed)
    })
    .await;
    let Ok((history, followed)) = history else { return text(500, "reading the logs failed\n") };
    let (tx, rx) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    tokio::spawn(stream_out(state, q, history, followed, tx));
    let mut r = hyper::Response::new(BodyExt::boxed(StreamBody::new(rx)));
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/x-ndjson"));
    r
}

async fn stream_out(
    state: Arc<State>,
    q: Query,
    history: Vec<Record>,
    mut followed: Vec<Followed>,
    mut tx: futures::channel::mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
) {
    use futures::SinkExt;
    let send = |records: &[Record]| -> Bytes {
        let mut text = String::new();
        for r in records {
            r.write_json(&mut text);
            text.push('\n');
        }
        Bytes::from(text)
    };
    for chunk in history.chunks(1000) {
        if tx.send(Ok(Frame::data(send(chunk)))).await.is_err() {
            return;
        }
    }
    if !q.follow {
        return;
    }
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Services that appeared since (a new group of the job) are followed from their start.
        for service in q.services(&state.config.dir) {
            let path = state.config.dir.join(format!("{service}.log"));
            if !followed.iter().any(|f| f.path == path) {
                followed.push(Followed { path, file: None, inode: 0, offset: 0 });
            }
        }
        let mut fresh = Vec::new();
        for f in &mut followed {
            let current = std::fs::metadata(&f.path).map(|m| m.ino()).ok();
            if let Some(file) = &f.file {
                let (records, offset) = read_lines(file, f.offset);
                fresh.extend(records.into_iter().filter(|r| q.matches(r)));
                f.offset = offset;
            }
            if current.is_some() && current != Some(f.inode) {
                // Rotated (or new): the old file was read to its end above.
                if let Ok(file) = std::fs::File::open(&f.path) {
                    f.inode = file.metadata().map(|m| m.ino()).unwrap_or(0);
                    let (records, offset) = read_lines(&file, 0);
                    fresh.extend(records.into_iter().filter(|r| q.matches(r)));
                    f.offset = offset;
                    f.file = Some(file);
                }
            }
        }
        fresh.sort_by_key(|r| r.timestamp);
        let frame = if fresh.is_empty() { Bytes::new() } else { send(&fresh) };
        // An empty frame also tells whether the reader is still there.
        if tx.send(Ok(Frame::data(frame))).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_and_bad_ones_are_named() {
        let q = Query::parse("service=shop.*&instance=t%2D1&tail=10&follow=1&since=5m").expect("parses");
        assert_eq!((q.service.as_str(), q.instance.as_deref(), q.tail, q.follow), ("shop.*", Some("t-1"), Some(10), true));
        assert!(q.since.is_some());
        for (bad, named) in [
            ("", "service is required"),
            ("service=../x", "../x"),
            ("service=a&tail=x", "tail"),
            ("service=a&since=yesterday", "yesterday"),
            ("service=a&color=red", "color"),
        ] {
            let err = Query::parse(bad).expect_err(bad);
            assert!(err.contains(named), "{bad}: {err}");
        }
        assert_eq!(percent_decode("a%20b+c%zz"), "a b c%zz");
    }
}
