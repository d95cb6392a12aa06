//! The one error type of this crate.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument was rejected; nothing was changed.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidInput {
        /// Which argument.
        field: &'static str,
        /// The offending value.
        value: String,
        /// Why.
        reason: String,
    },
    /// The network or endpoint does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// What kind of thing.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The network or endpoint already exists, or is still in use.
    #[error("{kind} {name:?}: {reason}")]
    Conflict {
        /// What kind of thing.
        kind: &'static str,
        /// Its name.
        name: String,
        /// What conflicts.
        reason: String,
    },
    /// Every address of the network's pool is leased.
    #[error("network {network:?}: no free address left in {subnet}")]
    PoolExhausted {
        /// The network.
        network: String,
        /// Its subnet.
        subnet: String,
    },
    /// The driver cannot do this.
    #[error("{backend} does not support {operation}")]
    Unsupported {
        /// The operation.
        operation: &'static str,
        /// The driver.
        backend: &'static str,
    },
    /// The kernel or a tool refused.
    #[error("{backend} error: {source}")]
    Backend {
        /// The driver.
        backend: &'static str,
        /// The error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        false
    }
}
