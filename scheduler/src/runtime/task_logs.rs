//! Shipping every task's output, with labels, to a log sink: what a node agent does so
//! that `keelson-ctl logs` (through `logd`) shows a job's output from every node.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use keelson_logship::{Labels, Record, ShipConfig, ShipMetrics, Shipper, Sink, StreamSource};

use super::driver::Driver;
use crate::orchestrate::spec::NODE_LABEL;
use crate::task::OutputStream;

/// Which tasks' output a [`TaskLogShipper`] has delivered to its end (every line
/// acknowledged by the sink), shared with the node agent: a finished one-off run's task
/// is removed, and its result written, only once its whole output is in the log sink
/// ([`NodeAgent::with_output_shipping`](crate::NodeAgent::with_output_shipping)), so a
/// reader who sees the result finds every line in the log server. Removing the task
/// first would lose what was not yet read (Docker deletes a container's log with it).
#[derive(Clone, Debug, Default)]
pub struct ShippedOutputs {
    /// Task id to the start of the run whose output was delivered whole.
    delivered: Arc<std::sync::Mutex<HashMap<String, SystemTime>>>,
    /// Wakes the shipper to look for tasks now rather than at its next interval.
    look_now: Arc<tokio::sync::Notify>,
}

impl ShippedOutputs {
    /// Whether the output of task `id`, in its run started at `started`, was delivered whole.
    pub fn is_delivered(&self, id: &str, started: SystemTime) -> bool {
        self.delivered.lock().map(|d| d.get(id) == Some(&started)).unwrap_or(false)
    }

    /// Asks the shipper to look for new tasks now (a run that ended before it looked).
    pub fn look_now(&self) {
        self.look_now.notify_one();
    }

    fn mark_delivered(&self, id: &str, started: SystemTime) {
        if let Ok(mut d) = self.delivered.lock() {
            d.insert(id.to_owned(), started);
        }
    }

    fn forget_except(&self, live: &dyn Fn(&str) -> bool) {
        if let Ok(mut d) = self.delivered.lock() {
            d.retain(|id, _| live(id));
        }
    }
}

/// Follows the tasks of a driver and ships each one's output to a sink, labelled with
/// the service (`<job>.<group>`, or `<job>` for a one-off run), the instance (the task
/// id), the node and the stream.
///
/// A sink that is down holds a task's lines (one batch read ahead at most; the driver's
/// own output buffer takes the rest, counting what it drops) and delivers them, in
/// order, once it is back: lines written while the log server restarts arrive late, not
/// never. A task's output is shipped once per run; a task restarted in place is shipped
/// again from its driver's start of output (Docker replays the container's whole log,
/// so earlier lines come twice), and an agent restarted ships its tasks again: a Docker
/// source with per-container checkpoints is what removes those duplicates.
#[derive(Debug)]
pub struct TaskLogShipper {
    driver: Arc<dyn Driver>,
    sink: Arc<dyn Sink>,
    node: String,
    config: ShipConfig,
    metrics: ShipMetrics,
    /// Tasks being shipped, by id, with the start of the run being shipped.
    shipping: HashMap<String, (SystemTime, tokio::task::JoinHandle<()>)>,
    /// Runs whose output was shipped to its end: not shipped again until they restart.
    done: HashMap<String, SystemTime>,
    /// The same, shared with the node agent.
    shipped: ShippedOutputs,
}

impl TaskLogShipper {
    /// Ships the output of `driver`'s tasks to `sink`, labelled with `node`.
    pub fn new(driver: Arc<dyn Driver>, sink: Arc<dyn Sink>, node: impl Into<String>) -> Self {
        TaskLogShipper {
            driver,
            sink,
            node: node.into(),
            config: ShipConfig::default(),
            metrics: ShipMetrics::default(),
            shipping: HashMap::new(),
            done: HashMap::new(),
            shipped: ShippedOutputs::default(),
        }
    }

    /// What this shipper has delivered whole; give it to the node agent
    /// ([`NodeAgent::with_output_shipping`](crate::NodeAgent::with_output_shipping)).
    pub fn shipped_outputs(&self) -> ShippedOutputs {
        self.shipped.clone()
    }

    /// Counts what is shipped in `metrics`.
    pub fn with_metrics(mut self, metrics: ShipMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Looks for tasks every `interval` until `stop` resolves, shipping each new one's
    /// output until it ends.
    pub async fn run(mut self, interval: Duration, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let look_now = self.shipped.look_now.clone();
        loop {
            self.sync().await;
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(interval) => {}
                _ = look_now.notified() => {}
            }
        }
        for (_, (_, handle)) in self.shipping.drain() {
            handle.abort();
        }
    }

    /// Starts shipping for tasks not shipped yet; forgets finished ones. Returns how
    /// many tasks are being shipped.
    pub async fn sync(&mut self) -> usize {
        let finished: Vec<String> = self.shipping.iter().filter(|(_, (_, h))| h.is_finished()).map(|(id, _)| id.clone()).collect();
        for id in finished {
            if let Some((started, _)) = self.shipping.remove(&id) {
                self.done.insert(id, started);
            }
        }
        let tasks = match self.driver.list().await {
            Ok(tasks) => tasks,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list tasks to ship their logs");
                return self.shipping.len();
            }
        };
        self.done.retain(|id, _| tasks.iter().any(|t| &t.id == id));
        self.shipped.forget_except(&|id| tasks.iter().any(|t| t.id == id));
        // Only this node's tasks: agents sharing an engine (several nodes on one Docker
        // host) would otherwise each ship every task's output, under their own node.
        for task in tasks.into_iter().filter(|t| t.labels.get(NODE_LABEL) == Some(&self.node)) {
            if self.shipping.contains_key(&task.id) || self.done.get(&task.id) == Some(&task.started_at) {
                continue;
            }
            // Listed between its creation and its start (Docker lists created containers,
            // with no start time yet): shipped from the next look, under the start time it
            // will keep. Shipped now, it would be recorded as done under no start time and
            // shipped whole a second time once listed with its real one.
            if task.started_at == SystemTime::UNIX_EPOCH {
                continue;
            }
            let Some(job) = task.labels.get("keelson.job") else { continue };
            let service = match task.labels.get("keelson.group") {
                Some(group) => format!("{job}.{group}"),
                None => job.clone(),
            };
            let mut labels = Labels::new(service, task.id.clone()).with_node(self.node.clone());
            if let Some(version) = task.labels.get("keelson.version") {
                labels.extra.insert("version".into(), version.clone());
            }
            let output = match self.driver.output(&task.id).await {
                Ok(output) => output,
                Err(e) => {
                    tracing::debug!(task = %task.id, error = %e, "no output to ship yet");
                    continue;
                }
            };
            let (sink, config, metrics) = (self.sink.clone(), self.config.clone(), self.metrics.clone());
            let (id, started, shipped) = (task.id.clone(), task.started_at, self.shipped.clone());
            let handle = tokio::spawn(async move {
                if ship_task(id.clone(), Arc::new(labels), output, sink, config, metrics).await {
                    shipped.mark_delivered(&id, started);
                }
            });
            self.shipping.insert(task.id, (task.started_at, handle));
        }
        self.shipping.len()
    }
}

/// A driver's output as a log source: each line a record labelled with `labels`, keeping
/// the driver's timestamp, stream and partial flag.
pub fn output_source(output: super::driver::Output, labels: Arc<Labels>) -> StreamSource {
    StreamSource::new(output.map(move |l| {
        let stream = match l.stream {
            OutputStream::Stdout => keelson_logship::Stream::Stdout,
            OutputStream::Stderr => keelson_logship::Stream::Stderr,
        };
        Record { timestamp: l.timestamp, partial: l.partial, ..Record::new(labels.clone(), stream, l.line) }
    }))
}

async fn ship_task(
    id: String,
    labels: Arc<Labels>,
    output: super::driver::Output,
    sink: Arc<dyn Sink>,
    config: ShipConfig,
    metrics: ShipMetrics,
) -> bool {
    let mut source = output_source(output, labels);
    let Ok(shipper) = Shipper::new(config.clone()) else { return false };
    let mut shipper = shipper.with_metrics(metrics);
    let mut pauses = config.pauses();
    loop {
        match shipper.run(&mut source, &*sink).await {
            Ok(_) => return true,
            Err(e) => {
                // Held records go first on the next run: keep trying while the task's
                // output lasts.
                let pause = pauses.next().unwrap_or(config.max_backoff);
                tracing::warn!(task = %id, error = %e, retry_in = ?pause, "shipping task output paused");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::process::ProcessDriver;
    use crate::task::TaskSpec;

    /// A driver whose first listing shows its tasks as not started yet (no start time),
    /// as Docker lists a container between its creation and its start.
    #[derive(Debug)]
    struct ListedBeforeStart {
        inner: ProcessDriver,
        lists: std::sync::atomic::AtomicU32,
    }

    #[async_trait::async_trait]
    impl Driver for ListedBeforeStart {
        fn name(&self) -> &'static str {
            "listed-before-start"
        }
        fn capabilities(&self) -> crate::runtime::driver::DriverCapabilities {
            self.inner.capabilities()
        }
        async fn start(&self, spec: TaskSpec) -> crate::Result<crate::task::TaskStatus> {
            self.inner.start(spec).await
        }
        async fn stop(&self, id: &str, grace: Duration) -> crate::Result<crate::task::TaskStatus> {
            self.inner.stop(id, grace).await
        }
        async fn inspect(&self, id: &str) -> crate::Result<crate::task::TaskStatus> {
            self.inner.inspect(id).await
        }
        async fn output(&self, id: &str) -> crate::Result<super::super::driver::Output> {
            self.inner.output(id).await
        }
        async fn list(&self) -> crate::Result<Vec<crate::task::TaskStatus>> {
            let mut tasks = self.inner.list().await?;
            if self.lists.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                for t in &mut tasks {
                    t.started_at = SystemTime::UNIX_EPOCH;
                }
            }
            Ok(tasks)
        }
        async fn remove(&self, id: &str) -> crate::Result<()> {
            self.inner.remove(id).await
        }
    }

    /// A task listed before its start is shipped once, from when it is listed started:
    /// its output is in the sink once, not twice.
    #[tokio::test]
    async fn a_task_listed_before_its_start_is_shipped_once() {
        let driver = Arc::new(ListedBeforeStart { inner: ProcessDriver::new(), lists: Default::default() });
        let spec =
            TaskSpec::new("quick-1", ["/bin/sh", "-c", "echo only-once"]).with_label("keelson.job", "web").with_label(NODE_LABEL, "n1");
        driver.start(spec).await.expect("start");
        let dir = tempfile::tempdir().expect("dir");
        let sink: Arc<dyn Sink> = Arc::new(keelson_logship::FileSink::new(dir.path()).expect("sink"));
        let mut shipper = TaskLogShipper::new(driver.clone(), sink, "n1");
        assert_eq!(shipper.sync().await, 0, "not started yet: not shipped");
        let file = dir.path().join("web.log");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&file).unwrap_or_default().contains("only-once") {
            assert!(std::time::Instant::now() < deadline, "the output never arrived");
            shipper.sync().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Its shipping ends with its output; later looks must not ship it again.
        for _ in 0..10 {
            shipper.sync().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let text = std::fs::read_to_string(&file).expect("log");
        assert_eq!(text.matches("only-once").count(), 1, "{text}");
    }

    /// Agents sharing one engine each see every task: each ships only its own node's.
    #[tokio::test]
    async fn only_this_nodes_tasks_are_shipped() {
        let driver = Arc::new(ProcessDriver::new());
        for (id, node, word) in [("mine-1", "n1", "mine"), ("theirs-1", "n2", "theirs")] {
            let spec = TaskSpec::new(id, vec!["/bin/sh".into(), "-c".into(), format!("echo {word}; sleep 5")])
                .with_label("keelson.job", "web")
                .with_label(NODE_LABEL, node);
            driver.start(spec).await.expect("start");
        }
        let dir = tempfile::tempdir().expect("dir");
        let sink: Arc<dyn Sink> = Arc::new(keelson_logship::FileSink::new(dir.path()).expect("sink"));
        let mut shipper = TaskLogShipper::new(driver.clone(), sink, "n1");
        assert_eq!(shipper.sync().await, 1, "one task of n1 is shipped, n2's is not");
        let file = dir.path().join("web.log");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&file).unwrap_or_default().contains("mine") {
            assert!(std::time::Instant::now() < deadline, "n1's output never arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let shipped = std::fs::read_to_string(&file).expect("shipped");
        assert!(!shipped.contains("theirs"), "{shipped}");
        for id in ["mine-1", "theirs-1"] {
            let _ = driver.stop(id, Duration::from_millis(100)).await;
            let _ = driver.remove(id).await;
        }
    }
}
