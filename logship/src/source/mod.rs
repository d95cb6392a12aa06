//! Sources: where records come from, and where their acknowledgements go back to.

mod child;
#[cfg(feature = "docker")]
mod docker;
mod file;
mod syslog;

pub use child::{ChildOutputSource, ReaderSource, StreamSource};
#[cfg(feature = "docker")]
pub use docker::{DockerSource, DockerSourceConfig};
pub use file::{FileSource, FileSourceConfig, FileSourceStats, StartAt};
pub use syslog::{SyslogSource, SyslogSourceConfig, SyslogSourceStats};

use async_trait::async_trait;

use crate::error::Result;
use crate::record::Record;

/// What a source does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SourceCapabilities {
    /// Whether acknowledgements advance a checkpoint that outlives the process (a
    /// restart resumes after the last acknowledged record).
    pub checkpoints: bool,
    /// Whether it can pause: when the sink stalls, nothing accumulates in memory.
    pub pauses: bool,
}

impl SourceCapabilities {
    /// Capabilities: checkpoints, and pausing.
    pub fn new(checkpoints: bool, pauses: bool) -> Self {
        SourceCapabilities { checkpoints, pauses }
    }
}

/// Produces records in batches and hears back which of them were delivered.
///
/// Records are counted from 1 in the order the source hands them out. The shipper calls
/// [`Source::ack`] with a count once the sink acknowledged every record up to it; a source
/// with checkpoints (a file's offset, a container's last timestamp) advances them only
/// then. So a crash re-reads what was not acknowledged (at least once) and never skips
/// what was not delivered.
#[async_trait]
pub trait Source: Send {
    /// Appends up to `max` records to `batch` (at least one, waiting for it) and returns
    /// how many; 0 means the source has ended and stays ended. Must be cancel-safe: the
    /// shipper drops a pending read (its batch is full in time, or the sink acknowledged
    /// first), so records go into `batch` only as the call returns.
    async fn read(&mut self, batch: &mut Vec<Record>, max: usize) -> Result<usize>;

    /// What the source does (by default: no checkpoints; it pauses, as a bounded reader
    /// of a pipe does).
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities::new(false, true)
    }

    /// Every record up to the `count`th this source handed out is delivered. Sources
    /// without checkpoints ignore it (the default).
    async fn ack(&mut self, count: u64) -> Result<()> {
        let _ = count;
        Ok(())
    }
}
