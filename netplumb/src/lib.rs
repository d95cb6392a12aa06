//! Container networking for keelson: the [`NetworkDriver`] trait (create and delete
//! networks, attach and detach endpoints, inspect, and `gc` of what a crash left behind),
//! IPAM ([`LocalIpam`], and [`KvIpam`] on a cluster `KeyValue` with feature `cluster`),
//! and the drivers:
//! - [`HostNetwork`], the embedded default: endpoints share the host's network;
//! - `BridgeNetwork` and `MacvlanNetwork` (feature `netlink`): a Linux bridge or macvlan
//!   with IPAM, NAT and port mapping, programmed over netlink and nf_tables;
//! - `OverlayNetwork` (feature `overlay`): hosts joined by VXLAN, per-host subnets leased
//!   in a cluster `KeyValue`;
//! - the `keelson-cni` binary (feature `netlink`): the bridge driver as a CNI plugin.
//!
//! The kernel drivers are shown in the crate's README; they need root (or
//! `CAP_NET_ADMIN`) and a namespace per endpoint.
//!
//! ```
//! use keelson_netplumb::{EndpointSpec, HostNetwork, NetworkDriver, NetworkSpec};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keelson_netplumb::Error> {
//! let net = HostNetwork::new();
//! net.create_network(NetworkSpec::new("apps")).await?;
//! let ep = net.attach(EndpointSpec::new("apps", "web-1")).await?;
//! assert!(ep.addresses().iter().any(|a| a.is_loopback()));
//! net.detach(&ep.key()).await?;
//! net.detach(&ep.key()).await?; // already gone: still fine
//! # Ok(())
//! # }
//! ```
//!
//! ## Feature flags
//!
#![doc = document_features::document_features!()]
// docs.rs (all features, --cfg docsrs) marks each backend item with the feature it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

/// The README's example compiles (it needs root and a namespace to run).
#[cfg(all(doctest, feature = "netlink"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeExamples;

mod attachment;
#[cfg(feature = "netlink")]
pub mod cni;
mod driver;
mod error;
mod host;
pub mod ipam;
#[cfg(feature = "netlink")]
mod linux;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use attachment::{Attachment, AttachmentKey, Dns, Interface, IpConfig, PortMapping, Protocol, Route};
pub use driver::{validate_ifname, validate_name, EndpointSpec, GcReport, NetworkCapabilities, NetworkDriver, NetworkInfo, NetworkSpec};
pub use error::{Error, Result};
pub use host::{host_addresses, HostNetwork};
#[cfg(feature = "cluster")]
pub use ipam::KvIpam;
pub use ipam::{Ipam, Lease, LeaseRequest, LocalIpam, Pool};
#[cfg(feature = "netlink")]
pub use linux::{create_netns, delete_netns, run_in_netns, BridgeNetwork, KernelConfig, MacvlanNetwork, DEFAULT_STATE_DIR};
#[cfg(feature = "overlay")]
pub use linux::{OverlayConfig, OverlayNetwork, VXLAN_OVERHEAD};
