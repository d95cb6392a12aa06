//! What a route is: hosts (exact or one-label wildcard), path prefixes, endpoints, the
//! balancer and upstream protocol a route uses, and the changes a router applies. Data
//! and validation only; the table that serves them is `table.rs`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rate_limit::RateLimit;

/// How a route spreads requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "BalancerSpec", into = "BalancerSpec")]
#[non_exhaustive]
pub enum Balancer {
    /// Each healthy endpoint in turn.
    #[default]
    RoundRobin,
    /// In turn, in proportion to endpoint weights (smoothly interleaved).
    Weighted,
    /// Power of two choices on requests in flight.
    LeastRequests,
    /// Power of two choices on Peak-EWMA latency × (requests in flight + 1), as
    /// Finagle and Linkerd do: a slow endpoint's share drops within a few requests.
    PeakEwma,
    /// The same `header` value goes to the same endpoint (a ring with virtual nodes), unless
    /// that endpoint is over 1.25 × the average load, then the next one on the ring
    /// (consistent hashing with bounded loads). Requests without the header are spread
    /// round robin.
    ConsistentHash {
        /// The request header whose value is hashed.
        header: String,
    },
}

/// The file form: `{"kind": "peak_ewma"}`, `{"kind": "consistent_hash", "header": "x-user"}`.
/// Parsed through this strict struct because serde lets internally tagged unit variants
/// ignore unknown keys, and a typo must be an error.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BalancerSpec {
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    header: Option<String>,
}

impl TryFrom<BalancerSpec> for Balancer {
    type Error = String;
    fn try_from(spec: BalancerSpec) -> std::result::Result<Self, String> {
        let no_header = |b: Balancer| match &spec.header {
            None => Ok(b),
            Some(_) => Err(format!("balancer {:?} takes no header", spec.kind)),
        };
        match spec.kind.as_str() {
            "round_robin" => no_header(Balancer::RoundRobin),
            "weighted" => no_header(Balancer::Weighted),
            "least_requests" => no_header(Balancer::LeastRequests),
            "peak_ewma" => no_header(Balancer::PeakEwma),
            "consistent_hash" => match spec.header {
                Some(h) if !h.is_empty() && http::HeaderName::from_bytes(h.as_bytes()).is_ok() => {
                    Ok(Balancer::ConsistentHash { header: h.to_ascii_lowercase() })
                }
                other => Err(format!("consistent_hash needs a valid header name, got {other:?}")),
            },
            other => Err(format!("unknown balancer {other:?}: round_robin, weighted, least_requests, peak_ewma or consistent_hash")),
        }
    }
}

impl From<Balancer> for BalancerSpec {
    fn from(b: Balancer) -> Self {
        let (kind, header) = match b {
            Balancer::RoundRobin => ("round_robin", None),
            Balancer::Weighted => ("weighted", None),
            Balancer::LeastRequests => ("least_requests", None),
            Balancer::PeakEwma => ("peak_ewma", None),
            Balancer::ConsistentHash { header } => ("consistent_hash", Some(header)),
        };
        BalancerSpec { kind: kind.into(), header }
    }
}

/// A route host: a DNS name, lower-cased, without port; or a wildcard `*.parent`, which
/// matches any one label under `parent` (`a.parent`, not `a.b.parent` nor `parent`) when
/// no exact host matches.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Host(String);

impl Host {
    /// Validates and lower-cases `host` (names are case-insensitive; the table stores one
    /// spelling). Rejects empty names, ports, and characters outside DNS names.
    pub fn new(host: impl Into<String>) -> Result<Self> {
        let host = host.into();
        let lower = host.to_ascii_lowercase();
        let bad = |reason: &str| Err(Error::invalid("route host", &host, reason));
        if lower.is_empty() {
            return bad("must not be empty");
        }
        if lower.len() > 253 {
            return bad("must be at most 253 characters");
        }
        let name = lower.strip_prefix("*.").unwrap_or(&lower);
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return bad("each dot-separated label must be 1 to 63 characters");
            }
            if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') || label.starts_with('-') || label.ends_with('-') {
                return bad("labels may contain only a-z, 0-9 and inner '-' (no port, no scheme)");
            }
        }
        Ok(Host(lower))
    }

    /// The host name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is a `*.parent` wildcard.
    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }
}

/// A route's path prefix: `/` (everything, the default) or `/segment[/segment...]`
/// without a trailing slash. It matches a request path equal to it or continuing with
/// `/`, so `/api` matches `/api` and `/api/v1` but not `/apis`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PathPrefix(String);

impl PathPrefix {
    /// Validates `prefix`; a trailing `/` is dropped (`/api/` is `/api`).
    pub fn new(prefix: impl Into<String>) -> Result<Self> {
        let prefix = prefix.into();
        let bad = |reason: &str| Err(Error::invalid("route path prefix", &prefix, reason));
        if !prefix.starts_with('/') {
            return bad("must start with '/'");
        }
        if prefix.len() > 1024 {
            return bad("must be at most 1024 characters");
        }
        if !prefix.bytes().all(|b| b.is_ascii_graphic()) || prefix.contains(['?', '#', '%', '\\']) {
            return bad("may contain only printable ASCII without '?', '#', '%' or '\\'");
        }
        let trimmed = if prefix.len() > 1 { prefix.trim_end_matches('/') } else { prefix.as_str() };
        if trimmed.len() > 1 && trimmed[1..].split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
            return bad("segments must be non-empty and not '.' or '..'");
        }
        Ok(PathPrefix(if trimmed.is_empty() { "/".to_owned() } else { trimmed.to_owned() }))
    }

    /// The catch-all prefix `/`.
    pub fn root() -> Self {
        PathPrefix("/".to_owned())
    }

    /// The prefix.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `path` (a request path, without query) falls under this prefix.
    pub fn matches(&self, path: &str) -> bool {
        self.0 == "/" || (path.starts_with(&self.0) && matches!(path.as_bytes().get(self.0.len()), None | Some(b'/')))
    }
}

impl Default for PathPrefix {
    fn default() -> Self {
        PathPrefix::root()
    }
}

impl std::fmt::Display for PathPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for PathPrefix {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        PathPrefix::new(value)
    }
}

impl From<PathPrefix> for String {
    fn from(p: PathPrefix) -> String {
        p.0
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Host {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        Host::new(value)
    }
}

// Lets the table be probed with a `&str` without allocating. Sound because the derived
// `Hash`/`Eq` of the newtype are exactly those of its `String`, hence of `str`.
impl std::borrow::Borrow<str> for Host {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<Host> for String {
    fn from(h: Host) -> String {
        h.0
    }
}

/// One upstream server of a route.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Stable id (an instance id), so per-endpoint state can follow it across updates.
    pub id: String,
    /// Where to connect.
    pub addr: SocketAddr,
    /// Whether it may receive traffic.
    #[serde(default = "yes")]
    pub healthy: bool,
    /// Relative share for the weighted and consistent-hash balancers, 1 to 100 (default 1).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

impl Endpoint {
    /// A healthy endpoint.
    pub fn new(id: impl Into<String>, addr: SocketAddr) -> Self {
        Endpoint { id: id.into(), addr, healthy: true, weight: 1 }
    }
}

/// Requests for `host` whose path falls under `path` go to `endpoints`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The host it serves (exact, or a `*.parent` wildcard).
    pub host: Host,
    /// The path prefix it serves (default `/`, everything). A host's routes are tried
    /// longest prefix first.
    #[serde(default)]
    pub path: PathPrefix,
    /// Upstream servers.
    pub endpoints: Vec<Endpoint>,
    /// How requests are spread over them (default round robin).
    #[serde(default)]
    pub balancer: Balancer,
    /// What the endpoints speak (default HTTP/1.1).
    #[serde(default)]
    pub upstream: UpstreamProtocol,
    /// Requests over this rate get 429 (default: no limit).
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}

/// The protocol the proxy speaks to a route's endpoints, whatever the client speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive; upgrades (WebSocket) pass through.
    #[default]
    Http1,
    /// HTTP/2 in clear text by prior knowledge: gRPC services, multiplexed upstreams.
    H2c,
}

impl Route {
    /// A route.
    pub fn new(host: Host, endpoints: Vec<Endpoint>) -> Self {
        Route {
            host,
            path: PathPrefix::root(),
            endpoints,
            balancer: Balancer::RoundRobin,
            upstream: UpstreamProtocol::Http1,
            rate_limit: None,
        }
    }

    /// Sets a rate limit.
    pub fn with_rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// Sets the path prefix.
    pub fn with_path(mut self, path: PathPrefix) -> Self {
        self.path = path;
        self
    }

    /// The route's identity in a table: host and path prefix.
    pub fn key(&self) -> RouteKey {
        (self.host.clone(), self.path.clone())
    }

    /// Sets the upstream protocol.
    pub fn with_upstream(mut self, upstream: UpstreamProtocol) -> Self {
        self.upstream = upstream;
        self
    }

    /// Sets the balancer.
    pub fn with_balancer(mut self, balancer: Balancer) -> Self {
        self.balancer = balancer;
        self
    }

    /// Checks what a table cannot hold: a zero rate limit, missing or duplicate endpoint
    /// ids, weights outside 1 to 100.
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(l) = self.rate_limit {
            if l.per_second == 0 || l.burst == 0 {
                return Err(Error::invalid(
                    "rate limit",
                    format!("{l:?}"),
                    format!("route {}: per_second and burst must be at least 1", self.host),
                ));
            }
        }
        let mut ids = std::collections::HashSet::new();
        for e in &self.endpoints {
            if e.id.is_empty() || !ids.insert(e.id.as_str()) {
                return Err(Error::invalid(
                    "endpoint id",
                    &e.id,
                    format!("route {}: endpoint ids must be non-empty and distinct", self.host),
                ));
            }
            if !(1..=100).contains(&e.weight) {
                return Err(Error::invalid("endpoint weight", e.weight.to_string(), format!("route {}: weights are 1 to 100", self.host)));
            }
        }
        Ok(())
    }
}

/// A route's identity: its host and path prefix.
pub type RouteKey = (Host, PathPrefix);

/// One change to the table.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RouteChange {
    /// Adds a route or replaces the one with the same host and path prefix.
    Upsert(Route),
    /// Removes every route of a host, whatever its path prefix.
    Remove(Host),
    /// Removes the route of a host for one path prefix.
    RemovePath(Host, PathPrefix),
}

impl RouteChange {
    /// The host the change is about.
    pub fn host(&self) -> &Host {
        match self {
            RouteChange::Upsert(r) => &r.host,
            RouteChange::Remove(h) | RouteChange::RemovePath(h, _) => h,
        }
    }

    /// The path the change is about; `None` for all of a host's paths.
    pub fn path(&self) -> Option<&PathPrefix> {
        match self {
            RouteChange::Upsert(r) => Some(&r.path),
            RouteChange::Remove(_) => None,
            RouteChange::RemovePath(_, p) => Some(p),
        }
    }
}
