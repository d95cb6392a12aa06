//! Test helpers: TCP servers and clients inside namespaces (no tools inside them), and
//! snapshots of a namespace's kernel state to prove a test left nothing behind.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use keelson_testkit::netns::Netns;

/// Runs `f` on a thread inside the namespace at `path`.
pub fn in_ns<R: Send + 'static>(path: &Path, f: impl FnOnce() -> R + Send + 'static) -> R {
    let file = std::fs::File::open(path).expect("open netns");
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread in netns")
}

/// A TCP server inside a namespace that answers every connection with the peer address
/// it saw and `tag`. Stops when dropped (the listener thread is detached; its namespace
/// going away ends it).
pub fn serve(path: &Path, addr: &str, tag: &str) -> SocketAddr {
    let addr: SocketAddr = addr.parse().expect("addr");
    let tag = tag.to_owned();
    let listener = in_ns(path, move || TcpListener::bind(addr).expect("bind in netns"));
    let local = listener.local_addr().expect("local addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut s = stream;
            let peer = s.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
            let _ = s.write_all(format!("{tag} {peer}").as_bytes());
        }
    });
    local
}

/// Connects from inside a namespace; the server's answer (`<tag> <peer ip>`).
pub fn call(path: &Path, to: &str) -> std::io::Result<String> {
    let to: SocketAddr = to.parse().expect("addr");
    in_ns(path, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_millis(1500))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
}

/// Everything netplumb may create in a namespace, as JSON text from the tools that
/// show it: links, addresses, routes, neighbours on keelson links, the bridge FDB and
/// the nftables ruleset.
pub fn snapshot(ns: &Netns) -> String {
    let ip = "ip";
    let mut out = String::new();
    for args in [&["-j", "link", "show"][..], &["-j", "addr", "show"], &["-j", "route", "show", "table", "all"], &["-j", "neigh", "show"]] {
        let mut text = ns.exec(ip, args).expect("ip");
        if args[1] == "neigh" {
            // Neighbours of the underlay come and go with traffic; only ours must go.
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let ours: Vec<_> =
                v.as_array().into_iter().flatten().filter(|n| n["dev"].as_str().is_some_and(|d| d.starts_with("kp"))).cloned().collect();
            text = serde_json::to_string(&ours).expect("json");
        }
        if args[1] == "link" || args[1] == "addr" {
            // Link state flags of the underlay change with traffic; the set of links and addresses is what counts.
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let names: Vec<_> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| {
                    let addrs: Vec<_> =
                        l["addr_info"].as_array().into_iter().flatten().map(|a| format!("{}/{}", a["local"], a["prefixlen"])).collect();
                    format!("{}@{} master={} alias={} {:?}", l["ifname"], l["link"], l["master"], l["ifalias"], addrs)
                })
                .collect();
            text = names.join("\n");
        }
        out.push_str(&text);
        out.push('\n');
    }
    out.push_str(&ns.exec("bridge", &["-j", "fdb", "show"]).expect("bridge fdb"));
    out.push('\n');
    out.push_str(&ns.exec("nft", &["-j", "list", "ruleset"]).expect("nft"));
    out
}

/// A namespace acting as a host, with an "outside world" namespace behind a veth
/// (host 192.0.2.1/24, outside 192.0.2.2/24) where a server answers on port 9000.
pub struct HostWithOutside {
    pub host: Netns,
    pub outside: Netns,
    pub state: tempfile::TempDir,
}

impl HostWithOutside {
    pub fn new() -> HostWithOutside {
        let host = Netns::create("kph").expect("host netns");
        let outside = Netns::create("kpo").expect("outside netns");
        let n = outside.name().to_owned();
        // No IPv6 on the test host: its link-local address and routes appear when duplicate
        // address detection finishes, at a moment of its own, and would race the snapshots.
        let no_v6 = "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6 && echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6";
        host.exec("sh", &["-c", no_v6]).expect("disable ipv6");
        // The veth is created from the host namespace, its peer moved into outside.
        host.exec("ip", &["link", "add", "uplink", "type", "veth", "peer", "name", "uplink", "netns", &n]).expect("veth");
        host.exec("ip", &["addr", "add", "192.0.2.1/24", "dev", "uplink"]).expect("addr");
        host.exec("ip", &["link", "set", "uplink", "up"]).expect("up");
        outside.exec("ip", &["addr", "add", "192.0.2.2/24", "dev", "uplink"]).expect("addr");
        outside.exec("ip", &["link", "set", "uplink", "up"]).expect("up");
        serve(&outside.path(), "192.0.2.2:9000", "outside");
        HostWithOutside { host, outside, state: tempfile::tempdir().expect("tempdir") }
    }

    pub fn config(&self) -> keelson_netplumb::KernelConfig {
        let mut c = keelson_netplumb::KernelConfig::in_dir(self.state.path());
        c.host_netns = Some(self.host.path());
        c
    }
}

/// Namespaces for endpoints, created on first use by name and deleted on drop.
#[derive(Default)]
pub struct Endpoints {
    made: std::sync::Mutex<std::collections::BTreeMap<String, Netns>>,
}

impl Endpoints {
    pub fn path(&self, id: &str) -> PathBuf {
        let mut made = self.made.lock().expect("lock");
        made.entry(id.to_owned()).or_insert_with(|| Netns::create("kpc").expect("endpoint netns")).path()
    }

    /// How many links the endpoint's namespace has (1 is just `lo`).
    pub fn link_count(&self, id: &str) -> usize {
        self.path(id);
        let made = self.made.lock().expect("lock");
        made[id].exec("ip", &["-o", "link", "show"]).expect("ip link").lines().count()
    }

    pub fn delete(&self, id: &str) {
        if let Some(ns) = self.made.lock().expect("lock").remove(id) {
            ns.delete().expect("delete netns");
        }
    }
}

/// Removes every network (and attachment) of a state directory when dropped, even when
/// the test panicked: a fresh driver on its own runtime, on its own thread.
pub struct CleanupGuard {
    pub config: keelson_netplumb::KernelConfig,
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        use keelson_netplumb::NetworkDriver;
        let config = self.config.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let Ok(d) = keelson_netplumb::BridgeNetwork::open(config) else { return };
                let _ = d.gc(&[]).await;
                for net in d.list().await.unwrap_or_default() {
                    let _ = d.delete_network(&net.spec.name).await;
                }
            });
        })
        .join();
    }
}
