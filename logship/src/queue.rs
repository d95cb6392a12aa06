//! A byte-capped queue on disk, for sources that cannot pause (a syslog receiver, a
//! stream that would otherwise grow in memory): records go to segment files as JSON
//! lines, are read back in order, and leave the disk once acknowledged.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::checkpoint::CheckpointFile;
use crate::error::{Error, Result};
use crate::record::Record;
use crate::source::Source;

/// What a full queue does with more records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    /// `push` waits until acknowledgements make room: the writer (a TCP sender, say)
    /// is held back.
    #[default]
    Block,
    /// The oldest segment not yet acknowledged is deleted to make room; every record in
    /// it that was not yet read is counted as dropped.
    DropOldest,
}

/// Settings of a [`DiskQueue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiskQueueConfig {
    /// Bytes on disk at most, not yet acknowledged (default 256 MiB).
    pub max_bytes: u64,
    /// Bytes per segment file (default 8 MiB); space is freed a segment at a time.
    pub segment_bytes: u64,
    /// What a full queue does.
    pub overflow: Overflow,
}

impl Default for DiskQueueConfig {
    fn default() -> Self {
        DiskQueueConfig { max_bytes: 256 << 20, segment_bytes: 8 << 20, overflow: Overflow::Block }
    }
}

/// Counters of a [`DiskQueue`], for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiskQueueStats {
    /// Records written.
    pub pushed: u64,
    /// Records dropped by [`Overflow::DropOldest`].
    pub dropped: u64,
    /// Lines on disk that did not parse (a torn write, a damaged file): skipped.
    pub corrupt: u64,
    /// Bytes on disk not yet acknowledged.
    pub bytes: u64,
}

/// A position: a segment and a byte offset in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Cursor {
    segment: u64,
    offset: u64,
}

#[derive(Debug)]
struct Segment {
    id: u64,
    bytes: u64,
}

#[derive(Debug)]
struct Inner {
    segments: VecDeque<Segment>,
    writer: Option<File>,
    read: Cursor,
    reader: Option<(u64, BufReader<File>)>,
    acked: Cursor,
    handed_out: u64,
    marks: VecDeque<(u64, Cursor)>,
}

/// The queue: push records in, read them back through [`DiskQueue::source`].
///
/// Records pushed survive a crash of the process (they are in the page cache; segments
/// are not synced, so a power loss may take the last ones). A read record leaves the
/// disk once acknowledged: after a restart, reading resumes at the first record not
/// acknowledged.
#[derive(Debug)]
pub struct DiskQueue {
    dir: PathBuf,
    config: DiskQueueConfig,
    checkpoint: CheckpointFile,
    inner: Mutex<Inner>,
    data: Notify,
    space: Notify,
    pushed: AtomicU64,
    dropped: AtomicU64,
    corrupt: AtomicU64,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

impl DiskQueue {
    /// Opens (or creates) the queue in `dir`, resuming after its last acknowledgement.
    pub fn open(dir: impl Into<PathBuf>, config: DiskQueueConfig) -> Result<Arc<DiskQueue>> {
        let dir = dir.into();
        if config.segment_bytes == 0 || config.max_bytes < config.segment_bytes * 2 {
            return Err(Error::InvalidInput {
                field: "disk queue size",
                value: format!("max_bytes {} segment_bytes {}", config.max_bytes, config.segment_bytes),
                reason: "segments must be at least 1 byte and max_bytes at least two segments".into(),
            });
        }
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let checkpoint = CheckpointFile::new(dir.join("acked.json"))?;
        let acked: Cursor = checkpoint.load()?.unwrap_or_default();
        let mut ids: Vec<u64> = std::fs::read_dir(&dir)
            .map_err(io(format!("listing {}", dir.display())))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("seg-")?.strip_suffix(".ndjson")?.parse().ok())
            .collect();
        ids.sort_unstable();
        let mut segments = VecDeque::new();
        for id in ids {
            let path = segment_path(&dir, id);
            if id < acked.segment {
                std::fs::remove_file(&path).map_err(io(format!("removing {}", path.display())))?;
                continue;
            }
            segments.push_back(Segment { id, bytes: trim_torn_tail(&path)? });
        }
        let start = if segments.front().is_some_and(|s| s.id == acked.segment) {
            acked
        } else {
            Cursor { segment: segments.front().map_or(acked.segment, |s| s.id), offset: 0 }
        };
        let queue = DiskQueue {
            dir,
            config,
            checkpoint,
            inner: Mutex::new(Inner {
                segments,
                writer: None,
                read: start,
                reader: None,
                acked: start,
                handed_out: 0,
                marks: VecDeque::new(),
            }),
            data: Notify::new(),
            space: Notify::new(),
            pushed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
        };
        Ok(Arc::new(queue))
    }

    /// Counters so far.
    pub fn stats(&self) -> DiskQueueStats {
        let inner = self.lock();
        DiskQueueStats {
            pushed: self.pushed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            corrupt: self.corrupt.load(Ordering::Relaxed),
            bytes: used(&inner),
        }
    }

    /// The queue as a [`Source`] (one reader at a time: acknowledgements count the
    /// records it handed out).
    pub fn source(self: &Arc<Self>) -> QueueSource {
        QueueSource { queue: self.clone(), drain: false }
    }

    /// A source that ends once it has read everything in the queue (to drain a queue
    /// left behind, say).
    pub fn draining_source(self: &Arc<Self>) -> QueueSource {
        QueueSource { queue: self.clone(), drain: true }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `records`. Under [`Overflow::Block`] this waits while the queue is full.
    pub async fn push(&self, records: &[Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut text = String::with_capacity(records.len() * 128);
        for r in records {
            r.write_json(&mut text);
            text.push('\n');
        }
        let len = text.len() as u64;
        loop {
            let wait = self.space.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            {
                let mut inner = self.lock();
                // A batch bigger than the whole queue goes in alone rather than never.
                let full = used(&inner) + len > self.config.max_bytes && used(&inner) > 0;
                if !full {
                    self.write(&mut inner, text.as_bytes())?;
                    self.pushed.fetch_add(records.len() as u64, Ordering::Relaxed);
                    drop(inner);
                    self.data.notify_waiters();
                    return Ok(());
                }
                if self.config.overflow == Overflow::DropOldest && self.drop_oldest(&mut inner)? {
                    continue; // room was made: look again
                }
            }
            // Block: an acknowledgement makes room.
            wait.await;
        }
    }

    fn write(&self, inner: &mut Inner, bytes: &[u8]) -> Result<()> {
        if inner.segments.back().is_none_or(|s| s.bytes >= self.config.segment_bytes) {
            self.new_segment(inner)?;
        }
        if inner.writer.is_none() {
            // Reopened after a restart: append to the last segment.
            let id = inner.segments.back().map_or(0, |s| s.id);
            let path = segment_path(&self.dir, id);
            inner.writer = Some(std::fs::OpenOptions::new().append(true).open(&path).map_err(io(format!("opening {}", path.display())))?);
        }
        let id = inner.segments.back().map_or(0, |s| s.id);
        let Some(file) = inner.writer.as_mut() else { return Ok(()) };
        file.write_all(bytes).map_err(io(format!("writing {}", segment_path(&self.dir, id).display())))?;
        if let Some(s) = inner.segments.back_mut() {
            s.bytes += bytes.len() as u64;
        }
        Ok(())
    }

    /// Starts the next segment file and writes to it from now on.
    fn new_segment(&self, inner: &mut Inner) -> Result<()> {
        let id = inner.segments.back().map_or(inner.acked.segment.max(inner.read.segment), |s| s.id + 1);
        let path = segment_path(&self.dir, id);
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io(format!("creating {}", path.display())))?;
        inner.segments.push_back(Segment { id, bytes: 0 });
        inner.writer = Some(file);
        Ok(())
    }

    /// Deletes the oldest segment to make room, counting its unread records as dropped.
    /// `false` if only the segment being written is left.
    fn drop_oldest(&self, inner: &mut Inner) -> Result<bool> {
        if inner.segments.is_empty() {
            return Ok(false);
        }
        if inner.segments.len() < 2 {
            // Writing moves on to a new segment, so the full one can go.
            self.new_segment(inner)?;
        }
        let Some(old) = inner.segments.pop_front() else { return Ok(false) };
        let path = segment_path(&self.dir, old.id);
        let unread_from = if inner.read.segment == old.id {
            inner.read.offset
        } else if inner.read.segment > old.id {
            old.bytes
        } else {
            0
        };
        let dropped = count_lines_from(&path, unread_from).unwrap_or(0);
        std::fs::remove_file(&path).map_err(io(format!("removing {}", path.display())))?;
        self.dropped.fetch_add(dropped, Ordering::Relaxed);
        tracing::warn!(segment = old.id, dropped, "disk queue full: dropped its oldest segment");
        let next = Cursor { segment: inner.segments.front().map_or(old.id + 1, |s| s.id), offset: 0 };
        if inner.read.segment <= old.id {
            inner.read = next;
            inner.reader = None;
        }
        if inner.acked.segment <= old.id {
            inner.acked = next;
            self.checkpoint.save(&inner.acked)?;
        }
        Ok(true)
    }

    /// Up to `max` records from the read cursor; none if nothing is there yet.
    fn read_some(&self, batch: &mut Vec<Record>, max: usize) -> Result<usize> {
        let mut inner = self.lock();
        let mut n = 0;
        let mut line = Vec::new();
        while n < max {
            let Inner { segments, read, reader, .. } = &mut *inner;
            let Some(segment) = segments.iter().find(|s| s.id == read.segment) else { break };
            if read.offset >= segment.bytes {
                // This segment is read; move on if a later one exists.
                match segments.iter().find(|s| s.id > read.segment) {
                    Some(next) => {
                        *read = Cursor { segment: next.id, offset: 0 };
                        *reader = None;
                        continue;
                    }
                    None => break,
                }
            }
            if reader.as_ref().is_none_or(|(id, _)| *id != read.segment) {
                let path = segment_path(&self.dir, read.segment);
                let mut file = File::open(&path).map_err(io(format!("opening {}", path.display())))?;
                file.seek(SeekFrom::Start(read.offset)).map_err(io(format!("seeking {}", path.display())))?;
                *reader = Some((read.segment, BufReader::with_capacity(256 * 1024, file)));
            }
            let Some((_, r)) = reader.as_mut() else { break };
            line.clear();
            let got = r.read_until(b'\n', &mut line).map_err(io(format!("reading {}", segment_path(&self.dir, read.segment).display())))?;
            if got == 0 || line.last() != Some(&b'\n') {
                // The writer is mid-line: read it whole next time.
                *reader = None;
                break;
            }
            read.offset += got as u64;
            match std::str::from_utf8(&line).ok().map(Record::from_json) {
                Some(Ok(record)) => {
                    batch.push(record);
                    n += 1;
                    inner.handed_out += 1;
                    let (count, at) = (inner.handed_out, inner.read);
                    inner.marks.push_back((count, at));
                }
                _ => {
                    self.corrupt.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(n)
    }

    fn ack(&self, count: u64) -> Result<()> {
        let mut inner = self.lock();
        let mut to = None;
        while inner.marks.front().is_some_and(|(c, _)| *c <= count) {
            to = inner.marks.pop_front().map(|(_, at)| at);
        }
        let Some(to) = to.filter(|t| *t > inner.acked) else { return Ok(()) };
        inner.acked = to;
        // Segments wholly before the acknowledged position leave the disk.
        let mut freed = false;
        while inner.segments.len() > 1 && inner.segments.front().is_some_and(|s| s.id < to.segment) {
            if let Some(old) = inner.segments.pop_front() {
                let path = segment_path(&self.dir, old.id);
                std::fs::remove_file(&path).map_err(io(format!("removing {}", path.display())))?;
                freed = true;
            }
        }
        self.checkpoint.save(&inner.acked)?;
        drop(inner);
        if freed || self.config.overflow == Overflow::Block {
            self.space.notify_waiters();
        }
        Ok(())
    }
}

/// Bytes on disk from the acknowledged position on.
fn used(inner: &Inner) -> u64 {
    inner
        .segments
        .iter()
        .map(|s| {
            if s.id == inner.acked.segment {
                s.bytes.saturating_sub(inner.acked.offset)
            } else if s.id > inner.acked.segment {
                s.bytes
            } else {
                0
            }
        })
        .sum()
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("seg-{id:012}.ndjson"))
}

/// Cuts a segment after its last newline (a write torn by a crash) and returns its size.
fn trim_torn_tail(path: &Path) -> Result<u64> {
    let bytes = std::fs::read(path).map_err(io(format!("reading {}", path.display())))?;
    let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if keep < bytes.len() {
        let f = std::fs::OpenOptions::new().write(true).open(path).map_err(io(format!("opening {}", path.display())))?;
        f.set_len(keep as u64).map_err(io(format!("trimming {}", path.display())))?;
        tracing::warn!(path = %path.display(), bytes = bytes.len() - keep, "trimmed a torn write from the disk queue");
    }
    Ok(keep as u64)
}

fn count_lines_from(path: &Path, offset: u64) -> std::io::Result<u64> {
    let bytes = std::fs::read(path)?;
    let from = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
    Ok(memchr::memchr_iter(b'\n', &bytes[from..]).count() as u64)
}

/// The reading side of a [`DiskQueue`]: waits for records, or ends when the queue is
/// empty if it was made by [`DiskQueue::draining_source`].
#[derive(Debug)]
pub struct QueueSource {
    queue: Arc<DiskQueue>,
    drain: bool,
}

#[async_trait]
impl Source for QueueSource {
    fn capabilities(&self) -> crate::source::SourceCapabilities {
        crate::source::SourceCapabilities::new(true, true)
    }

    async fn read(&mut self, batch: &mut Vec<Record>, max: usize) -> Result<usize> {
        loop {
            let wait = self.queue.data.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            let n = self.queue.read_some(batch, max.max(1))?;
            if n > 0 || self.drain {
                return Ok(n);
            }
            // Also wake now and then: a writer mid-line notifies only once it is whole.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(200), wait).await;
        }
    }

    async fn ack(&mut self, count: u64) -> Result<()> {
        self.queue.ack(count)
    }
}
