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
/// for seconds; with this cap a stall fades within a few answers, while an endpoint that
/// is slow on every answer stays at its peak.
const MAX_PAST_WEIGHT: f64 = 0.5;
/// What a new endpoint's latency is assumed to be, so it is not flooded before its first
/// answer.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// How fast a peak is forgotten, in picks of the route: the part of an endpoint's peak
/// above its base halves with every pick of the route since the peak was raised,
/// whether or not this endpoint was picked. Counted in picks, not time, so the horizon
/// follows the request rate. Before, a fast endpoint that stalled once was re-measured
/// only when picked, which Power-of-two-choices does only against something costlier, so
/// under load it sat out at its peak while a truly slow endpoint took its traffic (29%
/// of picks with latencies fed in). The peak still steers the next picks away at once;
/// what an endpoint is like over many answers is its base, and what it is like right now
/// shows in its requests in flight. With a longer horizon the slow endpoint's share grows
/// with it: 3.7% at 8 picks, 13% at 32 in the test below.
const STALE_PEAK_HALF_LIFE: f64 = 1.0;
/// The base's weight for each answer: a plain EWMA over about the last ten answers, the
/// level a stale peak falls back to. A fast endpoint's base stays fast through the odd
/// stall; a slow endpoint's base is slow, so it stays avoided without new answers.
const BASE_WEIGHT: f64 = 0.1;
/// One pick in this many goes round robin (exploration), so an endpoint whose base is
/// slow is measured again now and then and comes back once it is fast. Its cost: a slow
/// endpoint of n gets at least 1/(EXPLORE × n) of the picks (0.1% of four).
const EXPLORE: usize = 256;

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
    /// A plain EWMA of latency in nanoseconds, where a stale peak falls back to; 0 until
    /// the first answer, which sets it (a default would be what a rarely picked slow
    /// endpoint's stale peak fell back to).
    base_ns: AtomicU64,
    /// The route's pick counter when this endpoint was last picked.
    picked_at: AtomicU64,
    /// The route's pick counter (as of the endpoint's last pick) when the peak was last
    /// raised by a slower answer: how old the peak is, in picks.
    peak_at: AtomicU64,
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
            base_ns: AtomicU64::new(0),
            picked_at: AtomicU64::new(0),
            peak_at: AtomicU64::new(0),
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
            self.peak_at.store(self.picked_at.load(Ordering::Relaxed), Ordering::Relaxed);
            rtt
        } else {
            let w = (-((now.saturating_sub(last)) as f64) / EWMA_DECAY.as_nanos() as f64).exp().min(MAX_PAST_WEIGHT);
            prev * w + rtt * (1.0 - w)
        };
        self.ewma_ns.store(next as u64, Ordering::Relaxed);
        let base = self.base_ns.load(Ordering::Relaxed) as f64;
        let base = if base == 0.0 { rtt } else { base * (1.0 - BASE_WEIGHT) + rtt * BASE_WEIGHT };
        self.base_ns.store((base as u64).max(1), Ordering::Relaxed);
    }

    /// The latency a pick at `turn` expects: the peak, with the part above the base
    /// halving for every [`STALE_PEAK_HALF_LIFE`] picks since the peak was raised.
    fn expected_latency(&self, turn: u64) -> f64 {
        let peak = self.ewma_ns.load(Ordering::Relaxed) as f64;
        let base = self.base_ns.load(Ordering::Relaxed) as f64;
        if base == 0.0 || peak <= base {
            return peak;
        }
        let age = turn.saturating_sub(self.peak_at.load(Ordering::Relaxed)) as f64;
        base + (peak - base) * (-age / STALE_PEAK_HALF_LIFE * std::f64::consts::LN_2).exp()
    }

    fn cost(&self, turn: u64) -> f64 {
        self.expected_latency(turn) * f64::from(self.in_flight() + 1)
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
        let turn = cursor.fetch_add(1, Ordering::Relaxed);
        let first = self.choose(balancer, turn, stats, key)?;
        let picked = if stats[first].is_available() {
            first
        } else {
            let at = self.healthy.iter().position(|i| *i == first).unwrap_or(0);
            let n = self.healthy.len();
            (1..n).map(|k| self.healthy[(at + k) % n]).find(|i| stats[*i].is_available()).unwrap_or(first)
        };
        stats[picked].picked_at.store(turn as u64, Ordering::Relaxed);
        Some(picked)
    }

    fn choose(&self, balancer: &Balancer, turn: usize, stats: &[Arc<EndpointStats>], key: Option<&[u8]>) -> Option<usize> {
        let n = self.healthy.len();
        if n == 0 {
            return None;
        }
        match balancer {
            Balancer::RoundRobin => Some(self.healthy[turn % n]),
            Balancer::Weighted => self.schedule.get(turn % self.schedule.len().max(1)).copied(),
            Balancer::LeastRequests | Balancer::PeakEwma => {
                if n == 1 {
                    return Some(self.healthy[0]);
                }
                if *balancer == Balancer::PeakEwma && turn % EXPLORE == EXPLORE - 1 {
                    return Some(self.healthy[(turn / EXPLORE) % n]);
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
                } else if stats[b].cost(turn as u64) < stats[a].cost(turn as u64) {
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
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::net::SocketAddr;

    /// Share of picks that go to a 5 ms endpoint among three 200 µs endpoints, each of
    /// which stalls for 10 ms on one answer in 40, with `clients` closed-loop clients on a
    /// virtual clock: latencies are fed in and nothing is timed, so the result is the same
    /// on a loaded machine.
    fn slow_share(balancer: Balancer, clients: usize, requests: usize) -> f64 {
        let endpoints: Vec<Endpoint> =
            (0..4u16).map(|i| Endpoint::new(format!("e{i}"), SocketAddr::from(([127, 0, 0, 1], 9000 + i)))).collect();
        let selector = Selector::build(&balancer, &endpoints);
        let stats: Vec<Arc<EndpointStats>> = (0..4).map(|_| Arc::new(EndpointStats::default())).collect();
        let cursor = AtomicUsize::new(0);
        let mut answers = [0usize; 4];
        let mut guards: Vec<Option<InFlight>> = (0..clients).map(|_| None).collect();
        // Answers due, earliest first: (virtual time in µs, client, latency in µs).
        let mut due: BinaryHeap<Reverse<(u64, usize, u64)>> = BinaryHeap::new();
        let mut send = |now: u64, client: usize, guards: &mut Vec<Option<InFlight>>, due: &mut BinaryHeap<_>| {
            let i = selector.pick(&balancer, &cursor, &stats, None).expect("an endpoint");
            answers[i] += 1;
            let latency = match i {
                3 => 5_000,
                _ if answers[i] % 40 == i * 13 => 10_000,
                _ => 200,
            };
            guards[client] = Some(InFlight::start(stats[i].clone()));
            due.push(Reverse((now + latency, client, latency)));
        };
        for client in 0..clients {
            send(0, client, &mut guards, &mut due);
        }
        let mut sent = clients;
        while let Some(Reverse((now, client, latency))) = due.pop() {
            let guard = guards[client].take().expect("in flight");
            guard.stats.observe(Duration::from_micros(latency));
            drop(guard);
            if sent < requests {
                send(now, client, &mut guards, &mut due);
                sent += 1;
            }
        }
        answers[3] as f64 / requests as f64
    }

    #[test]
    fn peak_ewma_keeps_a_5ms_endpoint_of_four_under_one_percent_where_least_requests_does_not() {
        for clients in [1, 4, 16] {
            let peak = slow_share(Balancer::PeakEwma, clients, 20_000);
            let least = slow_share(Balancer::LeastRequests, clients, 20_000);
            eprintln!("{clients} clients: Peak-EWMA {:.2}%, least requests {:.2}%", peak * 100.0, least * 100.0);
            assert!(peak <= 0.01, "{clients} clients: Peak-EWMA sent {:.2}% to the slow endpoint", peak * 100.0);
            // Least requests sees slowness only as requests piling up: 4–25% here.
            assert!(least > 0.02, "{clients} clients: least requests sent only {:.2}%: the test no longer tells them apart", least * 100.0);
        }
    }

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
        assert!(stats.cost(1000) > EndpointStats::default().cost(1000) * 4.0, "slower than a new endpoint's default");
    }
}
