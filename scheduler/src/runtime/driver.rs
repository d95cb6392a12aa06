//! The `Driver` trait: run a task on this node, stop it with a grace period, inspect it,
//! read its output.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::error::Result;
use crate::task::{OutputLine, TaskSpec, TaskStatus};

/// A task's output: recent lines first, then live lines until the task's streams close.
pub type Output = BoxStream<'static, OutputLine>;

/// What a driver supports.
///
/// A backend outside this crate starts from `default()` (nothing supported) and sets
/// the fields it supports: `let mut caps = DriverCapabilities::default(); caps.images = true;`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DriverCapabilities {
    /// Runs images (`TaskSpec::image`).
    pub images: bool,
    /// Enforces cpu, memory and process-count limits (`TaskSpec::limits`); a driver that
    /// cannot refuses tasks with limits.
    pub resource_limits: bool,
    /// Publishes a host port to a different port inside the task (`PortMapping` with
    /// `container != host`). Without it, tasks share the host's network and must serve
    /// on the host port they are told (`PORT`), and the node agent asks for no mapping.
    pub publishes_ports: bool,
}

impl DriverCapabilities {
    /// Capabilities with every flag given.
    pub fn new(images: bool, resource_limits: bool, publishes_ports: bool) -> Self {
        DriverCapabilities { images, resource_limits, publishes_ports }
    }
}

/// Runs tasks on this node.
#[async_trait]
pub trait Driver: Send + Sync + std::fmt::Debug {
    /// The driver's name.
    fn name(&self) -> &'static str;

    /// What it supports.
    fn capabilities(&self) -> DriverCapabilities;

    /// Starts a task. [`Error::Conflict`] if a task with that id is still running.
    async fn start(&self, spec: TaskSpec) -> Result<TaskStatus>;

    /// Asks the task to stop (SIGTERM or the runtime's equivalent); after `grace`, kills
    /// it. Returns the final status. Stopping an exited task returns its status.
    async fn stop(&self, id: &str, grace: Duration) -> Result<TaskStatus>;

    /// The task's current status.
    async fn inspect(&self, id: &str) -> Result<TaskStatus>;

    /// The task's output.
    async fn output(&self, id: &str) -> Result<Output>;

    /// Every task the driver knows.
    async fn list(&self) -> Result<Vec<TaskStatus>>;

    /// Forgets an exited task. [`Error::Conflict`] if it is still running.
    async fn remove(&self, id: &str) -> Result<()>;
}
