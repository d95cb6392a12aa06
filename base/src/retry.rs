//! One retry schedule for every loop in keelson that retries: exponential from a first
//! pause, capped, each pause with up to as much again of random jitter, so that the
//! agents of a cluster that all saw etcd go away do not all come back in the same
//! millisecond. (backon's schedule, used as an iterator inside our own loops.)

use std::time::Duration;

use backon::BackoffBuilder;

/// Pauses between attempts: `first`, then doubling up to `cap`, each plus up to as much
/// again of jitter; endless (the caller decides when to give up).
pub fn retry_pauses(first: Duration, cap: Duration) -> RetryPauses {
    RetryPauses {
        inner: backon::ExponentialBuilder::new()
            .with_jitter()
            .with_min_delay(first)
            .with_max_delay(cap.max(first))
            .without_max_times()
            .build(),
        cap: cap.max(first),
    }
}

/// The schedule [`retry_pauses`] returns.
#[derive(Debug)]
pub struct RetryPauses {
    inner: backon::ExponentialBackoff,
    cap: Duration,
}

impl Iterator for RetryPauses {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.inner.next().unwrap_or(self.cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_are_jittered_and_capped() {
        let first = Duration::from_millis(10);
        let cap = Duration::from_millis(200);
        let a: Vec<Duration> = retry_pauses(first, cap).take(20).collect();
        assert!(a.iter().all(|p| *p >= first && *p <= cap * 2), "{a:?}");
        assert!(a[10..].iter().all(|p| *p >= cap), "at the cap after a few doublings: {a:?}");
        let b: Vec<Duration> = retry_pauses(first, cap).take(20).collect();
        assert_ne!(a, b, "two loops do not retry in lock step");
    }
}
