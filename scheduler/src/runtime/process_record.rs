//! What a persistent [`crate::ProcessDriver`] keeps on disk about each task, so a driver
//! started after an agent restart can adopt the processes still running.
//!
//! `<state dir>/<task id>.json` holds the spec, the process id and group, and the
//! process's start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`). A pid
//! alone is not enough: after the task exits the kernel may give its pid to another
//! process, and adopting (or signalling) that one would be a serious bug. The record is
//! replaced atomically (write to a temporary file, rename) at each start and restart.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::task::TaskSpec;

/// One task as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TaskRecord {
    pub spec: TaskSpec,
    pub pid: i32,
    pub pgid: i32,
    pub start_ticks: u64,
    pub started_at: SystemTime,
    pub restarts: u32,
    /// How it ended, once it has ended for good.
    #[serde(default)]
    pub exit: Option<crate::task::TaskState>,
}

fn io_err(e: std::io::Error) -> Error {
    Error::Backend { backend: "process", source: Box::new(e) }
}

/// Where a task's record and output files live.
#[derive(Clone, Debug)]
pub(crate) struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| Error::invalid("state dir", dir.display().to_string(), e.to_string()))?;
        Ok(StateDir { dir })
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// The file a task's stdout or stderr goes to (appended across restarts).
    pub fn output_path(&self, id: &str, stream: &str) -> PathBuf {
        self.dir.join(format!("{id}.{stream}"))
    }

    pub fn save(&self, record: &TaskRecord) -> Result<()> {
        let path = self.record_path(&record.spec.id);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(record).map_err(|e| Error::Backend { backend: "process", source: Box::new(e) })?;
        std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path)).map_err(io_err)
    }

    pub fn forget(&self, id: &str) {
        for path in [self.record_path(id), self.output_path(id, "stdout"), self.output_path(id, "stderr")] {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Every readable record; unreadable ones are reported and skipped (a crash mid-write
    /// leaves only the temporary file, which is ignored).
    pub fn load_all(&self) -> Result<Vec<TaskRecord>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io_err)? {
            let path = entry.map_err(io_err)?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string())) {
                Ok(record) => out.push(record),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable task record"),
            }
        }
        Ok(out)
    }
}

/// The start time of process `pid` in clock ticks since boot, if it exists and is not a
/// zombie.
pub(crate) fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    // The command name (field 2) is in parentheses and may itself hold spaces and ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (state): field 22 (starttime) is index 19.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether process `pgid`, started at `ticks`, is alive and still leads process group
/// `pgid` (field 5 of `/proc/<pid>/stat`): the check before signalling a recorded group.
pub(crate) fn leads_group(pgid: i32, ticks: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(Path::new("/proc").join(pgid.to_string()).join("stat")) else { return false };
    let Some(close) = stat.rfind(')') else { return false };
    let fields: Vec<&str> = stat.get(close + 2..).unwrap_or_default().split(' ').collect();
    // From field 3 (state): field 5 (pgrp) is index 2, field 22 (starttime) index 19.
    fields.first() != Some(&"Z")
        && fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid)
        && fields.get(19).and_then(|t| t.parse::<u64>().ok()) == Some(ticks)
}

/// Whether the process recorded as (`pid`, `ticks`) is still that process and alive.
pub(crate) fn still_running(pid: i32, ticks: u64) -> bool {
    start_ticks(pid) == Some(ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_start_time_and_a_pid_that_does_not_exist_has_none() {
        let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
        let ticks = start_ticks(me);
        assert!(ticks.is_some());
        assert!(still_running(me, ticks.unwrap_or_default()));
        assert!(!still_running(me, ticks.unwrap_or_default() + 1), "same pid, another start time: another process");
        assert_eq!(start_ticks(i32::MAX), None);
    }
}
