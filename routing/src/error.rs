//! The one error type of this crate.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument was rejected; nothing was applied.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidInput {
        /// Which argument.
        field: &'static str,
        /// The offending value.
        value: String,
        /// Why.
        reason: String,
    },
    /// The route does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// What kind of thing.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The backend cannot do this.
    #[error("{backend} does not support {operation}")]
    Unsupported {
        /// The operation.
        operation: &'static str,
        /// The backend.
        backend: &'static str,
    },
    /// A socket or file could not be used.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A certificate could not be had from the ACME CA.
    #[error("ACME certificate for {names}: {reason}")]
    Acme {
        /// The names asked for, comma-separated.
        names: String,
        /// What the CA or the network said.
        reason: String,
    },
    /// A route source (discovery, say) failed.
    #[error("route source failed: {0}")]
    Source(#[from] keelson_discovery::Error),
}

impl Error {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io { source, .. } => keelson_base::io_is_transient(source),
            Error::Source(e) => e.is_retryable(),
            _ => false,
        }
    }

    pub(crate) fn invalid(field: &'static str, value: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidInput { field, value: value.into(), reason: reason.into() }
    }
}
