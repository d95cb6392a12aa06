//! Errors as the distribution-spec answers them: a status and a JSON body
//! `{"errors":[{"code","message","detail"}]}` with the spec's codes.

use http::StatusCode;

use crate::error::Error;

/// An error response about to be sent.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra headers (`Range` on a refused append, `WWW-Authenticate`, `Content-Range`).
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), headers: Vec::new() }
    }

    pub(crate) fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub(crate) fn body(&self) -> String {
        serde_json::json!({"errors": [{"code": self.code, "message": self.message, "detail": null}]}).to_string()
    }

    /// The request asked for something the spec has no endpoint for, or with a method
    /// the endpoint does not take.
    pub(crate) fn unsupported(method: &http::Method, path: &str) -> Self {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", format!("{method} {path} is not supported"))
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        let (status, code) = match &e {
            Error::InvalidInput { field: "repository name", .. } => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            Error::InvalidInput { field: "tag" | "reference", .. } => (StatusCode::BAD_REQUEST, "TAG_INVALID"),
            Error::InvalidInput { field: "digest", .. } => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            Error::InvalidInput { field: "upload id", .. } => (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"),
            Error::InvalidInput { .. } => (StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID"),
            Error::DigestMismatch { .. } => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            Error::NotFound { kind: "blob", .. } => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
            Error::NotFound { kind: "upload", .. } => (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"),
            Error::NotFound { kind: "manifest", .. } => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
            Error::NotFound { kind: "repository", .. } => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
            Error::NotFound { .. } => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            Error::UploadOffset { expected, .. } => {
                let range = format!("0-{}", expected.saturating_sub(1));
                return ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UPLOAD_INVALID", message).with_header("range", range);
            }
            Error::RangeNotSatisfiable { size, .. } => {
                return ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID", message)
                    .with_header("content-range", format!("bytes */{size}"));
            }
            Error::TooLarge { what: "manifest", .. } => (StatusCode::PAYLOAD_TOO_LARGE, "MANIFEST_INVALID"),
            Error::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID"),
            Error::ManifestInvalid { .. } => (StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
            Error::ManifestReferenceUnknown { .. } => (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN"),
            Error::Unsupported { .. } => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
            // A client that goes quiet mid-body is answered (if it still listens) with 408.
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::TimedOut => {
                (StatusCode::REQUEST_TIMEOUT, "BLOB_UPLOAD_INVALID")
            }
            Error::Io { .. } | Error::Metadata(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
            // Only a client makes these; a server that proxied would answer 502.
            Error::Http { .. } | Error::Transport { .. } => (StatusCode::BAD_GATEWAY, "UNKNOWN"),
        };
        ApiError::new(status, code, message)
    }
}
