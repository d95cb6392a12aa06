//! A small fake Consul agent for tests: the subset of the HTTP API keelson's Consul
//! backend uses, with real blocking-query semantics (`X-Consul-Index`, `index`, `wait`),
//! TTL checks that go critical when not updated, and a hook to make the index go
//! backwards (as after a Consul restart). No Consul server can be installed on keelson's
//! test machines; this serves samples in Consul's documented format (`testkit/fixtures/consul`, see [`fixture`])
//! verbatim alongside what tests register.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::tools::TestkitError;

#[derive(Debug)]
struct Registered {
    /// The registration body as sent (ID, Name, Tags, Address, Port, Meta, Check).
    body: Value,
    status: String,
    ttl: Duration,
    updated: Instant,
}

#[derive(Debug, Clone)]
struct Pair {
    value: Vec<u8>,
    create_index: u64,
    modify_index: u64,
    session: Option<String>,
}

#[derive(Debug)]
struct Session {
    ttl: Duration,
    renewed: Instant,
}

#[derive(Debug)]
struct State {
    index: u64,
    services: BTreeMap<String, Registered>,
    /// Entries served verbatim from the fixture, by service name.
    fixture: Vec<Value>,
    kv: BTreeMap<String, Pair>,
    /// Index of the last deletion per key, so a prefix's index covers deletions (as
    /// Consul's tombstones do).
    tombstones: BTreeMap<String, u64>,
    sessions: BTreeMap<String, Session>,
    next_session: u64,
}

impl State {
    fn prefix_index(&self, prefix: &str) -> u64 {
        let live =
            self.kv.range(prefix.to_owned()..).take_while(|(k, _)| k.starts_with(prefix)).map(|(_, p)| p.modify_index).max().unwrap_or(0);
        let dead =
            self.tombstones.range(prefix.to_owned()..).take_while(|(k, _)| k.starts_with(prefix)).map(|(_, i)| *i).max().unwrap_or(0);
        live.max(dead).max(1)
    }

    fn delete_key(&mut self, key: &str) {
        if self.kv.remove(key).is_some() {
            self.index += 1;
            self.tombstones.insert(key.to_owned(), self.index);
        }
    }

    /// Invalidates a session: its keys are deleted (Behavior "delete").
    fn drop_session(&mut self, id: &str) -> bool {
        if self.sessions.remove(id).is_none() {
            return false;
        }
        let held: Vec<String> = self.kv.iter().filter(|(_, p)| p.session.as_deref() == Some(id)).map(|(k, _)| k.clone()).collect();
        for k in held {
            self.delete_key(&k);
        }
        self.index += 1;
        true
    }
}

/// A Consul API sample kept in this repository (`testkit/fixtures/consul/<name>`):
/// responses and payloads in the format of Consul's documentation.
///
/// Found from the checkout the test runs in (`CARGO_MANIFEST_DIR`, which cargo sets
/// for every test run, is the tested crate's folder beside `testkit/`), not from where
/// testkit was compiled: cargo reuses a build across checkouts, and the self-contained
/// check in `scripts/test` must see this checkout's files.
pub fn fixture(name: &str) -> std::path::PathBuf {
    let testkit = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .and_then(|crate_dir| crate_dir.parent().map(|root| root.join("testkit")))
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    testkit.join("fixtures").join("consul").join(name)
}

/// Consul's default `txn_max_req_len`.
const TXN_MAX_REQ_LEN: usize = 512 * 1024;
/// Consul's `maxTxnOps`.
const TXN_MAX_OPS: usize = 64;

fn b64(bytes: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
}

fn unb64(s: &str) -> Option<Vec<u8>> {
    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, s).ok()
}

fn pair_json(key: &str, p: &Pair) -> Value {
    json!({"Key": key, "Value": if p.value.is_empty() { Value::Null } else { json!(b64(&p.value)) }, "CreateIndex": p.create_index,
           "ModifyIndex": p.modify_index, "LockIndex": 0, "Flags": 0, "Session": p.session})
}

/// A running fake Consul; stopped on drop.
#[derive(Debug)]
pub struct FakeConsul {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    https: bool,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Consul durations: `10s`, `100ms`, `1m`.
fn parse_duration(s: &str) -> Option<Duration> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    if let Some(sec) = s.strip_suffix('s') {
        return sec.parse::<f64>().ok().map(Duration::from_secs_f64);
    }
    if let Some(min) = s.strip_suffix('m') {
        return min.parse::<u64>().ok().map(|m| Duration::from_secs(m * 60));
    }
    None
}

impl FakeConsul {
    /// Starts on a free loopback port, seeded with the health sample at `fixture`
    /// (`fixture("health_service.json")`).
    pub async fn start(fixture: &std::path::Path) -> Result<FakeConsul, TestkitError> {
        FakeConsul::start_with(fixture, None).await
    }

    /// Like [`FakeConsul::start`], serving HTTPS with the PEM certificate chain and key.
    pub async fn start_tls(fixture: &std::path::Path, cert_pem: &str, key_pem: &str) -> Result<FakeConsul, TestkitError> {
        use rustls::pki_types::pem::PemObject;
        let bad = |what: &str, e: String| TestkitError::Failed { what: what.into(), detail: e };
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("reading the test certificate", e.to_string()))?;
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad("reading the test key", e.to_string()))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("TLS versions", e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| bad("TLS certificate", e.to_string()))?;
        FakeConsul::start_with(fixture, Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_with(fixture: &std::path::Path, tls: Option<tokio_rustls::TlsAcceptor>) -> Result<FakeConsul, TestkitError> {
        let text = std::fs::read_to_string(fixture).map_err(|e| TestkitError::Failed {
            what: format!("reading Consul fixture {}", fixture.display()),
            detail: format!("{e} (the samples live in testkit/fixtures/consul)"),
        })?;
        let fixture: Vec<Value> = serde_json::from_str(&text)
            .map_err(|e| TestkitError::Failed { what: "parsing the Consul fixture".into(), detail: e.to_string() })?;
        let state = Arc::new(Mutex::new(State {
            index: 10,
            services: BTreeMap::new(),
            fixture,
            kv: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            sessions: BTreeMap::new(),
            next_session: 1,
        }));
        let (changed, _) = watch::channel(10u64);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(crate::tools::io("binding fake Consul"))?;
        let addr = listener.local_addr().map_err(crate::tools::io("fake Consul address"))?;
        let (st, ch) = (state.clone(), changed.clone());
        let tls_enabled = tls.is_some();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (st, ch, tls) = (st.clone(), ch.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (st, ch) = (st.clone(), ch.clone());
                        async move { Ok::<_, Infallible>(handle(req, st, ch).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        // TTL checks go critical on their own, like Consul's.
        let (st, ch) = (state.clone(), changed.clone());
        let expiry = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut s = lock(&st);
                let mut bumped = false;
                for r in s.services.values_mut() {
                    if r.status != "critical" && r.updated.elapsed() > r.ttl {
                        r.status = "critical".into();
                        bumped = true;
                    }
                }
                let expired: Vec<String> =
                    s.sessions.iter().filter(|(_, x)| x.renewed.elapsed() > x.ttl).map(|(id, _)| id.clone()).collect();
                for id in expired {
                    s.drop_session(&id);
                    bumped = true;
                }
                if bumped {
                    s.index += 1;
                    let _ = ch.send(s.index);
                }
            }
        });
        Ok(FakeConsul { addr, state, changed, tasks: vec![server, expiry], https: tls_enabled })
    }

    /// `http://127.0.0.1:<port>`, or `https://localhost:<port>` when serving TLS (the
    /// certificate names `localhost`).
    pub fn url(&self) -> String {
        if self.https {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// The current index.
    pub fn index(&self) -> u64 {
        lock(&self.state).index
    }

    /// Sets the index (lower than now simulates a restarted server) and wakes blocked
    /// queries.
    pub fn set_index(&self, index: u64) {
        let mut s = lock(&self.state);
        s.index = index;
        let _ = self.changed.send(index);
    }
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn reply(status: StatusCode, index: u64, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert("X-Consul-Index", index.to_string().parse().unwrap_or_else(|_| http::HeaderValue::from_static("0")));
    r.headers_mut().insert("Content-Type", http::HeaderValue::from_static("application/json"));
    r
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| kv.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
}

/// Waits, as Consul does, while the caller's index equals the current one, up to `wait`.
async fn block(req_query: &str, state: &Mutex<State>, changed: &watch::Sender<u64>) {
    let Some(index) = query_param(req_query, "index").and_then(|i| i.parse::<u64>().ok()) else { return };
    let wait = query_param(req_query, "wait").and_then(parse_duration).unwrap_or(Duration::from_secs(300));
    let mut rx = changed.subscribe();
    if lock(state).index != index {
        return;
    }
    let _ = tokio::time::timeout(wait, rx.changed()).await;
}

fn health_entry(r: &Registered) -> Value {
    let b = &r.body;
    let id = b["ID"].as_str().unwrap_or_default();
    json!({
        "Node": {"ID": "fake-node", "Node": "fake", "Address": "127.0.0.1", "Datacenter": "dc1"},
        "Service": {
            "ID": id, "Service": b["Name"], "Tags": b.get("Tags").cloned().unwrap_or(json!([])),
            "Address": b.get("Address").cloned().unwrap_or(json!("")), "Meta": b.get("Meta").cloned().unwrap_or(json!({})),
            "Port": b.get("Port").cloned().unwrap_or(json!(0))
        },
        "Checks": [
            {"Node": "fake", "CheckID": format!("service:{id}"), "Status": r.status, "ServiceID": id},
            {"Node": "fake", "CheckID": "serfHealth", "Status": "passing", "ServiceID": ""}
        ]
    })
}

async fn handle(req: Request<Incoming>, state: Arc<Mutex<State>>, changed: watch::Sender<u64>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let bump = |s: &mut State| {
        s.index += 1;
        let _ = changed.send(s.index);
    };
    match (method, path.as_str()) {
        (Method::PUT, "/v1/agent/service/register") => {
            let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                return reply(StatusCode::BAD_REQUEST, 0, json!("Request decode failed"));
            };
            let Some(id) = v["ID"].as_str().map(str::to_owned) else { return reply(StatusCode::BAD_REQUEST, 0, json!("missing ID")) };
            let ttl = v["Check"]["TTL"].as_str().and_then(parse_duration).unwrap_or(Duration::from_secs(30));
            let status = v["Check"]["Status"].as_str().unwrap_or("critical").to_owned();
            let mut s = lock(&state);
            s.services.insert(id, Registered { body: v, status, ttl, updated: Instant::now() });
            bump(&mut s);
            reply(StatusCode::OK, s.index, Value::Null)
        }
        (Method::PUT, p) if p.starts_with("/v1/agent/service/deregister/") => {
            let id = &p["/v1/agent/service/deregister/".len()..];
            let mut s = lock(&state);
            if s.services.remove(id).is_none() {
                return reply(StatusCode::NOT_FOUND, s.index, json!(format!("Unknown service ID {id:?}")));
            }
            bump(&mut s);
            reply(StatusCode::OK, s.index, Value::Null)
        }
        (Method::PUT, p) if p.starts_with("/v1/agent/check/update/") => {
            let check = &p["/v1/agent/check/update/".len()..];
            let status =
                serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["Status"].as_str().map(str::to_owned)).unwrap_or_default();
            if !["passing", "warning", "critical"].contains(&status.as_str()) {
                return reply(StatusCode::BAD_REQUEST, 0, json!("Invalid check status"));
            }
            let mut s = lock(&state);
            let Some(r) = check.strip_prefix("service:").and_then(|id| s.services.get_mut(id)) else {
                return reply(StatusCode::NOT_FOUND, s.index, json!(format!("Unknown check ID {check:?}")));
            };
            r.updated = Instant::now();
            let changed_status = r.status != status;
            r.status = status;
            if changed_status {
                bump(&mut s);
            }
            reply(StatusCode::OK, s.index, Value::Null)
        }
        (Method::GET, p) if p.starts_with("/v1/health/service/") => {
            block(&query, &state, &changed).await;
            let name = &p["/v1/health/service/".len()..];
            let s = lock(&state);
            let mut entries: Vec<Value> = s.fixture.iter().filter(|e| e["Service"]["Service"] == name).cloned().collect();
            entries.extend(s.services.values().filter(|r| r.body["Name"] == name).map(health_entry));
            reply(StatusCode::OK, s.index, Value::Array(entries))
        }
        (Method::GET, "/v1/health/state/any") => {
            block(&query, &state, &changed).await;
            let s = lock(&state);
            reply(StatusCode::OK, s.index, json!([]))
        }
        (Method::GET, "/v1/catalog/services") => {
            block(&query, &state, &changed).await;
            let s = lock(&state);
            let mut out = serde_json::Map::new();
            for e in &s.fixture {
                if let Some(n) = e["Service"]["Service"].as_str() {
                    out.insert(n.to_owned(), e["Service"]["Tags"].clone());
                }
            }
            for r in s.services.values() {
                if let Some(n) = r.body["Name"].as_str() {
                    out.insert(n.to_owned(), r.body.get("Tags").cloned().unwrap_or(json!([])));
                }
            }
            reply(StatusCode::OK, s.index, Value::Object(out))
        }
        (Method::GET, p) if p.starts_with("/v1/kv/") => {
            let key = &p["/v1/kv/".len()..];
            let recurse = query.split('&').any(|q| q == "recurse" || q.starts_with("recurse="));
            // Block on the prefix's own index, like Consul.
            if let Some(index) = query_param(&query, "index").and_then(|i| i.parse::<u64>().ok()) {
                let wait = query_param(&query, "wait").and_then(parse_duration).unwrap_or(Duration::from_secs(300));
                let mut rx = changed.subscribe();
                let deadline = tokio::time::Instant::now() + wait;
                while lock(&state).prefix_index(key) == index {
                    if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                        break;
                    }
                }
            }
            let s = lock(&state);
            let idx = if recurse { s.prefix_index(key) } else { s.kv.get(key).map_or(s.prefix_index(key), |p| p.modify_index) };
            let found: Vec<Value> = if recurse {
                s.kv.range(key.to_owned()..).take_while(|(k, _)| k.starts_with(key)).map(|(k, p)| pair_json(k, p)).collect()
            } else {
                s.kv.get(key).map(|p| vec![pair_json(key, p)]).unwrap_or_default()
            };
            if found.is_empty() {
                return reply(StatusCode::NOT_FOUND, idx, Value::Null);
            }
            reply(StatusCode::OK, idx, Value::Array(found))
        }
        (Method::PUT, "/v1/txn") => {
            // Consul's limits: the request body (`txn_max_req_len`, 512 KiB by default) and
            // 64 operations, both refused whole with 413 before anything is checked.
            if body.len() > TXN_MAX_REQ_LEN {
                return reply(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    0,
                    json!(format!("Request body too large, max size: {TXN_MAX_REQ_LEN} bytes")),
                );
            }
            let Ok(ops) = serde_json::from_slice::<Vec<Value>>(&body) else {
                return reply(StatusCode::BAD_REQUEST, 0, json!("Failed to parse body"));
            };
            if ops.len() > TXN_MAX_OPS {
                let what = format!("Transaction contains too many operations ({} > {TXN_MAX_OPS})", ops.len());
                return reply(StatusCode::PAYLOAD_TOO_LARGE, 0, json!(what));
            }
            let mut s = lock(&state);
            // Check every op first: all or nothing.
            let mut errors = Vec::new();
            for (i, op) in ops.iter().enumerate() {
                let kv = &op["KV"];
                let key = kv["Key"].as_str().unwrap_or_default();
                let cur = s.kv.get(key);
                let err = match kv["Verb"].as_str().unwrap_or_default() {
                    "set" | "delete" => None,
                    "get" => cur.is_none().then(|| "key doesn't exist".to_owned()),
                    "cas" => {
                        let want = kv["Index"].as_u64().unwrap_or(0);
                        let ok = if want == 0 { cur.is_none() } else { cur.is_some_and(|p| p.modify_index == want) };
                        (!ok).then(|| "failed to set key: index mismatch".to_owned())
                    }
                    "check-index" => cur
                        .is_none_or(|p| p.modify_index != kv["Index"].as_u64().unwrap_or(0))
                        .then(|| "current modify index mismatch".to_owned()),
                    "check-not-exists" => cur.is_some().then(|| "key already exists".to_owned()),
                    "check-session" => {
                        let sess = kv["Session"].as_str().unwrap_or_default();
                        (cur.and_then(|p| p.session.as_deref()) != Some(sess)).then(|| format!("key is not locked by session {sess:?}"))
                    }
                    "lock" => {
                        let sess = kv["Session"].as_str().unwrap_or_default();
                        if !s.sessions.contains_key(sess) {
                            Some(format!("invalid session {sess:?}"))
                        } else if cur.and_then(|p| p.session.as_deref()).is_some_and(|h| h != sess) {
                            Some("key is locked by another session".to_owned())
                        } else {
                            None
                        }
                    }
                    other => Some(format!("unknown verb {other:?}")),
                };
                if let Some(what) = err {
                    errors.push(json!({"OpIndex": i, "What": what}));
                }
            }
            if !errors.is_empty() {
                return reply(StatusCode::CONFLICT, s.index, json!({"Results": null, "Errors": errors}));
            }
            let mut results = Vec::new();
            // One transaction is one Raft entry: every write in it gets the same index.
            let writes = ops.iter().any(|op| matches!(op["KV"]["Verb"].as_str(), Some("set" | "cas" | "lock" | "delete")));
            if writes {
                s.index += 1;
            }
            let index = s.index;
            for op in &ops {
                let kv = &op["KV"];
                let key = kv["Key"].as_str().unwrap_or_default().to_owned();
                match kv["Verb"].as_str().unwrap_or_default() {
                    "set" | "cas" | "lock" => {
                        let value = kv["Value"].as_str().and_then(unb64).unwrap_or_default();
                        let session = kv["Session"].as_str().map(str::to_owned);
                        let create_index = s.kv.get(&key).map_or(index, |p| p.create_index);
                        let session = session.or_else(|| s.kv.get(&key).and_then(|p| p.session.clone()));
                        let pair = Pair { value, create_index, modify_index: index, session };
                        results.push(json!({"KV": pair_json(&key, &pair)}));
                        s.tombstones.remove(&key);
                        s.kv.insert(key, pair);
                    }
                    "delete" if s.kv.remove(&key).is_some() => {
                        s.tombstones.insert(key, index);
                    }
                    "get" => {
                        if let Some(p) = s.kv.get(&key) {
                            results.push(json!({"KV": pair_json(&key, p)}));
                        }
                    }
                    _ => {}
                }
            }
            let _ = changed.send(s.index);
            reply(StatusCode::OK, s.index, json!({"Results": results, "Errors": null}))
        }
        (Method::PUT, "/v1/session/create") => {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let Some(ttl) = v["TTL"].as_str().and_then(parse_duration) else {
                return reply(StatusCode::BAD_REQUEST, 0, json!("TTL required"));
            };
            if ttl < Duration::from_secs(10) || ttl > Duration::from_secs(86_400) {
                return reply(
                    StatusCode::BAD_REQUEST,
                    0,
                    json!(format!("Invalid Session TTL '{}', must be between [10s=24h0m0s]", v["TTL"])),
                );
            }
            let mut s = lock(&state);
            let id = format!("00000000-0000-4000-8000-{:012x}", s.next_session);
            s.next_session += 1;
            s.sessions.insert(id.clone(), Session { ttl, renewed: Instant::now() });
            bump(&mut s);
            reply(StatusCode::OK, s.index, json!({"ID": id}))
        }
        (Method::PUT, p) if p.starts_with("/v1/session/renew/") => {
            let id = &p["/v1/session/renew/".len()..];
            let mut s = lock(&state);
            match s.sessions.get_mut(id) {
                Some(x) => {
                    x.renewed = Instant::now();
                    reply(StatusCode::OK, s.index, json!([{"ID": id}]))
                }
                None => reply(StatusCode::NOT_FOUND, s.index, json!(format!("Session id '{id}' not found"))),
            }
        }
        (Method::PUT, p) if p.starts_with("/v1/session/destroy/") => {
            let id = &p["/v1/session/destroy/".len()..];
            let mut s = lock(&state);
            s.drop_session(id);
            let _ = changed.send(s.index);
            reply(StatusCode::OK, s.index, json!(true))
        }
        (Method::GET, p) if p.starts_with("/v1/session/info/") => {
            let id = &p["/v1/session/info/".len()..];
            let s = lock(&state);
            let found = if s.sessions.contains_key(id) { json!([{"ID": id}]) } else { json!([]) };
            reply(StatusCode::OK, s.index, found)
        }
        _ => reply(StatusCode::NOT_FOUND, 0, json!("not found")),
    }
}
