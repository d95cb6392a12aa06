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
    /// A compare-and-swap lost: the stored version is not the expected one.
    #[error("conflict on {key:?}: expected version {expected:?}, found {actual:?}")]
    Conflict {
        /// The key that changed under us.
        key: String,
        /// The version the caller expected (`None`: expected absent).
        expected: Option<u64>,
        /// The version actually stored (`None`: absent).
        actual: Option<u64>,
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
