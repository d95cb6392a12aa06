//! Log shipping for keelson: [`Source`]s produce [`Record`]s, [`Sink`]s store them, and
//! [`ship`] moves them in batches, dropping a batch only after the sink acknowledged it
//! (at least once).
//!
//! Sources: [`ChildOutputSource`] (a child process's stdout and stderr) and
//! [`StreamSource`] (any stream, such as a driver's output). Sink: [`FileSink`] (JSON
//! lines, one file per service).
//!
//! ```
//! use keelson_logship::{ship, ChildOutputSource, FileSink, ShipConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let mut child = tokio::process::Command::new("sh")
//!     .args(["-c", "echo hello; echo oops >&2"])
//!     .stdout(std::process::Stdio::piped())
//!     .stderr(std::process::Stdio::piped())
//!     .spawn()?;
//! let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
//! let mut source = ChildOutputSource::new("web", "web-1", out, err);
//! let sink = FileSink::new(dir.path())?;
//! let stats = ship(&mut source, &sink, &ShipConfig::default()).await?;
//! assert_eq!(stats.records, 2);
//! let text = std::fs::read_to_string(dir.path().join("web.log"))?;
//! assert!(text.contains("\"line\":\"hello\"") && text.contains("\"stream\":\"stderr\""));
//! # Ok(())
//! # }
//! ```

mod checkpoint;
mod error;
mod lines;
mod metrics;
mod queue;
mod record;
mod ship;
mod sink;
mod source;
mod sys;
pub mod syslog;
pub mod transform;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use checkpoint::CheckpointFile;
pub use error::{Error, Result};
pub use lines::{Line, LineReader, LineSplitter, MAX_LINE_BYTES};
pub use metrics::ShipMetrics;
pub use queue::{DiskQueue, DiskQueueConfig, DiskQueueStats, Overflow, QueueSource};
pub use record::{validate_service, Labels, Record, Stream};
pub use ship::{ship, ShipConfig, ShipStats, Shipper};
pub use sink::{
    client_config, sink_from_url, FileSink, FileSinkConfig, HttpFormat, HttpSink, HttpSinkConfig, Sink, SinkOptions, SyslogSink,
    SyslogSinkConfig, SyslogSinkStats, SyslogTransport,
};
pub use source::{
    ChildOutputSource, FileSource, FileSourceConfig, FileSourceStats, ReaderSource, Source, StartAt, StreamSource, SyslogSource,
    SyslogSourceConfig, SyslogSourceStats,
};
#[cfg(feature = "docker")]
pub use source::{DockerSource, DockerSourceConfig};
