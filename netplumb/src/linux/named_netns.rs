//! Network namespaces created by keelson for processes it runs (the process driver's
//! tasks): made by a thread that leaves its namespace for a new one and bind-mounts it
//! at a path (as `ip netns add` does), so the namespace outlives the thread and the
//! network can be attached before the task starts.

use std::fs::File;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::error::{Error, Result};

fn backend(what: String) -> Error {
    Error::Backend { backend: "netns", source: what.into() }
}

/// Creates a network namespace bound at `path` (its loopback up). An existing one at
/// `path` is kept (a restarted agent finds its tasks' namespaces).
pub fn create_netns(path: &Path) -> Result<()> {
    if path.exists()
        && File::open(path)
            .ok()
            .is_some_and(|f| nix::sys::statfs::fstatfs(&f).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC))
    {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| backend(format!("{}: {e}", dir.display())))?;
    }
    File::create(path).map_err(|e| backend(format!("{}: {e}", path.display())))?;
    let made = std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| backend(format!("a new network namespace: {e}")))?;
            mount(Some("/proc/thread-self/ns/net"), path, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(|e| backend(format!("binding the namespace at {}: {e}", path.display())))?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(|e| backend(e.to_string()))?;
            rt.block_on(async {
                let h = super::links::connect()?;
                let lo = rtnetlink::LinkUnspec::new_with_name("lo").up().build();
                h.link().set(lo).execute().await.map_err(|e| super::links::backend("setting lo up", e))
            })
        })
        .join()
        .map_err(|_| backend("the namespace thread panicked".into()))?
    });
    if made.is_err() {
        let _ = delete_netns(path);
    }
    made
}

/// Unbinds and removes the namespace at `path` (its interfaces go with it once nothing
/// runs inside); already gone is fine.
pub fn delete_netns(path: &Path) -> Result<()> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(backend(format!("unbinding {}: {e}", path.display()))),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(backend(format!("{}: {e}", path.display()))),
    }
}

/// Runs `f` on a thread inside the namespace at `path` (processes it spawns start there).
pub fn run_in_netns<R: Send>(path: &Path, f: impl FnOnce() -> R + Send) -> Result<R> {
    super::netns::run_in(Some(&super::netns::open(path)?), f)
}
