//! `volume-transfer`: moving a volume between two nodes. keelson: `serve_volumes` on one
//! `LocalVolumes` root, `fetch_volume` into another, over loopback HTTP (tar packing,
//! entry checks, all-or-nothing import included). Peer, in the same run: GNU tar piped
//! into tar (`tar -C src -cf - . | tar -C dst -xf -`), the usual way to copy a tree
//! with owners and modes, with no network and no checks: a floor rather than a rival.
//! Alternating runs, medians of `--rounds`; every copy is verified by size and removed.
//!
//! `cargo run --release -p keelson-benches --bin volume-transfer`

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use keelson_scheduler::{fetch_volume_with_token, serve_volumes, LocalVolumes, VolumeManager};

#[derive(Parser, Debug)]
#[command(about = "a volume between two nodes over HTTP against tar | tar")]
struct Args {
    /// Files in the volume.
    #[arg(long, default_value_t = 256)]
    files: usize,
    /// Size of each file in KiB.
    #[arg(long, default_value_t = 4096)]
    file_kib: usize,
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        total += if path.is_dir() { tree_bytes(&path) } else { entry.metadata().map(|m| m.len()).unwrap_or(0) };
    }
    total
}

fn tar_pipe(src: &Path, dst: &Path) -> Result<Duration, String> {
    std::fs::create_dir_all(dst).map_err(|e| e.to_string())?;
    let began = Instant::now();
    let mut pack = Command::new("tar")
        .args(["-C"])
        .arg(src)
        .args(["-cf", "-", "."])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("tar: {e}"))?;
    let stdout = pack.stdout.take().ok_or("tar has no stdout")?;
    let unpack = Command::new("tar").args(["-C"]).arg(dst).args(["-xf", "-"]).stdin(stdout).status().map_err(|e| format!("tar: {e}"))?;
    let packed = pack.wait().map_err(|e| format!("tar: {e}"))?;
    if !unpack.success() || !packed.success() {
        return Err("tar | tar failed".into());
    }
    Ok(began.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn run(args: Args) -> Result<(), String> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let source = Arc::new(LocalVolumes::new(work.path().join("node-a")).map_err(|e| e.to_string())?);
    let volume = source.create("bench", BTreeMap::new()).await.map_err(|e| e.to_string())?;
    let keelson_scheduler::MountSource::HostDir(data) = &volume.source else { return Err("a local volume is a directory".into()) };
    // Incompressible-looking contents (a cheap xorshift), in 16 directories.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut chunk = vec![0u8; args.file_kib * 1024];
    for i in 0..args.files {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        let dir = data.join(format!("d{:02}", i % 16));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join(format!("f{i:04}")), &chunk).map_err(|e| e.to_string())?;
    }
    let bytes = tree_bytes(data);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let served: Arc<dyn VolumeManager> = source.clone();
    tokio::spawn(serve_volumes(listener, served, "bench-token", std::future::pending()));
    let (mut ours, mut tars) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let dest = LocalVolumes::new(work.path().join(format!("node-b-{round}"))).map_err(|e| e.to_string())?;
        let began = Instant::now();
        let pulled = fetch_volume_with_token(addr, "bench", &dest, Some("bench-token")).await.map_err(|e| e.to_string())?;
        ours.push(began.elapsed());
        let keelson_scheduler::MountSource::HostDir(copy) = &pulled.source else { return Err("a local volume is a directory".into()) };
        if tree_bytes(copy) != bytes {
            return Err(format!("round {round}: the fetched volume has {} bytes, not {bytes}", tree_bytes(copy)));
        }
        dest.remove("bench").await.map_err(|e| e.to_string())?;
        let target = work.path().join(format!("tar-{round}"));
        tars.push(tar_pipe(data, &target)?);
        if tree_bytes(&target) != bytes {
            return Err(format!("round {round}: tar copied {} bytes, not {bytes}", tree_bytes(&target)));
        }
        std::fs::remove_dir_all(&target).map_err(|e| e.to_string())?;
    }
    let (k, t) = (median(ours), median(tars));
    let gib = bytes as f64 / f64::from(1u32 << 30);
    println!("volume of {} files, {:.2} GiB, medians of {} alternating runs", args.files, gib, args.rounds);
    println!(
        "keelson serve_volumes -> fetch_volume (HTTP, loopback): {:>8.1} ms  {:>6.2} GiB/s",
        k.as_secs_f64() * 1e3,
        gib / k.as_secs_f64()
    );
    println!(
        "tar -cf - . | tar -xf - (no network, no checks):     {:>8.1} ms  {:>6.2} GiB/s",
        t.as_secs_f64() * 1e3,
        gib / t.as_secs_f64()
    );
    println!("ratio keelson/tar (time): {:.2}", k.as_secs_f64() / t.as_secs_f64());
    Ok(())
}

fn main() -> ExitCode {
    keelson_benches::run_bench_main("volume-transfer", run(Args::parse()))
}
