//! Load balancing: which healthy endpoint of a route gets the next request.
//!
//! Every policy reads per-endpoint state ([`EndpointStats`]: requests in flight, a
//! Peak-EWMA of latency) that the proxy updates and that follows the endpoint id across
//! route updates, so a table change never resets what the balancer has learned. Picking
//! is lock-free: atomics and structures precomputed when the route changes.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::route::{Balancer, Endpoint};

/// The EWMA's time constant: an observation's weight halves in about 7 s.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// The most the past may weigh against a new, faster answer, however close together the
/// answers come. With a time-only decay, one stall of a busy endpoint (routine when the
/// proxy shares CPUs with its upstreams) kept it rated as slow as a truly slow endpoint
/// for seconds; with this cap the stall fades within a few dozen answers, while an
/// endpoint that is slow on every answer stays at its peak.
const MAX_PAST_WEIGHT: f64 = 0.9;
/// What a new endpoint's latency is assumed to be, so it is not flooded before its first
/// answer.
const DEFAULT_RTT: Duration = Duration::from_millis(1);

/// Passive health: when an endpoint is ejected after failures, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutlierPolicy {
    /// Consecutive failures (connect errors, broken exchanges) that eject (default 1).
    pub consecutive_failures: u32,
    /// First ejection; doubles with each ejection in a row (default 2 s).
    pub base_ejection: Duration,
    /// Longest ejection (default 30 s).
    pub max_ejection: Duration,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        OutlierPolicy { consecutive_failures: 1, base_ejection: Duration::from_secs(2), max_ejection: Duration::from_secs(30) }
    }
}

/// Live state of one endpoint, shared by every table version that contains it.
#[derive(Debug)]
pub struct EndpointStats {
    /// Ejected until this time (nanoseconds since `epoch`; 0: not ejected).
    ejected_until_ns: AtomicU64,
    /// Ejections in a row (the backoff exponent); reset by a success.
    ejections: AtomicU32,
    consecutive_failures: AtomicU32,
    failures_total: AtomicU64,
    in_flight: AtomicU32,
    /// Peak-EWMA of response latency, in nanoseconds.
    ewma_ns: AtomicU64,
    /// When the EWMA was last updated, in nanoseconds since `epoch`.
    stamp_ns: AtomicU64,
    /// Set by active health checks while probes fail.
    probe_down: AtomicBool,
    epoch: Instant,
}

impl Default for EndpointStats {
    fn default() -> Self {
        EndpointStats {
            ejected_until_ns: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            failures_total: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(DEFAULT_RTT.as_nanos() as u64),
            stamp_ns: AtomicU64::new(0),
            probe_down: AtomicBool::new(false),
            epoch: Instant::now(),
        }
    }
}

impl EndpointStats {
    /// Whether passive health has taken the endpoint out of rotation right now.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ns.load(Ordering::Relaxed);
        until != 0 && (self.epoch.elapsed().as_nanos() as u64) < until
    }

    /// Whether active health checks have taken the endpoint out of rotation.
    pub fn is_probe_down(&self) -> bool {
        self.probe_down.load(Ordering::Relaxed)
    }

    pub(crate) fn set_probe_down(&self, down: bool) {
        self.probe_down.store(down, Ordering::Relaxed);
    }

    /// Whether the endpoint may get traffic: neither ejected nor failing its probes.
    pub fn is_available(&self) -> bool {
        !self.is_probe_down() && !self.is_ejected()
    }

    /// Failed exchanges since the endpoint was added.
    pub fn failures_total(&self) -> u64 {
        self.failures_total.load(Ordering::Relaxed)
    }

    /// Records a failed exchange; returns whether it ejected the endpoint. An ejected
    /// endpoint comes back by itself when its time is up: the next request tries it
    /// (re-admission), and another failure ejects it for twice as long.
    pub fn record_failure(&self, policy: &OutlierPolicy) -> bool {
        self.failures_total.fetch_add(1, Ordering::Relaxed);
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < policy.consecutive_failures.max(1) || self.is_ejected() {
            return false;
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let duration = policy.base_ejection.saturating_mul(1 << n).min(policy.max_ejection);
        let until = self.epoch.elapsed().as_nanos() as u64 + duration.as_nanos() as u64;
        self.ejected_until_ns.store(until.max(1), Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        true
    }

    /// Records a successful exchange: the failure streak and ejection backoff reset.
    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The current Peak-EWMA latency.
    pub fn ewma(&self) -> Duration {
        Duration::from_nanos(self.ewma_ns.load(Ordering::Relaxed))
    }

    /// Records one response's latency: a slower one replaces the average at once (the
    /// peak), a faster one is blended in with a weight that grows with the time since the
    /// last observation and is at least `1 - MAX_PAST_WEIGHT`. Races between observations
    /// only lose an update, never corrupt.
    pub fn observe(&self, rtt: Duration) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let rtt = rtt.as_nanos() as f64;
        let prev = self.ewma_ns.load(Ordering::Relaxed) as f64;
        let last = self.stamp_ns.swap(now, Ordering::Relaxed);
        let next = if rtt > prev {
            rtt
        } else {
            let w = (-((now.saturating_sub(last)) as f64) / EWMA_DECAY.as_nanos() as f64).exp().min(MAX_PAST_WEIGHT);
            prev * w + rtt * (1.0 - w)
        };
        self.ewma_ns.store(next as u64, Ordering::Relaxed);
    }

    fn cost(&self) -> f64 {
        self.ewma_ns.load(Ordering::Relaxed) as f64 * f64::from(self.in_flight() + 1)
    }
}

/// Counts a request in flight until dropped; [`InFlight::finish`] also records latency.
#[derive(Debug)]
#[must_use = "the request counts as finished when this is dropped; hold it until the response ends"]
pub struct InFlight {
    stats: Arc<EndpointStats>,
    started: Instant,
}

impl InFlight {
    /// Starts counting a request on `stats`.
    pub fn start(stats: Arc<EndpointStats>) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { stats, started: Instant::now() }
    }

    /// The request got its response: record the latency.
    pub fn finish(self) {
        self.stats.observe(self.started.elapsed());
    }

    /// The request failed: record `penalty` as its latency, steering traffic away.
    pub fn fail(self, penalty: Duration) {
        self.stats.observe(penalty.max(self.started.elapsed()));
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// FNV-1a, then a 64-bit finalizer: stable across runs and versions (a key maps to the
/// same endpoint after a restart), and well spread even for keys that differ in one
/// character (FNV-1a alone clusters those on the ring).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Virtual nodes per unit of weight on the consistent-hash ring.
const VNODES: u32 = 40;

/// What a route precomputes for its balancer when it changes.
#[derive(Debug, Default)]
pub(crate) struct Selector {
    /// Indices of healthy endpoints.
    pub(crate) healthy: Vec<usize>,
    /// Weighted round robin: healthy indices repeated by weight, smoothly interleaved.
    schedule: Vec<usize>,
    /// Consistent hash ring: (point, endpoint index), sorted.
    ring: Vec<(u64, usize)>,
}

impl Selector {
    pub(crate) fn build(balancer: &Balancer, endpoints: &[Endpoint]) -> Selector {
        let healthy: Vec<usize> = endpoints.iter().enumerate().filter(|(_, e)| e.healthy).map(|(i, _)| i).collect();
        let mut schedule = Vec::new();
        if *balancer == Balancer::Weighted {
            // Smooth weighted round robin (nginx's), run once to a fixed sequence.
            let total: i64 = healthy.iter().map(|i| i64::from(endpoints[*i].weight)).sum();
            let mut current: Vec<i64> = vec![0; healthy.len()];
            for _ in 0..total {
                for (c, i) in current.iter_mut().zip(&healthy) {
                    *c += i64::from(endpoints[*i].weight);
                }
                if let Some((best, _)) = current.iter().enumerate().max_by_key(|(k, c)| (**c, std::cmp::Reverse(*k))) {
                    current[best] -= total;
                    schedule.push(healthy[best]);
                }
            }
        }
        let mut ring = Vec::new();
        if matches!(balancer, Balancer::ConsistentHash { .. }) {
            for &i in &healthy {
                for v in 0..VNODES * endpoints[i].weight {
                    ring.push((fnv1a(&[endpoints[i].id.as_bytes(), b"#", &v.to_le_bytes()]), i));
                }
            }
            ring.sort_unstable();
        }
        Selector { healthy, schedule, ring }
    }

    /// The endpoint index for the next request: the policy's choice, or if passive health
    /// ejected it or active health took it down, the next healthy endpoint that is
    /// available. If none is, that is ignored (better a likely failure than a certain
    /// one, as Envoy's panic threshold does).
    pub(crate) fn pick(
        &self,
        balancer: &Balancer,
        cursor: &AtomicUsize,
        stats: &[Arc<EndpointStats>],
        key: Option<&[u8]>,
    ) -> Option<usize> {
        let first = self.choose(balancer, cursor, stats, key)?;
        if stats[first].is_available() {
            return Some(first);
        }
        let at = self.healthy.iter().position(|i| *i == first).unwrap_or(0);
        let n = self.healthy.len();
        Some((1..n).map(|k| self.healthy[(at + k) % n]).find(|i| stats[*i].is_available()).unwrap_or(first))
    }

    fn choose(&self, balancer: &Balancer, cursor: &AtomicUsize, stats: &[Arc<EndpointStats>], key: Option<&[u8]>) -> Option<usize> {
        let n = self.healthy.len();
        if n == 0 {
            return None;
        }
        let turn = cursor.fetch_add(1, Ordering::Relaxed);
        match balancer {
            Balancer::RoundRobin => Some(self.healthy[turn % n]),
            Balancer::Weighted => self.schedule.get(turn % self.schedule.len().max(1)).copied(),
            Balancer::LeastRequests | Balancer::PeakEwma => {
                if n == 1 {
                    return Some(self.healthy[0]);
                }
                let r = mix(turn as u64);
                let a = (r % n as u64) as usize;
                let mut b = ((r >> 32) % (n as u64 - 1)) as usize;
                if b >= a {
                    b += 1;
                }
                let (a, b) = (self.healthy[a], self.healthy[b]);
                let better = if *balancer == Balancer::LeastRequests {
                    if stats[b].in_flight() < stats[a].in_flight() {
                        b
                    } else {
                        a
                    }
                } else if stats[b].cost() < stats[a].cost() {
                    b
                } else {
                    a
                };
                Some(better)
            }
            Balancer::ConsistentHash { .. } => {
                let Some(key) = key else { return Some(self.healthy[turn % n]) };
                let h = fnv1a(&[key]);
                let start = self.ring.partition_point(|(p, _)| *p < h);
                let total: u64 = self.healthy.iter().map(|i| u64::from(stats[*i].in_flight())).sum();
                // Bounded load: no endpoint takes more than 1.25 × its fair share.
                let cap = ((total + 1) as f64 * 1.25 / n as f64).ceil() as u64;
                let len = self.ring.len();
                (0..len)
                    .map(|k| self.ring[(start + k) % len].1)
                    .find(|i| u64::from(stats[*i].in_flight()) < cap)
                    .or(Some(self.ring[start % len].1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_fades_within_dozens_of_answers_even_when_they_come_back_to_back() {
        let stats = EndpointStats::default();
        stats.observe(Duration::from_micros(100));
        stats.observe(Duration::from_millis(5));
        assert_eq!(stats.ewma(), Duration::from_millis(5), "a slower answer is taken at once (the peak)");
        for _ in 0..40 {
            stats.observe(Duration::from_micros(100));
        }
        assert!(stats.ewma() < Duration::from_micros(200), "the stall still counts: {:?}", stats.ewma());
    }

    #[test]
    fn an_endpoint_slow_on_every_answer_stays_at_its_peak() {
        let stats = EndpointStats::default();
        for _ in 0..100 {
            stats.observe(Duration::from_millis(5));
        }
        assert!(stats.ewma() >= Duration::from_millis(5), "{:?}", stats.ewma());
        assert!(stats.cost() > EndpointStats::default().cost() * 4.0, "slower than a new endpoint's default");
    }
}
