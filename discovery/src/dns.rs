//! Read-only discovery from DNS (feature `dns`, hickory-resolver): the way to consume
//! services that something else publishes (Consul's DNS, CoreDNS, a zone file, keelson's
//! own [`crate::DnsServer`]).
//!
//! A service `web` under domain `example.test` is looked up as SRV `_web._tcp.example.test`,
//! then SRV `web.service.example.test` (Consul's form), then, if a default port is
//! configured, A/AAAA `web.example.test` on that port. SRV targets are resolved to
//! addresses explicitly, since resolvers may drop the additional section (hickory-dns
//! #872). A watch re-resolves when the records' TTL runs out (clamped to a floor and a
//! ceiling) and keeps the last good answer through errors. DNS cannot register, set
//! health or list every service: those return [`Error::Unsupported`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};

use crate::discovery::{
    Discovery, DiscoveryCapabilities, Health, Instance, Query, Registration, RegistrationHandle, Snapshot, SnapshotStream,
};
use crate::error::{Error, Result};
use crate::name::{validate_label, ServiceName};

const BACKEND: &str = "dns";

/// Where and how to look services up.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DnsConfig {
    /// Name servers to ask (UDP, then TCP for truncated answers).
    pub servers: Vec<SocketAddr>,
    /// The domain services live under (`example.test`).
    pub domain: String,
    /// Port for the A/AAAA fallback; `None` disables the fallback.
    pub default_port: Option<u16>,
    /// Bound on one query (default 2 s).
    pub timeout: Duration,
    /// Shortest time between re-resolutions of a watch (default 1 s).
    pub min_refresh: Duration,
    /// Longest time between re-resolutions of a watch (default 60 s).
    pub max_refresh: Duration,
}

impl DnsConfig {
    /// `servers` and `domain`, with defaults for the rest.
    pub fn new(servers: Vec<SocketAddr>, domain: impl Into<String>) -> Self {
        DnsConfig {
            servers,
            domain: domain.into(),
            default_port: None,
            timeout: Duration::from_secs(2),
            min_refresh: Duration::from_secs(1),
            max_refresh: Duration::from_secs(60),
        }
    }
}

/// `Discovery` backed by DNS lookups.
#[derive(Clone)]
pub struct DnsDiscovery {
    resolver: TokioResolver,
    config: DnsConfig,
    domain: String,
}

impl std::fmt::Debug for DnsDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsDiscovery").field("config", &self.config).finish_non_exhaustive()
    }
}

fn net_err(e: hickory_resolver::net::NetError) -> Error {
    Error::Unavailable { backend: BACKEND, reason: e.to_string() }
}

impl DnsDiscovery {
    /// A resolver asking `config.servers` directly (no system configuration, no hosts
    /// file, no cache: answers are as fresh as their TTL allows).
    pub fn new(config: DnsConfig) -> Result<Self> {
        if config.servers.is_empty() {
            return Err(Error::invalid("dns servers", "", "at least one name server is needed"));
        }
        let domain = config.domain.trim_end_matches('.').to_ascii_lowercase();
        for label in domain.split('.') {
            validate_label("dns domain", label)?;
        }
        if config.min_refresh.is_zero() || config.max_refresh < config.min_refresh {
            return Err(Error::invalid(
                "dns refresh",
                format!("{:?}..{:?}", config.min_refresh, config.max_refresh),
                "need 0 < min <= max",
            ));
        }
        let servers = config
            .servers
            .iter()
            .map(|s| {
                let mut udp = ConnectionConfig::udp();
                udp.port = s.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = s.port();
                NameServerConfig::new(s.ip(), true, vec![udp, tcp])
            })
            .collect();
        let mut opts = ResolverOpts::default();
        opts.timeout = config.timeout;
        opts.attempts = 1;
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ndots = 0;
        let resolver = Resolver::builder_with_config(ResolverConfig::from_name_servers(servers), TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(net_err)?;
        Ok(DnsDiscovery { resolver, config, domain })
    }

    /// Every instance of `service` and how long the answer is valid.
    pub async fn resolve(&self, service: &ServiceName) -> Result<(Vec<Instance>, Duration)> {
        for name in [format!("_{service}._tcp.{}.", self.domain), format!("{service}.service.{}.", self.domain)] {
            match self.resolver.lookup(name.as_str(), RecordType::SRV).await {
                Ok(lookup) => {
                    let ttl = lookup.valid_until().saturating_duration_since(Instant::now());
                    // Targets are resolved explicitly (the additional section may be
                    // dropped), concurrently, at most 32 at a time.
                    let targets: Vec<(String, u16)> = lookup
                        .answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::SRV(srv) => Some((srv.target.to_ascii(), srv.port)),
                            _ => None,
                        })
                        .collect();
                    let resolved: Vec<_> = futures::stream::iter(targets.into_iter().map(|(target, port)| async move {
                        let ips = self.resolver.lookup_ip(target.as_str()).await.map_err(net_err)?;
                        Ok::<_, Error>(
                            ips.iter()
                                .map(|ip| instance(service, &format!("{}:{port}", target.trim_end_matches('.')), ip, port))
                                .collect::<Vec<_>>(),
                        )
                    }))
                    .buffer_unordered(32)
                    .collect()
                    .await;
                    let mut out = Vec::new();
                    for r in resolved {
                        out.extend(r?);
                    }
                    if !out.is_empty() {
                        return Ok((sorted(out), ttl));
                    }
                }
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => {}
                Err(e) => return Err(net_err(e)),
            }
        }
        let Some(port) = self.config.default_port else { return Ok((Vec::new(), self.config.max_refresh)) };
        match self.resolver.lookup_ip(format!("{service}.{}.", self.domain).as_str()).await {
            Ok(ips) => {
                let ttl = ips.valid_until().saturating_duration_since(Instant::now());
                Ok((sorted(ips.iter().map(|ip| instance(service, &SocketAddr::new(ip, port).to_string(), ip, port)).collect()), ttl))
            }
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok((Vec::new(), self.config.max_refresh)),
            Err(e) => Err(net_err(e)),
        }
    }

    fn unsupported(operation: &'static str) -> Error {
        Error::Unsupported { operation, backend: BACKEND }
    }
}

fn instance(service: &ServiceName, id: &str, ip: IpAddr, port: u16) -> Instance {
    Instance {
        service: service.clone(),
        id: id.to_owned(),
        address: ip.to_string(),
        port,
        tags: Vec::new(),
        meta: BTreeMap::new(),
        health: Health::Passing,
    }
}

fn sorted(mut v: Vec<Instance>) -> Vec<Instance> {
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v.dedup_by(|a, b| a.id == b.id);
    v
}

fn service_of(query: &Query) -> Result<&ServiceName> {
    query.service.as_ref().ok_or(DnsDiscovery::unsupported("queries over every service (DNS cannot list services)"))
}

#[async_trait]
impl Discovery for DnsDiscovery {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> DiscoveryCapabilities {
        DiscoveryCapabilities::new(false, false, false)
    }

    async fn register(&self, _registration: Registration) -> Result<RegistrationHandle> {
        Err(Self::unsupported("register"))
    }

    async fn deregister(&self, _service: &ServiceName, _id: &str) -> Result<()> {
        Err(Self::unsupported("deregister"))
    }

    async fn set_health(&self, _service: &ServiceName, _id: &str, _health: Health) -> Result<()> {
        Err(Self::unsupported("set_health"))
    }

    async fn instances(&self, query: &Query) -> Result<Vec<Instance>> {
        let (all, _) = self.resolve(service_of(query)?).await?;
        Ok(all.into_iter().filter(|i| query.matches(i)).collect())
    }

    async fn services(&self) -> Result<Vec<ServiceName>> {
        Err(Self::unsupported("listing services"))
    }

    async fn watch(&self, query: Query) -> Result<SnapshotStream> {
        let service = service_of(&query)?.clone();
        // The first resolution happens here so a dead server fails the call.
        let (first, ttl) = self.resolve(&service).await?;
        let state = WatchState {
            dns: self.clone(),
            service,
            query,
            last: None,
            error: None,
            next_in: Duration::ZERO,
            pending: Some((first, ttl)),
            version: 0,
        };
        Ok(futures::stream::unfold(state, WatchState::next).boxed())
    }
}

struct WatchState {
    dns: DnsDiscovery,
    service: ServiceName,
    query: Query,
    last: Option<(Vec<Instance>, Option<String>)>,
    error: Option<String>,
    next_in: Duration,
    pending: Option<(Vec<Instance>, Duration)>,
    version: u64,
}

impl WatchState {
    async fn next(mut self) -> Option<(Snapshot, Self)> {
        let (min, max) = (self.dns.config.min_refresh, self.dns.config.max_refresh);
        loop {
            let (all, ttl) = match self.pending.take() {
                Some(p) => p,
                None => {
                    tokio::time::sleep(self.next_in).await;
                    match self.dns.resolve(&self.service).await {
                        Ok(r) => r,
                        Err(e) => {
                            // Keep the last answer; report the outage once; retry soon.
                            tracing::warn!(service = %self.service, error = %e, "DNS re-resolution failed; keeping the last answer");
                            self.next_in = min;
                            let first = self.error.is_none();
                            self.error = Some(e.to_string());
                            if let (true, Some((view, _))) = (first, self.last.clone()) {
                                self.last = Some((view.clone(), self.error.clone()));
                                return Some((Snapshot { version: self.version, instances: view, error: self.error.clone() }, self));
                            }
                            continue;
                        }
                    }
                }
            };
            self.next_in = ttl.clamp(min, max);
            self.error = None;
            let view: Vec<Instance> = all.into_iter().filter(|i| self.query.matches(i)).collect();
            let sent = (view, None);
            if self.last.as_ref() != Some(&sent) {
                self.version += 1;
                self.last = Some(sent.clone());
                return Some((Snapshot { version: self.version, instances: sent.0, error: None }, self));
            }
        }
    }
}
