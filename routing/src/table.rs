//! Routes and the immutable route table that the proxy reads on every request.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use crate::balance::{EndpointStats, Selector};
use crate::error::{Error, Result};
use crate::rate_limit::RateLimiter;
use crate::route::{Endpoint, Host, PathPrefix, Route, RouteChange};

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
    /// `host` or `host/path`: the route's label in metrics and messages (shared, so
    /// each request that names its route copies a pointer, not the string).
    name: Arc<str>,
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

    pub(crate) fn shared_name(&self) -> Arc<str> {
        self.name.clone()
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
                    let name: Arc<str> =
                        if r.path.as_str() == "/" { r.host.to_string().into() } else { format!("{}{}", r.host, r.path).into() };
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
