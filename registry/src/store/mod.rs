//! The `BlobStore` trait: content-addressed blobs and the upload sessions that fill them.

mod fs;
mod memory;

use std::time::SystemTime;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::digest::Digest;
use crate::error::{Error, Result};

#[cfg(feature = "client")]
pub(crate) use fs::hash_file_sync;
pub use fs::FsBlobStore;
pub use memory::MemoryBlobStore;

/// A readable blob.
pub type BlobReader = Box<dyn AsyncRead + Send + Unpin>;

/// What a blob store supports.
///
/// A backend outside this crate starts from `default()` (nothing supported) and sets
/// the fields it supports: `let mut caps = StoreCapabilities::default(); caps.durable = true;`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreCapabilities {
    /// Blobs and upload sessions survive a restart.
    pub durable: bool,
}

/// A stored blob's size and when it was stored (garbage collection spares young blobs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BlobStat {
    /// Bytes.
    pub size: u64,
    /// When the blob was committed.
    pub created: SystemTime,
}

impl BlobStat {
    /// A stat, for backends outside this crate.
    pub fn new(size: u64, created: SystemTime) -> Self {
        BlobStat { size, created }
    }
}

/// An upload session's progress: how many bytes it holds (the offset the next append
/// must start at) and when it last received any (stale sessions are collected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct UploadStatus {
    /// Bytes received so far.
    pub size: u64,
    /// When the session last changed.
    pub last_activity: SystemTime,
}

impl UploadStatus {
    /// A status, for backends outside this crate.
    pub fn new(size: u64, last_activity: SystemTime) -> Self {
        UploadStatus { size, last_activity }
    }
}

/// An upload session's identifier: 1 to 64 characters of `[A-Za-z0-9_-]`, so that it is
/// safe in a URL and as a file name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UploadId(String);

impl UploadId {
    /// A fresh random identifier.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        fill_random(&mut bytes);
        UploadId(hex::encode(bytes))
    }

    /// The identifier as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for UploadId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let ok = !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(Error::InvalidInput {
                field: "upload id",
                value: s.chars().take(80).collect(),
                reason: "must be 1 to 64 characters of A-Z, a-z, 0-9, '-' or '_'".into(),
            });
        }
        Ok(UploadId(s.to_owned()))
    }
}

impl std::fmt::Display for UploadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Random bytes from the kernel (identifiers must not be guessable: an upload id is
/// the capability to write into a session).
pub(crate) fn fill_random(buf: &mut [u8]) {
    use std::io::Read;
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf)).is_ok();
    if !filled {
        // No /dev/urandom (a sandbox): fall back to hashing time and a counter.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seed = format!("{:?}{}{}", SystemTime::now(), std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let d = Digest::of(seed.as_bytes());
        for (b, s) in buf.iter_mut().zip(d.bytes().iter().cycle()) {
            *b = *s;
        }
    }
}

/// Content-addressed blob storage. A blob is stored only if its bytes hash to the
/// digest it is stored under, so a reader can trust any digest it finds.
///
/// Blobs arrive through upload sessions: [`begin_upload`](BlobStore::begin_upload),
/// any number of [`append`](BlobStore::append)s, each at the session's current size,
/// then [`commit`](BlobStore::commit) with the digest the bytes must hash to, or
/// [`cancel`](BlobStore::cancel). A durable store keeps sessions across restarts, so
/// a client resumes from [`upload_status`](BlobStore::upload_status).
#[async_trait]
pub trait BlobStore: Send + Sync + std::fmt::Debug {
    /// The backend's name.
    fn name(&self) -> &'static str;

    /// What it supports.
    fn capabilities(&self) -> StoreCapabilities;

    /// The blob's size and creation time, or `None` if absent.
    async fn stat(&self, digest: &Digest) -> Result<Option<BlobStat>>;

    /// Opens a blob for reading from `offset`, at most `len` bytes (`None`: to the end).
    /// An offset past the end is [`Error::RangeNotSatisfiable`].
    async fn open_range(&self, digest: &Digest, offset: u64, len: Option<u64>) -> Result<BlobReader>;

    /// Opens a whole blob for reading.
    async fn open(&self, digest: &Digest) -> Result<BlobReader> {
        self.open_range(digest, 0, None).await
    }

    /// Deletes a blob. [`Error::NotFound`] if absent.
    async fn delete(&self, digest: &Digest) -> Result<()>;

    /// Every stored digest, sorted.
    async fn list(&self) -> Result<Vec<Digest>>;

    /// Starts an empty upload session.
    async fn begin_upload(&self) -> Result<UploadId>;

    /// A session's size and last activity; [`Error::NotFound`] (kind "upload") if there
    /// is no such session.
    async fn upload_status(&self, id: &UploadId) -> Result<UploadStatus>;

    /// Appends what `content` yields to the session. `offset` must be the session's
    /// current size ([`Error::UploadOffset`] otherwise, with nothing written), so a
    /// retried or reordered chunk cannot corrupt the blob. Returns the new size. If
    /// `content` fails midway, the bytes read before the failure may stay appended: the
    /// client asks [`upload_status`](BlobStore::upload_status) where to resume.
    async fn append(&self, id: &UploadId, offset: u64, content: BlobReader) -> Result<u64>;

    /// Verifies that the session's bytes hash to `expected` and makes them the blob
    /// `expected`; the session ends either way. On [`Error::DigestMismatch`] nothing is
    /// stored. Committing a blob that already exists succeeds. Returns the size.
    async fn commit(&self, id: &UploadId, expected: &Digest) -> Result<u64>;

    /// Ends a session and drops its bytes. [`Error::NotFound`] if there is none.
    async fn cancel(&self, id: &UploadId) -> Result<()>;

    /// Every open session (garbage collection ends the stale ones).
    async fn list_uploads(&self) -> Result<Vec<(UploadId, UploadStatus)>>;

    /// Stores the bytes read from `content` under `expected` in one session: begin,
    /// append, commit. On [`Error::DigestMismatch`] nothing is stored. Returns the size.
    async fn put(&self, expected: &Digest, content: BlobReader) -> Result<u64> {
        let id = self.begin_upload().await?;
        let appended = self.append(&id, 0, content).await;
        if let Err(e) = appended {
            let _ = self.cancel(&id).await;
            return Err(e);
        }
        self.commit(&id, expected).await
    }

    /// Reads a whole blob into memory, refusing one larger than `limit` bytes (manifests).
    async fn read_to_vec(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let reader = self.open(digest).await?;
        reader.take(limit + 1).read_to_end(&mut out).await.map_err(io_error("reading blob"))?;
        if out.len() as u64 > limit {
            return Err(Error::TooLarge { what: "blob", size: out.len() as u64, limit });
        }
        Ok(out)
    }
}

pub(crate) fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}
