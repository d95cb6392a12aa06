//! A DNS server that serves any [`Discovery`] (feature `dns-server`, hickory-server).
//!
//! Names, under the configured domain:
//! - `<service>.service.<domain>`: A / AAAA of the healthy instances, and SRV;
//! - `_<service>._tcp.<domain>`: SRV;
//! - `<instance>.<service>.service.<domain>`: A / AAAA of one instance (the SRV targets,
//!   sent as additional records too, so clients need no second lookup);
//! - fixed names set in [`DnsServerConfig::hosts`] (the apex among them, as `@`): A / AAAA
//!   of the addresses given, like a load balancer in front of the services.
//!
//! The server is authoritative for the zone (RFC 1034, 2308, 8020): the apex answers SOA
//! and NS (`ns.<domain>`, whose address is the listen address or the configured one);
//! a name that exists only because names exist below it (`service.<domain>`,
//! `_tcp.<domain>`) and a name asked for a type it does not have answer NOERROR with no
//! records (NODATA), never NXDOMAIN, which resolvers may take to mean that nothing below
//! exists; and every negative answer carries the zone's SOA in its authority section,
//! with the configured negative TTL, so resolvers can cache it.
//!
//! Answers come from an in-memory snapshot kept current by a discovery watch: no backend
//! call per query, and a backend outage keeps the last good catalog. The TTL is the
//! configured one (never derived from backend data). Names outside the domain get
//! REFUSED: this is not a recursive resolver and cannot be used for amplification. UDP
//! answers larger than the client's payload size are truncated with the TC bit set, so
//! the client retries over TCP, where the whole answer fits.
//!
//! UDP is served by [`udp`]'s fast path (answers pre-encoded in wire format, batched
//! system calls, optionally several `SO_REUSEPORT` workers); TCP by hickory-server. Both
//! decide what to answer with [`decide`].

mod udp;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::StreamExt;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, NS, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use tokio::task::JoinHandle;

use crate::discovery::{Discovery, Instance, Query};
use crate::error::{Error, Result};
use crate::name::validate_label;

/// DNS server settings.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DnsServerConfig {
    /// The zone served, like `keelson.test` (default `keelson`).
    pub domain: String,
    /// TTL of every answer, in seconds (default 5).
    pub ttl: u32,
    /// UDP and TCP listen address (default `127.0.0.1:8600`).
    pub listen: SocketAddr,
    /// Idle timeout of TCP connections (default 5 s).
    pub tcp_timeout: Duration,
    /// How long resolvers may cache a negative answer (NXDOMAIN or NODATA), in seconds:
    /// the SOA's minimum and the TTL of the SOA sent with it (default 5).
    pub negative_ttl: u32,
    /// The address `ns.<domain>` (the zone's NS) resolves to (default: the listen
    /// address, unless that is unspecified, then 127.0.0.1).
    pub ns_address: Option<IpAddr>,
    /// UDP sockets, each served by its own thread (default 1). More than one binds them
    /// all with `SO_REUSEPORT`, and the kernel spreads clients over them.
    pub udp_workers: usize,
    /// Fixed names in the zone and their addresses, beside the catalog's: `www` is
    /// `www.<domain>`, `@` the apex itself (default none). A name may not be under
    /// `service.` or `_tcp.`, which the catalog owns, nor `ns`, the zone's NS.
    pub hosts: Vec<(String, IpAddr)>,
}

impl Default for DnsServerConfig {
    fn default() -> Self {
        DnsServerConfig {
            domain: "keelson".into(),
            ttl: 5,
            listen: SocketAddr::from(([127, 0, 0, 1], 8600)),
            tcp_timeout: Duration::from_secs(5),
            negative_ttl: 5,
            ns_address: None,
            udp_workers: 1,
            hosts: Vec::new(),
        }
    }
}

/// Every answer the server can give, built when discovery changes, so that a query
/// costs one hash lookup (no parsing, no record building on the request path).
#[derive(Debug, Default)]
struct Catalog {
    answers: HashMap<(LowerName, RecordType), Answer>,
    /// Names that exist, with records or as parents of names that have some (NOERROR
    /// with no data instead of NXDOMAIN).
    names: HashSet<LowerName>,
    /// The zone's SOA, sent in the authority section of negative answers.
    soa: Option<Record>,
    /// Every answer above, encoded for the UDP fast path.
    wire: udp::WireAnswers,
}

/// What the zone says to a query.
enum Decision<'a> {
    /// Another zone: this server is not a recursive resolver.
    Refused,
    Answer(&'a Answer),
    /// NXDOMAIN, or NOERROR with no data for a name that exists; the SOA goes with it.
    Negative(ResponseCode),
}

/// The type a query is answered with: ANY gets the SRV records (which carry the
/// addresses too), everything else itself.
fn answered_as(qtype: RecordType) -> RecordType {
    match qtype {
        RecordType::ANY => RecordType::SRV,
        t => t,
    }
}

/// The one place that decides an answer, for UDP and TCP alike.
fn decide<'a>(catalog: &'a Catalog, domain: &LowerName, qname: &LowerName, qtype: RecordType) -> Decision<'a> {
    if !domain.zone_of(qname) {
        return Decision::Refused;
    }
    match catalog.answers.get(&(qname.clone(), answered_as(qtype))) {
        Some(answer) => Decision::Answer(answer),
        None if catalog.names.contains(qname) => Decision::Negative(ResponseCode::NoError),
        None => Decision::Negative(ResponseCode::NXDomain),
    }
}

/// What the zone itself holds, beside the services: its apex, SOA and NS.
#[derive(Clone, Debug)]
struct Zone {
    apex: Name,
    ttl: u32,
    negative_ttl: u32,
    ns_address: IpAddr,
    /// Fixed names with their addresses ([`DnsServerConfig::hosts`]), checked.
    hosts: Vec<(Name, IpAddr)>,
}

#[derive(Debug, Default)]
struct Answer {
    records: Vec<Record>,
    additional: Vec<Record>,
}

#[derive(Debug)]
struct Handler {
    catalog: Arc<ArcSwap<Catalog>>,
    domain: LowerName,
}

/// A running DNS server; [`DnsServer::shutdown`] stops it.
pub struct DnsServer {
    addr: SocketAddr,
    server: Server<Handler>,
    udp: udp::UdpWorkers,
    watcher: JoinHandle<()>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer").field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// A DNS label for an instance id: lower-case, anything outside `a-z0-9-` becomes `-`.
pub fn instance_label(id: &str) -> String {
    let mut s: String = id.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).take(63).collect();
    while s.starts_with('-') {
        s.remove(0);
    }
    while s.ends_with('-') {
        s.pop();
    }
    if s.is_empty() {
        "instance".to_owned()
    } else {
        s
    }
}

fn address_record(name: Name, ip: IpAddr, ttl: u32) -> Record {
    match ip {
        IpAddr::V4(v4) => Record::from_rdata(name, ttl, RData::A(A(v4))),
        IpAddr::V6(v6) => Record::from_rdata(name, ttl, RData::AAAA(AAAA(v6))),
    }
}

fn build_catalog(instances: Vec<Instance>, zone: &Zone, serial: u32) -> Catalog {
    let (domain, ttl) = (&zone.apex, zone.ttl);
    let mut services: HashMap<String, Vec<Instance>> = HashMap::new();
    for i in instances.into_iter().filter(|i| i.health.is_healthy()) {
        services.entry(i.service.to_string()).or_default().push(i);
    }
    let mut catalog = Catalog::default();
    let name = |s: String| Name::from_ascii(s).ok();
    for (service, instances) in services {
        let (Some(svc_name), Some(tcp_name)) = (name(format!("{service}.service.{domain}")), name(format!("_{service}._tcp.{domain}")))
        else {
            continue;
        };
        let mut addresses: Vec<Record> = Vec::new();
        let mut srv = Answer::default();
        let mut srv_tcp = Answer::default();
        for i in &instances {
            let Ok(ip) = i.address.parse::<IpAddr>() else { continue };
            let Some(target) = name(format!("{}.{service}.service.{domain}", instance_label(&i.id))) else { continue };
            addresses.push(address_record(svc_name.clone(), ip, ttl));
            let glue = address_record(target.clone(), ip, ttl);
            srv.records.push(Record::from_rdata(svc_name.clone(), ttl, RData::SRV(SRV::new(1, 1, i.port, target.clone()))));
            srv_tcp.records.push(Record::from_rdata(tcp_name.clone(), ttl, RData::SRV(SRV::new(1, 1, i.port, target.clone()))));
            srv.additional.push(glue.clone());
            srv_tcp.additional.push(glue.clone());
            let key = LowerName::from(target.clone());
            catalog.names.insert(key.clone());
            let rtype = glue.record_type();
            catalog.answers.entry((key, rtype)).or_default().records.push(glue);
        }
        for (n, answer) in [(&svc_name, srv), (&tcp_name, srv_tcp)] {
            let key = LowerName::from(n.clone());
            catalog.names.insert(key.clone());
            catalog.answers.insert((key, RecordType::SRV), answer);
        }
        let svc_key = LowerName::from(svc_name.clone());
        for r in addresses {
            let rtype = r.record_type();
            catalog.answers.entry((svc_key.clone(), rtype)).or_default().records.push(r);
        }
    }
    add_apex(&mut catalog, zone, serial);
    for (name, ip) in &zone.hosts {
        let record = address_record(name.clone(), *ip, ttl);
        let key = LowerName::from(name.clone());
        catalog.names.insert(key.clone());
        catalog.answers.entry((key, record.record_type())).or_default().records.push(record);
    }
    // Every name between a name that exists and the apex exists too (an empty
    // non-terminal): NODATA there, never NXDOMAIN (RFC 8020).
    let apex = LowerName::from(domain.clone());
    let mut parents = Vec::new();
    for name in &catalog.names {
        let mut n = name.base_name();
        while apex.zone_of(&n) && n != apex {
            parents.push(n.clone());
            n = n.base_name();
        }
    }
    catalog.names.extend(parents);
    catalog.wire = udp::WireAnswers::build(&catalog);
    catalog
}

/// The apex's SOA and NS, and the NS's address.
fn add_apex(catalog: &mut Catalog, zone: &Zone, serial: u32) {
    let apex = zone.apex.clone();
    let (Ok(ns), Ok(hostmaster)) =
        (Name::from_ascii("ns").and_then(|n| n.append_domain(&apex)), Name::from_ascii("hostmaster").and_then(|n| n.append_domain(&apex)))
    else {
        return;
    };
    // Refresh, retry and expire matter only to secondaries, which this server has none of.
    let soa = SOA::new(ns.clone(), hostmaster, serial, 3600, 600, 86_400, zone.negative_ttl);
    // RFC 2308 section 5: a negative answer is cached for the SOA's TTL or its minimum,
    // whichever is less: both are the negative TTL.
    let soa = Record::from_rdata(apex.clone(), zone.negative_ttl, RData::SOA(soa));
    let key = LowerName::from(apex.clone());
    catalog.names.insert(key.clone());
    catalog.answers.insert((key.clone(), RecordType::SOA), Answer { records: vec![soa.clone()], additional: Vec::new() });
    let glue = address_record(ns.clone(), zone.ns_address, zone.ttl);
    let ns_record = Record::from_rdata(apex, zone.ttl, RData::NS(NS(ns.clone())));
    catalog.answers.insert((key, RecordType::NS), Answer { records: vec![ns_record], additional: vec![glue.clone()] });
    let ns_key = LowerName::from(ns);
    catalog.names.insert(ns_key.clone());
    catalog.answers.insert((ns_key, glue.record_type()), Answer { records: vec![glue], additional: Vec::new() });
    catalog.soa = Some(soa);
}

/// The full name of a fixed host in the zone (`@` is the apex), refusing names the
/// catalog or the zone's NS own.
fn host_name(name: &str, apex: &Name) -> Result<Name> {
    let relative = name.trim_end_matches('.').to_ascii_lowercase();
    if relative == "@" {
        return Ok(apex.clone());
    }
    let invalid = |reason: &str| Error::invalid("dns host", name, reason.to_owned());
    for label in relative.split('.') {
        validate_label("dns host", label)?;
    }
    let top = relative.rsplit('.').next().unwrap_or_default();
    if top == "service" || relative == "ns" {
        return Err(invalid("names under service. belong to the catalog, ns to the zone"));
    }
    Name::from_ascii(&relative).and_then(|n| n.append_domain(apex)).map_err(|e| invalid(&e.to_string()))
}

impl DnsServer {
    /// Binds UDP and TCP on `config.listen` (port 0 picks a free port for both), takes
    /// the first snapshot of `discovery`, and starts serving.
    pub async fn start(discovery: Arc<dyn Discovery>, config: DnsServerConfig) -> Result<DnsServer> {
        let domain = config.domain.trim_end_matches('.').to_ascii_lowercase();
        for label in domain.split('.') {
            validate_label("dns domain", label)?;
        }
        let domain = Name::from_ascii(format!("{domain}.")).map_err(|e| Error::invalid("dns domain", &config.domain, e.to_string()))?;
        if config.udp_workers == 0 {
            return Err(Error::invalid("dns udp_workers", "0", "must be at least 1".to_owned()));
        }
        if !discovery.capabilities().query_all_services {
            return Err(Error::Unsupported { operation: "watching every service (needed to serve DNS)", backend: discovery.backend() });
        }
        let ns_address = config.ns_address.unwrap_or(match config.listen.ip() {
            ip if ip.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
            ip => ip,
        });
        let hosts = config.hosts.iter().map(|(name, ip)| Ok((host_name(name, &domain)?, *ip))).collect::<Result<Vec<_>>>()?;
        let zone = Zone { apex: domain.clone(), ttl: config.ttl, negative_ttl: config.negative_ttl, ns_address, hosts };
        let mut snapshots = discovery.watch(Query::all()).await?;
        let first = snapshots.next().await.map(|s| s.instances).unwrap_or_default();
        // The SOA serial counts catalog changes from the start time, so it grows across
        // restarts too (RFC 1982 arithmetic leaves room for decades of changes).
        let mut serial =
            u32::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(1))
                .unwrap_or(1);
        let catalog = Arc::new(ArcSwap::from_pointee(build_catalog(first, &zone, serial)));
        let feed = catalog.clone();
        let watcher = tokio::spawn(async move {
            // The watch retries backend errors itself and never empties the view because
            // of one (an error snapshot carries the last good instances), so the catalog
            // only ever holds real data.
            while let Some(snapshot) = snapshots.next().await {
                serial = serial.wrapping_add(1);
                feed.store(Arc::new(build_catalog(snapshot.instances, &zone, serial)));
            }
        });
        let io = |e: std::io::Error| Error::Unavailable { backend: "dns-server", reason: format!("binding {}: {e}", config.listen) };
        // Port 0 picks a port free for UDP, which TCP may hold already: pick again.
        let mut attempts = 0;
        let (sockets, addr, tcp) = loop {
            let sockets = udp::bind(config.listen, config.udp_workers).map_err(io)?;
            let addr = sockets[0].local_addr().map_err(io)?;
            match tokio::net::TcpListener::bind(addr).await {
                Ok(tcp) => break (sockets, addr, tcp),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && config.listen.port() == 0 && attempts < 32 => attempts += 1,
                Err(e) => return Err(io(e)),
            }
        };
        let domain = LowerName::from(domain);
        let udp = udp::UdpWorkers::start(sockets, catalog.clone(), domain.clone()).map_err(io)?;
        let mut server = Server::new(Handler { catalog, domain });
        server.register_listener(tcp, config.tcp_timeout, 64);
        tracing::info!(%addr, udp_workers = config.udp_workers.max(1), "DNS server serving discovery");
        Ok(DnsServer { addr, server, udp, watcher })
    }

    /// Where it listens (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and following discovery.
    pub async fn shutdown(mut self) {
        self.watcher.abort();
        let udp = self.udp;
        let _ = tokio::task::spawn_blocking(move || udp.stop()).await;
        let _ = self.server.shutdown_gracefully().await;
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        let info = match request.request_info() {
            Ok(info) if request.metadata.op_code == OpCode::Query => info,
            Ok(_) => return send(&mut response, builder.error_msg(&request.metadata, ResponseCode::NotImp)).await,
            Err(_) => return send(&mut response, builder.error_msg(&request.metadata, ResponseCode::FormErr)).await,
        };
        let catalog = self.catalog.load();
        match decide(&catalog, &self.domain, info.query.name(), info.query.query_type()) {
            Decision::Refused => send(&mut response, builder.error_msg(&request.metadata, ResponseCode::Refused)).await,
            Decision::Answer(answer) => {
                metadata.authoritative = true;
                metadata.response_code = ResponseCode::NoError;
                send(&mut response, builder.build(metadata, answer.records.iter(), [], [], answer.additional.iter())).await
            }
            Decision::Negative(code) => {
                metadata.authoritative = true;
                metadata.response_code = code;
                send(&mut response, builder.build(metadata, [], [], catalog.soa.iter(), [])).await
            }
        }
    }
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    message: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    // Returned if sending fails (the client went away): the response we meant to send.
    let fallback = Header { metadata: *message.metadata(), counts: HeaderCounts::default() };
    match response.send_response(message).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "could not send DNS response");
            ResponseInfo::from(fallback)
        }
    }
}
