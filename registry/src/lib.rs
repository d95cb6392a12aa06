//! keelson's OCI image registry: content-addressed blob storage behind the
//! [`BlobStore`] trait (upload sessions, ranged reads), the metadata of repositories in
//! one transactional store ([`Meta`], redb), and [`Registry`], the distribution-spec
//! operations with an online garbage collector and `fsck`. The HTTP server
//! (feature `server`) and the client (feature `client`) are thin layers over these.
//!
//! Nothing is stored unless its bytes hash to its [`Digest`]:
//!
//! ```
//! use keelson_registry::{BlobStore, Digest, MemoryBlobStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keelson_registry::Error> {
//! let store = MemoryBlobStore::new();
//! let layer = b"layer bytes".to_vec();
//! let digest = Digest::of(&layer);
//! // An upload session: begin, append at the session's size, commit with the digest.
//! let id = store.begin_upload().await?;
//! store.append(&id, 0, Box::new(std::io::Cursor::new(layer[..5].to_vec()))).await?;
//! store.append(&id, 5, Box::new(std::io::Cursor::new(layer[5..].to_vec()))).await?;
//! assert_eq!(store.commit(&id, &digest).await?, 11);
//! assert_eq!(store.stat(&digest).await?.map(|s| s.size), Some(11));
//! // Bytes that do not match the digest are refused.
//! let wrong = store.put(&digest, Box::new(std::io::Cursor::new(b"tampered".to_vec()))).await;
//! assert!(matches!(wrong, Err(keelson_registry::Error::DigestMismatch { .. })));
//! # Ok(())
//! # }
//! ```
//!
//! ## Feature flags
//!
#![doc = document_features::document_features!()]
// docs.rs (all features, --cfg docsrs) marks each backend item with the feature it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod digest;
mod error;
pub mod manifest;
mod meta;
pub mod reference;
mod service;
mod store;

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "server")]
pub mod server;

pub use digest::{Digest, InvalidDigest};
pub use error::{Error, Result};
pub use manifest::{Descriptor, ManifestInfo};
pub use meta::{Meta, Page};
pub use reference::{Reference, RepoName, Tag};
pub use service::{FsckReport, GcReport, Registry, RegistryConfig};
pub use store::{BlobReader, BlobStat, BlobStore, FsBlobStore, MemoryBlobStore, StoreCapabilities, UploadId, UploadStatus};
