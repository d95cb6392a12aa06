//! `router-propagation`: how long a discovery change takes to reach live traffic. A real
//! etcd (Debian's `etcd-server`) holds the catalog; `edge --etcd` follows it; this
//! program registers an instance for a fresh host in etcd through `KvDiscovery` and
//! measures the time from the registration being acknowledged to the first request for
//! that host answered 200 through the proxy (polled every 200 µs over one keep-alive
//! connection). Then it deregisters and measures until the host answers 404.
//!
//! `cargo run --release -p keelson-benches --bin router-propagation` (`--samples`).

use std::net::SocketAddr;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use keelson_benches::proxy_bench::{edge_binary, Fallible};
use keelson_discovery::{Discovery, EtcdConfig, EtcdKv, KvDiscovery, Registration, ServiceName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
struct Args {
    /// Changes measured (each a registration and a deregistration).
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// The `edge` binary (default: built with `cargo build --release` next to this one).
    #[arg(long)]
    edge: Option<std::path::PathBuf>,
}

/// One keep-alive connection to the proxy; `status` sends a GET and reads the status.
struct Poller {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Poller {
    async fn connect(addr: SocketAddr) -> Fallible<Self> {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Poller { stream, buf: vec![0; 4096] })
    }

    /// The status of `GET /` for `host`. Responses carry Content-Length (the proxy's
    /// error bodies and the upstream's); the whole response is read before returning.
    async fn status(&mut self, host: &str) -> Fallible<u16> {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        self.stream.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut got = 0;
        loop {
            let n = self.stream.read(&mut self.buf[got..]).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("proxy closed the connection".into());
            }
            got += n;
            let text = String::from_utf8_lossy(&self.buf[..got]);
            if let Some(head_end) = text.find("\r\n\r\n") {
                let length = text[..head_end]
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                    .unwrap_or(0);
                if got >= head_end + 4 + length {
                    return text.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| format!("bad response: {text}"));
                }
            }
        }
    }
}

/// Polls until `host` answers `want`; returns the time it took.
async fn until(poller: &mut Poller, host: &str, want: u16, started: Instant) -> Fallible<Duration> {
    loop {
        if poller.status(host).await? == want {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(10) {
            return Err(format!("{host} never answered {want}"));
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn run(args: Args) -> Fallible<()> {
    let edge = edge_binary(args.edge.as_deref())?;
    let etcd = keelson_testkit::etcd::Etcd::start().map_err(|e| e.to_string())?;
    let (up, _upstream) = keelson_testkit::http::echo_server("up").await.map_err(|e| e.to_string())?;
    let listen: SocketAddr = ([127, 0, 0, 1], keelson_testkit::free_port().map_err(|e| e.to_string())?).into();
    let mut child = Command::new(&edge)
        .args(["--etcd", &etcd.client_url(), "--listen", &listen.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting edge: {e}"))?;
    keelson_testkit::wait_for_tcp(listen, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let kv = EtcdKv::connect(EtcdConfig::new(vec![etcd.client_url()])).await.map_err(|e| e.to_string())?;
    let discovery = KvDiscovery::new(Arc::new(kv));
    let mut poller = Poller::connect(listen).await?;
    let service = ServiceName::new("prop").map_err(|e| e.to_string())?;
    let (mut appear, mut vanish) = (Vec::new(), Vec::new());
    for i in 0..args.samples {
        let host = format!("h{i}.prop.test");
        let reg = Registration::new(service.clone(), format!("i{i}"), "127.0.0.1", up.port()).with_tag(format!("keelson.http.host={host}"));
        let started = Instant::now();
        let handle = discovery.register(reg).await.map_err(|e| e.to_string())?;
        appear.push(until(&mut poller, &host, 200, started).await?);
        let started = Instant::now();
        discovery.deregister(&service, &format!("i{i}")).await.map_err(|e| e.to_string())?;
        drop(handle);
        vanish.push(until(&mut poller, &host, 404, started).await?);
    }
    let _ = child.kill();
    let _ = child.wait();
    for (what, mut v) in [("registration to first 200", appear), ("deregistration to first 404", vanish)] {
        v.sort();
        println!(
            "{what:<30} n={}  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  (target p99 <= 50 ms)",
            v.len(),
            percentile(&v, 0.5).as_secs_f64() * 1e3,
            percentile(&v, 0.99).as_secs_f64() * 1e3,
            v[v.len() - 1].as_secs_f64() * 1e3
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("router-propagation: {e}");
            ExitCode::FAILURE
        }
    }
}
