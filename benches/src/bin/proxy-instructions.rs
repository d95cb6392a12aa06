//! `proxy-instructions`: instructions per proxied request for edge, nginx and HAProxy,
//! counted by `valgrind --tool=callgrind`. Counts do not depend on what else the
//! machine runs (hardware counters are not available on these VMs; callgrind gives the
//! same total for the same binary and input whatever the load), so this is the figure
//! of a proxy's own cost that a shared 2-core machine cannot move.
//!
//! Each proxy runs alone under callgrind with one worker (edge `--threads 1`; nginx
//! `master_process off; daemon off;`; HAProxy `-db` with `nbthread 1`) in front of the
//! same four backends, round robin, upstream keep-alive. A warm-up of `--warmup`
//! requests fills pools and caches, the counters are zeroed (`callgrind_control -z`),
//! then exactly `--requests` requests are sent over `--connections` keep-alive
//! connections, each checked, and the counters are dumped (`callgrind_control -d`).
//! Instructions per request = the dump's total / requests. The client and backends run
//! natively and are not counted.
//!
//! `cargo run --release -p keelson-benches --bin proxy-instructions`

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use keelson_benches::proxy_bench::{
    bench_main, edge_binary, haproxy_maxconn, loopback, raise_fd_limit, start_backends, tool, write, write_haproxy_conf, write_nginx_conf,
    BenchArgs, Fallible, HOST,
};

#[derive(Parser, Debug)]
#[command(about = "instructions per proxied request under callgrind: edge, nginx, HAProxy")]
struct Args {
    #[command(flatten)]
    common: BenchArgs,
    /// Requests counted per proxy.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Requests before the counters are zeroed.
    #[arg(long, default_value_t = 2_000)]
    warmup: usize,
    /// Keep-alive client connections.
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// Keep the callgrind dumps in this folder (for `callgrind_annotate`).
    #[arg(long)]
    keep: Option<PathBuf>,
}

/// A proxy under callgrind; killed (with its process group) when dropped.
struct Profiled {
    name: &'static str,
    child: std::process::Child,
    addr: SocketAddr,
    out: PathBuf,
}

impl Drop for Profiled {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn profiled(name: &'static str, dir: &Path, port: u16, program: &Path, args: &[&str]) -> Fallible<Profiled> {
    use std::os::unix::process::CommandExt;
    let out = dir.join(format!("callgrind.{name}"));
    let child = Command::new("valgrind")
        .args(["--tool=callgrind", "--quiet", &format!("--callgrind-out-file={}", out.display())])
        .arg(program)
        .args(args)
        .env("RUST_LOG", "warn")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting {name} under valgrind: {e}"))?;
    Ok(Profiled { name, child, addr: loopback(port), out })
}

/// `n` requests over `connections` keep-alive connections, each answer checked.
fn send(addr: SocketAddr, n: usize, connections: usize) -> Fallible<()> {
    let per = n.div_ceil(connections);
    let workers: Vec<std::thread::JoinHandle<Fallible<()>>> = (0..connections)
        .map(|c| {
            let count = per.min(n.saturating_sub(c * per));
            std::thread::spawn(move || {
                if count == 0 {
                    return Ok(());
                }
                let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
                let request = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
                let mut buf = [0u8; 4096];
                for _ in 0..count {
                    s.write_all(request.as_bytes()).map_err(|e| format!("send: {e}"))?;
                    let mut got = Vec::new();
                    while !(got.ends_with(b"ok\n") && got.windows(4).any(|w| w == b"\r\n\r\n")) {
                        let k = s.read(&mut buf).map_err(|e| format!("read: {e}"))?;
                        if k == 0 {
                            return Err("the proxy closed a keep-alive connection".into());
                        }
                        got.extend_from_slice(&buf[..k]);
                    }
                    if !got.starts_with(b"HTTP/1.1 200") {
                        return Err(format!("unexpected answer: {}", String::from_utf8_lossy(&got)));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "client thread panicked")??;
    }
    Ok(())
}

fn wait_answering(p: &Profiled) -> Fallible<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while send(p.addr, 1, 1).is_err() {
        if Instant::now() > deadline {
            return Err(format!("{} under callgrind did not answer within 120 s", p.name));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn callgrind_control(flag: &str, pid: u32) -> Fallible<()> {
    let out = Command::new("callgrind_control").args([flag, &pid.to_string()]).output().map_err(|e| format!("callgrind_control: {e}"))?;
    if !out.status.success() {
        return Err(format!("callgrind_control {flag} {pid}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

/// The total instructions of the newest dump of `p`.
fn dumped_instructions(p: &Profiled) -> Fallible<u64> {
    let dir = p.out.parent().ok_or("no dump folder")?;
    let stem = p.out.file_name().and_then(|n| n.to_str()).ok_or("dump name")?.to_owned();
    let mut dumps: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&stem)))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    dumps.sort();
    let (_, newest) = dumps.last().ok_or_else(|| format!("{}: no callgrind dump", p.name))?;
    let text = std::fs::read_to_string(newest).map_err(|e| e.to_string())?;
    text.lines()
        .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("{}: no total in {}", p.name, newest.display()))
}

fn measure(p: &Profiled, args: &Args) -> Fallible<f64> {
    wait_answering(p)?;
    send(p.addr, args.warmup, args.connections)?;
    callgrind_control("-z", p.child.id())?;
    send(p.addr, args.requests, args.connections)?;
    callgrind_control("-d", p.child.id())?;
    // The dump is written by the profiled process itself; give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    Ok(dumped_instructions(p)? as f64 / args.requests as f64)
}

fn run(args: &Args) -> Fallible<()> {
    tool("valgrind", "valgrind")?;
    tool("callgrind_control", "valgrind")?;
    let nginx = tool("nginx", "nginx-light")?;
    let haproxy = tool("haproxy", "haproxy")?;
    let edge = edge_binary(args.common.edge.as_deref())?;
    let maxconn = haproxy_maxconn(raise_fd_limit());
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ports = keelson_testkit::free_ports(7).map_err(|e| e.to_string())?;
    let backend_ports = &ports[..4];
    let _backends = start_backends(&backend_ports.iter().map(|p| (*p, Duration::ZERO)).collect::<Vec<_>>())?;
    let d = dir.path();

    let endpoints: Vec<String> =
        backend_ports.iter().enumerate().map(|(i, p)| format!("{{\"id\": \"b{i}\", \"addr\": \"127.0.0.1:{p}\"}}")).collect();
    let routes = d.join("routes.json");
    write(&routes, &format!("{{\"routes\": [{{\"host\": \"{HOST}\", \"endpoints\": [{}]}}]}}", endpoints.join(", ")))?;
    let nginx_conf = write_nginx_conf(d, ports[5], backend_ports, false)?;
    let haproxy_conf = write_haproxy_conf(d, ports[6], backend_ports, maxconn)?;
    println!(
        "proxy-instructions: {} requests per proxy over {} keep-alive connections after {} to warm up, under callgrind",
        args.requests, args.connections, args.warmup
    );
    let mut per_request = BTreeMap::new();
    let listen = loopback(ports[4]).to_string();
    let (routes, nginx_err, nginx_conf, haproxy_conf) = (
        routes.to_string_lossy().into_owned(),
        d.join("nginx.err").to_string_lossy().into_owned(),
        nginx_conf.to_string_lossy().into_owned(),
        haproxy_conf.to_string_lossy().into_owned(),
    );
    let setups: [(&'static str, u16, &Path, Vec<&str>); 3] = [
        ("keelson", ports[4], &edge, vec!["--routes", &routes, "--listen", &listen, "--threads", "1"]),
        ("nginx", ports[5], &nginx, vec!["-e", &nginx_err, "-c", &nginx_conf]),
        ("haproxy", ports[6], &haproxy, vec!["-db", "-f", &haproxy_conf]),
    ];
    for (name, port, program, proxy_args) in &setups {
        let p = profiled(name, args.keep.as_deref().unwrap_or(d), *port, program, proxy_args)?;
        let ir = measure(&p, args)?;
        println!("  {name:<8} {ir:>10.0} instructions per request");
        per_request.insert(*name, ir);
    }
    println!();
    for peer in ["nginx", "haproxy"] {
        println!("ratio instructions-per-request keelson/{peer}: {:.2}", per_request["keelson"] / per_request[peer]);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    bench_main("proxy-instructions", args.common.serve_backends.as_deref(), || run(&args))
}
