//! This process's memory, for tests that bound what a workload may make it hold.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The resident set size of this process, in bytes (`VmRSS` of `/proc/self/status`; 0
/// where that cannot be read).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Samples the resident set size every `every` from its start, keeping the peak; stops
/// when dropped.
#[derive(Debug)]
pub struct PeakRss {
    before: u64,
    peak: Arc<AtomicU64>,
    sampler: tokio::task::JoinHandle<()>,
}

impl PeakRss {
    /// Starts sampling (on the current Tokio runtime).
    pub fn start(every: Duration) -> PeakRss {
        let before = rss_bytes();
        let peak = Arc::new(AtomicU64::new(before));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                    tokio::time::sleep(every).await;
                }
            })
        };
        PeakRss { before, peak, sampler }
    }

    /// How far the peak rose above the size at the start, in bytes.
    pub fn growth(&self) -> u64 {
        self.peak.load(Ordering::Relaxed).max(rss_bytes()).saturating_sub(self.before)
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.sampler.abort();
    }
}
