//! The nftables layout of one bridge network, programmed in one atomic batch per change:
//!
//! ```text
//! table ip keelson-<network> {
//!   map tcp_addr { inet_service : ipv4_addr }   # host port -> endpoint address
//!   map tcp_port { inet_service : inet_service } # host port -> endpoint port
//!   map udp_addr, udp_port                       # the same for UDP
//!   chain prerouting  { nat, dstnat: fib daddr type local, dnat through the maps }
//!   chain output      { nat, dstnat: the same, for the host itself and localhost }
//!   chain postrouting { nat, srcnat: masquerade leaving the bridge (if asked),
//!                       hairpin (endpoint -> own network through a published port),
//!                       localhost -> published port }
//!   chain forward     { filter: drop from this bridge to any other keelson bridge }
//! }
//! ```
//!
//! An attachment adds and removes map *elements*, never rules or chains, so the cost of
//! a change does not grow with the number of attachments (moby#53466). Beside dockerd,
//! whose FORWARD policy is drop, the network's traffic is accepted in `DOCKER-USER`
//! (rules carrying the comment `keelson:<bridge>`, found and removed by that comment).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::nft::{expr, BaseChain, Batch, Element, Hook, Nft, NftError, ACCEPT, DROP, FAMILY_IPV4, REG_1, REG_2, REG_3};
use crate::attachment::{PortMapping, Protocol};
use crate::error::{Error, Result};

/// The prefix every keelson bridge name starts with (isolation matches on it).
pub(crate) const BRIDGE_PREFIX: &str = "kpb";
const DOCKER_TABLE: &str = "filter";
const DOCKER_USER: &str = "DOCKER-USER";
const ENOENT: i32 = nix::errno::Errno::ENOENT as i32;

/// One network's firewall.
pub(crate) struct Firewall<'a> {
    pub(crate) network: &'a str,
    pub(crate) bridge: &'a str,
    pub(crate) subnet: Ipv4Net,
    pub(crate) masquerade: bool,
    /// Destinations never masqueraded (the overlay's cluster CIDR).
    pub(crate) keep_source_to: Option<Ipv4Net>,
}

fn nft_error(what: &str, e: NftError) -> Error {
    Error::Backend { backend: "nftables", source: format!("{what}: {e}").into() }
}

fn is_enoent(e: &NftError) -> bool {
    e.source.raw_os_error() == Some(ENOENT)
}

/// Matches `ip saddr` in `net`.
fn saddr_in(net: Ipv4Net) -> Vec<super::nft::Expr> {
    vec![
        expr::payload(expr::NETWORK_HEADER, 12, 4, REG_1),
        expr::mask(REG_1, &net.netmask().octets()),
        expr::cmp(REG_1, true, &net.network().octets()),
    ]
}

fn oifname(eq: bool, name: &str) -> Vec<super::nft::Expr> {
    vec![expr::meta(expr::META_OIFNAME, REG_1), expr::cmp(REG_1, eq, &super::nft::ifname_bytes(name))]
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
}

fn maps(p: Protocol) -> (&'static str, &'static str) {
    match p {
        Protocol::Tcp => ("tcp_addr", "tcp_port"),
        Protocol::Udp => ("udp_addr", "udp_port"),
    }
}

impl Firewall<'_> {
    pub(crate) fn table(&self) -> String {
        format!("keelson-{}", self.network)
    }

    fn comment(&self) -> String {
        format!("keelson:{}", self.bridge)
    }

    /// Creates (or re-creates, after a crash) the network's table and its DOCKER-USER
    /// rules, in one batch.
    pub(crate) fn create(&self, nft: &Nft) -> Result<()> {
        let t = self.table();
        let f = FAMILY_IPV4;
        let mut b = Batch::default();
        // add + delete + add: starts from an empty table whether or not one was left.
        b.add_table(f, &t);
        b.del_table(f, &t);
        b.add_table(f, &t);
        for p in [Protocol::Tcp, Protocol::Udp] {
            let (addr, port) = maps(p);
            b.add_map(f, &t, addr, (super::nft::TYPE_INET_SERVICE, 2), (super::nft::TYPE_IPV4_ADDR, 4));
            b.add_map(f, &t, port, (super::nft::TYPE_INET_SERVICE, 2), (super::nft::TYPE_INET_SERVICE, 2));
        }
        let nat = |hook, priority| Some(BaseChain { hook, priority, kind: "nat" });
        b.add_chain(f, &t, "prerouting", nat(Hook::Prerouting, -100));
        b.add_chain(f, &t, "output", nat(Hook::Output, -100));
        b.add_chain(f, &t, "postrouting", nat(Hook::Postrouting, 100));
        b.add_chain(f, &t, "forward", Some(BaseChain { hook: Hook::Forward, priority: 0, kind: "filter" }));
        for chain in ["prerouting", "output"] {
            for p in [Protocol::Tcp, Protocol::Udp] {
                let (addr, port) = maps(p);
                let rule = vec![
                    expr::fib_daddr_type(REG_1),
                    expr::cmp(REG_1, true, &expr::RTN_LOCAL.to_ne_bytes()),
                    expr::meta(expr::META_L4PROTO, REG_1),
                    expr::cmp(REG_1, true, &[proto_number(p)]),
                    expr::payload(expr::TRANSPORT_HEADER, 2, 2, REG_1),
                    expr::map_lookup(addr, REG_1, REG_2),
                    expr::map_lookup(port, REG_1, REG_3),
                    expr::dnat(REG_2, REG_3),
                ];
                b.add_rule(f, &t, chain, rule, None, false);
            }
        }
        if self.masquerade {
            let mut rule = saddr_in(self.subnet);
            if let Some(cluster) = self.keep_source_to {
                rule.extend([
                    expr::payload(expr::NETWORK_HEADER, 16, 4, REG_1),
                    expr::mask(REG_1, &cluster.netmask().octets()),
                    expr::cmp(REG_1, false, &cluster.network().octets()),
                ]);
            }
            rule.extend(oifname(false, self.bridge));
            rule.push(expr::masquerade());
            b.add_rule(f, &t, "postrouting", rule, None, false);
        }
        // Hairpin: an endpoint reaching its own network through a published port must
        // see the answer come from where it sent to.
        let mut rule = saddr_in(self.subnet);
        rule.extend([
            expr::ct_status(REG_1),
            expr::mask(REG_1, &expr::CT_STATUS_DNAT.to_ne_bytes()),
            expr::cmp(REG_1, false, &0u32.to_ne_bytes()),
        ]);
        rule.extend(oifname(true, self.bridge));
        rule.push(expr::masquerade());
        b.add_rule(f, &t, "postrouting", rule, None, false);
        // localhost -> published port (with route_localnet on the bridge).
        let mut rule = saddr_in(Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).unwrap_or_default());
        rule.extend(oifname(true, self.bridge));
        rule.push(expr::masquerade());
        b.add_rule(f, &t, "postrouting", rule, None, false);
        // Isolation: nothing from this bridge to another keelson bridge.
        let rule = vec![
            expr::meta(expr::META_IIFNAME, REG_1),
            expr::cmp(REG_1, true, &super::nft::ifname_bytes(self.bridge)),
            expr::meta(expr::META_OIFNAME, REG_1),
            expr::cmp(REG_1, true, &super::nft::ifname_bytes(&format!("{BRIDGE_PREFIX}*"))),
            expr::cmp(REG_1, false, &super::nft::ifname_bytes(self.bridge)),
            expr::verdict(DROP),
        ];
        b.add_rule(f, &t, "forward", rule, None, false);
        self.docker_user(nft, &mut b, true)?;
        nft.commit(b).map_err(|e| nft_error(&format!("creating table {t}"), e))
    }

    /// Adds to `b` the removal of this network's DOCKER-USER rules and, with `add`, new
    /// ones. Nothing if there is no DOCKER-USER chain (no dockerd).
    fn docker_user(&self, nft: &Nft, b: &mut Batch, add: bool) -> Result<()> {
        let listed = nft
            .list_rules(FAMILY_IPV4, DOCKER_TABLE, DOCKER_USER)
            .map_err(|e| Error::Backend { backend: "nftables", source: format!("listing {DOCKER_USER}: {e}").into() })?;
        let Some(rules) = listed else { return Ok(()) };
        let comment = self.comment();
        for r in rules.iter().filter(|r| r.comment.as_deref() == Some(comment.as_str())) {
            b.del_rule(FAMILY_IPV4, DOCKER_TABLE, DOCKER_USER, r.handle);
        }
        if add {
            let name = super::nft::ifname_bytes(self.bridge);
            for key in [expr::META_IIFNAME, expr::META_OIFNAME] {
                let rule = vec![expr::meta(key, REG_1), expr::cmp(REG_1, true, &name), expr::verdict(ACCEPT)];
                b.add_rule(FAMILY_IPV4, DOCKER_TABLE, DOCKER_USER, rule, Some(&comment), true);
            }
        }
        Ok(())
    }

    /// Removes the table and the DOCKER-USER rules; already gone is fine.
    pub(crate) fn delete(&self, nft: &Nft) -> Result<()> {
        let mut b = Batch::default();
        self.docker_user(nft, &mut b, false)?;
        nft.commit(b).map_err(|e| nft_error("removing DOCKER-USER rules", e))?;
        let mut b = Batch::default();
        b.del_table(FAMILY_IPV4, &self.table());
        match nft.commit(b) {
            Ok(()) => Ok(()),
            Err(e) if is_enoent(&e) => Ok(()),
            Err(e) => Err(nft_error(&format!("deleting table {}", self.table()), e)),
        }
    }

    fn elements(address: Ipv4Addr, ports: &[PortMapping], p: Protocol) -> (Vec<Element>, Vec<Element>) {
        let mine = ports.iter().filter(|m| m.protocol == p);
        let addr = mine.clone().map(|m| (m.host_port.to_be_bytes().to_vec(), address.octets().to_vec())).collect();
        let port = mine.map(|m| (m.host_port.to_be_bytes().to_vec(), m.container_port.to_be_bytes().to_vec())).collect();
        (addr, port)
    }

    /// Publishes `ports` of `address`: map elements, one batch.
    pub(crate) fn publish(&self, nft: &Nft, address: Ipv4Addr, ports: &[PortMapping]) -> Result<()> {
        let t = self.table();
        let mut b = Batch::default();
        for p in [Protocol::Tcp, Protocol::Udp] {
            let (addr, port) = Firewall::elements(address, ports, p);
            let (addr_map, port_map) = maps(p);
            b.add_elems(FAMILY_IPV4, &t, addr_map, &addr);
            b.add_elems(FAMILY_IPV4, &t, port_map, &port);
        }
        nft.commit(b).map_err(|e| nft_error(&format!("publishing ports of {address}"), e))
    }

    /// Withdraws `ports`; elements already gone are fine.
    pub(crate) fn unpublish(&self, nft: &Nft, address: Ipv4Addr, ports: &[PortMapping]) -> Result<()> {
        let t = self.table();
        let mut all = Vec::new();
        for p in [Protocol::Tcp, Protocol::Udp] {
            let (addr, port) = Firewall::elements(address, ports, p);
            let (addr_map, port_map) = maps(p);
            all.push((addr_map, addr));
            all.push((port_map, port));
        }
        let mut b = Batch::default();
        for (map, elems) in &all {
            b.del_elems(FAMILY_IPV4, &t, map, elems);
        }
        match nft.commit(b) {
            Ok(()) => Ok(()),
            // Some are gone (a crash mid-detach, or the table itself): remove the rest one by one.
            Err(e) if is_enoent(&e) => {
                for (map, elems) in &all {
                    for elem in elems {
                        let mut b = Batch::default();
                        b.del_elems(FAMILY_IPV4, &t, map, std::slice::from_ref(elem));
                        match nft.commit(b) {
                            Ok(()) => {}
                            Err(e) if is_enoent(&e) => {}
                            Err(e) => return Err(nft_error("withdrawing a published port", e)),
                        }
                    }
                }
                Ok(())
            }
            Err(e) => Err(nft_error(&format!("withdrawing ports of {address}"), e)),
        }
    }
}
