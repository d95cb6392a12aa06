//! `ProcessDriver`: runs tasks as local processes, each in its own process group.
//!
//! Signals go to the whole group, so a task's children stop with it; after the leader
//! exits, the group gets a SIGKILL too, so nothing it started outlives it. Dropping the
//! driver kills every group it still runs.

use std::collections::{HashMap, VecDeque};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::StreamExt;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{broadcast, watch};
use tokio_stream::wrappers::BroadcastStream;

use crate::driver::{Driver, DriverCapabilities, Output, OutputLine, OutputStream, TaskSpec, TaskState, TaskStatus};
use crate::error::{Error, Result};

const BACKEND: &str = "process";

/// Lines of output kept per task for late readers.
pub const OUTPUT_TAIL: usize = 1000;

/// Runs tasks as local child processes.
#[derive(Debug, Default)]
pub struct ProcessDriver {
    tasks: Mutex<HashMap<String, Arc<Task>>>,
}

#[derive(Debug)]
struct Task {
    pgid: i32,
    labels: std::collections::BTreeMap<String, String>,
    started_at: SystemTime,
    state: watch::Receiver<TaskState>,
    output: Mutex<OutputBuffer>,
}

#[derive(Debug)]
struct OutputBuffer {
    tail: VecDeque<OutputLine>,
    /// `None` once both streams reached EOF: readers then see the stream end.
    live: Option<broadcast::Sender<OutputLine>>,
    open_streams: u8,
}

impl ProcessDriver {
    /// A driver with no tasks.
    pub fn new() -> Self {
        ProcessDriver::default()
    }

    fn get(&self, id: &str) -> Result<Arc<Task>> {
        self.lock().get(id).cloned().ok_or_else(|| Error::NotFound { kind: "task", name: id.to_owned() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Task>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Task {
    fn status(&self, id: &str) -> TaskStatus {
        TaskStatus { id: id.to_owned(), state: *self.state.borrow(), labels: self.labels.clone(), started_at: self.started_at }
    }

    fn signal(&self, sig: Signal) {
        // ESRCH (group already gone) is the normal end of the story, not an error.
        let _ = killpg(Pid::from_raw(self.pgid), sig);
    }

    async fn wait_exit(&self, limit: Duration) -> bool {
        let mut rx = self.state.clone();
        let exited = tokio::time::timeout(limit, rx.wait_for(|s| s.is_exited())).await.is_ok();
        exited
    }
}

fn pump(task: Arc<Task>, stream: OutputStream, reader: impl AsyncRead + Unpin + Send + 'static) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf);
                    let line = OutputLine { stream, line: text.trim_end_matches(['\n', '\r']).to_owned(), timestamp: SystemTime::now() };
                    let mut out = task.output.lock().unwrap_or_else(|p| p.into_inner());
                    if out.tail.len() == OUTPUT_TAIL {
                        out.tail.pop_front();
                    }
                    out.tail.push_back(line.clone());
                    if let Some(live) = &out.live {
                        let _ = live.send(line);
                    }
                }
            }
        }
        let mut out = task.output.lock().unwrap_or_else(|p| p.into_inner());
        out.open_streams -= 1;
        if out.open_streams == 0 {
            out.live = None;
        }
    });
}

#[async_trait]
impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> DriverCapabilities {
        DriverCapabilities::new(false, false)
    }

    async fn start(&self, spec: TaskSpec) -> Result<TaskStatus> {
        spec.validate()?;
        // Silently running without the isolation asked for would be worse than refusing.
        if spec.limits.is_some() || !spec.ports.is_empty() || !spec.mounts.is_empty() || spec.network.is_some() {
            return Err(Error::Unsupported { operation: "limits, published ports, mounts or networks", backend: "process" });
        }
        if let Some(existing) = self.lock().get(&spec.id) {
            if !existing.state.borrow().is_exited() {
                return Err(Error::Conflict { kind: "task", name: spec.id });
            }
        }
        let mut cmd = tokio::process::Command::new(&spec.command[0]);
        cmd.args(&spec.command[1..])
            .envs(&spec.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &spec.working_dir {
            cmd.current_dir(dir);
        }
        let mut child =
            cmd.spawn().map_err(|e| Error::invalid("command", &spec.command[0], format!("task {:?} could not start: {e}", spec.id)))?;
        let pgid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| Error::Backend { backend: BACKEND, source: "child has no pid".into() })?;
        let (state_tx, state_rx) = watch::channel(TaskState::Running);
        let (live, _) = broadcast::channel(1024);
        let task = Arc::new(Task {
            pgid,
            labels: spec.labels.clone(),
            started_at: SystemTime::now(),
            state: state_rx,
            output: Mutex::new(OutputBuffer { tail: VecDeque::new(), live: Some(live), open_streams: 2 }),
        });
        if let Some(out) = child.stdout.take() {
            pump(task.clone(), OutputStream::Stdout, out);
        }
        if let Some(err) = child.stderr.take() {
            pump(task.clone(), OutputStream::Stderr, err);
        }
        let reaper = task.clone();
        let id = spec.id.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // Whatever the leader left in its group goes with it.
            reaper.signal(Signal::SIGKILL);
            let state = match status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    TaskState::Exited { code: s.code(), signal: s.signal() }
                }
                Err(_) => TaskState::Exited { code: None, signal: None },
            };
            tracing::debug!(task = %id, ?state, "task exited");
            let _ = state_tx.send(state);
        });
        tracing::info!(task = %spec.id, pgid, program = %spec.command[0], "task started");
        let status = task.status(&spec.id);
        self.lock().insert(spec.id, task);
        Ok(status)
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<TaskStatus> {
        let task = self.get(id)?;
        if !task.state.borrow().is_exited() {
            task.signal(Signal::SIGTERM);
            if !task.wait_exit(grace).await {
                tracing::info!(task = %id, ?grace, "grace period over; killing");
                task.signal(Signal::SIGKILL);
                if !task.wait_exit(Duration::from_secs(10)).await {
                    return Err(Error::Timeout { operation: "stop", after: grace + Duration::from_secs(10) });
                }
            }
        }
        Ok(task.status(id))
    }

    async fn inspect(&self, id: &str) -> Result<TaskStatus> {
        Ok(self.get(id)?.status(id))
    }

    async fn output(&self, id: &str) -> Result<Output> {
        let task = self.get(id)?;
        let out = task.output.lock().unwrap_or_else(|p| p.into_inner());
        // Snapshot and subscription under one lock: no line is missed or repeated.
        let past: Vec<OutputLine> = out.tail.iter().cloned().collect();
        let live = out.live.as_ref().map(|l| BroadcastStream::new(l.subscribe()).filter_map(|r| async move { r.ok() }));
        let past = futures::stream::iter(past);
        Ok(match live {
            Some(live) => past.chain(live).boxed(),
            None => past.boxed(),
        })
    }

    async fn list(&self) -> Result<Vec<TaskStatus>> {
        let mut all: Vec<TaskStatus> = self.lock().iter().map(|(id, t)| t.status(id)).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    async fn remove(&self, id: &str) -> Result<()> {
        let mut tasks = self.lock();
        match tasks.get(id) {
            None => Err(Error::NotFound { kind: "task", name: id.to_owned() }),
            Some(t) if !t.state.borrow().is_exited() => Err(Error::Conflict { kind: "running task", name: id.to_owned() }),
            Some(_) => {
                tasks.remove(id);
                Ok(())
            }
        }
    }
}

impl Drop for ProcessDriver {
    fn drop(&mut self) {
        for task in self.lock().values() {
            if !task.state.borrow().is_exited() {
                task.signal(Signal::SIGKILL);
            }
        }
    }
}
