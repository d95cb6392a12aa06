//! `ProcessDriver`: runs tasks as local processes, each in its own process group.
//!
//! Signals go to the whole group, so a task's children stop with it; after the leader
//! exits, the group gets a SIGKILL too, so nothing it started outlives it. A supervisor
//! per task restarts it after a failure when its spec has a [`RestartPolicy`], with a
//! doubling backoff.
//!
//! Two modes:
//! - [`ProcessDriver::new`]: tasks belong to the driver; output goes through pipes, and
//!   dropping the driver kills every group it still runs.
//! - [`ProcessDriver::persistent`]: tasks outlive the driver (an agent restart). Each
//!   task's spec, pid and start time are recorded in a state directory and its output
//!   appended to files there; a driver started on the same directory adopts the tasks
//!   still running (the same process, checked by start time, never a reused pid), and
//!   applies their restart policy to those that ended meanwhile. The exit code of an
//!   adopted process is unknowable (it is not our child): it exits with `code: None`.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::StreamExt;
use keelson_logship::LineReader;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncRead;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::BroadcastStream;

use crate::runtime::cgroups::Cgroups;
use crate::runtime::driver::{Driver, DriverCapabilities, Output};
use crate::runtime::task_network::ProcessNetwork;

use crate::error::{Error, Result};
use crate::runtime::process_record::{start_ticks, still_running, StateDir, TaskRecord};
use crate::task::{OutputLine, OutputStream, TaskSpec, TaskState, TaskStatus, MAX_LINE_BYTES};

const BACKEND: &str = "process";
/// Where the control-group file systems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Lines of output kept per task for late readers.
pub const OUTPUT_TAIL: usize = 1000;
/// Bytes of output kept per task for late readers (whichever of this and
/// [`OUTPUT_TAIL`] is reached first bounds the tail).
pub const OUTPUT_TAIL_BYTES: usize = 1024 * 1024;
/// Lines a live reader may fall behind before it misses some (counted in
/// [`TaskStatus::output_lines_dropped`]): the task itself is never slowed by a reader.
const LIVE_BACKLOG: usize = 128;

/// How often an adopted process (not our child: no exit notification) is checked.
const ADOPTED_POLL: Duration = Duration::from_millis(200);
/// How often output files are read for new lines.
const TAIL_POLL: Duration = Duration::from_millis(100);

/// Runs tasks as local child processes.
#[derive(Debug)]
pub struct ProcessDriver {
    tasks: Mutex<HashMap<String, Arc<Task>>>,
    state_dir: Option<StateDir>,
    /// Set when a persistent driver is dropped: supervisors let go of their processes,
    /// which keep running for the next driver to adopt.
    detached: watch::Sender<bool>,
    metrics: OutputMetrics,
    /// Where tasks with limits get their control group; `None`: limits are refused.
    cgroups: Option<Cgroups>,
    /// The keelson network tasks get namespaces on; `None`: they share the host's.
    network: Option<ProcessNetwork>,
}

impl Default for ProcessDriver {
    fn default() -> Self {
        ProcessDriver {
            tasks: Mutex::new(HashMap::new()),
            state_dir: None,
            detached: watch::channel(false).0,
            metrics: OutputMetrics::default(),
            cgroups: Cgroups::detect(Path::new(CGROUP_ROOT)),
            network: None,
        }
    }
}

/// What happened to task output, over every task of a driver.
#[derive(Clone, Debug, Default)]
struct OutputMetrics {
    split: prometheus_client::metrics::counter::Counter,
    dropped: prometheus_client::metrics::counter::Counter,
}

#[derive(Debug)]
struct Task {
    pgid: AtomicI32,
    /// For a task adopted from a record: the recorded start time of its group leader
    /// (pid = pgid). Every signal first checks that this process still leads that group;
    /// 0 for a task this driver spawned (it holds the child, so the pid is still its own).
    adopted_ticks: AtomicU64,
    labels: std::collections::BTreeMap<String, String>,
    started_at: Mutex<SystemTime>,
    restarts: AtomicU32,
    state: watch::Receiver<TaskState>,
    /// Set by `stop`: the supervisor restarts nothing after it.
    stopping: watch::Sender<bool>,
    output: Mutex<OutputBuffer>,
    /// Pieces cut from over-long output lines.
    lines_split: Arc<AtomicU64>,
    /// Lines live readers missed by falling behind.
    lines_dropped: Arc<AtomicU64>,
    /// The driver's counters of the same.
    metrics: OutputMetrics,
    /// Output readers (pipes of the current run, or file tails), awaited at the end.
    pumps: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Debug)]
struct OutputBuffer {
    tail: VecDeque<OutputLine>,
    /// Bytes of text in `tail`.
    tail_bytes: usize,
    /// `None` once the task has ended for good and its output is read: readers then see
    /// the stream end.
    live: Option<broadcast::Sender<OutputLine>>,
}

/// One run of a task's process.
enum Run {
    /// Started by this driver.
    Child(tokio::process::Child),
    /// Found running by a persistent driver.
    Adopted { pid: i32, ticks: u64 },
}

impl Run {
    async fn wait(&mut self) -> TaskState {
        match self {
            Run::Child(child) => match child.wait().await {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    TaskState::Exited { code: s.code(), signal: s.signal() }
                }
                Err(_) => TaskState::Exited { code: None, signal: None },
            },
            Run::Adopted { pid, ticks } => {
                while still_running(*pid, *ticks) {
                    tokio::time::sleep(ADOPTED_POLL).await;
                }
                TaskState::Exited { code: None, signal: None }
            }
        }
    }
}

impl ProcessDriver {
    /// A driver with no tasks, owning the tasks it starts. Running as root where the
    /// cpu, memory and pids controllers are available (cgroup v2, or v1 hierarchies), it
    /// enforces task limits in a control group per task; elsewhere it refuses tasks with
    /// limits, and its capabilities say so.
    pub fn new() -> Self {
        ProcessDriver::default()
    }

    /// This driver, never enforcing limits (tasks with limits are refused), whatever the
    /// machine offers.
    pub fn without_limits(mut self) -> Self {
        self.cgroups = None;
        self
    }

    /// A driver whose tasks outlive it, recorded in `state_dir`; adopts the tasks a
    /// previous driver on the same directory left running (see the module docs).
    pub async fn persistent(state_dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = StateDir::new(state_dir.into())?;
        let driver = ProcessDriver {
            tasks: Mutex::new(HashMap::new()),
            state_dir: Some(dir.clone()),
            detached: watch::channel(false).0,
            metrics: OutputMetrics::default(),
            cgroups: Cgroups::detect(Path::new(CGROUP_ROOT)),
            network: None,
        };
        for record in dir.load_all()? {
            let id = record.spec.id.clone();
            let alive = still_running(record.pid, record.start_ticks);
            tracing::info!(task = %id, pid = record.pid, alive, ended = ?record.exit, "adopting a recorded task");
            let (task, state_tx) = driver.new_task(&record.spec, record.pgid, record.started_at, record.restarts);
            if record.pid == record.pgid {
                task.adopted_ticks.store(record.start_ticks.max(1), Ordering::SeqCst);
            } else {
                // A record whose leader is not its group id cannot be verified: never signal.
                task.adopted_ticks.store(u64::MAX, Ordering::SeqCst);
            }
            task.spawn_tails(&dir, &id);
            match record.exit {
                // Ended under the previous driver: its output stays readable.
                Some(exit) => {
                    // Its end is known now: say so before `persistent` returns (the rest of
                    // `finish`, draining output, may take a while under load).
                    let _ = state_tx.send(exit);
                    tokio::spawn(async move { task.finish(&state_tx, exit).await });
                }
                None => driver.supervise((task, state_tx), record.spec, Run::Adopted { pid: record.pid, ticks: record.start_ticks }),
            }
        }
        Ok(driver)
    }

    /// Registers the driver's output metrics: `keelson_driver_output_lines_split_total`
    /// (pieces cut from lines longer than [`crate::MAX_LINE_BYTES`]) and
    /// `keelson_driver_output_lines_dropped_total` (lines output readers missed by falling
    /// behind; the task is never slowed by a reader).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "keelson_driver_output_lines_split",
            "Pieces cut from task output lines longer than the maximum line length",
            self.metrics.split.clone(),
        );
        registry.register(
            "keelson_driver_output_lines_dropped",
            "Task output lines that readers missed because they fell behind",
            self.metrics.dropped.clone(),
        );
    }

    fn get(&self, id: &str) -> Result<Arc<Task>> {
        self.lock().get(id).cloned().ok_or_else(|| Error::NotFound { kind: "task", name: id.to_owned() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Task>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a task (running) and returns it with its state sender.
    fn new_task(&self, spec: &TaskSpec, pgid: i32, started_at: SystemTime, restarts: u32) -> (Arc<Task>, watch::Sender<TaskState>) {
        let (state_tx, state_rx) = watch::channel(TaskState::Running);
        let (live, _) = broadcast::channel(LIVE_BACKLOG);
        let task = Arc::new(Task {
            pgid: AtomicI32::new(pgid),
            adopted_ticks: AtomicU64::new(0),
            labels: spec.labels.clone(),
            started_at: Mutex::new(started_at),
            restarts: AtomicU32::new(restarts),
            state: state_rx,
            stopping: watch::channel(false).0,
            output: Mutex::new(OutputBuffer { tail: VecDeque::new(), tail_bytes: 0, live: Some(live) }),
            lines_split: Arc::default(),
            lines_dropped: Arc::default(),
            metrics: self.metrics.clone(),
            pumps: Mutex::new(Vec::new()),
        });
        self.lock().insert(spec.id.clone(), task.clone());
        (task, state_tx)
    }
}

/// Starts one run of `spec`: the child and its group id; output to pipes, or appended to
/// files in the state directory of a persistent driver.
/// Tells a task the ports it serves on: `PORT` (the first), `KEELSON_PORT_<NAME>` for
/// named ones, and its id in `KEELSON_TASK_ID`. Values the spec sets itself win.
fn tell_ports(spec: &mut TaskSpec, own_network: bool) {
    // In a namespace of its own the task serves on its own port (published from the
    // host port); on the host's network, on the host port itself.
    let port = |p: &crate::task::PortMapping| if own_network { p.container } else { p.host };
    let mut told = vec![("KEELSON_TASK_ID".to_owned(), spec.id.clone())];
    if let Some(first) = spec.ports.first() {
        told.push(("PORT".to_owned(), port(first).to_string()));
    }
    told.extend(spec.ports.iter().filter_map(|p| Some((p.env_name()?, port(p).to_string()))));
    for (name, value) in told {
        spec.env.entry(name).or_insert(value);
    }
}

/// Starts one run of `spec`'s program: in its own process group, and with limits inside
/// the task's control group (joined before the program starts).
fn spawn_run(
    spec: &TaskSpec,
    state_dir: Option<&StateDir>,
    cgroups: Option<&Cgroups>,
    network: Option<&ProcessNetwork>,
) -> Result<(tokio::process::Child, i32)> {
    let command = match (spec.limits, cgroups) {
        (Some(limits), Some(cgroups)) => Cgroups::wrap(&cgroups.create(&spec.id, &limits)?, &spec.command),
        _ => spec.command.clone(),
    };
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..]).envs(&spec.env).stdin(Stdio::null()).process_group(0);
    match state_dir {
        None => {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        }
        Some(dir) => {
            // Files, not pipes: a pipe's reader dies with the agent, and the task's
            // next write would then fail (SIGPIPE); a file outlives both.
            let open = |stream: &str| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.output_path(&spec.id, stream))
                    .map_err(|e| Error::Backend { backend: BACKEND, source: Box::new(e) })
            };
            cmd.stdout(open("stdout")?).stderr(open("stderr")?);
        }
    }
    if let Some(dir) = &spec.working_dir {
        cmd.current_dir(dir);
    }
    let spawned = match network {
        // Spawned from a thread inside the task's namespace: the child starts there.
        Some(net) => {
            let runtime = tokio::runtime::Handle::current();
            net.spawn_in(&spec.id, move || {
                let _entered = runtime.enter();
                cmd.spawn()
            })?
        }
        None => cmd.spawn(),
    };
    let child = spawned.map_err(|e| Error::invalid("command", &spec.command[0], format!("task {:?} could not start: {e}", spec.id)))?;
    let pgid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| Error::Backend { backend: BACKEND, source: "child has no pid".into() })?;
    Ok((child, pgid))
}

/// Records a run of a persistent task (what the next driver adopts), and its end.
fn record_run(state_dir: Option<&StateDir>, spec: &TaskSpec, task: &Task, pid: i32, exit: Option<TaskState>) {
    let Some(dir) = state_dir else { return };
    let record = TaskRecord {
        spec: spec.clone(),
        pid,
        pgid: task.pgid.load(Ordering::SeqCst),
        start_ticks: start_ticks(pid).unwrap_or_default(),
        started_at: *task.started_at.lock().unwrap_or_else(|p| p.into_inner()),
        restarts: task.restarts.load(Ordering::SeqCst),
        exit,
    };
    if let Err(e) = dir.save(&record) {
        // The task runs; only adoption after a restart is lost.
        tracing::warn!(task = %spec.id, error = %e, "recording a task");
    }
}

impl ProcessDriver {
    /// Runs every task in a network namespace of its own (bound under `netns_dir`),
    /// attached to `network` before the task starts and kept across its restarts: the
    /// task serves on its own ports (`PORT` is the container port), published from the
    /// host ports, and [`TaskStatus::address`] is its address. Needs root.
    #[cfg(feature = "netns")]
    pub fn with_network(mut self, network: crate::runtime::task_network::TaskNetwork, netns_dir: impl Into<PathBuf>) -> Self {
        self.network = Some(ProcessNetwork::new(network, netns_dir.into()));
        self
    }

    /// `status` with the task's network address, when it has one.
    async fn with_address(&self, mut status: TaskStatus) -> Result<TaskStatus> {
        if let Some(net) = &self.network {
            status.address = net.net.lookup(&status.id).await?;
        }
        Ok(status)
    }

    /// Watches a task's runs until it ends for good: restarts it under its policy, and
    /// lets go when a persistent driver is dropped.
    fn supervise(&self, (task, state_tx): (Arc<Task>, watch::Sender<TaskState>), spec: TaskSpec, mut run: Run) {
        let mut detached = self.detached.subscribe();
        let state_dir = self.state_dir.clone();
        let cgroups = self.cgroups.clone();
        let network = self.network.clone();
        tokio::spawn(async move {
            // The waits between restarts: the policy's doubling, with jitter (tasks that
            // failed together, say on a dependency's outage, do not restart together).
            let mut pauses = spec.restart.map(|p| keelson_base::retry_pauses(p.initial_backoff, p.max_backoff));
            loop {
                let exit = tokio::select! {
                    exit = run.wait() => exit,
                    () = until_set(&mut detached) => return,
                };
                // Whatever the leader left in its group goes with it (an adopted task's
                // group only while it is provably still the task's).
                task.signal(Signal::SIGKILL);
                let restarts = task.restarts.load(Ordering::SeqCst);
                let failed = !matches!(exit, TaskState::Exited { code: Some(0), .. });
                let policy = spec.restart.filter(|p| failed && restarts < p.max_restarts && !*task.stopping.borrow());
                let Some(policy) = policy else {
                    tracing::debug!(task = %spec.id, ?exit, "task exited");
                    record_run(state_dir.as_ref(), &spec, &task, task.pgid.load(Ordering::SeqCst), Some(exit));
                    task.finish(&state_tx, exit).await;
                    return;
                };
                let wait = pauses.as_mut().and_then(Iterator::next).unwrap_or_else(|| policy.backoff(restarts));
                tracing::info!(task = %spec.id, ?exit, ?wait, restart = restarts + 1, "task failed; restarting after a backoff");
                let mut stopping = task.stopping.subscribe();
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = until_set(&mut stopping) => {
                        record_run(state_dir.as_ref(), &spec, &task, task.pgid.load(Ordering::SeqCst), Some(exit));
                        task.finish(&state_tx, exit).await;
                        return;
                    }
                    () = until_set(&mut detached) => return,
                }
                match spawn_run(&spec, state_dir.as_ref(), cgroups.as_ref(), network.as_ref()) {
                    Ok((mut child, pgid)) => {
                        task.pgid.store(pgid, Ordering::SeqCst);
                        // Our own child from now on: its pid cannot be reused while we hold it.
                        task.adopted_ticks.store(0, Ordering::SeqCst);
                        task.restarts.fetch_add(1, Ordering::SeqCst);
                        *task.started_at.lock().unwrap_or_else(|p| p.into_inner()) = SystemTime::now();
                        task.pump_pipes(&mut child);
                        record_run(state_dir.as_ref(), &spec, &task, pgid, None);
                        run = Run::Child(child);
                    }
                    Err(e) => {
                        tracing::warn!(task = %spec.id, error = %e, "restart failed; the task stays exited");
                        record_run(state_dir.as_ref(), &spec, &task, task.pgid.load(Ordering::SeqCst), Some(exit));
                        task.finish(&state_tx, exit).await;
                        return;
                    }
                }
            }
        });
    }
}

impl Task {
    fn status(&self, id: &str) -> TaskStatus {
        TaskStatus {
            id: id.to_owned(),
            state: *self.state.borrow(),
            labels: self.labels.clone(),
            started_at: *self.started_at.lock().unwrap_or_else(|p| p.into_inner()),
            restarts: self.restarts.load(Ordering::SeqCst),
            health: None,
            output_lines_split: self.lines_split.load(Ordering::Relaxed),
            output_lines_dropped: self.lines_dropped.load(Ordering::Relaxed),
            address: None,
        }
    }

    /// Signals the task's process group, if it is still the task's: an adopted task's
    /// group is signalled only while its recorded leader (same pid, same start time) still
    /// leads it. After a reboot or pid reuse that group may be anyone's, and the agent
    /// usually runs as root. Returns whether the signal was sent.
    fn signal(&self, sig: Signal) -> bool {
        let pgid = self.pgid.load(Ordering::SeqCst);
        let adopted = self.adopted_ticks.load(Ordering::SeqCst);
        if adopted != 0 && !crate::runtime::process_record::leads_group(pgid, adopted) {
            tracing::warn!(pgid, ?sig, "task lost: its recorded process group is no longer its own; not signalling it");
            return false;
        }
        // ESRCH (group already gone) is the normal end of the story, not an error.
        killpg(Pid::from_raw(pgid), sig).is_ok()
    }

    async fn wait_exit(&self, limit: Duration) -> bool {
        let mut rx = self.state.clone();
        let exited = tokio::time::timeout(limit, rx.wait_for(|s| s.is_exited())).await.is_ok();
        exited
    }

    /// The end: the final state, then the rest of the output, then readers see the end.
    async fn finish(&self, state_tx: &watch::Sender<TaskState>, exit: TaskState) {
        let _ = state_tx.send(exit);
        let pumps: Vec<JoinHandle<()>> = std::mem::take(&mut *self.pumps.lock().unwrap_or_else(|p| p.into_inner()));
        for pump in pumps {
            // A grandchild that left the group may hold a pipe open: do not wait forever.
            let _ = tokio::time::timeout(Duration::from_secs(2), pump).await;
        }
        self.output.lock().unwrap_or_else(|p| p.into_inner()).live = None;
    }

    fn record_line(&self, stream: OutputStream, piece: keelson_logship::Line) {
        if piece.partial {
            self.lines_split.fetch_add(1, Ordering::Relaxed);
            self.metrics.split.inc();
        }
        let line = OutputLine { stream, line: piece.text, timestamp: SystemTime::now(), partial: piece.partial };
        let mut out = self.output.lock().unwrap_or_else(|p| p.into_inner());
        out.tail_bytes += line.line.len();
        out.tail.push_back(line.clone());
        while out.tail.len() > OUTPUT_TAIL || (out.tail_bytes > OUTPUT_TAIL_BYTES && out.tail.len() > 1) {
            if let Some(old) = out.tail.pop_front() {
                out.tail_bytes -= old.line.len();
            }
        }
        if let Some(live) = &out.live {
            let _ = live.send(line);
        }
    }

    /// Reads the pipes of a run started with pipes (non-persistent drivers).
    fn pump_pipes(self: &Arc<Self>, child: &mut tokio::process::Child) {
        let mut handles = Vec::new();
        if let Some(out) = child.stdout.take() {
            handles.push(pump(self.clone(), OutputStream::Stdout, out));
        }
        if let Some(err) = child.stderr.take() {
            handles.push(pump(self.clone(), OutputStream::Stderr, err));
        }
        self.pumps.lock().unwrap_or_else(|p| p.into_inner()).extend(handles);
    }

    /// Follows a persistent task's output files until it has ended and they are read.
    fn spawn_tails(self: &Arc<Self>, dir: &StateDir, id: &str) {
        let handles = [(OutputStream::Stdout, "stdout"), (OutputStream::Stderr, "stderr")]
            .map(|(stream, name)| tokio::spawn(tail(self.clone(), stream, dir.output_path(id, name))));
        self.pumps.lock().unwrap_or_else(|p| p.into_inner()).extend(handles);
    }
}

/// Returns once the flag is set (or its sender is gone); holds no borrow across awaits.
async fn until_set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

fn pump(task: Arc<Task>, stream: OutputStream, reader: impl AsyncRead + Unpin + Send + 'static) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Cut at MAX_LINE_BYTES: output without newlines cannot grow the agent's memory.
        let mut lines = LineReader::new(reader, MAX_LINE_BYTES);
        while let Ok(Some(line)) = lines.next_line().await {
            task.record_line(stream, line);
        }
    })
}

async fn tail(task: Arc<Task>, stream: OutputStream, path: PathBuf) {
    let file = loop {
        match tokio::fs::File::open(&path).await {
            Ok(f) => break f,
            Err(_) if !task.state.borrow().is_exited() => tokio::time::sleep(TAIL_POLL).await,
            Err(_) => return,
        }
    };
    let mut lines = LineReader::new(file, MAX_LINE_BYTES);
    loop {
        // Read the exit state before reading: an exit seen before the end of the file
        // means nothing more will be written after it.
        let ended = task.state.borrow().is_exited();
        match lines.next_complete().await {
            Ok(Some(line)) => task.record_line(stream, line),
            Ok(None) if ended => break,
            // A partial last line waits for its newline (or the end).
            Ok(None) => tokio::time::sleep(TAIL_POLL).await,
            Err(_) => break,
        }
    }
    if let Some(last) = lines.finish() {
        task.record_line(stream, last);
    }
}

#[async_trait]
impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> DriverCapabilities {
        // On a keelson network, ports are published from the host to the task's own.
        DriverCapabilities::new(false, self.cgroups.is_some(), self.network.is_some())
    }

    async fn start(&self, mut spec: TaskSpec) -> Result<TaskStatus> {
        spec.validate()?;
        // No image to take a command from: the program must be named.
        if spec.command.is_empty() {
            return Err(Error::invalid("command", "", format!("task {:?}: must name a program", spec.id)));
        }
        // Silently running without the isolation asked for would be worse than refusing.
        if (spec.limits.is_some() && self.cgroups.is_none())
            || !spec.mounts.is_empty()
            || spec.network.is_some()
            || spec.health_check.is_some()
        {
            return Err(Error::Unsupported {
                operation: "limits (no control groups), mounts, networks or health checks",
                backend: "process",
            });
        }
        if let Some(p) = spec.ports.iter().find(|p| p.host != p.container && (self.network.is_none() || p.host == 0)) {
            return Err(Error::Unsupported {
                operation: if p.host == 0 {
                    "port mapping"
                } else {
                    "port mapping (a process serves on the host port it is given in PORT)"
                },
                backend: "process",
            });
        }
        tell_ports(&mut spec, self.network.is_some());
        if let Some(existing) = self.lock().get(&spec.id) {
            if !existing.state.borrow().is_exited() {
                return Err(Error::Conflict { kind: "task", name: spec.id, reason: "already running".into() });
            }
        }
        if let Some(dir) = &self.state_dir {
            // A new task of a reused id starts with fresh output.
            dir.forget(&spec.id);
        }
        if let Some(net) = &self.network {
            let address = net.prepare(&spec.id, &spec.ports, spec.address).await?;
            tracing::info!(task = %spec.id, network = %net.net.name(), %address, "task namespace attached");
        }
        let spawned = spawn_run(&spec, self.state_dir.as_ref(), self.cgroups.as_ref(), self.network.as_ref());
        let (mut child, pgid) = match (spawned, &self.network) {
            (Ok(run), _) => run,
            (Err(e), Some(net)) => {
                if let Err(undo) = net.release(&spec.id).await {
                    tracing::warn!(task = %spec.id, error = %undo, "releasing the namespace of a task that did not start");
                }
                return Err(e);
            }
            (Err(e), None) => return Err(e),
        };
        let (task, state_tx) = self.new_task(&spec, pgid, SystemTime::now(), 0);
        match &self.state_dir {
            None => task.pump_pipes(&mut child),
            Some(dir) => task.spawn_tails(dir, &spec.id),
        }
        record_run(self.state_dir.as_ref(), &spec, &task, pgid, None);
        tracing::info!(task = %spec.id, pgid, program = %spec.command[0], "task started");
        let status = task.status(&spec.id);
        self.supervise((task, state_tx), spec, Run::Child(child));
        Ok(status)
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<TaskStatus> {
        let task = self.get(id)?;
        task.stopping.send_replace(true);
        if !task.state.borrow().is_exited() {
            if !task.signal(Signal::SIGTERM) && task.adopted_ticks.load(Ordering::SeqCst) != 0 {
                // An adopted task whose group is no longer its own is lost: there is
                // nothing of it left to stop, and nothing may be signalled.
                tracing::warn!(task = %id, "stopping a lost task: nothing signalled");
            }
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
        let status = self.get(id)?.status(id);
        self.with_address(status).await
    }

    async fn output(&self, id: &str) -> Result<Output> {
        let task = self.get(id)?;
        let out = task.output.lock().unwrap_or_else(|p| p.into_inner());
        // Snapshot and subscription under one lock: no line is missed or repeated.
        let past: Vec<OutputLine> = out.tail.iter().cloned().collect();
        // A reader that falls behind misses lines rather than slowing the task: counted.
        let (dropped, metric) = (task.lines_dropped.clone(), task.metrics.dropped.clone());
        let live = out.live.as_ref().map(|l| {
            BroadcastStream::new(l.subscribe()).filter_map(move |r| {
                let (dropped, metric) = (dropped.clone(), metric.clone());
                async move {
                    match r {
                        Ok(line) => Some(line),
                        Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "a task output reader fell behind");
                            dropped.fetch_add(n, Ordering::Relaxed);
                            metric.inc_by(n);
                            None
                        }
                    }
                }
            })
        });
        let past = futures::stream::iter(past);
        Ok(match live {
            Some(live) => past.chain(live).boxed(),
            None => past.boxed(),
        })
    }

    async fn list(&self) -> Result<Vec<TaskStatus>> {
        let mut all: Vec<TaskStatus> = self.lock().iter().map(|(id, t)| t.status(id)).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        let mut out = Vec::with_capacity(all.len());
        for status in all {
            out.push(self.with_address(status).await?);
        }
        Ok(out)
    }

    async fn remove(&self, id: &str) -> Result<()> {
        {
            let mut tasks = self.lock();
            match tasks.get(id) {
                None => return Err(Error::NotFound { kind: "task", name: id.to_owned() }),
                Some(t) if !t.state.borrow().is_exited() => {
                    return Err(Error::Conflict { kind: "running task", name: id.to_owned(), reason: "still running".into() });
                }
                Some(_) => {
                    tasks.remove(id);
                    if let Some(dir) = &self.state_dir {
                        dir.forget(id);
                    }
                }
            }
        }
        if let Some(net) = &self.network {
            net.release(id).await?;
        }
        // Killing stragglers and removing the group may wait on the kernel: off the
        // runtime's threads, and with no lock held.
        if let Some(cgroups) = self.cgroups.clone() {
            let id = id.to_owned();
            let _ = tokio::task::spawn_blocking(move || cgroups.remove(&id)).await;
        }
        Ok(())
    }
}

impl Drop for ProcessDriver {
    fn drop(&mut self) {
        if self.state_dir.is_some() {
            // Persistent: the tasks run on, for the next driver to adopt.
            self.detached.send_replace(true);
            return;
        }
        let ids: Vec<String> = self
            .lock()
            .iter()
            .map(|(id, task)| {
                if !task.state.borrow().is_exited() {
                    task.signal(Signal::SIGKILL);
                }
                id.clone()
            })
            .collect();
        // The groups empty as the killed processes exit; remove them off this thread
        // (a drop must not wait), so no empty group is left behind per task.
        if let Some(cgroups) = self.cgroups.clone().filter(|_| !ids.is_empty()) {
            let spawned = std::thread::Builder::new().name("keelson-cgroup-cleanup".into()).spawn(move || {
                ids.iter().for_each(|id| cgroups.remove(id));
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot remove the tasks' control groups; empty groups stay behind");
            }
        }
    }
}
