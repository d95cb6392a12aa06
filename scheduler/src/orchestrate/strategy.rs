//! Deployment strategies and the health gates every strategy passes through.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How a task group moves from one version to the next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Strategy {
    /// Stop every old allocation, then start the new ones (downtime, no overlap).
    Recreate,
    /// Replace allocations a few at a time: at most `count + max_surge` run at once and at
    /// least `count - max_unavailable` are healthy.
    Rolling {
        /// Extra allocations allowed above `count` during the update.
        max_surge: u32,
        /// Allocations allowed below `count` healthy during the update.
        max_unavailable: u32,
    },
    /// Start `canaries` new allocations beside the full old set; once they are healthy,
    /// promote (automatically or by [`crate::Deployment::promote`]) and roll the rest.
    Canary {
        /// New allocations started first.
        canaries: u32,
        /// Promote as soon as the canaries pass their gates.
        auto_promote: bool,
        /// Surge of the rolling phase after promotion.
        max_surge: u32,
        /// Unavailability allowed in the rolling phase after promotion.
        max_unavailable: u32,
    },
    /// Start a full new set beside the old one, switch traffic to it when all of it is
    /// healthy, and keep the old set for `rollback_window` before stopping it.
    BlueGreen {
        /// How long the old set stays after the switch, ready to take traffic back.
        #[serde(with = "crate::records::humantime_serde_compat")]
        rollback_window: Duration,
    },
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy::Rolling { max_surge: 1, max_unavailable: 0 }
    }
}

/// What a new allocation must show before a deployment counts it, and how long the
/// deployment may take.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Gates {
    /// An allocation counts as healthy once its checks have passed for this long.
    #[serde(with = "crate::records::humantime_serde_compat")]
    pub min_healthy_time: Duration,
    /// An allocation that is not healthy this long after it was placed fails the gate
    /// (a canary that never starts fails here instead of stalling the deployment).
    #[serde(with = "crate::records::humantime_serde_compat")]
    pub healthy_deadline: Duration,
    /// The deployment fails if no further allocation becomes healthy for this long.
    #[serde(with = "crate::records::humantime_serde_compat")]
    pub progress_deadline: Duration,
    /// Return to the last stable version when a gate fails.
    pub auto_rollback: bool,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            min_healthy_time: Duration::from_secs(10),
            healthy_deadline: Duration::from_secs(5 * 60),
            progress_deadline: Duration::from_secs(10 * 60),
            auto_rollback: true,
        }
    }
}

impl Gates {
    /// Checks that the deadlines can be met at all.
    pub fn validate(&self) -> Result<()> {
        if self.healthy_deadline <= self.min_healthy_time {
            return Err(Error::invalid(
                "healthy_deadline",
                format!("{:?}", self.healthy_deadline),
                format!("must exceed min_healthy_time ({:?})", self.min_healthy_time),
            ));
        }
        if self.progress_deadline < self.healthy_deadline {
            return Err(Error::invalid(
                "progress_deadline",
                format!("{:?}", self.progress_deadline),
                format!("must be at least healthy_deadline ({:?})", self.healthy_deadline),
            ));
        }
        Ok(())
    }
}

impl Strategy {
    /// Checks that the strategy can make progress.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Strategy::Rolling { max_surge: 0, max_unavailable: 0 } | Strategy::Canary { max_surge: 0, max_unavailable: 0, .. } => {
                Err(Error::invalid("strategy", "max_surge 0, max_unavailable 0", "one of them must be at least 1 or nothing can move"))
            }
            Strategy::Canary { canaries: 0, .. } => Err(Error::invalid("canaries", "0", "a canary strategy needs at least one canary")),
            _ => Ok(()),
        }
    }

    /// The strategy to use when the group mounts a single-writer volume: old and new
    /// allocations can never run at once (they would both want the volume, the surge
    /// deadlock of Azure/AKS#1919), so every strategy that overlaps them becomes a
    /// stop-first rolling update. Returns the strategy and, if it changed, why.
    pub fn for_single_writer(&self) -> (Strategy, Option<String>) {
        let stop_first = |unavailable: u32| Strategy::Rolling { max_surge: 0, max_unavailable: unavailable.max(1) };
        match *self {
            Strategy::Recreate | Strategy::Rolling { max_surge: 0, .. } => (self.clone(), None),
            Strategy::Rolling { max_unavailable, .. } => {
                (stop_first(max_unavailable), Some("single-writer volume: rolling update made stop-first (max_surge 0)".into()))
            }
            Strategy::Canary { max_unavailable, .. } => (
                stop_first(max_unavailable),
                Some("single-writer volume: a canary cannot run beside the old set; stop-first rolling update".into()),
            ),
            Strategy::BlueGreen { .. } => {
                (stop_first(1), Some("single-writer volume: a green set cannot run beside the blue one; stop-first rolling update".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_that_cannot_move_are_rejected() {
        assert!(Strategy::Rolling { max_surge: 0, max_unavailable: 0 }.validate().is_err());
        assert!(Strategy::Canary { canaries: 0, auto_promote: true, max_surge: 1, max_unavailable: 0 }.validate().is_err());
        assert!(Strategy::default().validate().is_ok());
        let gates = Gates { healthy_deadline: Duration::from_secs(5), min_healthy_time: Duration::from_secs(5), ..Gates::default() };
        assert!(matches!(gates.validate(), Err(Error::InvalidInput { field: "healthy_deadline", .. })));
        let gates = Gates { progress_deadline: Duration::from_secs(1), ..Gates::default() };
        assert!(matches!(gates.validate(), Err(Error::InvalidInput { field: "progress_deadline", .. })));
    }

    #[test]
    fn a_single_writer_volume_makes_every_overlapping_strategy_stop_first() {
        let cases = [
            Strategy::Rolling { max_surge: 2, max_unavailable: 0 },
            Strategy::Canary { canaries: 1, auto_promote: false, max_surge: 1, max_unavailable: 0 },
            Strategy::BlueGreen { rollback_window: Duration::from_secs(60) },
        ];
        for s in cases {
            let (adjusted, why) = s.for_single_writer();
            assert_eq!(adjusted, Strategy::Rolling { max_surge: 0, max_unavailable: 1 }, "{s:?}");
            assert!(why.is_some_and(|w| w.contains("single-writer")));
        }
        assert_eq!(Strategy::Recreate.for_single_writer(), (Strategy::Recreate, None));
    }

    #[test]
    fn strategies_read_from_json_with_durations_as_text() {
        let s: Strategy = serde_json::from_str(r#"{"kind": "blue_green", "rollback_window": "5m"}"#).expect("parse");
        assert_eq!(s, Strategy::BlueGreen { rollback_window: Duration::from_secs(300) });
        // Strategies are stored (tolerant); in a file a person wrote, a typo is an error.
        let typo = r#"{"kind": "rolling", "max_surge": 1, "max_unavailable": 0, "typo": 1}"#;
        assert!(crate::records::parse_strict::<Strategy>("deploy file", typo).is_err());
        assert!(serde_json::from_str::<Strategy>(r#"{"kind": "blue_green", "rollback_window": "soon"}"#).is_err());
    }
}
