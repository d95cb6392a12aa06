//! `dns-vs-dnsmasq`: keelson's DNS server against dnsmasq serving the same records, with
//! the same load generator in the same run. Each server runs in its own process pinned
//! to CPU 0; the load generator is pinned to CPU 1 (where `taskset` exists), so neither
//! steals the other's core. Every answer is checked; a wrong one makes the run fail.
//!
//! Rounds are interleaved (keelson, dnsmasq, then keelson with two `SO_REUSEPORT` UDP
//! workers, unpinned); figures are medians. Beside queries per second, each server's CPU
//! per query (user + system, from `/proc/<pid>/stat`) and the generator's own CPU use
//! are reported: when the generator's core is near 100%, queries per second measure the
//! generator, and CPU per query is the figure that compares the servers.
//!
//! `cargo run --release -p keelson-benches --bin dns-vs-dnsmasq -- --seconds 5 --rounds 3`

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use keelson_benches::procstat::cpu_seconds;
use keelson_discovery::{Discovery, DnsServer, DnsServerConfig, MemoryDiscovery, Registration, ServiceName};
use keelson_testkit::dnsmasq::{DnsRecord, Dnsmasq};

#[derive(Parser, Debug)]
struct Args {
    /// Services, each with 3 instances.
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Seconds of load per server.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Queries in flight (closed loop).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Interleaved rounds; figures are medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Internal: run keelson's DNS server on this port and wait.
    #[arg(long, hide = true)]
    serve_keelson: Option<u16>,
    /// Internal: the served server's UDP workers.
    #[arg(long, hide = true, default_value_t = 1)]
    udp_workers: usize,
}

const DOMAIN: &str = "keelson.test";

fn ip(service: usize, instance: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 1 + (service / 250) as u8, (service % 250) as u8, 1 + instance as u8)
}

fn serve_keelson(port: u16, services: usize, udp_workers: usize) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let d = Arc::new(MemoryDiscovery::memory());
        let mut handles = Vec::new();
        for s in 0..services {
            let name = ServiceName::new(format!("svc{s}")).expect("name");
            for i in 0..3 {
                handles.push(
                    d.register(Registration::new(name.clone(), format!("i{i}"), ip(s, i).to_string(), 8000)).await.expect("register"),
                );
            }
        }
        let config = {
            let mut built = DnsServerConfig::default();
            built.domain = DOMAIN.into();
            built.ttl = 30;
            built.listen = SocketAddr::from(([127, 0, 0, 1], port));
            built.udp_workers = udp_workers;
            built
        };
        let _server = DnsServer::start(d, config).await.expect("server");
        println!("ready");
        std::future::pending::<()>().await;
    });
}

fn pin(pid: u32, cpu: u32) {
    if let Ok(taskset) = keelson_testkit::require("taskset", "util-linux") {
        let _ = Command::new(taskset).args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()]).stdout(Stdio::null()).status();
    }
}

#[derive(Default, Debug)]
struct Outcome {
    ok: u64,
    wrong: u64,
    timeouts: u64,
    latencies: Vec<Duration>,
    took: Duration,
}

/// The A query for every service, encoded once; only the id is patched per send.
fn encoded_queries(services: usize) -> Arc<Vec<Vec<u8>>> {
    Arc::new(
        (0..services)
            .map(|s| {
                let mut m = Message::query();
                m.metadata.recursion_desired = false;
                m.add_query(Query::query(Name::from_ascii(format!("svc{s}.service.{DOMAIN}.")).expect("name"), RecordType::A));
                m.to_vec().expect("encode")
            })
            .collect(),
    )
}

/// Checks an answer from its bytes: our id, NOERROR, exactly 3 answers, and each of the
/// service's 3 addresses present. Cheap enough that the load generator stays ahead of
/// the servers (a full decode per answer made the generator the bottleneck).
fn answer_ok(resp: &[u8], id: u16, service: usize) -> bool {
    resp.len() > 12
        && u16::from_be_bytes([resp[0], resp[1]]) == id
        && resp[3] & 0x0f == 0
        && u16::from_be_bytes([resp[6], resp[7]]) == 3
        && (0..3).all(|i| {
            let want = ip(service, i).octets();
            resp.windows(4).any(|w| w == want)
        })
}

/// Closed-loop load: `concurrency` sockets, each sending an A query and waiting for the
/// answer, over all service names, for `seconds`.
async fn load(server: SocketAddr, services: usize, seconds: u64, concurrency: usize) -> Outcome {
    let queries = encoded_queries(services);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let queries = queries.clone();
        tasks.push(tokio::spawn(async move {
            let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
            sock.connect(server).await.expect("connect");
            let mut out = Outcome::default();
            let mut buf = vec![0u8; 4096];
            let mut query = Vec::with_capacity(128);
            let mut n = worker;
            let mut id: u16 = (worker as u16).wrapping_mul(977);
            while Instant::now() < deadline {
                let s = n % services;
                n += concurrency;
                id = id.wrapping_add(1);
                query.clear();
                query.extend_from_slice(&queries[s]);
                query[..2].copy_from_slice(&id.to_be_bytes());
                let t = Instant::now();
                if sock.send(&query).await.is_err() {
                    out.timeouts += 1;
                    continue;
                }
                match tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf)).await {
                    Ok(Ok(len)) if answer_ok(&buf[..len], id, s) => {
                        out.ok += 1;
                        out.latencies.push(t.elapsed());
                    }
                    Ok(Ok(_)) => out.wrong += 1,
                    _ => out.timeouts += 1,
                }
            }
            out
        }));
    }
    let mut total = Outcome::default();
    for t in tasks {
        let o = t.await.expect("worker");
        total.ok += o.ok;
        total.wrong += o.wrong;
        total.timeouts += o.timeouts;
        total.latencies.extend(o.latencies);
    }
    total.took = start.elapsed();
    total.latencies.sort();
    total
}

fn pct(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// One run's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    qps: f64,
    p99_us: f64,
    /// Server CPU (user + system) per query, microseconds.
    cpu_us: f64,
    /// The generator's CPU use over the run, in cores (1.0: its core was saturated).
    generator: f64,
}

/// Loads `server` (process `pid`) and measures it.
fn measure(rt: &tokio::runtime::Runtime, server: SocketAddr, pid: u32, args: &Args) -> (Figures, u64) {
    let me = std::process::id();
    let (cpu0, gen0) = (cpu_seconds(pid), cpu_seconds(me));
    let o = rt.block_on(load(server, args.services, args.seconds, args.concurrency));
    let (cpu1, gen1) = (cpu_seconds(pid), cpu_seconds(me));
    let took = o.took.as_secs_f64();
    let figures = Figures {
        qps: o.ok as f64 / took,
        p99_us: pct(&o.latencies, 0.99).as_secs_f64() * 1e6,
        cpu_us: (cpu1 - cpu0) / (o.ok.max(1) as f64) * 1e6,
        generator: (gen1 - gen0) / took,
    };
    if o.timeouts > 0 {
        println!("  ({} timeouts)", o.timeouts);
    }
    (figures, o.wrong)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn print_figures(name: &str, f: &Figures) {
    println!(
        "{name:<22} {:>9.0} queries/s  p99 {:>7.1} us  server CPU {:>5.2} us/query  generator {:>3.0}% of a core",
        f.qps,
        f.p99_us,
        f.cpu_us,
        f.generator * 100.0
    );
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(port) = args.serve_keelson {
        serve_keelson(port, args.services, args.udp_workers);
        return ExitCode::SUCCESS;
    }
    pin(std::process::id(), 1);

    // keelson, in its own processes: one UDP worker pinned to CPU 0 like dnsmasq, and two
    // SO_REUSEPORT workers free to use both cores (which the generator shares).
    let start_keelson = |workers: usize| -> (Child, u16) {
        let port = keelson_testkit::free_port().expect("port");
        let me = std::env::current_exe().expect("own path");
        let mut child: Child = Command::new(me)
            .args(["--serve-keelson", &port.to_string(), "--services", &args.services.to_string()])
            .args(["--udp-workers", &workers.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("keelson server starts");
        let mut ready = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().expect("stdout")), &mut ready).expect("ready line");
        (child, port)
    };
    let (mut one, one_port) = start_keelson(1);
    pin(one.id(), 0);
    let (mut two, two_port) = start_keelson(2);

    // dnsmasq with the same records.
    let mut records = Vec::new();
    for s in 0..args.services {
        for i in 0..3 {
            records.push(DnsRecord::A { name: format!("svc{s}.service.{DOMAIN}"), ip: ip(s, i) });
        }
    }
    let dnsmasq = Dnsmasq::start(&records, 30).expect("dnsmasq starts");
    pin(dnsmasq.pid(), 0);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    println!(
        "{} services x 3 instances, {} rounds of {} s per server, {} queries in flight, A queries",
        args.services, args.rounds, args.seconds, args.concurrency
    );
    let servers: [(&str, SocketAddr, u32); 3] = [
        ("keelson (1 worker)", SocketAddr::from(([127, 0, 0, 1], one_port)), one.id()),
        ("dnsmasq", dnsmasq.addr(), dnsmasq.pid()),
        ("keelson (2 reuseport)", SocketAddr::from(([127, 0, 0, 1], two_port)), two.id()),
    ];
    let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); servers.len()];
    let mut wrong = 0;
    for round in 0..args.rounds {
        for (i, (name, addr, pid)) in servers.iter().enumerate() {
            let (f, w) = measure(&rt, *addr, *pid, &args);
            print_figures(&format!("round {} {name}", round + 1), &f);
            runs[i].push(f);
            wrong += w;
        }
    }
    let medians: Vec<Figures> = runs
        .iter()
        .map(|r| Figures {
            qps: median(r.iter().map(|f| f.qps).collect()),
            p99_us: median(r.iter().map(|f| f.p99_us).collect()),
            cpu_us: median(r.iter().map(|f| f.cpu_us).collect()),
            generator: median(r.iter().map(|f| f.generator).collect()),
        })
        .collect();
    println!("medians:");
    for ((name, _, _), f) in servers.iter().zip(&medians) {
        print_figures(name, f);
    }
    let (k, d, r) = (&medians[0], &medians[1], &medians[2]);
    println!("ratio qps keelson/dnsmasq: {:.2}", k.qps / d.qps.max(1.0));
    println!("ratio p99 keelson/dnsmasq: {:.2}", k.p99_us / d.p99_us.max(1e-9));
    println!("ratio CPU per query keelson/dnsmasq: {:.2}", k.cpu_us / d.cpu_us.max(1e-9));
    println!("ratio qps keelson 2 reuseport/dnsmasq: {:.2}", r.qps / d.qps.max(1.0));
    for child in [&mut one, &mut two] {
        let _ = child.kill();
        let _ = child.wait();
    }
    if wrong > 0 {
        println!("wrong answers: {wrong}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
