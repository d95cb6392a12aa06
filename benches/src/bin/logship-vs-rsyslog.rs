//! `logship-vs-rsyslog`: keelson's file source and syslog sink against Debian's rsyslog
//! (imfile → omfwd) and syslog-ng (file() → syslog()), in the same run. Each shipper
//! reads the same file of numbered lines and sends RFC 5424 over TCP with octet counting
//! to a counting receiver ([`SyslogCounter`]) pinned to CPU 1; the shipper is pinned to
//! CPU 0. Rounds are interleaved (the order rotates) and figures are medians.
//!
//! Figures per shipper: lines/s and MiB/s from the first frame to the last line counted,
//! CPU milliseconds per input MiB (`/proc/<pid>/stat`), peak RSS while flowing; then,
//! once per shipper, the receiver stalled while a writer keeps appending: RSS after 5 s,
//! the largest RSS after that, and whether every line arrived once the receiver read
//! again. Every ratio is printed as `ratio <metric> keelson/<peer>: <value>`.
//!
//! syslog-ng and rsyslog conflict as Debian's system log daemon, so syslog-ng-core is
//! unpacked (`apt-get download`, `dpkg -x`) into `target/bench-cache/syslog-ng` and run
//! from there; its libraries come from Debian's packages.
//!
//! `cargo run --release -p keelson-benches --bin logship-vs-rsyslog` (`--rounds`,
//! `--lines`, `--stall-seconds`, `--no-syslog-ng`).

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use keelson_benches::procstat::{cpu_seconds, peak_rss_mib, rss_mib};
use keelson_benches::proxy_bench::{median, tool, Fallible, LOAD_CPU, PROXY_CPU};
use keelson_testkit::syslog_counter::SyslogCounter;

#[derive(Parser, Debug)]
#[command(about = "keelson's log shipper against rsyslog and syslog-ng, pinned CPUs")]
struct Args {
    /// Interleaved rounds of the throughput figures.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Lines in the input file.
    #[arg(long, default_value_t = 3_000_000)]
    lines: usize,
    /// Bytes per line, newline included.
    #[arg(long, default_value_t = 100)]
    line_bytes: usize,
    /// Seconds the receiver stalls in the memory figure (per shipper).
    #[arg(long, default_value_t = 600)]
    stall_seconds: u64,
    /// Lines a second appended while the receiver stalls.
    #[arg(long, default_value_t = 20_000)]
    stall_rate: usize,
    /// Leave syslog-ng out.
    #[arg(long)]
    no_syslog_ng: bool,
    /// Internal: ship this file (the keelson shipper process).
    #[arg(long, hide = true)]
    ship: Option<PathBuf>,
    /// Internal: the receiver the shipper sends to.
    #[arg(long, hide = true)]
    to: Option<SocketAddr>,
    /// Internal: the shipper's checkpoint file.
    #[arg(long, hide = true)]
    checkpoints: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Keelson,
    Rsyslog,
    SyslogNg,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Keelson => "keelson",
            Kind::Rsyslog => "rsyslog",
            Kind::SyslogNg => "syslog-ng",
        }
    }
}

/// A shipper process in its own process group, killed (with anything it started) on drop.
struct Peer {
    child: Child,
    _state: tempfile::TempDir,
}

impl Peer {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let (Some(file), Some(to), Some(checkpoints)) = (&args.ship, args.to, &args.checkpoints) {
        return ship(file, to, checkpoints);
    }
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("logship-vs-rsyslog: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The keelson shipper: one thread, file source to syslog sink, retrying forever.
fn ship(file: &Path, to: SocketAddr, checkpoints: &Path) -> std::process::ExitCode {
    use keelson_logship::{FileSource, FileSourceConfig, Labels, ShipConfig, Shipper, SyslogSink, SyslogSinkConfig, SyslogTransport};
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return std::process::ExitCode::FAILURE };
    let result: Result<(), keelson_logship::Error> = rt.block_on(async {
        let mut config = FileSourceConfig::new([file.display().to_string()]);
        config.labels = Labels::new("bench", "1");
        config.checkpoints = Some(checkpoints.to_owned());
        let mut source = FileSource::new(config)?;
        let sink = SyslogSink::new(SyslogSinkConfig::new(SyslogTransport::Tcp(to.to_string())))?;
        let mut shipper = Shipper::new(ShipConfig::default())?;
        loop {
            if let Err(e) = shipper.run(&mut source, &sink).await {
                eprintln!("keelson shipper: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    eprintln!("keelson shipper: {result:?}");
    std::process::ExitCode::FAILURE
}

fn pinned(program: &Path) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", PROXY_CPU]).arg(program).env("RUST_LOG", "warn").process_group(0).stdin(Stdio::null()).stdout(Stdio::null());
    cmd
}

fn start(kind: Kind, input: &Path, to: SocketAddr, syslog_ng: Option<&Path>) -> Fallible<Peer> {
    let state = tempfile::tempdir().map_err(|e| e.to_string())?;
    let stderr = std::fs::File::create(state.path().join("stderr")).map_err(|e| e.to_string())?;
    let child = match kind {
        Kind::Keelson => {
            let me = std::env::current_exe().map_err(|e| e.to_string())?;
            pinned(&me)
                .arg("--ship")
                .arg(input)
                .arg("--to")
                .arg(to.to_string())
                .arg("--checkpoints")
                .arg(state.path().join("files.json"))
                .stderr(stderr)
                .spawn()
        }
        Kind::Rsyslog => {
            let conf = format!(
                r#"global(workDirectory="{state}" maxMessageSize="64k")
module(load="imfile")
input(type="imfile" file="{input}" tag="bench" facility="user" severity="info" freshStartTail="off")
action(type="omfwd" target="127.0.0.1" port="{port}" protocol="tcp" tcp_framing="octet-counted" template="RSYSLOG_SyslogProtocol23Format")
"#,
                state = state.path().display(),
                input = input.display(),
                port = to.port()
            );
            std::fs::write(state.path().join("rsyslog.conf"), conf).map_err(|e| e.to_string())?;
            pinned(&tool("rsyslogd", "rsyslog")?)
                .arg("-n")
                .arg("-f")
                .arg(state.path().join("rsyslog.conf"))
                .arg("-i")
                .arg(state.path().join("pid"))
                .stderr(stderr)
                .spawn()
        }
        Kind::SyslogNg => {
            let root = syslog_ng.ok_or("syslog-ng is not unpacked")?;
            let conf = format!(
                r#"@version: 3.38
options {{ stats-freq(0); }};
source s {{ file("{input}" follow-freq(0.1) flags(no-parse)); }};
destination d {{ syslog("127.0.0.1" transport("tcp") port({port})); }};
log {{ source(s); destination(d); flags(flow-control); }};
"#,
                input = input.display(),
                port = to.port()
            );
            std::fs::write(state.path().join("syslog-ng.conf"), conf).map_err(|e| e.to_string())?;
            let lib = root.join("usr/lib/syslog-ng");
            pinned(&root.join("usr/sbin/syslog-ng"))
                .env("LD_LIBRARY_PATH", &lib)
                .arg("-F")
                .arg("--no-caps")
                .arg("-f")
                .arg(state.path().join("syslog-ng.conf"))
                .arg(format!("--module-path={}", lib.join("3.38").display()))
                .arg(format!("--persist-file={}", state.path().join("persist").display()))
                .arg(format!("--pidfile={}", state.path().join("pid").display()))
                .arg(format!("--control={}", state.path().join("ctl").display()))
                .stderr(stderr)
                .spawn()
        }
    }
    .map_err(|e| format!("starting {}: {e}", kind.name()))?;
    Ok(Peer { child, _state: state })
}

/// syslog-ng-core unpacked beside the build (it conflicts with rsyslog as a system
/// package), with the libraries it links installed from Debian.
fn unpack_syslog_ng() -> Fallible<PathBuf> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let cache = me.parent().and_then(Path::parent).ok_or("no target directory")?.join("bench-cache/syslog-ng");
    let binary = cache.join("usr/sbin/syslog-ng");
    if !binary.exists() {
        std::fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
        let ok = Command::new("apt-get").args(["download", "syslog-ng-core"]).current_dir(&cache).status().map_err(|e| e.to_string())?;
        if !ok.success() {
            return Err("apt-get download syslog-ng-core failed".into());
        }
        let deb = std::fs::read_dir(&cache)
            .map_err(|e| e.to_string())?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or("no syslog-ng-core .deb downloaded")?;
        let ok = Command::new("dpkg").arg("-x").arg(&deb).arg(&cache).status().map_err(|e| e.to_string())?;
        if !ok.success() {
            return Err(format!("dpkg -x {} failed", deb.display()));
        }
    }
    let ldd =
        Command::new("ldd").arg(&binary).env("LD_LIBRARY_PATH", cache.join("usr/lib/syslog-ng")).output().map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&ldd.stdout).contains("not found") {
        let ok = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "libivykis0",
                "libnet1",
                "libwrap0",
                "libjson-c5",
                "libpcre3",
                "libglib2.0-0",
                "libcap2",
                "libssl3",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| e.to_string())?;
        if !ok.success() {
            return Err("installing syslog-ng's libraries failed".into());
        }
    }
    Ok(cache)
}

/// One line of exactly `bytes` bytes (newline included) carrying `seq`.
fn line(seq: usize, bytes: usize) -> String {
    let mut l = format!("seq={seq} ");
    while l.len() + 1 < bytes {
        l.push((b'a' + (l.len() % 26) as u8) as char);
    }
    l.push('\n');
    l
}

fn write_input(path: &Path, lines: usize, bytes: usize) -> Fallible<u64> {
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).map_err(|e| e.to_string())?);
    let mut total = 0;
    for i in 0..lines {
        let l = line(i, bytes);
        total += l.len() as u64;
        out.write_all(l.as_bytes()).map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())?;
    Ok(total)
}

#[derive(Clone, Copy, Debug, Default)]
struct Flow {
    lines_per_s: f64,
    mib_per_s: f64,
    cpu_ms_per_mib: f64,
    peak_rss_mib: f64,
    duplicates: u64,
    /// Share of a core the receiver (this process) used: near 1, it was the limit.
    receiver_busy: f64,
}

/// Ships the whole input once; the figures from the first frame to the last line.
fn flow(kind: Kind, input: &Path, lines: usize, input_bytes: u64, syslog_ng: Option<&Path>) -> Fallible<Flow> {
    let counter = SyslogCounter::start_on_cpu(LOAD_CPU.parse().ok()).map_err(|e| e.to_string())?;
    let peer = start(kind, input, counter.addr(), syslog_ng)?;
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut first: Option<(Instant, f64)> = None;
    let me = std::process::id();
    let mut last_progress = (0u64, Instant::now());
    loop {
        let c = counter.counts();
        if first.is_none() && c.frames > 0 {
            first = Some((Instant::now(), cpu_seconds(me)));
        }
        if c.unique >= lines as u64 {
            let (began, receiver_cpu) = first.unwrap_or((Instant::now(), 0.0));
            let secs = began.elapsed().as_secs_f64().max(1e-3);
            let cpu = cpu_seconds(peer.pid());
            let mib = input_bytes as f64 / (1 << 20) as f64;
            return Ok(Flow {
                lines_per_s: lines as f64 / secs,
                mib_per_s: mib / secs,
                cpu_ms_per_mib: cpu * 1000.0 / mib,
                peak_rss_mib: peak_rss_mib(peer.pid()),
                duplicates: c.duplicates,
                receiver_busy: (cpu_seconds(me) - receiver_cpu) / secs,
            });
        }
        if c.unique > last_progress.0 {
            last_progress = (c.unique, Instant::now());
        }
        if Instant::now() > deadline || last_progress.1.elapsed() > Duration::from_secs(60) {
            return Err(format!("{} delivered {} of {lines} lines and stopped", kind.name(), c.unique));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Stall {
    rss_at_5s: f64,
    max_rss_after_5s: f64,
    rss_at_end: f64,
    written: usize,
    lost: usize,
}

/// The receiver stalls for `seconds` while a writer appends `rate` lines a second.
fn stall(kind: Kind, dir: &Path, seconds: u64, rate: usize, bytes: usize, syslog_ng: Option<&Path>) -> Fallible<Stall> {
    let input = dir.join(format!("stall-{}.log", kind.name()));
    std::fs::write(&input, "").map_err(|e| e.to_string())?;
    let counter = SyslogCounter::start_on_cpu(LOAD_CPU.parse().ok()).map_err(|e| e.to_string())?;
    counter.stall(true);
    let peer = start(kind, &input, counter.addr(), syslog_ng)?;
    let written = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (input, written, stop) = (input.clone(), written.clone(), stop.clone());
        std::thread::spawn(move || -> Fallible<()> {
            let mut f = std::fs::OpenOptions::new().append(true).open(&input).map_err(|e| e.to_string())?;
            let start = Instant::now();
            let mut seq = 0;
            while !stop.load(Ordering::SeqCst) {
                let due = (start.elapsed().as_secs_f64() * rate as f64) as usize;
                let mut chunk = String::new();
                while seq < due {
                    chunk.push_str(&line(seq, bytes));
                    seq += 1;
                }
                f.write_all(chunk.as_bytes()).map_err(|e| e.to_string())?;
                written.store(seq, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        })
    };
    let began = Instant::now();
    let mut out = Stall::default();
    while began.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(500));
        let rss = rss_mib(peer.pid());
        if began.elapsed() < Duration::from_secs(5) {
            out.rss_at_5s = rss;
        } else {
            out.max_rss_after_5s = out.max_rss_after_5s.max(rss);
        }
        out.rss_at_end = rss;
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().map_err(|_| "writer panicked")??;
    out.written = written.load(Ordering::SeqCst);
    counter.stall(false);
    counter.wait_unique(out.written as u64, Duration::from_secs(300));
    out.lost = counter.missing(out.written).len();
    drop(peer);
    Ok(out)
}

fn run(args: &Args) -> Fallible<()> {
    tool("taskset", "util-linux")?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let input = dir.path().join("input.log");
    let input_bytes = write_input(&input, args.lines, args.line_bytes)?;
    let syslog_ng = if args.no_syslog_ng { None } else { Some(unpack_syslog_ng()?) };
    let mut kinds = vec![Kind::Keelson, Kind::Rsyslog];
    if syslog_ng.is_some() {
        kinds.push(Kind::SyslogNg);
    }
    println!(
        "input: {} lines of {} bytes ({:.0} MiB); shipper on CPU {PROXY_CPU}, receiver on CPU {LOAD_CPU}",
        args.lines,
        args.line_bytes,
        input_bytes as f64 / (1 << 20) as f64
    );
    let mut flows: Vec<Vec<Flow>> = vec![Vec::new(); kinds.len()];
    for round in 0..args.rounds {
        for k in 0..kinds.len() {
            let i = (k + round) % kinds.len();
            let f = flow(kinds[i], &input, args.lines, input_bytes, syslog_ng.as_deref())?;
            println!(
                "round {round} {:<9} {:>10.0} lines/s {:>7.1} MiB/s {:>7.2} ms CPU/MiB {:>6.1} MiB peak RSS {:>7} duplicates; receiver {:.0}% busy{}",
                kinds[i].name(),
                f.lines_per_s,
                f.mib_per_s,
                f.cpu_ms_per_mib,
                f.peak_rss_mib,
                f.duplicates,
                f.receiver_busy * 100.0,
                if f.receiver_busy > 0.9 { " (the receiver was the limit)" } else { "" }
            );
            flows[i].push(f);
        }
    }
    let med = |i: usize, pick: fn(&Flow) -> f64| median(flows[i].iter().map(pick).collect());
    println!("\nmedians of {} rounds:", args.rounds);
    for (i, kind) in kinds.iter().enumerate() {
        println!(
            "{:<9} {:>10.0} lines/s {:>7.1} MiB/s {:>7.2} ms CPU/MiB {:>6.1} MiB peak RSS",
            kind.name(),
            med(i, |f| f.lines_per_s),
            med(i, |f| f.mib_per_s),
            med(i, |f| f.cpu_ms_per_mib),
            med(i, |f| f.peak_rss_mib)
        );
    }
    let mut stalls = Vec::new();
    for kind in &kinds {
        let s = stall(*kind, dir.path(), args.stall_seconds, args.stall_rate, args.line_bytes, syslog_ng.as_deref())?;
        println!(
            "stall {:<9} {}s at {} lines/s: RSS {:.1} MiB at 5 s, at most {:.1} MiB after, {:.1} MiB at the end; {} lines written, {} lost",
            kind.name(),
            args.stall_seconds,
            args.stall_rate,
            s.rss_at_5s,
            s.max_rss_after_5s,
            s.rss_at_end,
            s.written,
            s.lost
        );
        stalls.push(s);
    }
    println!();
    for (i, kind) in kinds.iter().enumerate().skip(1) {
        let peer = kind.name();
        println!("ratio lines_per_s keelson/{peer}: {:.2}", med(0, |f| f.lines_per_s) / med(i, |f| f.lines_per_s));
        println!("ratio cpu_ms_per_mib keelson/{peer}: {:.2}", med(0, |f| f.cpu_ms_per_mib) / med(i, |f| f.cpu_ms_per_mib));
        println!("ratio peak_rss_flowing keelson/{peer}: {:.2}", med(0, |f| f.peak_rss_mib) / med(i, |f| f.peak_rss_mib));
        println!("ratio max_rss_stalled keelson/{peer}: {:.2}", stalls[0].max_rss_after_5s / stalls[i].max_rss_after_5s.max(0.1));
    }
    Ok(())
}
