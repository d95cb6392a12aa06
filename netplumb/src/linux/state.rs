//! Network definitions of the kernel drivers, one JSON file per network in the state
//! directory, shared by every process on the host (the library and `keelson-cni`).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::driver::NetworkSpec;
use crate::error::{Error, Result};
use crate::ipam::Pool;

/// A network as stored: its spec and what was derived from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredNetwork {
    pub(crate) spec: NetworkSpec,
    pub(crate) driver: String,
    pub(crate) pool: Pool,
    pub(crate) mtu: u32,
    /// The bridge (bridge driver) or parent (macvlan) link.
    pub(crate) link: String,
    /// For the overlay's local bridge: the cluster CIDR, which is not masqueraded (other
    /// hosts see container addresses as they are).
    #[serde(default)]
    pub(crate) overlay: Option<ipnet::Ipv4Net>,
}

/// The directory of network files.
#[derive(Clone, Debug)]
pub(crate) struct NetworkStore {
    dir: PathBuf,
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Backend { backend: "netplumb-state", source: format!("{}: {e}", path.display()).into() }
}

impl NetworkStore {
    pub(crate) fn open(dir: PathBuf) -> Result<NetworkStore> {
        std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        Ok(NetworkStore { dir })
    }

    /// Held while networks are created or deleted, so two processes cannot both take one
    /// name or overlapping subnets.
    pub(crate) fn lock(&self) -> Result<Flock<File>> {
        let path = self.dir.join(".lock");
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| io_error(&path, e))?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| io_error(&path, e.into()))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    pub(crate) fn get(&self, name: &str) -> Result<Option<StoredNetwork>> {
        let path = self.path(name);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Backend { backend: "netplumb-state", source: format!("{}: {e}", path.display()).into() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&path, e)),
        }
    }

    pub(crate) fn require(&self, name: &str) -> Result<StoredNetwork> {
        self.get(name)?.ok_or_else(|| Error::NotFound { kind: "network", name: name.to_owned() })
    }

    pub(crate) fn all(&self) -> Result<Vec<StoredNetwork>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| io_error(&self.dir, e))?.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|x| x == "json") {
                if let Some(net) = path.file_stem().and_then(|s| s.to_str()).map(|s| self.get(s)).transpose()?.flatten() {
                    out.push(net);
                }
            }
        }
        out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(out)
    }

    /// Writes the file whole (a new file renamed over the old).
    pub(crate) fn put(&self, net: &StoredNetwork) -> Result<()> {
        let path = self.path(&net.spec.name);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(net).map_err(|e| Error::Backend { backend: "netplumb-state", source: Box::new(e) })?;
        std::fs::write(&tmp, bytes).map_err(|e| io_error(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_error(&path, e))
    }

    pub(crate) fn remove(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(&path, e)),
        }
    }
}

/// A stable 64-bit FNV-1a hash: link names derived from it are the same in every process
/// and every build.
pub(crate) fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
