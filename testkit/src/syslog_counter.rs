//! A syslog receiver that counts: it reads octet-counted (or newline-framed) frames on
//! loopback TCP, finds `seq=<n>` in each, and tells which numbers came, how often, and
//! which are missing. It can stall (stop reading, so its socket buffers fill and the
//! sender must wait) and be pinned to one core, away from the sender.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::tools::{io, TestkitError};

/// What the counter received so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Complete frames.
    pub frames: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Distinct sequence numbers.
    pub unique: u64,
    /// Frames whose sequence number had come before.
    pub duplicates: u64,
    /// Frames without `seq=<n>`.
    pub unnumbered: u64,
    /// Connections that ended inside a frame (a sender killed mid-write).
    pub torn: u64,
}

#[derive(Debug, Default)]
struct Seen {
    times: Vec<u32>,
    unique: u64,
    duplicates: u64,
    unnumbered: u64,
}

impl Seen {
    fn record(&mut self, frame: &[u8]) {
        let Some(at) = memchr::memmem::find(frame, b"seq=") else {
            self.unnumbered += 1;
            return;
        };
        let digits = frame[at + 4..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .fold(None, |n: Option<usize>, b| Some(n.unwrap_or(0).saturating_mul(10).saturating_add(usize::from(b - b'0'))));
        let Some(n) = digits.filter(|n| *n < 1 << 30) else {
            self.unnumbered += 1;
            return;
        };
        if n >= self.times.len() {
            self.times.resize((n + 1).next_power_of_two(), 0);
        }
        if self.times[n] == 0 {
            self.unique += 1;
        } else {
            self.duplicates += 1;
        }
        self.times[n] = self.times[n].saturating_add(1);
    }
}

/// A running counter; its thread stops on drop.
#[derive(Debug)]
pub struct SyslogCounter {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    frames: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    torn: Arc<AtomicU64>,
    stalled: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SyslogCounter {
    /// Listens on a free loopback port.
    pub fn start() -> Result<SyslogCounter, TestkitError> {
        Self::start_on_cpu(None)
    }

    /// Listens on a free loopback port, its thread pinned to `cpu` if given.
    pub fn start_on_cpu(cpu: Option<usize>) -> Result<SyslogCounter, TestkitError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("binding the syslog counter"))?;
        listener.set_nonblocking(true).map_err(io("setting the counter's listener non-blocking"))?;
        let addr = listener.local_addr().map_err(io("reading the counter's address"))?;
        let mut c = SyslogCounter {
            addr,
            seen: Arc::default(),
            frames: Arc::default(),
            bytes: Arc::default(),
            torn: Arc::default(),
            stalled: Arc::default(),
            stop: Arc::default(),
            thread: None,
        };
        let (seen, frames, bytes, torn, stalled, stop) =
            (c.seen.clone(), c.frames.clone(), c.bytes.clone(), c.torn.clone(), c.stalled.clone(), c.stop.clone());
        let thread = std::thread::Builder::new()
            .name("syslog-counter".into())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    let mut set = nix::sched::CpuSet::new();
                    if set.set(cpu).is_ok() {
                        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
                    }
                }
                let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
                    while !stop.load(Ordering::Relaxed) {
                        let accepted = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
                        let Ok(Ok((stream, _))) = accepted else { continue };
                        let conn = Conn {
                            seen: seen.clone(),
                            frames: frames.clone(),
                            bytes: bytes.clone(),
                            torn: torn.clone(),
                            stalled: stalled.clone(),
                        };
                        tokio::spawn(conn.run(stream));
                    }
                });
            })
            .map_err(io("starting the counter thread"))?;
        c.thread = Some(thread);
        Ok(c)
    }

    /// Where senders connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops (true) or resumes (false) reading.
    pub fn stall(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::SeqCst);
    }

    /// Counts so far.
    pub fn counts(&self) -> Counts {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        Counts {
            frames: self.frames.load(Ordering::SeqCst),
            bytes: self.bytes.load(Ordering::SeqCst),
            unique: seen.unique,
            duplicates: seen.duplicates,
            unnumbered: seen.unnumbered,
            torn: self.torn.load(Ordering::SeqCst),
        }
    }

    /// Sequence numbers below `upto` that never came.
    pub fn missing(&self, upto: usize) -> Vec<usize> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        (0..upto).filter(|n| seen.times.get(*n).is_none_or(|t| *t == 0)).collect()
    }

    /// Waits until `unique` distinct numbers came, or `within` passed; the counts then.
    pub fn wait_unique(&self, unique: u64, within: Duration) -> Counts {
        let deadline = std::time::Instant::now() + within;
        loop {
            let c = self.counts();
            if c.unique >= unique || std::time::Instant::now() >= deadline {
                return c;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SyslogCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.stalled.store(false, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Conn {
    seen: Arc<Mutex<Seen>>,
    frames: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    torn: Arc<AtomicU64>,
    stalled: Arc<AtomicBool>,
}

impl Conn {
    async fn run(self, mut stream: tokio::net::TcpStream) {
        let mut buf = vec![0u8; 1 << 20];
        let mut filled = 0;
        loop {
            while self.stalled.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if filled == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            let n = match stream.read(&mut buf[filled..]).await {
                Ok(0) | Err(_) => {
                    if filled > 0 {
                        self.torn.fetch_add(1, Ordering::SeqCst);
                    }
                    return;
                }
                Ok(n) => n,
            };
            self.bytes.fetch_add(n as u64, Ordering::Relaxed);
            filled += n;
            let used = self.frames_in(&buf[..filled]);
            buf.copy_within(used..filled, 0);
            filled -= used;
        }
    }

    /// Counts the complete frames at the start of `data`; returns the bytes they take.
    fn frames_in(&self, data: &[u8]) -> usize {
        let mut at = 0;
        let mut frames = 0;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let rest = &data[at..];
            let frame = if rest.first().is_some_and(u8::is_ascii_digit) {
                // Octet counting: LEN SP FRAME.
                let Some(sp) = memchr::memchr(b' ', rest) else { break };
                let Some(len) = std::str::from_utf8(&rest[..sp]).ok().and_then(|s| s.parse::<usize>().ok()) else { break };
                if rest.len() < sp + 1 + len {
                    break;
                }
                at += sp + 1 + len;
                &rest[sp + 1..sp + 1 + len]
            } else {
                // Newline framing.
                let Some(nl) = memchr::memchr(b'\n', rest) else { break };
                at += nl + 1;
                &rest[..nl]
            };
            seen.record(frame);
            frames += 1;
        }
        self.frames.fetch_add(frames, Ordering::Relaxed);
        at
    }
}
