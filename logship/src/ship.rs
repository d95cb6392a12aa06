//! The shipping loop: source to sink in batches, acknowledged before moving on.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::record::Record;
use crate::sink::Sink;
use crate::source::Source;

/// Batching and retry settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShipConfig {
    /// Records per batch at most (default 512).
    pub max_batch: usize,
    /// How long a partial batch may wait for more records (default 200 ms).
    pub max_delay: Duration,
    /// Attempts per batch on retryable sink errors (default 5), with doubling backoff.
    pub attempts: u32,
    /// First backoff (default 100 ms).
    pub backoff: Duration,
}

impl Default for ShipConfig {
    fn default() -> Self {
        ShipConfig { max_batch: 512, max_delay: Duration::from_millis(200), attempts: 5, backoff: Duration::from_millis(100) }
    }
}

/// What a finished shipment did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShipStats {
    /// Records acknowledged by the sink.
    pub records: u64,
    /// Batches sent.
    pub batches: u64,
    /// Sends retried.
    pub retries: u64,
}

/// Moves every record from `source` to `sink` until the source ends, then flushes. A
/// batch is only dropped from memory after the sink acknowledged it; a retryable sink
/// error resends the same batch, so delivery is at least once. A non-retryable error, or
/// running out of attempts, stops shipping and returns the error.
pub async fn ship(source: &mut dyn Source, sink: &dyn Sink, config: &ShipConfig) -> Result<ShipStats> {
    if config.max_batch == 0 || config.attempts == 0 {
        return Err(Error::InvalidInput {
            field: "ship config",
            value: format!("{config:?}"),
            reason: "max_batch and attempts must be at least 1".into(),
        });
    }
    let mut stats = ShipStats::default();
    let mut batch: Vec<Record> = Vec::with_capacity(config.max_batch);
    loop {
        let ended = fill(source, &mut batch, config).await?;
        if !batch.is_empty() {
            send_with_retry(sink, &batch, config, &mut stats).await?;
            stats.records += batch.len() as u64;
            stats.batches += 1;
            batch.clear();
        }
        if ended {
            sink.flush().await?;
            return Ok(stats);
        }
    }
}

/// Fills `batch` up to `max_batch` or until `max_delay` after its first record. Returns
/// whether the source ended.
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
    let mut delay = config.backoff;
    let mut attempt = 1;
    loop {
        match sink.send(batch).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() && attempt < config.attempts => {
                tracing::warn!(sink = sink.name(), attempt, error = %e, "send failed; retrying");
                stats.retries += 1;
                attempt += 1;
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2);
            }
            Err(e) => return Err(e),
        }
    }
}
