//! The cloud's machines on this one: network namespaces as hosts on one L2 segment (a
//! bridge in a namespace of its own: in the root namespace Docker's FORWARD policy
//! would drop the hosts' bridged traffic), this machine on it at `.1` as their gateway,
//! and a namespace playing a machine on the LAN with its own resolver configuration
//! (`/etc/netns/<ns>/resolv.conf`, which `ip netns exec` puts in place of the machine's
//! own; the machine's `/etc/resolv.conf` is never touched).
//!
//! Everything is made with `ip` (iproute2) and found again by name ([`Layout`]), so a
//! cleanup after a crash needs nothing but the cloud's name. Removing a namespace does
//! not stop its processes: [`remove_netns`] kills them first.

use std::path::PathBuf;
use std::process::Command;

use super::layout::Layout;

/// Runs `ip` with `args`; an error carries its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// `ip` with `args` inside `netns`.
fn ip_in(netns: &str, args: &[&str]) -> Result<(), String> {
    let mut all = vec!["-n", netns];
    all.extend(args);
    ip(&all)
}

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

fn link_exists(name: &str) -> bool {
    Command::new("ip").args(["link", "show", name]).output().is_ok_and(|o| o.status.success())
}

/// The resolver configuration the LAN machine's programs see.
pub fn lan_resolv_conf(layout: &Layout) -> PathBuf {
    PathBuf::from("/etc/netns").join(layout.lan_netns()).join("resolv.conf")
}

/// Refuses to start over a cloud of the same name, or on an underlay this machine
/// already routes (another cloud's, or a real network).
pub fn check_free(layout: &Layout) -> Result<(), String> {
    if let Some(ns) = layout.namespaces().into_iter().find(|n| netns_exists(n)) {
        return Err(format!(
            "namespace {ns} exists: cloud {} is up or was not taken down (localcloud down --name {})",
            layout.name, layout.name
        ));
    }
    if link_exists(&layout.machine_link()) {
        return Err(format!("link {} exists: cloud {} is up (localcloud down --name {})", layout.machine_link(), layout.name, layout.name));
    }
    let routes = Command::new("ip").args(["-4", "route", "show", "table", "all"]).output().map_err(|e| format!("ip route: {e}"))?;
    let underlay: ipnet::Ipv4Net = layout.underlay().parse().map_err(|e| format!("underlay: {e}"))?;
    for line in String::from_utf8_lossy(&routes.stdout).lines() {
        // The destination, after the route's type if it has one (`local 127.0.0.0/8 ...`).
        let dest = line
            .split_whitespace()
            .take(2)
            .find_map(|t| t.parse::<ipnet::Ipv4Net>().ok().or_else(|| t.parse::<std::net::Ipv4Addr>().ok().map(ipnet::Ipv4Net::from)));
        if let Some(dest) = dest {
            if dest.prefix_len() > 0 && (dest.contains(&underlay.network()) || underlay.contains(&dest.network())) {
                return Err(format!("underlay {underlay} overlaps this machine's route {line:?}: choose another with --underlay"));
            }
        }
    }
    Ok(())
}

/// The segment: the switch, this machine's link into it, and the LAN machine.
pub fn create_segment(layout: &Layout) -> Result<(), String> {
    let (sw, lan) = (layout.switch_netns(), layout.lan_netns());
    ip(&["netns", "add", &sw])?;
    ip_in(&sw, &["link", "add", "sw0", "type", "bridge"])?;
    ip_in(&sw, &["link", "set", "sw0", "up"])?;
    let link = layout.machine_link();
    ip(&["link", "add", &link, "type", "veth", "peer", "name", "machine", "netns", &sw])?;
    ip_in(&sw, &["link", "set", "machine", "master", "sw0", "up"])?;
    ip(&["addr", "add", &format!("{}/24", layout.machine_address()), "dev", &link])?;
    ip(&["link", "set", &link, "up"])?;
    add_machine(layout, &lan, "lan", layout.lan_address())?;
    let resolv = lan_resolv_conf(layout);
    if let Some(dir) = resolv.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    // Its own unbound answers it (started by the cloud), as a LAN's resolver would.
    std::fs::write(&resolv, "nameserver 127.0.0.1\n").map_err(|e| format!("{}: {e}", resolv.display()))
}

/// A namespace on the segment at `address`, its switch port named `port`.
fn add_machine(layout: &Layout, netns: &str, port: &str, address: std::net::Ipv4Addr) -> Result<(), String> {
    let sw = layout.switch_netns();
    ip(&["netns", "add", netns])?;
    // IPv6 off: late link-local addresses race with the tests' first packets, and the
    // cloud is IPv4.
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "sh", "-c"])
        .arg("echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6")
        .output()
        .map_err(|e| format!("ip netns exec: {e}"))?;
    if !out.status.success() {
        return Err(format!("turning IPv6 off in {netns}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    // A MAC made from the address: a host started again (reset) is the same machine to
    // its neighbours, whose ARP caches would otherwise send to the old one for a while.
    let o = address.octets();
    let mac = format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
    ip_in(&sw, &["link", "add", port, "type", "veth", "peer", "name", "eth0", "address", &mac, "netns", netns])?;
    ip_in(&sw, &["link", "set", port, "master", "sw0", "up"])?;
    ip_in(netns, &["link", "set", "lo", "up"])?;
    ip_in(netns, &["addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
    ip_in(netns, &["link", "set", "eth0", "up"])?;
    ip_in(netns, &["route", "add", "default", "via", &layout.machine_address().to_string()])
}

/// The hosts, on the segment at `.11` on.
pub fn create_hosts(layout: &Layout) -> Result<(), String> {
    for i in 1..=layout.hosts {
        add_machine(layout, &layout.host_netns(i), &format!("h{i}"), layout.host_address(i))?;
    }
    Ok(())
}

/// Kills every process in `netns` and removes it (and with it its links). Missing is
/// fine: a test may have removed a host already.
pub fn remove_netns(netns: &str) {
    if !netns_exists(netns) {
        return;
    }
    // Several rounds: a dying supervisor may start something in the meantime.
    for _ in 0..3 {
        let pids = Command::new("ip").args(["netns", "pids", netns]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        let pids: Vec<i32> = pids.unwrap_or_default().split_whitespace().filter_map(|p| p.parse().ok()).collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if let Err(e) = ip(&["netns", "del", netns]) {
        tracing::warn!(error = %e, "removing a namespace");
    }
}

/// The hosts' containers (by their nodes' label) and namespaces.
pub fn remove_hosts(layout: &Layout) {
    for i in 1..=layout.hosts {
        crate::supervise::remove_containers("keelson.node", &layout.node(i));
    }
    for i in 1..=layout.hosts {
        // The switch's end first: a namespace goes away in the background, and its
        // links with it, which a new host of the same name would collide with.
        if netns_exists(&layout.switch_netns()) {
            let _ = ip_in(&layout.switch_netns(), &["link", "del", &format!("h{i}")]);
        }
        remove_netns(&layout.host_netns(i));
    }
}

/// Everything of the cloud on this machine: hosts, LAN machine, switch, this machine's
/// link and the LAN's resolver file.
pub fn remove_all(layout: &Layout) {
    remove_hosts(layout);
    remove_netns(&layout.lan_netns());
    remove_netns(&layout.switch_netns());
    if link_exists(&layout.machine_link()) {
        if let Err(e) = ip(&["link", "del", &layout.machine_link()]) {
            tracing::warn!(error = %e, "removing this machine's link into the cloud");
        }
    }
    let resolv = lan_resolv_conf(layout);
    let _ = std::fs::remove_file(&resolv);
    // Its folder; /etc/netns itself stays (other namespaces may use it).
    if let Some(dir) = resolv.parent() {
        let _ = std::fs::remove_dir(dir);
    }
}
