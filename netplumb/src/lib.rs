//! Container networking for keelson: the [`NetworkDriver`] trait (create and delete
//! networks, attach and detach endpoints, inspect, and `gc` of what a crash left behind)
//! and [`HostNetwork`], the embedded default where endpoints share the host's network.
//!
//! ```
//! use keelson_netplumb::{EndpointSpec, HostNetwork, NetworkDriver, NetworkSpec};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keelson_netplumb::Error> {
//! let net = HostNetwork::new();
//! net.create_network(NetworkSpec::new("apps")).await?;
//! let ep = net.attach(EndpointSpec::new("apps", "web-1")).await?;
//! assert!(ep.addresses.iter().any(|a| a.is_loopback()));
//! net.detach("apps", "web-1").await?;
//! # Ok(())
//! # }
//! ```

mod driver;
mod error;
mod host;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use driver::{
    validate_name, Attachment, EndpointSpec, GcReport, NetworkCapabilities, NetworkDriver, NetworkInfo, NetworkSpec, PortMapping, Protocol,
};
pub use error::{Error, Result};
pub use host::{host_addresses, HostNetwork};
