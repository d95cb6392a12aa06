//! Answering a registry's authentication challenge: basic credentials, or a bearer
//! token fetched from the challenge's realm for the scopes a request needs (the
//! distribution token spec), cached per set of scopes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt;

use super::{full, http_error, Client};
use crate::error::{Error, Result};

/// A user name and password. The password never appears in `Debug` output.
#[derive(Clone)]
pub struct Credentials {
    /// The user.
    pub username: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

impl Credentials {
    /// Credentials from values.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials { username: username.into(), password: password.into() }
    }

    /// Reads `user:password` from the first line of a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Io { context: format!("reading credentials {}", path.display()), source })?;
        let line = text.lines().next().unwrap_or("");
        let (u, p) = line.split_once(':').ok_or_else(|| Error::InvalidInput {
            field: "credentials file",
            value: path.display().to_string(),
            reason: "first line must be user:password".into(),
        })?;
        Ok(Credentials::new(u, p))
    }

    fn basic(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }
}

/// What the client learnt about authenticating to this registry.
#[derive(Debug, Default)]
pub(crate) struct AuthState {
    basic: bool,
    tokens: HashMap<String, String>,
}

fn scope_key(scopes: &[String]) -> String {
    let mut s = scopes.to_vec();
    s.sort();
    s.join(" ")
}

/// The `Authorization` header for a request needing `scopes`, if known.
pub(crate) fn authorization(state: &Mutex<AuthState>, creds: Option<&Credentials>, scopes: &[String]) -> Option<String> {
    let state = state.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(t) = state.tokens.get(&scope_key(scopes)) {
        return Some(format!("Bearer {t}"));
    }
    if state.basic {
        return creds.map(Credentials::basic);
    }
    None
}

/// `key="value"` pairs of a challenge.
fn params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while let Some((k, after)) = rest.split_once('=') {
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, tail) = if let Some(q) = after.strip_prefix('"') {
            match q.split_once('"') {
                Some((v, t)) => (v, t),
                None => (q, ""),
            }
        } else {
            after.split_once(',').map_or((after, ""), |(v, t)| (v, t))
        };
        out.insert(k, v.to_owned());
        rest = tail.trim_start_matches(',').trim();
    }
    out
}

/// Answers a 401's challenge; false if it cannot be answered (no credentials, unknown
/// scheme), in which case the 401 stands.
pub(crate) async fn answer(client: &Client, challenge: &str, scopes: &[String]) -> Result<bool> {
    let (scheme, rest) = challenge.split_once(' ').unwrap_or((challenge, ""));
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => {
            if client.creds.is_none() {
                return Ok(false);
            }
            client.auth.lock().unwrap_or_else(|p| p.into_inner()).basic = true;
            Ok(true)
        }
        "bearer" => {
            let p = params(rest);
            let Some(realm) = p.get("realm") else { return Ok(false) };
            let mut url = realm.clone();
            let mut sep = if url.contains('?') { '&' } else { '?' };
            let mut push = |k: &str, v: &str| {
                let v: String = form_urlencoded::byte_serialize(v.as_bytes()).collect();
                url.push_str(&format!("{sep}{k}={v}"));
                sep = '&';
            };
            if let Some(service) = p.get("service") {
                push("service", service);
            }
            let mut wanted: Vec<String> = scopes.to_vec();
            if let Some(s) = p.get("scope") {
                wanted.extend(s.split(' ').map(str::to_owned));
            }
            wanted.sort();
            wanted.dedup();
            for s in &wanted {
                push("scope", s);
            }
            if let Some(c) = &client.creds {
                push("account", &c.username);
            }
            let mut req = Request::builder().method(Method::GET).uri(&url);
            if let Some(c) = &client.creds {
                req = req.header(header::AUTHORIZATION, c.basic());
            }
            let req =
                req.body(full(Bytes::new())).map_err(|e| Error::Transport { context: format!("GET {realm}"), reason: e.to_string() })?;
            let resp =
                client.http.request(req).await.map_err(|e| Error::Transport { context: format!("GET {realm}"), reason: e.to_string() })?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| Error::Transport { context: format!("GET {realm}"), reason: e.to_string() })?
                .to_bytes();
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                // No (or wrong) credentials: the registry's own 401 stands.
                return Ok(false);
            }
            if status != StatusCode::OK {
                return Err(http_error(format!("GET {realm} (token)"), status, &body));
            }
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| Error::Transport { context: format!("GET {realm}"), reason: format!("token response: {e}") })?;
            let Some(token) = v.get("token").or_else(|| v.get("access_token")).and_then(|t| t.as_str()) else {
                return Err(Error::Transport { context: format!("GET {realm}"), reason: "no token in the response".into() });
            };
            client.auth.lock().unwrap_or_else(|p| p.into_inner()).tokens.insert(scope_key(scopes), token.to_owned());
            Ok(true)
        }
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_challenge_parameters() {
        let p = params(r#"realm="http://127.0.0.1:5000/token",service="reg",scope="repository:a/b:pull,push""#);
        assert_eq!(p["realm"], "http://127.0.0.1:5000/token");
        assert_eq!(p["service"], "reg");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        assert!(!format!("{:?}", Credentials::new("u", "hunter2")).contains("hunter2"));
    }
}
