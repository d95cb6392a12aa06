//! The etcd v3 backend (feature `etcd`): [`EtcdKv`] implements [`KeyValue`] with etcd's
//! own semantics (revisions, transactions, leases, watches); `KvDiscovery` over it is the
//! etcd `Discovery`.
//!
//! What etcd-client leaves to its users, this backend does (etcd-client #17/#48/#54):
//! - a watch resumes by itself after any stream error or member loss, from the last
//!   delivered revision + 1, so no event is lost or repeated; a compacted start revision
//!   ends the stream with [`Error::Compacted`] (re-list, then watch from its revision);
//! - keep-alives are one request on a fresh stream each time, so a lost member or
//!   connection only costs one renewal, never the lease;
//! - every call is bounded by the configured timeout and fails with
//!   [`Error::Unavailable`] (retryable) instead of hanging.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KvClient, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
    WatchStream,
};
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::kv::{self, Expect, KeyValue, KvCapabilities, KvEntry, KvEvent, KvEventKind, KvList, KvWatch, LeaseId};

const BACKEND: &str = "etcd";

/// How to reach etcd.
#[derive(Clone)]
#[non_exhaustive]
pub struct EtcdConfig {
    /// Client URLs (`http://127.0.0.1:2379`); requests are balanced over all of them.
    pub endpoints: Vec<String>,
    /// Bound on every request (default 5 s).
    pub request_timeout: Duration,
    /// Bound on establishing a connection (default 2 s).
    pub connect_timeout: Duration,
    /// User and password, if etcd auth is on. Never printed.
    pub credentials: Option<(String, String)>,
    /// Largest response accepted (default 64 MiB; etcd-client's own default is 4 MiB). A
    /// larger one fails with [`Error::ResponseTooLarge`], never as a generic error.
    pub max_message_bytes: usize,
    /// TLS to etcd (endpoints then are `https://`).
    pub tls: Option<EtcdTls>,
    /// Send the password even over plain `http://` (default false: [`EtcdKv::connect`]
    /// refuses, since anyone on the path would read it).
    pub allow_plaintext_password: bool,
}

/// TLS settings for etcd: the CA to trust, and the client certificate etcd's
/// `--client-cert-auth` asks for. Keys are never printed.
#[derive(Clone)]
pub struct EtcdTls {
    /// PEM of the CA(s) that signed etcd's server certificates.
    pub ca_pem: Vec<u8>,
    /// Client certificate chain and private key (PEM).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name etcd's certificate must carry (default: the endpoint's host).
    pub server_name: Option<String>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca_pem", &format!("{} bytes", self.ca_pem.len()))
            .field("identity", &self.identity.as_ref().map(|_| "<certificate and redacted key>"))
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl EtcdTls {
    /// Reads the CA and, if given, the client certificate and key from PEM files.
    /// [`Error::InvalidInput`] naming the file that cannot be read or holds no PEM.
    pub fn from_files(ca: &std::path::Path, cert: Option<&std::path::Path>, key: Option<&std::path::Path>) -> Result<EtcdTls> {
        let read = |field: &'static str, path: &std::path::Path| -> Result<Vec<u8>> {
            let bytes = std::fs::read(path).map_err(|e| Error::invalid(field, path.display().to_string(), e.to_string()))?;
            if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(Error::invalid(field, path.display().to_string(), "holds no PEM block"));
            }
            Ok(bytes)
        };
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read("etcd client certificate", c)?, read("etcd client key", k)?)),
            (None, None) => None,
            (Some(c), None) => {
                return Err(Error::invalid("etcd client key", c.display().to_string(), "a client certificate needs its key"))
            }
            (None, Some(k)) => {
                return Err(Error::invalid("etcd client certificate", k.display().to_string(), "a client key needs its certificate"))
            }
        };
        Ok(EtcdTls { ca_pem: read("etcd CA", ca)?, identity, server_name: None })
    }
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("credentials", &self.credentials.as_ref().map(|(user, _)| format!("{user}:<redacted>")))
            .field("max_message_bytes", &self.max_message_bytes)
            .field("tls", &self.tls)
            .field("allow_plaintext_password", &self.allow_plaintext_password)
            .finish()
    }
}

impl EtcdConfig {
    /// Endpoints with default timeouts and no credentials.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            credentials: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            tls: None,
            allow_plaintext_password: false,
        }
    }
}

/// Default for [`EtcdConfig::max_message_bytes`].
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// `KeyValue` on an etcd v3 cluster.
///
/// It talks to one member at a time and moves to the next endpoint when that member
/// stops answering, as etcd's own Go client does. (etcd-client's balanced channel over
/// all endpoints fails requests while any one member is down: etcd-client issue #39.)
/// A request that never reached the member (the connection was refused or could not be
/// made) is sent again to the next one; one that may have reached it is not, since a
/// write may have been applied, but the next request goes elsewhere.
#[derive(Clone)]
pub struct EtcdKv {
    member: Arc<ArcSwap<Member>>,
    /// Held while moving to another member, so concurrent failures move once.
    moving: Arc<tokio::sync::Mutex<()>>,
    options: ConnectOptions,
    config: EtcdConfig,
}

/// A client of the member at `config.endpoints[index]`.
#[derive(Clone)]
struct Member {
    index: usize,
    client: Client,
    /// Key-value calls, with the configured response limit.
    kv: KvClient,
}

impl std::fmt::Debug for EtcdKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdKv").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Whether a failed request surely never reached the member: no connection could be
/// made. Only such a request may be sent to another member as it is.
fn never_reached_member(e: &etcd_client::Error) -> bool {
    let text = match e {
        etcd_client::Error::TransportError(t) => causes(t),
        etcd_client::Error::GRpcStatus(status) if status.code() == tonic::Code::Unavailable => causes(status),
        _ => return false,
    };
    ["tcp connect error", "Connection refused", "No route to host"].iter().any(|m| text.contains(m))
}

/// The whole chain of an error's causes, for messages that name the real one (a TLS
/// alert is three layers under "transport error").
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// Whether a transport failure was the TLS handshake (trust, names, client certificates).
fn is_tls_failure(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    ["certificate", "tls", "handshake", "unknownissuer", "alert"].iter().any(|k| t.contains(k))
}

fn map_err(e: etcd_client::Error) -> Error {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) if status.code() == tonic::Code::Unauthenticated || is_auth_failure(status.message()) => {
            Error::Unauthenticated { backend: BACKEND, reason: status.message().to_owned() }
        }
        E::GRpcStatus(status) if status.code() == tonic::Code::PermissionDenied => {
            Error::PermissionDenied { backend: BACKEND, operation: "the request".into(), reason: status.message().to_owned() }
        }
        E::GRpcStatus(status) if status.code() == tonic::Code::Unavailable && is_tls_failure(&causes(&status)) => {
            Error::Tls { backend: BACKEND, reason: causes(&status) }
        }
        E::TransportError(t) if is_tls_failure(&causes(&t)) => Error::Tls { backend: BACKEND, reason: causes(&t) },
        E::GRpcStatus(status) => {
            use tonic::Code;
            match status.code() {
                Code::NotFound if status.message().contains("lease") => {
                    Error::NotFound { kind: "lease", name: status.message().to_owned() }
                }
                Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::ResourceExhausted | Code::Cancelled | Code::Unknown => {
                    Error::Unavailable { backend: BACKEND, reason: status.message().to_owned() }
                }
                _ if status.message().contains("message length too large") => {
                    Error::ResponseTooLarge { backend: BACKEND, reason: status.message().to_owned() }
                }
                Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                    Error::InvalidInput { field: "request", value: String::new(), reason: status.message().to_owned() }
                }
                _ => Error::Backend { backend: BACKEND, source: Box::new(status) },
            }
        }
        // etcd-client turns a keep-alive answer with TTL 0 (lease gone) into this.
        E::LeaseKeepAliveError(msg) if msg.contains("not found") => Error::NotFound { kind: "lease", name: msg },
        E::TransportError(t) => Error::Unavailable { backend: BACKEND, reason: causes(&t) },
        E::IoError(io) => Error::Unavailable { backend: BACKEND, reason: io.to_string() },
        other => Error::Backend { backend: BACKEND, source: Box::new(other) },
    }
}

impl EtcdKv {
    /// Connects to the cluster (bounded by `connect_timeout`).
    pub async fn connect(config: EtcdConfig) -> Result<EtcdKv> {
        if config.endpoints.is_empty() {
            return Err(Error::invalid("etcd endpoints", "", "at least one endpoint is needed"));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            // Fail watches on members that lost the leader instead of hanging on them.
            .with_require_leader(true);
        let secure = config.endpoints.iter().all(|e| e.starts_with("https://"));
        match &config.tls {
            Some(tls) => {
                if let Some(plain) = config.endpoints.iter().find(|e| !e.starts_with("https://")) {
                    return Err(Error::invalid("etcd endpoint", plain, "TLS is configured: endpoints must be https://"));
                }
                let mut t = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
                if let Some((cert, key)) = &tls.identity {
                    t = t.identity(etcd_client::Identity::from_pem(cert, key));
                }
                if let Some(name) = &tls.server_name {
                    t = t.domain_name(name.clone());
                }
                options = options.with_tls(t);
            }
            None if secure => {
                return Err(Error::invalid("etcd endpoints", config.endpoints.join(","), "https:// needs TLS settings (a CA to trust)"))
            }
            None => {}
        }
        if let Some((user, password)) = &config.credentials {
            if !secure && !config.allow_plaintext_password {
                return Err(Error::invalid(
                    "etcd password",
                    user,
                    "would cross the network in plain text: use https:// endpoints with TLS, or allow it explicitly",
                ));
            }
            options = options.with_user(user.clone(), password.clone());
        }
        // The first member that takes the connection; a cluster with one member down
        // still connects.
        let mut first_error = None;
        for index in 0..config.endpoints.len() {
            match Self::connect_member(&config, &options, index).await {
                Ok(member) => {
                    return Ok(EtcdKv {
                        member: Arc::new(ArcSwap::from_pointee(member)),
                        moving: Arc::new(tokio::sync::Mutex::new(())),
                        options,
                        config,
                    })
                }
                Err(e) => {
                    tracing::debug!(endpoint = %config.endpoints[index], error = %e, "etcd member unreachable");
                    first_error.get_or_insert(e);
                }
            }
        }
        let e = first_error.unwrap_or_else(|| Error::Unavailable { backend: BACKEND, reason: "no endpoint".into() });
        // etcd refusing our certificate reads as "connection closed": ask once more,
        // directly, what the handshake says.
        if let (Some(tls), Error::Unavailable { .. }) = (&config.tls, &e) {
            if let Some(reason) = tls_probe(&config.endpoints[0], tls, config.connect_timeout).await {
                return Err(Error::Tls { backend: BACKEND, reason });
            }
        }
        Err(e)
    }

    /// A client of the member at `config.endpoints[index]` (bounded by the connect timeout).
    async fn connect_member(config: &EtcdConfig, options: &ConnectOptions, index: usize) -> Result<Member> {
        let endpoint = &config.endpoints[index];
        let connect = Client::connect([endpoint.clone()], Some(options.clone()));
        let client = match tokio::time::timeout(config.connect_timeout, connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(map_err(e)),
            Err(_) => {
                return Err(Error::Unavailable {
                    backend: BACKEND,
                    reason: format!("no connection to {endpoint} within {:?}", config.connect_timeout),
                })
            }
        };
        let kv = client.kv_client().max_decoding_message_size(config.max_message_bytes);
        Ok(Member { index, client, kv })
    }

    /// Moves from the member at `failed` to the next one that takes a connection (no
    /// move if another request moved already).
    async fn move_on(&self, failed: usize) {
        let _moving = self.moving.lock().await;
        let n = self.config.endpoints.len();
        if n < 2 || self.member.load().index != failed {
            return;
        }
        for step in 1..n {
            let index = (failed + step) % n;
            match Self::connect_member(&self.config, &self.options, index).await {
                Ok(member) => {
                    tracing::warn!(from = %self.config.endpoints[failed], to = %self.config.endpoints[index], "etcd member unavailable; moved to another");
                    self.member.store(Arc::new(member));
                    return;
                }
                Err(e) => tracing::debug!(endpoint = %self.config.endpoints[index], error = %e, "etcd member unreachable"),
            }
        }
    }

    /// Runs one request on the current member under the request timeout; when the
    /// member is unavailable, the next request goes to another, and this one is sent
    /// again there if it never reached the first (see [`EtcdKv`]).
    async fn call<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T>
    where
        F: Fn(Member) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let mut sent_to = 0;
        loop {
            let member = Member::clone(&self.member.load());
            let index = member.index;
            let (error, never_sent) = match tokio::time::timeout(self.config.request_timeout, f(member)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    let never_sent = never_reached_member(&e);
                    (map_err(e), never_sent)
                }
                Err(_) => (
                    Error::Unavailable { backend: BACKEND, reason: format!("{what}: no answer within {:?}", self.config.request_timeout) },
                    false,
                ),
            };
            if !matches!(error, Error::Unavailable { .. }) {
                return Err(error);
            }
            self.move_on(index).await;
            sent_to += 1;
            if !never_sent || sent_to >= self.config.endpoints.len() {
                return Err(error);
            }
        }
    }

    /// A request on a stream already open, under the request timeout (no other member
    /// can continue the stream).
    async fn on_stream<T>(
        &self,
        what: &'static str,
        f: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.config.request_timeout, f).await {
            Ok(r) => r.map_err(map_err),
            Err(_) => {
                Err(Error::Unavailable { backend: BACKEND, reason: format!("{what}: no answer within {:?}", self.config.request_timeout) })
            }
        }
    }

    fn get_with(
        m: Member,
        key: &str,
        options: Option<GetOptions>,
    ) -> impl std::future::Future<Output = std::result::Result<etcd_client::GetResponse, etcd_client::Error>> + '_ {
        let mut c = m.kv;
        async move { c.get(key, options).await }
    }

    fn txn_with(
        m: Member,
        txn: Txn,
    ) -> impl std::future::Future<Output = std::result::Result<etcd_client::TxnResponse, etcd_client::Error>> {
        let mut c = m.kv;
        async move { c.txn(txn).await }
    }

    fn watch_with(
        m: Member,
        key: &str,
        options: WatchOptions,
    ) -> impl std::future::Future<Output = std::result::Result<WatchStream, etcd_client::Error>> + '_ {
        let mut c = m.client;
        async move { c.watch(key, Some(options)).await }
    }

    /// etcd acknowledges a watch on a compacted revision as created and cancels it in a
    /// later message; a count-only read at that revision answers at once. If compacted,
    /// the watch's cancel message says which revision is the oldest kept.
    async fn check_not_compacted(&self, prefix: &str, revision: u64) -> Result<()> {
        let key = if prefix.is_empty() { "\0" } else { prefix };
        let probe = GetOptions::new().with_prefix().with_count_only().with_revision(i64::try_from(revision).unwrap_or(i64::MAX));
        match self.call("watch", |m| Self::get_with(m, key, Some(probe.clone()))).await {
            Err(Error::InvalidInput { reason, .. }) if reason.contains("compacted") => {
                let options = WatchOptions::new().with_prefix().with_start_revision(i64::try_from(revision).unwrap_or(i64::MAX));
                let mut stream = self.call("watch", |m| Self::watch_with(m, key, options.clone())).await?;
                for _ in 0..3 {
                    match self.on_stream("watch", stream.message()).await? {
                        Some(r) if r.compact_revision() > 0 => {
                            return Err(Error::Compacted { requested: revision, oldest: r.compact_revision().max(0) as u64 })
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
                Err(Error::Compacted { requested: revision, oldest: revision + 1 })
            }
            // "future revision" is fine: the watch waits for it.
            Err(Error::InvalidInput { .. }) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn ttl_secs(ttl: Duration) -> i64 {
        // etcd counts whole seconds; round up so a lease never lives shorter than asked.
        i64::try_from(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).unwrap_or(i64::MAX)
    }

    fn entry(kv: &etcd_client::KeyValue) -> KvEntry {
        KvEntry {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            version: kv.mod_revision().max(0) as u64,
            create_revision: kv.create_revision().max(0) as u64,
            lease: (kv.lease() != 0).then_some(kv.lease() as u64),
        }
    }

    fn put_options(lease: Option<LeaseId>) -> Option<PutOptions> {
        lease.map(|l| PutOptions::new().with_lease(l as i64))
    }
}

#[async_trait]
impl KeyValue for EtcdKv {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> KvCapabilities {
        // etcd's defaults (`--max-txn-ops`, `--max-request-bytes`), which `new` states.
        KvCapabilities::new(true, true, true)
    }

    async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        kv::validate_key(key)?;
        let resp = self.call("get", |m| Self::get_with(m, key, None)).await?;
        Ok(resp.kvs().first().map(Self::entry))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<u64> {
        kv::validate_key(key)?;
        kv::validate_value(key, &value)?;
        let resp = self
            .call("put", |m| {
                let (mut c, value) = (m.kv, value.clone());
                async move { c.put(key, value, Self::put_options(lease)).await }
            })
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision().max(0) as u64))
    }

    async fn compare_and_swap(&self, key: &str, expect: Expect, value: Vec<u8>, lease: Option<LeaseId>) -> Result<u64> {
        kv::validate_key(key)?;
        kv::validate_value(key, &value)?;
        let cmp = match expect {
            Expect::Absent => Compare::create_revision(key, CompareOp::Equal, 0),
            Expect::Version(v) => Compare::mod_revision(key, CompareOp::Equal, i64::try_from(v).unwrap_or(i64::MAX)),
        };
        let txn = Txn::new().when([cmp]).and_then([TxnOp::put(key, value, Self::put_options(lease))]).or_else([TxnOp::get(key, None)]);
        let resp = self.call("compare-and-swap", |m| Self::txn_with(m, txn.clone())).await?;
        if resp.succeeded() {
            return Ok(resp.header().map_or(0, |h| h.revision().max(0) as u64));
        }
        let actual = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.mod_revision().max(0) as u64)),
            _ => None,
        });
        Err(Error::VersionMismatch { key: key.to_owned(), expected: expect.version(), actual: actual.flatten() })
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        kv::validate_key(key)?;
        let resp = self
            .call("delete", |m| {
                let mut c = m.kv;
                async move { c.delete(key, None).await }
            })
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn txn(&self, txn: kv::Txn) -> Result<u64> {
        txn.validate(BACKEND, &self.capabilities())?;
        let compares: Vec<Compare> = txn
            .compares
            .iter()
            .map(|c| match c {
                kv::Compare::Key { key, expect: Expect::Absent } => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                kv::Compare::Key { key, expect: Expect::Version(v) } => {
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, i64::try_from(*v).unwrap_or(i64::MAX))
                }
                // A missing key compares as lease 0, which no granted lease is.
                kv::Compare::Lease { key, lease } => Compare::lease(key.as_str(), CompareOp::Equal, *lease as i64),
            })
            .collect();
        let writes: Vec<TxnOp> = txn
            .ops
            .into_iter()
            .map(|op| match op {
                kv::TxnOp::Put { key, value, lease } => TxnOp::put(key, value, Self::put_options(lease)),
                kv::TxnOp::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        // etcd only says that a compare failed; reading the compared keys in the failure
        // branch (at the same revision) tells which one.
        let reads: Vec<TxnOp> = txn.compares.iter().map(|c| TxnOp::get(c.key_name(), None)).collect();
        let request = Txn::new().when(compares).and_then(writes).or_else(reads);
        let resp = self.call("txn", |m| Self::txn_with(m, request.clone())).await?;
        if resp.succeeded() {
            return Ok(resp.header().map_or(0, |h| h.revision().max(0) as u64));
        }
        let found: Vec<Option<KvEntry>> = resp
            .op_responses()
            .into_iter()
            .map(|op| match op {
                TxnOpResponse::Get(g) => g.kvs().first().map(Self::entry),
                _ => None,
            })
            .collect();
        Err(kv::failed_compare(&txn.compares, &found))
    }

    async fn list(&self, prefix: &str) -> Result<KvList> {
        // An empty prefix means "every key"; etcd spells that as key "\0" with prefix.
        let key = if prefix.is_empty() { "\0" } else { prefix };
        let resp = self.call("list", |m| Self::get_with(m, key, Some(GetOptions::new().with_prefix()))).await?;
        Ok(KvList {
            revision: resp.header().map_or(0, |h| h.revision().max(0) as u64),
            entries: resp.kvs().iter().map(Self::entry).collect(),
        })
    }

    async fn list_page(&self, prefix: &str, after: Option<&str>, limit: usize, revision: Option<u64>) -> Result<KvList> {
        // The range [start, end of prefix): from just after `after`, or the prefix itself.
        let start = match after {
            Some(a) => format!("{a}\0"),
            None if prefix.is_empty() => "\0".to_owned(),
            None => prefix.to_owned(),
        };
        let end = prefix_end(prefix);
        let mut options = GetOptions::new().with_range(end).with_limit(i64::try_from(limit.max(1)).unwrap_or(i64::MAX));
        if let Some(r) = revision {
            options = options.with_revision(i64::try_from(r).unwrap_or(i64::MAX));
        }
        let resp = self.call("list", |m| Self::get_with(m, &start, Some(options.clone()))).await.map_err(|e| match e {
            Error::InvalidInput { reason, .. } if reason.contains("compacted") => {
                Error::Compacted { requested: revision.unwrap_or_default(), oldest: revision.unwrap_or_default() + 1 }
            }
            other => other,
        })?;
        Ok(KvList {
            revision: revision.unwrap_or_else(|| resp.header().map_or(0, |h| h.revision().max(0) as u64)),
            entries: resp.kvs().iter().map(Self::entry).collect(),
        })
    }

    async fn watch(&self, prefix: &str, from_revision: Option<u64>) -> Result<KvWatch> {
        let from = match from_revision {
            Some(r) => {
                self.check_not_compacted(prefix, r).await?;
                r
            }
            None => {
                let resp =
                    self.call("watch", |m| Self::get_with(m, prefix, Some(GetOptions::new().with_prefix().with_count_only()))).await?;
                resp.header().map_or(0, |h| h.revision().max(0) as u64) + 1
            }
        };
        let mut state = EtcdWatch {
            kv: self.clone(),
            prefix: prefix.to_owned(),
            next: from,
            stream: None,
            pending: VecDeque::new(),
            pauses: crate::retry_pauses(RETRY_MIN, RETRY_MAX),
            failing_since: None,
            reported: false,
            done: false,
        };
        // Open the first stream here so that a compacted start revision or an
        // unreachable cluster fails the call, not the stream.
        state.open().await?;
        Ok(futures::stream::unfold(state, EtcdWatch::next_event).boxed())
    }

    async fn grant_lease(&self, ttl: std::time::Duration) -> Result<LeaseId> {
        kv::validate_ttl(ttl)?;
        let resp = self
            .call("grant lease", |m| {
                let mut c = m.client;
                async move { c.lease_grant(Self::ttl_secs(ttl), None).await }
            })
            .await?;
        Ok(resp.id() as u64)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let id = lease as i64;
        let once = |m: Member| {
            let mut c = m.client;
            async move {
                let (mut keeper, mut responses) = c.lease_keep_alive(id).await?;
                keeper.keep_alive().await?;
                responses.message().await
            }
        };
        match self.call("keep alive", once).await? {
            Some(r) if r.ttl() > 0 => Ok(()),
            _ => Err(Error::NotFound { kind: "lease", name: lease.to_string() }),
        }
    }

    async fn lease_ttl(&self, lease: LeaseId) -> Result<kv::LeaseTtl> {
        let resp = self
            .call("lease time to live", |m| {
                let mut c = m.client;
                async move { c.lease_time_to_live(lease as i64, None).await }
            })
            .await?;
        // etcd answers -1 for a lease it no longer has; it counts in whole seconds.
        match (u64::try_from(resp.ttl()), u64::try_from(resp.granted_ttl())) {
            (Ok(left), Ok(granted)) => Ok(kv::LeaseTtl::new(std::time::Duration::from_secs(granted), std::time::Duration::from_secs(left))),
            _ => Err(Error::NotFound { kind: "lease", name: lease.to_string() }),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let revoke = |m: Member| {
            let mut c = m.client;
            async move { c.lease_revoke(lease as i64).await }
        };
        self.call("revoke lease", revoke).await.map(|_| ()).map_err(|e| match e {
            Error::NotFound { .. } => Error::NotFound { kind: "lease", name: lease.to_string() },
            other => other,
        })
    }
}

/// Connects to `endpoint` with `tls` as the client would, sends the HTTP/2 preface and
/// reads: a TLS failure (an untrusted server, a client certificate refused after the
/// handshake, as TLS 1.3 servers do) comes back as the alert's text. `None` if the
/// handshake and the first read go through, or the endpoint cannot be reached at all.
async fn tls_probe(endpoint: &str, tls: &EtcdTls, timeout: Duration) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = endpoint.strip_prefix("https://")?.split('/').next()?.to_owned();
    let host = tls.server_name.clone().unwrap_or_else(|| authority.rsplit_once(':').map_or(authority.clone(), |(h, _)| h.to_owned()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&tls.ca_pem).flatten() {
        roots.add(cert).ok()?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots);
    let mut config = match &tls.identity {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert).flatten().collect();
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key).ok()?).ok()?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned()).ok()?;
    let probe = async {
        let tcp = tokio::net::TcpStream::connect(&authority).await.ok()?;
        let mut stream = match tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await {
            Ok(s) => s,
            Err(e) => return Some(e.to_string()),
        };
        if let Err(e) = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await {
            return Some(e.to_string());
        }
        let mut buf = [0u8; 64];
        match stream.read(&mut buf).await {
            Err(e) if is_tls_failure(&e.to_string()) => Some(e.to_string()),
            _ => None,
        }
    };
    tokio::time::timeout(timeout, probe).await.ok().flatten()
}

/// etcd's answers to bad or missing credentials (codes vary across versions: 3.4 says
/// InvalidArgument "authentication failed" or "user name is empty").
fn is_auth_failure(message: &str) -> bool {
    ["authentication failed", "user name is empty", "invalid auth token", "invalid user ID or password"].iter().any(|m| message.contains(m))
}

/// The first key after every key starting with `prefix` (etcd's range end for a
/// prefix); `"\0"` for the empty prefix, which etcd reads as "every key".
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How long a watch keeps failing to reconnect before it reports an outage.
const OUTAGE_GRACE: Duration = Duration::from_secs(2);

struct EtcdWatch {
    kv: EtcdKv,
    prefix: String,
    /// The revision to (re)start from: last delivered + 1.
    next: u64,
    stream: Option<WatchStream>,
    pending: VecDeque<KvEvent>,
    pauses: crate::RetryPauses,
    /// When reconnecting started failing, in this outage.
    failing_since: Option<std::time::Instant>,
    /// This outage was reported on the stream already (once per outage).
    reported: bool,
    done: bool,
}

impl EtcdWatch {
    /// Opens a stream from `self.next` and reads its creation response.
    async fn open(&mut self) -> Result<()> {
        let key = if self.prefix.is_empty() { "\0".to_owned() } else { self.prefix.clone() };
        let options = WatchOptions::new().with_prefix().with_start_revision(i64::try_from(self.next).unwrap_or(i64::MAX));
        let mut stream = self.kv.call("watch", |m| EtcdKv::watch_with(m, &key, options.clone())).await?;
        let first = self.kv.on_stream("watch", stream.message()).await?;
        match first {
            Some(r) if r.canceled() && r.compact_revision() > 0 => {
                Err(Error::Compacted { requested: self.next, oldest: r.compact_revision().max(0) as u64 })
            }
            Some(r) if r.canceled() => {
                Err(Error::Unavailable { backend: BACKEND, reason: format!("watch canceled: {}", r.cancel_reason()) })
            }
            Some(r) => {
                self.take(&r);
                self.stream = Some(stream);
                Ok(())
            }
            None => Err(Error::Unavailable { backend: BACKEND, reason: "watch stream closed at creation".into() }),
        }
    }

    /// Queues a response's events; they are atomic per revision, so resuming after the
    /// last one never splits a revision.
    fn take(&mut self, r: &etcd_client::WatchResponse) {
        for ev in r.events() {
            let Some(kv) = ev.kv() else { continue };
            let revision = kv.mod_revision().max(0) as u64;
            if revision < self.next {
                continue; // already delivered before a reconnect
            }
            let kind = if ev.event_type() == EventType::Delete { KvEventKind::Delete } else { KvEventKind::Put };
            let value = if kind == KvEventKind::Put { kv.value().to_vec() } else { Vec::new() };
            self.pending.push_back(KvEvent { revision, kind, key: String::from_utf8_lossy(kv.key()).into_owned(), value });
        }
        if let Some(last) = self.pending.back() {
            self.next = self.next.max(last.revision + 1);
        }
    }

    async fn next_event(mut self) -> Option<(Result<KvEvent>, Self)> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some((Ok(ev), self));
            }
            if self.done {
                return None;
            }
            let Some(stream) = self.stream.as_mut() else {
                match self.open().await {
                    Ok(()) => {
                        if self.reported {
                            tracing::info!(next = self.next, "etcd watch resumed");
                        }
                        self.pauses = crate::retry_pauses(RETRY_MIN, RETRY_MAX);
                        self.reported = false;
                        self.failing_since = None;
                    }
                    Err(e @ Error::Compacted { .. }) => {
                        self.done = true;
                        return Some((Err(e), self));
                    }
                    Err(e) => {
                        tokio::time::sleep(self.pauses.next().unwrap_or(RETRY_MAX)).await;
                        // Said once per outage, so a follower can show it is stale; the
                        // stream goes on resuming, and events follow once etcd is back. A
                        // member lost in a healthy cluster is not an outage: the client
                        // reaches another within the grace.
                        let since = *self.failing_since.get_or_insert_with(std::time::Instant::now);
                        if !self.reported && since.elapsed() >= OUTAGE_GRACE {
                            self.reported = true;
                            tracing::warn!(error = %e, next = self.next, "etcd watch cannot reach etcd; retrying");
                            return Some((Err(e), self));
                        }
                        tracing::debug!(error = %e, next = self.next, "etcd watch reconnect failed; retrying");
                    }
                }
                continue;
            };
            match stream.message().await {
                Ok(Some(r)) if r.canceled() && r.compact_revision() > 0 => {
                    self.done = true;
                    let e = Error::Compacted { requested: self.next, oldest: r.compact_revision().max(0) as u64 };
                    return Some((Err(e), self));
                }
                Ok(Some(r)) if r.canceled() => {
                    tracing::info!(reason = r.cancel_reason(), next = self.next, "etcd watch canceled; resuming");
                    self.stream = None;
                }
                Ok(Some(r)) => self.take(&r),
                Ok(None) | Err(_) => {
                    tracing::info!(next = self.next, "etcd watch stream lost; resuming");
                    self.stream = None;
                }
            }
        }
    }
}
