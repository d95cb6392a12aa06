//! The embedded default: a cluster of one on this machine. A cluster store in memory,
//! this machine joined as node `local` with a node agent on the local Docker Engine, and
//! a log server on loopback that the agent ships every test's output to. The same
//! [`Target`] a real cluster gives, so the rest of testgrid cannot tell the difference.

use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::MemoryKv;
use keelson_scheduler::{ClusterStore, DockerDriver, Node, NodeAgent, NodeMembership, Resources};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::runner::Target;
use super::TestgridError;

/// How often the agent looks at its runs.
const TICK: Duration = Duration::from_millis(100);
/// The longest a finished test waits for its output to reach the log server.
const DELIVERY_LIMIT: Duration = Duration::from_secs(60);

/// The running cluster of one; [`LocalCluster::stop`] ends it.
#[derive(Debug)]
pub struct LocalCluster {
    target: Target,
    node: String,
    driver: Arc<DockerDriver>,
    stop: watch::Sender<bool>,
    loops: Vec<JoinHandle<()>>,
    _member: NodeMembership,
    _logs: tempfile::TempDir,
}

/// 32 bytes from the kernel's random source, as hex: the log server's token for this run.
fn random_token() -> Result<String, TestgridError> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| TestgridError::Io { context: "reading /dev/urandom for the log server's token".into(), source })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl LocalCluster {
    /// Starts it, with room for `workers` tests of `per_test` at once (at least the
    /// machine's own size: the local engine is the limit, not a number in a store).
    pub async fn start(workers: usize, per_test: Resources) -> Result<LocalCluster, TestgridError> {
        let store = ClusterStore::new(Arc::new(MemoryKv::new()), "testgrid");
        let fp = keelson_scheduler::fingerprint(std::path::Path::new("/var/lib/docker"));
        let wanted = Resources::new(per_test.cpu_millis * workers as u64, per_test.memory_mb * workers as u64);
        let resources = Resources::new(fp.resources.cpu_millis.max(wanted.cpu_millis), fp.resources.memory_mb.max(wanted.memory_mb));
        // A node name of this process: two testgrid runs on one engine never ship or
        // clean up each other's tests.
        let node = format!("testgrid-{}", std::process::id());
        let member = store.join(&Node::new(&node, resources), Duration::from_secs(30)).await?;
        let driver = Arc::new(DockerDriver::connect().await?);

        // The log server, on loopback with a token of this run only.
        let logs = tempfile::tempdir().map_err(|source| TestgridError::Io { context: "the log server's folder".into(), source })?;
        let token = random_token()?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|source| TestgridError::Io { context: "binding the log server".into(), source })?;
        let logd =
            format!("http://{}", listener.local_addr().map_err(|source| TestgridError::Io { context: "log server".into(), source })?);
        let mut config = crate::logd::LogdConfig::new(logs.path(), Some(token.clone()));
        // A test's whole output comes back in one answer.
        config.max_history = 10_000_000;

        let (stop, stopped) = watch::channel(false);
        let until_stopped = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            }
        };
        let mut loops = Vec::new();
        loops.push(tokio::spawn({
            let stop = until_stopped();
            async move {
                if let Err(e) = crate::logd::serve(listener, config, stop).await {
                    tracing::error!(error = %e, "testgrid's log server stopped");
                }
            }
        }));
        let mut options = keelson_logship::SinkOptions::default();
        options.bearer_token = Some(token.clone());
        let sink = keelson_logship::sink_from_url(&format!("{logd}/v1/push"), &options)
            .map_err(|e| TestgridError::Runner(format!("the log sink: {e}")))?;
        let shipper = keelson_scheduler::TaskLogShipper::new(driver.clone(), sink, node.clone());
        let agent = NodeAgent::new(node.clone(), store.clone(), driver.clone(), None, "127.0.0.1")
            .with_stop_grace(Duration::from_secs(2))
            .with_output_shipping(shipper.shipped_outputs(), DELIVERY_LIMIT);
        loops.push(tokio::spawn(shipper.run(TICK, until_stopped())));
        loops.push(tokio::spawn(Arc::new(agent).run(TICK, until_stopped())));
        Ok(LocalCluster {
            target: Target { store, logd, logd_token: Some(token) },
            node,
            driver,
            stop,
            loops,
            _member: member,
            _logs: logs,
        })
    }

    /// Where tests run.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Stops the agent, the shipper and the log server, then stops and removes any test
    /// still running (an interrupted run leaves no container behind).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for l in self.loops {
            let _ = l.await;
        }
        let Ok(tasks) = keelson_scheduler::Driver::list(&*self.driver).await else { return };
        for task in tasks.iter().filter(|t| t.labels.get(keelson_scheduler::NODE_LABEL) == Some(&self.node)) {
            let _ = keelson_scheduler::Driver::stop(&*self.driver, &task.id, Duration::from_secs(1)).await;
            let _ = keelson_scheduler::Driver::remove(&*self.driver, &task.id).await;
        }
    }
}
