//! Progress of pushes and pulls, reported per blob.

use crate::digest::Digest;

/// Receives progress; every method has a default that does nothing. Called from
/// several tasks at once when blobs move in parallel.
pub trait Progress: Send + Sync {
    /// A blob of `size` bytes starts moving.
    fn begin(&self, _blob: &Digest, _size: u64) {}
    /// `bytes` more of it moved.
    fn advance(&self, _blob: &Digest, _bytes: u64) {}
    /// It is done; `skipped` if no bytes had to move (it existed, or was mounted).
    fn done(&self, _blob: &Digest, _skipped: bool) {}
}

/// Reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}
