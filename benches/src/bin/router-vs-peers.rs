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
//! p99 at 50% and 80% of HAProxy's maximum keep-alive rate (an open-loop paced load,
//! latency from each request's intended send time, so stalls are not hidden by
//! coordinated omission), and a direct connection to one backend at 50% for the added
//! latency; resident memory idle and per idle keep-alive connection; and
//! in every scenario each proxy's CPU seconds (user + system, its process and children,
//! from `/proc`) per million requests, the figure the load generator's limit cannot move.
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
use keelson_benches::procstat::tree_cpu_seconds;
use keelson_benches::proxy_bench::{
    bench_main, edge_binary, haproxy_maxconn, loopback, median, paced, raise_fd_limit, spawn_pinned, start_backends, tool, wait_ready,
    write, write_haproxy_conf, write_nginx_conf, wrk, BenchArgs, Fallible, Run, Server, HOST, LOAD_CPU, PROXY_CPU,
};

#[derive(Parser, Debug)]
#[command(about = "keelson's edge against nginx and HAProxy under wrk, pinned CPUs")]
struct Args {
    #[command(flatten)]
    common: BenchArgs,
    /// Client connections for the throughput runs.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Idle keep-alive connections, and open WebSockets, held for the memory figures.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Only the memory figures (no load runs).
    #[arg(long)]
    memory_only: bool,
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
    let conf = write_nginx_conf(dir, port, backends, true)?;
    let child = spawn_pinned(PROXY_CPU, nginx, &["-e", &dir.join("nginx.err").to_string_lossy(), "-c", &conf.to_string_lossy()])?;
    Ok(Server { name: "nginx", child, addr: loopback(port) })
}

fn start_haproxy(haproxy: &Path, dir: &Path, port: u16, backends: &[u16], maxconn: u64) -> Fallible<Server> {
    let conf = write_haproxy_conf(dir, port, backends, maxconn)?;
    let child = spawn_pinned(PROXY_CPU, haproxy, &["-db", "-f", &conf.to_string_lossy()])?;
    Ok(Server { name: "haproxy", child, addr: loopback(port) })
}

/// What one target achieved in a scenario (medians).
#[derive(Clone, Copy, Debug)]
struct Figures {
    rps: f64,
    p99_us: f64,
    /// The proxy's user + system CPU seconds per million requests (from /proc; NaN for
    /// a target that is not one of the proxies).
    cpu_per_mreq: f64,
}

/// Interleaved runs of one scenario over `targets` (name, address, the process whose
/// CPU is counted); returns the medians per target over the runs that were not void.
/// CPU per request is taken from every run, void or not: it is the proxy's own cost,
/// whoever limited the rate.
fn scenario(
    label: &str,
    targets: &[(&'static str, SocketAddr, Option<u32>)],
    rounds: usize,
    run_one: &dyn Fn(SocketAddr) -> Fallible<Run>,
) -> Fallible<BTreeMap<&'static str, Figures>> {
    let mut runs: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
    let mut cpu: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        for k in 0..targets.len() {
            let (name, addr, pid) = targets[(round + k) % targets.len()];
            let before = pid.map(tree_cpu_seconds);
            let r = run_one(addr)?;
            let per_mreq = match (pid, before) {
                (Some(pid), Some(before)) => (tree_cpu_seconds(pid) - before) / (r.requests.max(1) as f64) * 1e6,
                _ => f64::NAN,
            };
            println!(
                "  {label:<22} round {round} {name:<8} {:>9.0} req/s  p99 {:>8.0} us  cpu {:>6.1} s/Mreq  errors {}  load cpu {:>3.0}%{}",
                r.rps,
                r.p99_us,
                per_mreq,
                r.errors,
                r.load_cpu_busy * 100.0,
                if r.void() { "  VOID (load generator saturated)" } else { "" }
            );
            if r.errors > 0 {
                return Err(format!("{name}: {} failed requests in {label}", r.errors));
            }
            runs.entry(name).or_default().push(r);
            cpu.entry(name).or_default().push(per_mreq);
        }
    }
    let mut medians = BTreeMap::new();
    for (name, _, _) in targets {
        let rs = &runs[name];
        let valid: Vec<&Run> = rs.iter().filter(|r| !r.void()).collect();
        let use_runs: Vec<&Run> = if valid.is_empty() { rs.iter().collect() } else { valid };
        let void = rs.len() - use_runs.len().min(rs.len());
        if use_runs.len() == rs.len() && rs.iter().any(Run::void) {
            println!("  {label}: every {name} run was void; its median is the load generator's limit");
        } else if void > 0 {
            println!("  {label}: {void} void {name} runs left out");
        }
        medians.insert(
            *name,
            Figures {
                rps: median(use_runs.iter().map(|r| r.rps).collect()),
                p99_us: median(use_runs.iter().map(|r| r.p99_us).collect()),
                cpu_per_mreq: median(cpu[name].clone()),
            },
        );
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

/// What the memory figures hold open: keep-alive connections after one request each,
/// or WebSockets (101 from the backend, then idle both ways).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    KeepAlive,
    WebSocket,
}

/// Resident memory with `n` connections of `kind` held idle by `server`: (total KiB,
/// bytes per connection over the idle figure). Clients come from 127.0.0.2–127.0.0.9 so
/// that no source address runs short of ports; the figure is read 3 s after the last
/// connection (edge parks a keep-alive connection after 1 s quiet).
fn held_memory(server: &Server, n: usize, kind: Held) -> Fallible<(u64, f64)> {
    let pid = server_pid(server);
    let before = rss_kib(pid);
    let mut held = Vec::with_capacity(n);
    let mut buf = [0u8; 1024];
    let request = match kind {
        Held::KeepAlive => format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
        Held::WebSocket => format!(
            "GET / HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ),
    };
    for i in 0..n {
        let source = std::net::SocketAddr::from(([127, 0, 0, 2 + (i % 8) as u8], 0));
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(|e| e.to_string())?;
        socket.bind(&source.into()).map_err(|e| format!("binding {source}: {e}"))?;
        socket.connect(&server.addr.into()).map_err(|e| format!("{}: connection {i}: {e}", server.name))?;
        let mut s: std::net::TcpStream = socket.into();
        s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
        s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        let complete = |got: &[u8]| match kind {
            Held::KeepAlive => got.ends_with(b"ok\n"),
            Held::WebSocket => got.windows(4).any(|w| w == b"\r\n\r\n"),
        };
        while !complete(&got) {
            let k = s.read(&mut buf).map_err(|e| format!("{}: reading on connection {i}: {e}", server.name))?;
            if k == 0 {
                return Err(format!("{} closed connection {i} ({kind:?})", server.name));
            }
            got.extend_from_slice(&buf[..k]);
        }
        let expected: &[u8] = if kind == Held::KeepAlive { b"HTTP/1.1 200" } else { b"HTTP/1.1 101" };
        if !got.starts_with(expected) {
            return Err(format!("{}: {kind:?} answered {}", server.name, String::from_utf8_lossy(&got)));
        }
        held.push(s);
    }
    std::thread::sleep(Duration::from_secs(3));
    let after = rss_kib(pid);
    drop(held);
    // Let the server notice the closes before the next figure.
    std::thread::sleep(Duration::from_secs(1));
    Ok((after, (after.saturating_sub(before) as f64 * 1024.0) / n as f64))
}

/// The binaries and setup every proxy start needs.
struct Proxies<'a> {
    edge: &'a Path,
    nginx: &'a Path,
    haproxy: &'a Path,
    dir: &'a Path,
    backends: &'a [u16],
    maxconn: u64,
}

/// Memory per idle keep-alive connection and per open WebSocket, each figure on fresh
/// proxy processes: memory a proxy freed during an earlier figure (and its allocator
/// kept) would otherwise be reused and hide the next figure's cost.
#[allow(clippy::type_complexity)]
fn memory_figures(p: &Proxies<'_>, held: usize) -> Fallible<(BTreeMap<&'static str, (u64, f64)>, BTreeMap<&'static str, (u64, f64)>)> {
    let mut per_conn = BTreeMap::new();
    let mut per_ws = BTreeMap::new();
    for kind in [Held::KeepAlive, Held::WebSocket] {
        let ports = keelson_testkit::free_ports(3).map_err(|e| e.to_string())?;
        let fresh = [
            start_keelson(p.edge, p.dir, ports[0], p.backends)?,
            start_nginx(p.nginx, p.dir, ports[1], p.backends)?,
            start_haproxy(p.haproxy, p.dir, ports[2], p.backends, p.maxconn)?,
        ];
        for s in &fresh {
            wait_ready(s)?;
        }
        std::thread::sleep(Duration::from_millis(300));
        for s in &fresh {
            let figure = held_memory(s, held, kind)?;
            println!("  {kind:?} {}: {} KiB resident with {held} held, {:.0} bytes each", s.name, figure.0, figure.1);
            match kind {
                Held::KeepAlive => per_conn.insert(s.name, figure),
                Held::WebSocket => per_ws.insert(s.name, figure),
            };
        }
    }
    Ok((per_conn, per_ws))
}

fn print_memory(per_conn: &BTreeMap<&str, (u64, f64)>, per_ws: &BTreeMap<&str, (u64, f64)>, n: usize) {
    let row = |label: &str, f: &dyn Fn(&str) -> f64, unit: &str| {
        println!("{label:<34} {:>12.0} {:>12.0} {:>12.0}  {unit}", f("keelson"), f("nginx"), f("haproxy"));
    };
    row(&format!("resident with {n} idle keep-alive"), &|p| per_conn[p].0 as f64, "KiB");
    row("memory per idle keep-alive conn", &|p| per_conn[p].1, "bytes");
    row(&format!("resident with {n} open WebSockets"), &|p| per_ws[p].0 as f64, "KiB");
    row("memory per open WebSocket", &|p| per_ws[p].1, "bytes");
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
    let fd_limit = raise_fd_limit();
    let maxconn = haproxy_maxconn(fd_limit);
    // A WebSocket is two sockets in a proxy; keep within the descriptor limit.
    let held = args.idle_connections.min((fd_limit.saturating_sub(200) / 2) as usize);
    if held < args.idle_connections || maxconn < 20_480 {
        println!(
            "descriptor limit {fd_limit} (a hard limit this process cannot raise): {held} connections held for the memory figures, HAProxy maxconn {maxconn}"
        );
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ports = keelson_testkit::free_ports(7).map_err(|e| e.to_string())?;
    let backend_ports = &ports[..4];

    let backends = start_backends(&backend_ports.iter().map(|p| (*p, Duration::ZERO)).collect::<Vec<_>>())?;
    wait_ready(&backends)?;
    let proxies = Proxies { edge: &edge, nginx: &nginx, haproxy: &haproxy, dir: dir.path(), backends: backend_ports, maxconn };
    if args.memory_only {
        let (per_conn, per_ws) = memory_figures(&proxies, held)?;
        println!();
        print_memory(&per_conn, &per_ws, held);
        return Ok(());
    }
    let servers = [
        start_keelson(&edge, dir.path(), ports[4], backend_ports)?,
        start_nginx(&nginx, dir.path(), ports[5], backend_ports)?,
        start_haproxy(&haproxy, dir.path(), ports[6], backend_ports, maxconn)?,
    ];
    for s in &servers {
        wait_ready(s)?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let idle: BTreeMap<&str, u64> = servers.iter().map(|s| (s.name, rss_kib(server_pid(s)))).collect();
    let targets: Vec<(&'static str, SocketAddr, Option<u32>)> = servers.iter().map(|s| (s.name, s.addr, Some(server_pid(s)))).collect();
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

    // Paced open-loop load at a share of HAProxy's maximum keep-alive rate, the same
    // offered rate for every target, latency measured from each request's intended send
    // time (see `proxy_bench::paced`).
    let haproxy_max = keepalive["haproxy"].rps;
    let mut paced_runs = BTreeMap::new();
    for share in [0.5, 0.8] {
        let rate = haproxy_max * share;
        let connections = 64;
        let mut t = targets.clone();
        if share == 0.5 {
            t.push(("direct", backends.addr, None));
        }
        let label = format!("paced {:.0}% ({rate:.0} req/s)", share * 100.0);
        paced_runs.insert((share * 100.0) as u32, scenario(&label, &t, rounds, &|addr| paced(addr, HOST, rate, connections, secs))?);
    }
    let paced = paced_runs;

    drop(servers);
    let (per_conn, per_ws) = memory_figures(&proxies, held)?;
    println!();
    println!("{:<34} {:>12} {:>12} {:>12}", "figure (median)", "keelson", "nginx", "haproxy");
    let row = |label: &str, f: &dyn Fn(&str) -> f64, unit: &str| {
        println!("{label:<34} {:>12.0} {:>12.0} {:>12.0}  {unit}", f("keelson"), f("nginx"), f("haproxy"));
    };
    // CPU figures are a few seconds per million requests: one decimal matters.
    let cpu_row = |label: &str, f: &dyn Fn(&str) -> f64| {
        println!("{label:<34} {:>12.1} {:>12.1} {:>12.1}  s", f("keelson"), f("nginx"), f("haproxy"));
    };
    row("keep-alive throughput", &|p| keepalive[p].rps, "req/s");
    cpu_row("keep-alive CPU per million requests", &|p| keepalive[p].cpu_per_mreq);
    row("keep-alive p99 (saturated)", &|p| keepalive[p].p99_us, "us");
    row("new connection per request", &|p| newconn[p].rps, "req/s");
    cpu_row("new connection CPU per million req", &|p| newconn[p].cpu_per_mreq);
    for pct in [50, 80] {
        row(&format!("p99 at {pct}% of haproxy max"), &|p| paced[&pct][p].p99_us, "us");
        row(&format!("rate achieved at {pct}%"), &|p| paced[&pct][p].rps, "req/s");
        cpu_row(&format!("CPU per million req at {pct}%"), &|p| paced[&pct][p].cpu_per_mreq);
    }
    row("idle resident memory", &|p| idle[p] as f64, "KiB");
    print_memory(&per_conn, &per_ws, held);
    let direct = paced[&50]["direct"].p99_us;
    for proxy in ["keelson", "nginx", "haproxy"] {
        println!("direct to one backend at 50%: p99 {direct:.0} us; {proxy} adds {:.0} us at p99", paced[&50][proxy].p99_us - direct);
    }
    println!();
    for peer in ["nginx", "haproxy"] {
        ratio("keepalive-rps", keepalive["keelson"].rps, peer, keepalive[peer].rps);
        ratio("keepalive-cpu-per-request", keepalive["keelson"].cpu_per_mreq, peer, keepalive[peer].cpu_per_mreq);
        ratio("newconn-rps", newconn["keelson"].rps, peer, newconn[peer].rps);
        ratio("newconn-cpu-per-request", newconn["keelson"].cpu_per_mreq, peer, newconn[peer].cpu_per_mreq);
        ratio("p99-at-50pct", paced[&50]["keelson"].p99_us, peer, paced[&50][peer].p99_us);
        ratio("p99-at-80pct", paced[&80]["keelson"].p99_us, peer, paced[&80][peer].p99_us);
        ratio("idle-rss", idle["keelson"] as f64, peer, idle[peer] as f64);
        ratio("per-idle-conn-bytes", per_conn["keelson"].1, peer, per_conn[peer].1);
        ratio("per-websocket-bytes", per_ws["keelson"].1, peer, per_ws[peer].1);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    bench_main("router-vs-peers", args.common.serve_backends.as_deref(), || run(&args))
}
