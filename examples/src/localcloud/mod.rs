//! `localcloud`: a whole multi-host cloud on one machine, from keelson's own programs.
//!
//! `localcloud up --name demo` makes, on this machine:
//! - hosts: network namespaces `lc-demo-h1`… on one L2 segment (a bridge in
//!   `lc-demo-sw`, underlay `10.78.0.0/24` by default, hosts from `.11`, this machine at
//!   `.1` as their gateway), each running a `node-agent` whose tasks go on the VXLAN
//!   overlay across the hosts, on this machine's Docker Engine;
//! - a 3-member etcd on the first three hosts: the cluster state;
//! - on the first host, the load balancer (`edge`, port 80) and the DNS server
//!   (`dns-catalog`, port 53) serving the zone `demo.test`: the cloud's own name, `lb`
//!   and every role's name resolve to the load balancer, and the catalog's names
//!   (`cloud-node.service.demo.test`) to the tasks;
//! - the roles, deployed from a manifest ([`roles`]): a master and storage nodes spread
//!   over the hosts (a minipaas app: releases, scale and rollback work on it);
//! - `lc-demo-lan`, a machine on the LAN: its own unbound resolves the cloud's zone
//!   through the cloud's DNS server (`/etc/netns/lc-demo-lan/resolv.conf`; this machine's
//!   `/etc/resolv.conf` is untouched), so `ip netns exec lc-demo-lan curl http://master.demo.test/` works
//!   as it would from a colleague's laptop.
//!
//! `up` returns once every role answers by name from the LAN machine. `reset` wipes all
//! data (processes, containers, hosts, etcd) and starts the same cloud again; `down`
//! removes everything. One supervising process ([`cloud::run`]) owns it all; the CLI
//! finds it through [`state::CloudState`].
//!
//! ```
//! use keelson_examples::localcloud::{layout::Layout, roles};
//! let layout = Layout::new("demo", 3, "10.78.0.0/24".parse().unwrap(), None).unwrap();
//! let roles = roles::prepare(&layout, "roles.toml", roles::DEFAULT_ROLES).unwrap();
//! assert_eq!(roles.names, ["master.demo.test", "node.demo.test"]);
//! ```

pub mod cloud;
pub mod layout;
pub mod machines;
pub mod roles;
pub mod state;
