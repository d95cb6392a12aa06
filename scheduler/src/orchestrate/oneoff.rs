//! One-off (batch) runs: start once, stop at the time limit, keep the exit status.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::orchestrate::deployment::Millis;

/// What the node agent reports of a one-off allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunObserved {
    /// Nothing placed yet.
    Absent,
    /// Running since `since`.
    Running {
        /// When it started.
        since: Millis,
    },
    /// Exited by itself (`code`), or by a signal (`None`).
    Exited {
        /// The exit code.
        code: Option<i32>,
    },
}

/// How a one-off run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunOutcome {
    /// Exit code 0.
    Succeeded,
    /// Another exit code, or a signal.
    Failed {
        /// The exit code, if any.
        code: Option<i32>,
    },
    /// Stopped at the time limit.
    TimedOut,
}

/// What the run needs done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunAction {
    /// Place and start the task.
    Start,
    /// Stop it: the time limit passed.
    Stop,
}

/// A one-off run with a time limit. The outcome is kept once known, whatever is observed
/// afterwards; the task's output stays with its driver (see [`crate::OUTPUT_TAIL`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OneOffRun {
    time_limit: Duration,
    started: bool,
    timed_out: bool,
    outcome: Option<RunOutcome>,
}

impl OneOffRun {
    /// A run that may last `time_limit`.
    pub fn new(time_limit: Duration) -> Self {
        OneOffRun { time_limit, started: false, timed_out: false, outcome: None }
    }

    /// How it ended, once it has.
    pub fn outcome(&self) -> Option<RunOutcome> {
        self.outcome
    }

    /// What to do now.
    pub fn step(&mut self, observed: RunObserved, now: Millis) -> Option<RunAction> {
        if self.outcome.is_some() {
            return None;
        }
        match observed {
            // Started once only: a run that vanished after starting is not re-run.
            RunObserved::Absent if !self.started => {
                self.started = true;
                Some(RunAction::Start)
            }
            RunObserved::Absent => {
                self.outcome = Some(if self.timed_out { RunOutcome::TimedOut } else { RunOutcome::Failed { code: None } });
                None
            }
            RunObserved::Running { since } => {
                self.started = true;
                let limit = u64::try_from(self.time_limit.as_millis()).unwrap_or(u64::MAX);
                if now.saturating_sub(since) >= limit {
                    self.timed_out = true;
                    Some(RunAction::Stop)
                } else {
                    None
                }
            }
            RunObserved::Exited { code } => {
                self.outcome = Some(match (self.timed_out, code) {
                    (true, _) => RunOutcome::TimedOut,
                    (false, Some(0)) => RunOutcome::Succeeded,
                    (false, code) => RunOutcome::Failed { code },
                });
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_starts_once_and_keeps_its_exit_status() {
        let mut run = OneOffRun::new(Duration::from_secs(10));
        assert_eq!(run.step(RunObserved::Absent, 0), Some(RunAction::Start));
        assert_eq!(run.step(RunObserved::Running { since: 5 }, 1_000), None);
        assert_eq!(run.step(RunObserved::Exited { code: Some(3) }, 2_000), None);
        assert_eq!(run.outcome(), Some(RunOutcome::Failed { code: Some(3) }));
        assert_eq!(run.step(RunObserved::Absent, 3_000), None, "never re-run");
        assert_eq!(run.outcome(), Some(RunOutcome::Failed { code: Some(3) }), "the outcome is kept");
    }

    #[test]
    fn a_run_past_its_time_limit_is_stopped_and_counted_as_timed_out() {
        let mut run = OneOffRun::new(Duration::from_secs(10));
        assert_eq!(run.step(RunObserved::Absent, 0), Some(RunAction::Start));
        assert_eq!(run.step(RunObserved::Running { since: 100 }, 10_099), None);
        assert_eq!(run.step(RunObserved::Running { since: 100 }, 10_100), Some(RunAction::Stop));
        // Stopped by SIGTERM: its exit code does not make it a success.
        assert_eq!(run.step(RunObserved::Exited { code: Some(0) }, 10_200), None);
        assert_eq!(run.outcome(), Some(RunOutcome::TimedOut));
    }

    #[test]
    fn a_clean_exit_succeeds_and_a_vanished_run_fails() {
        let mut run = OneOffRun::new(Duration::from_secs(10));
        run.step(RunObserved::Absent, 0);
        run.step(RunObserved::Exited { code: Some(0) }, 50);
        assert_eq!(run.outcome(), Some(RunOutcome::Succeeded));
        let mut lost = OneOffRun::new(Duration::from_secs(10));
        lost.step(RunObserved::Absent, 0);
        lost.step(RunObserved::Running { since: 0 }, 10);
        lost.step(RunObserved::Absent, 20);
        assert_eq!(lost.outcome(), Some(RunOutcome::Failed { code: None }));
    }
}
