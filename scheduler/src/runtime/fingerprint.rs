//! What a node agent can learn about its machine, so placement has something to match:
//! cpu, memory and disk as resources, kernel, OS and architecture as attributes, and
//! the address other hosts reach it at (the default route's interface), as Nomad's
//! fingerprinters do.
//!
//! Attributes (`attr.<name>` in constraints):
//! `cpu.cores`, `cpu.millis`, `memory.mb`, `disk.mb`, `kernel.name` (`linux`),
//! `kernel.version` (`6.1.0-18-amd64`), `os.name` (`debian`), `os.version` (`12`),
//! `arch` (`x86_64`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use crate::placement::model::Resources;

/// What [`fingerprint`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Fingerprint {
    /// CPU (a thousandth of a core per unit), memory (MiB) and disk (MiB of the
    /// filesystem holding the path given).
    pub resources: Resources,
    /// Attributes, named as in this module's docs.
    pub attributes: BTreeMap<String, String>,
}

/// Reads this machine's resources and attributes; `disk_path` names the filesystem
/// tasks' data lives on (Docker's data root, say). A fact that cannot be read is left
/// out (and logged), never guessed.
pub fn fingerprint(disk_path: &Path) -> Fingerprint {
    let mut out = Fingerprint::default();
    let mut attr = |k: &str, v: String| {
        out.attributes.insert(k.to_owned(), v);
    };
    if let Ok(cores) = std::thread::available_parallelism() {
        let cores = cores.get() as u64;
        attr("cpu.cores", cores.to_string());
        attr("cpu.millis", (cores * 1000).to_string());
        out.resources.cpu_millis = cores * 1000;
    }
    match std::fs::read_to_string("/proc/meminfo").map(|t| meminfo_total_mb(&t)) {
        Ok(Some(mb)) => {
            attr("memory.mb", mb.to_string());
            out.resources.memory_mb = mb;
        }
        other => tracing::warn!(?other, "memory size unknown (/proc/meminfo)"),
    }
    match nix::sys::statvfs::statvfs(disk_path) {
        Ok(fs) => {
            let mb = fs.blocks().saturating_mul(fs.fragment_size()) >> 20;
            attr("disk.mb", mb.to_string());
            out.resources.disk_mb = mb;
        }
        Err(e) => tracing::warn!(path = %disk_path.display(), error = %e, "disk size unknown"),
    }
    attr("kernel.name", std::env::consts::OS.to_owned());
    if let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        attr("kernel.version", release.trim().to_owned());
    }
    attr("arch", std::env::consts::ARCH.to_owned());
    let os_release = std::fs::read_to_string("/etc/os-release").or_else(|_| std::fs::read_to_string("/usr/lib/os-release"));
    if let Ok(text) = os_release {
        let fields = os_release_fields(&text);
        for (field, name) in [("ID", "os.name"), ("VERSION_ID", "os.version")] {
            if let Some(v) = fields.get(field) {
                attr(name, v.clone());
            }
        }
    }
    out
}

/// `MemTotal` of `/proc/meminfo` in MiB.
fn meminfo_total_mb(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// `KEY=value` lines of os-release(5), quotes removed.
fn os_release_fields(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').trim_matches('\'').to_owned()))
        .collect()
}

/// The IPv4 address of the interface the default route leaves by, in the calling
/// thread's network namespace: the address other hosts reach this one at. `None` when
/// there is no default route or its interface has no IPv4 address.
pub fn default_route_address() -> std::io::Result<Option<IpAddr>> {
    // thread-self, not self: /proc/self/net is the main thread's namespace.
    let routes = std::fs::read_to_string("/proc/thread-self/net/route")?;
    let Some(interface) = default_route_interface(&routes) else { return Ok(None) };
    let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    Ok(addrs
        .filter(|a| a.interface_name == interface)
        .find_map(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())))))
}

/// The interface of the lowest-metric default route in `/proc/net/route`'s table.
fn default_route_interface(table: &str) -> Option<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...; flag 0x1 = up.
            let (iface, dest, flags, metric, mask) = (f.first()?, f.get(1)?, f.get(3)?, f.get(6)?, f.get(7)?);
            let up = u32::from_str_radix(flags, 16).ok()? & 1 == 1;
            (up && *dest == "00000000" && *mask == "00000000").then(|| (metric.parse::<u32>().unwrap_or(u32::MAX), iface.to_string()))
        })
        .min()
        .map(|(_, iface)| iface)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_with_the_lowest_metric_wins() {
        let table = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
                     eth1\t00000000\t010200C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
                     eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                     docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        assert_eq!(default_route_interface(table).as_deref(), Some("eth0"));
        let no_default = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
                          docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\n";
        assert_eq!(default_route_interface(no_default), None);
        let down = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
                    eth0\t00000000\t010200C0\t0002\t0\t0\t0\t00000000\n";
        assert_eq!(default_route_interface(down), None, "a route without the up flag is not used");
    }

    #[test]
    fn memory_and_os_release_are_read_from_their_formats() {
        assert_eq!(meminfo_total_mb("MemTotal:       24576000 kB\nMemFree: 1 kB\n"), Some(24000));
        assert_eq!(meminfo_total_mb("MemFree: 1 kB\n"), None);
        let fields = os_release_fields("NAME=\"Debian GNU/Linux\"\nID=debian\nVERSION_ID=\"12\"\n");
        assert_eq!((fields["ID"].as_str(), fields["VERSION_ID"].as_str()), ("debian", "12"));
    }

    #[test]
    fn this_machine_has_cpu_memory_kernel_and_arch() {
        let f = fingerprint(Path::new("/"));
        assert!(f.resources.cpu_millis >= 1000 && f.resources.memory_mb > 0 && f.resources.disk_mb > 0, "{f:?}");
        assert_eq!(f.attributes["kernel.name"], "linux");
        assert_eq!(f.attributes["arch"], std::env::consts::ARCH);
        assert!(f.attributes.contains_key("kernel.version"), "{f:?}");
    }
}
