//! Links, addresses and routes over rtnetlink.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::error::{Error, Result};

const ENODEV: i32 = nix::errno::Errno::ENODEV as i32;
const ENOENT: i32 = nix::errno::Errno::ENOENT as i32;
const EEXIST: i32 = nix::errno::Errno::EEXIST as i32;
const ESRCH: i32 = nix::errno::Errno::ESRCH as i32;

/// Whether a delete failed only because the object is already gone.
pub(crate) fn already_gone(e: &rtnetlink::Error) -> bool {
    matches!(errno(e), ENOENT | ESRCH | ENODEV)
}

/// The errno of a netlink error (0 if it is not one).
pub(crate) fn errno(e: &rtnetlink::Error) -> i32 {
    match e {
        rtnetlink::Error::NetlinkError(m) => -m.raw_code(),
        _ => 0,
    }
}

pub(crate) fn backend(what: impl std::fmt::Display, e: rtnetlink::Error) -> Error {
    Error::Backend { backend: "netlink", source: format!("{what}: {e}").into() }
}

/// A connection to rtnetlink in the calling thread's namespace, driven on the current
/// tokio runtime.
pub(crate) fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| Error::Backend { backend: "netlink", source: Box::new(e) })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The link named `name`, if it exists.
pub(crate) async fn by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    match h.link().get().match_name(name.to_owned()).execute().try_next().await {
        Ok(link) => Ok(link),
        Err(e) if matches!(errno(&e), ENODEV | ENOENT) => Ok(None),
        Err(e) => Err(backend(format!("looking up link {name}"), e)),
    }
}

/// The alias (`ifalias`) of a link.
pub(crate) fn alias(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(s) => Some(s.as_str()),
        _ => None,
    })
}

/// The name of a link.
pub(crate) fn name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(s) => Some(s.as_str()),
        _ => None,
    })
}

/// The bridge (controller) a link is enslaved to.
pub(crate) fn controller(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

/// Every link of the namespace.
pub(crate) async fn all(h: &Handle) -> Result<Vec<LinkMessage>> {
    h.link().get().execute().try_collect().await.map_err(|e| backend("listing links", e))
}

/// The bridge `name` with `gateway/prefix` on it, up; created if missing. Returns its index.
pub(crate) async fn ensure_bridge(h: &Handle, name: &str, mtu: u32, gateway: Ipv4Addr, prefix: u8, alias: &str) -> Result<u32> {
    let index = match by_name(h, name).await? {
        Some(link) => link.header.index,
        None => {
            let msg = LinkBridge::new(name).mtu(mtu).alias(alias).up().build();
            match h.link().add(msg).execute().await {
                Ok(()) => {}
                // Another process made it between our look and our add.
                Err(e) if errno(&e) == EEXIST => {}
                Err(e) => return Err(backend(format!("creating bridge {name}"), e)),
            }
            by_name(h, name)
                .await?
                .ok_or_else(|| Error::Backend { backend: "netlink", source: format!("bridge {name} vanished").into() })?
                .header
                .index
        }
    };
    match h.address().add(index, gateway.into(), prefix).execute().await {
        Ok(()) => {}
        Err(e) if errno(&e) == EEXIST => {}
        Err(e) => return Err(backend(format!("adding {gateway}/{prefix} to {name}"), e)),
    }
    Ok(index)
}

/// What the host side of a veth pair looks like.
pub(crate) struct VethSpec<'a> {
    pub(crate) host_name: &'a str,
    pub(crate) peer_name: &'a str,
    pub(crate) peer_netns: std::os::fd::RawFd,
    pub(crate) peer_mac: [u8; 6],
    pub(crate) bridge: u32,
    pub(crate) mtu: u32,
    pub(crate) alias: &'a str,
}

/// Creates a veth pair in one request: the host end enslaved to the bridge and up, the
/// peer created directly inside the endpoint's namespace (never visible on the host)
/// with its MAC. The peer cannot be brought up in the same request (veth refuses to open
/// before its pair is complete: ENOTCONN); [`configure_endpoint`] does it. Sets hairpin on the bridge port when `hairpin` (an endpoint reaching
/// itself through its own published port).
pub(crate) async fn create_veth(h: &Handle, v: &VethSpec<'_>, hairpin: bool) -> Result<()> {
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(v.peer_name.to_owned())
        .setns_by_fd(v.peer_netns)
        .address(v.peer_mac.to_vec())
        .mtu(v.mtu)
        .build();
    let msg = LinkVeth::new(v.host_name, v.peer_name)
        .set_info_data(rtnetlink::packet_route::link::InfoData::Veth(rtnetlink::packet_route::link::InfoVeth::Peer(peer)))
        .mtu(v.mtu)
        .controller(v.bridge)
        .alias(v.alias)
        .up()
        .build();
    h.link().add(msg).execute().await.map_err(|e| match errno(&e) {
        EEXIST => Error::Conflict {
            kind: "interface",
            name: v.host_name.to_owned(),
            reason: "a link of this name exists (attached twice?)".into(),
        },
        _ => backend(format!("creating veth {} (peer {})", v.host_name, v.peer_name), e),
    })?;
    if hairpin {
        let link = by_name(h, v.host_name)
            .await?
            .ok_or_else(|| Error::Backend { backend: "netlink", source: format!("veth {} vanished", v.host_name).into() })?;
        let msg = rtnetlink::LinkBridgePort::new(link.header.index).hairpin(true).build();
        h.link().set_port(msg).execute().await.map_err(|e| backend(format!("hairpin on {}", v.host_name), e))?;
    }
    Ok(())
}

/// Deletes the link `name`; already gone is fine. Returns whether it existed.
pub(crate) async fn delete(h: &Handle, name: &str) -> Result<bool> {
    let Some(link) = by_name(h, name).await? else { return Ok(false) };
    match h.link().del(link.header.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if already_gone(&e) => Ok(false),
        Err(e) => Err(backend(format!("deleting link {name}"), e)),
    }
}

/// Inside an endpoint's namespace: the address and the default route via the gateway.
pub(crate) async fn configure_endpoint(h: &Handle, ifname: &str, address: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> Result<()> {
    let link = by_name(h, ifname)
        .await?
        .ok_or_else(|| Error::Backend { backend: "netlink", source: format!("{ifname} is missing in the endpoint's namespace").into() })?;
    let index = link.header.index;
    // Sent back to back on one socket: the kernel handles them in order (up, address,
    // then the route that needs both), and we wait for the three answers together.
    let up = h.link().set(LinkUnspec::new_with_index(index).up().build()).execute();
    let addr = h.address().add(index, address.into(), prefix).execute();
    let route = h.route().add(RouteMessageBuilder::<Ipv4Addr>::new().gateway(gateway).output_interface(index).build()).execute();
    let (up, addr, route) = futures::join!(up, addr, route);
    up.map_err(|e| backend(format!("setting {ifname} up"), e))?;
    addr.map_err(|e| backend(format!("adding {address}/{prefix} to {ifname}"), e))?;
    match route {
        Ok(()) => Ok(()),
        // The namespace already has a default route (another network's): keep it.
        Err(e) if errno(&e) == EEXIST => Ok(()),
        Err(e) => Err(backend(format!("default route via {gateway} on {ifname}"), e)),
    }
}

/// One link to delete, and where to say whether it existed.
type DeleteRequest = (String, tokio::sync::oneshot::Sender<Result<bool>>);

/// Deletes links in batches. Deleting a link waits in the kernel for RCU grace periods
/// and for references to drain (some 20 ms per veth, under the RTNL lock, so concurrent
/// deletions only queue). Deletions that arrive while one is under way are tagged with
/// a link group of this process and deleted by one group delete, which pays that wait
/// once for the whole batch.
#[derive(Clone, Debug)]
pub(crate) struct Deleter {
    tx: tokio::sync::mpsc::UnboundedSender<DeleteRequest>,
}

impl Deleter {
    /// Starts the deleting task on the current runtime.
    pub(crate) fn start(h: Handle) -> Deleter {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(delete_batches(h, rx));
        Deleter { tx }
    }

    /// Deletes `name` (already gone is fine); whether it existed.
    pub(crate) async fn delete(&self, name: &str) -> Result<bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send((name.to_owned(), tx))
            .map_err(|_| Error::Backend { backend: "netlink", source: "the link deleter stopped".into() })?;
        rx.await.map_err(|_| Error::Backend { backend: "netlink", source: "the link deleter stopped".into() })?
    }
}

/// A link group no other process uses: this process's id in the low 22 bits (Linux
/// pids fit), a batch counter of 1 to 1023 above, so the group is never 0 (every link's
/// default) and two processes never share one.
fn batch_group(counter: u32) -> u32 {
    (std::process::id() & 0x003f_ffff) | ((counter % 0x3ff + 1) << 22)
}

async fn delete_batches(h: Handle, mut rx: tokio::sync::mpsc::UnboundedReceiver<DeleteRequest>) {
    let mut counter = 0u32;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        if batch.len() == 1 {
            let (name, reply) = batch.remove(0);
            let _ = reply.send(delete(&h, &name).await);
            continue;
        }
        counter = counter.wrapping_add(1);
        let group = batch_group(counter);
        let mut tagged = Vec::new();
        for (name, reply) in batch {
            match by_name(&h, &name).await {
                Ok(Some(link)) => {
                    let msg = LinkUnspec::new_with_index(link.header.index).link_group(group).build();
                    match h.link().set(msg).execute().await {
                        Ok(()) => tagged.push((name, reply)),
                        Err(e) if already_gone(&e) => {
                            let _ = reply.send(Ok(false));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(backend(format!("tagging {name} for deletion"), e)));
                        }
                    }
                }
                Ok(None) => {
                    let _ = reply.send(Ok(false));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        if tagged.is_empty() {
            continue;
        }
        let msg = LinkMessageBuilder::<LinkUnspec>::default().link_group(group).build();
        match h.link().del_with_message(msg).execute().await {
            Ok(()) => {
                for (_, reply) in tagged {
                    let _ = reply.send(Ok(true));
                }
            }
            // Fall back to one by one, each reporting its own outcome.
            Err(_) => {
                for (name, reply) in tagged {
                    let _ = reply.send(delete(&h, &name).await);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn batch_groups_are_never_zero_and_never_another_pids() {
        let me = std::process::id() & 0x003f_ffff;
        for counter in [0, 1, 1022, 1023, 1024, u32::MAX] {
            let g = super::batch_group(counter);
            assert_ne!(g, 0);
            assert_eq!(g & 0x003f_ffff, me, "the low bits are exactly this pid");
        }
    }
}
