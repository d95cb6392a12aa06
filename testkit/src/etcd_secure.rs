//! A real etcd locked down as production should be: client TLS with certificates from a
//! test CA (`--client-cert-auth`), and `auth enable` with a user whose role reads and
//! writes one key prefix only.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tls::TestCa;
use crate::tools::{free_ports, io, require, run, TestkitError};

/// The user tests connect as, its password, and the only prefix its role may touch.
pub const USER: &str = "keelson";
/// [`USER`]'s password.
pub const PASSWORD: &str = "s3cret-pw";
/// What [`USER`]'s role may read and write.
pub const PREFIX: &str = "keelson/";

/// A running secured etcd; killed and its files removed on drop.
#[derive(Debug)]
pub struct SecureEtcd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    /// The CA that signed etcd's certificate and the client certificates.
    pub ca: TestCa,
}

impl SecureEtcd {
    /// Starts etcd with TLS and client certificate authentication, creates `root` and
    /// [`USER`] (role: read-write on [`PREFIX`]), enables auth, and waits until it
    /// answers (up to 20 s).
    pub fn start() -> Result<SecureEtcd, TestkitError> {
        let etcd = require("etcd", "etcd-server")?;
        require("etcdctl", "etcd-client")?;
        let dir = tempfile::tempdir().map_err(io("creating etcd data dir"))?;
        let ca = TestCa::new("keelson test CA")?;
        let server = ca.issue("etcd", &["127.0.0.1", "localhost"])?;
        let client = ca.issue(USER, &[])?;
        let root = ca.issue("root", &[])?;
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).map_err(io(format!("writing {name}")));
        write("ca.pem", &ca.cert_pem)?;
        write("server.pem", &server.chain_pem)?;
        write("server-key.pem", &server.key_pem)?;
        write("client.pem", &client.chain_pem)?;
        write("client-key.pem", &client.key_pem)?;
        write("root.pem", &root.chain_pem)?;
        write("root-key.pem", &root.key_pem)?;
        let ports = free_ports(2)?;
        let (port, peer) = (ports[0], ports[1]);
        let url = format!("https://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let path = |name: &str| dir.path().join(name);
        let log = std::fs::File::create(path("etcd.log")).map_err(io("creating etcd log"))?;
        let child = Command::new(etcd)
            .args(["--name", "keelson-secure", "--data-dir"])
            .arg(path("data"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("keelson-secure={peer_url}")])
            .arg("--cert-file")
            .arg(path("server.pem"))
            .arg("--key-file")
            .arg(path("server-key.pem"))
            .arg("--trusted-ca-file")
            .arg(path("ca.pem"))
            .arg("--client-cert-auth")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io("starting etcd"))?;
        let mut etcd = SecureEtcd { child, port, dir, ca };
        etcd.wait_healthy()?;
        for args in [
            &["user", "add", "root:root-pw"][..],
            &["user", "grant-role", "root", "root"],
            &["role", "add", "keelson-rw"],
            &["role", "grant-permission", "keelson-rw", "--prefix=true", "readwrite", PREFIX],
            &["user", "add", &format!("{USER}:{PASSWORD}")],
            &["user", "grant-role", USER, "keelson-rw"],
            &["auth", "enable"],
        ] {
            etcd.etcdctl(args)?;
        }
        Ok(etcd)
    }

    /// `https://127.0.0.1:<port>`.
    pub fn client_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The CA certificate file (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// [`USER`]'s client certificate and key files (PEM).
    pub fn client_files(&self) -> (PathBuf, PathBuf) {
        (self.dir.path().join("client.pem"), self.dir.path().join("client-key.pem"))
    }

    /// A directory for the test's own files (removed with the etcd).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs etcdctl as root: with `--client-cert-auth`, etcd takes the user from the
    /// client certificate's common name, so root's certificate is root's login.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, TestkitError> {
        let etcdctl = require("etcdctl", "etcd-client")?;
        let file = |name: &str| self.dir.path().join(name).display().to_string();
        let flags = [
            format!("--endpoints={}", self.client_url()),
            format!("--cacert={}", file("ca.pem")),
            format!("--cert={}", file("root.pem")),
            format!("--key={}", file("root-key.pem")),
        ];
        let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        run(&etcdctl, &all).map_err(|e| TestkitError::Failed { what: format!("etcdctl {}", args.join(" ")), detail: e.to_string() })
    }

    fn wait_healthy(&mut self) -> Result<(), TestkitError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.etcdctl(&["endpoint", "health"]).is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
                return Err(TestkitError::Failed { what: "starting secured etcd".into(), detail: format!("exited with {status}: {log}") });
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Failed { what: "starting secured etcd".into(), detail: "not healthy after 20 s".into() });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for SecureEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
