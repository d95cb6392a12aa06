//! Tailing files: rotation by rename and by copytruncate, truncation, deletion while
//! open, and checkpoints keyed by a fingerprint of each file's first bytes.

use std::collections::{HashMap, VecDeque};
use std::hash::Hasher;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::Source;
use crate::checkpoint::CheckpointFile;
use crate::error::{Error, Result};
use crate::lines::{char_boundary, MAX_LINE_BYTES};
use crate::record::{Labels, Record, Stream};

/// Where to start in a file the source has no checkpoint for, among the files it finds
/// at its first scan. Files that appear later are always read from their beginning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StartAt {
    /// From the first byte (the default: nothing already written is skipped).
    #[default]
    Beginning,
    /// From the current end (only what is written from now on).
    End,
}

/// Settings of a [`FileSource`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct FileSourceConfig {
    /// Glob patterns of the files to read (`/var/log/app/*.log*`). Include rotated names
    /// (`app.log.1`) to read what was written just before a rotation: the fingerprint
    /// tells a rotated file from a new one, so nothing is read twice.
    pub include: Vec<String>,
    /// Labels of every record; an empty service becomes the file's name up to its first
    /// dot. Each record also gets the label `file` with its path.
    pub labels: Labels,
    /// Where acknowledged offsets are kept; `None` keeps them in memory only.
    pub checkpoints: Option<PathBuf>,
    /// Where to start in files without a checkpoint found at the first scan.
    pub start_at: StartAt,
    /// How often to look for new data and new files when there is nothing to read
    /// (default 100 ms).
    pub poll: Duration,
    /// How many first bytes identify a file (default 256). Files whose first bytes are
    /// the same (a common header) are told apart by their inode while open.
    pub fingerprint_bytes: usize,
    /// Longest line kept whole; longer ones come in pieces marked partial (default
    /// [`MAX_LINE_BYTES`]).
    pub max_line: usize,
    /// Bytes read at a time per file (default 256 KiB).
    pub read_chunk: usize,
    /// A file that was rotated away or deleted is closed once fully read and unchanged
    /// for this long (default 5 s): a writer may still add to it just after a rename.
    pub close_idle: Duration,
    /// End the source once every file is read to its end (for one-off shipping and
    /// tests). Off by default: the source tails forever.
    pub stop_at_eof: bool,
}

impl FileSourceConfig {
    /// Defaults, reading the files `include` matches.
    pub fn new(include: impl IntoIterator<Item = impl Into<String>>) -> Self {
        FileSourceConfig {
            include: include.into_iter().map(Into::into).collect(),
            labels: Labels::default(),
            checkpoints: None,
            start_at: StartAt::Beginning,
            poll: Duration::from_millis(100),
            fingerprint_bytes: 256,
            max_line: MAX_LINE_BYTES,
            read_chunk: 256 * 1024,
            close_idle: Duration::from_secs(5),
            stop_at_eof: false,
        }
    }
}

/// Counters of a [`FileSource`], for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileSourceStats {
    /// Files opened.
    pub opened: u64,
    /// Files closed after rotation or deletion.
    pub closed: u64,
    /// Files found shorter than what was read (truncated, or copied and truncated):
    /// read again from their start.
    pub truncated: u64,
    /// Pieces of over-long lines.
    pub split: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Records handed out (what [`Source::ack`] counts).
    pub handed_out: u64,
}

/// Offsets kept for files not open now.
const MAX_SAVED: usize = 256;

/// Identity of a file's content: a hash of its first `len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct Fingerprint {
    len: u32,
    hash: u64,
}

/// One file's acknowledged offset, as saved.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Saved {
    fingerprint: Fingerprint,
    offset: u64,
    /// Informational, and a tie-breaker when two files share a fingerprint.
    path: PathBuf,
    inode: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedFiles {
    version: u32,
    files: Vec<Saved>,
}

/// A file's offset reached when `at` records had been handed out.
#[derive(Clone, Copy, Debug)]
struct Mark {
    at: u64,
    inode: u64,
    /// Truncations of the file so far: a mark from before one is void.
    generation: u32,
    offset: u64,
}

impl Tailed {
    /// The file's end as of the last read: what is pending ends there.
    fn read_to(&self) -> u64 {
        self.pending_at + self.pending.len() as u64
    }
}

#[derive(Debug)]
struct Tailed {
    path: PathBuf,
    file: std::fs::File,
    dev: u64,
    inode: u64,
    fingerprint: Option<Fingerprint>,
    generation: u32,
    labels: Arc<Labels>,
    /// Bytes read but not yet handed out, starting at file offset `pending_at`.
    pending: Vec<u8>,
    pending_pos: usize,
    pending_at: u64,
    /// Offset after the last line handed out, and after the last one acknowledged.
    emitted: u64,
    acked: u64,
    /// Whether its path still matches (false once rotated away or deleted).
    matched: bool,
    at_eof: bool,
    last_change: Instant,
}

/// Tails files (see [`FileSourceConfig`]). Files are their own buffer: when the sink
/// stalls, reading pauses and nothing piles up in memory beyond one chunk per file.
///
/// A file's checkpoint is the offset after the last acknowledged line, saved under the
/// fingerprint of its first bytes: a file renamed by rotation keeps its checkpoint, a
/// new file that reuses an inode does not inherit one, and a copy made by copytruncate
/// is read from where the original was. A file that shrinks is read again from its
/// start. A file deleted while open is read to its end, then closed.
#[derive(Debug)]
pub struct FileSource {
    config: FileSourceConfig,
    checkpoint: Option<CheckpointFile>,
    /// Offsets saved by an earlier run, not yet claimed by an open file.
    saved: Vec<Saved>,
    files: Vec<Tailed>,
    /// Records handed out, and for each unacknowledged one the offset after it in its
    /// file (the shipper acknowledges at least every two batches, which bounds this).
    handed_out: u64,
    marks: VecDeque<Mark>,
    next_file: usize,
    scanned_once: bool,
    last_scan: Option<Instant>,
    stats: FileSourceStats,
    ended: bool,
}

impl FileSource {
    /// A source reading what `config` includes, resuming from its checkpoints.
    pub fn new(config: FileSourceConfig) -> Result<Self> {
        if config.include.is_empty() {
            return Err(Error::InvalidInput {
                field: "file source include",
                value: String::new(),
                reason: "name at least one pattern".into(),
            });
        }
        for p in &config.include {
            glob::Pattern::new(p).map_err(|e| Error::InvalidInput {
                field: "file source include",
                value: p.clone(),
                reason: e.to_string(),
            })?;
        }
        if config.fingerprint_bytes == 0 || config.max_line < 4 || config.read_chunk == 0 {
            return Err(Error::InvalidInput {
                field: "file source config",
                value: format!(
                    "fingerprint_bytes {} max_line {} read_chunk {}",
                    config.fingerprint_bytes, config.max_line, config.read_chunk
                ),
                reason: "fingerprint_bytes and read_chunk must be at least 1, max_line at least 4".into(),
            });
        }
        let checkpoint = config.checkpoints.as_ref().map(CheckpointFile::new).transpose()?;
        let saved = match &checkpoint {
            Some(cp) => cp.load::<SavedFiles>()?.map(|s| s.files).unwrap_or_default(),
            None => Vec::new(),
        };
        Ok(FileSource {
            config,
            checkpoint,
            saved,
            files: Vec::new(),
            handed_out: 0,
            marks: VecDeque::new(),
            next_file: 0,
            scanned_once: false,
            last_scan: None,
            stats: FileSourceStats::default(),
            ended: false,
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> FileSourceStats {
        FileSourceStats { handed_out: self.handed_out, ..self.stats }
    }

    /// The files open now.
    pub fn open_files(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| f.path.clone()).collect()
    }

    /// Finds files the patterns match, opens new ones, and notes which open ones no
    /// longer match their path (rotated away, deleted).
    fn scan(&mut self) -> Result<()> {
        let mut seen: HashMap<(u64, u64), PathBuf> = HashMap::new();
        for pattern in &self.config.include {
            let paths = glob::glob(pattern).map_err(|e| Error::InvalidInput {
                field: "file source include",
                value: pattern.clone(),
                reason: e.to_string(),
            })?;
            for path in paths.flatten() {
                match std::fs::metadata(&path) {
                    Ok(meta) if meta.is_file() => {
                        seen.insert((meta.dev(), meta.ino()), path);
                    }
                    _ => {}
                }
            }
        }
        for f in &mut self.files {
            match seen.remove(&(f.dev, f.inode)) {
                Some(path) => {
                    f.matched = true;
                    f.path = path;
                }
                None => f.matched = false,
            }
        }
        let mut found: Vec<((u64, u64), PathBuf)> = seen.into_iter().collect();
        found.sort_by(|a, b| a.1.cmp(&b.1));
        for ((dev, inode), path) in found {
            if let Err(e) = self.open(&path, dev, inode) {
                // A file that vanished or cannot be read between the listing and the
                // open is looked at again next scan.
                tracing::debug!(path = %path.display(), error = %e, "cannot open matched file yet");
            }
        }
        self.scanned_once = true;
        self.last_scan = Some(Instant::now());
        Ok(())
    }

    fn open(&mut self, path: &Path, dev: u64, inode: u64) -> Result<()> {
        let file = std::fs::File::open(path).map_err(|source| Error::Io { context: format!("opening {}", path.display()), source })?;
        let meta = file.metadata().map_err(|source| Error::Io { context: format!("reading {}", path.display()), source })?;
        if (meta.dev(), meta.ino()) != (dev, inode) {
            return Err(Error::Io {
                context: format!("{} was replaced while opening", path.display()),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let size = meta.len();
        let fingerprint = fingerprint(&file, size, self.config.fingerprint_bytes)?;
        let fresh = if !self.scanned_once && self.config.start_at == StartAt::End { size } else { 0 };
        let start = match fingerprint {
            None => 0,
            Some(_) => self.claim_offset(&file, inode, size)?.unwrap_or(fresh),
        };
        let mut labels = self.config.labels.clone();
        if labels.service.is_empty() {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            labels.service = name.split('.').next().unwrap_or_default().to_owned();
        }
        labels.extra.insert("file".into(), path.display().to_string());
        tracing::debug!(path = %path.display(), offset = start, "tailing file");
        self.files.push(Tailed {
            path: path.to_owned(),
            file,
            dev,
            inode,
            fingerprint,
            generation: 0,
            labels: Arc::new(labels),
            pending: Vec::new(),
            pending_pos: 0,
            pending_at: start,
            emitted: start,
            acked: start,
            matched: true,
            at_eof: false,
            last_change: Instant::now(),
        });
        self.stats.opened += 1;
        Ok(())
    }

    /// Where to start in a newly opened file: an open file with the same first bytes (a
    /// copy made by copytruncate) hands over what it had acknowledged, else a saved
    /// checkpoint with the same first bytes (preferring one for the same inode). `None`
    /// if neither exists or the offset is past the end (the file was truncated since).
    fn claim_offset(&mut self, file: &std::fs::File, inode: u64, size: u64) -> Result<Option<u64>> {
        let mut heads = HeadHashes::new(file, size);
        // Only an open file that has shrunk since it was read (the original of a
        // copytruncate) hands over its offset: two live files that merely begin alike
        // (a common banner) are different files.
        let shrunk = |f: &Tailed| f.file.metadata().is_ok_and(|m| m.len() < f.read_to());
        for open in self.files.iter().filter(|f| f.inode != inode && shrunk(f)) {
            if let Some(fp) = open.fingerprint {
                if heads.matches(fp)? {
                    // From what the original had acknowledged: its records after that
                    // are void once it is truncated, so the copy sends them again.
                    return Ok(Some(open.acked).filter(|o| *o <= size));
                }
            }
        }
        let mut best: Option<usize> = None;
        for (i, s) in self.saved.iter().enumerate() {
            if heads.matches(s.fingerprint)?
                && best.is_none_or(|b| (s.inode == inode, s.offset) > (self.saved[b].inode == inode, self.saved[b].offset))
            {
                best = Some(i);
            }
        }
        Ok(best.map(|i| self.saved.swap_remove(i).offset).filter(|o| *o <= size))
    }

    /// Hands out up to `max` lines, visiting files in turn so that one busy file does not
    /// starve the others. Reads more from a file only when its pending lines run out.
    fn take_lines(&mut self, batch: &mut Vec<Record>, max: usize) -> Result<usize> {
        let mut n = 0;
        let count = self.files.len();
        let now = SystemTime::now();
        for step in 0..count {
            if n >= max {
                break;
            }
            let i = (self.next_file + step) % count;
            let f = &mut self.files[i];
            while n < max {
                // At the end of a file nobody writes to any more, the last line needs no
                // newline to be complete.
                let last = f.at_eof && (self.config.stop_at_eof || (!f.matched && f.last_change.elapsed() >= self.config.close_idle));
                if let Some((text, partial)) = next_line(f, self.config.max_line, last) {
                    self.stats.split += u64::from(partial);
                    batch.push(Record { timestamp: now, partial, ..Record::new(f.labels.clone(), Stream::Stdout, text) });
                    n += 1;
                    self.marks.push_back(Mark {
                        at: self.handed_out + n as u64,
                        inode: f.inode,
                        generation: f.generation,
                        offset: f.emitted,
                    });
                    continue;
                }
                let read = refill(f, self.config.read_chunk, self.config.fingerprint_bytes, &mut self.saved)?;
                self.stats.bytes += read.bytes as u64;
                self.stats.truncated += u64::from(read.truncated);
                if read.bytes == 0 {
                    let now_last =
                        f.at_eof && (self.config.stop_at_eof || (!f.matched && f.last_change.elapsed() >= self.config.close_idle));
                    if now_last && !last && f.pending_pos < f.pending.len() {
                        continue; // the unterminated tail, as a line
                    }
                    break;
                }
            }
        }
        self.next_file = (self.next_file + 1) % count.max(1);
        self.handed_out += n as u64;
        Ok(n)
    }

    /// Closes files that were rotated away or deleted, read to their end, acknowledged
    /// and idle. A rotated file's offset is kept (up to [`MAX_SAVED`] of them): its path
    /// may match again (`app.log.1` after `app.log`).
    fn close_finished(&mut self) {
        let idle = self.config.close_idle;
        let mut i = 0;
        while i < self.files.len() {
            let f = &self.files[i];
            let deleted = f.file.metadata().map(|m| m.nlink() == 0).unwrap_or(true);
            let finished = (!f.matched || deleted)
                && f.at_eof
                && f.pending_pos >= f.pending.len()
                && f.acked >= f.emitted
                && f.last_change.elapsed() >= idle;
            if !finished {
                i += 1;
                continue;
            }
            let f = self.files.swap_remove(i);
            tracing::debug!(path = %f.path.display(), deleted, "closing file");
            self.stats.closed += 1;
            if let (Some(fingerprint), false) = (f.fingerprint, deleted) {
                self.saved.push(Saved { fingerprint, offset: f.acked, path: f.path, inode: f.inode });
                if self.saved.len() > MAX_SAVED {
                    self.saved.remove(0);
                }
            }
        }
        if self.next_file >= self.files.len() {
            self.next_file = 0;
        }
    }

    fn all_at_eof(&self) -> bool {
        self.files.iter().all(|f| f.at_eof && f.pending_pos >= f.pending.len())
    }

    fn save(&self) -> Result<()> {
        let Some(cp) = &self.checkpoint else { return Ok(()) };
        let mut files: Vec<Saved> = self
            .files
            .iter()
            .filter_map(|f| f.fingerprint.map(|fingerprint| Saved { fingerprint, offset: f.acked, path: f.path.clone(), inode: f.inode }))
            .collect();
        // Offsets of files not seen this run are kept: the file may be on a volume that
        // comes back.
        files.extend(self.saved.iter().cloned());
        cp.save(&SavedFiles { version: 1, files })
    }
}

#[async_trait]
impl Source for FileSource {
    fn capabilities(&self) -> super::SourceCapabilities {
        super::SourceCapabilities::new(self.checkpoint.is_some(), true)
    }

    async fn read(&mut self, batch: &mut Vec<Record>, max: usize) -> Result<usize> {
        let max = max.max(1);
        loop {
            if self.ended {
                return Ok(0);
            }
            if self.last_scan.is_none_or(|t| t.elapsed() >= self.config.poll.max(Duration::from_millis(10)) * 10) || !self.scanned_once {
                self.scan()?;
                self.close_finished();
            }
            let n = self.take_lines(batch, max)?;
            if n > 0 {
                return Ok(n);
            }
            if self.config.stop_at_eof && self.all_at_eof() {
                self.ended = true;
                return Ok(0);
            }
            tokio::time::sleep(self.config.poll).await;
            self.scan()?;
            self.close_finished();
        }
    }

    async fn ack(&mut self, count: u64) -> Result<()> {
        let mut changed = false;
        while let Some(mark) = self.marks.front().copied() {
            if mark.at > count {
                break;
            }
            self.marks.pop_front();
            if let Some(f) = self.files.iter_mut().find(|f| f.inode == mark.inode && f.generation == mark.generation) {
                if mark.offset > f.acked {
                    f.acked = mark.offset;
                    changed = true;
                }
            }
        }
        if changed {
            self.save()?;
        }
        Ok(())
    }
}

/// What [`refill`] did.
struct Refill {
    bytes: usize,
    truncated: bool,
}

/// Reads the next chunk of `f` after what is pending. A file now shorter than what was
/// read is read again from its start.
fn refill(f: &mut Tailed, chunk: usize, fingerprint_bytes: usize, saved: &mut Vec<Saved>) -> Result<Refill> {
    let size = f.file.metadata().map_err(|source| Error::Io { context: format!("reading {}", f.path.display()), source })?.len();
    let mut truncated = false;
    if size < f.read_to() {
        // A copy made just before the truncation (copytruncate) resumes from here.
        if let Some(fingerprint) = f.fingerprint {
            saved.push(Saved { fingerprint, offset: f.acked, path: f.path.clone(), inode: f.inode });
        }
        tracing::info!(path = %f.path.display(), size, offset = f.read_to(), "file shrank; reading it again from its start");
        f.pending.clear();
        f.pending_pos = 0;
        f.pending_at = 0;
        f.emitted = 0;
        f.acked = 0;
        f.fingerprint = None;
        f.generation += 1;
        truncated = true;
    }
    if f.fingerprint.is_none_or(|fp| (fp.len as usize) < fingerprint_bytes && u64::from(fp.len) < size) {
        f.fingerprint = fingerprint(&f.file, size, fingerprint_bytes)?;
    }
    if size == f.read_to() {
        f.at_eof = true;
        return Ok(Refill { bytes: 0, truncated });
    }
    // Keep only the unread tail (an unfinished line) before reading on.
    if f.pending_pos > 0 {
        f.pending.drain(..f.pending_pos);
        f.pending_at += f.pending_pos as u64;
        f.pending_pos = 0;
    }
    let from = f.read_to();
    let want = chunk.min((size - from) as usize);
    let old = f.pending.len();
    f.pending.resize(old + want, 0);
    let got = f
        .file
        .read_at(&mut f.pending[old..], from)
        .map_err(|source| Error::Io { context: format!("reading {}", f.path.display()), source })?;
    f.pending.truncate(old + got);
    f.at_eof = f.read_to() >= size;
    f.last_change = Instant::now();
    Ok(Refill { bytes: got, truncated })
}

/// The next whole line pending in `f` (or a piece of an over-long one), advancing
/// `emitted` past it. With `last`, what remains without a newline is a line too.
fn next_line(f: &mut Tailed, max_line: usize, last: bool) -> Option<(String, bool)> {
    let rest = &f.pending[f.pending_pos..];
    if rest.is_empty() {
        return None;
    }
    let limit = rest.len().min(max_line + 1);
    let (line, used, partial) = match memchr::memchr(b'\n', &rest[..limit]) {
        Some(nl) => {
            let line = &rest[..nl];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            (line, nl + 1, false)
        }
        None if rest.len() > max_line => {
            let cut = char_boundary(&rest[..max_line]);
            (&rest[..cut], cut, true)
        }
        None if last => (rest, rest.len(), false),
        None => return None,
    };
    let text = match std::str::from_utf8(line) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(line).into_owned(),
    };
    f.pending_pos += used;
    f.emitted = f.pending_at + f.pending_pos as u64;
    Some((text, partial))
}

/// The fingerprint of a file of `size` bytes: a hash of its first `want` bytes (fewer if
/// it is shorter); `None` for an empty file.
fn fingerprint(file: &std::fs::File, size: u64, want: usize) -> Result<Option<Fingerprint>> {
    let len = (size.min(want as u64)) as usize;
    if len == 0 {
        return Ok(None);
    }
    let mut head = vec![0u8; len];
    file.read_exact_at(&mut head, 0).map_err(|source| Error::Io { context: "reading a file's first bytes".into(), source })?;
    Ok(Some(Fingerprint { len: len as u32, hash: fnv1a(&head) }))
}

/// Hashes of a file's first bytes at the lengths saved fingerprints ask for, each
/// read once.
struct HeadHashes<'a> {
    file: &'a std::fs::File,
    size: u64,
    by_len: HashMap<u32, u64>,
}

impl<'a> HeadHashes<'a> {
    fn new(file: &'a std::fs::File, size: u64) -> Self {
        HeadHashes { file, size, by_len: HashMap::new() }
    }

    fn matches(&mut self, fp: Fingerprint) -> Result<bool> {
        if u64::from(fp.len) > self.size || fp.len == 0 {
            return Ok(false);
        }
        let hash = match self.by_len.get(&fp.len) {
            Some(h) => *h,
            None => {
                let h = fingerprint(self.file, u64::from(fp.len), fp.len as usize)?.map(|f| f.hash).unwrap_or_default();
                self.by_len.insert(fp.len, h);
                h
            }
        };
        Ok(hash == fp.hash)
    }
}

/// FNV-1a 64: stable across releases and platforms (std's hasher is not), which a saved
/// fingerprint needs.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    h.write(bytes);
    h.finish()
}

struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}
