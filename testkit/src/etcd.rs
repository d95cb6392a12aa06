//! A real etcd (Debian `etcd-server`) on free loopback ports with a temporary data dir.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tools::{free_ports, io, require, TestkitError};

/// A running single-member etcd; killed and its data removed on drop.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    client: SocketAddr,
    /// The whole command line, to start the same member again after [`Etcd::stop`].
    command: Vec<std::ffi::OsString>,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd and waits until `/health` says it is healthy (up to 20 s).
    pub fn start() -> Result<Etcd, TestkitError> {
        Etcd::start_with(&[])
    }

    /// The directory holding etcd's data (for free-space checks).
    pub fn data_dir(&self) -> std::path::PathBuf {
        self._dir.path().to_path_buf()
    }

    /// Starts etcd with extra flags (`--quota-backend-bytes=...`, `--auto-compaction-...`).
    pub fn start_with(extra: &[&str]) -> Result<Etcd, TestkitError> {
        Etcd::start_on(std::net::Ipv4Addr::LOCALHOST, extra)
    }

    /// Starts etcd serving clients on `address` (one of this namespace's, e.g. a test
    /// underlay's), with extra flags.
    pub fn start_on(address: std::net::Ipv4Addr, extra: &[&str]) -> Result<Etcd, TestkitError> {
        let etcd = require("etcd", "etcd-server")?;
        let dir = tempfile::tempdir().map_err(io("creating etcd data dir"))?;
        let ports = free_ports(2)?;
        let (client_port, peer_port) = (ports[0], ports[1]);
        let client = SocketAddr::from((address, client_port));
        let client_url = format!("http://{client}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut command: Vec<std::ffi::OsString> = vec![etcd.into(), "--name".into(), "keelson-test".into(), "--data-dir".into()];
        command.push(dir.path().join("data").into());
        for arg in ["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url] {
            command.push(arg.into());
        }
        for arg in ["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url] {
            command.push(arg.into());
        }
        command.extend(["--initial-cluster".into(), format!("keelson-test={peer_url}").into()]);
        command.extend(extra.iter().map(Into::into));
        let child = spawn(&command, dir.path())?;
        let mut etcd = Etcd { child, client, command, _dir: dir };
        etcd.wait_healthy()?;
        Ok(etcd)
    }

    /// Stops etcd (SIGKILL, as a crash or a lost machine would), keeping its data and
    /// ports for [`Etcd::start_again`].
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the stopped member again, with its data and on its ports, and waits until
    /// it is healthy (up to 20 s).
    pub fn start_again(&mut self) -> Result<(), TestkitError> {
        self.stop();
        self.child = spawn(&self.command, self._dir.path())?;
        self.wait_healthy()
    }

    fn wait_healthy(&mut self) -> Result<(), TestkitError> {
        let etcd = self;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if etcd.healthy() {
                return Ok(());
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
        raw_request(self.client, method, path, body)
    }

    fn get(&self, path: &str) -> Result<String, TestkitError> {
        self.request("GET", path, "")
    }
}

/// Starts `command` with its log appended to `dir/etcd.log`.
fn spawn(command: &[std::ffi::OsString], dir: &std::path::Path) -> Result<Child, TestkitError> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("etcd.log")).map_err(io("opening etcd log"))?;
    Command::new(&command[0]).args(&command[1..]).stdout(Stdio::null()).stderr(log).spawn().map_err(io("starting etcd"))
}

/// A running etcd cluster of several members on loopback, each with its own ports and
/// data dir; members can be killed to test failover. All are killed on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Option<Child>>,
    clients: Vec<SocketAddr>,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members and waits until every one reports healthy (up to 30 s).
    pub fn start(n: usize) -> Result<EtcdCluster, TestkitError> {
        let etcd = require("etcd", "etcd-server")?;
        let dir = tempfile::tempdir().map_err(io("creating etcd cluster dir"))?;
        let all = free_ports(2 * n)?;
        let ports: Vec<(u16, u16)> = all.chunks(2).map(|p| (p[0], p[1])).collect();
        let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        let initial =
            names.iter().zip(&ports).map(|(name, (_, peer))| format!("{name}=http://127.0.0.1:{peer}")).collect::<Vec<_>>().join(",");
        let mut members = Vec::new();
        let mut clients = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = std::fs::File::create(dir.path().join(format!("{}.log", names[i]))).map_err(io("creating etcd log"))?;
            let child = Command::new(&etcd)
                .args(["--name", &names[i], "--data-dir"])
                .arg(dir.path().join(&names[i]))
                .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial, "--initial-cluster-state", "new", "--initial-cluster-token", "keelson-test"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(io("starting etcd member"))?;
            members.push(Some(child));
            clients.push(SocketAddr::from(([127, 0, 0, 1], *client)));
        }
        let cluster = EtcdCluster { members, clients, dir };
        let deadline = Instant::now() + Duration::from_secs(45);
        while !(0..n).all(|i| cluster.member_healthy(i)) {
            if Instant::now() > deadline {
                let logs: Vec<String> = (0..n)
                    .map(|i| {
                        format!(
                            "m{i} ({}): {}",
                            cluster.clients[i],
                            std::fs::read_to_string(cluster.dir.path().join(format!("m{i}.log"))).map(|l| tail(&l)).unwrap_or_default()
                        )
                    })
                    .collect();
                return Err(TestkitError::Failed {
                    what: "starting etcd cluster".into(),
                    detail: format!("not healthy after 45 s:\n{}", logs.join("\n")),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(cluster)
    }

    /// Client URLs of every member, killed ones included.
    pub fn client_urls(&self) -> Vec<String> {
        self.clients.iter().map(|a| format!("http://{a}")).collect()
    }

    fn member_healthy(&self, i: usize) -> bool {
        raw_request(self.clients[i], "GET", "/health", "").is_ok_and(|b| b.contains("\"health\":\"true\""))
    }

    /// The index of the current leader, asked of the first live member.
    pub fn leader(&self) -> Result<usize, TestkitError> {
        for (i, m) in self.members.iter().enumerate() {
            if m.is_none() {
                continue;
            }
            let Ok(body) = raw_request(self.clients[i], "POST", "/v3/maintenance/status", "{}") else { continue };
            let leader = json_field(&body, "leader");
            // Each member's own id is in its status header.
            for (j, addr) in self.clients.iter().enumerate() {
                if self.members[j].is_none() {
                    continue;
                }
                if let Ok(own) = raw_request(*addr, "POST", "/v3/maintenance/status", "{}") {
                    if json_field(&own, "member_id") == leader && leader.is_some() {
                        return Ok(j);
                    }
                }
            }
        }
        Err(TestkitError::Failed { what: "finding the etcd leader".into(), detail: "no live member named a leader".into() })
    }

    /// Kills member `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members.get_mut(i).and_then(Option::take) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// The string value of `"name":"..."` in a small JSON body (etcd's gateway quotes
/// 64-bit numbers).
fn json_field(body: &str, name: &str) -> Option<String> {
    let at = body.find(&format!("\"{name}\":\""))? + name.len() + 4;
    body[at..].split('"').next().map(str::to_owned)
}

/// A raw HTTP/1.0 exchange; the body on 200.
fn raw_request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Result<String, TestkitError> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(io("connecting to etcd"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(io("socket option"))?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
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

fn tail(log: &str) -> String {
    log.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
