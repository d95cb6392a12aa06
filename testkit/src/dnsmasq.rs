//! A real dnsmasq on a free loopback port serving given A and SRV records, and nothing
//! else (no upstream resolvers, no /etc/hosts).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tools::{free_port, io, require, run, TestkitError};

/// A record dnsmasq serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsRecord {
    /// `name` has address `ip`.
    A {
        /// Fully qualified name.
        name: String,
        /// Address.
        ip: Ipv4Addr,
    },
    /// SRV record `name` (like `_web._tcp.example.test`) pointing at `target:port`.
    Srv {
        /// Fully qualified SRV owner name.
        name: String,
        /// Target host name.
        target: String,
        /// Port.
        port: u16,
        /// Priority.
        priority: u16,
        /// Weight.
        weight: u16,
    },
}

/// A running dnsmasq; killed on drop.
#[derive(Debug)]
pub struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// Starts dnsmasq with `records` (TTL `ttl` seconds) and waits until it answers.
    /// It is authoritative for the records' domains (their last two labels): unknown names
    /// there get NXDOMAIN; anything else is refused (no upstream).
    pub fn start(records: &[DnsRecord], ttl: u32) -> Result<Dnsmasq, TestkitError> {
        // UDP and TCP on the same number: pick a TCP port that is free, which is nearly
        // always free for UDP too on a test machine.
        Dnsmasq::start_on(free_port()?, records, ttl)
    }

    /// Like [`Dnsmasq::start`], on a given port.
    pub fn start_on(port: u16, records: &[DnsRecord], ttl: u32) -> Result<Dnsmasq, TestkitError> {
        let dnsmasq = require("dnsmasq", "dnsmasq-base")?;
        require("dig", "dnsutils")?;
        let dir = tempfile::tempdir().map_err(io("creating dnsmasq dir"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = Command::new(dnsmasq);
        cmd.args(["--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-poll"])
            .args(["--listen-address=127.0.0.1", "--bind-interfaces", "--user=root", "--group=root"])
            .arg(format!("--port={port}"))
            .arg(format!("--local-ttl={ttl}"))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut domains = std::collections::BTreeSet::new();
        for r in records {
            let name = match r {
                DnsRecord::A { name, ip } => {
                    cmd.arg(format!("--host-record={name},{ip}"));
                    name
                }
                DnsRecord::Srv { name, target, port, priority, weight } => {
                    cmd.arg(format!("--srv-host={name},{target},{port},{priority},{weight}"));
                    name
                }
            };
            let labels: Vec<&str> = name.trim_end_matches('.').rsplit('.').take(2).collect();
            domains.insert(labels.into_iter().rev().collect::<Vec<_>>().join("."));
        }
        for d in domains {
            cmd.arg(format!("--local=/{d}/"));
        }
        let child = cmd.spawn().map_err(io("starting dnsmasq"))?;
        let mut d = Dnsmasq { child, addr, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Any answer, even NXDOMAIN or REFUSED, means it is serving.
            if dig(addr, &["keelson-probe.invalid"]).is_ok_and(|out| out.contains("status:")) {
                return Ok(d);
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                return Err(TestkitError::Failed { what: "starting dnsmasq".into(), detail: format!("exited with {status}") });
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Failed { what: "starting dnsmasq".into(), detail: "no answer after 10 s".into() });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops this dnsmasq and starts one with `records` on the same port (a zone change,
    /// as clients see it).
    pub fn restart_with(self, records: &[DnsRecord], ttl: u32) -> Result<Dnsmasq, TestkitError> {
        let port = self.addr.port();
        drop(self);
        Dnsmasq::start_on(port, records, ttl)
    }

    /// The dnsmasq process id (to pin it to a core in benchmarks, say).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where it listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Asks with `dig +short` (an independent client) for `name` of `rtype`.
    pub fn dig_short(&self, name: &str, rtype: &str) -> Result<Vec<String>, TestkitError> {
        Ok(dig(self.addr, &["+short", name, rtype])?.lines().map(str::to_owned).collect())
    }
}

/// Runs `dig @addr -p port <args>` (Debian's dnsutils: an independent DNS client) with a
/// 2 s timeout and one try; its whole output.
pub fn dig(addr: SocketAddr, args: &[&str]) -> Result<String, TestkitError> {
    let dig = require("dig", "dnsutils")?;
    let server = format!("@{}", addr.ip());
    let port = addr.port().to_string();
    let mut all = vec!["+time=2", "+tries=1", server.as_str(), "-p", port.as_str()];
    all.extend_from_slice(args);
    run(&dig, &all)
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
