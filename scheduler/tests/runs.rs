//! One-off runs through the cluster store and a node agent, on the process driver and on
//! Docker: a run that succeeds, one that fails, one stopped at its time limit, one that
//! cannot start; outcome and output kept after the task is gone; a duplicate id and work
//! no node can take are typed errors; an agent restarted mid-run adopts it (Docker).

use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_discovery::MemoryKv;
use keelson_scheduler::{
    ClusterStore, Driver, Error, Node, NodeAgent, OutputStream, ProcessDriver, Resources, RunOutcome, RunResult, RunSpec, TaskTemplate,
};

/// How each driver runs a shell script (the Docker one in the busybox test image).
type Template = Box<dyn Fn(&str) -> TaskTemplate + Send + Sync>;

fn run(id: &str, task: TaskTemplate, limit: Duration) -> RunSpec {
    RunSpec { id: id.into(), job: "batch".into(), task, resources: Resources::new(100, 32), time_limit: limit }
}

async fn until_done(agent: &NodeAgent, store: &ClusterStore, id: &str) -> RunResult {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        agent.sync().await.expect("agent pass");
        if let Some(result) = store.run_result(id).await.expect("result") {
            return result;
        }
        assert!(Instant::now() < deadline, "run {id} never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn runs_end_with_their_outcome_and_output(driver: Arc<dyn Driver>, sh: Template, prefix: &str) {
    let store = ClusterStore::new(Arc::new(MemoryKv::new()), "runs");
    let node = format!("{prefix}-node-{}", std::process::id());
    let _member = store.join(&Node::new(node.clone(), Resources::new(1000, 512)), Duration::from_secs(30)).await.expect("join");
    let agent = NodeAgent::new(node.clone(), store.clone(), driver.clone(), None, "127.0.0.1").with_stop_grace(Duration::from_secs(1));
    let id = |name: &str| format!("{prefix}-{name}-{}", std::process::id());

    let ok = store.submit_run(&run(&id("ok"), sh("echo hello; echo oops >&2; exit 0"), Duration::from_secs(30))).await.expect("submit");
    assert_eq!(ok.node, node);
    assert!(matches!(store.submit_run(&ok.spec).await, Err(Error::Conflict { .. })), "one run per id");
    let result = until_done(&agent, &store, &ok.spec.id).await;
    assert_eq!(result.outcome, RunOutcome::Succeeded);
    let lines: Vec<(OutputStream, &str)> = result.output.iter().map(|l| (l.stream, l.line.as_str())).collect();
    assert!(lines.contains(&(OutputStream::Stdout, "hello")) && lines.contains(&(OutputStream::Stderr, "oops")), "{lines:?}");
    assert!(matches!(driver.inspect(&ok.spec.id).await, Err(Error::NotFound { .. })), "the task is removed, the result kept");
    assert!(store.runs_on(&node).await.expect("runs").is_empty());
    assert!(matches!(store.submit_run(&ok.spec).await, Err(Error::Conflict { .. })), "ids are not reused after the end");

    let failing = store.submit_run(&run(&id("fail"), sh("echo trying; exit 3"), Duration::from_secs(30))).await.expect("submit");
    assert_eq!(until_done(&agent, &store, &failing.spec.id).await.outcome, RunOutcome::Failed { code: Some(3) });

    let slow = store.submit_run(&run(&id("slow"), sh("echo started; exec sleep 60"), Duration::from_secs(1))).await.expect("submit");
    let began = Instant::now();
    let result = until_done(&agent, &store, &slow.spec.id).await;
    assert_eq!(result.outcome, RunOutcome::TimedOut);
    assert!(began.elapsed() < Duration::from_secs(15), "stopped at its limit, took {:?}", began.elapsed());
    assert!(result.output.iter().any(|l| l.line == "started"));

    let huge = RunSpec { resources: Resources::new(64_000, 32), ..run(&id("huge"), sh("true"), Duration::from_secs(5)) };
    let err = store.submit_run(&huge).await.expect_err("no node is that big");
    assert!(matches!(err, Error::Unplaced { .. } | Error::ExceedsNodeCapacity { .. }), "{err:?}");
    let zero = run(&id("zero"), sh("true"), Duration::ZERO);
    assert!(matches!(store.submit_run(&zero).await, Err(Error::InvalidInput { field: "time limit", .. })));
    let bad_id = run("../x", sh("true"), Duration::from_secs(5));
    assert!(matches!(store.submit_run(&bad_id).await, Err(Error::InvalidInput { field: "run id", .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_off_runs_on_the_process_driver() {
    let sh: Template =
        Box::new(|script: &str| TaskTemplate { command: vec!["/bin/sh".into(), "-c".into(), script.into()], ..TaskTemplate::default() });
    runs_end_with_their_outcome_and_output(Arc::new(ProcessDriver::new()), sh, "proc").await;
    // A program that does not exist: the run fails, and says why.
    let store = ClusterStore::new(Arc::new(MemoryKv::new()), "runs");
    let _member = store.join(&Node::new("n1", Resources::new(1000, 512)), Duration::from_secs(30)).await.expect("join");
    let agent = NodeAgent::new("n1", store.clone(), Arc::new(ProcessDriver::new()), None, "127.0.0.1");
    let missing = TaskTemplate { command: vec!["/no/such/program".into()], ..TaskTemplate::default() };
    store.submit_run(&run("missing", missing, Duration::from_secs(5))).await.expect("submit");
    let result = until_done(&agent, &store, "missing").await;
    assert_eq!(result.outcome, RunOutcome::Failed { code: None });
    assert!(result.output.iter().any(|l| l.line.contains("/no/such/program")), "{:?}", result.output);
}

/// Removes this process's run containers when dropped (also when a test fails).
#[cfg(feature = "docker")]
struct RunContainers;

#[cfg(feature = "docker")]
impl Drop for RunContainers {
    fn drop(&mut self) {
        // Run tasks are labelled with their run id, which ends in this process's id.
        keelson_testkit::docker::remove_containers(&["label=keelson.run", &format!("name=-{}$", std::process::id())]);
    }
}

#[cfg(feature = "docker")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_off_runs_on_docker_and_an_agent_restart_mid_run() {
    use keelson_scheduler::DockerDriver;
    let _cleanup = RunContainers;
    let image = keelson_testkit::docker::busybox_image().unwrap_or_else(|e| panic!("the busybox test image: {e}"));
    let driver: Arc<dyn Driver> = Arc::new(DockerDriver::connect().await.unwrap_or_else(|e| panic!("Docker Engine must run: {e}")));
    let img = image.clone();
    let sh: Template = Box::new(move |script: &str| TaskTemplate {
        image: Some(img.clone()),
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..TaskTemplate::default()
    });
    runs_end_with_their_outcome_and_output(driver.clone(), sh, "dock").await;

    // The agent goes away while a run runs; the next one adopts it and keeps its limit.
    let store = ClusterStore::new(Arc::new(MemoryKv::new()), "runs");
    let node = format!("dock-restart-{}", std::process::id());
    let _member = store.join(&Node::new(node.clone(), Resources::new(1000, 512)), Duration::from_secs(30)).await.expect("join");
    let task = TaskTemplate {
        image: Some(image),
        command: vec!["/bin/sh".into(), "-c".into(), "echo once; exec sleep 60".into()],
        ..TaskTemplate::default()
    };
    let id = format!("dock-adopt-{}", std::process::id());
    store.submit_run(&run(&id, task, Duration::from_secs(3))).await.expect("submit");
    let first = NodeAgent::new(node.clone(), store.clone(), driver.clone(), None, "127.0.0.1").with_stop_grace(Duration::from_secs(1));
    first.sync().await.expect("start");
    first.sync().await.expect("observe");
    drop(first);
    let second = NodeAgent::new(node.clone(), store.clone(), driver.clone(), None, "127.0.0.1").with_stop_grace(Duration::from_secs(1));
    let result = until_done(&second, &store, &id).await;
    assert_eq!(result.outcome, RunOutcome::TimedOut);
    assert_eq!(result.output.iter().filter(|l| l.line == "once").count(), 1, "started once, never twice");
}

/// A run printing 10 MiB keeps a bounded tail (so its result is saved at all), and the
/// run submitted after it on the same node starts at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_printing_ten_mib_keeps_a_bounded_result_and_holds_up_no_other_run() {
    let store = ClusterStore::new(Arc::new(MemoryKv::new()), "runs");
    let _member = store.join(&Node::new("n1", Resources::new(1000, 512)), Duration::from_secs(30)).await.expect("join");
    let driver = Arc::new(ProcessDriver::new());
    let agent = NodeAgent::new("n1", store.clone(), driver.clone(), None, "127.0.0.1");
    let sh = |script: &str| TaskTemplate { command: vec!["/bin/sh".into(), "-c".into(), script.into()], ..TaskTemplate::default() };
    // 1024 lines of 10 KiB: 10 MiB, and every line long enough for the byte bound to bite.
    let loud = "yes \"$(head -c 10240 /dev/zero | tr '\\0' x)\" | head -n 1024; echo last-line";
    store.submit_run(&run("loud", sh(loud), Duration::from_secs(60))).await.expect("submit");
    let result = until_done(&agent, &store, "loud").await;
    assert_eq!(result.outcome, RunOutcome::Succeeded);
    let bytes: usize = result.output.iter().map(|l| l.line.len()).sum();
    assert!(bytes <= keelson_scheduler::RESULT_OUTPUT_BYTES + 200, "{bytes} bytes kept");
    assert!(result.output[0].line.starts_with("[keelson: earlier output cut:"), "{}", result.output[0].line);
    assert_eq!(result.output.last().map(|l| l.line.as_str()), Some("last-line"), "the end is what is kept");

    let submitted = Instant::now();
    store.submit_run(&run("next", sh("echo next"), Duration::from_secs(30))).await.expect("submit");
    let started = loop {
        agent.sync().await.expect("agent pass");
        if driver.inspect("next").await.is_ok() || store.run_result("next").await.expect("result").is_some() {
            break submitted.elapsed();
        }
        assert!(submitted.elapsed() < Duration::from_secs(10), "the next run never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(started < Duration::from_secs(2), "started {started:?} after its submission");
    assert_eq!(until_done(&agent, &store, "next").await.outcome, RunOutcome::Succeeded);
}

/// A log sink that takes nothing until its gate opens, then keeps every line.
#[derive(Debug)]
struct GatedSink {
    open: tokio::sync::watch::Receiver<bool>,
    lines: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl keelson_logship::Sink for GatedSink {
    fn name(&self) -> &'static str {
        "gated"
    }

    async fn send(&self, batch: &[keelson_logship::Record]) -> keelson_logship::Result<()> {
        let mut open = self.open.clone();
        let _ = open.wait_for(|o| *o).await;
        self.lines.lock().expect("lines").extend(batch.iter().map(|r| r.line.clone()));
        Ok(())
    }

    async fn flush(&self) -> keelson_logship::Result<()> {
        Ok(())
    }
}

/// A run's result is written, and its task removed, only once its whole output is in the
/// log sink (a reader of the result finds every line there); past the limit it is written
/// anyway, saying so, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_result_waits_until_its_output_is_in_the_log_sink() {
    let (gate, open) = tokio::sync::watch::channel(false);
    let sink = Arc::new(GatedSink { open, lines: std::sync::Mutex::new(Vec::new()) });
    let driver: Arc<dyn Driver> = Arc::new(ProcessDriver::new());
    let store = ClusterStore::new(Arc::new(MemoryKv::new()), "runs");
    let _member = store.join(&Node::new("n1", Resources::new(1000, 512)), Duration::from_secs(30)).await.expect("join");
    let shipper = keelson_scheduler::TaskLogShipper::new(driver.clone(), sink.clone(), "n1");
    let agent = NodeAgent::new("n1", store.clone(), driver.clone(), None, "127.0.0.1")
        .with_output_shipping(shipper.shipped_outputs(), Duration::from_secs(60));
    // The shipper looks once at start, then only when the agent asks it to (an hour is
    // never): a run that ends between two looks is still shipped at once.
    let shipping = tokio::spawn(shipper.run(Duration::from_secs(3600), std::future::pending()));
    let script = TaskTemplate {
        command: vec!["/bin/sh".into(), "-c".into(), "echo one; echo two >&2; echo three".into()],
        ..TaskTemplate::default()
    };
    store.submit_run(&run("gated", script, Duration::from_secs(30))).await.expect("submit");
    let held = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < held {
        agent.sync().await.expect("agent pass");
        assert!(store.run_result("gated").await.expect("result").is_none(), "no result while the sink holds the output");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(driver.inspect("gated").await.is_ok(), "the task (and its output) is kept while the output is not delivered");
    gate.send(true).expect("open the gate");
    let result = until_done(&agent, &store, "gated").await;
    assert_eq!(result.outcome, RunOutcome::Succeeded);
    let mut shipped = sink.lines.lock().expect("lines").clone();
    shipped.sort();
    assert_eq!(shipped, ["one", "three", "two"], "every line was in the sink when the result appeared");
    assert!(matches!(driver.inspect("gated").await, Err(Error::NotFound { .. })), "removed once delivered");
    shipping.abort();

    // A sink that never takes it: the result comes after the limit, and says so.
    let (_closed, never) = tokio::sync::watch::channel(false);
    let sink = Arc::new(GatedSink { open: never, lines: std::sync::Mutex::new(Vec::new()) });
    let shipper = keelson_scheduler::TaskLogShipper::new(driver.clone(), sink, "n1");
    let metrics = keelson_scheduler::OrchestrationMetrics::new();
    let agent = NodeAgent::new("n1", store.clone(), driver.clone(), None, "127.0.0.1")
        .with_metrics(metrics.clone())
        .with_output_shipping(shipper.shipped_outputs(), Duration::from_millis(500));
    let shipping = tokio::spawn(shipper.run(Duration::from_millis(100), std::future::pending()));
    let script = TaskTemplate { command: vec!["/bin/sh".into(), "-c".into(), "echo lost".into()], ..TaskTemplate::default() };
    store.submit_run(&run("undelivered", script, Duration::from_secs(30))).await.expect("submit");
    let result = until_done(&agent, &store, "undelivered").await;
    assert_eq!(result.outcome, RunOutcome::Succeeded);
    let last = result.output.last().expect("a note");
    assert!(last.line.contains("not confirmed delivered to the log sink"), "{:?}", result.output);
    assert!(result.output.iter().any(|l| l.line == "lost"), "the result still keeps the tail");
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(text.contains("keelson_runs_output_undelivered_total 1"), "{text}");
    shipping.abort();
}
