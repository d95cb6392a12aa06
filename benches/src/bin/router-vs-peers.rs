//! `router-vs-peers`: keelson's `edge` against nginx and HAProxy (Debian's packages) as
//! reverse proxies in front of the same four backends, loaded by `wrk` in the same run.
//!
//! Setup, equal for every proxy: one worker (edge `--threads 1`, nginx
//! `worker_processes 1`, HAProxy `nbthread 1`), upstream keep-alive on, access logs off,
//! round robin over four backends (one nginx serving a fixed 200). The proxy is pinned
//! to CPU 0; wrk (one thread) and the backends to CPU 1. A run during which CPU 1 was
//! saturated measured the load generator, not the proxy: it is reported as void and left
//! out of the medians. Runs are interleaved (the order of the proxies rotates each
//! round) and each figure is the median of `--rounds` runs.
//!
//! Figures: keep-alive throughput; throughput with a new connection per request;
//! p99 at 50% and 80% of HAProxy's maximum keep-alive rate (wrk paced by a fixed delay
//! between requests on each connection), and a direct connection to one backend at 50%
//! for the added latency; resident memory idle and per idle keep-alive connection.
//! Every ratio is printed on its own line: `ratio <metric> keelson/<peer>: <value>`.
//!
//! `cargo run --release -p keelson-benches --bin router-vs-peers` (`--rounds`,
//! `--seconds`, `--connections` to change the load; about six minutes by default).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use keelson_benches::proxy_bench::{
    bench_main, edge_binary, loopback, median, spawn_pinned, start_backends, tool, wait_ready, write, wrk, BenchArgs, Fallible, Run,
    Server, HOST, LOAD_CPU, PROXY_CPU,
};

#[derive(Parser, Debug)]
#[command(about = "keelson's edge against nginx and HAProxy under wrk, pinned CPUs")]
struct Args {
    #[command(flatten)]
    common: BenchArgs,
    /// Client connections for the throughput runs.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Idle keep-alive connections opened for the memory figure.
    #[arg(long, default_value_t = 1000)]
    idle_connections: usize,
}

fn start_keelson(edge: &Path, dir: &Path, port: u16, backends: &[u16]) -> Fallible<Server> {
    let endpoints: Vec<String> =
        backends.iter().enumerate().map(|(i, p)| format!("{{\"id\": \"b{i}\", \"addr\": \"127.0.0.1:{p}\"}}")).collect();
    let routes = dir.join("routes.json");
    write(&routes, &format!("{{\"routes\": [{{\"host\": \"{HOST}\", \"endpoints\": [{}]}}]}}", endpoints.join(", ")))?;
    let listen = loopback(port).to_string();
    let mut child = spawn_pinned(PROXY_CPU, edge, &["--routes", &routes.to_string_lossy(), "--listen", &listen, "--threads", "1"])?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line).map_err(|e| format!("edge ready line: {e}"))?;
    }
    if !line.starts_with("edge serving") {
        return Err(format!("edge did not start: {line:?}"));
    }
    Ok(Server { name: "keelson", child, addr: loopback(port) })
}

fn start_nginx(nginx: &Path, dir: &Path, port: u16, backends: &[u16]) -> Fallible<Server> {
    let upstreams: String = backends.iter().map(|p| format!("    server 127.0.0.1:{p};\n")).collect();
    let conf = dir.join("nginx.conf");
    write(
        &conf,
        &format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err warn;\n\
             events {{ worker_connections 8000; }}\nworker_rlimit_nofile 16000;\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
             upstream backends {{\n{upstreams}    keepalive 64;\n  }}\n\
             server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://backends;\n\
             proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
            d = dir.display()
        ),
    )?;
    let child = spawn_pinned(PROXY_CPU, nginx, &["-e", &dir.join("nginx.err").to_string_lossy(), "-c", &conf.to_string_lossy()])?;
    Ok(Server { name: "nginx", child, addr: loopback(port) })
}

fn start_haproxy(haproxy: &Path, dir: &Path, port: u16, backends: &[u16]) -> Fallible<Server> {
    let servers: String = backends.iter().enumerate().map(|(i, p)| format!("  server b{i} 127.0.0.1:{p}\n")).collect();
    let conf = dir.join("haproxy.cfg");
    write(
        &conf,
        &format!(
            "global\n  nbthread 1\n  maxconn 8000\n\
             defaults\n  mode http\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
             option http-keep-alive\n  http-reuse always\n\
             frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
             backend be\n  balance roundrobin\n{servers}"
        ),
    )?;
    let child = spawn_pinned(PROXY_CPU, haproxy, &["-db", "-f", &conf.to_string_lossy()])?;
    Ok(Server { name: "haproxy", child, addr: loopback(port) })
}

/// Interleaved runs of one scenario over `targets`; returns the medians per target of
/// (rps, p99) over the runs that were not void, and how many were void.
fn scenario(
    label: &str,
    targets: &[(&'static str, SocketAddr)],
    rounds: usize,
    run_one: &dyn Fn(SocketAddr) -> Fallible<Run>,
) -> Fallible<BTreeMap<&'static str, (f64, f64)>> {
    let mut runs: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
    for round in 0..rounds {
        for k in 0..targets.len() {
            let (name, addr) = targets[(round + k) % targets.len()];
            let r = run_one(addr)?;
            println!(
                "  {label:<22} round {round} {name:<8} {:>9.0} req/s  p99 {:>8.0} us  errors {}  load cpu {:>3.0}%{}",
                r.rps,
                r.p99_us,
                r.errors,
                r.load_cpu_busy * 100.0,
                if r.void() { "  VOID (load generator saturated)" } else { "" }
            );
            if r.errors > 0 {
                return Err(format!("{name}: {} failed requests in {label}", r.errors));
            }
            runs.entry(name).or_default().push(r);
        }
    }
    let mut medians = BTreeMap::new();
    for (name, _) in targets {
        let rs = &runs[name];
        let valid: Vec<&Run> = rs.iter().filter(|r| !r.void()).collect();
        let use_runs: Vec<&Run> = if valid.is_empty() { rs.iter().collect() } else { valid };
        let void = rs.len() - use_runs.len().min(rs.len());
        if use_runs.len() == rs.len() && rs.iter().any(Run::void) {
            println!("  {label}: every {name} run was void; its median is the load generator's limit");
        } else if void > 0 {
            println!("  {label}: {void} void {name} runs left out");
        }
        medians.insert(*name, (median(use_runs.iter().map(|r| r.rps).collect()), median(use_runs.iter().map(|r| r.p99_us).collect())));
    }
    Ok(medians)
}

/// Resident memory of a process and its children, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let own = |p: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{p}/status"))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
            .unwrap_or(0)
    };
    let mut total = own(pid);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // The parent pid is the second field after the parenthesised command name.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(pid) {
                total += own(child);
            }
        }
    }
    total
}

/// The process behind a server: taskset execs the program, so the child is the server.
fn server_pid(server: &Server) -> u32 {
    server.child.id()
}

/// Opens `n` keep-alive connections, each used for one request and then left idle, and
/// returns the server's resident memory growth per connection in bytes.
fn per_idle_connection(server: &Server, n: usize) -> Fallible<f64> {
    let pid = server_pid(server);
    let before = rss_kib(pid);
    let mut held = Vec::with_capacity(n);
    let mut buf = [0u8; 1024];
    for _ in 0..n {
        let mut s = std::net::TcpStream::connect(server.addr).map_err(|e| format!("{}: idle connection: {e}", server.name))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        write!(s, "GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        while !got.ends_with(b"ok\n") {
            let k = s.read(&mut buf).map_err(|e| format!("{}: reading on an idle connection: {e}", server.name))?;
            if k == 0 {
                return Err(format!("{} closed a keep-alive connection", server.name));
            }
            got.extend_from_slice(&buf[..k]);
        }
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(pid);
    drop(held);
    Ok((after.saturating_sub(before) as f64 * 1024.0) / n as f64)
}

fn raise_fd_limit() {
    // Idle-connection figures need a few thousand descriptors in this process and the
    // proxies (which inherit the limit).
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn ratio(metric: &str, ours: f64, peer: &str, theirs: f64) {
    println!("ratio {metric} keelson/{peer}: {:.2}", ours / theirs);
}

fn run(args: &Args) -> Fallible<()> {
    let nginx = tool("nginx", "nginx-light")?;
    let haproxy = tool("haproxy", "haproxy")?;
    let wrk_bin = tool("wrk", "wrk")?;
    tool("taskset", "util-linux")?;
    let edge = edge_binary(args.common.edge.as_deref())?;
    raise_fd_limit();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ports = keelson_testkit::free_ports(7).map_err(|e| e.to_string())?;
    let backend_ports = &ports[..4];

    let backends = start_backends(&backend_ports.iter().map(|p| (*p, Duration::ZERO)).collect::<Vec<_>>())?;
    wait_ready(&backends)?;
    let servers = [
        start_keelson(&edge, dir.path(), ports[4], backend_ports)?,
        start_nginx(&nginx, dir.path(), ports[5], backend_ports)?,
        start_haproxy(&haproxy, dir.path(), ports[6], backend_ports)?,
    ];
    for s in &servers {
        wait_ready(s)?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let idle: BTreeMap<&str, u64> = servers.iter().map(|s| (s.name, rss_kib(server_pid(s)))).collect();
    let targets: Vec<(&'static str, SocketAddr)> = servers.iter().map(|s| (s.name, s.addr)).collect();
    let (rounds, secs, conns) = (args.common.rounds, args.common.seconds, args.connections);
    println!(
        "router-vs-peers: {rounds} rounds x {secs} s, {conns} connections, proxies on CPU {PROXY_CPU}, wrk and backends on CPU {LOAD_CPU}"
    );
    // The load generator alone against one backend: the most this setup can measure.
    let ceiling = wrk(&wrk_bin, backends.addr, HOST, conns, secs.min(3), &[])?;
    println!(
        "  direct to one backend: {:.0} req/s (load cpu {:.0}%), the ceiling of this setup",
        ceiling.rps,
        ceiling.load_cpu_busy * 100.0
    );

    let keepalive = scenario("keep-alive", &targets, rounds, &|addr| wrk(&wrk_bin, addr, HOST, conns, secs, &[]))?;
    let newconn =
        scenario("new connection", &targets, rounds, &|addr| wrk(&wrk_bin, addr, HOST, conns, secs, &["-H", "Connection: close"]))?;

    // Paced load: each connection waits a fixed delay between requests, so the offered
    // rate is about connections / (delay + latency), the same for every proxy.
    let haproxy_max = keepalive["haproxy"].0;
    let script = dir.path().join("pace.lua");
    let delay_ms = 2.0;
    write(&script, &format!("function delay()\n  return {delay_ms}\nend\n"))?;
    let script = script.to_string_lossy().into_owned();
    let mut paced = BTreeMap::new();
    for share in [0.5, 0.8] {
        let connections = ((haproxy_max * share * (delay_ms / 1000.0 + 0.0001)).ceil() as usize).max(1);
        let mut t = targets.clone();
        if share == 0.5 {
            t.push(("direct", backends.addr));
        }
        let label = format!("paced {:.0}% ({connections} conns)", share * 100.0);
        paced.insert(
            (share * 100.0) as u32,
            scenario(&label, &t, rounds, &|addr| wrk(&wrk_bin, addr, HOST, connections, secs, &["-s", &script]))?,
        );
    }

    let mut per_conn = BTreeMap::new();
    for s in &servers {
        per_conn.insert(s.name, per_idle_connection(s, args.idle_connections)?);
    }

    println!();
    println!("{:<34} {:>12} {:>12} {:>12}", "figure (median)", "keelson", "nginx", "haproxy");
    let row = |label: &str, f: &dyn Fn(&str) -> f64, unit: &str| {
        println!("{label:<34} {:>12.0} {:>12.0} {:>12.0}  {unit}", f("keelson"), f("nginx"), f("haproxy"));
    };
    row("keep-alive throughput", &|p| keepalive[p].0, "req/s");
    row("keep-alive p99 (saturated)", &|p| keepalive[p].1, "us");
    row("new connection per request", &|p| newconn[p].0, "req/s");
    for pct in [50, 80] {
        row(&format!("p99 at {pct}% of haproxy max"), &|p| paced[&pct][p].1, "us");
        row(&format!("rate achieved at {pct}%"), &|p| paced[&pct][p].0, "req/s");
    }
    row("idle resident memory", &|p| idle[p] as f64, "KiB");
    row("memory per idle keep-alive conn", &|p| per_conn[p], "bytes");
    let direct = paced[&50]["direct"];
    println!("direct to one backend at 50%: p99 {:.0} us; keelson adds {:.0} us at p99", direct.1, paced[&50]["keelson"].1 - direct.1);
    println!();
    for peer in ["nginx", "haproxy"] {
        ratio("keepalive-rps", keepalive["keelson"].0, peer, keepalive[peer].0);
        ratio("newconn-rps", newconn["keelson"].0, peer, newconn[peer].0);
        ratio("p99-at-50pct", paced[&50]["keelson"].1, peer, paced[&50][peer].1);
        ratio("p99-at-80pct", paced[&80]["keelson"].1, peer, paced[&80][peer].1);
        ratio("idle-rss", idle["keelson"] as f64, peer, idle[peer] as f64);
        ratio("per-idle-conn-bytes", per_conn["keelson"], peer, per_conn[peer]);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    bench_main("router-vs-peers", args.common.serve_backends.as_deref(), || run(&args))
}
