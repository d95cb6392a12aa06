//! Storage for keelson's OCI image registry: content-addressed blobs behind the
//! [`BlobStore`] trait, where nothing is stored unless its bytes hash to its [`Digest`].
//! [`FsBlobStore`] writes to a temp file, fsyncs, verifies, then renames into place;
//! [`MemoryBlobStore`] is for tests and caches.
//!
//! ```
//! use keelson_registry::{BlobStore, Digest, MemoryBlobStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keelson_registry::Error> {
//! let store = MemoryBlobStore::new();
//! let layer = b"layer bytes".to_vec();
//! let digest = Digest::of(&layer);
//! store.put(&digest, Box::new(std::io::Cursor::new(layer))).await?;
//! assert_eq!(store.stat(&digest).await?, Some(11));
//! // Bytes that do not match the digest are refused.
//! let wrong = store.put(&digest, Box::new(std::io::Cursor::new(b"tampered".to_vec()))).await;
//! assert!(matches!(wrong, Err(keelson_registry::Error::DigestMismatch { .. })));
//! # Ok(())
//! # }
//! ```

mod digest;
mod error;
mod store;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use digest::{Digest, InvalidDigest};
pub use error::{Error, Result};
pub use store::{BlobReader, BlobStore, FsBlobStore, MemoryBlobStore, StoreCapabilities};
