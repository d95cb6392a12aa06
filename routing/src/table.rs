//! Routes and the immutable route table that the proxy reads on every request.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::balance::{Balancer, EndpointStats, Selector};
use crate::error::{Error, Result};
use crate::rate_limit::{RateLimit, RateLimiter};

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

    fn validate(&self) -> Result<()> {
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
pub enum RouteChange {
    /// Adds a route or replaces the one with the same host and path prefix.
    Upsert(Route),
    /// Removes every route of a host, whatever its path prefix.
    Remove(Host),
    /// Removes the route of a host for one path prefix.
    RemovePath(Host, PathPrefix),
}

impl RouteChange {
    fn host(&self) -> &Host {
        match self {
            RouteChange::Upsert(r) => &r.host,
            RouteChange::Remove(h) | RouteChange::RemovePath(h, _) => h,
        }
    }

    /// The path the change is about; `None` for all of a host's paths.
    fn path(&self) -> Option<&PathPrefix> {
        match self {
            RouteChange::Upsert(r) => Some(&r.path),
            RouteChange::Remove(_) => None,
            RouteChange::RemovePath(_, p) => Some(p),
        }
    }
}

/// A route as the table holds it, with the balancing state that survives updates.
#[derive(Debug)]
pub struct RouteEntry {
    route: Route,
    /// Precomputed per update (healthy indices, weighted schedule, hash ring), so that
    /// picking is O(1) or O(log n) and unhealthy endpoints' share is spread evenly.
    selector: Selector,
    /// Per-endpoint state, parallel to `route.endpoints`; carried over by endpoint id.
    stats: Vec<Arc<EndpointStats>>,
    /// Endpoint addresses as URI authorities, parallel to `route.endpoints`.
    authorities: Vec<http::uri::Authority>,
    /// Rotation position, shared with the entry that replaces this one.
    cursor: Arc<AtomicUsize>,
    /// `host` or `host/path`: the route's label in metrics and messages.
    name: String,
    /// The route's rate limit, shared with the entry that replaces this one while the
    /// limit stays the same (so an update does not refill the bucket).
    limiter: Option<Arc<RateLimiter>>,
}

/// An endpoint chosen for a request, with its live state.
#[derive(Debug)]
pub struct Picked<'a> {
    /// The endpoint.
    pub endpoint: &'a Endpoint,
    /// Its state; wrap the request in [`crate::InFlight`] to keep it current.
    pub stats: Arc<EndpointStats>,
    /// Its address as a URI authority, parsed once per route update.
    pub authority: &'a http::uri::Authority,
}

impl RouteEntry {
    /// The route.
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// Whether the route's rate limit admits one more request now (always, without one).
    pub fn admit(&self) -> bool {
        self.limiter.as_ref().is_none_or(|l| l.bucket.try_take())
    }

    /// `host` for a route on `/`, else `host` followed by its path prefix.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next healthy endpoint by the route's balancer (no request key); `None` when
    /// none is healthy.
    pub fn pick(&self) -> Option<&Endpoint> {
        self.pick_for(None).map(|p| p.endpoint)
    }

    /// The endpoint for a request whose hash key (for consistent hashing) is `key`.
    /// Lock-free.
    pub fn pick_for(&self, key: Option<&[u8]>) -> Option<Picked<'_>> {
        let i = self.selector.pick(&self.route.balancer, &self.cursor, &self.stats, key)?;
        Some(Picked { endpoint: &self.route.endpoints[i], stats: self.stats[i].clone(), authority: &self.authorities[i] })
    }

    /// Requests in flight to this route's endpoints, summed.
    pub fn in_flight(&self) -> u64 {
        self.stats.iter().map(|s| u64::from(s.in_flight())).sum()
    }

    /// The live state of endpoint `id`.
    pub fn stats(&self, id: &str) -> Option<&Arc<EndpointStats>> {
        self.route.endpoints.iter().position(|e| e.id == id).map(|i| &self.stats[i])
    }
}

/// `addr` as a URI authority. A socket address always is one (`1.2.3.4:80`, `[::1]:80`).
fn authority(addr: SocketAddr) -> http::uri::Authority {
    http::uri::Authority::try_from(addr.to_string()).unwrap_or_else(|_| http::uri::Authority::from_static("invalid.invalid"))
}

/// A host's routes, longest path prefix first. Most hosts have one route: it is held
/// directly, so a lookup chases no more pointers than a table keyed by host alone.
#[derive(Debug, Clone)]
enum HostRoutes {
    One(Arc<RouteEntry>),
    Many(Arc<Vec<Arc<RouteEntry>>>),
}

impl HostRoutes {
    fn entries(&self) -> &[Arc<RouteEntry>] {
        match self {
            HostRoutes::One(e) => std::slice::from_ref(e),
            HostRoutes::Many(list) => list,
        }
    }

    /// From a list sorted longest prefix first; `None` when empty.
    fn from_list(mut list: Vec<Arc<RouteEntry>>) -> Option<Self> {
        match list.len() {
            0 => None,
            1 => list.pop().map(HostRoutes::One),
            _ => Some(HostRoutes::Many(Arc::new(list))),
        }
    }

    fn find(&self, path: &str) -> Option<&RouteEntry> {
        match self {
            HostRoutes::One(e) => e.route.path.matches(path).then_some(e.as_ref()),
            HostRoutes::Many(list) => list.iter().find(|e| e.route.path.matches(path)).map(AsRef::as_ref),
        }
    }

    fn get(&self, prefix: &PathPrefix) -> Option<&Arc<RouteEntry>> {
        self.entries().iter().find(|e| &e.route.path == prefix)
    }

    fn len(&self) -> usize {
        self.entries().len()
    }

    /// These routes with `entry` added or replacing the one with its prefix.
    fn with(routes: Option<&HostRoutes>, entry: Arc<RouteEntry>) -> HostRoutes {
        let mut list: Vec<Arc<RouteEntry>> =
            routes.map(|r| r.entries().iter().filter(|e| e.route.path != entry.route.path).cloned().collect()).unwrap_or_default();
        if list.is_empty() {
            return HostRoutes::One(entry);
        }
        let at = list.partition_point(|e| e.route.path.as_str().len() >= entry.route.path.as_str().len());
        list.insert(at, entry);
        HostRoutes::Many(Arc::new(list))
    }

    /// These routes without `prefix`; `None` when none is left.
    fn without(&self, prefix: &PathPrefix) -> Option<HostRoutes> {
        HostRoutes::from_list(self.entries().iter().filter(|e| &e.route.path != prefix).cloned().collect())
    }
}

/// An immutable snapshot of every route. The proxy reads one per request; updates build
/// a new table and swap it in.
#[derive(Debug, Default)]
pub struct RouteTable {
    version: u64,
    // A persistent (structurally shared) map: `apply` copies only the path to the
    // changed entries, so a delta costs O(changes × log routes), not O(routes), and old
    // snapshots held by in-flight requests stay valid. Wildcards are stored under their
    // `*.parent` spelling.
    hosts: imbl::HashMap<Host, HostRoutes>,
    len: usize,
}

impl RouteTable {
    /// The table's version; each applied batch increments it.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The route for `host`'s root: what a request for `/` would use.
    pub fn lookup(&self, host: &str) -> Option<&RouteEntry> {
        self.lookup_path(host, "/")
    }

    /// The route for a request: `host` (lower-case, no port) chooses the host's routes,
    /// exact name first, else the `*.parent` wildcard; then the longest path prefix
    /// matching `path` wins. As with nginx's `server_name`, a matching host whose
    /// prefixes all miss does not fall back to the wildcard.
    pub fn lookup_path(&self, host: &str, path: &str) -> Option<&RouteEntry> {
        if let Some(routes) = self.hosts.get(host) {
            return routes.find(path);
        }
        let (_, parent) = host.split_once('.')?;
        // "*." + parent on the stack: a route lookup allocates nothing.
        let mut buf = [0u8; 256];
        let len = parent.len() + 2;
        if len > buf.len() {
            return None;
        }
        buf[..2].copy_from_slice(b"*.");
        buf[2..len].copy_from_slice(parent.as_bytes());
        let wildcard = std::str::from_utf8(&buf[..len]).ok()?;
        self.hosts.get(wildcard)?.find(path)
    }

    /// The route with exactly this host and path prefix.
    pub fn get(&self, host: &Host, path: &PathPrefix) -> Option<&RouteEntry> {
        self.hosts.get(host)?.get(path).map(AsRef::as_ref)
    }

    /// Every route, sorted by host, then path prefix.
    pub fn routes(&self) -> Vec<&Route> {
        let mut all: Vec<&Route> = self.hosts.values().flat_map(|h| h.entries().iter().map(|e| &e.route)).collect();
        all.sort_by(|a, b| (&a.host, &a.path).cmp(&(&b.host, &b.path)));
        all
    }

    /// How many routes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A new table with `changes` applied, all or nothing. Cost is proportional to the
    /// changes (times log of the table size, plus the host's own prefixes); untouched
    /// entries are shared with `self`.
    pub fn apply(&self, changes: &[RouteChange]) -> Result<RouteTable> {
        let mut seen = std::collections::HashSet::new();
        let mut whole_hosts = std::collections::HashSet::new();
        for c in changes {
            if !seen.insert((c.host(), c.path())) || (c.path().is_some() && whole_hosts.contains(c.host())) {
                let path = c.path().map_or("", PathPrefix::as_str);
                let name = if path == "/" { c.host().to_string() } else { format!("{}{path}", c.host()) };
                return Err(Error::invalid("route", name, "appears twice in one batch of changes"));
            }
            match c {
                RouteChange::Upsert(r) => r.validate()?,
                RouteChange::Remove(h) => {
                    if seen.iter().any(|(host, path)| *host == h && path.is_some()) {
                        return Err(Error::invalid("route", h.as_str(), "appears twice in one batch of changes"));
                    }
                    whole_hosts.insert(h);
                    if !self.hosts.contains_key(h) {
                        return Err(Error::NotFound { kind: "route", name: h.to_string() });
                    }
                }
                RouteChange::RemovePath(h, p) if self.get(h, p).is_none() => {
                    return Err(Error::NotFound { kind: "route", name: format!("{h}{p}") })
                }
                RouteChange::RemovePath(..) => {}
            }
        }
        let mut hosts = self.hosts.clone();
        let mut len = self.len;
        for c in changes {
            match c {
                RouteChange::Upsert(r) => {
                    let routes = hosts.get(&r.host);
                    let old = routes.and_then(|rs| rs.get(&r.path));
                    let cursor = old.map(|e| e.cursor.clone()).unwrap_or_default();
                    // What the balancer learned about an endpoint follows its id.
                    let stats = r.endpoints.iter().map(|e| old.and_then(|o| o.stats(&e.id)).cloned().unwrap_or_default()).collect();
                    let selector = Selector::build(&r.balancer, &r.endpoints);
                    let name = if r.path.as_str() == "/" { r.host.to_string() } else { format!("{}{}", r.host, r.path) };
                    let limiter = r.rate_limit.map(|limit| match old.and_then(|o| o.limiter.as_ref()) {
                        Some(kept) if kept.limit == limit => kept.clone(),
                        _ => Arc::new(RateLimiter::new(limit)),
                    });
                    len += usize::from(old.is_none());
                    let authorities = r.endpoints.iter().map(|e| authority(e.addr)).collect();
                    let entry = Arc::new(RouteEntry { route: r.clone(), selector, stats, authorities, cursor, name, limiter });
                    let next = HostRoutes::with(routes, entry);
                    hosts.insert(r.host.clone(), next);
                }
                RouteChange::Remove(h) => {
                    len -= hosts.remove(h).map_or(0, |r| r.len());
                }
                RouteChange::RemovePath(h, p) => {
                    if let Some(routes) = hosts.get(h) {
                        let next = routes.without(p);
                        len -= 1;
                        match next {
                            Some(next) => {
                                hosts.insert(h.clone(), next);
                            }
                            None => {
                                hosts.remove(h);
                            }
                        }
                    }
                }
            }
        }
        Ok(RouteTable { version: self.version + 1, hosts, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: &str, path: &str, id: &str) -> Route {
        let ep = Endpoint::new(id, SocketAddr::from(([127, 0, 0, 1], 9000)));
        Route::new(Host::new(host).expect("host"), vec![ep]).with_path(PathPrefix::new(path).expect("path"))
    }

    fn picked<'a>(t: &'a RouteTable, host: &str, path: &str) -> Option<&'a str> {
        t.lookup_path(host, path).map(|e| e.route().endpoints[0].id.as_str())
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let t = RouteTable::default()
            .apply(&[
                RouteChange::Upsert(route("a.test", "/", "root")),
                RouteChange::Upsert(route("a.test", "/api", "api")),
                RouteChange::Upsert(route("a.test", "/api/v2/", "v2")),
            ])
            .expect("apply");
        assert_eq!(t.len(), 3);
        assert_eq!(picked(&t, "a.test", "/"), Some("root"));
        assert_eq!(picked(&t, "a.test", "/apis"), Some("root"), "prefixes match whole segments");
        assert_eq!(picked(&t, "a.test", "/api"), Some("api"));
        assert_eq!(picked(&t, "a.test", "/api/v1/x"), Some("api"));
        assert_eq!(picked(&t, "a.test", "/api/v2"), Some("v2"), "a trailing slash in the prefix is dropped");
        assert_eq!(picked(&t, "a.test", "/api/v2/users"), Some("v2"));
        assert_eq!(t.lookup("a.test").map(RouteEntry::name), Some("a.test"));
        assert_eq!(t.lookup_path("a.test", "/api/x").map(RouteEntry::name), Some("a.test/api"));

        let t =
            t.apply(&[RouteChange::RemovePath(Host::new("a.test").expect("host"), PathPrefix::new("/api").expect("path"))]).expect("apply");
        assert_eq!(picked(&t, "a.test", "/api/v1/x"), Some("root"));
        assert_eq!(t.len(), 2);
        let t = t.apply(&[RouteChange::Remove(Host::new("a.test").expect("host"))]).expect("apply");
        assert!(t.is_empty() && picked(&t, "a.test", "/").is_none(), "Remove takes every prefix of the host");
    }

    #[test]
    fn wildcards_cover_one_label_and_yield_to_exact_hosts() {
        let t = RouteTable::default()
            .apply(&[
                RouteChange::Upsert(route("*.apps.test", "/", "wild")),
                RouteChange::Upsert(route("exact.apps.test", "/only", "exact")),
            ])
            .expect("apply");
        assert_eq!(picked(&t, "one.apps.test", "/x"), Some("wild"));
        assert_eq!(picked(&t, "a.b.apps.test", "/"), None, "one label only");
        assert_eq!(picked(&t, "apps.test", "/"), None, "the parent itself is not covered");
        assert_eq!(picked(&t, "exact.apps.test", "/only/x"), Some("exact"));
        assert_eq!(picked(&t, "exact.apps.test", "/other"), None, "an exact host does not fall back to the wildcard");
        assert!(Host::new("*.apps.test").expect("wildcard").is_wildcard());
    }

    #[test]
    fn bad_prefixes_and_conflicting_batches_are_rejected() {
        for bad in ["", "api", "/a//b", "/a/../b", "/a/./b", "/a?x", "/a%2f", "/a b", "/a\\b"] {
            assert!(matches!(PathPrefix::new(bad), Err(Error::InvalidInput { .. })), "{bad:?} accepted");
        }
        for bad in ["*", "a.*.test", "**.test", "*.", "*a.test"] {
            assert!(matches!(Host::new(bad), Err(Error::InvalidInput { .. })), "{bad:?} accepted");
        }
        let t = RouteTable::default().apply(&[RouteChange::Upsert(route("a.test", "/", "r"))]).expect("apply");
        let host = Host::new("a.test").expect("host");
        let twice = [RouteChange::Upsert(route("a.test", "/x", "x")), RouteChange::Remove(host.clone())];
        assert!(matches!(t.apply(&twice), Err(Error::InvalidInput { .. })), "a path change and a whole-host removal conflict");
        assert!(matches!(t.apply(&[RouteChange::RemovePath(host, PathPrefix::new("/nope").expect("path"))]), Err(Error::NotFound { .. })));
        assert_eq!(t.len(), 1, "failed batches change nothing");
    }
}
