//! The one error type of this crate. Backend-private errors convert into it.

use std::time::Duration;

/// Result alias used by every fallible call in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument was rejected before anything was stored.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidInput {
        /// Which argument.
        field: &'static str,
        /// The offending value, as given.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The thing asked for does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// What kind of thing (key, lease, instance, ...).
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A compare-and-swap (or a transaction's compare, or a lock already held) lost: the
    /// stored version is not the expected one. Nothing was written; read again and retry.
    #[error("version mismatch on {key:?}: expected version {expected:?}, found {actual:?}")]
    VersionMismatch {
        /// The key that changed under us.
        key: String,
        /// The version the caller expected (`None`: expected absent).
        expected: Option<u64>,
        /// The version actually stored (`None`: absent).
        actual: Option<u64>,
    },
    /// A write fenced by a lock found the lock no longer held by its lease: the lock was
    /// lost (expired while its holder was paused, say) and the write was not applied.
    #[error("fenced: the lock {key:?} is no longer held by lease {lease}; nothing was written")]
    Fenced {
        /// The lock key.
        key: String,
        /// The lease the writer held it with.
        lease: u64,
    },
    /// A transaction is past the backend's limits; nothing was written. Split the
    /// change (see `KvCapabilities::max_txn_ops` and `max_txn_bytes`).
    #[error("transaction of {ops} operations and {bytes} bytes is past {backend}'s limits ({max_ops} operations, {max_bytes} bytes); nothing was written")]
    TxnTooLarge {
        /// The backend's name.
        backend: &'static str,
        /// Compares plus writes in the transaction.
        ops: usize,
        /// Bytes of keys and values in it.
        bytes: usize,
        /// The backend's limit on operations.
        max_ops: usize,
        /// The backend's limit on bytes.
        max_bytes: usize,
    },
    /// A response was larger than the client accepts (etcd's `max_message_bytes`): read
    /// less at once (a narrower prefix, pages) or raise the limit. Not retryable.
    #[error("{backend} response too large: {reason}")]
    ResponseTooLarge {
        /// The backend's name.
        backend: &'static str,
        /// What the backend said (the size found and the limit).
        reason: String,
    },
    /// A watch asked to start at a revision the backend no longer keeps.
    /// Re-list, then watch from the list's revision + 1.
    #[error("revision {requested} was compacted (oldest kept: {oldest})")]
    Compacted {
        /// The revision the caller asked for.
        requested: u64,
        /// The oldest revision still available.
        oldest: u64,
    },
    /// The backend cannot do this operation at all.
    #[error("{backend} does not support {operation}")]
    Unsupported {
        /// The operation asked for.
        operation: &'static str,
        /// The backend's name.
        backend: &'static str,
    },
    /// The backend cannot be reached right now; retrying may help.
    /// TLS with the backend failed: its certificate is not trusted (wrong CA, wrong
    /// name), or it refused ours (missing or unknown client certificate).
    #[error("TLS with {backend} failed: {reason}")]
    Tls {
        /// The backend.
        backend: &'static str,
        /// What the handshake said.
        reason: String,
    },
    /// The backend did not accept the credentials (wrong user or password, none given
    /// while it requires some, an expired token).
    #[error("{backend} refused the credentials: {reason}")]
    Unauthenticated {
        /// The backend.
        backend: &'static str,
        /// What it said.
        reason: String,
    },
    /// The credentials are valid but may not do this (an etcd role limited to another
    /// key prefix, a Consul ACL policy).
    #[error("{backend} denied {operation}: {reason}")]
    PermissionDenied {
        /// The backend.
        backend: &'static str,
        /// What was attempted.
        operation: String,
        /// What the backend said.
        reason: String,
    },
    #[error("{backend} unavailable: {reason}")]
    Unavailable {
        /// The backend's name.
        backend: &'static str,
        /// What failed.
        reason: String,
    },
    /// The operation did not finish in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// The operation.
        operation: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// Any other backend failure, with its source kept.
    #[error("{backend} error: {source}")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// The backend's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Whether repeating the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Timeout { .. })
    }

    pub(crate) fn invalid(field: &'static str, value: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidInput { field, value: value.into(), reason: reason.into() }
    }
}
