//! Network namespaces as test hosts, joined to the host by veth pairs. Uses iproute2's
//! `ip` (this is test scaffolding; keelson's own code talks netlink).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::tools::{require, run, TestkitError};

fn ip() -> Result<PathBuf, TestkitError> {
    require("ip", "iproute2")
}

/// A network namespace, deleted (with its interfaces) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `<prefix>-<pid>-<n>` with its loopback up.
    pub fn create(prefix: &str) -> Result<Netns, TestkitError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let ip = ip()?;
        run(&ip, &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec(&ip.to_string_lossy(), &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file, what `setns` and netplumb's `EndpointSpec::netns` take.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Whether the namespace still exists (a test may delete it behind netplumb's back).
    pub fn exists(&self) -> bool {
        self.path().exists()
    }

    /// Deletes the namespace now (as a crashed runtime would leave it gone).
    pub fn delete(&self) -> Result<(), TestkitError> {
        run(&ip()?, &["netns", "del", &self.name]).map(|_| ())
    }

    /// Runs `program args` inside the namespace; its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, TestkitError> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run(&ip()?, &all)
    }

    /// Starts `program args` inside the namespace (a server playing this host's part),
    /// its stdout discarded and its stderr into `log`. The caller owns the child.
    pub fn spawn(&self, program: &std::path::Path, args: &[&str], log: &std::path::Path) -> Result<std::process::Child, TestkitError> {
        let failed =
            |e: std::io::Error| TestkitError::Failed { what: format!("{} in {}", program.display(), self.name), detail: e.to_string() };
        let stderr = std::fs::File::create(log).map_err(failed)?;
        std::process::Command::new(ip()?)
            .args(["netns", "exec", &self.name])
            .arg(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(failed)
    }

    /// Adds a veth pair: `host_if` (address `host_cidr`) in the host namespace and
    /// `ns_if` (address `ns_cidr`) in this one, both up. Deleted with the namespace.
    pub fn add_veth(&self, host_if: &str, host_cidr: &str, ns_if: &str, ns_cidr: &str) -> Result<(), TestkitError> {
        let ip = ip()?;
        run(&ip, &["link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", &self.name])?;
        run(&ip, &["addr", "add", host_cidr, "dev", host_if])?;
        run(&ip, &["link", "set", host_if, "up"])?;
        let ip_s = ip.to_string_lossy();
        self.exec(&ip_s, &["addr", "add", ns_cidr, "dev", ns_if])?;
        self.exec(&ip_s, &["link", "set", ns_if, "up"])?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth ends, which destroys the host ends.
        if let (Ok(ip), true) = (ip(), self.exists()) {
            let _ = run(&ip, &["netns", "del", &self.name]);
        }
    }
}

/// Several test hosts on one L2 segment: a "switch" namespace holding a bridge, and a
/// namespace per host with `eth0` on it at `<prefix>.<10 + i>/24`. IPv6 is off in the
/// hosts (its link-local addresses appear late and race before/after snapshots).
/// Everything is deleted on drop. netplumb's overlay tests and the multi-host platform
/// tests use it as their cluster.
#[derive(Debug)]
pub struct Underlay {
    /// The hosts, in order.
    pub hosts: Vec<Netns>,
    /// Their underlay addresses, in the same order.
    pub addresses: Vec<std::net::Ipv4Addr>,
    switch: Netns,
    prefix: String,
    /// The root namespace's link into the switch, if joined (deleted on drop).
    root_link: Option<String>,
}

impl Underlay {
    /// `n` hosts on `<prefix>.0/24` (`prefix` is three octets: `"172.31.9"`).
    pub fn create(n: usize, prefix: &str) -> Result<Underlay, TestkitError> {
        let ip = ip()?;
        let ip_s = ip.to_string_lossy().into_owned();
        let switch = Netns::create("kpsw")?;
        switch.exec(&ip_s, &["link", "add", "sw0", "type", "bridge"])?;
        switch.exec(&ip_s, &["link", "set", "sw0", "up"])?;
        switch.exec(&ip_s, &["addr", "add", &format!("{prefix}.250/24"), "dev", "sw0"])?;
        let mut hosts = Vec::new();
        let mut addresses = Vec::new();
        for i in 0..n {
            let host = Netns::create("kphost")?;
            host.exec(
                "sh",
                &["-c", "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"],
            )?;
            let port = format!("p{i}");
            switch.exec(&ip_s, &["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", host.name()])?;
            switch.exec(&ip_s, &["link", "set", &port, "master", "sw0", "up"])?;
            let addr: std::net::Ipv4Addr = format!("{prefix}.{}", 10 + i)
                .parse()
                .map_err(|e| TestkitError::Failed { what: format!("underlay prefix {prefix:?}"), detail: format!("{e}") })?;
            host.exec(&ip_s, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            host.exec(&ip_s, &["link", "set", "eth0", "up"])?;
            hosts.push(host);
            addresses.push(addr);
        }
        Ok(Underlay { hosts, addresses, switch, prefix: prefix.to_owned(), root_link: None })
    }

    /// Puts the test's own (root) namespace on the segment at `<prefix>.1`, so servers
    /// the test starts there (etcd) are reachable from every host, and the test reaches
    /// the hosts. The link is deleted on drop. This adds a route to the root namespace:
    /// use a prefix no real network of the machine uses (198.18.0.0/15, reserved for
    /// benchmarking, rather than the 172.31/16 of some clouds).
    pub fn join_root(&mut self) -> Result<std::net::Ipv4Addr, TestkitError> {
        let ip = ip()?;
        let ip_s = ip.to_string_lossy().into_owned();
        let name = format!("kpr{}", std::process::id() % 1_000_000);
        run(&ip, &["link", "add", &name, "type", "veth", "peer", "name", "root", "netns", self.switch.name()])?;
        self.root_link = Some(name.clone());
        self.switch.exec(&ip_s, &["link", "set", "root", "master", "sw0", "up"])?;
        let addr: std::net::Ipv4Addr = format!("{}.1", self.prefix)
            .parse()
            .map_err(|e| TestkitError::Failed { what: format!("underlay prefix {:?}", self.prefix), detail: format!("{e}") })?;
        run(&ip, &["addr", "add", &format!("{addr}/24"), "dev", &name])?;
        run(&ip, &["link", "set", &name, "up"])?;
        Ok(addr)
    }

    /// The switch namespace, at `<prefix>.250` on the segment but no host: an intruder.
    pub fn switch(&self) -> &Netns {
        &self.switch
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        if let (Some(name), Ok(ip)) = (self.root_link.take(), ip()) {
            let _ = run(&ip, &["link", "del", &name]);
        }
    }
}
