//! Shared parts of the proxy benchmarks (`router-vs-peers`, `balancer-tail`): servers
//! pinned to CPUs, a canned HTTP backend, wrk runs with CPU-saturation checks, and the
//! `edge` binary.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Arguments every proxy bench takes (flattened into its own with `#[command(flatten)]`).
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// The `edge` binary (default: built with `cargo build --release` next to this one).
    #[arg(long)]
    pub edge: Option<PathBuf>,
    /// Internal: serve the canned backends (`port/delay_us,...`; see [`start_backends`]).
    #[arg(long, hide = true)]
    pub serve_backends: Option<String>,
}

/// Errors as text: these are command-line benches.
pub type Fallible<T> = Result<T, String>;

/// The host every bench route serves.
pub const HOST: &str = "bench.test";

/// The CPU proxies are pinned to.
pub const PROXY_CPU: &str = "0";
/// The CPU wrk and the backends are pinned to.
pub const LOAD_CPU: &str = "1";

/// A started server, stopped (and its process group killed) on drop.
#[derive(Debug)]
pub struct Server {
    /// Its name in reports.
    pub name: &'static str,
    /// The process.
    pub child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        // The whole process group: killing only nginx's master leaves its workers
        // running, holding ports and CPU (seen in an early run of this bench).
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The path of `name`, or how to install it.
pub fn tool(name: &str, package: &str) -> Fallible<PathBuf> {
    keelson_testkit::require(name, package).map_err(|e| e.to_string())
}

pub fn spawn_pinned(cpu: &str, program: &Path, args: &[&str]) -> Fallible<Child> {
    Command::new("taskset")
        .arg("-c")
        .arg(cpu)
        .arg(program)
        .args(args)
        .env("RUST_LOG", "warn")
        // Its own process group, so that drop can stop every process it starts.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", program.display()))
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Writes a file, naming it in the error.
pub fn write(path: &Path, text: &str) -> Fallible<()> {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Backends: the calling program in backend mode (it must pass its `--serve-backends`
/// argument to [`serve_backends`]) on the load CPU, one port per `(port, delay)`, each
/// answering every request with a canned 200 "ok" after `delay`. They do as little as an
/// HTTP server can (find the end of the head, write the answer), so that they and wrk
/// fit on one core while the proxy is the bottleneck; nginx as the backend left wrk's
/// core saturated.
pub fn start_backends(backends: &[(u16, Duration)]) -> Fallible<Server> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let list: Vec<String> = backends.iter().map(|(port, delay)| format!("{port}/{}", delay.as_micros())).collect();
    let child = spawn_pinned(LOAD_CPU, &me, &["--serve-backends", &list.join(",")])?;
    let first = backends.first().ok_or("no backends")?.0;
    Ok(Server { name: "backends", child, addr: loopback(first) })
}

/// The `main` of a bench that starts backends: backend mode when `serve_backends` is
/// given (see [`start_backends`]), else `run`; an error is printed after `name`.
pub fn bench_main(name: &str, serve_backends_spec: Option<&str>, run: impl FnOnce() -> Fallible<()>) -> std::process::ExitCode {
    let result = match serve_backends_spec {
        Some(spec) => serve_backends(spec),
        None => run(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Backend mode: a single-threaded server per `port/delay_us` in the comma-separated
/// `spec`; runs until killed.
pub fn serve_backends(spec: &str) -> Fallible<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        for item in spec.split(',') {
            let bad = || format!("bad backend {item:?}: expected port/delay_us");
            let (port, delay) = item.split_once('/').ok_or_else(bad)?;
            let port: u16 = port.parse().map_err(|_| bad())?;
            let delay = Duration::from_micros(delay.parse().map_err(|_| bad())?);
            let listener = tokio::net::TcpListener::bind(loopback(port)).await.map_err(|e| format!("backend port {port}: {e}"))?;
            let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(backend_connection(stream, delay, served.clone()));
                }
            });
        }
        std::future::pending::<Fallible<()>>().await
    })
}

/// The path that answers with how many requests a backend served (itself not counted).
pub const COUNT_PATH: &str = "/__served";

/// How many requests the backend on `port` has served, asked directly (not through a proxy).
pub fn backend_served(port: u16) -> Fallible<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(loopback(port)).map_err(|e| format!("backend {port}: {e}"))?;
    write!(s, "GET {COUNT_PATH} HTTP/1.1\r\nHost: count\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(|e| format!("backend {port}: {e}"))?;
    answer.rsplit("\r\n\r\n").next().and_then(|b| b.trim().parse().ok()).ok_or_else(|| format!("backend {port} count: {answer:?}"))
}

async fn backend_connection(mut stream: tokio::net::TcpStream, delay: Duration, served: std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const KEEP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n";
    const CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(n) = stream.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        // Answer every complete head in the buffer (requests carry no body here).
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = buf.drain(..end + 4).collect::<Vec<u8>>();
            let close = head.windows(17).any(|w| w.eq_ignore_ascii_case(b"connection: close"));
            if head.windows(18).any(|w| w.eq_ignore_ascii_case(b"upgrade: websocket")) {
                // A WebSocket that stays open and idle (the memory figures hold many):
                // switch protocols, then keep the connection until the client leaves.
                // The accept key is not checked by the proxies benched.
                const SWITCH: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
                if stream.write_all(SWITCH).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
                return;
            }
            if head.starts_with(format!("GET {COUNT_PATH} ").as_bytes()) {
                let n = served.load(std::sync::atomic::Ordering::Relaxed).to_string();
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{n}", n.len());
                let _ = stream.write_all(answer.as_bytes()).await;
                return;
            }
            served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if stream.write_all(if close { CLOSE } else { KEEP }).await.is_err() || close {
                return;
            }
        }
    }
}

/// Writes the nginx configuration every proxy bench uses: one worker, access log off,
/// upstream keep-alive, round robin over `backends`, WebSocket upgrades passed on,
/// `worker_connections` 20,480. `master_process off` for callgrind, which must see the
/// process that serves. Returns the file.
pub fn write_nginx_conf(dir: &Path, port: u16, backends: &[u16], master_process: bool) -> Fallible<PathBuf> {
    let upstreams: String = backends.iter().map(|p| format!("    server 127.0.0.1:{p};\n")).collect();
    let conf = dir.join("nginx.conf");
    write(
        &conf,
        &format!(
            "daemon off;\nmaster_process {master};\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err warn;\n\
             events {{ worker_connections 20480; }}\nworker_rlimit_nofile 45000;\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
             map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}\n\
             upstream backends {{\n{upstreams}    keepalive 64;\n  }}\n\
             server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://backends;\n\
             proxy_http_version 1.1;\n      proxy_set_header Upgrade $http_upgrade;\n\
             proxy_set_header Connection $connection_upgrade;\n    }}\n  }}\n}}\n",
            master = if master_process { "on" } else { "off" },
            d = dir.display()
        ),
    )?;
    Ok(conf)
}

/// Writes the HAProxy configuration every proxy bench uses: one thread, `maxconn`,
/// keep-alive both sides with connection reuse, round robin over `backends`.
pub fn write_haproxy_conf(dir: &Path, port: u16, backends: &[u16], maxconn: u64) -> Fallible<PathBuf> {
    let servers: String = backends.iter().enumerate().map(|(i, p)| format!("  server b{i} 127.0.0.1:{p}\n")).collect();
    let conf = dir.join("haproxy.cfg");
    write(
        &conf,
        &format!(
            "global\n  nbthread 1\n  maxconn {maxconn}\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             option http-keep-alive\n  http-reuse always\n\
             frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
             backend be\n  balance roundrobin\n{servers}"
        ),
    )?;
    Ok(conf)
}

/// Raises this process's descriptor limit, which the proxies and backends it starts
/// inherit: 10,000 WebSockets are 20,000 sockets in a proxy, and HAProxy with `maxconn`
/// 20,480 wants about 41,000. Root with CAP_SYS_RESOURCE may go past the hard limit;
/// otherwise the hard
/// limit is taken. Returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if setrlimit(Resource::RLIMIT_NOFILE, 100_000, 100_000).is_err() {
        if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// HAProxy's `maxconn`: 20,480 as nginx's `worker_connections`, or what the descriptor
/// limit allows (HAProxy refuses to start when it cannot have two per connection).
pub fn haproxy_maxconn(fd_limit: u64) -> u64 {
    20_480.min(fd_limit.saturating_sub(200) / 2)
}

/// Busy and total jiffies of one CPU, from /proc/stat.
pub fn cpu_times(cpu: &str) -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with(&format!("cpu{cpu} "))) else { return (0, 0) };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// One wrk run's result.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    /// Requests per second.
    pub rps: f64,
    /// Requests completed in the run.
    pub requests: u64,
    /// 99th percentile latency in microseconds.
    pub p99_us: f64,
    /// Socket errors plus non-2xx/3xx answers.
    pub errors: u64,
    /// Busy share of the load CPU during the run.
    pub load_cpu_busy: f64,
}

impl Run {
    /// The load generator's CPU was (nearly) saturated: the figure is wrk's, not the proxy's.
    pub fn void(&self) -> bool {
        self.load_cpu_busy > 0.97
    }
}

/// Runs wrk against `addr`; `extra` adds arguments (headers, a pacing script).
pub fn wrk(wrk: &Path, addr: SocketAddr, host: &str, connections: usize, seconds: u64, extra: &[&str]) -> Fallible<Run> {
    let before = cpu_times(LOAD_CPU);
    let out = Command::new("taskset")
        .args(["-c", LOAD_CPU])
        .arg(wrk)
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency", "-H", &format!("Host: {host}")])
        .args(extra)
        .arg(format!("http://{addr}/"))
        .output()
        .map_err(|e| format!("running wrk: {e}"))?;
    let after = cpu_times(LOAD_CPU);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr)));
    }
    let mut run = Run { load_cpu_busy: (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64, ..Run::default() };
    for line in text.lines().map(str::trim) {
        if let Some((n, _)) = line.split_once(" requests in ") {
            run.requests = n.trim().parse().map_err(|_| format!("wrk output: {line}"))?;
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            run.rps = v.trim().parse().map_err(|_| format!("wrk output: {line}"))?;
        } else if let Some(v) = line.strip_prefix("99%") {
            run.p99_us = duration_us(v.trim()).ok_or_else(|| format!("wrk output: {line}"))?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.errors += v.trim().parse::<u64>().unwrap_or(1);
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            run.errors += v.split(',').filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok()).sum::<u64>();
        }
    }
    if run.rps == 0.0 {
        return Err(format!("wrk reported no throughput: {text}"));
    }
    Ok(run)
}

/// wrk prints durations as `812.00us`, `1.23ms` or `1.01s`.
pub fn duration_us(s: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else {
        (s.strip_suffix('s')?, 1e6)
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// The median (upper middle for even lengths); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `edge` binary: `given`, or built with `cargo build --release` next to the
/// running bench (see [`example_binary`]).
pub fn edge_binary(given: Option<&Path>) -> Fallible<PathBuf> {
    match given {
        Some(p) => Ok(p.to_owned()),
        None => example_binary("edge"),
    }
}

/// A binary of `keelson-examples`, built with `cargo build --release` next to the running
/// bench, with the etcd, Consul and Docker features (every bench asks for the same set,
/// so they share one build).
pub fn example_binary(name: &str) -> Fallible<PathBuf> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--quiet", "-p", "keelson-examples", "--features", "etcd,consul,docker", "--bin", name])
        .status()
        .map_err(|e| format!("building {name}: {e}"))?;
    if !status.success() {
        return Err(format!("building {name} failed"));
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    Ok(me.with_file_name(name))
}

/// Waits until `server` answers a GET for the bench host with the backends' body.
pub fn wait_ready(server: &Server) -> Fallible<()> {
    wait_ready_host(server, HOST)
}

/// Waits until `server` answers a GET for `host` with the backends' body.
pub fn wait_ready_host(server: &Server, host: &str) -> Fallible<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match http_get(server.addr, host) {
            Ok(body) if body.ends_with("ok\n") => return Ok(()),
            other => {
                if std::time::Instant::now() > deadline {
                    return Err(format!("{} at {} not answering: {other:?}", server.name, server.addr));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// One `GET /` for the bench host over a fresh connection; the whole response.
pub fn http_get(addr: SocketAddr, host: &str) -> Fallible<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    write!(s, "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Open-loop paced load, corrected for coordinated omission: `connections` keep-alive
/// connections together send `rate` requests per second at fixed intended times, and
/// each latency is measured from the request's intended time, not from when it could
/// be sent. A stall therefore counts against every request it delayed, as wrk2 and
/// oha's latency correction count it (wrk, closed-loop, would send less and hide it).
/// Runs on a thread pinned to [`LOAD_CPU`].
pub fn paced(addr: SocketAddr, host: &str, rate: f64, connections: usize, seconds: u64) -> Fallible<Run> {
    let host = host.to_owned();
    let thread = std::thread::spawn(move || -> Fallible<Run> {
        let cpu: usize = LOAD_CPU.parse().unwrap_or(1);
        let mut set = nix::sched::CpuSet::new();
        let _ = set.set(cpu).map(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        let before = cpu_times(LOAD_CPU);
        let outcome = rt.block_on(paced_load(addr, host, rate, connections, seconds));
        let after = cpu_times(LOAD_CPU);
        let (mut latencies, errors) = outcome?;
        latencies.sort_unstable();
        let requests = latencies.len() as u64;
        let p99_us = latencies.get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1))).copied().unwrap_or(0) as f64;
        Ok(Run {
            rps: requests as f64 / seconds as f64,
            requests,
            p99_us,
            errors,
            load_cpu_busy: (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64,
        })
    });
    thread.join().map_err(|_| "the paced load thread panicked".to_owned())?
}

/// Latencies in microseconds from each request's intended send time, and errors.
async fn paced_load(addr: SocketAddr, host: String, rate: f64, connections: usize, seconds: u64) -> Fallible<(Vec<u64>, u64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let interval = Duration::from_secs_f64(connections as f64 / rate.max(1.0));
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs(seconds);
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let request = request.clone();
        // Staggered, so the connections' sends spread evenly over each interval.
        let first = start + interval.mul_f64(c as f64 / connections as f64);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return (latencies, 1) };
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 2048];
            let mut k = 0u32;
            loop {
                let intended = first + interval * k;
                if intended >= end {
                    break;
                }
                k += 1;
                tokio::time::sleep_until(intended).await;
                if s.write_all(&request).await.is_err() {
                    errors += 1;
                    break;
                }
                let mut got = 0usize;
                let mut head_ok = None;
                loop {
                    match s.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => {
                            errors += 1;
                            return (latencies, errors);
                        }
                        Ok(n) => got += n,
                    }
                    if head_ok.is_none() && got >= 12 {
                        head_ok = Some(buf.starts_with(b"HTTP/1.1 200"));
                    }
                    if buf[..got].ends_with(b"ok\n") {
                        break;
                    }
                    if got == buf.len() {
                        got = 0; // an answer this bench's backends never send; keep reading
                    }
                }
                if head_ok == Some(true) {
                    latencies.push(intended.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.map_err(|e| e.to_string())?;
        all.extend(l);
        errors += e;
    }
    Ok((all, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_durations_parse_in_microseconds() {
        assert_eq!(duration_us("812.00us"), Some(812.0));
        assert_eq!(duration_us("1.50ms"), Some(1500.0));
        assert_eq!(duration_us("2.00s"), Some(2e6));
        assert_eq!(duration_us("bogus"), None);
    }
}
