//! Dev-only helpers that start **real** components for keelson's tests: etcd from
//! Debian's `etcd-server`, dnsmasq with given records, a `FROM scratch` busybox image
//! for Docker, network namespaces joined by veth pairs, and small HTTP helpers.
//!
//! Every helper that needs a tool checks for it first and fails with the exact
//! `apt-get install` line when it is missing; nothing silently passes. Everything
//! started is stopped and removed on drop.
//!
//! ```no_run
//! # fn main() -> Result<(), keelson_testkit::TestkitError> {
//! let etcd = keelson_testkit::etcd::Etcd::start()?;
//! println!("etcd at {}", etcd.client_url());
//! # Ok(())
//! # }
//! ```

pub mod child;
pub mod chromium;
pub mod consul;
pub mod distribution;
pub mod dnsmasq;
pub mod docker;
pub mod dockerd;
pub mod etcd;
pub mod etcd_secure;
pub mod http;
pub mod machine;
pub mod memory;
pub mod netns;
pub mod oci;
pub mod pebble;
pub mod rsyslog;
pub mod syslog_counter;
pub mod tls;
mod tools;
pub mod unbound;

pub use tools::{copy_dir, free_port, free_ports, require, run, wait_exit, wait_for_tcp, TestkitError};
