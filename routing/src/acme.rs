//! Certificates from an ACME CA (RFC 8555) for the proxy's TLS (feature `acme`), over the
//! HTTP-01 challenge the proxy itself answers: a team with a public name gets a
//! certificate for it with no other tool.
//!
//! - [`Http01Challenges`] is a [`ProxyHooks`]: add it to the proxy serving port 80, and it
//!   answers `GET /.well-known/acme-challenge/<token>` for the tokens of orders in flight
//!   (other requests, and unknown tokens, are routed as usual).
//! - [`AcmeIssuer`] keeps an account (created once, its key in `<state>/account.json`,
//!   mode 0600), orders certificates, answers their challenges through the hook,
//!   stores each certificate and key under `<state>/certs/` (0600) and installs them in
//!   a [`CertStore`], so the proxy serves them at once. [`AcmeIssuer::ensure`] reuses a
//!   stored certificate until `renew_before` its expiry; [`AcmeIssuer::run`] renews.
//! - Retries: the CA may refuse a request's nonce on purpose (`badNonce`; Let's Encrypt
//!   rarely, pebble by design) and the client retries each request 3 times; an issuance
//!   that still fails on a nonce, or on a transient network error, is made again from
//!   the start, up to `attempts` times. A refused order (a challenge the CA could not
//!   validate, a name it will not issue for) is not retried: its reason is the error.
//!
//! ```no_run
//! # async fn demo() -> keelson_routing::Result<()> {
//! use std::sync::Arc;
//! use keelson_routing::acme::{AcmeConfig, AcmeIssuer, Http01Challenges};
//! use keelson_routing::{CertStore, MemoryRouter, Proxy, ProxyConfig};
//!
//! let certs = CertStore::new();
//! let challenges = Arc::new(Http01Challenges::default());
//! // The proxy on port 80 answers the CA's challenges; the one on 443 serves `certs`.
//! let _plain = Proxy::new(Arc::new(MemoryRouter::new()), ProxyConfig::default()).with_hooks(challenges.clone());
//! let config = AcmeConfig::new("https://acme-v02.api.letsencrypt.org/directory", "/var/lib/edge/acme");
//! let issuer = AcmeIssuer::new(config, challenges, certs.clone());
//! issuer.ensure(&["shop.example.com".to_owned()]).await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};

use crate::error::{Error, Result};
use crate::proxy::{ProxyBody, ProxyHooks, RequestCtx};
use crate::tls::CertStore;

/// Where challenge tokens are asked for (RFC 8555 §8.3).
const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// ACME settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AcmeConfig {
    /// The CA's directory URL.
    pub directory: String,
    /// Contact URLs for the account (`mailto:ops@example.com`); may be empty.
    pub contact: Vec<String>,
    /// A PEM file of the root the CA's own HTTPS certificate chains to, when that is a
    /// private CA (a test CA such as pebble's); none: the platform's web roots.
    pub ca_file: Option<PathBuf>,
    /// Where the account and the certificates are kept.
    pub state_dir: PathBuf,
    /// Renew a certificate this long before it expires (default 30 days).
    pub renew_before: Duration,
    /// How long one issuance may take, challenges included (default 2 minutes).
    pub timeout: Duration,
    /// Issuances made again after a nonce refusal or a transient failure (default 5).
    pub attempts: u32,
}

impl AcmeConfig {
    /// Defaults for the CA at `directory`, keeping state in `state_dir`.
    pub fn new(directory: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        AcmeConfig {
            directory: directory.into(),
            contact: Vec::new(),
            ca_file: None,
            state_dir: state_dir.into(),
            renew_before: Duration::from_secs(30 * 24 * 3600),
            timeout: Duration::from_secs(120),
            attempts: 5,
        }
    }
}

/// The HTTP-01 answers of orders in flight, served by the proxy it is hooked into.
#[derive(Debug, Default)]
pub struct Http01Challenges {
    tokens: Mutex<HashMap<String, String>>,
}

impl Http01Challenges {
    fn put(&self, token: &str, key_authorization: &str) {
        self.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(token.to_owned(), key_authorization.to_owned());
    }

    fn remove(&self, token: &str) {
        self.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(token);
    }

    fn answer(&self, token: &str) -> Option<String> {
        self.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(token).cloned()
    }
}

#[async_trait]
impl ProxyHooks for Http01Challenges {
    fn filters_requests(&self) -> bool {
        true
    }

    async fn request_filter(&self, req: &mut http::request::Parts, _: &RequestCtx) -> Option<Response<ProxyBody>> {
        if req.method != http::Method::GET {
            return None;
        }
        let token = req.uri.path().strip_prefix(CHALLENGE_PATH)?;
        let answer = self.answer(token)?;
        let body = http_body_util::Full::new(bytes::Bytes::from(answer)).map_err(|never: std::convert::Infallible| match never {}).boxed();
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::OK;
        response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/octet-stream"));
        Some(response)
    }
}

/// A certificate in the store: where it is and until when it is valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCert {
    /// The names it covers, the first being its file name.
    pub names: Vec<String>,
    /// The chain, PEM.
    pub chain: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// When it expires.
    pub not_after: SystemTime,
    /// Whether this call had it issued (false: the stored one was still fresh).
    pub issued: bool,
}

/// Orders certificates and keeps them installed in a [`CertStore`].
pub struct AcmeIssuer {
    config: AcmeConfig,
    challenges: Arc<Http01Challenges>,
    certs: Arc<CertStore>,
    account: tokio::sync::Mutex<Option<Account>>,
}

impl std::fmt::Debug for AcmeIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The account holds its private key: never printed.
        f.debug_struct("AcmeIssuer").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Why an issuance attempt failed: worth another attempt, or not.
enum Failure {
    Retry(String),
    Final(String),
}

impl AcmeIssuer {
    /// An issuer with `config`, answering challenges through `challenges` (hooked into
    /// the proxy that serves port 80) and installing certificates in `certs`.
    pub fn new(config: AcmeConfig, challenges: Arc<Http01Challenges>, certs: Arc<CertStore>) -> Self {
        AcmeIssuer { config, challenges, certs, account: tokio::sync::Mutex::new(None) }
    }

    fn certs_dir(&self) -> PathBuf {
        self.config.state_dir.join("certs")
    }

    /// The stored certificate for `names` (by its first name), if there is one.
    pub fn stored(&self, names: &[String]) -> Result<Option<StoredCert>> {
        let first = first_name(names)?;
        let chain = self.certs_dir().join(format!("{first}.crt"));
        let key = self.certs_dir().join(format!("{first}.key"));
        let pem = match std::fs::read(&chain) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&chain, e)),
        };
        let (covers, not_after) =
            leaf_names_and_expiry(&pem).map_err(|reason| acme_error(names, format!("{}: {reason}", chain.display())))?;
        if !names.iter().all(|n| covers.iter().any(|c| c.eq_ignore_ascii_case(n))) {
            // Stored for another set of names: order a new one.
            return Ok(None);
        }
        Ok(Some(StoredCert { names: names.to_vec(), chain, key, not_after, issued: false }))
    }

    /// Makes sure the proxy serves a valid certificate for `names`: the stored one if it
    /// is not within `renew_before` of its expiry, else a new one. Installs it in the
    /// [`CertStore`] under every name.
    pub async fn ensure(&self, names: &[String]) -> Result<StoredCert> {
        if let Some(stored) = self.stored(names)? {
            let fresh = stored.not_after.duration_since(SystemTime::now()).is_ok_and(|left| left > self.config.renew_before);
            if fresh {
                self.install(&stored)?;
                return Ok(stored);
            }
            tracing::info!(names = ?names, "certificate due for renewal");
        }
        self.issue(names).await
    }

    /// Orders a certificate for `names` now, stores and installs it.
    pub async fn issue(&self, names: &[String]) -> Result<StoredCert> {
        first_name(names)?;
        let mut last = String::new();
        for attempt in 1..=self.config.attempts.max(1) {
            let outcome = tokio::time::timeout(self.config.timeout, self.issue_once(names)).await;
            match outcome {
                Ok(Ok(stored)) => {
                    self.install(&stored)?;
                    tracing::info!(names = ?names, attempt, "certificate issued");
                    return Ok(stored);
                }
                Ok(Err(Failure::Final(reason))) => return Err(acme_error(names, reason)),
                Ok(Err(Failure::Retry(reason))) => last = reason,
                Err(_) => last = format!("no certificate within {:?}", self.config.timeout),
            }
            tracing::warn!(names = ?names, attempt, reason = %last, "ACME issuance failed; trying again");
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
        }
        Err(acme_error(names, format!("{} attempts failed; the last: {last}", self.config.attempts)))
    }

    /// Renews the certificates of `sets` (each a list of names) whenever they come within
    /// `renew_before` of expiry, looking every `every`, until `shutdown` completes.
    /// Failures are logged and tried again at the next look.
    pub async fn run(self: Arc<Self>, sets: Vec<Vec<String>>, every: Duration, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut ticker = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    for names in &sets {
                        if let Err(e) = self.ensure(names).await {
                            tracing::warn!(names = ?names, error = %e, "certificate not renewed; trying again later");
                        }
                    }
                }
                () = &mut shutdown => return,
            }
        }
    }

    /// Gets a certificate for every host `router` routes that lies under one of
    /// `suffixes` (`example.com` covers `example.com` and `shop.example.com`; wildcards are
    /// skipped: HTTP-01 cannot prove them), as such routes appear, looking every `look`;
    /// each is looked at again (renewed when due) every `renew_every`, and a failure is
    /// tried again after a minute. Names outside the suffixes are never sent to the CA:
    /// whoever can add a route must not make this edge order certificates for any name.
    pub async fn follow_routes(
        self: Arc<Self>,
        router: Arc<dyn crate::Router>,
        suffixes: Vec<String>,
        look: Duration,
        renew_every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let suffixes: Vec<String> = suffixes.iter().map(|s| s.trim_start_matches('.').to_ascii_lowercase()).collect();
        let covered =
            |host: &str| suffixes.iter().any(|s| host == s || host.strip_suffix(s.as_str()).is_some_and(|rest| rest.ends_with('.')));
        let mut next_look: HashMap<String, tokio::time::Instant> = HashMap::new();
        tokio::pin!(shutdown);
        let mut ticker = tokio::time::interval(look);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = &mut shutdown => return,
            }
            let table = router.snapshot();
            let mut hosts: Vec<String> = table
                .routes()
                .iter()
                .filter(|r| !r.host.is_wildcard())
                .map(|r| r.host.as_str().to_owned())
                .filter(|h| covered(h))
                .collect();
            hosts.dedup();
            let now = tokio::time::Instant::now();
            for host in hosts {
                if next_look.get(&host).is_some_and(|at| *at > now) {
                    continue;
                }
                let again = match self.ensure(std::slice::from_ref(&host)).await {
                    Ok(_) => renew_every,
                    Err(e) => {
                        tracing::warn!(name = %host, error = %e, "no certificate for a routed name; trying again in a minute");
                        Duration::from_secs(60)
                    }
                };
                next_look.insert(host, tokio::time::Instant::now() + again);
            }
        }
    }

    fn install(&self, stored: &StoredCert) -> Result<()> {
        let chain = std::fs::read(&stored.chain).map_err(|e| io_error(&stored.chain, e))?;
        let key = std::fs::read(&stored.key).map_err(|e| io_error(&stored.key, e))?;
        for name in &stored.names {
            self.certs.set(name, &chain, &key)?;
        }
        Ok(())
    }

    /// The account: loaded from `account.json`, or created on the CA and saved there.
    async fn account(&self) -> std::result::Result<Account, Failure> {
        let mut held = self.account.lock().await;
        if let Some(account) = held.as_ref() {
            return Ok(account.clone());
        }
        let path = self.config.state_dir.join("account.json");
        let account = match std::fs::read(&path) {
            Ok(json) => {
                let credentials: AccountCredentials =
                    serde_json::from_slice(&json).map_err(|e| Failure::Final(format!("{}: {e}", path.display())))?;
                self.builder()?.from_credentials(credentials).await.map_err(classify)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
                let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
                let (account, credentials) = self.builder()?.create(&new, self.config.directory.clone(), None).await.map_err(classify)?;
                let json = serde_json::to_vec(&credentials).map_err(|e| Failure::Final(e.to_string()))?;
                write_private(&path, &json).map_err(|e| Failure::Final(e.to_string()))?;
                tracing::info!(directory = %self.config.directory, "ACME account created");
                account
            }
            Err(e) => return Err(Failure::Final(format!("{}: {e}", path.display()))),
        };
        *held = Some(account.clone());
        Ok(account)
    }

    fn builder(&self) -> std::result::Result<instant_acme::AccountBuilder, Failure> {
        match &self.config.ca_file {
            Some(ca) => Account::builder_with_root(ca).map_err(|e| Failure::Final(format!("{}: {e}", ca.display()))),
            None => Account::builder().map_err(|e| Failure::Final(e.to_string())),
        }
    }

    async fn issue_once(&self, names: &[String]) -> std::result::Result<StoredCert, Failure> {
        let account = self.account().await?;
        let identifiers: Vec<Identifier> = names.iter().map(|n| Identifier::Dns(n.clone())).collect();
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await.map_err(classify)?;
        let mut tokens = Vec::new();
        let answered = async {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.map_err(classify)?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => return Err(Failure::Final(format!("authorization is {other:?}"))),
                }
                let mut challenge =
                    authz.challenge(ChallengeType::Http01).ok_or_else(|| Failure::Final("the CA offers no http-01 challenge".into()))?;
                let token = challenge.token.clone();
                self.challenges.put(&token, challenge.key_authorization().as_str());
                tokens.push(token);
                challenge.set_ready().await.map_err(classify)?;
            }
            Ok(())
        }
        .await;
        let result = match answered {
            Ok(()) => self.finish(&mut order, names).await,
            Err(f) => Err(f),
        };
        for token in &tokens {
            self.challenges.remove(token);
        }
        result
    }

    async fn finish(&self, order: &mut instant_acme::Order, names: &[String]) -> std::result::Result<StoredCert, Failure> {
        let polling = RetryPolicy::new().initial_delay(Duration::from_millis(100)).timeout(self.config.timeout);
        let status = order.poll_ready(&polling).await.map_err(classify)?;
        if status != OrderStatus::Ready {
            let reason = match order.refresh().await {
                Ok(state) => state.error.as_ref().map_or_else(|| format!("order is {status:?}"), ToString::to_string),
                Err(_) => format!("order is {status:?}"),
            };
            return Err(Failure::Final(reason));
        }
        let key_pem = order.finalize().await.map_err(classify)?;
        let chain_pem = order.poll_certificate(&polling).await.map_err(classify)?;
        let (_, not_after) = leaf_names_and_expiry(chain_pem.as_bytes()).map_err(Failure::Final)?;
        let first = first_name(names).map_err(|e| Failure::Final(e.to_string()))?;
        let dir = self.certs_dir();
        let chain = dir.join(format!("{first}.crt"));
        let key = dir.join(format!("{first}.key"));
        // The key first: a chain on disk always has its key.
        write_private(&key, key_pem.as_bytes()).map_err(|e| Failure::Final(e.to_string()))?;
        write_private(&chain, chain_pem.as_bytes()).map_err(|e| Failure::Final(e.to_string()))?;
        Ok(StoredCert { names: names.to_vec(), chain, key, not_after, issued: true })
    }
}

/// Whether a client error is worth a new attempt: a nonce refused after the client's own
/// retries, a rate limit, the CA's server error, or the network.
fn classify(e: instant_acme::Error) -> Failure {
    let text = e.to_string();
    match &e {
        instant_acme::Error::Api(problem) => {
            let kind = problem.r#type.as_deref().unwrap_or_default();
            if kind.ends_with(":badNonce") || kind.ends_with(":rateLimited") || problem.status.is_some_and(|s| s >= 500) {
                Failure::Retry(text)
            } else {
                Failure::Final(text)
            }
        }
        instant_acme::Error::Http(_) | instant_acme::Error::Hyper(_) | instant_acme::Error::Timeout(_) => Failure::Retry(text),
        _ => Failure::Final(text),
    }
}

/// The first name, checked: it names the certificate's files.
fn first_name(names: &[String]) -> Result<&str> {
    let first = names.first().ok_or_else(|| Error::InvalidInput {
        field: "certificate names",
        value: String::new(),
        reason: "at least one DNS name is needed".into(),
    })?;
    for name in names {
        let ok = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        if !ok {
            return Err(Error::InvalidInput {
                field: "certificate name",
                value: name.clone(),
                reason: "not a DNS name (letters, digits, '-', dot-separated; HTTP-01 cannot prove wildcards)".into(),
            });
        }
    }
    Ok(first)
}

/// The DNS names and the expiry of the chain's first certificate.
fn leaf_names_and_expiry(pem: &[u8]) -> std::result::Result<(Vec<String>, SystemTime), String> {
    use rustls::pki_types::pem::PemObject;
    let leaf = rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or("no certificate in the chain")?
        .map_err(|e| format!("unreadable chain: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).map_err(|e| format!("unreadable certificate: {e}"))?;
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).map_err(|_| "expired before 1970")?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push((*d).to_owned());
            }
        }
    }
    Ok((names, SystemTime::UNIX_EPOCH + Duration::from_secs(not_after)))
}

/// Writes a file only its owner can read, replacing it whole (a new file renamed over).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    // `<name>.tmp` beside it: the chain and the key of one certificate never share one.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io { context: path.display().to_string(), source }
}

fn acme_error(names: &[String], reason: String) -> Error {
    Error::Acme { names: names.join(","), reason }
}
