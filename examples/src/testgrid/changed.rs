//! Changed-only runs: which modules git says were touched since a ref, and the ref of
//! the last run in which everything passed (`<state>/last-success`), which
//! `--changed-since last` starts from.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use super::suite::Suite;
use super::TestgridError;

fn git(dir: &Path, args: &[&str]) -> Result<String, TestgridError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|e| TestgridError::Git { reason: format!("running git: {e}") })?;
    if !out.status.success() {
        return Err(TestgridError::Git { reason: format!("git {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()) });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The commit the suite's checkout is at.
pub fn head(suite: &Suite) -> Result<String, TestgridError> {
    Ok(git(&suite.root, &["rev-parse", "HEAD"])?.trim().to_owned())
}

/// What changed since `since`: `None` when everything must run (the baseline's recipe
/// or the manifest changed), else the names of the modules with a changed, added or
/// removed file (committed or not, untracked files included).
pub fn changed_modules(suite: &Suite, since: &str) -> Result<Option<BTreeSet<String>>, TestgridError> {
    // `--relative` gives paths from the suite's folder even inside a larger repository.
    let mut paths: Vec<String> =
        git(&suite.root, &["diff", "--name-only", "--relative", since, "--", "."])?.lines().map(str::to_owned).collect();
    paths.extend(git(&suite.root, &["ls-files", "--others", "--exclude-standard", "--", "."])?.lines().map(str::to_owned));
    let modules_dir = suite.modules_dir.to_string_lossy().trim_end_matches('/').to_owned();
    let mut modules = BTreeSet::new();
    for path in paths {
        match path.strip_prefix(&format!("{modules_dir}/")) {
            Some(rest) => {
                if let Some((module, _)) = rest.split_once('/') {
                    modules.insert(module.to_owned());
                }
            }
            // Anything outside the modules (the recipe, the manifest) can change every test.
            None if is_state(&path) => {}
            None => return Ok(None),
        }
    }
    Ok(Some(modules))
}

/// testgrid's own files (state and reports under `.testgrid/`) are not inputs.
fn is_state(path: &str) -> bool {
    path.starts_with(".testgrid/")
}

/// The ref recorded by the last run in which everything passed.
pub fn last_success(state_dir: &Path) -> Option<String> {
    std::fs::read_to_string(state_dir.join("last-success")).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// Records `commit` as the last run in which everything passed.
pub fn record_success(state_dir: &Path, commit: &str) -> Result<(), TestgridError> {
    let io = |source| TestgridError::Io { context: format!("writing {}/last-success", state_dir.display()), source };
    std::fs::create_dir_all(state_dir).map_err(io)?;
    let tmp = state_dir.join("last-success.tmp");
    std::fs::write(&tmp, format!("{commit}\n")).map_err(io)?;
    std::fs::rename(&tmp, state_dir.join("last-success")).map_err(io)
}
