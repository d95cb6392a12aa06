//! `logship` killed with SIGKILL at random moments, twenty times, while a writer keeps
//! appending and rotating and the receiver sometimes stalls: the receiver, counting
//! per-line sequence numbers, has every line, and at most one batch again per kill.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keelson_testkit::syslog_counter::SyslogCounter;

const MAX_BATCH: u64 = 2048;

/// A small xorshift: the moments of the kills, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Kills its child on drop, so a failing test leaves no shipper behind.
struct Shipper(Child);

impl Drop for Shipper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &std::path::Path, to: std::net::SocketAddr) -> Shipper {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("logship.stderr")).expect("stderr file");
    Shipper(
        Command::new(env!("CARGO_BIN_EXE_logship"))
            .arg("--file")
            .arg(dir.join("app.log*"))
            .arg("--checkpoints")
            .arg(dir.join("state/files.json"))
            .arg("--to")
            .arg(format!("tcp://{to}"))
            .args(["--service", "crash", "--max-batch", &MAX_BATCH.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start logship"),
    )
}

#[test]
fn sigkill_under_flow_and_under_a_stalled_receiver_loses_nothing() {
    let kills: usize = std::env::var("KEELSON_LOGSHIP_KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(20);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1;
    println!("seed {seed}, {kills} kills");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let counter = SyslogCounter::start().expect("counter");

    // The writer: about 100k lines a second, renamed away every 150k lines (rotation
    // by rename; the rotated files stay matched by the pattern).
    let written = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dir, written, stop) = (dir.path().to_owned(), written.clone(), stop.clone());
        std::thread::spawn(move || {
            let live = dir.join("app.log");
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&live).expect("open");
            let mut seq = 0usize;
            let mut rotations = 0;
            while !stop.load(Ordering::SeqCst) {
                let mut chunk = String::new();
                for _ in 0..1000 {
                    chunk.push_str(&format!("seq={seq} {}\n", "payload-".repeat(8)));
                    seq += 1;
                }
                file.write_all(chunk.as_bytes()).expect("append");
                written.store(seq, Ordering::SeqCst);
                if seq.is_multiple_of(150_000) {
                    rotations += 1;
                    std::fs::rename(&live, dir.join(format!("app.log.{rotations}"))).expect("rotate");
                    file = std::fs::OpenOptions::new().create(true).append(true).open(&live).expect("reopen");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            seq
        })
    };

    let mut stalled_kills = 0;
    for k in 0..kills {
        let mut shipper = start(dir.path(), counter.addr());
        let stall = k % 4 == 3;
        std::thread::sleep(Duration::from_millis(100 + rng.below(400)));
        if stall {
            // The receiver stops reading; the shipper fills the socket buffers and waits.
            counter.stall(true);
            std::thread::sleep(Duration::from_millis(200 + rng.below(400)));
            stalled_kills += 1;
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(shipper.0.id() as i32), nix::sys::signal::Signal::SIGKILL).expect("kill -9");
        let _ = shipper.0.wait();
        counter.stall(false);
    }
    stop.store(true, Ordering::SeqCst);
    let total = writer.join().expect("writer");

    // A last shipper, left to finish.
    let _last = start(dir.path(), counter.addr());
    let counts = counter.wait_unique(total as u64, Duration::from_secs(120));
    let missing = counter.missing(total);
    println!("{total} lines written, {kills} kills ({stalled_kills} while stalled): {counts:?}");
    let stderr = std::fs::read_to_string(dir.path().join("logship.stderr")).unwrap_or_default();
    assert!(missing.is_empty(), "{} lines lost, first {:?}; logship said:\n{stderr}", missing.len(), &missing[..missing.len().min(10)]);
    assert_eq!(counts.unique, total as u64);
    assert_eq!(counts.unnumbered, 0);
    assert!(
        counts.duplicates <= kills as u64 * MAX_BATCH,
        "{} duplicates: more than one batch ({MAX_BATCH}) per kill ({kills})",
        counts.duplicates
    );
}
