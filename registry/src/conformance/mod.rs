//! Conformance suites (feature `conformance`): [`store`] scenarios every `BlobStore`
//! passes, re-exported here; with the `client` feature, [`spec`], a harness written
//! from the OCI distribution-spec that checks any registry over HTTP.

mod store;

#[cfg(feature = "client")]
pub mod spec;

pub use store::*;
