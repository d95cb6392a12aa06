//! `logship` with its receiver stalled for 60 s while a writer keeps appending: files are
//! their own buffer, so memory stays flat (at most 2 MiB of movement after the first 5 s,
//! never above 32 MiB), and every line arrives once the receiver reads again.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_testkit::syslog_counter::SyslogCounter;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_stalled_receiver_leaves_memory_flat_and_loses_nothing() {
    let seconds: u64 = std::env::var("KEELSON_LOGSHIP_STALL_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let dir = tempfile::tempdir().expect("tempdir");
    let counter = SyslogCounter::start().expect("counter");
    counter.stall(true);
    let input = dir.path().join("app.log");
    std::fs::write(&input, "").expect("create");
    let shipper = Killed(
        Command::new(env!("CARGO_BIN_EXE_logship"))
            .arg("--file")
            .arg(&input)
            .arg("--to")
            .arg(format!("tcp://{}", counter.addr()))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start logship"),
    );
    let pid = shipper.0.id();
    // 20,000 lines a second of 100 bytes: 2 MB/s piling up in the file.
    let written = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (input, written, stop) = (input.clone(), written.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new().append(true).open(&input).expect("open");
            let start = Instant::now();
            let mut seq = 0;
            while !stop.load(Ordering::SeqCst) {
                let due = (start.elapsed().as_secs_f64() * 20_000.0) as usize;
                let mut chunk = String::new();
                while seq < due {
                    chunk.push_str(&format!("seq={seq:<10} {}\n", "m".repeat(84)));
                    seq += 1;
                }
                f.write_all(chunk.as_bytes()).expect("append");
                written.store(seq, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let began = Instant::now();
    let mut at_5s = 0;
    let (mut low, mut high) = (u64::MAX, 0);
    while began.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(250));
        let rss = rss_kib(pid);
        assert!(rss > 0, "logship died");
        if began.elapsed() < Duration::from_secs(5) {
            at_5s = rss;
        } else {
            low = low.min(rss);
            high = high.max(rss);
        }
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    let total = written.load(Ordering::SeqCst);
    println!("{seconds} s stalled, {total} lines written: RSS {at_5s} KiB at 5 s, {low}..{high} KiB after");
    assert!(high <= 32 * 1024, "RSS reached {high} KiB");
    assert!(high.saturating_sub(at_5s.min(low)) <= 2 * 1024, "RSS moved from {at_5s} KiB to {low}..{high} KiB after the first 5 s");
    counter.stall(false);
    let counts = counter.wait_unique(total as u64, Duration::from_secs(60));
    assert_eq!(counter.missing(total), Vec::<usize>::new(), "every line arrives once the receiver reads: {counts:?}");
    assert_eq!(counts.duplicates, 0, "no reconnect, so no duplicate");
}
