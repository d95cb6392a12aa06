//! Active health checks that set instance health through any [`Discovery`].
//!
//! A check runs every `interval`; `fall` consecutive failures mark the instance critical,
//! `rise` consecutive passes mark it passing again (HAProxy's rise/fall). Health is only
//! written when it changes, so a steady instance costs the backend nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::discovery::{Discovery, Health};
use crate::error::{Error, Result};
use crate::name::ServiceName;

/// What to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Probe {
    /// A TCP connect succeeds.
    Tcp(SocketAddr),
    /// An HTTP GET answers with a status in `200..400`.
    #[cfg(feature = "http-check")]
    Http {
        /// Address to connect to.
        addr: SocketAddr,
        /// Path and query, starting with `/`.
        path: String,
    },
}

/// How often and how strictly to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckConfig {
    /// Time between probes (default 1 s).
    pub interval: Duration,
    /// Time one probe may take (default 1 s).
    pub timeout: Duration,
    /// Consecutive passes to become passing (default 2).
    pub rise: u32,
    /// Consecutive failures to become critical (default 2).
    pub fall: u32,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig { interval: Duration::from_secs(1), timeout: Duration::from_secs(1), rise: 2, fall: 2 }
    }
}

impl CheckConfig {
    fn validate(&self) -> Result<()> {
        if self.interval.is_zero() || self.timeout.is_zero() {
            return Err(Error::InvalidInput {
                field: "check interval/timeout",
                value: format!("{:?}/{:?}", self.interval, self.timeout),
                reason: "must be positive".into(),
            });
        }
        if self.rise == 0 || self.fall == 0 {
            return Err(Error::InvalidInput {
                field: "check rise/fall",
                value: format!("{}/{}", self.rise, self.fall),
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// Runs one probe once.
pub async fn probe_once(probe: &Probe, timeout: Duration) -> bool {
    let attempt = async {
        match probe {
            Probe::Tcp(addr) => tokio::net::TcpStream::connect(addr).await.is_ok(),
            #[cfg(feature = "http-check")]
            Probe::Http { addr, path } => http_get_ok(*addr, path).await,
        }
    };
    tokio::time::timeout(timeout, attempt).await.unwrap_or(false)
}

#[cfg(feature = "http-check")]
async fn http_get_ok(addr: SocketAddr, path: &str) -> bool {
    use http_body_util::{BodyExt, Empty};
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else { return false };
    let io = hyper_util::rt::TokioIo::new(stream);
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake::<_, Empty<hyper::body::Bytes>>(io).await else { return false };
    let conn = tokio::spawn(conn);
    let request =
        http::Request::get(path).header(http::header::HOST, addr.to_string()).header("user-agent", "keelson-health/0.1").body(Empty::new());
    let ok = match request {
        Ok(req) => match sender.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                // Drain so the server sees a complete exchange.
                let _ = resp.into_body().collect().await;
                (200..400).contains(&status.as_u16())
            }
            Err(_) => false,
        },
        Err(_) => false,
    };
    conn.abort();
    ok
}

/// A running check; dropping it stops the check.
#[derive(Debug)]
#[must_use = "the checks stop when the handle is dropped"]
pub struct HealthChecker {
    task: JoinHandle<()>,
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HealthChecker {
    /// Starts probing for instance `id` of `service`, writing health changes to `discovery`.
    /// The instance starts in whatever health it was registered with.
    pub fn spawn(discovery: Arc<dyn Discovery>, service: ServiceName, id: String, probe: Probe, config: CheckConfig) -> Result<Self> {
        config.validate()?;
        crate::name::validate_instance_id(&id)?;
        let task = tokio::spawn(async move {
            let mut state = RiseFall::new(config.rise, config.fall);
            let mut ticker = tokio::time::interval(config.interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let ok = probe_once(&probe, config.timeout).await;
                if let Some(health) = state.observe(ok) {
                    tracing::info!(%service, %id, ?health, "health changed");
                    if let Err(e) = discovery.set_health(&service, &id, health).await {
                        tracing::warn!(%service, %id, error = %e, "could not record health");
                        // Try again at the next change-worthy observation.
                        state.forget();
                    }
                }
            }
        });
        Ok(HealthChecker { task })
    }
}

/// Rise/fall hysteresis. `observe` returns the new health when it changes.
#[derive(Debug, Clone)]
pub struct RiseFall {
    rise: u32,
    fall: u32,
    passes: u32,
    failures: u32,
    reported: Option<Health>,
}

impl RiseFall {
    /// Starts with no health reported.
    pub fn new(rise: u32, fall: u32) -> Self {
        RiseFall { rise, fall, passes: 0, failures: 0, reported: None }
    }

    /// Records one probe result.
    pub fn observe(&mut self, ok: bool) -> Option<Health> {
        if ok {
            self.passes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.passes = 0;
        }
        let next = if self.passes >= self.rise {
            Health::Passing
        } else if self.failures >= self.fall {
            Health::Critical
        } else {
            return None;
        };
        (self.reported != Some(next)).then(|| {
            self.reported = Some(next);
            next
        })
    }

    fn forget(&mut self) {
        self.reported = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_fall_hysteresis() {
        let mut rf = RiseFall::new(2, 3);
        assert_eq!(rf.observe(true), None);
        assert_eq!(rf.observe(true), Some(Health::Passing));
        assert_eq!(rf.observe(true), None, "no repeat report");
        assert_eq!(rf.observe(false), None);
        assert_eq!(rf.observe(false), None);
        assert_eq!(rf.observe(true), None, "a pass resets the failure count");
        assert_eq!(rf.observe(false), None);
        assert_eq!(rf.observe(false), None);
        assert_eq!(rf.observe(false), Some(Health::Critical));
        assert_eq!(rf.observe(true), None);
        assert_eq!(rf.observe(true), Some(Health::Passing));
    }

    #[test]
    fn rejects_zero_thresholds() {
        let cfg = CheckConfig { rise: 0, ..CheckConfig::default() };
        assert!(matches!(cfg.validate(), Err(Error::InvalidInput { .. })));
    }
}
