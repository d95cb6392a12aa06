//! What every keelson crate shares, so that the crates agree without depending on each
//! other: one retry schedule ([`retry_pauses`]) and one answer to "can a retry fix this
//! I/O error?" ([`io_is_transient`]). Nothing else belongs here: each crate keeps its own
//! error enum and traits.
//!
//! ```
//! use std::io::{Error, ErrorKind};
//! use std::time::Duration;
//! use keelson_base::{io_is_transient, retry_pauses};
//!
//! let pauses: Vec<Duration> = retry_pauses(Duration::from_millis(10), Duration::from_secs(1)).take(3).collect();
//! assert!(pauses[0] >= Duration::from_millis(10));
//! assert!(io_is_transient(&Error::from(ErrorKind::ConnectionReset)));
//! assert!(!io_is_transient(&Error::from(ErrorKind::StorageFull)), "a full disk stays full");
//! ```

mod io;
mod retry;

pub use io::io_is_transient;
pub use retry::{retry_pauses, RetryPauses};
