//! An IPv4 address pool: a subnet, its gateway, and the addresses endpoints may get.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The addresses of one network: the subnet's first host address is the gateway, the
/// rest up to the broadcast address go to endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// The subnet.
    pub subnet: Ipv4Net,
    /// The gateway (the subnet's first host address).
    pub gateway: Ipv4Addr,
}

impl Pool {
    /// The pool of `cidr` (`10.88.0.0/16`). [`Error::InvalidInput`] if it does not parse, is
    /// not a network address, is IPv6, or has fewer than two endpoint addresses.
    pub fn parse(cidr: &str) -> Result<Pool> {
        let invalid = |reason: &str| Error::InvalidInput { field: "subnet", value: cidr.to_owned(), reason: reason.to_owned() };
        let subnet: Ipv4Net = cidr.parse().map_err(|_| invalid("not an IPv4 CIDR (10.88.0.0/16); IPv6 pools are not supported yet"))?;
        if subnet.network() != subnet.addr() {
            return Err(invalid(&format!("host bits are set; the network is {}", subnet.trunc())));
        }
        if subnet.prefix_len() > 29 {
            return Err(invalid("too small: a pool needs at least /29 (a gateway and endpoints)"));
        }
        let gateway = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        Ok(Pool { subnet, gateway })
    }

    /// The first address an endpoint may get.
    pub fn first(&self) -> u32 {
        u32::from(self.gateway) + 1
    }

    /// The last address an endpoint may get (before broadcast).
    pub fn last(&self) -> u32 {
        u32::from(self.subnet.broadcast()) - 1
    }

    /// Addresses to try, in order: those after `after`, then from the start, so a freed
    /// address is reused last (peers' ARP caches forget it in the meantime).
    pub fn candidates(&self, after: Option<Ipv4Addr>) -> impl Iterator<Item = Ipv4Addr> {
        let (first, last) = (self.first(), self.last());
        let start = after.map(u32::from).filter(|a| (first..=last).contains(a)).map_or(first, |a| if a == last { first } else { a + 1 });
        (start..=last).chain(first..start).map(Ipv4Addr::from)
    }

    /// [`Pool::candidates`], with `prefer` first when it is one of the pool's endpoint
    /// addresses (a caller asking for the address it had; one outside the pool is
    /// ignored: the endpoint moved to another subnet).
    pub fn candidates_preferring(&self, prefer: Option<Ipv4Addr>, after: Option<Ipv4Addr>) -> impl Iterator<Item = Ipv4Addr> {
        let (first, last) = (self.first(), self.last());
        let prefer = prefer.filter(|a| (first..=last).contains(&u32::from(*a)));
        prefer.into_iter().chain(self.candidates(after).filter(move |a| Some(*a) != prefer))
    }

    /// Whether two pools share an address.
    pub fn overlaps(&self, other: &Pool) -> bool {
        self.subnet.contains(&other.subnet.network()) || other.subnet.contains(&self.subnet.network())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_iterates() {
        let p = Pool::parse("10.9.0.0/29").unwrap();
        assert_eq!(p.gateway, Ipv4Addr::new(10, 9, 0, 1));
        let all: Vec<_> = p.candidates(None).collect();
        assert_eq!(all.first(), Some(&Ipv4Addr::new(10, 9, 0, 2)));
        assert_eq!(all.last(), Some(&Ipv4Addr::new(10, 9, 0, 6)));
        let wrapped: Vec<_> = p.candidates(Some(Ipv4Addr::new(10, 9, 0, 5))).collect();
        assert_eq!(wrapped[0], Ipv4Addr::new(10, 9, 0, 6));
        assert_eq!(wrapped[1], Ipv4Addr::new(10, 9, 0, 2));
        assert_eq!(wrapped.len(), 5);
    }

    #[test]
    fn a_preferred_address_comes_first_when_it_is_in_the_pool() {
        let p = Pool::parse("10.9.0.0/29").unwrap();
        let after = Some(Ipv4Addr::new(10, 9, 0, 3));
        let preferred: Vec<_> = p.candidates_preferring(Some(Ipv4Addr::new(10, 9, 0, 2)), after).collect();
        assert_eq!(preferred[0], Ipv4Addr::new(10, 9, 0, 2));
        assert_eq!(preferred[1], Ipv4Addr::new(10, 9, 0, 4), "then the usual order");
        assert_eq!(preferred.len(), 5, "no address twice");
        for outside in [Ipv4Addr::new(10, 9, 0, 1), Ipv4Addr::new(10, 9, 0, 7), Ipv4Addr::new(10, 8, 0, 2)] {
            let ignored: Vec<_> = p.candidates_preferring(Some(outside), after).collect();
            assert_eq!(ignored, p.candidates(after).collect::<Vec<_>>(), "{outside}: gateway, broadcast and other subnets are ignored");
        }
    }

    #[test]
    fn refuses_bad_cidrs() {
        for bad in ["10.9.0.1/24", "10.9.0.0/30", "10.9.0.0", "fd00::/64", "300.1.1.0/24", ""] {
            assert!(matches!(Pool::parse(bad), Err(Error::InvalidInput { field: "subnet", .. })), "{bad}");
        }
        let a = Pool::parse("10.0.0.0/16").unwrap();
        assert!(a.overlaps(&Pool::parse("10.0.4.0/24").unwrap()));
        assert!(!a.overlaps(&Pool::parse("10.1.0.0/16").unwrap()));
    }
}
