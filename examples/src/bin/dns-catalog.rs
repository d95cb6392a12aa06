//! `dns-catalog`: serve a service catalog over DNS.
//!
//! ```text
//! dns-catalog --domain keelson --listen 127.0.0.1:8600 --register web=web-1@127.0.0.1:8080
//! dig @127.0.0.1 -p 8600 web.service.keelson A
//! dig @127.0.0.1 -p 8600 _web._tcp.keelson SRV
//! ```
//!
//! The catalog lives in memory, or in etcd with `--etcd http://127.0.0.1:2379` (build
//! with `--features etcd`), where every keelson process registering in the same etcd
//! shows up. `--register` adds instances for as long as this process runs.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use keelson_discovery::{Discovery, DnsServer, DnsServerConfig, MemoryDiscovery, Registration, ServiceName};

#[derive(Parser, Debug)]
#[command(version, about = "Serve a keelson service catalog over DNS")]
struct Args {
    /// UDP and TCP listen address.
    #[arg(long, default_value = "127.0.0.1:8600")]
    listen: SocketAddr,
    /// The zone served.
    #[arg(long, default_value = "keelson")]
    domain: String,
    /// TTL of answers, in seconds.
    #[arg(long, default_value_t = 5)]
    ttl: u32,
    /// How long resolvers may cache a negative answer (NXDOMAIN or NODATA), in seconds:
    /// the zone SOA's minimum.
    #[arg(long, default_value_t = 5)]
    negative_ttl: u32,
    /// The address the zone's NS (`ns.<domain>`) resolves to (default: the listen address).
    #[arg(long)]
    ns_address: Option<std::net::IpAddr>,
    /// etcd (`--etcd` and its TLS and credential flags); without it the catalog is in
    /// memory.
    #[command(flatten)]
    etcd: keelson_examples::backends::EtcdArgs,
    /// Register `service=id@ip:port` (repeatable).
    #[arg(long, value_parser = parse_registration)]
    register: Vec<Registration>,
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
        let kv = etcd.connect().await?;
        Ok(Arc::new(keelson_discovery::KvDiscovery::new(Arc::new(kv))))
    }
    #[cfg(not(feature = "etcd"))]
    Err("this build has no etcd support: rebuild with `--features etcd` (needs protoc: apt-get install -y protobuf-compiler)".into())
}

#[tokio::main]
async fn main() -> ExitCode {
    keelson_examples::init_tracing();
    let args = Args::parse();
    let d = match discovery(&args.etcd).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("dns-catalog: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut handles = Vec::new();
    for reg in args.register {
        match d.register(reg).await {
            Ok(h) => handles.push(h),
            Err(e) => {
                eprintln!("dns-catalog: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut config = DnsServerConfig::default();
    config.domain = args.domain.clone();
    config.ttl = args.ttl;
    config.negative_ttl = args.negative_ttl;
    config.ns_address = args.ns_address;
    config.listen = args.listen;
    let server = match DnsServer::start(d, config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dns-catalog: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = server.local_addr();
    println!(
        "dns-catalog serving {} on {addr} -- try: dig @{} -p {} <service>.service.{} A",
        args.domain,
        addr.ip(),
        addr.port(),
        args.domain
    );
    let _ = tokio::signal::ctrl_c().await;
    server.shutdown().await;
    for h in handles {
        let _ = h.deregister().await;
    }
    ExitCode::SUCCESS
}
