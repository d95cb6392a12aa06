//! `--wait`: follows a group until what was asked of it is done, with a progress bar on
//! a terminal (indicatif) and one line per phase change otherwise, and says how it
//! ended.

use std::time::{Duration, Instant};

use keelson_scheduler::{AllocStatus, ClusterStore, Phase};

/// How a followed change ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The version asked for runs everywhere.
    Succeeded,
    /// It did not: rolled back or failed, with why.
    Failed(String),
    /// Still under way when the wait ran out.
    TimedOut,
}

/// Follows `job`/`group` until `version` is stable and `count` of its allocations run,
/// or its deployment ends otherwise, or `timeout` passes. Progress goes to stderr.
pub async fn follow(store: &ClusterStore, job: &str, group: &str, version: u64, timeout: Duration) -> Result<Outcome, String> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} healthy  {msg}  ({elapsed})")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{job}/{group} v{version}"));
    // indicatif draws nothing when stderr is not a terminal: then phases go as lines.
    let plain = bar.is_hidden();
    let deadline = Instant::now() + timeout;
    let mut last_message = String::new();
    let outcome = loop {
        let state = store.group_state(job, group).await.map_err(|e| e.to_string())?.ok_or_else(|| format!("no group {job}/{group}"))?;
        let running = store
            .view()
            .await
            .map_err(|e| e.to_string())?
            .allocations
            .iter()
            .filter(|a| a.job == job && a.group == group && a.version == version && a.status == AllocStatus::Running)
            .count() as u64;
        bar.set_length(u64::from(state.count));
        bar.set_position(running.min(u64::from(state.count)));
        let message = match &state.deployment {
            Some(d) if d.to_version() == version => super::phase_text(d.phase()),
            Some(d) => format!("another deployment (v{}) is under way", d.to_version()),
            None if state.stable == version => "running".to_owned(),
            None => "not deployed".to_owned(),
        };
        if message != last_message {
            if plain {
                eprintln!("{job}/{group} v{version}: {message} ({running}/{} healthy)", state.count);
            }
            bar.set_message(message.clone());
            last_message = message;
        }
        if state.deployment.is_none() {
            if state.stable != version {
                let why = match state.history.last().filter(|h| h.to == version).map(|h| &h.outcome) {
                    Some(Phase::RolledBack { reason }) | Some(Phase::Failed { reason }) => reason.clone(),
                    _ => format!("the group runs v{}", state.stable),
                };
                break Outcome::Failed(why);
            }
            if running >= u64::from(state.count) {
                break Outcome::Succeeded;
            }
        }
        if Instant::now() >= deadline {
            break Outcome::TimedOut;
        }
        bar.tick();
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    bar.finish_and_clear();
    Ok(outcome)
}
