//! The shipping loop: source to sink in batches; a batch's acknowledgement goes back to
//! the source before the next batch is sent.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::metrics::ShipMetrics;
use crate::record::Record;
use crate::sink::Sink;
use crate::source::Source;

/// Batching and retry settings.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShipConfig {
    /// Records per batch at most (default 2048).
    pub max_batch: usize,
    /// Bytes of lines per batch at most (default 1 MiB); a batch holds at least one record.
    pub max_batch_bytes: usize,
    /// How long a partial batch may wait for more records (default 100 ms).
    pub max_delay: Duration,
    /// Attempts per batch on retryable sink errors (default 5) before
    /// [`Shipper::run`] returns the error, still holding the batch.
    pub attempts: u32,
    /// First pause between attempts (default 100 ms); it grows exponentially, with
    /// jitter, up to `max_backoff`.
    pub backoff: Duration,
    /// Longest pause between attempts (default 10 s).
    pub max_backoff: Duration,
}

impl Default for ShipConfig {
    fn default() -> Self {
        ShipConfig {
            max_batch: 2048,
            max_batch_bytes: 1 << 20,
            max_delay: Duration::from_millis(100),
            attempts: 5,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl ShipConfig {
    /// The pauses between attempts: from `backoff`, growing exponentially to
    /// `max_backoff`, each with up to as much again of random jitter (so shippers that
    /// failed together do not retry together).
    pub fn pauses(&self) -> impl Iterator<Item = Duration> + Send {
        keelson_base::retry_pauses(self.backoff, self.max_backoff)
    }
}

/// What shipping did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShipStats {
    /// Records acknowledged by the sink.
    pub records: u64,
    /// Bytes of lines acknowledged.
    pub bytes: u64,
    /// Batches acknowledged.
    pub batches: u64,
    /// Sends retried.
    pub retries: u64,
    /// Acknowledgements the source failed to record (its checkpoint stayed behind: a
    /// restart re-sends those records, nothing is lost).
    pub ack_errors: u64,
}

/// The shipping loop for one source, holding what it read until the sink acknowledges it.
///
/// Each batch is sent, then the sink's [`Sink::flush`] acknowledges it, then the source
/// hears [`Source::ack`] and advances its checkpoint; the next batch is read while the
/// sink works on the acknowledgement. So at most one batch is unacknowledged at any
/// moment: a crash re-sends at most one batch (a duplicate), and never skips one.
///
/// A sink error that outlasts the attempts, or a source error, returns from
/// [`Shipper::run`] with the records still held ([`Shipper::held`]); the next `run`
/// sends them first, in order.
#[derive(Debug)]
pub struct Shipper {
    config: ShipConfig,
    held: Vec<Record>,
    next: Vec<Record>,
    /// Records of the source acknowledged so far (what `Source::ack` is told).
    acked: u64,
    stats: ShipStats,
    metrics: ShipMetrics,
}

impl Shipper {
    /// A shipper with `config`; [`Error::InvalidInput`] for a batch size or attempt count of 0.
    pub fn new(config: ShipConfig) -> Result<Shipper> {
        if config.max_batch == 0 || config.attempts == 0 || config.max_batch_bytes == 0 {
            return Err(Error::InvalidInput {
                field: "ship config",
                value: format!("{config:?}"),
                reason: "max_batch, max_batch_bytes and attempts must be at least 1".into(),
            });
        }
        Ok(Shipper { held: Vec::new(), next: Vec::new(), config, acked: 0, stats: ShipStats::default(), metrics: ShipMetrics::default() })
    }

    /// Keeps `metrics` up to date as well as [`Shipper::stats`].
    pub fn with_metrics(mut self, metrics: ShipMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Records read from the source and not yet acknowledged by the sink.
    pub fn held(&self) -> impl Iterator<Item = &Record> {
        self.held.iter().chain(self.next.iter())
    }

    /// What was shipped so far, over every `run`.
    pub fn stats(&self) -> &ShipStats {
        &self.stats
    }

    /// Moves every record from `source` to `sink` until the source ends; records held
    /// from an earlier run go first. A batch leaves memory only once the sink
    /// acknowledged it; a retryable error resends it after a capped, jittered pause.
    pub async fn run(&mut self, source: &mut dyn Source, sink: &dyn Sink) -> Result<ShipStats> {
        let mut ended = false;
        loop {
            if self.held.is_empty() {
                std::mem::swap(&mut self.held, &mut self.next);
            }
            if self.held.is_empty() && !ended {
                ended = fill(source, &mut self.held, &self.config).await?;
            }
            if self.held.is_empty() {
                sink.flush().await?;
                return Ok(self.stats.clone());
            }
            // Deliver `held` while reading the next batch into `next`. Once `held` is
            // acknowledged the read-ahead stops where it is (reads are cancel-safe: what
            // it read stays in `next`), so a quiet source never delays an acknowledgement.
            let Shipper { config, held, next, stats, metrics, .. } = self;
            let read_ahead = async {
                if ended || !next.is_empty() {
                    Ok(ended)
                } else {
                    fill(source, next, config).await
                }
            };
            let (delivered, read) = {
                let delivering = deliver(sink, held, config, stats, metrics);
                tokio::pin!(read_ahead, delivering);
                let mut read = None;
                loop {
                    tokio::select! {
                        biased;
                        delivered = &mut delivering => break (delivered, read),
                        r = &mut read_ahead, if read.is_none() => read = Some(r),
                    }
                }
            };
            delivered?;
            let (records, bytes) = (self.held.len() as u64, self.held.iter().map(|r| r.line.len() as u64).sum::<u64>());
            self.acked += records;
            self.stats.records += records;
            self.stats.bytes += bytes;
            self.stats.batches += 1;
            self.metrics.delivered(records, bytes);
            self.held.clear();
            if let Err(e) = source.ack(self.acked).await {
                self.stats.ack_errors += 1;
                self.metrics.ack_failed();
                tracing::warn!(sink = sink.name(), error = %e, "the source could not record an acknowledgement; a restart re-sends");
            }
            if let Some(read) = read {
                ended = read?;
            }
        }
    }
}

/// Moves every record from `source` to `sink` until the source ends: a [`Shipper`] run
/// once. On an error the records it held are dropped with it; keep a [`Shipper`] to
/// resume with them instead.
pub async fn ship(source: &mut dyn Source, sink: &dyn Sink, config: &ShipConfig) -> Result<ShipStats> {
    Shipper::new(config.clone())?.run(source, sink).await
}

/// Fills `batch` up to the batch limits, or until `max_delay` after its first record.
/// Returns whether the source ended. On a source error, what it read stays in `batch`.
async fn fill(source: &mut dyn Source, batch: &mut Vec<Record>, config: &ShipConfig) -> Result<bool> {
    let start = batch.len();
    if source.read(batch, config.max_batch).await? == 0 {
        return Ok(true);
    }
    let deadline = tokio::time::Instant::now() + config.max_delay;
    let mut bytes: usize = batch[start..].iter().map(|r| r.line.len()).sum();
    while batch.len() - start < config.max_batch && bytes < config.max_batch_bytes {
        let before = batch.len();
        match tokio::time::timeout_at(deadline, source.read(batch, config.max_batch - (before - start))).await {
            Err(_) => return Ok(false),
            Ok(read) => {
                if read? == 0 {
                    return Ok(true);
                }
            }
        }
        bytes += batch[before..].iter().map(|r| r.line.len()).sum::<usize>();
    }
    Ok(false)
}

/// Sends `batch` and waits for its acknowledgement, retrying both on retryable errors.
async fn deliver(sink: &dyn Sink, batch: &[Record], config: &ShipConfig, stats: &mut ShipStats, metrics: &ShipMetrics) -> Result<()> {
    let mut pauses = config.pauses();
    let mut attempt = 1;
    loop {
        let result = match sink.send(batch).await {
            Ok(()) => sink.flush().await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() && attempt < config.attempts => {
                tracing::warn!(sink = sink.name(), attempt, error = %e, "send failed; retrying");
                stats.retries += 1;
                metrics.retried();
                attempt += 1;
                tokio::time::sleep(pauses.next().unwrap_or(config.max_backoff)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
