//! A real etcd (Debian `etcd-server`) on free loopback ports with a temporary data dir.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tools::{free_port, io, require, TestkitError};

/// A running single-member etcd; killed and its data removed on drop.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    client: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd and waits until `/health` says it is healthy (up to 20 s).
    pub fn start() -> Result<Etcd, TestkitError> {
        let etcd = require("etcd", "etcd-server")?;
        let dir = tempfile::tempdir().map_err(io("creating etcd data dir"))?;
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let client = SocketAddr::from(([127, 0, 0, 1], client_port));
        let client_url = format!("http://{client}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).map_err(io("creating etcd log"))?;
        let child = Command::new(etcd)
            .args(["--name", "keelson-test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("keelson-test={peer_url}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io("starting etcd"))?;
        let mut etcd = Etcd { child, client, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if etcd.healthy() {
                return Ok(etcd);
            }
            if let Ok(Some(status)) = etcd.child.try_wait() {
                let log = std::fs::read_to_string(etcd._dir.path().join("etcd.log")).unwrap_or_default();
                return Err(TestkitError::Failed { what: "starting etcd".into(), detail: format!("exited with {status}: {}", tail(&log)) });
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Failed { what: "starting etcd".into(), detail: "not healthy after 20 s".into() });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:<port>`, for clients.
    pub fn client_url(&self) -> String {
        format!("http://{}", self.client)
    }

    /// The client address.
    pub fn client_addr(&self) -> SocketAddr {
        self.client
    }

    /// Whether etcd answers `/health` with `"health":"true"`.
    pub fn healthy(&self) -> bool {
        self.get("/health").is_ok_and(|body| body.contains("\"health\":\"true\""))
    }

    /// A raw HTTP/1.0 exchange with etcd's JSON gateway (`/health`, `/v3/kv/...`), for
    /// checks that must not depend on the code under test.
    pub fn request(&self, method: &str, path: &str, body: &str) -> Result<String, TestkitError> {
        let mut s = TcpStream::connect_timeout(&self.client, Duration::from_secs(2)).map_err(io("connecting to etcd"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(io("socket option"))?;
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.client,
            body.len()
        )
        .map_err(io("writing to etcd"))?;
        let mut response = String::new();
        s.read_to_string(&mut response).map_err(io("reading from etcd"))?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") {
            Ok(body.to_owned())
        } else {
            Err(TestkitError::Failed { what: format!("etcd {method} {path}"), detail: head.lines().next().unwrap_or("").to_owned() })
        }
    }

    fn get(&self, path: &str) -> Result<String, TestkitError> {
        self.request("GET", path, "")
    }
}

fn tail(log: &str) -> String {
    log.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
