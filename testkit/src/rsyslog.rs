//! A real rsyslog (Debian's) receiving syslog on loopback TCP and UDP (or TLS), writing
//! every message as one JSON line the tests parse back.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::tls::TestCert;
use crate::tools::{free_port, io, require, wait_for_tcp, TestkitError};

/// One message as rsyslog parsed it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct Received {
    /// PRI (facility × 8 + severity).
    pub pri: String,
    /// HOSTNAME.
    pub host: String,
    /// APP-NAME.
    pub app: String,
    /// PROCID.
    pub procid: String,
    /// MSGID.
    pub msgid: String,
    /// STRUCTURED-DATA as received (`-` when none).
    pub sd: String,
    /// MSG.
    pub msg: String,
}

/// A running rsyslogd; killed on drop (its folder goes with it).
#[derive(Debug)]
pub struct Rsyslog {
    child: Option<Child>,
    dir: tempfile::TempDir,
    tcp: SocketAddr,
    udp: SocketAddr,
    tls: bool,
}

impl Rsyslog {
    /// rsyslogd listening on loopback TCP (octet counting and newline framing) and UDP.
    pub fn start() -> Result<Rsyslog, TestkitError> {
        Self::start_inner(None)
    }

    /// rsyslogd listening on loopback TLS (RFC 5425, OpenSSL driver, serving `cert`, not
    /// asking for a client certificate) and UDP.
    pub fn start_tls(cert: &TestCert) -> Result<Rsyslog, TestkitError> {
        Self::start_inner(Some(cert))
    }

    fn start_inner(cert: Option<&TestCert>) -> Result<Rsyslog, TestkitError> {
        let dir = tempfile::tempdir().map_err(io("creating rsyslog dir"))?;
        let tcp = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let udp = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut global = format!("global(workDirectory=\"{}\" maxMessageSize=\"1m\"", dir.path().display());
        let mut tcp_module = "module(load=\"imtcp\"".to_owned();
        if let Some(cert) = cert {
            let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            std::fs::write(&cert_file, &cert.chain_pem).map_err(io("writing rsyslog certificate"))?;
            std::fs::write(&key_file, &cert.key_pem).map_err(io("writing rsyslog key"))?;
            global.push_str(&format!(
                " defaultNetstreamDriver=\"ossl\" defaultNetstreamDriverCAFile=\"{0}\" defaultNetstreamDriverCertFile=\"{0}\" defaultNetstreamDriverKeyFile=\"{1}\"",
                cert_file.display(),
                key_file.display()
            ));
            tcp_module.push_str(" streamDriver.name=\"ossl\" streamDriver.mode=\"1\" streamDriver.authMode=\"anon\"");
        }
        global.push(')');
        tcp_module.push(')');
        let conf = format!(
            r#"{global}
{tcp_module}
input(type="imtcp" address="127.0.0.1" port="{tcp_port}")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{udp_port}")
template(name="keelson" type="list") {{
  constant(value="{{\"pri\":\"") property(name="pri")
  constant(value="\",\"host\":\"") property(name="hostname" format="json")
  constant(value="\",\"app\":\"") property(name="app-name" format="json")
  constant(value="\",\"procid\":\"") property(name="procid" format="json")
  constant(value="\",\"msgid\":\"") property(name="msgid" format="json")
  constant(value="\",\"sd\":\"") property(name="structured-data" format="json")
  constant(value="\",\"msg\":\"") property(name="msg" format="json")
  constant(value="\"}}\n")
}}
action(type="omfile" file="{out}" template="keelson" flushOnTXEnd="on" asyncWriting="off")
"#,
            tcp_port = tcp.port(),
            udp_port = udp.port(),
            out = dir.path().join("messages.json").display(),
        );
        std::fs::write(dir.path().join("rsyslog.conf"), conf).map_err(io("writing rsyslog.conf"))?;
        let mut r = Rsyslog { child: None, dir, tcp, udp, tls: cert.is_some() };
        r.spawn()?;
        Ok(r)
    }

    fn spawn(&mut self) -> Result<(), TestkitError> {
        let rsyslogd = require("rsyslogd", "rsyslog")?;
        let child = Command::new(rsyslogd)
            .arg("-n")
            .arg("-f")
            .arg(self.dir.path().join("rsyslog.conf"))
            .arg("-i")
            .arg(self.dir.path().join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(self.dir.path().join("stderr")).map_err(io("creating rsyslog stderr"))?))
            .spawn()
            .map_err(io("starting rsyslogd"))?;
        self.child = Some(child);
        if let Err(e) = wait_for_tcp(self.tcp, Duration::from_secs(10)) {
            let detail = std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default();
            return Err(TestkitError::Failed { what: "starting rsyslogd".into(), detail: format!("{e}: {detail}") });
        }
        Ok(())
    }

    /// The TCP (or TLS) listener.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp
    }

    /// The UDP listener.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp
    }

    /// Whether the TCP listener speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The file rsyslog writes messages to.
    pub fn output(&self) -> PathBuf {
        self.dir.path().join("messages.json")
    }

    /// Every message written so far, in order.
    pub fn messages(&self) -> Vec<Received> {
        let text = std::fs::read_to_string(self.output()).unwrap_or_default();
        // The last line may still be half written.
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Kills rsyslogd at once (as a crash would) and starts it again on the same ports,
    /// appending to the same output.
    pub fn crash_and_restart(&mut self) -> Result<(), TestkitError> {
        self.kill();
        self.spawn()
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) rsyslogd: a stalled receiver whose kernel
    /// still takes bytes until its socket buffers are full.
    pub fn pause(&self, paused: bool) {
        if let Some(child) = &self.child {
            let signal = if paused { nix::sys::signal::Signal::SIGSTOP } else { nix::sys::signal::Signal::SIGCONT };
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal);
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.kill();
    }
}
