//! Sinks: where records go, and when they count as delivered.

mod file;
mod http;
mod syslog;
mod url;

pub use file::{FileSink, FileSinkConfig};
pub use http::{HttpFormat, HttpSink, HttpSinkConfig};
pub use syslog::{SyslogSink, SyslogSinkConfig, SyslogSinkStats, SyslogTransport};
pub use url::{client_config, sink_from_url, SinkOptions};

use async_trait::async_trait;

use crate::error::Result;
use crate::record::Record;

/// Accepts batches of records and acknowledges them.
///
/// `send` hands a batch over, in order; `flush` returns once everything sent so far is
/// acknowledged by the next hop (written to disk, received by the peer). Only then does
/// the shipper advance its sources' checkpoints, so a sink must not say `Ok` from
/// `flush` for records it could still lose by itself. After an error from either call,
/// the shipper sends the unacknowledged batch again (at least once).
#[async_trait]
pub trait Sink: Send + Sync + std::fmt::Debug {
    /// The sink's name, for logs and metrics.
    fn name(&self) -> &'static str;

    /// Hands `batch` to the sink. On error none, some or all of it may have been written.
    async fn send(&self, batch: &[Record]) -> Result<()>;

    /// Waits until everything sent so far is acknowledged by the next hop.
    async fn flush(&self) -> Result<()>;
}
