//! Reading `logd`: the query `keelson-ctl logs` sends and the printing of its answer.

use std::io::Write;
use std::path::Path;

use http_body_util::{BodyExt, Empty};
use keelson_logship::Record;

/// What to ask logd for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogQuery {
    /// A service, or a prefix ending in `*`.
    pub service: String,
    /// Only this instance.
    pub instance: Option<String>,
    /// RFC 3339, or a duration back from now.
    pub since: Option<String>,
    /// Only the last N.
    pub tail: Option<usize>,
    /// Keep streaming.
    pub follow: bool,
}

impl LogQuery {
    /// The query string, percent-encoded.
    pub fn to_query_string(&self) -> String {
        let enc = |s: &str| {
            s.bytes()
                .map(|b| if b.is_ascii_alphanumeric() || b"-._*".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
                .collect::<String>()
        };
        let mut q = format!("service={}", enc(&self.service));
        if let Some(i) = &self.instance {
            q.push_str(&format!("&instance={}", enc(i)));
        }
        if let Some(s) = &self.since {
            q.push_str(&format!("&since={}", enc(s)));
        }
        if let Some(t) = self.tail {
            q.push_str(&format!("&tail={t}"));
        }
        if self.follow {
            q.push_str("&follow=1");
        }
        q
    }
}

/// Sends `query` to logd at `base` (http://host:port) and returns the answer's body
/// (NDJSON records; read them with [`records`]).
pub async fn open(query: &LogQuery, base: &str, token: Option<&str>) -> Result<hyper::body::Incoming, String> {
    let url = format!("{}/v1/logs?{}", base.trim_end_matches('/'), query.to_query_string());
    let uri: hyper::Uri = url.parse().map_err(|e| format!("--logd {base}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("--logd {base}: expected http://host:port"));
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let mut req = hyper::Request::get(uri);
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    let response = client.request(req).await.map_err(|e| format!("logd at {base}: {e}"))?;
    let status = response.status();
    let body = response.into_body();
    if !status.is_success() {
        let text = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Err(format!("logd answered {status}: {}", String::from_utf8_lossy(&text).trim()));
    }
    Ok(body)
}

/// The records of a logd answer as they arrive (a line that does not parse is an error
/// item; the stream goes on after it).
pub fn records(body: hyper::body::Incoming) -> impl futures::Stream<Item = Result<Record, String>> + Send {
    futures::stream::unfold((body, Vec::<u8>::new(), false), |(mut body, mut pending, mut ended)| async move {
        loop {
            if let Some(nl) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let text = String::from_utf8_lossy(&line);
                if text.trim().is_empty() {
                    continue;
                }
                let item = Record::from_json(&text).map_err(|e| format!("logd sent a record that does not parse ({e}): {}", text.trim()));
                return Some((item, (body, pending, ended)));
            }
            if ended {
                return None;
            }
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        pending.extend_from_slice(data);
                    }
                }
                Some(Err(e)) => {
                    ended = true;
                    pending.clear();
                    return Some((Err(format!("reading from logd: {e}")), (body, pending, ended)));
                }
                None => {
                    ended = true;
                    pending.push(b'\n');
                }
            }
        }
    })
}

/// Reads a bearer token from a file (its first line).
pub fn read_token(path: &Path) -> Result<String, String> {
    Ok(std::fs::read_to_string(path).map_err(|e| format!("--token-file {}: {e}", path.display()))?.trim().to_owned())
}

/// Asks logd at `base` for `query` (which must not follow) and returns its records,
/// oldest first.
pub async fn fetch_records(query: &LogQuery, base: &str, token: Option<&str>) -> Result<Vec<Record>, String> {
    let body = open(query, base, token).await?.collect().await.map_err(|e| format!("reading from logd: {e}"))?.to_bytes();
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Record::from_json(l).map_err(|e| format!("logd sent a record that does not parse ({e}): {l}")))
        .collect()
}

/// Asks logd at `base` (http://host:port) and prints each record as it comes: one line
/// `<time> <instance> <stream> <line>`, or NDJSON with `json`. Errors are one line each.
pub async fn print_logs(query: &LogQuery, base: &str, token_file: Option<&Path>, json: bool) -> Result<(), String> {
    let token = token_file.map(read_token).transpose()?;
    let mut body = open(query, base, token.as_deref()).await?;
    let mut pending = Vec::new();
    let mut out = std::io::stdout().lock();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading from logd: {e}"))?;
        let Some(data) = frame.data_ref() else { continue };
        pending.extend_from_slice(data);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line);
            let written = if json {
                write!(out, "{text}")
            } else if let Ok(r) = Record::from_json(&text) {
                writeln!(out, "{} {} {} {}", humantime::format_rfc3339_millis(r.timestamp), r.instance(), r.stream.as_str(), r.line)
            } else {
                Ok(())
            };
            match written.and_then(|()| out.flush()) {
                Ok(()) => {}
                // The reader went away (`| head`): done, not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(format!("writing the logs: {e}")),
            }
        }
    }
    Ok(())
}
