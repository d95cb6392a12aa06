//! The Consul backend (feature `consul`): [`ConsulDiscovery`] implements [`Discovery`] on a
//! Consul agent's HTTP API.
//!
//! - Registration goes through the local agent (`/v1/agent/service/register`, so the
//!   agent's anti-entropy keeps the catalog right) with a TTL check `service:<id>`. The
//!   handle keeps the check updated every TTL/3 with the instance's *desired* status, so
//!   health set through this `ConsulDiscovery` sticks; if the agent forgot the instance
//!   (restart), the handle registers it again. Dropped, the check goes critical after the
//!   TTL and Consul removes the instance after `max(3 × TTL, 1 min)`.
//! - Lookups read `/v1/health/service/<name>`; health is Consul's aggregate of the node
//!   and service checks. Watches are blocking queries with Consul's index rules: an index
//!   that goes backwards resets to 0, an index below 1 is never sent after the first
//!   call, and queries are spaced by at least `min_query_interval` since one may return
//!   early with no change.
//! - Every request is bounded by `request_timeout` (plus the blocking wait) and fails
//!   with [`Error::Unavailable`]; the ACL token goes in `X-Consul-Token` and never into
//!   logs or `Debug`. `https://` agents are reached over TLS (rustls), trusting exactly
//!   the CA in `ca_file`.
//!
//! [`ConsulKv`] implements [`KeyValue`] on Consul's KV store: every write goes through
//! `/v1/txn` (so it returns its `ModifyIndex`, the version), compare-and-swap is
//! `check-index` / `check-not-exists` plus the write in one transaction, leases are
//! sessions with `Behavior: delete` (keys written under a lease are locked by its session
//! and deleted when it is invalidated), and watches are blocking recursive reads turned
//! into events by comparing listings. Consul keeps no history: a watch from a past
//! revision works only if nothing under the prefix changed since (the prefix's index
//! covers deletions); otherwise it is [`crate::Error::Compacted`]. Sessions live 10 s at
//! least.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::consul_api::{duration_text, parse, CatalogServices, HealthServiceEntry, KvPair, ServiceRegistration, SessionCreated};
use crate::discovery::{
    Discovery, DiscoveryCapabilities, Health, Instance, Query, Registration, RegistrationHandle, RegistrationLease, Snapshot,
    SnapshotStream,
};
use crate::error::{Error, Result};
use crate::kv::{self, Expect, KeyValue, KvCapabilities, KvEntry, KvEvent, KvEventKind, KvList, KvWatch, LeaseId};
use crate::name::{validate_instance_id, ServiceName};

const BACKEND: &str = "consul";

/// How to reach the Consul agent.
#[derive(Clone)]
#[non_exhaustive]
pub struct ConsulConfig {
    /// Agent URL, `http://127.0.0.1:8500`.
    pub address: String,
    /// ACL token, sent as `X-Consul-Token`. Never printed.
    pub token: Option<String>,
    /// Datacenter to query (default: the agent's).
    pub datacenter: Option<String>,
    /// Bound on every request, on top of a blocking query's wait (default 5 s).
    pub request_timeout: Duration,
    /// How long a blocking query waits for a change (default 60 s; Consul caps it at 10 min).
    pub wait: Duration,
    /// Least time between two blocking queries of one watch (default 100 ms).
    pub min_query_interval: Duration,
    /// PEM file of the CA that signed the agent's certificate; required for `https://`.
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate chain and key (PEM files), for agents that verify clients
    /// (`verify_incoming`).
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl std::fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .field("request_timeout", &self.request_timeout)
            .field("wait", &self.wait)
            .field("min_query_interval", &self.min_query_interval)
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert.as_ref().map(|(cert, _)| cert))
            .finish()
    }
}

impl ConsulConfig {
    /// The agent at `address`, with defaults for the rest.
    pub fn new(address: impl Into<String>) -> Self {
        ConsulConfig {
            address: address.into(),
            token: None,
            datacenter: None,
            request_timeout: Duration::from_secs(5),
            wait: Duration::from_secs(60),
            min_query_interval: Duration::from_millis(100),
            ca_file: None,
            client_cert: None,
        }
    }
}

/// An HTTP and HTTPS connector; HTTPS trusts exactly the configured CA.
fn connector(config: &ConsulConfig) -> Result<HttpsConnector<HttpConnector>> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(config.request_timeout));
    http.enforce_http(false);
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = &config.ca_file {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| Error::invalid("consul ca_file", path.display().to_string(), e.to_string()))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::invalid("consul ca_file", path.display().to_string(), e.to_string()))?;
        if certs.is_empty() {
            return Err(Error::invalid("consul ca_file", path.display().to_string(), "holds no PEM certificate"));
        }
        for c in certs {
            roots.add(c).map_err(|e| Error::invalid("consul ca_file", path.display().to_string(), e.to_string()))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })?
        .with_root_certificates(roots);
    let tls = match &config.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            use rustls::pki_types::pem::PemObject;
            let bad = |field: &'static str, path: &std::path::Path, e: String| Error::invalid(field, path.display().to_string(), e);
            let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert)
                .map_err(|e| bad("consul client certificate", cert, e.to_string()))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| bad("consul client certificate", cert, e.to_string()))?;
            let key_der = rustls::pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| bad("consul client key", key, e.to_string()))?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| bad("consul client certificate", cert, e.to_string()))?
        }
    };
    Ok(HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().wrap_connector(http))
}

/// `Discovery` on a Consul agent.
#[derive(Clone)]
pub struct ConsulDiscovery {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    config: ConsulConfig,
    base: String,
    /// Desired health of the instances registered through this client, by id.
    desired: Mutex<HashMap<String, Health>>,
}

impl std::fmt::Debug for ConsulDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulDiscovery").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

fn status_text(h: Health) -> &'static str {
    match h {
        Health::Passing => "passing",
        Health::Warning => "warning",
        Health::Critical => "critical",
    }
}

/// A response: status, `X-Consul-Index` (0 if absent), body.
struct Reply {
    status: StatusCode,
    index: u64,
    body: Bytes,
}

impl ConsulDiscovery {
    /// A client for the agent at `config.address`. Connects lazily.
    pub fn new(config: ConsulConfig) -> Result<Self> {
        Ok(ConsulDiscovery { inner: Arc::new(Inner::new(config)?) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Health>> {
        self.inner.desired.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn new(config: ConsulConfig) -> Result<Inner> {
        let base = config.address.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) || base.len() < 8 {
            return Err(Error::invalid("consul address", &config.address, "must be an http:// or https:// URL"));
        }
        if base.starts_with("https://") && config.ca_file.is_none() {
            return Err(Error::invalid("consul ca_file", "", "an https:// address needs the CA's PEM file (ConsulConfig::ca_file)"));
        }
        let client = Client::builder(TokioExecutor::new()).build(connector(&config)?);
        Ok(Inner { client, config, base, desired: Mutex::new(HashMap::new()) })
    }

    /// Makes `query` a blocking query when `wait_from` is set (Consul answers once the
    /// index moves past it, or after `wait`); returns the extra time the HTTP timeout
    /// must allow for the wait, plus Consul's up-to-1/16 jitter.
    fn blocking(&self, query: &mut Vec<(&str, String)>, wait_from: Option<u64>) -> Duration {
        let Some(index) = wait_from else { return Duration::ZERO };
        query.push(("index", index.to_string()));
        query.push(("wait", format!("{}ms", self.config.wait.as_millis())));
        self.config.wait + self.config.wait / 16
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        mut query: Vec<(&str, String)>,
        body: Option<Vec<u8>>,
        extra_wait: Duration,
    ) -> Result<Reply> {
        if let Some(dc) = &self.config.datacenter {
            query.push(("dc", dc.clone()));
        }
        let qs: String = query.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
        let uri = if qs.is_empty() { format!("{}{path}", self.base) } else { format!("{}{path}?{qs}", self.base) };
        let mut req = Request::builder().method(method).uri(&uri);
        if let Some(token) = &self.config.token {
            req = req.header("X-Consul-Token", token);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Error::invalid("consul request", path, e.to_string()))?;
        let limit = self.config.request_timeout + extra_wait;
        let exchange = async {
            let resp =
                self.client.request(req).await.map_err(|e| Error::Unavailable { backend: BACKEND, reason: format!("{path}: {e}") })?;
            let status = resp.status();
            let index = resp.headers().get("X-Consul-Index").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| Error::Unavailable { backend: BACKEND, reason: format!("{path}: {e}") })?
                .to_bytes();
            Ok(Reply { status, index, body })
        };
        match tokio::time::timeout(limit, exchange).await {
            Ok(r) => r,
            Err(_) => Err(Error::Unavailable { backend: BACKEND, reason: format!("{path}: no answer within {limit:?}") }),
        }
    }

    /// Maps a non-success reply to a typed error.
    fn check(&self, what: &str, name: &str, r: Reply) -> Result<Reply> {
        let text = String::from_utf8_lossy(&r.body).into_owned();
        match r.status {
            s if s.is_success() => Ok(r),
            StatusCode::NOT_FOUND => Err(Error::NotFound { kind: "instance", name: name.to_owned() }),
            StatusCode::BAD_REQUEST => {
                Err(Error::InvalidInput { field: "consul request", value: name.to_owned(), reason: format!("{what}: {text}") })
            }
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
                Err(Error::Backend { backend: BACKEND, source: format!("{what}: permission denied: {text}").into() })
            }
            s if s.is_server_error() && text.contains("Unknown") => Err(Error::NotFound { kind: "instance", name: name.to_owned() }),
            s if s.is_server_error() => Err(Error::Unavailable { backend: BACKEND, reason: format!("{what}: {s} {text}") }),
            s => Err(Error::Backend { backend: BACKEND, source: format!("{what}: unexpected {s}: {text}").into() }),
        }
    }

    async fn register_raw(&self, payload: &ServiceRegistration) -> Result<()> {
        let body = serde_json::to_vec(payload).map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })?;
        let r = self.call(Method::PUT, "/v1/agent/service/register", vec![], Some(body), Duration::ZERO).await?;
        self.check("register", &payload.id, r).map(|_| ())
    }

    async fn update_check(&self, id: &str, health: Health) -> Result<()> {
        let body = serde_json::json!({ "Status": status_text(health), "Output": "set by keelson" }).to_string().into_bytes();
        let path = format!("/v1/agent/check/update/service:{id}");
        let r = self.call(Method::PUT, &path, vec![], Some(body), Duration::ZERO).await?;
        self.check("check update", id, r).map(|_| ())
    }

    /// Instances of one service, with the reply's index. `wait_from`: block until the
    /// index moves past it.
    async fn health_service(&self, service: &str, wait_from: Option<u64>) -> Result<(Vec<Instance>, u64)> {
        let mut q = Vec::new();
        let extra = self.blocking(&mut q, wait_from);
        let r = self.call(Method::GET, &format!("/v1/health/service/{service}"), q, None, extra).await?;
        let r = self.check("health/service", service, r)?;
        let entries: Vec<HealthServiceEntry> = parse("health/service", &r.body)?;
        let mut out = Vec::with_capacity(entries.len());
        for e in &entries {
            match e.to_instance() {
                Ok(i) => out.push(i),
                Err(err) => tracing::warn!(service, error = %err, "skipping a Consul entry keelson cannot represent"),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((out, r.index))
    }

    async fn catalog_services(&self, wait_from: Option<u64>) -> Result<(Vec<String>, u64)> {
        let mut q = Vec::new();
        let extra = self.blocking(&mut q, wait_from);
        let r = self.call(Method::GET, "/v1/catalog/services", q, None, extra).await?;
        let r = self.check("catalog/services", "catalog", r)?;
        let services: CatalogServices = parse("catalog/services", &r.body)?;
        Ok((services.into_keys().collect(), r.index))
    }

    /// Every instance of the query's service(s), and an index to block on.
    async fn read(&self, query: &Query, wait_from: Option<u64>) -> Result<(Vec<Instance>, u64)> {
        match &query.service {
            Some(s) => {
                let (all, index) = self.health_service(s.as_str(), wait_from).await?;
                Ok((all.into_iter().filter(|i| query.matches(i)).collect(), index))
            }
            None => {
                // Any check change moves the health index: block on it, then read all.
                let index = match wait_from {
                    Some(from) => {
                        let extra = self.config.wait + self.config.wait / 16;
                        let q = vec![("index", from.to_string()), ("wait", format!("{}ms", self.config.wait.as_millis()))];
                        let r = self.call(Method::GET, "/v1/health/state/any", q, None, extra).await?;
                        self.check("health/state", "any", r)?.index
                    }
                    None => 0,
                };
                let (names, catalog_index) = self.catalog_services(None).await?;
                let mut out = Vec::new();
                for n in names {
                    let (instances, _) = self.health_service(&n, None).await?;
                    out.extend(instances.into_iter().filter(|i| query.matches(i)));
                }
                out.sort_by(|a, b| (&a.service, &a.id).cmp(&(&b.service, &b.id)));
                Ok((out, index.max(catalog_index)))
            }
        }
    }
}

/// Consul's index rules for the next blocking query.
pub fn next_index(previous: u64, returned: u64) -> u64 {
    if returned < previous {
        // The index went backwards (a restarted server, a new leader): start over.
        0
    } else {
        returned.max(1)
    }
}

#[derive(Debug)]
struct ConsulLease {
    client: ConsulDiscovery,
    id: String,
    keeper: tokio::task::JoinHandle<()>,
}

impl Drop for ConsulLease {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

#[async_trait]
impl RegistrationLease for ConsulLease {
    async fn release(&self) -> Result<()> {
        self.keeper.abort();
        self.client.lock().remove(&self.id);
        let r =
            self.client.inner.call(Method::PUT, &format!("/v1/agent/service/deregister/{}", self.id), vec![], None, Duration::ZERO).await?;
        self.client.inner.check("deregister", &self.id, r).map(|_| ())
    }
}

#[async_trait]
impl Discovery for ConsulDiscovery {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> DiscoveryCapabilities {
        DiscoveryCapabilities::new(true, true, true)
    }

    async fn register(&self, registration: Registration) -> Result<RegistrationHandle> {
        let payload = ServiceRegistration::from_registration(&registration)?;
        self.lock().insert(registration.id.clone(), registration.initial_health);
        if let Err(e) = self.inner.register_raw(&payload).await {
            self.lock().remove(&registration.id);
            return Err(e);
        }
        let me = self.clone();
        let id = registration.id.clone();
        let every = (registration.ttl / 3).max(Duration::from_millis(100));
        let keeper = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let desired = me.lock().get(&id).copied().unwrap_or(Health::Passing);
                match me.inner.update_check(&id, desired).await {
                    Ok(()) => {}
                    Err(Error::NotFound { .. }) => {
                        // The agent forgot us (a restart): register again.
                        let mut again = payload.clone();
                        again.check.status = status_text(desired).into();
                        if let Err(e) = me.inner.register_raw(&again).await {
                            tracing::warn!(id, error = %e, "re-registering with Consul failed; will retry");
                        }
                    }
                    Err(e) => tracing::warn!(id, error = %e, "Consul check update failed; will retry"),
                }
            }
        });
        Ok(RegistrationHandle::new(
            registration.service,
            registration.id.clone(),
            Box::new(ConsulLease { client: self.clone(), id: registration.id, keeper }),
        ))
    }

    async fn deregister(&self, _service: &ServiceName, id: &str) -> Result<()> {
        validate_instance_id(id)?;
        self.lock().remove(id);
        let r = self.inner.call(Method::PUT, &format!("/v1/agent/service/deregister/{id}"), vec![], None, Duration::ZERO).await?;
        self.inner.check("deregister", id, r).map(|_| ())
    }

    async fn set_health(&self, _service: &ServiceName, id: &str, health: Health) -> Result<()> {
        validate_instance_id(id)?;
        self.inner.update_check(id, health).await?;
        // Remembered so this client's keep-alive keeps sending it.
        if let Some(h) = self.lock().get_mut(id) {
            *h = health;
        }
        Ok(())
    }

    async fn instances(&self, query: &Query) -> Result<Vec<Instance>> {
        Ok(self.inner.read(query, None).await?.0)
    }

    async fn services(&self) -> Result<Vec<ServiceName>> {
        let (names, _) = self.inner.catalog_services(None).await?;
        Ok(names.into_iter().filter_map(|n| ServiceName::new(n).ok()).collect())
    }

    async fn watch(&self, query: Query) -> Result<SnapshotStream> {
        let (first, index) = self.inner.read(&query, None).await?;
        let state = ConsulWatch {
            inner: self.inner.clone(),
            query,
            index: next_index(0, index),
            view: first.clone(),
            pending: Some(first),
            error: None,
            pauses: crate::retry_pauses(self.inner.config.min_query_interval * 5, Duration::from_secs(10)),
            last_query: tokio::time::Instant::now(),
        };
        Ok(futures::stream::unfold(state, ConsulWatch::next).boxed())
    }
}

struct ConsulWatch {
    inner: Arc<Inner>,
    query: Query,
    index: u64,
    view: Vec<Instance>,
    pending: Option<Vec<Instance>>,
    error: Option<String>,
    /// Pauses after failed queries; reset by a good one.
    pauses: crate::RetryPauses,
    last_query: tokio::time::Instant,
}

impl ConsulWatch {
    async fn next(mut self) -> Option<(Snapshot, Self)> {
        loop {
            if let Some(view) = self.pending.take() {
                return Some((Snapshot { version: self.index, instances: view, error: self.error.clone() }, self));
            }
            // A blocking query may return at once with no change: space them out.
            tokio::time::sleep_until(self.last_query + self.inner.config.min_query_interval).await;
            self.last_query = tokio::time::Instant::now();
            match self.inner.read(&self.query, Some(self.index)).await {
                Ok((now, index)) => {
                    self.index = next_index(self.index, index);
                    let recovered = self.error.take().is_some();
                    if recovered {
                        self.pauses = crate::retry_pauses(self.inner.config.min_query_interval * 5, Duration::from_secs(10));
                    }
                    if now != self.view || recovered {
                        self.view = now.clone();
                        self.pending = Some(now);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Consul watch failed; keeping the last view");
                    if self.error.is_none() {
                        self.error = Some(e.to_string());
                        self.pending = Some(self.view.clone());
                    }
                    tokio::time::sleep(self.pauses.next().unwrap_or_default()).await;
                }
            }
        }
    }
}

/// Operations in one `/v1/txn` on every Consul version (newer ones take 128).
pub const CONSUL_MAX_TXN_OPS: usize = 64;
/// Consul's default `txn_max_req_len` (512 KiB), less room for the JSON around values
/// (base64 grows them by a third, which this limit on raw bytes accounts for).
pub const CONSUL_MAX_TXN_BYTES: usize = 512 * 1024 * 3 / 4 - 8 * 1024;

/// Consul refuses session TTLs outside 10 s ..= 24 h.
pub const SESSION_TTL_RANGE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(86_400));

/// `KeyValue` on Consul's KV store (see the module docs).
#[derive(Clone)]
pub struct ConsulKv {
    inner: Arc<Inner>,
    sessions: Arc<Mutex<Sessions>>,
}

impl std::fmt::Debug for ConsulKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulKv").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

/// Consul session ids are UUIDs; `LeaseId` is a number local to this client.
#[derive(Debug, Default)]
struct Sessions {
    by_lease: HashMap<LeaseId, String>,
    by_uuid: HashMap<String, LeaseId>,
    next: LeaseId,
}

/// Percent-encodes a key for a URL path (keeping `/`).
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl ConsulKv {
    /// A client for the agent at `config.address`. Connects lazily.
    pub fn new(config: ConsulConfig) -> Result<Self> {
        Ok(ConsulKv { inner: Arc::new(Inner::new(config)?), sessions: Arc::default() })
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lease_of(&self, uuid: &str) -> LeaseId {
        let mut s = self.sessions();
        if let Some(id) = s.by_uuid.get(uuid) {
            return *id;
        }
        s.next += 1;
        let id = s.next;
        s.by_uuid.insert(uuid.to_owned(), id);
        s.by_lease.insert(id, uuid.to_owned());
        id
    }

    fn uuid_of(&self, lease: LeaseId) -> Result<String> {
        self.sessions().by_lease.get(&lease).cloned().ok_or(Error::NotFound { kind: "lease", name: lease.to_string() })
    }

    fn entry(&self, p: &KvPair) -> Result<KvEntry> {
        Ok(KvEntry {
            key: p.key.clone(),
            value: p.value_bytes()?,
            version: p.modify_index,
            create_revision: p.create_index,
            lease: p.session.as_deref().map(|u| self.lease_of(u)),
        })
    }

    /// Runs a transaction: `Ok(Ok(results))`, or `Ok(Err((op index, reason)))` when a
    /// check failed (HTTP 409).
    async fn run_txn(&self, ops: Vec<serde_json::Value>) -> Result<std::result::Result<Vec<serde_json::Value>, (usize, String)>> {
        let body = serde_json::to_vec(&ops).map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })?;
        let r = self.inner.call(Method::PUT, "/v1/txn", vec![], Some(body), Duration::ZERO).await?;
        if r.status == StatusCode::CONFLICT {
            let v: serde_json::Value = parse("txn", &r.body)?;
            let first = &v["Errors"][0];
            return Ok(Err((first["OpIndex"].as_u64().unwrap_or(0) as usize, first["What"].as_str().unwrap_or_default().to_owned())));
        }
        let r = self.inner.check("txn", "txn", r)?;
        let v: serde_json::Value = parse("txn", &r.body)?;
        Ok(Ok(v["Results"].as_array().cloned().unwrap_or_default()))
    }

    fn write_op(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<serde_json::Value> {
        let value = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, value);
        Ok(match lease {
            Some(l) => serde_json::json!({"KV": {"Verb": "lock", "Key": key, "Value": value, "Session": self.uuid_of(l)?}}),
            None => serde_json::json!({"KV": {"Verb": "set", "Key": key, "Value": value}}),
        })
    }

    fn written_index(results: &[serde_json::Value]) -> u64 {
        results.iter().filter_map(|r| r["KV"]["ModifyIndex"].as_u64()).max().unwrap_or(0)
    }

    fn write_failure(&self, key: &str, reason: &str, lease: Option<LeaseId>) -> Error {
        if reason.contains("session") && !reason.contains("locked") {
            Error::NotFound { kind: "lease", name: lease.map(|l| l.to_string()).unwrap_or_default() }
        } else {
            Error::VersionMismatch { key: key.to_owned(), expected: None, actual: None }
        }
    }

    async fn listing(&self, prefix: &str, wait_from: Option<u64>) -> Result<(Vec<KvPair>, u64)> {
        let mut q = vec![("recurse", "true".to_owned())];
        let extra = self.inner.blocking(&mut q, wait_from);
        let r = self.inner.call(Method::GET, &format!("/v1/kv/{}", encode_key(prefix)), q, None, extra).await?;
        if r.status == StatusCode::NOT_FOUND {
            return Ok((Vec::new(), r.index));
        }
        let r = self.inner.check("kv list", prefix, r)?;
        let pairs: Vec<KvPair> = parse("kv list", &r.body)?;
        Ok((pairs, r.index))
    }
}

#[async_trait]
impl KeyValue for ConsulKv {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> KvCapabilities {
        KvCapabilities::new(false, true, true)
            .with_min_lease_ttl(SESSION_TTL_RANGE.0)
            .with_txn_limits(CONSUL_MAX_TXN_OPS, CONSUL_MAX_TXN_BYTES)
    }

    async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        kv::validate_key(key)?;
        let r = self.inner.call(Method::GET, &format!("/v1/kv/{}", encode_key(key)), vec![], None, Duration::ZERO).await?;
        if r.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let r = self.inner.check("kv get", key, r)?;
        let pairs: Vec<KvPair> = parse("kv get", &r.body)?;
        pairs.iter().find(|p| p.key == key).map(|p| self.entry(p)).transpose()
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<u64> {
        kv::validate_key(key)?;
        kv::validate_value(key, &value)?;
        match self.run_txn(vec![self.write_op(key, &value, lease)?]).await? {
            Ok(results) => Ok(Self::written_index(&results)),
            Err((_, reason)) => Err(self.write_failure(key, &reason, lease)),
        }
    }

    async fn compare_and_swap(&self, key: &str, expect: Expect, value: Vec<u8>, lease: Option<LeaseId>) -> Result<u64> {
        kv::validate_key(key)?;
        kv::validate_value(key, &value)?;
        let check = match expect {
            Expect::Absent => serde_json::json!({"KV": {"Verb": "check-not-exists", "Key": key}}),
            Expect::Version(v) => serde_json::json!({"KV": {"Verb": "check-index", "Key": key, "Index": v}}),
        };
        match self.run_txn(vec![check, self.write_op(key, &value, lease)?]).await? {
            Ok(results) => Ok(Self::written_index(&results)),
            Err((0, _)) => {
                let actual = self.get(key).await?.map(|e| e.version);
                Err(Error::VersionMismatch { key: key.to_owned(), expected: expect.version(), actual })
            }
            Err((_, reason)) => Err(self.write_failure(key, &reason, lease)),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        kv::validate_key(key)?;
        let ops = vec![serde_json::json!({"KV": {"Verb": "get", "Key": key}}), serde_json::json!({"KV": {"Verb": "delete", "Key": key}})];
        Ok(self.run_txn(ops).await?.is_ok())
    }

    async fn txn(&self, txn: kv::Txn) -> Result<u64> {
        txn.validate(BACKEND, &self.capabilities())?;
        let mut ops = Vec::with_capacity(txn.len());
        for c in &txn.compares {
            ops.push(match c {
                kv::Compare::Key { key, expect: Expect::Absent } => serde_json::json!({"KV": {"Verb": "check-not-exists", "Key": key}}),
                kv::Compare::Key { key, expect: Expect::Version(v) } => {
                    serde_json::json!({"KV": {"Verb": "check-index", "Key": key, "Index": v}})
                }
                kv::Compare::Lease { key, lease } => match self.uuid_of(*lease) {
                    Ok(uuid) => serde_json::json!({"KV": {"Verb": "check-session", "Key": key, "Session": uuid}}),
                    // A lease this client never granted cannot hold anything.
                    Err(_) => return Err(Error::Fenced { key: key.clone(), lease: *lease }),
                },
            });
        }
        for op in &txn.ops {
            ops.push(match op {
                kv::TxnOp::Put { key, value, lease } => self.write_op(key, value, *lease)?,
                kv::TxnOp::Delete { key } => serde_json::json!({"KV": {"Verb": "delete", "Key": key}}),
            });
        }
        match self.run_txn(ops).await? {
            Ok(results) => Ok(Self::written_index(&results)),
            Err((i, reason)) => match (txn.compares.get(i), txn.ops.get(i.saturating_sub(txn.compares.len()))) {
                (Some(kv::Compare::Key { key, expect }), _) => {
                    let actual = self.get(key).await?.map(|e| e.version);
                    Err(Error::VersionMismatch { key: key.clone(), expected: expect.version(), actual })
                }
                (Some(kv::Compare::Lease { key, lease }), _) => Err(Error::Fenced { key: key.clone(), lease: *lease }),
                (None, Some(kv::TxnOp::Put { key, lease, .. })) => Err(self.write_failure(key, &reason, *lease)),
                (None, _) => Err(Error::Backend { backend: BACKEND, source: format!("txn operation {i} failed: {reason}").into() }),
            },
        }
    }

    async fn list(&self, prefix: &str) -> Result<KvList> {
        let (pairs, index) = self.listing(prefix, None).await?;
        let entries = pairs.iter().map(|p| self.entry(p)).collect::<Result<Vec<_>>>()?;
        Ok(KvList { revision: index, entries })
    }

    async fn watch(&self, prefix: &str, from_revision: Option<u64>) -> Result<KvWatch> {
        let (pairs, index) = self.listing(prefix, None).await?;
        if let Some(r) = from_revision {
            if r <= index {
                return Err(Error::Compacted { requested: r, oldest: index + 1 });
            }
        }
        let known = pairs.iter().map(|p| (p.key.clone(), p.modify_index)).collect();
        let state = KvWatchState {
            kv: self.clone(),
            prefix: prefix.to_owned(),
            pauses: crate::retry_pauses(self.inner.config.min_query_interval * 5, Duration::from_secs(10)),
            reported: false,
            index: next_index(0, index),
            known,
            pending: std::collections::VecDeque::new(),
        };
        Ok(futures::stream::unfold(state, KvWatchState::next).boxed())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        kv::validate_ttl(ttl)?;
        let (min, max) = SESSION_TTL_RANGE;
        if ttl < min || ttl > max {
            return Err(Error::InvalidInput {
                field: "lease ttl",
                value: format!("{ttl:?}"),
                reason: format!("Consul sessions live {min:?} to {max:?}"),
            });
        }
        let body = serde_json::json!({"Name": "keelson", "TTL": duration_text(ttl), "Behavior": "delete", "LockDelay": "0s"})
            .to_string()
            .into_bytes();
        let r = self.inner.call(Method::PUT, "/v1/session/create", vec![], Some(body), Duration::ZERO).await?;
        let r = self.inner.check("session create", "session", r)?;
        let created: SessionCreated = parse("session create", &r.body)?;
        Ok(self.lease_of(&created.id))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let uuid = self.uuid_of(lease)?;
        let r = self.inner.call(Method::PUT, &format!("/v1/session/renew/{uuid}"), vec![], None, Duration::ZERO).await?;
        self.inner.check("session renew", &uuid, r).map(|_| ()).map_err(|e| match e {
            Error::NotFound { .. } => Error::NotFound { kind: "lease", name: lease.to_string() },
            other => other,
        })
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let uuid = self.uuid_of(lease)?;
        let info = self.inner.call(Method::GET, &format!("/v1/session/info/{uuid}"), vec![], None, Duration::ZERO).await?;
        let info = self.inner.check("session info", &uuid, info)?;
        let found: serde_json::Value = parse("session info", &info.body)?;
        if found.as_array().is_none_or(Vec::is_empty) {
            return Err(Error::NotFound { kind: "lease", name: lease.to_string() });
        }
        let r = self.inner.call(Method::PUT, &format!("/v1/session/destroy/{uuid}"), vec![], None, Duration::ZERO).await?;
        self.inner.check("session destroy", &uuid, r).map(|_| ())
    }
}

struct KvWatchState {
    kv: ConsulKv,
    prefix: String,
    /// Pauses after failed queries; reset by a good one.
    pauses: crate::RetryPauses,
    /// This outage was reported on the stream already (once per outage).
    reported: bool,
    index: u64,
    /// Keys as of the last listing, with their modify index.
    known: HashMap<String, u64>,
    pending: std::collections::VecDeque<KvEvent>,
}

impl KvWatchState {
    async fn next(mut self) -> Option<(Result<KvEvent>, Self)> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some((Ok(ev), self));
            }
            let started = tokio::time::Instant::now();
            match self.kv.listing(&self.prefix, Some(self.index)).await {
                Ok((pairs, index)) => {
                    if self.reported {
                        tracing::info!(prefix = %self.prefix, "Consul KV watch resumed");
                        self.reported = false;
                        self.pauses = crate::retry_pauses(self.kv.inner.config.min_query_interval * 5, Duration::from_secs(10));
                    }
                    let mut puts: Vec<KvEvent> = Vec::new();
                    let mut now: HashMap<String, u64> = HashMap::with_capacity(pairs.len());
                    for p in &pairs {
                        now.insert(p.key.clone(), p.modify_index);
                        if self.known.get(&p.key) != Some(&p.modify_index) {
                            let value = p.value_bytes().unwrap_or_default();
                            puts.push(KvEvent { revision: p.modify_index, kind: KvEventKind::Put, key: p.key.clone(), value });
                        }
                    }
                    puts.sort_by_key(|e| e.revision);
                    let mut deletes: Vec<String> = self.known.keys().filter(|k| !now.contains_key(*k)).cloned().collect();
                    deletes.sort();
                    let delete_rev = index.max(puts.last().map_or(0, |e| e.revision));
                    self.pending.extend(puts);
                    self.pending.extend(deletes.into_iter().map(|key| KvEvent {
                        revision: delete_rev,
                        kind: KvEventKind::Delete,
                        key,
                        value: Vec::new(),
                    }));
                    self.known = now;
                    self.index = next_index(self.index, index);
                }
                Err(e) => {
                    tokio::time::sleep(self.pauses.next().unwrap_or_default()).await;
                    if !self.reported {
                        self.reported = true;
                        tracing::warn!(error = %e, prefix = %self.prefix, "Consul KV watch cannot reach Consul; retrying");
                        return Some((Err(e), self));
                    }
                    tracing::debug!(error = %e, prefix = %self.prefix, "Consul KV watch failed; retrying");
                    continue;
                }
            }
            // A blocking query may return early with no change: space them out.
            tokio::time::sleep_until(started + self.kv.inner.config.min_query_interval).await;
        }
    }
}
