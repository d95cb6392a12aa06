//! Who may do what: htpasswd basic auth (bcrypt, as `htpasswd -B` writes it), bearer
//! tokens following the distribution token spec (a token endpoint that trades basic
//! credentials for a signed token naming the granted scopes), and per-repository rules
//! saying which user may pull, push or delete where.
//!
//! Tokens are JWTs signed with HMAC-SHA256 under a secret read from a file: the token
//! endpoint and the registry are one process (or share the secret), so no key pair and
//! certificate chain are needed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// An action on a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Read manifests, blobs, tags, referrers.
    Pull,
    /// Upload blobs and manifests.
    Push,
    /// Delete manifests, tags and blobs.
    Delete,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }

    fn parse(s: &str) -> Option<Action> {
        match s {
            "pull" => Some(Action::Pull),
            "push" => Some(Action::Push),
            "delete" => Some(Action::Delete),
            _ => None,
        }
    }
}

/// What a request needs: an action on a repository, or the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Any authenticated user (`GET /v2/`).
    Authenticated,
    /// An action on a repository.
    Repository(String, Action),
    /// Listing repositories (`registry:catalog:*`).
    Catalog,
}

impl Access {
    /// The token-spec scope that grants this.
    pub fn scope(&self) -> Option<String> {
        match self {
            Access::Authenticated => None,
            Access::Repository(r, a) => Some(format!("repository:{r}:{}", a.as_str())),
            Access::Catalog => Some("registry:catalog:*".to_owned()),
        }
    }
}

fn invalid(field: &'static str, value: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::InvalidInput { field, value: value.into(), reason: reason.into() }
}

/// Users and their bcrypt password hashes, from an htpasswd file.
pub struct Htpasswd {
    users: HashMap<String, String>,
    /// Passwords that verified recently, by user (as a digest, never the password):
    /// bcrypt costs tens of milliseconds by design, and clients send credentials with
    /// every request.
    verified: Mutex<HashMap<String, (Digest, Instant)>>,
}

impl std::fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hashes are secrets too: only the user names.
        f.debug_struct("Htpasswd").field("users", &self.users.keys().collect::<Vec<_>>()).finish()
    }
}

/// How long a verified password skips bcrypt.
const VERIFIED_FOR: Duration = Duration::from_secs(300);

impl Htpasswd {
    /// Parses `user:hash` lines; only bcrypt (`$2y$`, `$2b$`, `$2a$`) hashes are taken,
    /// since the others htpasswd writes (MD5, SHA-1, crypt) are too weak to accept.
    pub fn parse(text: &str) -> Result<Htpasswd> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) =
                line.split_once(':').ok_or_else(|| invalid("htpasswd line", format!("line {}", n + 1), "must be user:hash"))?;
            if !(hash.starts_with("$2y$") || hash.starts_with("$2b$") || hash.starts_with("$2a$")) {
                return Err(invalid(
                    "htpasswd line",
                    format!("line {} (user {user})", n + 1),
                    "only bcrypt hashes are accepted (htpasswd -B)",
                ));
            }
            users.insert(user.to_owned(), hash.to_owned());
        }
        Ok(Htpasswd { users, verified: Mutex::default() })
    }

    /// Reads and parses an htpasswd file.
    pub fn load(path: &Path) -> Result<Htpasswd> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Io { context: format!("reading htpasswd file {}", path.display()), source })?;
        Htpasswd::parse(&text)
    }

    /// Whether `password` is `user`'s.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let Some(hash) = self.users.get(user) else { return false };
        let fingerprint = Digest::of(format!("{user}\0{password}").as_bytes());
        {
            let verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if verified.get(user).is_some_and(|(f, t)| *f == fingerprint && t.elapsed() < VERIFIED_FOR) {
                return true;
            }
        }
        let ok = bcrypt::verify(password, hash).unwrap_or(false);
        if ok {
            self.verified.lock().unwrap_or_else(|p| p.into_inner()).insert(user.to_owned(), (fingerprint, Instant::now()));
        }
        ok
    }
}

/// Per-repository rules: `<user|*> <repository pattern> <actions>` lines, where a
/// pattern ending in `*` matches by prefix and actions are `pull,push,delete` or `*`.
/// The catalog is listed to users with a rule for the pattern `*`.
#[derive(Clone, Debug, Default)]
pub struct Acl {
    rules: Option<Vec<(String, String, Vec<Action>)>>,
}

impl Acl {
    /// Every authenticated user may do everything.
    pub fn allow_all() -> Acl {
        Acl { rules: None }
    }

    /// Parses rules.
    pub fn parse(text: &str) -> Result<Acl> {
        let mut rules = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [user, pattern, actions] = parts[..] else {
                return Err(invalid("acl line", format!("line {}: {line}", n + 1), "must be <user> <repository pattern> <actions>"));
            };
            let actions = if actions == "*" {
                vec![Action::Pull, Action::Push, Action::Delete]
            } else {
                actions
                    .split(',')
                    .map(|a| Action::parse(a).ok_or_else(|| invalid("acl action", a, "must be pull, push, delete or *")))
                    .collect::<Result<Vec<_>>>()?
            };
            rules.push((user.to_owned(), pattern.to_owned(), actions));
        }
        Ok(Acl { rules: Some(rules) })
    }

    /// Reads and parses a rules file.
    pub fn load(path: &Path) -> Result<Acl> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Io { context: format!("reading acl file {}", path.display()), source })?;
        Acl::parse(&text)
    }

    /// Whether `user` has `access`.
    pub fn allows(&self, user: &str, access: &Access) -> bool {
        let Some(rules) = &self.rules else { return true };
        let mine = rules.iter().filter(|(u, _, _)| u == "*" || u == user);
        match access {
            Access::Authenticated => true,
            Access::Catalog => mine.into_iter().any(|(_, p, _)| p == "*"),
            Access::Repository(repo, action) => mine.into_iter().any(|(_, p, actions)| {
                let matches = match p.strip_suffix('*') {
                    Some(prefix) => repo.starts_with(prefix),
                    None => p == repo,
                };
                matches && actions.contains(action)
            }),
        }
    }
}

/// One entry of a token's `access` claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// `repository` or `registry`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The repository (or `catalog`).
    pub name: String,
    /// Granted actions.
    pub actions: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    access: Vec<Grant>,
}

/// Issues and verifies bearer tokens (HS256 JWTs).
pub struct Tokens {
    key: ring::hmac::Key,
    /// The `iss` claim, and the realm clients are sent to.
    pub realm: String,
    /// The `aud` claim and the challenge's `service`.
    pub service: String,
    /// How long a token lives.
    pub ttl: Duration,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("realm", &self.realm).field("service", &self.service).finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

impl Tokens {
    /// Tokens signed with `secret` (at least 32 bytes).
    pub fn new(secret: &[u8], realm: impl Into<String>, service: impl Into<String>) -> Result<Tokens> {
        if secret.len() < 32 {
            return Err(invalid("token secret", format!("{} bytes", secret.len()), "must be at least 32 bytes"));
        }
        Ok(Tokens {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            realm: realm.into(),
            service: service.into(),
            ttl: Duration::from_secs(300),
        })
    }

    /// Reads the secret from a file (trailing whitespace is not part of it).
    pub fn load(secret_file: &Path, realm: impl Into<String>, service: impl Into<String>) -> Result<Tokens> {
        let secret = std::fs::read(secret_file)
            .map_err(|source| Error::Io { context: format!("reading token secret {}", secret_file.display()), source })?;
        let end = secret.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
        Tokens::new(&secret[..end], realm, service)
    }

    /// A token for `user` granting what of `requested` (scopes as in the token spec)
    /// the rules allow.
    pub fn issue(&self, user: &str, requested: &[String], acl: &Acl) -> String {
        let mut access = Vec::new();
        for scope in requested {
            let mut parts = scope.splitn(3, ':');
            let (Some(kind), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next()) else { continue };
            let granted: Vec<String> = match kind {
                "repository" => actions
                    .split(',')
                    .filter_map(Action::parse)
                    .filter(|a| acl.allows(user, &Access::Repository(name.to_owned(), *a)))
                    .map(|a| a.as_str().to_owned())
                    .collect(),
                "registry" if name == "catalog" && acl.allows(user, &Access::Catalog) => vec!["*".to_owned()],
                _ => Vec::new(),
            };
            if !granted.is_empty() {
                access.push(Grant { kind: kind.to_owned(), name: name.to_owned(), actions: granted });
            }
        }
        let now = now_secs();
        let mut jti = [0u8; 12];
        crate::store::fill_random(&mut jti);
        let claims = Claims {
            iss: self.realm.clone(),
            sub: user.to_owned(),
            aud: self.service.clone(),
            exp: now + self.ttl.as_secs(),
            nbf: now.saturating_sub(1),
            iat: now,
            jti: hex::encode(jti),
            access,
        };
        let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let body = B64.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signing_input = format!("{header}.{body}");
        let sig = ring::hmac::sign(&self.key, signing_input.as_bytes());
        format!("{signing_input}.{}", B64.encode(sig.as_ref()))
    }

    /// Whether `token` is valid now and grants `access`.
    pub fn allows(&self, token: &str, access: &Access) -> bool {
        let Some(claims) = self.verify(token) else { return false };
        match access {
            Access::Authenticated => true,
            Access::Catalog => claims.access.iter().any(|g| g.kind == "registry" && g.name == "catalog"),
            Access::Repository(repo, action) => {
                claims.access.iter().any(|g| g.kind == "repository" && g.name == *repo && g.actions.iter().any(|a| a == action.as_str()))
            }
        }
    }

    fn verify(&self, token: &str) -> Option<Claims> {
        let (signing_input, sig) = token.rsplit_once('.')?;
        let sig = B64.decode(sig).ok()?;
        ring::hmac::verify(&self.key, signing_input.as_bytes(), &sig).ok()?;
        let (header, body) = signing_input.split_once('.')?;
        let header: serde_json::Value = serde_json::from_slice(&B64.decode(header).ok()?).ok()?;
        if header.get("alg")?.as_str()? != "HS256" {
            return None;
        }
        let claims: Claims = serde_json::from_slice(&B64.decode(body).ok()?).ok()?;
        let now = now_secs();
        let fresh = claims.exp > now && claims.nbf <= now + 5;
        (fresh && claims.iss == self.realm && claims.aud == self.service).then_some(claims)
    }
}

/// The server's policy: open (only on loopback, by the binary's choice), basic, or bearer.
// Built once per server: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Auth {
    /// No authentication.
    None,
    /// HTTP basic against an htpasswd file, with per-repository rules.
    Basic {
        /// Users.
        users: Htpasswd,
        /// Rules.
        acl: Acl,
    },
    /// Bearer tokens from the token endpoint (`/token`) this server also serves, which
    /// takes basic credentials checked against `users` and grants by `acl`.
    Bearer {
        /// Users.
        users: Htpasswd,
        /// Rules.
        acl: Acl,
        /// Signing and verification.
        tokens: Tokens,
    },
}

/// The outcome of checking a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Go ahead.
    Allowed,
    /// No or bad credentials: 401 with this `WWW-Authenticate`.
    Challenge(String),
    /// Authenticated but not allowed: 403.
    Denied,
}

fn basic_credentials(header: &str) -> Option<(String, String)> {
    let encoded = header.strip_prefix("Basic ").or_else(|| header.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

impl Auth {
    /// Checks a request's `Authorization` header against what it needs.
    pub(crate) fn check(&self, authorization: Option<&str>, access: &Access) -> Verdict {
        match self {
            Auth::None => Verdict::Allowed,
            Auth::Basic { users, acl } => {
                let challenge = || Verdict::Challenge(r#"Basic realm="keelson-registry""#.to_owned());
                let Some((user, password)) = authorization.and_then(basic_credentials) else { return challenge() };
                if !users.verify(&user, &password) {
                    return challenge();
                }
                if acl.allows(&user, access) {
                    Verdict::Allowed
                } else {
                    Verdict::Denied
                }
            }
            Auth::Bearer { tokens, .. } => {
                let token = authorization.and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")));
                if let Some(token) = token {
                    if tokens.allows(token.trim(), access) {
                        return Verdict::Allowed;
                    }
                }
                let mut challenge = format!(r#"Bearer realm="{}",service="{}""#, tokens.realm, tokens.service);
                if let Some(scope) = access.scope() {
                    challenge.push_str(&format!(r#",scope="{scope}""#));
                }
                if token.is_some() {
                    // A valid token without the scope: distribution answers 401 with
                    // the challenge too, so that the client fetches a wider token.
                    challenge.push_str(r#",error="insufficient_scope""#);
                }
                Verdict::Challenge(challenge)
            }
        }
    }

    /// The token endpoint: basic credentials and the requested scopes in, a token out.
    /// `None` if the credentials are wrong (or this is not bearer auth).
    pub(crate) fn token(&self, authorization: Option<&str>, scopes: &[String]) -> Option<String> {
        let Auth::Bearer { users, acl, tokens } = self else { return None };
        let (user, password) = authorization.and_then(basic_credentials)?;
        users.verify(&user, &password).then(|| tokens.issue(&user, scopes, acl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> Htpasswd {
        let hash = bcrypt::hash("s3cret", 4).expect("hash");
        Htpasswd::parse(&format!("# users\nalice:{hash}\nbob:{hash}\n")).expect("parse")
    }

    #[test]
    fn htpasswd_takes_bcrypt_only_and_never_shows_hashes() {
        let u = users();
        assert!(u.verify("alice", "s3cret"));
        assert!(u.verify("alice", "s3cret"), "cached");
        assert!(!u.verify("alice", "wrong"));
        assert!(!u.verify("carol", "s3cret"));
        assert!(!format!("{u:?}").contains("$2"));
        let e = Htpasswd::parse("eve:{SHA}abc").expect_err("sha1");
        assert!(e.to_string().contains("user eve"), "{e}");
    }

    #[test]
    fn acl_rules_by_user_and_prefix() {
        let acl = Acl::parse("alice team/* pull,push\n* public/* pull\nroot * *\n").expect("acl");
        let repo = |r: &str, a| Access::Repository(r.to_owned(), a);
        assert!(acl.allows("alice", &repo("team/app", Action::Push)));
        assert!(!acl.allows("alice", &repo("team/app", Action::Delete)));
        assert!(!acl.allows("alice", &repo("other", Action::Pull)));
        assert!(acl.allows("bob", &repo("public/x", Action::Pull)));
        assert!(!acl.allows("bob", &repo("public/x", Action::Push)));
        assert!(acl.allows("root", &Access::Catalog) && !acl.allows("alice", &Access::Catalog));
        assert!(Acl::parse("alice x fly").is_err());
    }

    #[test]
    fn tokens_grant_only_what_rules_allow_and_expire() {
        let acl = Acl::parse("alice team/* pull,push\n").expect("acl");
        let tokens = Tokens::new(&[7u8; 32], "http://127.0.0.1/token", "keelson").expect("tokens");
        let t = tokens.issue("alice", &["repository:team/app:pull,push,delete".into(), "repository:other:pull".into()], &acl);
        let repo = |r: &str, a| Access::Repository(r.to_owned(), a);
        assert!(tokens.allows(&t, &repo("team/app", Action::Push)));
        assert!(!tokens.allows(&t, &repo("team/app", Action::Delete)));
        assert!(!tokens.allows(&t, &repo("other", Action::Pull)));
        let other = Tokens::new(&[8u8; 32], "http://127.0.0.1/token", "keelson").expect("tokens");
        assert!(!other.allows(&t, &repo("team/app", Action::Pull)), "another key's token");
        let mut tampered = t.clone();
        tampered.insert(tampered.len() / 2, 'x');
        assert!(!tokens.allows(&tampered, &repo("team/app", Action::Pull)));
        let mut short = Tokens::new(&[7u8; 32], "http://127.0.0.1/token", "keelson").expect("tokens");
        short.ttl = Duration::ZERO;
        let expired = short.issue("alice", &["repository:team/app:pull".into()], &acl);
        assert!(!tokens.allows(&expired, &repo("team/app", Action::Pull)));
        assert!(Tokens::new(b"short", "r", "s").is_err());
    }
}
