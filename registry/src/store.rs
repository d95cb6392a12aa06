//! The `BlobStore` trait and its two backends.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// A readable blob.
pub type BlobReader = Box<dyn AsyncRead + Send + Unpin>;

/// What a blob store supports.
///
/// A backend outside this crate starts from `default()` (nothing supported) and sets
/// the fields it supports: `let mut caps = StoreCapabilities::default(); caps.durable = true;`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreCapabilities {
    /// Blobs survive a restart.
    pub durable: bool,
}

/// Content-addressed blob storage. A blob is stored only if its bytes hash to the
/// digest it is stored under, so a reader can trust any digest it finds.
#[async_trait]
pub trait BlobStore: Send + Sync + std::fmt::Debug {
    /// The backend's name.
    fn name(&self) -> &'static str;

    /// What it supports.
    fn capabilities(&self) -> StoreCapabilities;

    /// The blob's size, or `None` if absent.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>>;

    /// Opens a blob for reading.
    async fn open(&self, digest: &Digest) -> Result<BlobReader>;

    /// Stores the bytes read from `content` under `expected`, verifying the digest before
    /// anything becomes visible. On [`Error::DigestMismatch`] nothing is stored. Storing
    /// a blob that already exists is a no-op. Returns the blob's size.
    async fn put(&self, expected: &Digest, content: BlobReader) -> Result<u64>;

    /// Deletes a blob. [`Error::NotFound`] if absent.
    async fn delete(&self, digest: &Digest) -> Result<()>;

    /// Every stored digest, sorted.
    async fn list(&self) -> Result<Vec<Digest>>;
}

/// Blobs in memory.
#[derive(Debug, Default, Clone)]
pub struct MemoryBlobStore {
    blobs: Arc<Mutex<HashMap<Digest, Arc<[u8]>>>>,
}

impl MemoryBlobStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryBlobStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<[u8]>>> {
        self.blobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

#[async_trait]
impl BlobStore for MemoryBlobStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> StoreCapabilities {
        StoreCapabilities { durable: false }
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        Ok(self.lock().get(digest).map(|b| b.len() as u64))
    }

    async fn open(&self, digest: &Digest) -> Result<BlobReader> {
        let blob = self.lock().get(digest).cloned().ok_or(Error::blob_not_found(digest))?;
        Ok(Box::new(std::io::Cursor::new(blob)))
    }

    async fn put(&self, expected: &Digest, mut content: BlobReader) -> Result<u64> {
        let mut bytes = Vec::new();
        content.read_to_end(&mut bytes).await.map_err(io("reading blob content"))?;
        let actual = Digest::of(&bytes);
        if actual != *expected {
            return Err(Error::DigestMismatch { expected: *expected, actual });
        }
        let size = bytes.len() as u64;
        self.lock().entry(actual).or_insert_with(|| bytes.into());
        Ok(size)
    }

    async fn delete(&self, digest: &Digest) -> Result<()> {
        self.lock().remove(digest).map(|_| ()).ok_or(Error::blob_not_found(digest))
    }

    async fn list(&self) -> Result<Vec<Digest>> {
        let mut all: Vec<Digest> = self.lock().keys().copied().collect();
        all.sort();
        Ok(all)
    }
}

/// Blobs as files: `<root>/blobs/sha256/<first two hex>/<hex>`. A put streams into
/// `<root>/uploads/`, hashing as it goes, fsyncs, verifies the digest, then renames
/// into place and fsyncs the directory: a crash leaves either the whole blob or none.
#[derive(Debug, Clone)]
pub struct FsBlobStore {
    root: PathBuf,
}

impl FsBlobStore {
    /// Uses (and creates) `root`. Leftover uploads from a crash are removed.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let uploads = root.join("uploads");
        let _ = std::fs::remove_dir_all(&uploads);
        std::fs::create_dir_all(&uploads).map_err(io(format!("creating {}", uploads.display())))?;
        std::fs::create_dir_all(root.join("blobs/sha256")).map_err(io(format!("creating {}", root.display())))?;
        Ok(FsBlobStore { root })
    }

    fn path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root.join("blobs/sha256").join(&hex[..2]).join(hex)
    }

    fn upload_path(&self) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        self.root.join("uploads").join(format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
    }
}

async fn sync_dir(dir: &Path) -> Result<()> {
    let d = tokio::fs::File::open(dir).await.map_err(io(format!("opening {}", dir.display())))?;
    d.sync_all().await.map_err(io(format!("syncing {}", dir.display())))
}

#[async_trait]
impl BlobStore for FsBlobStore {
    fn name(&self) -> &'static str {
        "filesystem"
    }

    fn capabilities(&self) -> StoreCapabilities {
        StoreCapabilities { durable: true }
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        match tokio::fs::metadata(self.path(digest)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading blob metadata")(e)),
        }
    }

    async fn open(&self, digest: &Digest) -> Result<BlobReader> {
        match tokio::fs::File::open(self.path(digest)).await {
            Ok(f) => Ok(Box::new(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::blob_not_found(digest)),
            Err(e) => Err(io("opening blob")(e)),
        }
    }

    async fn put(&self, expected: &Digest, mut content: BlobReader) -> Result<u64> {
        let tmp = self.upload_path();
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await.map_err(io("creating upload file"))?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = content.read(&mut buf).await.map_err(io("reading blob content"))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).await.map_err(io("writing upload file"))?;
                size += n as u64;
            }
            let actual = Digest::from_hasher(hasher);
            if actual != *expected {
                return Err(Error::DigestMismatch { expected: *expected, actual });
            }
            file.sync_all().await.map_err(io("syncing upload file"))?;
            drop(file);
            let dest = self.path(expected);
            let parent = dest.parent().unwrap_or(&self.root).to_owned();
            tokio::fs::create_dir_all(&parent).await.map_err(io("creating blob directory"))?;
            // Same digest, same bytes: if another put got there first, ours is redundant.
            tokio::fs::rename(&tmp, &dest).await.map_err(io("committing blob"))?;
            sync_dir(&parent).await?;
            Ok(size)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    async fn delete(&self, digest: &Digest) -> Result<()> {
        match tokio::fs::remove_file(self.path(digest)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::blob_not_found(digest)),
            Err(e) => Err(io("deleting blob")(e)),
        }
    }

    async fn list(&self) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        let mut shards = tokio::fs::read_dir(self.root.join("blobs/sha256")).await.map_err(io("listing blobs"))?;
        while let Some(shard) = shards.next_entry().await.map_err(io("listing blobs"))? {
            let mut files = tokio::fs::read_dir(shard.path()).await.map_err(io("listing blobs"))?;
            while let Some(f) = files.next_entry().await.map_err(io("listing blobs"))? {
                // Anything that is not a well-formed digest name is not ours to report.
                if let Ok(d) = format!("sha256:{}", f.file_name().to_string_lossy()).parse::<Digest>() {
                    out.push(d);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}
