//! Volume contents as tar streams: the form in which a volume leaves one node and
//! arrives on another ([`crate::VolumeManager::export`] and `import`).
//!
//! Every archive keelson writes names its entries relative to the volume (`./a.txt`),
//! keeps symlinks as links (never follows them out of the volume) and ends with tar's
//! end-of-archive blocks. Every archive keelson reads is checked entry by entry before
//! anything is written: an absolute path or a `..` component is refused with
//! [`Error::InvalidInput`], so a hostile or corrupt archive can never write outside the
//! volume. The tar work runs on the blocking pool (the `tar` crate is synchronous); bytes
//! cross to async code through a bounded channel, so a slow reader slows the packer
//! instead of buffering the volume in memory.

use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::mpsc;

use crate::error::{Error, Result};

/// A volume's contents as a tar archive, in chunks. An `Err` item means the archive is
/// incomplete: the reader must discard what it has.
pub type TarStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// Chunks handed from the blocking packer to the async reader.
const CHUNK: usize = 1024 * 1024;
/// Chunks in flight between them (so at most 4 MiB buffered).
const IN_FLIGHT: usize = 4;

/// A `Write` that sends what it is given as chunks on a channel (from a blocking thread).
struct ChannelWriter {
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the reader went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Runs `produce` on the blocking pool writing into a channel; the stream yields what it
/// writes, then its error if it fails (so the reader knows the archive is incomplete).
fn produce_stream(produce: impl FnOnce(&mut ChannelWriter) -> std::io::Result<()> + Send + 'static) -> TarStream {
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let mut out = ChannelWriter { tx: tx.clone(), buf: Vec::with_capacity(CHUNK) };
        if let Err(e) = produce(&mut out).and_then(|()| out.flush()) {
            let _ = tx.blocking_send(Err(e));
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Packs the contents of `dir` (not `dir` itself) as a tar stream.
pub(crate) fn pack_dir(dir: PathBuf) -> TarStream {
    produce_stream(move |out| {
        let mut builder = tar::Builder::new(out);
        builder.follow_symlinks(false);
        builder.append_dir_all(".", &dir)?;
        builder.into_inner()?;
        Ok(())
    })
}

/// Refuses entry paths that could land outside the directory they unpack into.
fn check_entry_path(path: &Path) -> Result<()> {
    let inside = path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if inside {
        Ok(())
    } else {
        Err(Error::invalid("volume archive entry", path.display().to_string(), "absolute paths and '..' are not allowed"))
    }
}

fn archive_err(e: std::io::Error) -> Error {
    // An I/O error while reading an archive is either the stream failing or the bytes not
    // being a tar archive; both mean the import cannot be trusted.
    // tar wraps the cause ("failed to unpack x" around "No space left on device"): say both.
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        reason.push_str(": ");
        reason.push_str(&cause.to_string());
        source = cause.source();
    }
    Error::invalid("volume archive", "", reason)
}

/// Reads an async tar stream from a blocking thread.
fn blocking_reader(tar: TarStream) -> tokio_util::io::SyncIoBridge<tokio_util::io::StreamReader<TarStream, Bytes>> {
    tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(tar))
}

/// Setuid and setgid bits: never taken from an archive. A peer's archive unpacked by an
/// agent running as root could otherwise plant a setuid-root program on the node.
pub(crate) const STRIPPED_MODE_BITS: u32 = 0o6000;

/// Unpacks `tar` into the existing, empty directory `dst`, checking every entry first.
/// Permissions (less setuid and setgid) and times are kept; owners only when asked
/// (`preserve_owners`) and running as root, otherwise files belong to the importer. On
/// error, `dst` may hold part of the archive: the caller unpacks into a directory it can
/// throw away.
pub(crate) async fn unpack_into(tar: TarStream, dst: PathBuf, preserve_owners: bool) -> Result<()> {
    let reader = blocking_reader(tar);
    let as_root = nix::unistd::geteuid().is_root();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut archive = tar::Archive::new(reader);
        archive.set_preserve_permissions(true);
        archive.set_mask(STRIPPED_MODE_BITS);
        archive.set_preserve_mtime(true);
        archive.set_preserve_ownerships(as_root && preserve_owners);
        for entry in archive.entries().map_err(archive_err)? {
            let mut entry = entry.map_err(archive_err)?;
            let path = entry.path().map_err(archive_err)?.into_owned();
            check_entry_path(&path)?;
            // `unpack_in` also refuses to write through a symlink that points outside.
            if !entry.unpack_in(&dst).map_err(archive_err)? {
                return Err(Error::invalid("volume archive entry", path.display().to_string(), "would be written outside the volume"));
            }
        }
        // Read past tar's end blocks to the end of the stream, so the source sees its
        // archive consumed whole (and finishes: an HTTP response, a helper container).
        std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).map_err(archive_err)?;
        Ok(())
    })
    .await
    .map_err(|e| Error::Backend { backend: "volume archive", source: Box::new(e) })?
}

/// Re-encodes `tar` entry by entry after checking each path, for backends that unpack
/// archives themselves (Docker). The returned receiver reports whether the whole input was
/// read and valid: an archive cut short looks complete to the backend, so the caller must
/// check it before trusting the import.
/// Setuid and setgid bits are dropped, and owners too unless `preserve_owners` (then
/// files belong to whoever unpacks them: root in the helper container).
#[cfg(feature = "docker")]
pub(crate) fn checked(tar: TarStream, preserve_owners: bool) -> (TarStream, tokio::sync::oneshot::Receiver<Result<()>>) {
    let reader = blocking_reader(tar);
    let (verdict_tx, verdict_rx) = tokio::sync::oneshot::channel();
    let stream = produce_stream(move |out| {
        let result = recode(reader, out, preserve_owners);
        let failed = result.as_ref().err().map(|e| std::io::Error::other(e.to_string()));
        let _ = verdict_tx.send(result);
        failed.map_or(Ok(()), Err)
    });
    (stream, verdict_rx)
}

#[cfg(feature = "docker")]
fn recode(reader: impl std::io::Read, out: &mut ChannelWriter, preserve_owners: bool) -> Result<()> {
    let mut archive = tar::Archive::new(reader);
    let mut builder = tar::Builder::new(out);
    for entry in archive.entries().map_err(archive_err)? {
        let mut entry = entry.map_err(archive_err)?;
        let path = entry.path().map_err(archive_err)?.into_owned();
        check_entry_path(&path)?;
        let mut header = entry.header().clone();
        if let Ok(mode) = header.mode() {
            header.set_mode(mode & !STRIPPED_MODE_BITS);
        }
        if !preserve_owners {
            header.set_uid(0);
            header.set_gid(0);
            let _ = header.set_username("root");
            let _ = header.set_groupname("root");
        }
        let written = match entry.link_name().map_err(archive_err)? {
            Some(target) if header.entry_type().is_hard_link() => {
                // A hard link names another entry of the archive: it must be inside too.
                check_entry_path(&target)?;
                builder.append_link(&mut header, &path, &target)
            }
            Some(target) if header.entry_type().is_symlink() => builder.append_link(&mut header, &path, &target),
            _ => builder.append_data(&mut header, &path, &mut entry),
        };
        written.map_err(|e| Error::Backend { backend: "volume archive", source: Box::new(e) })?;
    }
    builder.into_inner().map_err(|e| Error::Backend { backend: "volume archive", source: Box::new(e) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_must_stay_inside() {
        assert!(check_entry_path(Path::new("./a/b.txt")).is_ok());
        assert!(check_entry_path(Path::new("a")).is_ok());
        assert!(check_entry_path(Path::new("../escape")).is_err());
        assert!(check_entry_path(Path::new("a/../../escape")).is_err());
        assert!(check_entry_path(Path::new("/etc/passwd")).is_err());
    }
}
