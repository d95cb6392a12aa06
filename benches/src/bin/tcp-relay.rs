//! `tcp-relay`: bulk TCP throughput and proxy CPU per GiB through keelson's `edge` TCP
//! proxy with splice(2) (the default), with the user-space copy (`--tcp-copy`), and
//! through HAProxy in `mode tcp` with `option splice-request` and `splice-response`, in
//! the same run. The proxy is pinned to CPU 0; a source that sends `--mib` MiB over
//! `--connections` connections and a sink that discards them run on CPU 1. Runs are
//! interleaved and each figure is the median of `--rounds`.
//!
//! `cargo run --release -p keelson-benches --bin tcp-relay`

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use keelson_benches::proxy_bench::{edge_binary, loopback, median, spawn_pinned, tool, write, Fallible, Server, LOAD_CPU, PROXY_CPU};

#[derive(Parser, Debug)]
#[command(about = "TCP relay throughput and CPU: edge (splice, copy) against HAProxy")]
struct Args {
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// MiB sent per run.
    #[arg(long, default_value_t = 2048)]
    mib: u64,
    /// Parallel connections per run.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// The `edge` binary (default: built with `cargo build --release`).
    #[arg(long)]
    edge: Option<std::path::PathBuf>,
    /// Internal: discard everything sent to this port.
    #[arg(long, hide = true)]
    sink: Option<u16>,
    /// Internal: send `--mib` MiB to this address and print the seconds it took.
    #[arg(long, hide = true)]
    source: Option<SocketAddr>,
}

/// Sink mode: a thread per connection reads until end of stream, then closes.
fn sink(port: u16) -> Fallible<()> {
    let listener = TcpListener::bind(loopback(port)).map_err(|e| format!("sink port {port}: {e}"))?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        });
    }
    Ok(())
}

/// Source mode: `connections` threads share `mib` MiB; each half-closes and waits for
/// the sink's end of stream, so the figure covers delivery, not just buffering.
fn source(addr: SocketAddr, mib: u64, connections: usize) -> Fallible<()> {
    let started = Instant::now();
    let per = mib * 1024 * 1024 / connections as u64;
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            std::thread::spawn(move || -> Fallible<()> {
                let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
                let chunk = vec![0x5au8; 256 * 1024];
                let mut left = per;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    s.write_all(&chunk[..n]).map_err(|e| format!("send: {e}"))?;
                    left -= n as u64;
                }
                s.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).map_err(|e| format!("waiting for the end of stream: {e}"))?;
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "source thread panicked".to_owned())??;
    }
    println!("{}", started.elapsed().as_secs_f64());
    Ok(())
}

fn wait_listening(addr: SocketAddr) -> Fallible<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("nothing listening on {addr}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn start_edge(edge: &Path, dir: &Path, listen: u16, sink: u16, copy: bool, http_port: u16) -> Fallible<Server> {
    let name = if copy { "routes-copy.json" } else { "routes-splice.json" };
    let routes = dir.join(name);
    write(
        &routes,
        &format!(
            "{{\"routes\": [], \"tcp\": [{{\"listen\": \"127.0.0.1:{listen}\", \"endpoints\": [{{\"id\": \"sink\", \"addr\": \"127.0.0.1:{sink}\"}}]}}]}}"
        ),
    )?;
    let routes = routes.to_string_lossy().into_owned();
    let http = loopback(http_port).to_string();
    let mut args = vec!["--routes", routes.as_str(), "--listen", http.as_str(), "--threads", "1"];
    if copy {
        args.push("--tcp-copy");
    }
    let child = spawn_pinned(PROXY_CPU, edge, &args)?;
    let server = Server { name: if copy { "edge-copy" } else { "edge-splice" }, child, addr: loopback(listen) };
    wait_listening(server.addr)?;
    Ok(server)
}

fn start_haproxy(haproxy: &Path, dir: &Path, listen: u16, sink: u16) -> Fallible<Server> {
    let conf = dir.join("haproxy.cfg");
    write(
        &conf,
        &format!(
            "global\n  nbthread 1\ndefaults\n  mode tcp\n  option splice-request\n  option splice-response\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             listen relay\n  bind 127.0.0.1:{listen}\n  server sink 127.0.0.1:{sink}\n"
        ),
    )?;
    let child = spawn_pinned(PROXY_CPU, haproxy, &["-db", "-f", &conf.to_string_lossy()])?;
    let server = Server { name: "haproxy", child, addr: loopback(listen) };
    wait_listening(server.addr)?;
    Ok(server)
}

/// One run through `server`: (Gbit/s, proxy CPU seconds per GiB).
fn run_once(me: &Path, server: &Server, args: &Args) -> Fallible<(f64, f64)> {
    let cpu_before = keelson_benches::procstat::cpu_seconds(server.child.id());
    let out = std::process::Command::new("taskset")
        .args(["-c", LOAD_CPU])
        .arg(me)
        .args(["--source", &server.addr.to_string(), "--mib", &args.mib.to_string(), "--connections", &args.connections.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("source: {e}"))?;
    if !out.status.success() {
        return Err(format!("source through {} failed", server.name));
    }
    let seconds: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|_| "source printed no time".to_owned())?;
    let cpu = keelson_benches::procstat::cpu_seconds(server.child.id()) - cpu_before;
    let gib = args.mib as f64 / 1024.0;
    Ok((gib * 8.0 * 1.073_741_824 / seconds, cpu / gib))
}

fn run(args: &Args) -> Fallible<()> {
    tool("taskset", "util-linux")?;
    let haproxy = tool("haproxy", "haproxy")?;
    let edge = edge_binary(args.edge.as_deref())?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ports = keelson_testkit::free_ports(6).map_err(|e| e.to_string())?;
    let sink_port = ports[0];
    let _sink =
        Server { name: "sink", child: spawn_pinned(LOAD_CPU, &me, &["--sink", &sink_port.to_string()])?, addr: loopback(sink_port) };
    wait_listening(loopback(sink_port))?;
    let servers = [
        start_edge(&edge, dir.path(), ports[1], sink_port, false, ports[4])?,
        start_edge(&edge, dir.path(), ports[2], sink_port, true, ports[5])?,
        start_haproxy(&haproxy, dir.path(), ports[3], sink_port)?,
    ];
    println!("tcp-relay: {} rounds, {} MiB over {} connections per run", args.rounds, args.mib, args.connections);
    let mut figures: BTreeMap<&str, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for round in 0..args.rounds {
        for k in 0..servers.len() {
            let server = &servers[(round + k) % servers.len()];
            let (gbps, cpu) = run_once(&me, server, args)?;
            println!("  round {round} {:<12} {gbps:>7.2} Gbit/s  {:>6.0} ms CPU per GiB", server.name, cpu * 1000.0);
            let f = figures.entry(server.name).or_default();
            f.0.push(gbps);
            f.1.push(cpu);
        }
    }
    println!();
    println!("{:<12} {:>12} {:>18}", "proxy", "Gbit/s", "CPU ms per GiB");
    let mut med: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for (name, (g, c)) in figures {
        let m = (median(g), median(c));
        println!("{name:<12} {:>12.2} {:>18.0}", m.0, m.1 * 1000.0);
        med.insert(name, m);
    }
    for peer in ["haproxy", "edge-copy"] {
        println!("ratio tcp-gbps edge-splice/{peer}: {:.2}", med["edge-splice"].0 / med[peer].0);
        println!("ratio tcp-cpu-per-gib edge-splice/{peer}: {:.2}", med["edge-splice"].1 / med[peer].1);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match (args.sink, args.source) {
        (Some(port), _) => sink(port),
        (None, Some(addr)) => source(addr, args.mib, args.connections),
        (None, None) => run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcp-relay: {e}");
            ExitCode::FAILURE
        }
    }
}
