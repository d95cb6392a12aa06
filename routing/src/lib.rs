//! Routing for keelson: route tables, the [`Router`] trait, and a reverse [`Proxy`] on
//! hyper: HTTP/1.1 and HTTP/2 (h2c, or ALPN behind TLS with certificates chosen by SNI
//! from a [`CertStore`]), WebSocket and other upgrades, gRPC to h2c upstreams.
//!
//! The table is an immutable [`RouteTable`] snapshot behind `arc-swap`
//! ([`MemoryRouter`]): the proxy reads it lock-free on every request, and changes build a
//! new table and swap it in, atomically per batch. Routes come from code, a
//! [`RoutesFile`], or a `Discovery` watch ([`follow_discovery`]) where instances carry the
//! tag `keelson.http.host=<host>`. Hosts may be `*.parent` wildcards and routes may serve
//! a path prefix (longest wins). [`TcpProxy`] serves TCP routes, by TLS server name
//! without decrypting or by listener, moving bytes with splice(2) on Linux; active health checks, rate limits, an access log
//! and Prometheus metrics are built in. With the `acme` feature, [`acme`] gets the
//! proxy's certificates from an ACME CA (Let's Encrypt) over HTTP-01, answered by the
//! proxy itself.
//!
//! ```
//! use std::sync::Arc;
//! use keelson_routing::{Endpoint, Host, MemoryRouter, Route, RouteChange, Router};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keelson_routing::Error> {
//! let router = Arc::new(MemoryRouter::new());
//! let host = Host::new("web.localhost")?;
//! let endpoints = vec![Endpoint::new("web-1", "127.0.0.1:8081".parse().unwrap()), Endpoint::new("web-2", "127.0.0.1:8082".parse().unwrap())];
//! router.apply(vec![RouteChange::Upsert(Route::new(host, endpoints))]).await?;
//! let table = router.snapshot();
//! let route = table.lookup("web.localhost").expect("route");
//! assert_ne!(route.pick().unwrap().id, route.pick().unwrap().id, "round robin");
//! // A path prefix on the same host: longest prefix wins, on segment boundaries.
//! let api = Route::new(Host::new("web.localhost")?, vec![Endpoint::new("api-1", "127.0.0.1:9000".parse().unwrap())])
//!     .with_path(keelson_routing::PathPrefix::new("/api")?);
//! router.apply(vec![RouteChange::Upsert(api)]).await?;
//! let table = router.snapshot();
//! assert_eq!(table.lookup_path("web.localhost", "/api/users").map(|r| r.name()), Some("web.localhost/api"));
//! assert_eq!(table.lookup_path("web.localhost", "/apis").map(|r| r.name()), Some("web.localhost"));
//! // To serve it: Arc::new(Proxy::new(router, ProxyConfig::default())).serve(listener, shutdown).await
//! # Ok(())
//! # }
//! ```
//!
//! ## Feature flags
//!
#![doc = document_features::document_features!()]
// docs.rs (all features, --cfg docsrs) marks each backend item with the feature it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod access_log;
#[cfg(feature = "acme")]
pub mod acme;
mod active_health;
mod balance;
mod error;
mod metrics;
mod proxy;
mod rate_limit;
mod route;
mod router;
mod sources;
#[cfg(target_os = "linux")]
mod splice;
mod table;
mod tcp;
mod tls;
mod watched_body;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use access_log::{AccessLog, AccessRecord};
pub use active_health::{spawn_active_health, ActiveProbe};
pub use balance::{EndpointStats, InFlight, OutlierPolicy};
pub use error::{Error, Result};
pub use keelson_discovery::health::CheckConfig;
pub use proxy::{strip_hop_by_hop, Proxy, ProxyBody, ProxyConfig, ProxyHooks, RequestCtx, RequestSummary};
pub use rate_limit::RateLimit;
pub use route::{Balancer, Endpoint, Host, PathPrefix, Route, RouteChange, RouteKey, UpstreamProtocol};
pub use router::{MemoryRouter, Router, RouterCapabilities};
pub use sources::{
    follow_discovery, follow_discovery_tcp, follow_discovery_with, routes_from_instances, tcp_routes_from_instances, Reloaded, RoutesFile,
    RoutesFileSource, SourceStatus, TcpRoute, BALANCER_TAG, HTTP_HOST_TAG, HTTP_PATH_TAG, PROTOCOL_TAG, SNI_TAG, TCP_PORT_TAG, WEIGHT_TAG,
};
pub use table::{Picked, RouteEntry, RouteTable};
pub use tcp::{TcpProxy, TcpProxyConfig, TCP_DEFAULT_HOST};
pub use tls::CertStore;
pub use watched_body::{BodyError, BodyIdle};
