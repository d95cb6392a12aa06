//! nf_tables over netlink: messages built by hand (the attribute layout of
//! `linux/netfilter/nf_tables.h`) and sent as one atomic batch per change. No `nft`
//! process (milliseconds each) and no GPL library: the kernel applies a batch whole or
//! not at all, so a crash or an error never leaves half a change.

use std::io;
use std::os::fd::AsFd;

use rtnetlink::sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

// Constants of linux/netlink.h, linux/netfilter/nfnetlink.h and nf_tables.h.
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_ID: u16 = 10;
const NFT_SET_MAP: u32 = 8;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;

/// `nft`'s user data tag for a rule comment, so `nft list` shows ours as comments.
const UDATA_RULE_COMMENT: u8 = 0;

/// Netfilter address families (`NFPROTO_*`).
pub(crate) const FAMILY_IPV4: u8 = 2;

/// Netfilter hooks (`NF_INET_*`).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Hook {
    Prerouting = 0,
    #[cfg(feature = "overlay")]
    Input = 1,
    Forward = 2,
    Output = 3,
    Postrouting = 4,
}

/// nft's data types for set keys and data (informational to the kernel, read by `nft`).
pub(crate) const TYPE_IPV4_ADDR: u32 = 7;
pub(crate) const TYPE_INET_SERVICE: u32 = 13;

/// Registers (`NFT_REG_*`): the verdict register and three 16-byte data registers.
pub(crate) const REG_VERDICT: u32 = 0;
pub(crate) const REG_1: u32 = 1;
pub(crate) const REG_2: u32 = 2;
pub(crate) const REG_3: u32 = 3;

/// Verdicts.
pub(crate) const ACCEPT: u32 = 1;
pub(crate) const DROP: u32 = 0;

/// Netlink attributes, appended in order.
#[derive(Default)]
pub(crate) struct Attrs(Vec<u8>);

impl Attrs {
    fn raw(&mut self, ty: u16, value: &[u8]) -> &mut Self {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.0.resize(self.0.len() + (4 - len % 4) % 4, 0);
        self
    }

    fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.raw(ty, &v)
    }

    fn be32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.raw(ty, &v.to_be_bytes())
    }

    fn nested(&mut self, ty: u16, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        let mut inner = Attrs::default();
        f(&mut inner);
        self.raw(ty | NLA_F_NESTED, &inner.0)
    }

    fn data(&mut self, ty: u16, value: &[u8]) -> &mut Self {
        self.nested(ty, |a| {
            a.raw(NFTA_DATA_VALUE, value);
        })
    }
}

/// One expression of a rule: its name and its attributes.
pub(crate) struct Expr {
    name: &'static str,
    attrs: Attrs,
}

/// Expression builders, each the kernel form of a piece of nft syntax.
pub(crate) mod expr {
    use super::*;

    fn make(name: &'static str, f: impl FnOnce(&mut Attrs)) -> Expr {
        let mut attrs = Attrs::default();
        f(&mut attrs);
        Expr { name, attrs }
    }

    /// `meta <key>` into `dreg` (6 iifname, 7 oifname, 16 l4proto).
    pub(crate) fn meta(key: u32, dreg: u32) -> Expr {
        make("meta", |a| {
            a.be32(1, dreg).be32(2, key);
        })
    }

    pub(crate) const META_IIFNAME: u32 = 6;
    pub(crate) const META_OIFNAME: u32 = 7;
    pub(crate) const META_L4PROTO: u32 = 16;

    /// `cmp` of `sreg` with `value` (eq or neq). A shorter value compares a prefix,
    /// which is how nft matches `"kpb*"` interface names.
    pub(crate) fn cmp(sreg: u32, eq: bool, value: &[u8]) -> Expr {
        make("cmp", |a| {
            a.be32(1, sreg).be32(2, if eq { 0 } else { 1 }).data(3, value);
        })
    }

    /// Load `len` bytes at `offset` of the network (1) or transport (2) header.
    pub(crate) fn payload(base: u32, offset: u32, len: u32, dreg: u32) -> Expr {
        make("payload", |a| {
            a.be32(1, dreg).be32(2, base).be32(3, offset).be32(4, len);
        })
    }

    pub(crate) const NETWORK_HEADER: u32 = 1;
    pub(crate) const TRANSPORT_HEADER: u32 = 2;

    /// `reg = (reg & mask) ^ 0`.
    pub(crate) fn mask(reg: u32, mask: &[u8]) -> Expr {
        let zero = vec![0u8; mask.len()];
        make("bitwise", |a| {
            a.be32(1, reg).be32(2, reg).be32(3, mask.len() as u32).data(4, mask).data(5, &zero);
        })
    }

    /// Look `sreg` up in map `set`, its value into `dreg`; no match ends the rule.
    pub(crate) fn map_lookup(set: &str, sreg: u32, dreg: u32) -> Expr {
        make("lookup", |a| {
            a.str(1, set).be32(2, sreg).be32(3, dreg);
        })
    }

    /// Whether `sreg` is (or, with `inverse`, is not) in set `set`; a miss ends the rule.
    #[cfg(feature = "overlay")]
    pub(crate) fn set_lookup(set: &str, sreg: u32, inverse: bool) -> Expr {
        make("lookup", |a| {
            a.str(1, set).be32(2, sreg).be32(5, u32::from(inverse));
        })
    }

    /// `dnat to <addr reg>:<port reg>` (IPv4).
    pub(crate) fn dnat(addr_reg: u32, port_reg: u32) -> Expr {
        make("nat", |a| {
            a.be32(1, 1).be32(2, u32::from(FAMILY_IPV4)).be32(3, addr_reg).be32(5, port_reg);
        })
    }

    /// `counter` (packets and bytes, shown by `nft list`).
    #[cfg(feature = "overlay")]
    pub(crate) fn counter() -> Expr {
        make("counter", |_| {})
    }

    /// `masquerade`.
    pub(crate) fn masquerade() -> Expr {
        make("masq", |_| {})
    }

    /// `fib daddr type` into `dreg` (a host-order u32: 2 is local).
    pub(crate) fn fib_daddr_type(dreg: u32) -> Expr {
        make("fib", |a| {
            a.be32(1, dreg).be32(2, 3).be32(3, 2);
        })
    }

    pub(crate) const RTN_LOCAL: u32 = 2;

    /// `ct status` into `dreg` (a host-order u32 bitmask; 0x20 is destination NAT).
    pub(crate) fn ct_status(dreg: u32) -> Expr {
        make("ct", |a| {
            a.be32(1, dreg).be32(2, 2);
        })
    }

    pub(crate) const CT_STATUS_DNAT: u32 = 0x20;

    /// A verdict (`accept`, `drop`).
    pub(crate) fn verdict(code: u32) -> Expr {
        make("immediate", |a| {
            a.be32(1, REG_VERDICT).nested(2, |d| {
                d.nested(NFTA_DATA_VERDICT, |v| {
                    v.be32(NFTA_VERDICT_CODE, code);
                });
            });
        })
    }
}

/// Matches a NUL-padded interface name exactly, or a prefix when `name` ends in `*`.
pub(crate) fn ifname_bytes(name: &str) -> Vec<u8> {
    match name.strip_suffix('*') {
        Some(prefix) => prefix.as_bytes().to_vec(),
        None => {
            let mut v = name.as_bytes().to_vec();
            v.resize(16, 0);
            v
        }
    }
}

/// A map element: key bytes and data bytes (data unused when deleting).
pub(crate) type Element = (Vec<u8>, Vec<u8>);

/// A chain's hook, priority and type (`filter`, `nat`).
pub(crate) struct BaseChain {
    pub(crate) hook: Hook,
    pub(crate) priority: i32,
    pub(crate) kind: &'static str,
}

struct Msg {
    ty: u16,
    flags: u16,
    family: u8,
    attrs: Attrs,
}

/// Changes applied together or not at all.
#[derive(Default)]
pub(crate) struct Batch {
    msgs: Vec<Msg>,
    next_set_id: u32,
}

impl Batch {
    fn push(&mut self, ty: u16, flags: u16, family: u8, f: impl FnOnce(&mut Attrs)) {
        let mut attrs = Attrs::default();
        f(&mut attrs);
        self.msgs.push(Msg { ty, flags, family, attrs });
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    pub(crate) fn add_table(&mut self, family: u8, table: &str) {
        self.push(NFT_MSG_NEWTABLE, NLM_F_CREATE, family, |a| {
            a.str(NFTA_TABLE_NAME, table);
        });
    }

    pub(crate) fn del_table(&mut self, family: u8, table: &str) {
        self.push(NFT_MSG_DELTABLE, 0, family, |a| {
            a.str(NFTA_TABLE_NAME, table);
        });
    }

    pub(crate) fn add_chain(&mut self, family: u8, table: &str, chain: &str, base: Option<BaseChain>) {
        self.push(NFT_MSG_NEWCHAIN, NLM_F_CREATE, family, |a| {
            a.str(NFTA_CHAIN_TABLE, table).str(NFTA_CHAIN_NAME, chain);
            if let Some(base) = base {
                a.nested(NFTA_CHAIN_HOOK, |h| {
                    h.be32(NFTA_HOOK_HOOKNUM, base.hook as u32).be32(NFTA_HOOK_PRIORITY, base.priority as u32);
                })
                .be32(NFTA_CHAIN_POLICY, ACCEPT)
                .str(NFTA_CHAIN_TYPE, base.kind);
            }
        });
    }

    /// A map from `key_len`-byte keys to `data_len`-byte values (`(type, len)` pairs).
    pub(crate) fn add_map(&mut self, family: u8, table: &str, name: &str, key: (u32, u32), data: (u32, u32)) {
        self.add_set_or_map(family, table, name, key, Some(data));
    }

    /// A set of `key_len`-byte keys.
    #[cfg(feature = "overlay")]
    pub(crate) fn add_set(&mut self, family: u8, table: &str, name: &str, key: (u32, u32)) {
        self.add_set_or_map(family, table, name, key, None);
    }

    fn add_set_or_map(&mut self, family: u8, table: &str, name: &str, key: (u32, u32), data: Option<(u32, u32)>) {
        self.next_set_id += 1;
        let id = self.next_set_id;
        self.push(NFT_MSG_NEWSET, NLM_F_CREATE, family, |a| {
            a.str(NFTA_SET_TABLE, table).str(NFTA_SET_NAME, name);
            if let Some(data) = data {
                a.be32(NFTA_SET_FLAGS, NFT_SET_MAP);
                a.be32(NFTA_SET_KEY_TYPE, key.0).be32(NFTA_SET_KEY_LEN, key.1);
                a.be32(NFTA_SET_DATA_TYPE, data.0).be32(NFTA_SET_DATA_LEN, data.1);
            } else {
                a.be32(NFTA_SET_KEY_TYPE, key.0).be32(NFTA_SET_KEY_LEN, key.1);
            }
            a.be32(NFTA_SET_ID, id);
        });
    }

    /// Appends (or, with `insert`, prepends) a rule; `comment` becomes its user data.
    pub(crate) fn add_rule(&mut self, family: u8, table: &str, chain: &str, exprs: Vec<Expr>, comment: Option<&str>, insert: bool) {
        let flags = NLM_F_CREATE | if insert { 0 } else { NLM_F_APPEND };
        self.push(NFT_MSG_NEWRULE, flags, family, |a| {
            a.str(NFTA_RULE_TABLE, table).str(NFTA_RULE_CHAIN, chain).nested(NFTA_RULE_EXPRESSIONS, |list| {
                for e in exprs {
                    list.nested(NFTA_LIST_ELEM, |el| {
                        el.str(NFTA_EXPR_NAME, e.name).raw(NFTA_EXPR_DATA | NLA_F_NESTED, &e.attrs.0);
                    });
                }
            });
            if let Some(c) = comment {
                let mut udata = vec![UDATA_RULE_COMMENT, (c.len() + 1) as u8];
                udata.extend_from_slice(c.as_bytes());
                udata.push(0);
                a.raw(NFTA_RULE_USERDATA, &udata);
            }
        });
    }

    pub(crate) fn del_rule(&mut self, family: u8, table: &str, chain: &str, handle: u64) {
        self.push(NFT_MSG_DELRULE, 0, family, |a| {
            a.str(NFTA_RULE_TABLE, table).str(NFTA_RULE_CHAIN, chain).raw(NFTA_RULE_HANDLE, &handle.to_be_bytes());
        });
    }

    fn elems(&mut self, ty: u16, flags: u16, family: u8, table: &str, set: &str, elems: &[Element]) {
        self.push(ty, flags, family, |a| {
            a.str(NFTA_SET_ELEM_LIST_TABLE, table).str(NFTA_SET_ELEM_LIST_SET, set).nested(NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
                for (key, data) in elems {
                    list.nested(NFTA_LIST_ELEM, |el| {
                        el.data(NFTA_SET_ELEM_KEY, key);
                        if ty == NFT_MSG_NEWSETELEM && !data.is_empty() {
                            el.data(NFTA_SET_ELEM_DATA, data);
                        }
                    });
                }
            });
        });
    }

    /// Adds `key → data` elements to a map.
    pub(crate) fn add_elems(&mut self, family: u8, table: &str, set: &str, elems: &[Element]) {
        if !elems.is_empty() {
            self.elems(NFT_MSG_NEWSETELEM, NLM_F_CREATE, family, table, set, elems);
        }
    }

    /// Removes elements (by key) from a map.
    pub(crate) fn del_elems(&mut self, family: u8, table: &str, set: &str, elems: &[Element]) {
        if !elems.is_empty() {
            self.elems(NFT_MSG_DELSETELEM, 0, family, table, set, elems);
        }
    }
}

/// A rule as listed: its handle and comment.
#[derive(Debug)]
pub(crate) struct ListedRule {
    pub(crate) handle: u64,
    pub(crate) comment: Option<String>,
}

/// A netlink socket to nf_tables in the namespace it was opened in.
pub(crate) struct Nft {
    sock: Socket,
    seq: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for Nft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nft").finish_non_exhaustive()
    }
}

/// What the kernel refused, with the index of the message in the batch.
#[derive(Debug, thiserror::Error)]
#[error("nf_tables refused message {index} of the batch: {source}")]
pub(crate) struct NftError {
    pub(crate) index: usize,
    #[source]
    pub(crate) source: io::Error,
}

impl Nft {
    /// A socket in the calling thread's network namespace.
    pub(crate) fn open() -> io::Result<Nft> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // A kernel that never answers must not hang an attach.
        nix::sys::socket::setsockopt(&sock.as_fd(), nix::sys::socket::sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(5, 0))
            .map_err(io::Error::from)?;
        Ok(Nft { sock, seq: std::sync::atomic::AtomicU32::new(1) })
    }

    fn header(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16, payload: &[u8]) {
        let len = 16 + 4 + payload.len();
        buf.extend_from_slice(&(len as u32).to_ne_bytes());
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&[family, 0]);
        buf.extend_from_slice(&res_id.to_be_bytes());
        buf.extend_from_slice(payload);
    }

    /// Applies `batch` atomically: every message or none.
    pub(crate) fn commit(&self, batch: Batch) -> Result<(), NftError> {
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.msgs.len() as u32;
        let base = self.seq.fetch_add(n + 2, std::sync::atomic::Ordering::Relaxed);
        let mut buf = Vec::with_capacity(256 * batch.msgs.len());
        Nft::header(&mut buf, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, base, 0, NFNL_SUBSYS_NFTABLES, &[]);
        for (i, m) in batch.msgs.iter().enumerate() {
            let ty = (NFNL_SUBSYS_NFTABLES << 8) | m.ty;
            Nft::header(&mut buf, ty, NLM_F_REQUEST | NLM_F_ACK | m.flags, base + 1 + i as u32, m.family, 0, &m.attrs.0);
        }
        Nft::header(&mut buf, NFNL_MSG_BATCH_END, NLM_F_REQUEST, base + n + 1, 0, NFNL_SUBSYS_NFTABLES, &[]);
        self.sock.send(&buf, 0).map_err(|source| NftError { index: 0, source })?;
        // One answer per message (we asked each for an ack); the first error wins.
        let mut answered = 0;
        let mut first_error: Option<NftError> = None;
        while answered < n {
            let msgs = self.recv().map_err(|source| NftError { index: answered as usize, source })?;
            for (ty, seq, payload) in msgs {
                if ty != NLMSG_ERROR || seq <= base || seq > base + n {
                    continue;
                }
                answered += 1;
                let code = error_code(&payload);
                if code != 0 && first_error.is_none() {
                    first_error = Some(NftError { index: (seq - base - 1) as usize, source: io::Error::from_raw_os_error(-code) });
                }
            }
            // An aborted batch may not answer for the messages after the failure.
            if first_error.is_some() && answered < n && !self.more_pending() {
                break;
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn more_pending(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(nix::sys::socket::recv(self.sock_fd(), &mut probe, nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT), Ok(n) if n > 0)
    }

    fn sock_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.sock.as_raw_fd()
    }

    /// One datagram, split into (type, seq, payload after the netlink header).
    fn recv(&self) -> io::Result<Vec<(u16, u32, Vec<u8>)>> {
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
        self.sock.recv(&mut buf, 0)?;
        let mut out = Vec::new();
        let mut rest = &buf[..];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if len < 16 || len > rest.len() {
                break;
            }
            let ty = u16::from_ne_bytes([rest[4], rest[5]]);
            let seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
            out.push((ty, seq, rest[16..len].to_vec()));
            rest = &rest[((len + 3) & !3).min(rest.len())..];
        }
        Ok(out)
    }

    /// Whether a chain exists (a rule dump of a missing chain is simply empty).
    fn chain_exists(&self, family: u8, table: &str, chain: &str) -> io::Result<bool> {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut attrs = Attrs::default();
        attrs.str(NFTA_CHAIN_TABLE, table).str(NFTA_CHAIN_NAME, chain);
        let mut buf = Vec::new();
        Nft::header(&mut buf, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN, NLM_F_REQUEST | NLM_F_ACK, seq, family, 0, &attrs.0);
        self.sock.send(&buf, 0)?;
        loop {
            for (ty, got_seq, payload) in self.recv()? {
                if got_seq != seq || ty != NLMSG_ERROR {
                    continue;
                }
                let code = error_code(&payload);
                return match code {
                    0 => Ok(true),
                    c if c == -libc_enoent() => Ok(false),
                    c => Err(io::Error::from_raw_os_error(-c)),
                };
            }
        }
    }

    /// The rules of one chain, with their handles and comments. `Ok(None)` if the table
    /// or chain does not exist.
    pub(crate) fn list_rules(&self, family: u8, table: &str, chain: &str) -> io::Result<Option<Vec<ListedRule>>> {
        if !self.chain_exists(family, table, chain)? {
            return Ok(None);
        }
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut attrs = Attrs::default();
        attrs.str(NFTA_RULE_TABLE, table).str(NFTA_RULE_CHAIN, chain);
        let mut buf = Vec::new();
        Nft::header(&mut buf, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE, NLM_F_REQUEST | NLM_F_DUMP, seq, family, 0, &attrs.0);
        self.sock.send(&buf, 0)?;
        let mut rules = Vec::new();
        loop {
            for (ty, got_seq, payload) in self.recv()? {
                if got_seq != seq {
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(Some(rules)),
                    NLMSG_ERROR => {
                        let code = error_code(&payload);
                        if code == -libc_enoent() {
                            return Ok(None);
                        }
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                    }
                    _ => rules.push(parse_rule(payload.get(4..).unwrap_or_default())),
                }
            }
        }
    }
}

/// The (negative) errno of an `NLMSG_ERROR` payload; 0 is an acknowledgement.
fn error_code(payload: &[u8]) -> i32 {
    payload.get(..4).map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

fn libc_enoent() -> i32 {
    nix::errno::Errno::ENOENT as i32
}

/// Handle and comment of a listed rule (attributes after the nfgenmsg).
fn parse_rule(mut attrs: &[u8]) -> ListedRule {
    let mut rule = ListedRule { handle: 0, comment: None };
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]) & !NLA_F_NESTED;
        if len < 4 || len > attrs.len() {
            break;
        }
        let value = &attrs[4..len];
        match ty {
            NFTA_RULE_HANDLE if value.len() == 8 => {
                rule.handle = u64::from_be_bytes(value.try_into().unwrap_or_default());
            }
            NFTA_RULE_USERDATA => {
                // Type-length-value records; ours is the comment.
                let mut u = value;
                while u.len() >= 2 {
                    let (t, l) = (u[0], u[1] as usize);
                    let Some(v) = u.get(2..2 + l) else { break };
                    if t == UDATA_RULE_COMMENT {
                        rule.comment = Some(String::from_utf8_lossy(v).trim_end_matches('\0').to_owned());
                    }
                    u = &u[2 + l..];
                }
            }
            _ => {}
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    rule
}
