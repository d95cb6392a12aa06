//! Log shipping for keelson: [`Source`]s produce [`Record`]s, [`Transform`](transform::Transform)s reshape
//! them, [`Sink`]s take them, and a [`Shipper`] moves them in batches. Acknowledgements
//! flow back: a batch counts as delivered when its sink says so ([`Sink::flush`]), and
//! only then does its source advance its checkpoint ([`Source::ack`]). A crash re-sends
//! at most the one unacknowledged batch, and never skips a line.
//!
//! - Sources: [`FileSource`] (tails files: rotation by rename and copytruncate,
//!   truncation, deletion while open, checkpoints keyed by a fingerprint of each file's
//!   first bytes), `DockerSource` (feature `docker`: container logs with per-container
//!   checkpoints, across json-file rotation and daemon restarts), [`SyslogSource`] (UDP
//!   and TCP, RFC 5424 and 3164, octet counting and newline framing, spilling to a
//!   [`DiskQueue`]), [`ReaderSource`] (stdin, any reader), [`ChildOutputSource`],
//!   [`StreamSource`].
//! - Transforms ([`transform`]): JSON parsing, multiline merging, joining pieces of cut
//!   lines, enrichment, filtering; [`transform::Transformed`] maps acknowledgements back
//!   through them.
//! - Sinks: [`SyslogSink`] (RFC 5424 over TCP and TLS with RFC 6587 octet counting, and
//!   UDP), [`FileSink`] (JSON lines per service, rotated by size), [`HttpSink`] (NDJSON,
//!   Loki push, Elasticsearch bulk); [`sink_from_url`] builds one from a URL.
//! - Memory stays bounded: files and the engine's log files are their own buffer (reading
//!   pauses while the sink stalls); sources that cannot pause spill to a byte-capped
//!   [`DiskQueue`] that blocks or drops its oldest segment, counting every drop.
//!
//! Shipping a file to another folder, then shipping again from the checkpoint:
//!
//! ```
//! use keelson_logship::{FileSink, FileSource, FileSourceConfig, ShipConfig, Shipper};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! std::fs::write(dir.path().join("web.log"), "started\n{\"msg\":\"ready\"}\n")?;
//! let mut config = FileSourceConfig::new([dir.path().join("*.log").display().to_string()]);
//! config.checkpoints = Some(dir.path().join("state/files.json"));
//! config.stop_at_eof = true;
//! let sink = FileSink::new(dir.path().join("out"))?;
//!
//! let mut shipper = Shipper::new(ShipConfig::default())?;
//! let stats = shipper.run(&mut FileSource::new(config.clone())?, &sink).await?;
//! assert_eq!(stats.records, 2);
//! let shipped = std::fs::read_to_string(dir.path().join("out/web.log"))?;
//! assert!(shipped.contains("\"service\":\"web\"") && shipped.contains("\"line\":\"started\""));
//!
//! // Everything was acknowledged: a second run from the checkpoint sends nothing.
//! let again = Shipper::new(ShipConfig::default())?.run(&mut FileSource::new(config)?, &sink).await?;
//! assert_eq!(again.records, 0);
//! # Ok(())
//! # }
//! ```
//!
//! ## Feature flags
//!
#![doc = document_features::document_features!()]
// docs.rs (all features, --cfg docsrs) marks each backend item with the feature it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

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
    client_config, sink_from_url, Acknowledgement, FileSink, FileSinkConfig, HttpFormat, HttpSink, HttpSinkConfig, Sink, SinkCapabilities,
    SinkOptions, SyslogSink, SyslogSinkConfig, SyslogSinkStats, SyslogTransport,
};
pub use source::{
    ChildOutputSource, FileSource, FileSourceConfig, FileSourceStats, ReaderSource, Source, SourceCapabilities, StartAt, StreamSource,
    SyslogSource, SyslogSourceConfig, SyslogSourceStats,
};
#[cfg(feature = "docker")]
pub use source::{DockerSource, DockerSourceConfig};
