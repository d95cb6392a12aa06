//! Blobs and upload sessions as files.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{io_error as io, BlobReader, BlobStat, BlobStore, StoreCapabilities, UploadId, UploadStatus};
use crate::digest::Digest;
use crate::error::{Error, Result};

/// Bytes moved per write: large enough that the thread-pool hop of each write is paid
/// rarely, small enough that hundreds of concurrent uploads stay within tens of MiB.
const CHUNK: usize = 128 << 10;

/// Runs blocking file work on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(std::io::Error::other)?
}

pub(crate) fn hash_file_sync(path: &Path) -> std::io::Result<Digest> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(Digest::from_hasher(hasher));
        }
        hasher.update(&buf[..n]);
    }
}

/// What this process knows of a session beyond its file: the hash of the bytes it
/// appended, so a commit does not read the blob again. After a restart the hash is
/// unknown and the commit reads the file once.
#[derive(Default)]
struct Session {
    hasher: Option<(Sha256, u64)>,
}

/// Blobs as files: `<root>/blobs/sha256/<first two hex>/<hex>`, sessions as
/// `<root>/uploads/<id>`. Appends hash as they write; a commit fsyncs the session's
/// file, renames it into place and fsyncs the directory, so a crash leaves either the
/// whole blob or none. Sessions survive restarts (resume from their size); opening a
/// store removes nothing, since another process may be uploading (garbage collection
/// ends sessions idle past its window).
#[derive(Clone)]
pub struct FsBlobStore {
    root: PathBuf,
    sessions: Arc<Mutex<HashMap<UploadId, Arc<tokio::sync::Mutex<Session>>>>>,
    /// Chunks being written and hashed at once. Hashing is the CPU of an upload; with
    /// hundreds of uploads ready to hash, everything else (a manifest GET) would wait
    /// behind all of them in the runtime's queue. Waiting for the network holds no permit.
    chunk_permits: Arc<tokio::sync::Semaphore>,
}

/// See `FsBlobStore::chunk_permits`.
const CONCURRENT_CHUNKS: usize = 4;

impl std::fmt::Debug for FsBlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsBlobStore").field("root", &self.root).finish_non_exhaustive()
    }
}

impl FsBlobStore {
    /// Uses (and creates) `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for dir in [root.join("uploads"), root.join("blobs/sha256")] {
            std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        Ok(FsBlobStore { root, sessions: Arc::default(), chunk_permits: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_CHUNKS)) })
    }

    /// The directory this store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root.join("blobs/sha256").join(&hex[..2]).join(hex)
    }

    fn upload_path(&self, id: &UploadId) -> PathBuf {
        self.root.join("uploads").join(id.as_str())
    }

    fn session(&self, id: &UploadId) -> Arc<tokio::sync::Mutex<Session>> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.entry(id.clone()).or_default().clone()
    }

    fn forget(&self, id: &UploadId) {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    async fn upload_len(&self, id: &UploadId) -> Result<std::fs::Metadata> {
        match tokio::fs::metadata(self.upload_path(id)).await {
            Ok(m) => Ok(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::upload_not_found(id)),
            Err(e) => Err(io("reading upload metadata")(e)),
        }
    }
}

#[async_trait]
impl BlobStore for FsBlobStore {
    fn name(&self) -> &'static str {
        "filesystem"
    }

    fn capabilities(&self) -> StoreCapabilities {
        StoreCapabilities { durable: true }
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<BlobStat>> {
        match tokio::fs::metadata(self.path(digest)).await {
            Ok(m) => Ok(Some(BlobStat::new(m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading blob metadata")(e)),
        }
    }

    async fn open_range(&self, digest: &Digest, offset: u64, len: Option<u64>) -> Result<BlobReader> {
        let mut f = match tokio::fs::File::open(self.path(digest)).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::blob_not_found(digest)),
            Err(e) => return Err(io("opening blob")(e)),
        };
        let size = f.metadata().await.map_err(io("reading blob metadata"))?.len();
        if offset > size {
            return Err(Error::RangeNotSatisfiable { offset, size });
        }
        if offset > 0 {
            f.seek(SeekFrom::Start(offset)).await.map_err(io("seeking in blob"))?;
        }
        Ok(match len {
            Some(len) => Box::new(f.take(len)),
            None => Box::new(f),
        })
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

    async fn begin_upload(&self) -> Result<UploadId> {
        let id = UploadId::random();
        let path = self.upload_path(&id);
        blocking(move || std::fs::OpenOptions::new().write(true).create_new(true).open(path).map(drop))
            .await
            .map_err(io("creating upload"))?;
        *self.session(&id).lock().await = Session { hasher: Some((Sha256::new(), 0)) };
        Ok(id)
    }

    async fn upload_status(&self, id: &UploadId) -> Result<UploadStatus> {
        let m = self.upload_len(id).await?;
        Ok(UploadStatus::new(m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
    }

    async fn append(&self, id: &UploadId, offset: u64, mut content: BlobReader) -> Result<u64> {
        let session = self.session(id);
        let mut session = session.lock().await;
        let path = self.upload_path(id);
        // One trip to the blocking pool opens the file and checks where it ends.
        let opened = blocking(move || {
            let file = std::fs::OpenOptions::new().append(true).open(&path)?;
            let size = file.metadata()?.len();
            Ok((file, size))
        })
        .await;
        let (mut file, size) = match opened {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                drop(session);
                self.forget(id);
                return Err(Error::upload_not_found(id));
            }
            Err(e) => return Err(io("opening upload")(e)),
        };
        if size != offset {
            return Err(Error::UploadOffset { id: id.to_string(), expected: size, got: offset });
        }
        // The running hash only continues if it covers exactly the bytes in the file.
        let mut hasher = match session.hasher.take() {
            Some((h, hashed)) if hashed == size => Some(h),
            _ => None,
        };
        let mut written = size;
        let mut buf = vec![0u8; CHUNK];
        let outcome = loop {
            // Fill the buffer before writing: request bodies arrive in frames of a few
            // KiB, and each write is a trip to the blocking pool.
            let mut filled = 0;
            let mut read_error = None;
            while filled < buf.len() {
                match content.read(&mut buf[filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => {
                        read_error = Some(e);
                        break;
                    }
                }
            }
            if filled > 0 {
                let _permit = self.chunk_permits.acquire().await.map_err(|e| io("writing upload")(std::io::Error::other(e)))?;
                let chunk = std::mem::take(&mut buf);
                let (back, wrote) = blocking(move || {
                    use std::io::Write;
                    let r = file.write_all(&chunk[..filled]);
                    Ok(((file, chunk), r))
                })
                .await
                .map_err(io("writing upload"))?;
                (file, buf) = back;
                if let Err(e) = wrote {
                    // How much of this chunk reached the file is unknown: the hash is lost.
                    hasher = None;
                    break Err(io("writing upload")(e));
                }
                if let Some(h) = hasher.as_mut() {
                    h.update(&buf[..filled]);
                }
                written += filled as u64;
            }
            match read_error {
                Some(e) => break Err(io("reading upload content")(e)),
                None if filled < buf.len() => break Ok(()),
                None => {}
            }
        };
        session.hasher = hasher.map(|h| (h, written));
        outcome?;
        Ok(written)
    }

    async fn commit(&self, id: &UploadId, expected: &Digest) -> Result<u64> {
        let session = self.session(id);
        let mut session = session.lock().await;
        let tmp = self.upload_path(id);
        let dest = self.path(expected);
        let known = session.hasher.take();
        let expected = *expected;
        // Everything a commit does to the disk, in one trip to the blocking pool: hash
        // (only if this process did not see every byte), fsync, rename, fsync the directory.
        let result = blocking(move || {
            let file = std::fs::File::open(&tmp)?;
            let size = file.metadata()?.len();
            let actual = match known {
                Some((h, hashed)) if hashed == size => Digest::from_hasher(h),
                _ => hash_file_sync(&tmp)?,
            };
            if actual != expected {
                let _ = std::fs::remove_file(&tmp);
                return Ok(Err(Error::DigestMismatch { expected, actual }));
            }
            file.sync_all()?;
            drop(file);
            let parent = dest.parent().map(Path::to_path_buf).unwrap_or_default();
            if let Err(e) = std::fs::rename(&tmp, &dest) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(e);
                }
                // The shard directory did not exist yet.
                std::fs::create_dir_all(&parent)?;
                // Same digest, same bytes: replacing a blob that exists changes nothing
                // but its time, which is what a fresh commit should give it.
                std::fs::rename(&tmp, &dest)?;
            }
            std::fs::File::open(&parent)?.sync_all()?;
            Ok(Ok(size))
        })
        .await;
        let result = match result {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !self.upload_path(id).exists() => Err(Error::upload_not_found(id)),
            Err(e) => {
                // The session ends either way.
                let _ = tokio::fs::remove_file(self.upload_path(id)).await;
                Err(io("committing blob")(e))
            }
        };
        drop(session);
        self.forget(id);
        result
    }

    async fn cancel(&self, id: &UploadId) -> Result<()> {
        let session = self.session(id);
        let guard = session.lock().await;
        let removed = tokio::fs::remove_file(self.upload_path(id)).await;
        drop(guard);
        self.forget(id);
        match removed {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::upload_not_found(id)),
            Err(e) => Err(io("cancelling upload")(e)),
        }
    }

    async fn list_uploads(&self) -> Result<Vec<(UploadId, UploadStatus)>> {
        let mut out = Vec::new();
        let mut files = tokio::fs::read_dir(self.root.join("uploads")).await.map_err(io("listing uploads"))?;
        while let Some(f) = files.next_entry().await.map_err(io("listing uploads"))? {
            let Ok(id) = f.file_name().to_string_lossy().parse::<UploadId>() else { continue };
            let Ok(m) = f.metadata().await else { continue };
            out.push((id, UploadStatus::new(m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH))));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}
