//! The one error type of this crate.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A record or setting was rejected; nothing was written.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidInput {
        /// Which field.
        field: &'static str,
        /// The offending value.
        value: String,
        /// Why.
        reason: String,
    },
    /// Reading or writing failed; retrying may help.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A peer did not answer in time; retrying may help.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What we were doing.
        operation: String,
        /// How long we waited.
        after: std::time::Duration,
    },
    /// A server answered with an error status.
    #[error("{url} answered {status}: {body}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// Where the request went.
        url: String,
        /// The start of the answer.
        body: String,
    },
    /// The sink or source cannot do this.
    #[error("{backend} does not support {operation}")]
    Unsupported {
        /// The operation.
        operation: &'static str,
        /// The backend.
        backend: &'static str,
    },
}

impl Error {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io { source, .. } => keelson_base::io_is_transient(source),
            Error::Timeout { .. } => true,
            Error::Rejected { status, .. } => matches!(status, 408 | 429) || *status >= 500,
            _ => false,
        }
    }
}
