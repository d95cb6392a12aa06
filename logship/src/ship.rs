//! The shipping loop: source to sink in batches, acknowledged before moving on.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::record::Record;
use crate::sink::Sink;
use crate::source::Source;

/// Batching and retry settings.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShipConfig {
    /// Records per batch at most (default 512).
    pub max_batch: usize,
    /// How long a partial batch may wait for more records (default 200 ms).
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
            max_batch: 512,
            max_delay: Duration::from_millis(200),
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
pub struct ShipStats {
    /// Records acknowledged by the sink.
    pub records: u64,
    /// Batches sent.
    pub batches: u64,
    /// Sends retried.
    pub retries: u64,
}

/// The shipping loop, holding what it read until the sink acknowledges it: a sink error
/// that outlasts the attempts, or a source error mid-batch, returns from
/// [`Shipper::run`] with the records still held ([`Shipper::held`]), and the next `run`
/// sends them first, in order. Delivery is at least once: a batch the sink stored but
/// failed to acknowledge is sent again.
#[derive(Debug)]
pub struct Shipper {
    config: ShipConfig,
    held: Vec<Record>,
    stats: ShipStats,
}

impl Shipper {
    /// A shipper with `config`; [`Error::InvalidInput`] for a batch size or attempt count of 0.
    pub fn new(config: ShipConfig) -> Result<Shipper> {
        if config.max_batch == 0 || config.attempts == 0 {
            return Err(Error::InvalidInput {
                field: "ship config",
                value: format!("{config:?}"),
                reason: "max_batch and attempts must be at least 1".into(),
            });
        }
        Ok(Shipper { held: Vec::with_capacity(config.max_batch), config, stats: ShipStats::default() })
    }

    /// Records read from the source and not yet acknowledged by the sink.
    pub fn held(&self) -> &[Record] {
        &self.held
    }

    /// What was shipped so far, over every `run`.
    pub fn stats(&self) -> &ShipStats {
        &self.stats
    }

    /// Moves every record from `source` to `sink` until the source ends, then flushes;
    /// records held from an earlier run go first. A batch leaves memory only once the
    /// sink acknowledged it; a retryable error resends it after a capped, jittered pause.
    pub async fn run(&mut self, source: &mut dyn Source, sink: &dyn Sink) -> Result<ShipStats> {
        loop {
            let ended = if self.held.is_empty() { fill(source, &mut self.held, &self.config).await? } else { false };
            if !self.held.is_empty() {
                send_with_retry(sink, &self.held, &self.config, &mut self.stats).await?;
                self.stats.records += self.held.len() as u64;
                self.stats.batches += 1;
                self.held.clear();
            }
            if ended {
                sink.flush().await?;
                return Ok(self.stats.clone());
            }
        }
    }
}

/// Moves every record from `source` to `sink` until the source ends, then flushes: a
/// [`Shipper`] run once. On an error the records it held are dropped with it; keep a
/// [`Shipper`] to resume with them instead.
pub async fn ship(source: &mut dyn Source, sink: &dyn Sink, config: &ShipConfig) -> Result<ShipStats> {
    Shipper::new(config.clone())?.run(source, sink).await
}

/// Fills `batch` up to `max_batch` or until `max_delay` after its first record. Returns
/// whether the source ended. On a source error, what it read stays in `batch`.
async fn fill(source: &mut dyn Source, batch: &mut Vec<Record>, config: &ShipConfig) -> Result<bool> {
    match source.next().await? {
        Some(r) => batch.push(r),
        None => return Ok(true),
    }
    let deadline = tokio::time::Instant::now() + config.max_delay;
    while batch.len() < config.max_batch {
        match tokio::time::timeout_at(deadline, source.next()).await {
            Err(_) => return Ok(false),
            Ok(next) => match next? {
                Some(r) => batch.push(r),
                None => return Ok(true),
            },
        }
    }
    Ok(false)
}

async fn send_with_retry(sink: &dyn Sink, batch: &[Record], config: &ShipConfig, stats: &mut ShipStats) -> Result<()> {
    let mut pauses = config.pauses();
    let mut attempt = 1;
    loop {
        match sink.send(batch).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() && attempt < config.attempts => {
                tracing::warn!(sink = sink.name(), attempt, error = %e, "send failed; retrying");
                stats.retries += 1;
                attempt += 1;
                tokio::time::sleep(pauses.next().unwrap_or(config.max_backoff)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
