//! `LocalIpam`: one host's leases in a journal file per network, shared by every process
//! on the host under an exclusive `flock`.
//!
//! - **Never twice.** Every allocation happens under the lock, after reading what other
//!   processes appended; the lock dies with its holder, so a `kill -9` cannot wedge it.
//! - **Crash safe without fsync.** A lease is one line appended by one `write`; a process
//!   killed before it leaves no line, after it a whole one. A torn last line (power loss)
//!   is cut off on the next read. The state is keyed by boot (`boot_id`): after a reboot
//!   no container of the last boot exists, so its leases are dropped, and losing the
//!   unsynced tail of a journal at power loss loses only leases that died with the boot.
//! - **Cheap.** Each process remembers how far it has read and reads only what was
//!   appended since; the journal is compacted when released leases dominate it. The
//!   file work runs inline: it takes microseconds under the lock.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::{Ipam, Lease, LeaseRequest, Pool};
use crate::attachment::AttachmentKey;
use crate::error::{Error, Result};

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
/// Compact once the journal holds this many lines and at most a quarter are live.
const COMPACT_AFTER_LINES: usize = 256;

/// One journal line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Entry {
    Lease(Lease),
    Release(AttachmentKey),
}

/// One network's leases, as replayed from its journal.
#[derive(Debug, Default)]
struct Leases {
    by_address: BTreeMap<Ipv4Addr, Lease>,
    by_key: HashMap<AttachmentKey, Ipv4Addr>,
    /// The last address handed out: the next search starts after it.
    last: Option<Ipv4Addr>,
    lines: usize,
}

impl Leases {
    fn apply(&mut self, entry: Entry) {
        self.lines += 1;
        match entry {
            Entry::Lease(lease) => {
                self.last = Some(lease.address);
                self.by_key.insert(lease.key.clone(), lease.address);
                self.by_address.insert(lease.address, lease);
            }
            Entry::Release(key) => {
                if let Some(addr) = self.by_key.remove(&key) {
                    self.by_address.remove(&addr);
                }
            }
        }
    }
}

/// What this process has read of one journal.
#[derive(Debug, Default)]
struct Cursor {
    inode: u64,
    offset: u64,
    leases: Leases,
}

/// Leases kept in `<dir>/<network>.journal`, locked through `<dir>/<network>.lock`.
#[derive(Clone, Debug)]
pub struct LocalIpam {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    cursors: Mutex<HashMap<String, Cursor>>,
}

impl LocalIpam {
    /// The store in `dir` (created if missing). If `dir` holds leases of an earlier boot,
    /// they are dropped.
    pub fn open(dir: impl Into<PathBuf>) -> Result<LocalIpam> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        let boot = std::fs::read_to_string(BOOT_ID).map_err(|e| io_error(Path::new(BOOT_ID), e))?;
        let _guard = lock(&dir.join(".boot.lock"))?;
        let marker = dir.join("boot_id");
        // Only a missing marker is a new store; one that cannot be read is an error, not
        // a reason to drop every lease.
        let recorded = match std::fs::read_to_string(&marker) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_error(&marker, e)),
        };
        if recorded.trim() != boot.trim() {
            for entry in std::fs::read_dir(&dir).map_err(|e| io_error(&dir, e))?.flatten() {
                if entry.path().extension().is_some_and(|x| x == "journal") {
                    std::fs::remove_file(entry.path()).map_err(|e| io_error(&entry.path(), e))?;
                }
            }
            std::fs::write(&marker, boot.trim()).map_err(|e| io_error(&marker, e))?;
        }
        Ok(LocalIpam { inner: Arc::new(Inner { dir, cursors: Mutex::new(HashMap::new()) }) })
    }

    /// Where the journals are.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Networks with a journal here.
    fn networks(&self) -> Result<Vec<String>> {
        let dir = &self.inner.dir;
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, e))?.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|x| x == "journal") {
                if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                    out.push(stem.to_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Runs `f` inline. The lock is held for one read and one append of a few hundred
    /// bytes (microseconds), so blocking the calling task that long costs less than a
    /// hop to a blocking thread (a thread start in a short-lived CNI process).
    async fn blocking<R: Send + 'static>(&self, f: impl FnOnce(&Inner) -> Result<R> + Send + 'static) -> Result<R> {
        f(&self.inner)
    }
}

impl Inner {
    /// Runs `f` on `network`'s leases under its lock, after catching up with the journal,
    /// and appends the entries `f` returns in one write.
    fn with_leases<R>(&self, network: &str, f: impl FnOnce(&Leases) -> Result<(R, Vec<Entry>)>) -> Result<R> {
        crate::driver::validate_name("network name", network)?;
        let journal_path = self.dir.join(format!("{network}.journal"));
        let _guard = lock(&self.dir.join(format!("{network}.lock")))?;
        let mut file =
            OpenOptions::new().read(true).append(true).create(true).open(&journal_path).map_err(|e| io_error(&journal_path, e))?;
        let meta = file.metadata().map_err(|e| io_error(&journal_path, e))?;
        let mut cursors = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        let cursor = cursors.entry(network.to_owned()).or_default();
        if cursor.inode != meta.ino() || meta.len() < cursor.offset {
            // Compacted or recreated by another process: read it whole.
            *cursor = Cursor { inode: meta.ino(), ..Cursor::default() };
        }
        if meta.len() > cursor.offset {
            file.seek(SeekFrom::Start(cursor.offset)).map_err(|e| io_error(&journal_path, e))?;
            let mut tail = Vec::with_capacity((meta.len() - cursor.offset) as usize);
            file.read_to_end(&mut tail).map_err(|e| io_error(&journal_path, e))?;
            let complete = tail.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            for line in tail[..complete].split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let entry: Entry = serde_json::from_slice(line).map_err(|e| Error::Backend {
                    backend: "local-ipam",
                    source: format!("{}: unreadable line {:?}: {e}", journal_path.display(), String::from_utf8_lossy(line)).into(),
                })?;
                cursor.leases.apply(entry);
            }
            cursor.offset += complete as u64;
            if complete < tail.len() {
                // A torn last line (the machine died mid-write): it never took effect.
                file.set_len(cursor.offset).map_err(|e| io_error(&journal_path, e))?;
            }
        }
        let (out, entries) = f(&cursor.leases)?;
        if !entries.is_empty() {
            let mut buf = Vec::new();
            for entry in &entries {
                serde_json::to_writer(&mut buf, entry).map_err(|e| Error::Backend { backend: "local-ipam", source: Box::new(e) })?;
                buf.push(b'\n');
            }
            file.write_all(&buf).map_err(|e| io_error(&journal_path, e))?;
            cursor.offset += buf.len() as u64;
            for entry in entries {
                cursor.leases.apply(entry);
            }
        }
        if cursor.leases.lines >= COMPACT_AFTER_LINES && cursor.leases.lines > 4 * cursor.leases.by_address.len() {
            compact(&journal_path, cursor)?;
        }
        Ok(out)
    }

    fn leases(&self, network: &str) -> Result<Vec<Lease>> {
        self.with_leases(network, |l| Ok((l.by_address.values().cloned().collect(), Vec::new())))
    }
}

/// Rewrites the journal with one line per live lease (a new file renamed over the old,
/// so readers see the old or the new whole; they notice the new inode and re-read).
fn compact(path: &Path, cursor: &mut Cursor) -> Result<()> {
    let tmp = path.with_extension("journal.tmp");
    let mut buf = Vec::new();
    // The most recently leased address goes last, so the next search still starts after it.
    let last = cursor.leases.last;
    let live: Vec<&Lease> = cursor
        .leases
        .by_address
        .values()
        .filter(|l| Some(l.address) != last)
        .chain(last.and_then(|a| cursor.leases.by_address.get(&a)))
        .collect();
    for lease in &live {
        serde_json::to_writer(&mut buf, &Entry::Lease((*lease).clone()))
            .map_err(|e| Error::Backend { backend: "local-ipam", source: Box::new(e) })?;
        buf.push(b'\n');
    }
    std::fs::write(&tmp, &buf).map_err(|e| io_error(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_error(path, e))?;
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    cursor.inode = meta.ino();
    cursor.offset = buf.len() as u64;
    cursor.leases.lines = live.len();
    Ok(())
}

fn lock(path: &Path) -> Result<Flock<File>> {
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(|e| io_error(path, e))?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| io_error(path, e.into()))
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Backend { backend: "local-ipam", source: format!("{}: {e}", path.display()).into() }
}

/// Refuses a request whose ports another lease already publishes.
pub(super) fn check_ports<'a>(request: &LeaseRequest, others: impl Iterator<Item = &'a Lease>) -> Result<()> {
    for lease in others {
        if let Some(p) = request.ports.iter().find(|p| lease.ports.iter().any(|q| q.host_port == p.host_port && q.protocol == p.protocol)) {
            return Err(Error::Conflict {
                kind: "host port",
                name: format!("{}/{}", p.host_port, p.protocol),
                reason: format!("already published by {}", lease.key),
            });
        }
    }
    Ok(())
}

#[async_trait]
impl Ipam for LocalIpam {
    async fn allocate(&self, pool: &Pool, request: LeaseRequest) -> Result<Lease> {
        let pool = *pool;
        // Ports are per host, across networks: check every other network's leases first.
        // (Under each network's own lock in turn; two concurrent attaches on different
        // networks publishing one port can both pass, and the firewall keeps the first.)
        if !request.ports.is_empty() {
            let this = self.clone();
            let req = request.clone();
            self.blocking(move |inner| {
                for net in this.networks()?.into_iter().filter(|n| *n != req.key.network) {
                    check_ports(&req, inner.leases(&net)?.iter())?;
                }
                Ok(())
            })
            .await?;
        }
        self.blocking(move |inner| {
            let network = request.key.network.clone();
            inner.with_leases(&network, |leases| {
                if let Some(addr) = leases.by_key.get(&request.key) {
                    return Err(Error::Conflict {
                        kind: "attachment",
                        name: request.key.to_string(),
                        reason: format!("already holds {addr}"),
                    });
                }
                check_ports(&request, leases.by_address.values())?;
                let address = pool
                    .candidates_preferring(request.prefer, leases.last)
                    .find(|a| !leases.by_address.contains_key(a))
                    .ok_or_else(|| Error::PoolExhausted { network: network.clone(), subnet: pool.subnet.to_string() })?;
                let lease = Lease { key: request.key, address, host_link: request.host_link, ports: request.ports, netns: request.netns };
                Ok((lease.clone(), vec![Entry::Lease(lease)]))
            })
        })
        .await
    }

    async fn release(&self, network: &str, key: &AttachmentKey) -> Result<Option<Lease>> {
        let (network, key) = (network.to_owned(), key.clone());
        self.blocking(move |inner| {
            inner.with_leases(&network, |leases| {
                let held = leases.by_key.get(&key).and_then(|a| leases.by_address.get(a)).cloned();
                let entries = if held.is_some() { vec![Entry::Release(key)] } else { Vec::new() };
                Ok((held, entries))
            })
        })
        .await
    }

    async fn leases(&self, network: &str) -> Result<Vec<Lease>> {
        let network = network.to_owned();
        self.blocking(move |inner| inner.leases(&network)).await
    }

    async fn forget_network(&self, network: &str) -> Result<()> {
        let network = network.to_owned();
        self.blocking(move |inner| {
            inner.with_leases(&network, |leases| {
                if let Some(lease) = leases.by_address.values().next() {
                    return Err(Error::Conflict {
                        kind: "network",
                        name: network.clone(),
                        reason: format!("{} leases held, the first by {}", leases.by_address.len(), lease.key),
                    });
                }
                Ok(((), Vec::new()))
            })?;
            let path = inner.dir.join(format!("{network}.journal"));
            let _guard = lock(&inner.dir.join(format!("{network}.lock")))?;
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path, e)),
            }
            inner.cursors.lock().unwrap_or_else(|p| p.into_inner()).remove(&network);
            Ok(())
        })
        .await
    }

    async fn all_leases(&self) -> Result<Vec<Lease>> {
        let this = self.clone();
        self.blocking(move |inner| {
            let mut out = Vec::new();
            for net in this.networks()? {
                out.extend(inner.leases(&net)?);
            }
            Ok(out)
        })
        .await
    }
}
