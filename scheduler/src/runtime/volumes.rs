//! `VolumeManager`: named storage that tasks mount. `LocalVolumes` keeps each volume as a
//! directory under one root; `DockerVolumes` (feature `docker`) uses the engine's named
//! volumes. Both export a volume as a tar stream and import one, which is how a stateful
//! service moves to another node (see [`crate::serve_volumes`] and
//! [`crate::fetch_volume`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{validate_id, Error, Result};
use crate::runtime::volume_archive::{pack_dir, unpack_into, TarStream};
use crate::task::{MountSource, MountSpec};

/// A volume as the manager reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Volume name.
    pub name: String,
    /// Where a task mounts it from on this node.
    pub source: MountSource,
    /// Labels given at creation.
    pub labels: BTreeMap<String, String>,
}

impl Volume {
    /// How a task mounts this volume at `target`.
    pub fn mount(&self, target: impl Into<PathBuf>, read_only: bool) -> MountSpec {
        MountSpec { source: self.source.clone(), target: target.into(), read_only }
    }
}

/// What a volume manager supports.
///
/// A backend outside this crate starts from `default()` (nothing supported) and sets
/// the fields it supports: `let mut caps = VolumeCapabilities::default(); caps.durable = true;`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VolumeCapabilities {
    /// Volumes survive the manager's process.
    pub durable: bool,
}

/// Creates, lists and removes named volumes.
#[async_trait]
pub trait VolumeManager: Send + Sync + std::fmt::Debug {
    /// The manager's name.
    fn name(&self) -> &'static str;

    /// What it supports.
    fn capabilities(&self) -> VolumeCapabilities;

    /// Creates a volume. [`Error::Conflict`] if it exists.
    async fn create(&self, name: &str, labels: BTreeMap<String, String>) -> Result<Volume>;

    /// Looks a volume up.
    async fn get(&self, name: &str) -> Result<Volume>;

    /// Every volume, sorted by name.
    async fn list(&self) -> Result<Vec<Volume>>;

    /// Removes a volume and its data. [`Error::NotFound`] if absent.
    async fn remove(&self, name: &str) -> Result<()>;

    /// The volume's contents as a tar stream (entries relative to the volume, symlinks
    /// kept as links). Stop writers first for a consistent copy.
    async fn export(&self, name: &str) -> Result<TarStream>;

    /// Creates volume `name` from a tar stream. All or nothing: if the stream fails or
    /// holds an entry that would land outside the volume ([`Error::InvalidInput`]), no
    /// volume is left behind. [`Error::Conflict`] if it exists (nothing is overwritten).
    async fn import(&self, name: &str, labels: BTreeMap<String, String>, tar: TarStream) -> Result<Volume>;
}

/// Volumes as directories under a root: `<root>/<name>/data` holds the data and
/// `<root>/<name>/labels.json` the labels. Names are ids (no `/`, no `..`), so a volume
/// can never point outside the root.
#[derive(Clone, Debug)]
pub struct LocalVolumes {
    root: PathBuf,
    preserve_owners: bool,
}

const BACKEND: &str = "local";

fn io_err(e: std::io::Error) -> Error {
    Error::Backend { backend: BACKEND, source: Box::new(e) }
}

impl LocalVolumes {
    /// Uses (and creates) `root`.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| Error::invalid("volume root", root.display().to_string(), e.to_string()))?;
        Ok(LocalVolumes { root, preserve_owners: false })
    }

    /// Imports keep the owners the archive names (when the agent runs as root): for a
    /// volume moved between nodes that share users. Off by default: files belong to the
    /// importer. Setuid and setgid bits are dropped either way.
    pub fn with_preserve_owners(mut self, preserve: bool) -> Self {
        self.preserve_owners = preserve;
        self
    }

    fn dir(&self, name: &str) -> Result<PathBuf> {
        validate_id("volume name", name)?;
        Ok(self.root.join(name))
    }

    async fn read(&self, name: &str, dir: &Path) -> Result<Volume> {
        let labels = match tokio::fs::read(dir.join("labels.json")).await {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NotFound { kind: "volume", name: name.to_owned() }),
            Err(e) => return Err(io_err(e)),
        };
        Ok(Volume { name: name.to_owned(), source: MountSource::HostDir(dir.join("data")), labels })
    }
}

#[async_trait]
impl VolumeManager for LocalVolumes {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> VolumeCapabilities {
        VolumeCapabilities { durable: true }
    }

    async fn create(&self, name: &str, labels: BTreeMap<String, String>) -> Result<Volume> {
        let dir = self.dir(name)?;
        // create_dir (not _all) is the atomic claim: of two concurrent creates one fails.
        match tokio::fs::create_dir(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::Conflict { kind: "volume", name: name.to_owned(), reason: "already exists".into() })
            }
            Err(e) => return Err(io_err(e)),
        }
        let made = async {
            tokio::fs::create_dir(dir.join("data")).await?;
            write_labels(&dir, &labels).await
        }
        .await;
        if let Err(e) = made {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(io_err(e));
        }
        Ok(Volume { name: name.to_owned(), source: MountSource::HostDir(dir.join("data")), labels })
    }

    async fn get(&self, name: &str) -> Result<Volume> {
        let dir = self.dir(name)?;
        self.read(name, &dir).await
    }

    async fn list(&self) -> Result<Vec<Volume>> {
        let mut out = Vec::new();
        let mut entries = tokio::fs::read_dir(&self.root).await.map_err(io_err)?;
        while let Some(entry) = entries.next_entry().await.map_err(io_err)? {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            if validate_id("volume name", &name).is_err() {
                continue;
            }
            match self.read(&name, &entry.path()).await {
                Ok(v) => out.push(v),
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn remove(&self, name: &str) -> Result<()> {
        let dir = self.dir(name)?;
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NotFound { kind: "volume", name: name.to_owned() }),
            Err(e) => Err(io_err(e)),
        }
    }

    async fn export(&self, name: &str) -> Result<TarStream> {
        let dir = self.dir(name)?;
        self.read(name, &dir).await?;
        Ok(pack_dir(dir.join("data")))
    }

    async fn import(&self, name: &str, labels: BTreeMap<String, String>, tar: TarStream) -> Result<Volume> {
        let dir = self.dir(name)?;
        if tokio::fs::try_exists(&dir).await.map_err(io_err)? {
            return Err(Error::Conflict { kind: "volume", name: name.to_owned(), reason: "already exists".into() });
        }
        // Unpacked beside the root's volumes under a name `list` skips (it starts with a
        // dot), then renamed into place: the volume appears whole or not at all.
        let staging = self.root.join(format!(".import-{name}-{}", std::process::id()));
        let _ = tokio::fs::remove_dir_all(&staging).await;
        tokio::fs::create_dir_all(staging.join("data")).await.map_err(io_err)?;
        let unpacked = async {
            unpack_into(tar, staging.join("data"), self.preserve_owners).await?;
            write_labels(&staging, &labels).await.map_err(io_err)?;
            // rename(2) onto an existing non-empty directory fails, so a concurrent
            // create of the same name wins and this import reports the conflict.
            match tokio::fs::rename(&staging, &dir).await {
                Ok(()) => Ok(()),
                Err(_) if dir.exists() => Err(Error::Conflict { kind: "volume", name: name.to_owned(), reason: "already exists".into() }),
                Err(e) => Err(io_err(e)),
            }
        }
        .await;
        if let Err(e) = unpacked {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            return Err(e);
        }
        Ok(Volume { name: name.to_owned(), source: MountSource::HostDir(dir.join("data")), labels })
    }
}

/// Writes `labels.json` through a temporary file: the labels file appearing is a volume's
/// commit point (a crash before it leaves a directory `get` reports as absent).
async fn write_labels(dir: &Path, labels: &BTreeMap<String, String>) -> std::io::Result<()> {
    let tmp = dir.join(".labels.json.tmp");
    tokio::fs::write(&tmp, serde_json::to_vec(labels).unwrap_or_default()).await?;
    tokio::fs::rename(&tmp, dir.join("labels.json")).await
}
