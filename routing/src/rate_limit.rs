//! Per-route rate limits: a token bucket per route, refilled continuously.

use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// At most `per_second` requests a second on average, with bursts up to `burst`. Requests
/// over the limit get 429 with `Retry-After`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained requests per second (at least 1).
    pub per_second: u32,
    /// Requests allowed at once after a quiet period (at least 1).
    pub burst: u32,
}

/// The bucket behind a [`RateLimit`]. A mutex, not atomics: it is held for a few
/// arithmetic operations, only on routes that have a limit.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    limit: RateLimit,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub(crate) fn new(limit: RateLimit) -> Self {
        TokenBucket { limit, state: Mutex::new((f64::from(limit.burst), Instant::now())) }
    }

    pub(crate) fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes a token if there is one.
    pub(crate) fn try_take(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * f64::from(self.limit.per_second);
        s.0 = (s.0 + refill).min(f64::from(self.limit.burst));
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_nothing_until_refilled() {
        // A rate so low that no token comes back during the test.
        let b = TokenBucket::new(RateLimit { per_second: 1, burst: 3 });
        assert_eq!((0..5).filter(|_| b.try_take()).count(), 3);
    }
}
