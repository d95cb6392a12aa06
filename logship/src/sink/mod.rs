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

/// What a sink's acknowledgement means.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Acknowledgement {
    /// Nothing comes back (UDP): `flush` returns at once.
    #[default]
    None,
    /// The peer's network stack has the bytes (plain syslog over TCP or TLS): a crash of
    /// the shipper loses nothing, a crash of the receiver may.
    Received,
    /// The peer answered that it stored them (HTTP 2xx).
    Stored,
    /// Synced to a local disk.
    Durable,
}

/// What a sink does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SinkCapabilities {
    /// What `flush` returning `Ok` means.
    pub acknowledgement: Acknowledgement,
    /// Whether every label reaches the far end (a syslog message carries service,
    /// instance, node, container, image and the stream, not extra labels).
    pub all_labels: bool,
}

impl SinkCapabilities {
    /// Capabilities with `acknowledgement`, and whether all labels are carried.
    pub fn new(acknowledgement: Acknowledgement, all_labels: bool) -> Self {
        SinkCapabilities { acknowledgement, all_labels }
    }
}

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

    /// What the sink does (by default: no acknowledgement, labels carried).
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities::new(Acknowledgement::None, true)
    }

    /// Hands `batch` to the sink. On error none, some or all of it may have been written.
    async fn send(&self, batch: &[Record]) -> Result<()>;

    /// Waits until everything sent so far is acknowledged by the next hop.
    async fn flush(&self) -> Result<()>;
}
