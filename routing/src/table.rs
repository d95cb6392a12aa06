//! Routes and the immutable route table that the proxy reads on every request.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::balance::{Balancer, EndpointStats, Selector};
use crate::error::{Error, Result};

/// A route host: a DNS name, lower-cased, without port.
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
        for label in lower.split('.') {
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

/// Requests for `host` go to `endpoints`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The host it serves.
    pub host: Host,
    /// Upstream servers.
    pub endpoints: Vec<Endpoint>,
    /// How requests are spread over them (default round robin).
    #[serde(default)]
    pub balancer: Balancer,
    /// What the endpoints speak (default HTTP/1.1).
    #[serde(default)]
    pub upstream: UpstreamProtocol,
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
        Route { host, endpoints, balancer: Balancer::RoundRobin, upstream: UpstreamProtocol::Http1 }
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

/// One change to the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteChange {
    /// Adds a route or replaces the one for its host.
    Upsert(Route),
    /// Removes the route for a host.
    Remove(Host),
}

impl RouteChange {
    fn host(&self) -> &Host {
        match self {
            RouteChange::Upsert(r) => &r.host,
            RouteChange::Remove(h) => h,
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
    /// Rotation position, shared with the entry that replaces this one.
    cursor: Arc<AtomicUsize>,
}

/// An endpoint chosen for a request, with its live state.
#[derive(Debug)]
pub struct Picked<'a> {
    /// The endpoint.
    pub endpoint: &'a Endpoint,
    /// Its state; wrap the request in [`crate::InFlight`] to keep it current.
    pub stats: Arc<EndpointStats>,
}

impl RouteEntry {
    /// The route.
    pub fn route(&self) -> &Route {
        &self.route
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
        Some(Picked { endpoint: &self.route.endpoints[i], stats: self.stats[i].clone() })
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

/// An immutable snapshot of every route. The proxy reads one per request; updates build
/// a new table and swap it in.
#[derive(Debug, Default)]
pub struct RouteTable {
    version: u64,
    // A persistent (structurally shared) map: `apply` copies only the path to the
    // changed entries, so a delta costs O(changes × log routes), not O(routes), and old
    // snapshots held by in-flight requests stay valid.
    routes: imbl::HashMap<Host, Arc<RouteEntry>>,
}

impl RouteTable {
    /// The table's version; each applied batch increments it.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The route for `host` (already lower-cased and without port).
    pub fn lookup(&self, host: &str) -> Option<&RouteEntry> {
        self.routes.get(host).map(AsRef::as_ref)
    }

    /// Every route, sorted by host.
    pub fn routes(&self) -> Vec<&Route> {
        let mut all: Vec<&Route> = self.routes.values().map(|e| &e.route).collect();
        all.sort_by(|a, b| a.host.cmp(&b.host));
        all
    }

    /// How many routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// A new table with `changes` applied, all or nothing. Cost is proportional to the
    /// changes (times log of the table size); untouched entries are shared with `self`.
    pub fn apply(&self, changes: &[RouteChange]) -> Result<RouteTable> {
        let mut seen = std::collections::HashSet::new();
        for c in changes {
            if !seen.insert(c.host()) {
                return Err(Error::invalid("route host", c.host().as_str(), "appears twice in one batch of changes"));
            }
            match c {
                RouteChange::Upsert(r) => r.validate()?,
                RouteChange::Remove(h) if !self.routes.contains_key(h) => {
                    return Err(Error::NotFound { kind: "route", name: h.to_string() })
                }
                RouteChange::Remove(_) => {}
            }
        }
        let mut routes = self.routes.clone();
        for c in changes {
            match c {
                RouteChange::Upsert(r) => {
                    let old = routes.get(&r.host);
                    let cursor = old.map(|e| e.cursor.clone()).unwrap_or_default();
                    // What the balancer learned about an endpoint follows its id.
                    let stats = r.endpoints.iter().map(|e| old.and_then(|o| o.stats(&e.id)).cloned().unwrap_or_default()).collect();
                    let selector = Selector::build(&r.balancer, &r.endpoints);
                    routes.insert(r.host.clone(), Arc::new(RouteEntry { route: r.clone(), selector, stats, cursor }));
                }
                RouteChange::Remove(h) => {
                    routes.remove(h);
                }
            }
        }
        Ok(RouteTable { version: self.version + 1, routes })
    }
}
