//! Blobs and upload sessions in memory: for tests, caches and the embedded default.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;

use super::{io_error, BlobReader, BlobStat, BlobStore, StoreCapabilities, UploadId, UploadStatus};
use crate::digest::Digest;
use crate::error::{Error, Result};

#[derive(Debug, Default)]
struct State {
    blobs: HashMap<Digest, (Arc<[u8]>, SystemTime)>,
    uploads: HashMap<UploadId, (Vec<u8>, SystemTime)>,
}

/// Blobs in memory.
#[derive(Debug, Default, Clone)]
pub struct MemoryBlobStore {
    state: Arc<Mutex<State>>,
}

impl MemoryBlobStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryBlobStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl BlobStore for MemoryBlobStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> StoreCapabilities {
        StoreCapabilities { durable: false }
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<BlobStat>> {
        Ok(self.lock().blobs.get(digest).map(|(b, t)| BlobStat::new(b.len() as u64, *t)))
    }

    async fn open_range(&self, digest: &Digest, offset: u64, len: Option<u64>) -> Result<BlobReader> {
        let (blob, _) = self.lock().blobs.get(digest).cloned().ok_or(Error::blob_not_found(digest))?;
        let size = blob.len() as u64;
        if offset > size {
            return Err(Error::RangeNotSatisfiable { offset, size });
        }
        let end = len.map_or(size, |l| offset.saturating_add(l).min(size));
        let slice: Vec<u8> = blob[offset as usize..end as usize].to_vec();
        Ok(Box::new(std::io::Cursor::new(slice)))
    }

    async fn delete(&self, digest: &Digest) -> Result<()> {
        self.lock().blobs.remove(digest).map(|_| ()).ok_or(Error::blob_not_found(digest))
    }

    async fn list(&self) -> Result<Vec<Digest>> {
        let mut all: Vec<Digest> = self.lock().blobs.keys().copied().collect();
        all.sort();
        Ok(all)
    }

    async fn begin_upload(&self) -> Result<UploadId> {
        let id = UploadId::random();
        self.lock().uploads.insert(id.clone(), (Vec::new(), SystemTime::now()));
        Ok(id)
    }

    async fn upload_status(&self, id: &UploadId) -> Result<UploadStatus> {
        let state = self.lock();
        let (bytes, t) = state.uploads.get(id).ok_or_else(|| Error::upload_not_found(id))?;
        Ok(UploadStatus::new(bytes.len() as u64, *t))
    }

    async fn append(&self, id: &UploadId, offset: u64, mut content: BlobReader) -> Result<u64> {
        self.upload_status(id).await?;
        let mut chunk = Vec::new();
        content.read_to_end(&mut chunk).await.map_err(io_error("reading upload content"))?;
        let mut state = self.lock();
        let (bytes, t) = state.uploads.get_mut(id).ok_or_else(|| Error::upload_not_found(id))?;
        // Checked after reading, under the lock: of two appends racing at one offset,
        // the second finds the offset moved.
        if bytes.len() as u64 != offset {
            return Err(Error::UploadOffset { id: id.to_string(), expected: bytes.len() as u64, got: offset });
        }
        bytes.extend_from_slice(&chunk);
        *t = SystemTime::now();
        Ok(bytes.len() as u64)
    }

    async fn commit(&self, id: &UploadId, expected: &Digest) -> Result<u64> {
        let mut state = self.lock();
        let (bytes, _) = state.uploads.remove(id).ok_or_else(|| Error::upload_not_found(id))?;
        let actual = Digest::of(&bytes);
        if actual != *expected {
            return Err(Error::DigestMismatch { expected: *expected, actual });
        }
        let size = bytes.len() as u64;
        state.blobs.entry(actual).or_insert_with(|| (bytes.into(), SystemTime::now()));
        Ok(size)
    }

    async fn cancel(&self, id: &UploadId) -> Result<()> {
        self.lock().uploads.remove(id).map(|_| ()).ok_or_else(|| Error::upload_not_found(id))
    }

    async fn list_uploads(&self) -> Result<Vec<(UploadId, UploadStatus)>> {
        let state = self.lock();
        let mut all: Vec<_> = state.uploads.iter().map(|(id, (b, t))| (id.clone(), UploadStatus::new(b.len() as u64, *t))).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }
}
