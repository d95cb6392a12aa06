//! Checkpoints on disk: one small JSON file per source, replaced atomically.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// A checkpoint file. [`save`](CheckpointFile::save) writes a temporary file beside it and
/// renames it over the old one, so a crash at any moment leaves the old checkpoint or the
/// new one, never a torn one. It is not synced: a kill of the process loses nothing (the
/// kernel has the file), and a power loss at worst goes back to an older checkpoint,
/// which re-sends records (duplicates, never a loss).
#[derive(Debug, Clone)]
pub struct CheckpointFile {
    path: PathBuf,
    tmp: PathBuf,
}

impl CheckpointFile {
    /// The checkpoint at `path`; its directory is created.
    pub fn new(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io { context: format!("creating {}", dir.display()), source })?;
        }
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        Ok(CheckpointFile { path, tmp: tmp.into() })
    }

    /// Where it lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved checkpoint, `None` if there is none yet. A file that does not parse is
    /// an error naming it, not an empty checkpoint: starting over would re-send
    /// everything, and starting at the end would lose what was not shipped.
    pub fn load<T: DeserializeOwned>(&self) -> Result<Option<T>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::InvalidInput {
                field: "checkpoint file",
                value: self.path.display().to_string(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Io { context: format!("reading checkpoint {}", self.path.display()), source }),
        }
    }

    /// Replaces the checkpoint with `value`.
    pub fn save<T: Serialize>(&self, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::InvalidInput {
            field: "checkpoint",
            value: self.path.display().to_string(),
            reason: e.to_string(),
        })?;
        std::fs::write(&self.tmp, bytes).map_err(|source| Error::Io { context: format!("writing {}", self.tmp.display()), source })?;
        std::fs::rename(&self.tmp, &self.path).map_err(|source| Error::Io { context: format!("replacing {}", self.path.display()), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_and_refuses_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cp = CheckpointFile::new(dir.path().join("sub/cp.json")).expect("new");
        assert_eq!(cp.load::<Vec<u64>>().expect("load"), None);
        cp.save(&vec![1u64, 2]).expect("save");
        assert_eq!(cp.load::<Vec<u64>>().expect("load"), Some(vec![1, 2]));
        std::fs::write(cp.path(), "{torn").expect("write");
        match cp.load::<Vec<u64>>() {
            Err(Error::InvalidInput { field: "checkpoint file", value, .. }) => assert!(value.ends_with("cp.json")),
            other => panic!("{other:?}"),
        }
    }
}
