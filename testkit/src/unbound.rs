//! A real recursive resolver (Debian's `unbound`) on a free loopback port, forwarding one
//! private zone to a server under test, with unbound's default hardening otherwise on
//! (DNSSEC validation included: the private zone is declared insecure, as it must be).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::dnsmasq::dig;
use crate::tools::{free_port, io, require, TestkitError};

/// A running unbound; killed on drop.
#[derive(Debug)]
pub struct Unbound {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Unbound {
    /// Starts unbound resolving `zone` through the server at `upstream` and waits until it
    /// answers (up to 10 s).
    pub fn forwarding(zone: &str, upstream: SocketAddr) -> Result<Unbound, TestkitError> {
        let unbound = require("unbound", "unbound")?;
        let dir = tempfile::tempdir().map_err(io("creating unbound dir"))?;
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let zone = zone.trim_end_matches('.');
        let config = format!(
            "server:\n\
             \x20 interface: 127.0.0.1\n\
             \x20 port: {port}\n\
             \x20 do-daemonize: no\n\
             \x20 username: \"\"\n\
             \x20 chroot: \"\"\n\
             \x20 directory: \"{dir}\"\n\
             \x20 pidfile: \"{dir}/unbound.pid\"\n\
             \x20 logfile: \"\"\n\
             \x20 use-syslog: no\n\
             \x20 verbosity: 1\n\
             \x20 access-control: 127.0.0.0/8 allow\n\
             \x20 do-not-query-localhost: no\n\
             \x20 domain-insecure: \"{zone}\"\n\
             \x20 local-zone: \"{tld}.\" nodefault\n\
             \x20 num-threads: 1\n\
             remote-control:\n\
             \x20 control-enable: no\n\
             forward-zone:\n\
             \x20 name: \"{zone}\"\n\
             \x20 forward-addr: {ip}@{up_port}\n",
            dir = dir.path().display(),
            // unbound answers special-use names (`test.`, `invalid.`, ...) itself by
            // default (RFC 6761); a private zone under one must be let through.
            tld = zone.rsplit('.').next().unwrap_or(zone),
            ip = upstream.ip(),
            up_port = upstream.port(),
        );
        let conf = dir.path().join("unbound.conf");
        std::fs::write(&conf, config).map_err(io("writing unbound.conf"))?;
        let log = std::fs::File::create(dir.path().join("unbound.log")).map_err(io("creating unbound log"))?;
        let child = Command::new(unbound)
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io("starting unbound"))?;
        let mut u = Unbound { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if dig(addr, &[&format!("{zone}."), "SOA"]).is_ok_and(|out| out.contains("status:")) {
                return Ok(u);
            }
            if let Ok(Some(status)) = u.child.try_wait() {
                let log = std::fs::read_to_string(u.dir.path().join("unbound.log")).unwrap_or_default();
                return Err(TestkitError::Failed { what: "starting unbound".into(), detail: format!("exited with {status}: {log}") });
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Failed { what: "starting unbound".into(), detail: "no answer after 10 s".into() });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Where it listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
