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

/// A token bucket refilled continuously at `rate` tokens a second up to `capacity`, which
/// callers can also top up ([`TokenBucket::deposit`]). Behind per-route rate limits and
/// the proxy's retry budget. A mutex, not atomics: it is held for a few arithmetic
/// operations.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    capacity: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64, capacity: f64, initial: f64) -> Self {
        TokenBucket { rate, capacity, state: Mutex::new((initial.min(capacity), Instant::now())) }
    }

    /// The bucket of a rate limit: full at first.
    pub(crate) fn for_limit(limit: RateLimit) -> Self {
        TokenBucket::new(f64::from(limit.per_second), f64::from(limit.burst), f64::from(limit.burst))
    }

    /// Takes a token if there is one.
    pub(crate) fn try_take(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(self.capacity);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }

    /// Adds `tokens`, up to the capacity.
    pub(crate) fn deposit(&self, tokens: f64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = (s.0 + tokens).min(self.capacity);
    }
}

/// A route's [`RateLimit`] with its bucket.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    pub(crate) limit: RateLimit,
    pub(crate) bucket: TokenBucket,
}

impl RateLimiter {
    pub(crate) fn new(limit: RateLimit) -> Self {
        RateLimiter { limit, bucket: TokenBucket::for_limit(limit) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_nothing_until_refilled() {
        // A rate so low that no token comes back during the test.
        let b = TokenBucket::for_limit(RateLimit { per_second: 1, burst: 3 });
        assert_eq!((0..5).filter(|_| b.try_take()).count(), 3);
    }

    #[test]
    fn deposits_add_tokens_up_to_the_capacity() {
        let b = TokenBucket::new(0.0, 2.0, 0.0);
        assert!(!b.try_take());
        b.deposit(0.5);
        assert!(!b.try_take(), "half a token is not a token");
        b.deposit(10.0);
        assert_eq!((0..5).filter(|_| b.try_take()).count(), 2, "capped at the capacity");
    }
}
