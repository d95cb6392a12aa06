//! Which I/O errors a retry can fix.

use std::io::{Error, ErrorKind};

/// Whether the same I/O operation may succeed if tried again: false when the cause
/// stays until someone acts (the disk or quota is full, a file is too large, permission
/// is denied, the file system is read-only, the input or data is bad, the operation is
/// unsupported); true for the rest (connections reset or refused, timeouts,
/// interruptions, resources briefly busy). Every keelson error's `is_retryable` answers
/// I/O causes through this, so crates agree.
pub fn io_is_transient(e: &Error) -> bool {
    !matches!(
        e.kind(),
        ErrorKind::StorageFull
            | ErrorKind::QuotaExceeded
            | ErrorKind::FileTooLarge
            | ErrorKind::PermissionDenied
            | ErrorKind::ReadOnlyFilesystem
            | ErrorKind::InvalidInput
            | ErrorKind::InvalidData
            | ErrorKind::Unsupported
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_that_stay_are_not_transient() {
        for kind in [ErrorKind::StorageFull, ErrorKind::PermissionDenied, ErrorKind::ReadOnlyFilesystem, ErrorKind::InvalidData] {
            assert!(!io_is_transient(&Error::from(kind)), "{kind:?}");
        }
        // ENOSPC from the OS maps to StorageFull.
        assert!(!io_is_transient(&Error::from_raw_os_error(28)));
        for kind in [ErrorKind::ConnectionReset, ErrorKind::TimedOut, ErrorKind::Interrupted, ErrorKind::BrokenPipe] {
            assert!(io_is_transient(&Error::from(kind)), "{kind:?}");
        }
    }
}
