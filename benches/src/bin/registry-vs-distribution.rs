//! `registry-vs-distribution`: keelson's registry against Debian's docker-registry
//! (CNCF distribution 2.8) in the same run, each on a filesystem store in a fresh
//! directory, each pinned to CPU 0; curl, skopeo and this program's load generators run
//! on CPU 1. Rounds are interleaved (the order alternates) and figures are medians.
//!
//! Figures:
//! - curl monolithic push (POST, then one PUT with the whole blob): MiB/s and the
//!   server's CPU seconds per GiB, read from `/proc/<pid>/stat`;
//! - skopeo push of an OCI layout with 4 layers of 128 MiB: MiB/s and server CPU;
//! - curl single-stream pull of the pushed blob: MiB/s;
//! - 256 concurrent uploads while 1,024 manifest-reader connections send GETs paced
//!   open-loop at 5,000/s in total: errors, manifest GET p99 (from each request's
//!   scheduled time, so a stall is not hidden), and the server's peak RSS;
//! - a catalog of 10,000 repositories listed with `n=100` from random places: p99.
//!
//! Every ratio is printed on its own line: `ratio <metric> keelson/distribution: <value>`
//! (for times and CPU a ratio below 1 is keelson ahead).
//!
//! `cargo run --release -p keelson-benches --bin registry-vs-distribution` (`--rounds`,
//! `--blob-mib`, `--load-seconds`, `--repos` to change the work).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use keelson_benches::proxy_bench::{median, tool, Fallible, LOAD_CPU, PROXY_CPU};
use keelson_registry::client::{Client, ClientConfig};
use keelson_registry::Digest;

#[derive(Parser, Debug)]
#[command(about = "keelson's registry against Debian's docker-registry, pinned CPUs")]
struct Args {
    /// Interleaved rounds of the push and pull figures.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Size of the curl push and pull blob, in MiB.
    #[arg(long, default_value_t = 512)]
    blob_mib: usize,
    /// Seconds of the concurrent upload and manifest-read phase, per server.
    #[arg(long, default_value_t = 20)]
    load_seconds: u64,
    /// Repositories in the catalog figure.
    #[arg(long, default_value_t = 10_000)]
    repos: usize,
    /// Internal: serve keelson's registry from this root (the server process).
    #[arg(long, hide = true)]
    serve_keelson: Option<PathBuf>,
    /// Internal: the address the server process listens on.
    #[arg(long, hide = true)]
    listen: Option<SocketAddr>,
}

/// A registry process under test, killed on drop.
struct Peer {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// User plus system CPU seconds so far.
    fn cpu_seconds(&self) -> f64 {
        keelson_benches::procstat::cpu_seconds(self.child.id())
    }

    /// Peak resident memory, MiB.
    fn peak_rss_mib(&self) -> f64 {
        keelson_benches::procstat::peak_rss_mib(self.child.id())
    }
}

fn free_addr() -> Fallible<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], keelson_testkit::free_port().map_err(|e| e.to_string())?)))
}

fn wait_up(addr: SocketAddr) -> Fallible<()> {
    keelson_testkit::wait_for_tcp(addr, Duration::from_secs(30)).map_err(|e| e.to_string())
}

fn start_keelson() -> Fallible<Peer> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let addr = free_addr()?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let child = Command::new("taskset")
        .args(["-c", PROXY_CPU])
        .arg(me)
        .arg("--serve-keelson")
        .arg(dir.path())
        .arg("--listen")
        .arg(addr.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting keelson: {e}"))?;
    let peer = Peer { name: "keelson", child, addr, _dir: dir };
    wait_up(addr)?;
    Ok(peer)
}

fn start_distribution() -> Fallible<Peer> {
    let bin = tool("docker-registry", "docker-registry")?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let addr = free_addr()?;
    let config = format!(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
        dir.path().join("data").display()
    );
    let config_path = dir.path().join("config.yml");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let child = Command::new("taskset")
        .args(["-c", PROXY_CPU])
        .arg(bin)
        .arg("serve")
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting docker-registry: {e}"))?;
    let peer = Peer { name: "distribution", child, addr, _dir: dir };
    wait_up(addr)?;
    Ok(peer)
}

/// The server process: keelson's registry with default settings, GC every 10 minutes.
fn serve_keelson(root: &Path, listen: SocketAddr) -> Fallible<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let registry =
            Arc::new(keelson_registry::Registry::open_dir(root, keelson_registry::RegistryConfig::default()).map_err(|e| e.to_string())?);
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| e.to_string())?;
        keelson_registry::server::Server::new(registry, keelson_registry::server::ServerConfig::default())
            .serve(listener, std::future::pending())
            .await;
        Ok(())
    })
}

/// Runs a command pinned to the load CPU; returns its wall time.
fn timed(program: &Path, args: &[String]) -> Fallible<Duration> {
    let started = Instant::now();
    let out = Command::new("taskset")
        .args(["-c", LOAD_CPU])
        .arg(program)
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", program.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed: {}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).chars().take(400).collect::<String>()
        ));
    }
    Ok(started.elapsed())
}

fn curl_out(args: &[String]) -> Fallible<String> {
    let out = Command::new("curl").args(args).output().map_err(|e| format!("curl: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// POST a session, PUT the whole file to it. Returns (MiB/s, server CPU s per GiB).
fn curl_push(curl: &Path, peer: &Peer, file: &Path, d: &Digest, repo: &str, mib: usize) -> Fallible<(f64, f64)> {
    let url = peer.url();
    let head = curl_out(&["-s".into(), "-i".into(), "-X".into(), "POST".into(), format!("{url}/v2/{repo}/blobs/uploads/")])?;
    let location = head
        .lines()
        .find_map(|l| l.strip_prefix("location: ").or_else(|| l.strip_prefix("Location: ")))
        .ok_or_else(|| format!("{}: no Location in {head:?}", peer.name))?
        .trim()
        .to_owned();
    let target = if location.starts_with("http") { location } else { format!("{url}{location}") };
    let sep = if target.contains('?') { '&' } else { '?' };
    let cpu = peer.cpu_seconds();
    let took = timed(
        curl,
        &[
            "-sf".into(),
            "-X".into(),
            "PUT".into(),
            "-H".into(),
            "Content-Type: application/octet-stream".into(),
            "--data-binary".into(),
            format!("@{}", file.display()),
            format!("{target}{sep}digest={d}"),
        ],
    )?;
    let cpu = peer.cpu_seconds() - cpu;
    Ok((mib as f64 / took.as_secs_f64(), cpu / (mib as f64 / 1024.0)))
}

fn curl_pull(curl: &Path, peer: &Peer, d: &Digest, repo: &str, mib: usize) -> Fallible<f64> {
    let took = timed(curl, &["-sf".into(), "-o".into(), "/dev/null".into(), format!("{}/v2/{repo}/blobs/{d}", peer.url())])?;
    Ok(mib as f64 / took.as_secs_f64())
}

/// `skopeo copy` of the layout's image to `repo:v1`. Returns (seconds, server CPU seconds).
fn skopeo_push(skopeo: &Path, peer: &Peer, layout: &Path, repo: &str) -> Fallible<(f64, f64)> {
    let cpu = peer.cpu_seconds();
    let took = timed(
        skopeo,
        &[
            "copy".into(),
            "--quiet".into(),
            "--preserve-digests".into(),
            "--dest-tls-verify=false".into(),
            format!("oci:{}:v1", layout.display()),
            format!("docker://{}/{repo}:v1", peer.addr),
        ],
    )?;
    Ok((took.as_secs_f64(), peer.cpu_seconds() - cpu))
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn pin_self_to_load_cpu() {
    let mut set = nix::sched::CpuSet::new();
    if set.set(LOAD_CPU.parse().unwrap_or(1)).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// A tiny OCI image manifest naming `config` only.
fn manifest_for(config: &Digest, len: usize, note: &str) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": len},
            "layers": [],
            "annotations": {"note": note},
        })
        .to_string(),
    )
}

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

async fn put_blob(client: &Client, repo: &str, bytes: Bytes) -> Fallible<Digest> {
    let d = Digest::of(&bytes);
    let r =
        client.raw(http::Method::POST, &format!("/v2/{repo}/blobs/uploads/"), &[], Bytes::new(), &[]).await.map_err(|e| e.to_string())?;
    let loc = r.headers.get(http::header::LOCATION).and_then(|v| v.to_str().ok()).ok_or("no Location")?.to_owned();
    let sep = if loc.contains('?') { '&' } else { '?' };
    let len = bytes.len().to_string();
    let headers = [(http::header::CONTENT_TYPE, "application/octet-stream".to_owned()), (http::header::CONTENT_LENGTH, len)];
    let r = client.raw(http::Method::PUT, &format!("{loc}{sep}digest={d}"), &headers, bytes, &[]).await.map_err(|e| e.to_string())?;
    if r.status != http::StatusCode::CREATED {
        return Err(format!("blob PUT answered {}", r.status));
    }
    Ok(d)
}

struct LoadFigures {
    p99_ms: f64,
    reads: usize,
    errors: usize,
    uploads: usize,
    rss_mib: f64,
    load_cpu_busy: f64,
}

/// 256 uploaders and 1,024 reader connections paced at 5,000 GET/s in total.
async fn concurrent_load(peer: &Peer, seconds: u64) -> Fallible<LoadFigures> {
    let client = Client::new(&peer.url(), None, ClientConfig::default()).map_err(|e| e.to_string())?;
    let config = Bytes::from_static(br#"{"architecture":"amd64","os":"linux"}"#);
    let c = put_blob(&client, "read/app", config.clone()).await?;
    for t in 0..100 {
        client
            .push_manifest(
                &"read/app".parse().map_err(|e: keelson_registry::Error| e.to_string())?,
                &format!("t{t}"),
                manifest_for(&c, config.len(), &t.to_string()),
                MANIFEST,
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    let errors = Arc::new(AtomicUsize::new(0));
    let uploads = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for u in 0..256usize {
        let (client, errors, uploads) = (client.clone(), errors.clone(), uploads.clone());
        tasks.push(tokio::spawn(async move {
            let mut body = vec![0u8; 256 * 1024];
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                body[..8].copy_from_slice(&n.to_le_bytes());
                body[8..16].copy_from_slice(&(u as u64).to_le_bytes());
                match put_blob(&client, &format!("up/u{u}"), Bytes::copy_from_slice(&body)).await {
                    Ok(_) => uploads.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let conns = 1024usize;
    let rate = 5000.0;
    let start = Instant::now() + Duration::from_millis(500);
    let mut readers = Vec::new();
    for k in 0..conns {
        let (errors, addr) = (errors.clone(), peer.addr);
        readers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                errors.fetch_add(1, Ordering::Relaxed);
                return lat;
            };
            let Ok((mut send, conn)) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(stream)).await
            else {
                errors.fetch_add(1, Ordering::Relaxed);
                return lat;
            };
            tokio::spawn(conn);
            let period = Duration::from_secs_f64(conns as f64 / rate);
            let mut at = start + Duration::from_secs_f64(k as f64 / rate);
            let mut j = 0usize;
            while at < deadline {
                tokio::time::sleep_until(at.into()).await;
                let req = http::Request::get(format!("/v2/read/app/manifests/t{}", (k + j) % 100))
                    .header(http::header::HOST, addr.to_string())
                    .header(http::header::ACCEPT, MANIFEST)
                    .body(Full::new(Bytes::new()));
                let ok = match req {
                    Ok(req) => match send.send_request(req).await {
                        Ok(resp) => resp.status() == http::StatusCode::OK && resp.into_body().collect().await.is_ok(),
                        Err(_) => false,
                    },
                    Err(_) => false,
                };
                if ok {
                    // From the scheduled moment: a late start counts as latency.
                    lat.push(at.elapsed().as_secs_f64() * 1000.0);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                j += 1;
                at += period;
            }
            lat
        }));
    }
    let (busy0, total0) = keelson_benches::proxy_bench::cpu_times(LOAD_CPU);
    let mut all = Vec::new();
    for r in readers {
        all.extend(r.await.map_err(|e| e.to_string())?);
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())?;
    }
    let (busy1, total1) = keelson_benches::proxy_bench::cpu_times(LOAD_CPU);
    let load_cpu_busy = (busy1 - busy0) as f64 / ((total1 - total0).max(1)) as f64;
    Ok(LoadFigures {
        reads: all.len(),
        p99_ms: percentile(all, 0.99),
        errors: errors.load(Ordering::Relaxed),
        uploads: uploads.load(Ordering::Relaxed),
        rss_mib: peer.peak_rss_mib(),
        load_cpu_busy,
    })
}

/// Fills `repos` repositories (a config mounted from a base, a manifest), then times
/// 1,000 catalog pages of 100 from random places. Returns p99 in ms.
async fn catalog(peer: &Peer, repos: usize) -> Fallible<f64> {
    let client = Client::new(&peer.url(), None, ClientConfig::default()).map_err(|e| e.to_string())?;
    let config = Bytes::from_static(br#"{"architecture":"amd64","os":"linux"}"#);
    let c = put_blob(&client, "base/app", config.clone()).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let mut fill = Vec::new();
    for _ in 0..32 {
        let (client, next, config_len) = (client.clone(), next.clone(), config.len());
        fill.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= repos {
                    return Ok::<(), String>(());
                }
                let repo = format!("cat/r{i:05}");
                let r = client
                    .raw(http::Method::POST, &format!("/v2/{repo}/blobs/uploads/?mount={c}&from=base/app"), &[], Bytes::new(), &[])
                    .await
                    .map_err(|e| e.to_string())?;
                if r.status != http::StatusCode::CREATED {
                    return Err(format!("mount into {repo} answered {}", r.status));
                }
                let name = repo.parse().map_err(|e: keelson_registry::Error| e.to_string())?;
                client.push_manifest(&name, "v1", manifest_for(&c, config_len, "catalog"), MANIFEST).await.map_err(|e| e.to_string())?;
            }
        }));
    }
    for f in fill {
        f.await.map_err(|e| e.to_string())??;
    }
    let mut rng = keelson_benches::SplitMix::new(7);
    let mut lat = Vec::new();
    for _ in 0..1000 {
        let last = format!("cat/r{:05}", rng.below(repos as u64));
        let started = Instant::now();
        let r = client
            .raw(http::Method::GET, &format!("/v2/_catalog?n=100&last={last}"), &[], Bytes::new(), &[])
            .await
            .map_err(|e| e.to_string())?;
        lat.push(started.elapsed().as_secs_f64() * 1000.0);
        if r.status != http::StatusCode::OK {
            return Err(format!("catalog answered {}", r.status));
        }
    }
    Ok(percentile(lat, 0.99))
}

fn ratio(metric: &str, k: f64, d: f64) {
    println!("ratio {metric} keelson/distribution: {:.2}", k / d);
}

fn run(args: &Args) -> Fallible<()> {
    let curl = tool("curl", "curl")?;
    let skopeo = tool("skopeo", "skopeo")?;
    tool("docker-registry", "docker-registry")?;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let blob = work.path().join("blob");
    let bytes = keelson_testkit::oci::random_bytes(args.blob_mib << 20, 42);
    let d = Digest::of(&bytes);
    std::fs::write(&blob, &bytes).map_err(|e| e.to_string())?;
    drop(bytes);
    let skopeo_mib = 4 * 128;

    let keelson = start_keelson()?;
    let distribution = start_distribution()?;
    let peers = [&keelson, &distribution];
    let mut push = [Vec::new(), Vec::new()];
    let mut push_cpu = [Vec::new(), Vec::new()];
    let mut pull = [Vec::new(), Vec::new()];
    let mut sk = [Vec::new(), Vec::new()];
    let mut sk_cpu = [Vec::new(), Vec::new()];
    let mut remount = [Vec::new(), Vec::new()];
    for round in 0..args.rounds {
        // Fresh layers each round: skopeo remembers which registry holds a blob and
        // would mount instead of uploading.
        let layout = work.path().join(format!("layout{round}"));
        keelson_testkit::oci::write_layout(&layout, "v1", &[("linux", "amd64")], &[128 << 20; 4], round as u64 + 9)
            .map_err(|e| e.to_string())?;
        for i in 0..2 {
            let p = if round % 2 == 0 { i } else { 1 - i };
            let peer = peers[p];
            let repo = format!("bench/curl{round}");
            let (mibs, cpu) = curl_push(&curl, peer, &blob, &d, &repo, args.blob_mib)?;
            push[p].push(mibs);
            push_cpu[p].push(cpu);
            pull[p].push(curl_pull(&curl, peer, &d, &repo, args.blob_mib)?);
            let (secs, cpu) = skopeo_push(&skopeo, peer, &layout, &format!("bench/skopeo{round}"))?;
            sk[p].push(skopeo_mib as f64 / secs);
            sk_cpu[p].push(cpu);
            // The same image to another repository: skopeo mounts every layer.
            remount[p].push(skopeo_push(&skopeo, peer, &layout, &format!("bench/mounted{round}"))?.0);
            eprintln!(
                "round {round} {}: push {:.0} MiB/s ({:.2} CPU-s/GiB), pull {:.0} MiB/s, skopeo {:.0} MiB/s ({:.2} CPU-s)",
                peer.name,
                push[p].last().copied().unwrap_or(0.0),
                push_cpu[p].last().copied().unwrap_or(0.0),
                pull[p].last().copied().unwrap_or(0.0),
                sk[p].last().copied().unwrap_or(0.0),
                sk_cpu[p].last().copied().unwrap_or(0.0)
            );
        }
        let _ = std::fs::remove_dir_all(&layout);
    }
    let m = |v: &Vec<f64>| median(v.clone());
    println!(
        "curl monolithic push {} MiB: keelson {:.0} MiB/s ({:.2} server CPU-s/GiB), distribution {:.0} MiB/s ({:.2} CPU-s/GiB)",
        args.blob_mib,
        m(&push[0]),
        m(&push_cpu[0]),
        m(&push[1]),
        m(&push_cpu[1])
    );
    ratio("curl-push-throughput", m(&push[0]), m(&push[1]));
    ratio("curl-push-cpu-per-gib", m(&push_cpu[0]), m(&push_cpu[1]));
    println!(
        "skopeo push 4x128 MiB: keelson {:.0} MiB/s ({:.2} server CPU-s), distribution {:.0} MiB/s ({:.2} CPU-s)",
        m(&sk[0]),
        m(&sk_cpu[0]),
        m(&sk[1]),
        m(&sk_cpu[1])
    );
    ratio("skopeo-push-throughput", m(&sk[0]), m(&sk[1]));
    ratio("skopeo-push-server-cpu", m(&sk_cpu[0]), m(&sk_cpu[1]));
    println!("skopeo re-push to a new repository (cross-mount): keelson {:.2} s, distribution {:.2} s", m(&remount[0]), m(&remount[1]));
    ratio("skopeo-cross-mount-time", m(&remount[0]), m(&remount[1]));
    println!("curl pull {} MiB single stream: keelson {:.0} MiB/s, distribution {:.0} MiB/s", args.blob_mib, m(&pull[0]), m(&pull[1]));
    ratio("pull-throughput", m(&pull[0]), m(&pull[1]));

    pin_self_to_load_cpu();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().map_err(|e| e.to_string())?;
    let mut load = Vec::new();
    for peer in peers {
        let f = rt.block_on(concurrent_load(peer, args.load_seconds))?;
        println!(
            "{}: 256 uploaders + 1024 readers at 5000 GET/s for {} s: {} reads, manifest GET p99 {:.2} ms, {} uploads, {} errors, peak RSS {:.0} MiB, load CPU {:.0}% busy{}",
            peer.name, args.load_seconds, f.reads, f.p99_ms, f.uploads, f.errors, f.rss_mib, f.load_cpu_busy * 100.0,
            if f.load_cpu_busy > 0.95 { " (the generator was the limit: figures are of the generator as much as the server)" } else { "" }
        );
        load.push(f);
    }
    ratio("manifest-get-p99-under-load", load[0].p99_ms, load[1].p99_ms);
    ratio("peak-rss-under-load", load[0].rss_mib, load[1].rss_mib);
    let mut cat = Vec::new();
    for peer in peers {
        let p99 = rt.block_on(catalog(peer, args.repos))?;
        println!("{}: catalog of {} repositories, n=100 from random places: p99 {:.2} ms", peer.name, args.repos, p99);
        cat.push(p99);
    }
    ratio("catalog-p99", cat[0], cat[1]);
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = match (&args.serve_keelson, args.listen) {
        (Some(root), Some(listen)) => serve_keelson(root, listen),
        (Some(_), None) => Err("--serve-keelson needs --listen".into()),
        _ => run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("registry-vs-distribution: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
