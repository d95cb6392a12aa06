//! Secrets as files: a task whose template names secrets
//! ([`TaskTemplate::secrets`](crate::TaskTemplate::secrets)) finds each in a file of its
//! own under [`SECRETS_MOUNT`], read-only. The agent writes them, read from the cluster
//! store at start, into a folder per task under its secrets directory (0700, files 0400)
//! and bind-mounts it; the folder goes when the task does. Values never reach the
//! environment (which `docker inspect` and child processes show) nor any log.
//!
//! ```
//! use std::collections::BTreeMap;
//! let dir = tempfile::tempdir()?;
//! let files = keelson_scheduler::SecretFiles::new(dir.path());
//! let mount = files.write("shop-web-1", &BTreeMap::from([("DB_PASSWORD".to_owned(), b"pw".to_vec())]))?;
//! assert_eq!(mount.target, std::path::Path::new(keelson_scheduler::SECRETS_MOUNT));
//! assert_eq!(std::fs::read(dir.path().join("shop-web-1/DB_PASSWORD"))?, b"pw");
//! files.collect(&Default::default())?; // no task left: its folder goes
//! assert!(!dir.path().join("shop-web-1").exists());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::task::{is_secret_file_name, MountSource, MountSpec};

/// Where a task finds its secrets.
pub const SECRETS_MOUNT: &str = "/run/secrets";

/// The secret folders of one node's tasks.
#[derive(Clone, Debug)]
pub struct SecretFiles {
    dir: PathBuf,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Unavailable { backend: "secret files", reason: format!("{context}: {e}") }
}

impl SecretFiles {
    /// Folders under `dir` (created 0700 when first needed).
    pub fn new(dir: impl Into<PathBuf>) -> SecretFiles {
        SecretFiles { dir: dir.into() }
    }

    fn task_dir(&self, task: &str) -> Result<PathBuf> {
        if task.is_empty() || task.contains('/') || task.starts_with('.') {
            return Err(Error::invalid("task id", task, "cannot name a secrets folder"));
        }
        Ok(self.dir.join(task))
    }

    /// Writes `files` (name → content) into `task`'s folder, replacing what was there,
    /// and returns the read-only mount that shows them at [`SECRETS_MOUNT`].
    pub fn write(&self, task: &str, files: &BTreeMap<String, Vec<u8>>) -> Result<MountSpec> {
        if let Some(bad) = files.keys().find(|n| !is_secret_file_name(n)) {
            return Err(Error::invalid("secret file name", bad, "1 to 128 of A-Za-z0-9_.-, not starting with a dot"));
        }
        let private = |p: &Path| std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700));
        std::fs::create_dir_all(&self.dir).map_err(io(format!("creating {}", self.dir.display())))?;
        private(&self.dir).map_err(io(format!("restricting {}", self.dir.display())))?;
        let folder = self.task_dir(task)?;
        if folder.exists() {
            std::fs::remove_dir_all(&folder).map_err(io(format!("replacing {}", folder.display())))?;
        }
        std::fs::create_dir(&folder).map_err(io(format!("creating {}", folder.display())))?;
        private(&folder).map_err(io(format!("restricting {}", folder.display())))?;
        for (name, content) in files {
            let path = folder.join(name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&path)
                .map_err(io(format!("writing {}", path.display())))?;
            f.write_all(content).map_err(io(format!("writing {}", path.display())))?;
        }
        Ok(MountSpec { source: MountSource::HostDir(folder), target: PathBuf::from(SECRETS_MOUNT), read_only: true })
    }

    /// Removes the folder of every task not in `keep`; returns how many went.
    pub fn collect(&self, keep: &HashSet<String>) -> Result<usize> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(format!("listing {}", self.dir.display()))(e)),
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                std::fs::remove_dir_all(entry.path()).map_err(io(format!("removing {}", entry.path().display())))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn files_are_private_replaced_on_restart_and_collected_with_their_task() {
        let dir = tempfile::tempdir().expect("dir");
        let files = SecretFiles::new(dir.path().join("secrets"));
        let one = BTreeMap::from([("A".to_owned(), b"1".to_vec()), ("B".to_owned(), b"2".to_vec())]);
        let mount = files.write("t1", &one).expect("write");
        assert!(mount.read_only);
        let folder = dir.path().join("secrets/t1");
        assert_eq!(mount.source, MountSource::HostDir(folder.clone()));
        assert_eq!(std::fs::metadata(dir.path().join("secrets")).expect("dir").mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(&folder).expect("folder").mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(folder.join("A")).expect("file").mode() & 0o777, 0o400);
        // A restart writes what the secrets are now: B was removed.
        files.write("t1", &BTreeMap::from([("A".to_owned(), b"new".to_vec())])).expect("again");
        assert_eq!(std::fs::read(folder.join("A")).expect("A"), b"new");
        assert!(!folder.join("B").exists());
        files.write("t2", &one).expect("t2");
        assert_eq!(files.collect(&HashSet::from(["t2".to_owned()])).expect("collect"), 1);
        assert!(!folder.exists() && dir.path().join("secrets/t2/B").exists());
        for bad in ["../x", ".hidden", "a/b", ""] {
            assert!(matches!(files.write("t3", &BTreeMap::from([(bad.to_owned(), Vec::new())])), Err(Error::InvalidInput { .. })), "{bad}");
        }
        assert!(files.write("../t", &one).is_err());
    }
}
