//! The one error type of this crate.

use std::time::Duration;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument was rejected before anything was done.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidInput {
        /// Which argument.
        field: &'static str,
        /// The offending value.
        value: String,
        /// Why.
        reason: String,
    },
    /// A task group asks for more of a resource than the largest node has: no amount of
    /// waiting or draining will place it.
    #[error("group {group:?} asks for {requested} {dimension} per task, but the largest node has {largest}")]
    ExceedsNodeCapacity {
        /// The task group.
        group: String,
        /// The resource dimension.
        dimension: Dimension,
        /// What one task asks for.
        requested: u64,
        /// The largest capacity of any eligible node.
        largest: u64,
    },
    /// The thing does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// What kind of thing.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The thing already exists, or is in use, or is running: the call cannot succeed
    /// until that changes (retrying alone does not help).
    #[error("{kind} {name:?}: {reason}")]
    Conflict {
        /// What kind of thing.
        kind: &'static str,
        /// Its name.
        name: String,
        /// What conflicts.
        reason: String,
    },
    /// What a plan or write was based on changed before it was written (another planner
    /// committed first): nothing was written. Read again, plan again.
    #[error("{kind} {name:?} was based on cluster state that changed; nothing was written")]
    Stale {
        /// What went stale (a plan, a key, a group's state).
        kind: &'static str,
        /// Which one.
        name: String,
    },
    /// A write made under a lock found the lock lost (its lease expired while the holder
    /// was paused, or it was taken over): nothing was written; the holder steps down.
    #[error("lock {lock:?} was lost; the write was fenced off and nothing was stored")]
    LockLost {
        /// The lock key.
        lock: String,
    },
    /// The backend cannot do this.
    #[error("{backend} does not support {operation}")]
    Unsupported {
        /// The operation.
        operation: &'static str,
        /// The backend.
        backend: &'static str,
    },
    /// The backend cannot be reached right now.
    #[error("{backend} unavailable: {reason}")]
    Unavailable {
        /// The backend.
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
    /// An image is not on the node and could not be pulled.
    #[error("image {image:?} is not present and could not be pulled: {reason}")]
    ImageUnavailable {
        /// The image reference.
        image: String,
        /// Why the pull failed.
        reason: String,
    },
    /// An image could not be built (a failed step, or a setup command that failed).
    #[error("image {image:?} could not be built: {reason}")]
    BuildFailed {
        /// The image's tag.
        image: String,
        /// The engine's message.
        reason: String,
        /// The build's last lines of output.
        output: String,
    },
    /// The other side refused the caller (a missing or wrong token).
    #[error("{operation} denied: {reason}")]
    Denied {
        /// What was refused.
        operation: &'static str,
        /// Why.
        reason: String,
    },
    /// Nothing in the cluster can take the work now (the explanation says why).
    #[error("{what} cannot be placed: {reason}")]
    Unplaced {
        /// What was to be placed.
        what: String,
        /// The placement engine's explanation.
        reason: String,
    },
    /// Any other backend failure.
    #[error("{backend} error: {source}")]
    Backend {
        /// The backend.
        backend: &'static str,
        /// Its error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Timeout { .. })
    }

    pub(crate) fn invalid(field: &'static str, value: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidInput { field, value: value.into(), reason: reason.into() }
    }
}

/// A resource dimension, for capacity errors and placement explanations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Dimension {
    /// CPU, in millicores.
    Cpu,
    /// Memory, in MiB.
    Memory,
    /// Disk, in MiB.
    Disk,
    /// Static or dynamic ports.
    Ports,
    /// A volume: absent where needed, or its single writer taken.
    Volume,
    /// A `distinct_hosts` / `distinct_property` limit.
    Distinct,
}

impl std::fmt::Display for Dimension {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dimension::Cpu => "cpu millicores",
            Dimension::Memory => "memory MiB",
            Dimension::Disk => "disk MiB",
            Dimension::Ports => "ports",
            Dimension::Volume => "volume",
            Dimension::Distinct => "distinct limit",
        })
    }
}

/// A name used as an id (job, group, node, task, volume): 1 to 128 of `A-Za-z0-9_.-`,
/// starting with an alphanumeric, so it is safe in keys, labels, file names and logs.
pub fn validate_id(field: &'static str, value: &str) -> Result<()> {
    let ok_len = !value.is_empty() && value.len() <= 128;
    let ok_chars = value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    let ok_start = value.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok_len && ok_chars && ok_start {
        Ok(())
    } else {
        Err(Error::invalid(field, value, "must be 1 to 128 of A-Za-z0-9_.- starting with a letter or digit"))
    }
}
