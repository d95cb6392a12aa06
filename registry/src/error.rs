//! The one error type of this crate.

use crate::digest::{Digest, InvalidDigest};

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument was rejected.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidInput {
        /// Which argument.
        field: &'static str,
        /// The offending value.
        value: String,
        /// Why.
        reason: String,
    },
    /// The bytes do not hash to the digest they were stored under; nothing was stored.
    #[error("digest mismatch: expected {expected}, content hashes to {actual}")]
    DigestMismatch {
        /// The digest the caller claimed.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },
    /// No such thing (a blob, by its digest).
    #[error("{kind} {name} not found")]
    NotFound {
        /// What kind of thing.
        kind: &'static str,
        /// Its name (a blob's digest).
        name: String,
    },
    /// An append did not start where the upload session ends; nothing was written.
    #[error("upload {id}: append at offset {got}, but the session holds {expected} bytes")]
    UploadOffset {
        /// The session.
        id: String,
        /// Its size, where an append must start.
        expected: u64,
        /// Where the append asked to start.
        got: u64,
    },
    /// A read starts past the end of the blob.
    #[error("range starting at {offset} is past the end of a {size}-byte blob")]
    RangeNotSatisfiable {
        /// The requested start.
        offset: u64,
        /// The blob's size.
        size: u64,
    },
    /// Something exceeds a configured cap.
    #[error("{what} of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// What (a manifest, a blob read into memory).
        what: &'static str,
        /// Its size (at least; reading stopped past the limit).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A manifest is not one this registry accepts, or refers to what is not there.
    #[error("invalid manifest: {reason}")]
    ManifestInvalid {
        /// What is wrong with it.
        reason: String,
    },
    /// A manifest refers to a blob or manifest the repository does not hold.
    #[error("manifest refers to {digest}, which repository {repository} does not hold")]
    ManifestReferenceUnknown {
        /// The repository.
        repository: String,
        /// The missing digest.
        digest: Digest,
    },
    /// The metadata store failed (or is held by another process).
    #[error("metadata store: {0}")]
    Metadata(String),
    /// A registry answered a client's request with an error.
    #[error("registry answered {status} to {request}: {code} {message}")]
    Http {
        /// The request (method and path).
        request: String,
        /// The HTTP status.
        status: u16,
        /// The spec's error code, if the body had one.
        code: String,
        /// The message.
        message: String,
    },
    /// The registry could not be reached, or the connection failed.
    #[error("{context}: {reason}")]
    Transport {
        /// What the client was doing.
        context: String,
        /// Why it failed.
        reason: String,
    },
    /// The backend cannot do this.
    #[error("{backend} does not support {operation}")]
    Unsupported {
        /// The operation.
        operation: &'static str,
        /// The backend.
        backend: &'static str,
    },
    /// Storage I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl From<InvalidDigest> for Error {
    fn from(e: InvalidDigest) -> Self {
        Error::InvalidInput { field: "digest", value: e.value, reason: e.reason.to_owned() }
    }
}

impl Error {
    pub(crate) fn blob_not_found(digest: &Digest) -> Self {
        Error::NotFound { kind: "blob", name: digest.to_string() }
    }

    pub(crate) fn upload_not_found(id: &crate::UploadId) -> Self {
        Error::NotFound { kind: "upload", name: id.to_string() }
    }

    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io { source, .. } => keelson_base::io_is_transient(source),
            Error::Transport { .. } => true,
            Error::Http { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => false,
        }
    }
}
