//! Where everything of one cloud is: its namespaces, links, addresses and names, all
//! derived from the cloud's name, its host count and its underlay subnet, so that `up`,
//! `reset`, `down` and a cleanup after a crash agree without asking each other.
//!
//! ```
//! use keelson_examples::localcloud::layout::Layout;
//! let l = Layout::new("demo", 3, "10.78.0.0/24".parse().unwrap(), None).unwrap();
//! assert_eq!(l.host_netns(1), "lc-demo-h1");
//! assert_eq!(l.host_address(1).to_string(), "10.78.0.11");
//! assert_eq!(l.domain, "demo.test");
//! assert_eq!(l.etcd_endpoints(), vec!["http://10.78.0.11:2379", "http://10.78.0.12:2379", "http://10.78.0.13:2379"]);
//! assert!(Layout::new("Demo!", 3, "10.78.0.0/24".parse().unwrap(), None).is_err());
//! ```

use std::net::Ipv4Addr;

/// Why a cloud's layout was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// The name cannot name links, namespaces and a DNS label.
    #[error("cloud name {0:?}: 1 to 12 of a-z0-9, starting with a letter")]
    Name(String),
    /// Too few or too many hosts.
    #[error("--hosts {0}: from 3 (the etcd members' hosts) to 100")]
    Hosts(usize),
    /// The underlay is not a /24.
    #[error("underlay {0}: must be a /24 (the machine at .1, hosts from .11, the LAN machine at .200)")]
    Underlay(String),
    /// The domain is not DNS labels.
    #[error("domain {0:?}: not a DNS name of a-z0-9- labels")]
    Domain(String),
}

/// The etcd members: the first three hosts.
pub const ETCD_MEMBERS: usize = 3;
/// Port of edge's HTTP listener on the load balancer.
pub const EDGE_PORT: u16 = 80;
/// Port of edge's metrics and readiness listener.
pub const EDGE_METRICS_PORT: u16 = 9100;
/// Port of the DNS server.
pub const DNS_PORT: u16 = 53;

/// Everything of one cloud that has a name or an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The cloud's name.
    pub name: String,
    /// How many hosts.
    pub hosts: usize,
    /// The underlay's first three octets.
    prefix: [u8; 3],
    /// The zone the DNS server serves: the cloud's own name resolves to edge.
    pub domain: String,
}

impl Layout {
    /// The layout of cloud `name` with `hosts` hosts on `underlay` (a /24), its names
    /// under `domain` (default `<name>.test`).
    pub fn new(name: &str, hosts: usize, underlay: ipnet::Ipv4Net, domain: Option<&str>) -> Result<Layout, LayoutError> {
        let name_ok = (1..=12).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !name_ok {
            return Err(LayoutError::Name(name.to_owned()));
        }
        if !(ETCD_MEMBERS..=100).contains(&hosts) {
            return Err(LayoutError::Hosts(hosts));
        }
        if underlay.prefix_len() != 24 {
            return Err(LayoutError::Underlay(underlay.to_string()));
        }
        let o = underlay.network().octets();
        let domain = domain.map_or_else(|| format!("{name}.test"), |d| d.trim_end_matches('.').to_ascii_lowercase());
        if !crate::minipaas::platform::is_domain(&domain) {
            return Err(LayoutError::Domain(domain));
        }
        Ok(Layout { name: name.to_owned(), hosts, prefix: [o[0], o[1], o[2]], domain })
    }

    fn address(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], last)
    }

    /// The underlay, as `a.b.c.0/24`.
    pub fn underlay(&self) -> String {
        format!("{}/24", self.address(0))
    }

    /// This machine's address on the underlay (the hosts' gateway).
    pub fn machine_address(&self) -> Ipv4Addr {
        self.address(1)
    }

    /// The namespace of host `i` (1-based).
    pub fn host_netns(&self, i: usize) -> String {
        format!("lc-{}-h{i}", self.name)
    }

    /// Host `i`'s underlay address.
    pub fn host_address(&self, i: usize) -> Ipv4Addr {
        self.address(10 + i as u8)
    }

    /// Host `i`'s node in the cluster.
    pub fn node(&self, i: usize) -> String {
        format!("{}-h{i}", self.name)
    }

    /// The namespace holding the underlay's switch (a bridge).
    pub fn switch_netns(&self) -> String {
        format!("lc-{}-sw", self.name)
    }

    /// This machine's end of its link into the switch.
    pub fn machine_link(&self) -> String {
        format!("lc-{}", self.name)
    }

    /// The namespace playing a machine on the LAN: it resolves the cloud's names through
    /// its own unbound.
    pub fn lan_netns(&self) -> String {
        format!("lc-{}-lan", self.name)
    }

    /// The LAN machine's underlay address.
    pub fn lan_address(&self) -> Ipv4Addr {
        self.address(200)
    }

    /// Every namespace, hosts first.
    pub fn namespaces(&self) -> Vec<String> {
        let mut all: Vec<String> = (1..=self.hosts).map(|i| self.host_netns(i)).collect();
        all.push(self.lan_netns());
        all.push(self.switch_netns());
        all
    }

    /// The host running the load balancer (edge) and the DNS server.
    pub fn lb_host(&self) -> usize {
        1
    }

    /// The load balancer's address: the cloud's name and every role's resolve to it.
    pub fn lb_address(&self) -> Ipv4Addr {
        self.host_address(self.lb_host())
    }

    /// etcd's client URLs, one per member.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        (1..=ETCD_MEMBERS).map(|i| format!("http://{}:2379", self.host_address(i))).collect()
    }

    /// etcd's `--initial-cluster`.
    pub fn etcd_initial_cluster(&self) -> String {
        (1..=ETCD_MEMBERS).map(|i| format!("{}=http://{}:2380", self.etcd_member(i), self.host_address(i))).collect::<Vec<_>>().join(",")
    }

    /// The etcd member on host `i`.
    pub fn etcd_member(&self, i: usize) -> String {
        format!("etcd{i}")
    }

    /// The name `role` answers by.
    pub fn role_name(&self, role: &str) -> String {
        format!("{role}.{}", self.domain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> ipnet::Ipv4Net {
        s.parse().expect("net")
    }

    #[test]
    fn names_and_addresses_follow_from_name_hosts_and_underlay() {
        let l = Layout::new("dev", 4, net("198.18.90.0/24"), Some("Cloud.Example.")).expect("layout");
        assert_eq!(l.domain, "cloud.example");
        assert_eq!(l.namespaces(), vec!["lc-dev-h1", "lc-dev-h2", "lc-dev-h3", "lc-dev-h4", "lc-dev-lan", "lc-dev-sw"]);
        assert_eq!(l.host_address(4), Ipv4Addr::new(198, 18, 90, 14));
        assert_eq!(l.lan_address(), Ipv4Addr::new(198, 18, 90, 200));
        assert_eq!(
            l.etcd_initial_cluster(),
            "etcd1=http://198.18.90.11:2380,etcd2=http://198.18.90.12:2380,etcd3=http://198.18.90.13:2380"
        );
        assert_eq!(l.role_name("master"), "master.cloud.example");
        assert_eq!(l.machine_link(), "lc-dev");
    }

    #[test]
    fn bad_layouts_are_typed_errors_naming_the_value() {
        assert_eq!(
            Layout::new("averyveryverylongname", 3, net("10.1.2.0/24"), None),
            Err(LayoutError::Name("averyveryverylongname".into()))
        );
        assert_eq!(Layout::new("9lives", 3, net("10.1.2.0/24"), None), Err(LayoutError::Name("9lives".into())));
        assert_eq!(Layout::new("ok", 2, net("10.1.2.0/24"), None), Err(LayoutError::Hosts(2)));
        assert_eq!(Layout::new("ok", 3, net("10.1.0.0/16"), None), Err(LayoutError::Underlay("10.1.0.0/16".into())));
        let err = Layout::new("ok", 3, net("10.1.2.0/24"), Some("a..b")).expect_err("domain");
        assert!(err.to_string().contains("a..b"), "{err}");
    }
}
