//! `dns-catalog`: serve a service catalog over DNS.
//!
//! ```text
//! dns-catalog --domain keelson --listen 127.0.0.1:8600 --register web=web-1@127.0.0.1:8080
//! dig @127.0.0.1 -p 8600 web.service.keelson A
//! dig @127.0.0.1 -p 8600 _web._tcp.keelson SRV
//! dns-catalog --domain cloud.test --host @=10.0.0.5 --host www=10.0.0.5   # fixed names too
//! ```
//!
//! The catalog lives in memory, or in etcd with `--etcd http://127.0.0.1:2379` (build
//! with `--features etcd`), where every keelson process registering in the same etcd
//! shows up. `--register` adds instances for as long as this process runs.
//!
//! Every flag is also `KEELSON_DNS_CATALOG_<FLAG>` and a key of `--config FILE` (TOML);
//! `--metrics-listen` serves `/metrics`, `/healthz` and `/readyz`. SIGTERM or SIGINT
//! stop serving, deregister `--register`ed instances and exit 0.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::{Discovery, DnsServer, DnsServerConfig, MemoryDiscovery, Registration, ServiceName};

#[derive(clap::Parser, Debug)]
#[command(version, about = "Serve a keelson service catalog over DNS")]
struct Args {
    /// UDP and TCP listen address.
    #[arg(long, default_value = "127.0.0.1:8600")]
    listen: SocketAddr,
    /// The zone served.
    #[arg(long, default_value = "keelson")]
    domain: String,
    /// TTL of answers (whole seconds on the wire).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// How long resolvers may cache a negative answer (NXDOMAIN or NODATA): the zone
    /// SOA's minimum.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    negative_ttl: Duration,
    /// The address the zone's NS (`ns.<domain>`) resolves to (default: the listen address).
    #[arg(long)]
    ns_address: Option<std::net::IpAddr>,
    /// A fixed name in the zone: `NAME=IP`, where `www` is `www.<domain>` and `@` the
    /// domain itself (repeatable), like a load balancer in front of the services.
    #[arg(long = "host", value_parser = parse_host)]
    hosts: Vec<(String, std::net::IpAddr)>,
    /// UDP sockets, a thread each; more than one share the port with SO_REUSEPORT.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    udp_workers: u16,
    /// etcd (`--etcd` and its TLS and credential flags); without it the catalog is in
    /// memory.
    #[command(flatten)]
    etcd: keelson_examples::backends::EtcdArgs,
    /// Register `service=id@ip:port` (repeatable).
    #[arg(long, value_parser = parse_registration)]
    register: Vec<Registration>,
    /// Serve /metrics, /healthz and /readyz on this address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    daemon: keelson_examples::daemon::DaemonArgs,
}

/// A TTL in the whole seconds DNS carries.
fn ttl_seconds(flag: &str, ttl: Duration) -> Result<u32, String> {
    u32::try_from(ttl.as_secs()).map_err(|_| format!("{flag} {}: too long for a DNS TTL", humantime::format_duration(ttl)))
}

fn parse_host(s: &str) -> Result<(String, std::net::IpAddr), String> {
    let (name, ip) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected NAME=IP"))?;
    let ip = ip.parse().map_err(|e| format!("address {ip:?}: {e}"))?;
    Ok((name.to_owned(), ip))
}

fn parse_registration(s: &str) -> Result<Registration, String> {
    let (service, rest) = s.split_once('=').ok_or("expected service=id@ip:port")?;
    let (id, addr) = rest.split_once('@').ok_or("expected service=id@ip:port")?;
    let addr: SocketAddr = addr.parse().map_err(|e| format!("address {addr:?}: {e}"))?;
    let service = ServiceName::new(service).map_err(|e| e.to_string())?;
    let reg = Registration::new(service, id, addr.ip().to_string(), addr.port());
    reg.validate().map_err(|e| e.to_string())?;
    Ok(reg)
}

async fn discovery(etcd: &keelson_examples::backends::EtcdArgs) -> Result<Arc<dyn Discovery>, String> {
    if !etcd.is_set() {
        return Ok(Arc::new(MemoryDiscovery::memory()));
    }
    #[cfg(feature = "etcd")]
    {
        let kv = etcd.connect_waiting().await?;
        Ok(Arc::new(keelson_discovery::KvDiscovery::new(Arc::new(kv))))
    }
    #[cfg(not(feature = "etcd"))]
    Err("this build has no etcd support: rebuild with `--features etcd` (needs protoc: apt-get install -y protobuf-compiler)".into())
}

async fn run(args: Args) -> Result<(), String> {
    let mut config = DnsServerConfig::default();
    config.domain = args.domain.clone();
    config.ttl = ttl_seconds("--ttl", args.ttl)?;
    config.negative_ttl = ttl_seconds("--negative-ttl", args.negative_ttl)?;
    config.ns_address = args.ns_address;
    config.hosts = args.hosts.clone();
    config.listen = args.listen;
    config.udp_workers = usize::from(args.udp_workers);
    let stop = keelson_examples::daemon::shutdown_signal()?;
    let d = discovery(&args.etcd).await?;
    let mut handles = Vec::new();
    for reg in args.register {
        handles.push(d.register(reg).await.map_err(|e| e.to_string())?);
    }
    let server = DnsServer::start(d, config).await.map_err(|e| e.to_string())?;
    let readiness = keelson_examples::metrics_http::Readiness::new();
    if let Some(addr) = args.metrics_listen {
        let registry = prometheus_client::registry::Registry::default();
        keelson_examples::daemon::serve_ops("--metrics-listen", addr, registry, "dns-catalog", readiness.clone()).await?;
    }
    let addr = server.local_addr();
    readiness.set_ready();
    println!(
        "dns-catalog serving {} on {addr} -- try: dig @{} -p {} <service>.service.{} A",
        args.domain,
        addr.ip(),
        addr.port(),
        args.domain
    );
    let signal = stop.await;
    readiness.set_not_ready("stopping");
    tracing::info!(?signal, "stopping");
    server.shutdown().await;
    for h in handles {
        if let Err(e) = h.deregister().await {
            tracing::warn!(error = %e, "deregistering on the way out");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = keelson_examples::daemon::start("dns-catalog", |a: &Args| &a.daemon);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dns-catalog: {e}");
            ExitCode::FAILURE
        }
    }
}
