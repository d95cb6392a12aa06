//! `netplumb-vs-cni`: attaching containers with keelson against Debian's
//! containernetworking-plugins (bridge + host-local, and portmap for published ports),
//! like for like, in the same run:
//! - each plugin is executed per ADD and DEL exactly as a runtime executes it (`CNI_*`
//!   variables, cniVersion 1.0.0 bridge-shaped configuration on stdin), timed from spawn
//!   to exit; keelson's and the peer's calls alternate container by container, so drift
//!   of the machine hits both alike;
//! - keelson's in-process library attach is reported beside it (what a runtime that
//!   links keelson pays);
//! - everything happens inside a namespace created as the host (the root namespace and
//!   dockerd stay untouched), into one fresh namespace per container;
//! - the overlay: iperf3 container to container across two hosts over VXLAN against host
//!   to host on the plain underlay veth, and peer programming latency with real etcd.
//!
//! `cargo build --release -p keelson-netplumb --features netlink --bin keelson-cni`
//! `cargo run --release -p keelson-benches --bin netplumb-vs-cni -- --containers 1000`
//!
//! keelson-cni is taken from next to this binary (target/release); without it this
//! binary runs the same plugin code itself (`--as-cni`) and says so.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use keelson_netplumb::{BridgeNetwork, EndpointSpec, KernelConfig, NetworkDriver, NetworkSpec};
use keelson_testkit::netns::Netns;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
struct Args {
    /// Containers attached (and detached) per plugin.
    #[arg(long, default_value_t = 1000)]
    containers: usize,
    /// Containers attached with masquerade and one published port, per plugin.
    #[arg(long, default_value_t = 100)]
    with_ports: usize,
    /// Where Debian's plugins are.
    #[arg(long, default_value = "/usr/lib/cni")]
    cni_path: PathBuf,
    /// iperf3 rounds per path (VXLAN and plain veth, interleaved).
    #[arg(long, default_value_t = 3)]
    iperf_rounds: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    iperf_seconds: u64,
    /// Fake hosts whose leases appear, to time peer programming.
    #[arg(long, default_value_t = 50)]
    peers: usize,
    /// Internal: act as the keelson-cni plugin.
    #[arg(long, hide = true)]
    as_cni: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.as_cni {
        return as_cni();
    }
    keelson_benches::run_bench_main("netplumb-vs-cni", run(args))
}

/// The plugin's own main, for when keelson-cni was not built beside this binary.
fn as_cni() -> ExitCode {
    let vars = std::env::vars().filter(|(k, _)| k.starts_with("CNI_")).collect();
    let mut stdin = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut stdin);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    match rt.block_on(keelson_netplumb::cni::run(&vars, &stdin)) {
        Ok(Some(v)) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            println!("{}", e.to_json("1.0.0"));
            ExitCode::FAILURE
        }
    }
}

/// How to execute one plugin.
struct Plugin {
    program: PathBuf,
    args: Vec<String>,
    cni_path: PathBuf,
    host: PathBuf,
}

impl Plugin {
    /// One call, as a runtime makes it, from the host namespace (a thread that joined
    /// it spawns the plugin, which inherits it); its result and time from spawn to exit.
    fn call(&self, command: &str, container: &str, netns: &Path, ifname: &str, conf: &Value) -> Result<(Value, Duration), String> {
        let host = std::fs::File::open(&self.host).map_err(|e| e.to_string())?;
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&host, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
                self.call_here(command, container, netns, ifname, conf)
            })
            .join()
            .map_err(|_| "plugin thread panicked".to_owned())?
        })
    }

    fn call_here(&self, command: &str, container: &str, netns: &Path, ifname: &str, conf: &Value) -> Result<(Value, Duration), String> {
        let started = Instant::now();
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: {e}", self.program.display()))?;
        child.stdin.take().ok_or("no stdin")?.write_all(conf.to_string().as_bytes()).map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!("{} {command} {container}: {text} {}", self.program.display(), String::from_utf8_lossy(&out.stderr)));
        }
        let value = if text.trim().is_empty() { Value::Null } else { serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))? };
        Ok((value, took))
    }
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    if s.is_empty() {
        return Duration::ZERO;
    }
    s[((s.len() as f64 * p).ceil() as usize).clamp(1, s.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Series {
    name: &'static str,
    times: Vec<Duration>,
    wall: Duration,
}

impl Series {
    fn new(name: &'static str) -> Series {
        Series { name, times: Vec::new(), wall: Duration::ZERO }
    }

    fn print(&self) {
        let n = self.times.len();
        let first = &self.times[..n.min(100)];
        let last = &self.times[n.saturating_sub(100)..];
        println!(
            "{:<28} n {:>5}  p50 {:>7.2} ms  p99 {:>7.2} ms  first100 p99 {:>7.2} ms  last100 p99 {:>7.2} ms  {:>7.0}/s",
            self.name,
            n,
            ms(pct(&self.times, 0.5)),
            ms(pct(&self.times, 0.99)),
            ms(pct(first, 0.99)),
            ms(pct(last, 0.99)),
            n as f64 / self.wall.as_secs_f64().max(1e-9),
        );
    }
}

fn ratio(metric: &str, keelson: f64, cni: f64) {
    println!("ratio {metric} keelson/cni: {:.3}", keelson / cni);
}

async fn run(args: Args) -> Result<(), String> {
    for tool in ["bridge", "host-local", "portmap"] {
        if !args.cni_path.join(tool).exists() {
            return Err(format!("{} missing: apt-get install containernetworking-plugins", args.cni_path.join(tool).display()));
        }
    }
    let host = Netns::create("kpbench").map_err(|e| e.to_string())?;
    let state = tempfile::tempdir().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let sibling = exe.with_file_name("keelson-cni");
    let keelson = if sibling.exists() {
        println!("keelson-cni: {}", sibling.display());
        Plugin { program: sibling, args: Vec::new(), cni_path: args.cni_path.clone(), host: host.path() }
    } else {
        println!("keelson-cni not built beside this binary: running the same plugin code as `{} --as-cni`", exe.display());
        Plugin { program: exe.clone(), args: vec!["--as-cni".into()], cni_path: args.cni_path.clone(), host: host.path() }
    };
    let plugin =
        |name: &str| Plugin { program: args.cni_path.join(name), args: Vec::new(), cni_path: args.cni_path.clone(), host: host.path() };
    let (peer, portmap) = (plugin("bridge"), plugin("portmap"));
    let k_conf = json!({ "cniVersion": "1.0.0", "name": "kbench", "type": "keelson-cni", "bridge": "kbench0", "isGateway": true,
        "ipMasq": false, "ipam": { "type": "host-local", "subnet": "10.96.0.0/16" }, "stateDir": state.path().join("keelson") });
    let c_conf = json!({ "cniVersion": "1.0.0", "name": "cbench", "type": "bridge", "bridge": "cbench0", "isGateway": true,
        "ipMasq": false, "ipam": { "type": "host-local", "subnet": "10.97.0.0/16", "dataDir": state.path().join("host-local") } });

    let n = args.containers;
    println!("creating {} namespaces...", 2 * n);
    let k_ns: Vec<Netns> = (0..n).map(|_| Netns::create("kpk")).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    let c_ns: Vec<Netns> = (0..n).map(|_| Netns::create("kpc")).collect::<Result<_, _>>().map_err(|e| e.to_string())?;

    // The floor both pay on this machine: spawning a program that does nothing.
    let mut floor = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        Command::new("/bin/true").status().map_err(|e| e.to_string())?;
        floor.push(t.elapsed());
    }
    println!("spawn of /bin/true: p50 {:.2} ms (paid by every plugin call below, both sides)", ms(pct(&floor, 0.5)));

    let (mut k_add, mut c_add, mut k_del, mut c_del) =
        (Series::new("keelson-cni ADD"), Series::new("cni bridge ADD"), Series::new("keelson-cni DEL"), Series::new("cni bridge DEL"));
    for i in 0..n {
        let (_, t) = keelson.call("ADD", &format!("k{i}"), &k_ns[i].path(), "eth0", &k_conf)?;
        k_add.times.push(t);
        let (_, t) = peer.call("ADD", &format!("c{i}"), &c_ns[i].path(), "eth0", &c_conf)?;
        c_add.times.push(t);
    }
    k_add.wall = k_add.times.iter().sum();
    c_add.wall = c_add.times.iter().sum();
    for i in 0..n {
        let (_, t) = keelson.call("DEL", &format!("k{i}"), &k_ns[i].path(), "eth0", &k_conf)?;
        k_del.times.push(t);
        let (_, t) = peer.call("DEL", &format!("c{i}"), &c_ns[i].path(), "eth0", &c_conf)?;
        c_del.times.push(t);
    }
    k_del.wall = k_del.times.iter().sum();
    c_del.wall = c_del.times.iter().sum();

    // The library, in process, on the same host namespace and container namespaces.
    let mut config = KernelConfig::in_dir(state.path().join("library"));
    config.host_netns = Some(host.path());
    let lib = BridgeNetwork::open(config).map_err(|e| e.to_string())?;
    lib.create_network(NetworkSpec::new("lbench").with_subnet("10.95.0.0/16")).await.map_err(|e| e.to_string())?;
    let (mut l_add, mut l_del) = (Series::new("keelson library attach"), Series::new("keelson library detach"));
    let mut keys = Vec::new();
    let started = Instant::now();
    for (i, ns) in k_ns.iter().enumerate() {
        let t = Instant::now();
        let a = lib.attach(EndpointSpec::new("lbench", format!("l{i}")).in_netns(ns.path())).await.map_err(|e| e.to_string())?;
        l_add.times.push(t.elapsed());
        keys.push(a.key());
    }
    l_add.wall = started.elapsed();
    let started = Instant::now();
    for key in &keys {
        let t = Instant::now();
        lib.detach(key).await.map_err(|e| e.to_string())?;
        l_del.times.push(t.elapsed());
    }
    l_del.wall = started.elapsed();

    // Detach as a runtime tearing many containers down at once does it: 16 in flight.
    // (Deleting a veth waits for RCU grace periods in the kernel; concurrent deletions
    // share them.)
    let mut keys = Vec::new();
    for (i, ns) in k_ns.iter().enumerate() {
        keys.push(lib.attach(EndpointSpec::new("lbench", format!("p{i}")).in_netns(ns.path())).await.map_err(|e| e.to_string())?.key());
    }
    let started = Instant::now();
    let lib_ref = &lib;
    futures::stream::iter(keys.iter().map(|k| async move { lib_ref.detach(k).await }))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let concurrent_detach = keys.len() as f64 / started.elapsed().as_secs_f64();

    // Masquerade and one published port: keelson-cni alone against bridge (ipMasq) + portmap.
    let m = args.with_ports.min(n);
    let mut k_masq = k_conf.clone();
    k_masq["name"] = json!("kmasq");
    k_masq["ipMasq"] = json!(true);
    k_masq["ipam"]["subnet"] = json!("10.94.0.0/16");
    let mut c_masq = c_conf.clone();
    c_masq["name"] = json!("cmasq");
    c_masq["bridge"] = json!("cmasq0");
    c_masq["ipMasq"] = json!(true);
    c_masq["ipam"]["subnet"] = json!("10.93.0.0/16");
    let (mut k_port, mut c_port) = (Series::new("keelson-cni ADD masq+port"), Series::new("cni bridge+portmap ADD"));
    for i in 0..m {
        let mapping = json!({ "portMappings": [ { "hostPort": 20000 + i, "containerPort": 80, "protocol": "tcp" } ] });
        let mut k = k_masq.clone();
        k["runtimeConfig"] = mapping.clone();
        let (_, t) = keelson.call("ADD", &format!("km{i}"), &k_ns[i].path(), "eth0", &k)?;
        k_port.times.push(t);
        let (result, t1) = peer.call("ADD", &format!("cm{i}"), &c_ns[i].path(), "eth0", &c_masq)?;
        let pm = json!({ "cniVersion": "1.0.0", "name": "cmasq", "type": "portmap", "capabilities": { "portMappings": true },
            "runtimeConfig": mapping, "prevResult": result });
        let (_, t2) = portmap.call("ADD", &format!("cm{i}"), &c_ns[i].path(), "eth0", &pm)?;
        c_port.times.push(t1 + t2);
    }
    k_port.wall = k_port.times.iter().sum();
    c_port.wall = c_port.times.iter().sum();
    for i in 0..m {
        keelson.call("DEL", &format!("km{i}"), &k_ns[i].path(), "eth0", &k_masq)?;
        peer.call("DEL", &format!("cm{i}"), &c_ns[i].path(), "eth0", &c_masq)?;
    }

    println!();
    for s in [&k_add, &c_add, &l_add, &k_del, &c_del, &l_del, &k_port, &c_port] {
        s.print();
    }
    println!("keelson library detach, 16 in flight: {concurrent_detach:.0}/s");
    println!();
    ratio("attach_p50", ms(pct(&k_add.times, 0.5)), ms(pct(&c_add.times, 0.5)));
    ratio("attach_p99", ms(pct(&k_add.times, 0.99)), ms(pct(&c_add.times, 0.99)));
    ratio("library_attach_p50", ms(pct(&l_add.times, 0.5)), ms(pct(&c_add.times, 0.5)));
    ratio("detach_p50", ms(pct(&k_del.times, 0.5)), ms(pct(&c_del.times, 0.5)));
    ratio("attach_per_s", k_add.times.len() as f64 / k_add.wall.as_secs_f64(), c_add.times.len() as f64 / c_add.wall.as_secs_f64());
    ratio("detach_per_s", k_del.times.len() as f64 / k_del.wall.as_secs_f64(), c_del.times.len() as f64 / c_del.wall.as_secs_f64());
    ratio("masq_port_attach_p50", ms(pct(&k_port.times, 0.5)), ms(pct(&c_port.times, 0.5)));
    let growth = |s: &Series| {
        let n = s.times.len();
        ms(pct(&s.times[n.saturating_sub(100)..], 0.99)) / ms(pct(&s.times[..n.min(100)], 0.99))
    };
    println!("growth keelson-cni ADD last100/first100 p99: {:.2}", growth(&k_add));
    println!("growth keelson library attach last100/first100 p99: {:.2}", growth(&l_add));
    println!("growth cni bridge ADD last100/first100 p99: {:.2}", growth(&c_add));
    lib.delete_network("lbench").await.map_err(|e| e.to_string())?;
    println!();
    overlay::run(args.iperf_rounds, args.iperf_seconds, args.peers).await
}

/// The overlay: single-stream TCP throughput container to container across two hosts
/// over VXLAN against host to host over the same underlay without it (iperf3, rounds
/// interleaved, medians), and how long after a new host's lease appears its route is
/// programmed on another host.
mod overlay {
    use std::net::Ipv4Addr;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use futures::TryStreamExt;
    use keelson_discovery::{EtcdConfig, EtcdKv, KeyValue};
    use keelson_netplumb::{BridgeNetwork, EndpointSpec, KernelConfig, NetworkDriver, NetworkSpec, OverlayConfig, OverlayNetwork};
    use keelson_testkit::netns::{Netns, Underlay};

    use super::{ms, pct};

    fn iperf(client: &Netns, server: &Netns, to: Ipv4Addr, seconds: u64) -> Result<f64, String> {
        let mut srv = std::process::Command::new("ip")
            .args(["netns", "exec", server.name(), "iperf3", "-s", "-1", "-p", "5201"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("iperf3 server: {e} (apt-get install iperf3)"))?;
        std::thread::sleep(Duration::from_millis(300));
        let out =
            client.exec("iperf3", &["-c", &to.to_string(), "-p", "5201", "-t", &seconds.to_string(), "-J"]).map_err(|e| e.to_string());
        let _ = srv.wait();
        let v: serde_json::Value = serde_json::from_str(&out?).map_err(|e| e.to_string())?;
        v["end"]["sum_received"]["bits_per_second"].as_f64().ok_or_else(|| "iperf3 gave no throughput".to_owned())
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }

    pub async fn run(rounds: usize, seconds: u64, peers: usize) -> Result<(), String> {
        let etcd = keelson_testkit::etcd::Etcd::start().map_err(|e| e.to_string())?;
        let kv: Arc<dyn KeyValue> = Arc::new(EtcdKv::connect(EtcdConfig::new([etcd.client_url()])).await.map_err(|e| e.to_string())?);
        let ul = Underlay::create(2, "172.31.77").map_err(|e| e.to_string())?;
        let state = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut drivers = Vec::new();
        for (i, host) in ul.hosts.iter().enumerate() {
            let mut kc = KernelConfig::in_dir(state.path().join(format!("h{i}")));
            kc.host_netns = Some(host.path());
            let bridge = BridgeNetwork::open(kc).map_err(|e| e.to_string())?;
            let oc = OverlayConfig::new(kv.clone(), format!("bench{i}"), ul.addresses[i]);
            let d = OverlayNetwork::new(bridge, oc).map_err(|e| e.to_string())?;
            d.create_network(NetworkSpec::new("ovlbench").with_subnet("10.248.0.0/16")).await.map_err(|e| e.to_string())?;
            drivers.push(d);
        }
        let c: Vec<Netns> = (0..2).map(|_| Netns::create("kpovc")).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
        let mut addrs = Vec::new();
        for (i, d) in drivers.iter().enumerate() {
            let a = d.attach(EndpointSpec::new("ovlbench", format!("c{i}")).in_netns(c[i].path())).await.map_err(|e| e.to_string())?;
            addrs.push(a.ipv4().ok_or("no address")?);
        }
        // The first packets wait for the peers' entries; let the watch settle.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (mut vx, mut plain) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            vx.push(iperf(&c[0], &c[1], addrs[1], seconds)?);
            plain.push(iperf(&ul.hosts[0], &ul.hosts[1], ul.addresses[1], seconds)?);
        }
        let (vx, plain) = (median(vx), median(plain));
        println!(
            "overlay: vxlan container->container {:.2} Gbit/s, plain veth host->host {:.2} Gbit/s (median of {rounds} x {seconds} s)",
            vx / 1e9,
            plain / 1e9
        );
        println!("ratio vxlan_throughput keelson-vxlan/veth: {:.3}", vx / plain);

        // Peer programming: fake hosts' leases appear in etcd; time until host 0 routes to them.
        let host0 = std::fs::File::open(ul.hosts[0].path()).map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Handle::current();
        let (conn, handle) = std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&host0, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
                let _entered = runtime.enter();
                let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
                Ok::<_, String>((conn, handle))
            })
            .join()
            .map_err(|_| "netlink thread panicked".to_owned())?
        })?;
        tokio::spawn(conn);
        let prefix = "keelson/netplumb/overlay/ovlbench/hosts/";
        let mut latencies = Vec::new();
        for i in 0..peers {
            let subnet: ipnet::Ipv4Net = format!("10.248.{}.0/24", 100 + i).parse().map_err(|e: ipnet::AddrParseError| e.to_string())?;
            let public = Ipv4Addr::new(172, 31, 78, 10 + i as u8);
            let o = public.octets();
            let lease = serde_json::json!({ "host": format!("fake{i}"), "public_ip": public,
                "vtep_mac": format!("02:4b:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]), "subnet": subnet });
            let key = format!("{prefix}{}-24", subnet.network());
            let started = Instant::now();
            kv.put(&key, lease.to_string().into_bytes(), None).await.map_err(|e| e.to_string())?;
            loop {
                let routes: Vec<_> = handle
                    .route()
                    .get(rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build())
                    .execute()
                    .try_collect()
                    .await
                    .map_err(|e| e.to_string())?;
                let found = routes.iter().any(|r| {
                    r.header.destination_prefix_length == 24
                        && r.attributes.iter().any(|a| matches!(a, rtnetlink::packet_route::route::RouteAttribute::Destination(rtnetlink::packet_route::route::RouteAddress::Inet(d)) if *d == subnet.network()))
                });
                if found {
                    break;
                }
                if started.elapsed() > Duration::from_secs(10) {
                    return Err(format!("route to {subnet} never appeared"));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            latencies.push(started.elapsed());
            kv.delete(&key).await.map_err(|e| e.to_string())?;
        }
        println!(
            "overlay: peer route programmed after its lease appears: p50 {:.1} ms, p99 {:.1} ms (n {peers}, real etcd, polled every 1 ms)",
            ms(pct(&latencies, 0.5)),
            ms(pct(&latencies, 0.99))
        );
        for (i, d) in drivers.iter().enumerate() {
            d.detach(&keelson_netplumb::AttachmentKey::new("ovlbench", format!("c{i}"), "eth0")).await.map_err(|e| e.to_string())?;
            d.delete_network("ovlbench").await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}
