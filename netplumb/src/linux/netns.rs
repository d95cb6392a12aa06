//! Running work inside a network namespace: a short-lived thread joins the namespace
//! (`setns`), so the calling thread and the rest of the process stay where they are.
//! Sockets opened there stay bound to that namespace when used from anywhere else.

use std::fs::File;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

use crate::error::{Error, Result};

/// Opens a namespace file (`/var/run/netns/x`, `/proc/<pid>/ns/net`). A missing file is
/// [`Error::NotFound`] naming it.
pub(crate) fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound { kind: "network namespace", name: path.display().to_string() },
        _ => Error::Backend { backend: "netns", source: format!("{}: {e}", path.display()).into() },
    })
}

/// Runs `f` on a thread inside `netns` (the caller's own namespace when `None`).
pub(crate) fn run_in<R: Send>(netns: Option<&File>, f: impl FnOnce() -> R + Send) -> Result<R> {
    let Some(ns) = netns else { return Ok(f()) };
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(ns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::Backend { backend: "netns", source: format!("joining a network namespace: {e}").into() })?;
            Ok(f())
        })
        .join()
        .map_err(|_| Error::Backend { backend: "netns", source: "a thread inside a network namespace panicked".into() })?
    })
}

/// Writes a sysctl of the calling thread's namespace (`net/ipv4/ip_forward`).
pub(crate) fn write_sysctl(name: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{name}");
    std::fs::write(&path, value).map_err(|e| Error::Backend { backend: "sysctl", source: format!("{path}: {e}").into() })
}
