//! Docker container logs (feature `docker`): every running container matching the
//! filters, followed with timestamps from a per-container checkpoint, across json-file
//! rotation and daemon restarts.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::query_parameters::{EventsOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder, LogsOptionsBuilder};
use bollard::Docker;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::Source;
use crate::checkpoint::CheckpointFile;
use crate::error::{Error, Result};
use crate::record::{Labels, Record, Stream};

/// Settings of a [`DockerSource`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DockerSourceConfig {
    /// The engine's socket (default `/var/run/docker.sock`).
    pub socket: PathBuf,
    /// Only containers with these labels (`key` or `key=value`, all must match); empty
    /// follows every container.
    pub label_filter: Vec<String>,
    /// The container label naming the service (default: the container's name).
    pub service_label: Option<String>,
    /// The node label of every record.
    pub node: Option<String>,
    /// Where each container's last acknowledged timestamp is kept.
    pub checkpoints: Option<PathBuf>,
    /// A log stream silent this long while its container runs is opened again (the
    /// engine's streams can stop after json-file rotation, moby#37646; default 30 s).
    pub idle_reconnect: Duration,
    /// How often the container list is read besides the engine's events (default 5 s).
    pub rescan: Duration,
    /// Records waiting for the sink at most (default 4096); beyond that the streams are
    /// not read, and the engine's own log files hold the rest.
    pub buffer: usize,
}

impl Default for DockerSourceConfig {
    fn default() -> Self {
        DockerSourceConfig {
            socket: PathBuf::from("/var/run/docker.sock"),
            label_filter: Vec::new(),
            service_label: None,
            node: None,
            checkpoints: None,
            idle_reconnect: Duration::from_secs(30),
            rescan: Duration::from_secs(5),
            buffer: 4096,
        }
    }
}

/// Nanoseconds since the epoch of a log line, as the engine stamped it.
type Nanos = u64;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    version: u32,
    /// Container id → timestamp of its last acknowledged line.
    containers: HashMap<String, Nanos>,
}

struct Line {
    container: String,
    at: Nanos,
    record: Record,
}

/// Follows container logs (see [`DockerSourceConfig`]).
///
/// Lines come with the engine's timestamps; a container's checkpoint is the timestamp of
/// its last acknowledged line. The logs API's `since` takes whole seconds (moby#41784),
/// so a stream is reopened from the checkpoint's second and lines at or before the
/// checkpoint are dropped. A stream that ends while its container runs, or goes silent
/// for `idle_reconnect`, is reopened the same way; a daemon that restarts is waited for.
/// The engine's json-file is the buffer: while the sink stalls nothing is read, and
/// what rotation deletes before it is read is lost to every reader (size the engine's
/// `max-size`/`max-file` for the longest stall you want to survive).
pub struct DockerSource {
    rx: mpsc::Receiver<Line>,
    handed_out: u64,
    marks: VecDeque<(u64, String, Nanos)>,
    acked: Arc<Mutex<HashMap<String, Nanos>>>,
    checkpoint: Option<CheckpointFile>,
    supervisor: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for DockerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerSource").field("handed_out", &self.handed_out).finish_non_exhaustive()
    }
}

impl Drop for DockerSource {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}

impl DockerSource {
    /// Starts following; the engine need not be up yet.
    pub fn start(config: DockerSourceConfig) -> Result<Self> {
        if config.buffer == 0 {
            return Err(Error::InvalidInput { field: "docker source buffer", value: "0".into(), reason: "must be at least 1".into() });
        }
        let docker = Docker::connect_with_unix(&config.socket.to_string_lossy(), 120, bollard::API_DEFAULT_VERSION).map_err(|e| {
            Error::InvalidInput { field: "docker socket", value: config.socket.display().to_string(), reason: e.to_string() }
        })?;
        let checkpoint = config.checkpoints.as_ref().map(CheckpointFile::new).transpose()?;
        let saved: Saved = match &checkpoint {
            Some(cp) => cp.load()?.unwrap_or_default(),
            None => Saved::default(),
        };
        let acked = Arc::new(Mutex::new(saved.containers));
        let (tx, rx) = mpsc::channel(config.buffer);
        let supervisor = tokio::spawn(supervise(docker, Arc::new(config), acked.clone(), tx));
        Ok(DockerSource { rx, handed_out: 0, marks: VecDeque::new(), acked, checkpoint, supervisor })
    }
}

#[async_trait]
impl Source for DockerSource {
    fn capabilities(&self) -> super::SourceCapabilities {
        super::SourceCapabilities::new(self.checkpoint.is_some(), true)
    }

    async fn read(&mut self, batch: &mut Vec<Record>, max: usize) -> Result<usize> {
        let mut lines = Vec::new();
        let n = self.rx.recv_many(&mut lines, max.max(1)).await;
        for line in lines {
            self.handed_out += 1;
            self.marks.push_back((self.handed_out, line.container, line.at));
            batch.push(line.record);
        }
        Ok(n)
    }

    async fn ack(&mut self, count: u64) -> Result<()> {
        let mut changed = false;
        {
            let mut acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
            while self.marks.front().is_some_and(|(c, _, _)| *c <= count) {
                if let Some((_, container, at)) = self.marks.pop_front() {
                    let entry = acked.entry(container).or_default();
                    if at > *entry {
                        *entry = at;
                        changed = true;
                    }
                }
            }
        }
        if let (true, Some(cp)) = (changed, &self.checkpoint) {
            let containers = self.acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
            cp.save(&Saved { version: 1, containers })?;
        }
        Ok(())
    }
}

/// Keeps one follower per running container, learning of new ones from events and from
/// the container list; waits out a daemon that is down.
async fn supervise(docker: Docker, config: Arc<DockerSourceConfig>, acked: Arc<Mutex<HashMap<String, Nanos>>>, tx: mpsc::Sender<Line>) {
    let mut followers: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    // The newest line handed on per container (acknowledged or not): where a reopened
    // stream continues.
    let emitted: Arc<Mutex<HashMap<String, Nanos>>> = Arc::default();
    let filters: HashMap<String, Vec<String>> =
        if config.label_filter.is_empty() { HashMap::new() } else { HashMap::from([("label".to_owned(), config.label_filter.clone())]) };
    loop {
        if tx.is_closed() {
            return;
        }
        followers.retain(|_, h| !h.is_finished());
        let listed = docker.list_containers(Some(ListContainersOptionsBuilder::new().filters(&filters).build())).await;
        match listed {
            Ok(containers) => {
                for c in containers {
                    let Some(id) = c.id.clone() else { continue };
                    if followers.contains_key(&id) {
                        continue;
                    }
                    let name = c
                        .names
                        .as_ref()
                        .and_then(|n| n.first())
                        .map(|n| n.trim_start_matches('/').to_owned())
                        .unwrap_or_else(|| id[..12.min(id.len())].to_owned());
                    let service =
                        config.service_label.as_ref().and_then(|l| c.labels.as_ref()?.get(l).cloned()).unwrap_or_else(|| name.clone());
                    let mut labels = Labels::new(service, name).with_container(id[..12.min(id.len())].to_owned());
                    labels.image = c.image.clone();
                    labels.node = config.node.clone();
                    let start = {
                        let seen = emitted.lock().unwrap_or_else(|p| p.into_inner()).get(&id).copied();
                        seen.or_else(|| acked.lock().unwrap_or_else(|p| p.into_inner()).get(&id).copied()).unwrap_or(0)
                    };
                    let follower = follow(docker.clone(), id.clone(), Arc::new(labels), start, config.clone(), emitted.clone(), tx.clone());
                    followers.insert(id, tokio::spawn(follower));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "docker not answering; waiting");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        // Until a container starts (or the rescan is due), wait on the engine's events.
        let options = EventsOptionsBuilder::new()
            .filters(&HashMap::from([("type".to_owned(), vec!["container".to_owned()]), ("event".to_owned(), vec!["start".to_owned()])]))
            .build();
        let mut events = docker.events(Some(options));
        let _ = tokio::time::timeout(config.rescan, events.next()).await;
    }
}

/// Reads one container's log from `from` (exclusive) until the container stops,
/// reopening the stream after it ends or goes silent while the container runs.
async fn follow(
    docker: Docker,
    id: String,
    labels: Arc<Labels>,
    mut from: Nanos,
    config: Arc<DockerSourceConfig>,
    emitted: Arc<Mutex<HashMap<String, Nanos>>>,
    tx: mpsc::Sender<Line>,
) {
    loop {
        let since = i32::try_from(from / 1_000_000_000).unwrap_or(0);
        let options = LogsOptionsBuilder::new().follow(true).stdout(true).stderr(true).timestamps(true).since(since).build();
        let mut frames = docker.logs(&id, Some(options));
        loop {
            let frame = match tokio::time::timeout(config.idle_reconnect, frames.next()).await {
                Err(_) => break,
                Ok(None) | Ok(Some(Err(_))) => break,
                Ok(Some(Ok(frame))) => frame,
            };
            if !forward(frame, &id, &labels, &mut from, &emitted, &tx).await {
                return;
            }
        }
        // The stream ended or went silent: reopen while the container runs.
        match docker.inspect_container(&id, None::<InspectContainerOptions>).await {
            Ok(c) if c.state.as_ref().and_then(|s| s.running) == Some(true) => {
                tracing::debug!(container = %id, "reopening the log stream");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(_) => {
                // Stopped: read what is left once more, then end (the supervisor starts a
                // new follower if it runs again).
                let options = LogsOptionsBuilder::new()
                    .follow(false)
                    .stdout(true)
                    .stderr(true)
                    .timestamps(true)
                    .since(i32::try_from(from / 1_000_000_000).unwrap_or(0))
                    .build();
                let mut rest = docker.logs(&id, Some(options));
                while let Some(Ok(frame)) = rest.next().await {
                    if !forward(frame, &id, &labels, &mut from, &emitted, &tx).await {
                        return;
                    }
                }
                return;
            }
            Err(e) => {
                // The daemon is gone (restarting): the supervisor starts a follower again
                // once the container runs.
                tracing::debug!(container = %id, error = %e, "docker not answering; this follower ends");
                return;
            }
        }
    }
}

/// Hands on the lines of `frame` stamped after `from`, advancing it; `false` once the
/// source is gone.
async fn forward(
    frame: LogOutput,
    id: &str,
    labels: &Arc<Labels>,
    from: &mut Nanos,
    emitted: &Mutex<HashMap<String, Nanos>>,
    tx: &mpsc::Sender<Line>,
) -> bool {
    let (stream, bytes) = match frame {
        LogOutput::StdErr { message } => (Stream::Stderr, message),
        LogOutput::StdOut { message } | LogOutput::Console { message } => (Stream::Stdout, message),
        LogOutput::StdIn { .. } => return true,
    };
    for piece in bytes.split_inclusive(|b| *b == b'\n') {
        let Some((at, record)) = parse_line(piece, stream, labels) else { continue };
        if at <= *from {
            continue; // sent before: `since` is whole seconds
        }
        *from = at;
        emitted.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_owned(), at);
        if tx.send(Line { container: id.to_owned(), at, record }).await.is_err() {
            return false;
        }
    }
    true
}

/// `2026-12-01T10:00:00.123456789Z text\n` → its timestamp and record; a piece without
/// a newline is one of the engine's 16 KiB pieces of a longer line (partial).
fn parse_line(piece: &[u8], stream: Stream, labels: &Arc<Labels>) -> Option<(Nanos, Record)> {
    let sp = memchr::memchr(b' ', piece)?;
    let ts = std::str::from_utf8(&piece[..sp]).ok()?;
    let time = humantime::parse_rfc3339_weak(ts).ok()?;
    let at = u64::try_from(time.duration_since(UNIX_EPOCH).ok()?.as_nanos()).ok()?;
    let mut text = &piece[sp + 1..];
    let partial = text.last() != Some(&b'\n');
    if !partial {
        text = &text[..text.len() - 1];
        text = text.strip_suffix(b"\r").unwrap_or(text);
    }
    let mut record = Record::new(labels.clone(), stream, String::from_utf8_lossy(text).into_owned());
    record.timestamp = SystemTime::UNIX_EPOCH + Duration::from_nanos(at);
    record.partial = partial;
    Some((at, record))
}
