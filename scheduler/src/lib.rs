//! Placement, orchestration and the node runtime for keelson, in three parts over a shared
//! vocabulary of errors, stored records and task specs: placement (pure), orchestration
//! (specs, deployments, the cluster store, the controller; it places through any
//! `Arc<dyn Scheduler>`, see [`ClusterStore::with_scheduler`]) and the runtime (drivers,
//! volumes, the node agent). ARCHITECTURE.md says why in that order.
//!
//! - [`Scheduler`]: pure, synchronous placement (`plan(&ClusterSnapshot, &Job)`).
//!   [`PlacementEngine`] is the embedded default: constraints (`=`, `!=`, ordering,
//!   version ranges, regexp, sets, presence, distinct hosts/properties), weighted
//!   affinities, spread with targets, volume locality and single writers, static and
//!   dynamic ports, bin-pack or spread policy, priorities with preemption, and an
//!   explanation for every task that did not fit. For many jobs against one cluster,
//!   index it once as a [`ClusterState`] and call [`ClusterState::place`];
//!   [`ClusterState::rebalance`] proposes moves that free whole nodes.
//! - [`Driver`]: runs a task on this node; [`ProcessDriver`] runs local processes in
//!   their own process groups (SIGTERM, then SIGKILL after the grace period), tells them
//!   their ports (`PORT`), enforces [`Limits`] in a control group per task when it can,
//!   restarts them under a [`RestartPolicy`], and with [`ProcessDriver::persistent`]
//!   adopts them after a restart; `DockerDriver` (feature `docker`) runs containers.
//! - [`VolumeManager`]: named volumes; [`LocalVolumes`] keeps them as directories,
//!   `DockerVolumes` (feature `docker`) as Docker named volumes. Both export and import
//!   tar streams: [`serve_volumes`] and [`fetch_volume`] move a volume between nodes.
//!
//! ```
//! use keelson_scheduler::{ClusterSnapshot, Constraint, Job, Node, PlacementEngine, Resources, Scheduler, TaskGroup};
//!
//! let cluster = ClusterSnapshot {
//!     nodes: vec![
//!         Node::new("n1", Resources::new(2000, 4096)).with_attribute("zone", "a"),
//!         Node::new("n2", Resources::new(2000, 4096)).with_attribute("zone", "a"),
//!         Node::new("n3", Resources::new(8000, 8192)).with_attribute("zone", "b"),
//!     ],
//!     ..ClusterSnapshot::default()
//! };
//! let web = TaskGroup::new("http", 3, Resources::new(1000, 512)).with_constraint(Constraint::equal("attr.zone", "a"));
//! let plan = PlacementEngine::new().plan(&cluster, &Job::new("web", vec![web]))?;
//! assert!(plan.is_complete());
//! // Best fit fills n1 before opening n2; n3 is filtered out by the constraint.
//! assert_eq!(plan.placements.iter().filter(|p| p.node == "n1").count(), 2);
//! assert!(plan.placements.iter().all(|p| p.node != "n3"));
//! # Ok::<(), keelson_scheduler::Error>(())
//! ```
//!
//! Orchestration: [`Deployment`] moves a group between versions under a [`Strategy`]
//! and its [`Gates`], as a pure state machine; [`reconcile`] keeps counts right;
//! [`ClusterStore`] keeps the state in etcd or Consul with optimistic plan commits;
//! a [`NodeAgent`] per node runs what is assigned there; the [`Controller`] advances
//! deployments and replaces lost work; [`RunSpec`]s are one-off runs. At scale, plans
//! read a [`ClusterCache`] (a watch-fed copy of the cluster, as the leading controller
//! keeps) instead of the whole store:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use keelson_discovery::MemoryKv;
//! use keelson_scheduler::{ClusterCache, ClusterStore, DesiredGroup, Node, Resources};
//!
//! # #[tokio::main] async fn main() -> Result<(), keelson_scheduler::Error> {
//! let store = ClusterStore::new(Arc::new(MemoryKv::new()), "cluster");
//! let nodes: Vec<Node> = (0..100).map(|i| Node::new(format!("n{i}"), Resources::new(4000, 8192))).collect();
//! let _members = store.join_all(&nodes, Duration::from_secs(10)).await?; // one shared lease
//! let cache = ClusterCache::start(&store).await?;
//! let web = DesiredGroup { job: "web".into(), group: "http".into(), version: 1, count: 50, resources: Resources::new(500, 256), ..Default::default() };
//! let pass = store.reschedule_with(&cache, &[web]).await?;
//! assert_eq!(pass.placed.len(), 50);
//! assert!(store.check_stored().await?.violations.is_empty());
//! # Ok(()) }
//! ```
//!
//! ```
//! use keelson_scheduler::{Action, AllocHealth, AllocView, Deployment, Gates, Strategy};
//!
//! // Three healthy allocations of version 1; roll to version 2 one extra at a time.
//! let running: Vec<AllocView> =
//!     (0..3).map(|i| AllocView::new(format!("a{i}"), 1, AllocHealth::Healthy { since: 0 })).collect();
//! let strategy = Strategy::Rolling { max_surge: 1, max_unavailable: 0 };
//! let mut deployment = Deployment::new(Some(1), 2, 3, strategy, Gates::default(), false, 1_000)?;
//! // Nothing old may stop before a new one is healthy: the first step only starts one.
//! assert_eq!(deployment.step(&running, 1_000), vec![Action::Start { version: 2, count: 1 }]);
//! # Ok::<(), keelson_scheduler::Error>(())
//! ```
//!
//! A one-node cluster on the embedded defaults (in-memory state, local processes):
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use keelson_discovery::MemoryKv;
//! use keelson_scheduler::{
//!     ClusterStore, Controller, DesiredGroup, Gates, GroupSpec, Node, NodeAgent, ProcessDriver, Resources, Strategy, TaskTemplate,
//! };
//!
//! # #[tokio::main] async fn main() -> Result<(), keelson_scheduler::Error> {
//! let store = ClusterStore::new(Arc::new(MemoryKv::new()), "cluster");
//! let _member = store.join(&Node::new("n1", Resources::new(1000, 512)), Duration::from_secs(10)).await?;
//! let agent = NodeAgent::new("n1", store.clone(), Arc::new(ProcessDriver::new()), None, "127.0.0.1");
//! let group = GroupSpec {
//!     desired: DesiredGroup { job: "batch".into(), group: "w".into(), version: 1, count: 2, resources: Resources::new(100, 16), ..Default::default() },
//!     task: TaskTemplate { command: vec!["sleep".into(), "30".into()], ..Default::default() },
//!     service: None,
//!     release: None,
//! };
//! store.deploy(&group, Strategy::default(), Gates::default()).await?; // the first version runs at once
//! Controller::new(store.clone()).tick().await?;                       // places two allocations
//! let report = agent.sync().await?;                                   // the agent starts them
//! assert_eq!(report.started.len(), 2);
//! # Ok(()) }
//! ```
//!
//! ## Feature flags
//!
#![doc = document_features::document_features!()]
// docs.rs (all features, --cfg docsrs) marks each backend item with the feature it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
mod orchestrate;
mod placement;
mod records;
mod runtime;
mod task;

#[cfg(feature = "conformance")]
pub mod conformance;

// Shared vocabulary.
pub use error::{validate_id, Dimension, Error, Result};
pub use records::{parse_strict, SCHEMA_VERSION};
pub use task::{
    is_secret_file_name, HealthCheck, Limits, MountSource, MountSpec, OutputLine, OutputStream, PortMapping, RestartPolicy, TaskHealth,
    TaskSpec, TaskState, TaskStatus, MAX_LINE_BYTES,
};

// Placement.
pub use placement::engine::{EngineConfig, PREEMPTION_GAP};
pub use placement::model::{
    Affinity, Allocation, ClusterSnapshot, Constraint, ConstraintOp, Eligibility, Eviction, Explanation, HostVolume, Job, Node, Placement,
    Plan, Policy, PortRange, Resources, ScoreBreakdown, Spread, SpreadTarget, TaskGroup, Unplaced, VolumeAccess, VolumeMount,
    VolumeRequest,
};
pub use placement::rebalance::{Move, RebalancePlan};
pub use placement::scheduler::{PlacementEngine, Scheduler, SchedulerCapabilities};
pub use placement::state::ClusterState;

// Orchestration.
pub use orchestrate::cluster_cache::ClusterCache;
pub use orchestrate::cluster_store::{wall_clock_ms, ClusterStore, ClusterView, NodeMembership, PlanCommit, SlotHome};
pub use orchestrate::controller::{Controller, DeploymentRecord, GroupState, Leadership, TickReport, CONTROLLER_LOCK_TTL, HISTORY_KEPT};
pub use orchestrate::deployment::{Action, AllocHealth, AllocView, Deployment, Millis, Phase, Traffic};
pub use orchestrate::metrics::OrchestrationMetrics;
pub use orchestrate::oneoff::{OneOffRun, RunAction, RunObserved, RunOutcome};
pub use orchestrate::operations::DeployPlan;
pub use orchestrate::planner::ReschedulePass;
pub use orchestrate::reconcile::{reconcile, AllocRecord, AllocStatus, DesiredGroup, Reconciliation};
pub use orchestrate::runs::{RunRecord, RunResult, RunSpec, RESULT_OUTPUT_BYTES, RUN_LABEL};
pub use orchestrate::snapshot::{SnapshotEntry, StoreSnapshot, SNAPSHOT_FORMAT};
pub use orchestrate::spec::{GroupSpec, ReleaseNote, ServiceSpec, TaskTemplate, NODE_LABEL};
pub use orchestrate::store_check::StoredCheck;
pub use orchestrate::strategy::{Gates, Strategy};

// Node runtime.
pub use runtime::agent::{NodeAgent, SyncReport};
#[cfg(feature = "docker")]
pub use runtime::docker::{DockerDriver, RegistryAuth, MANAGED_LABEL, TASK_LABEL};
#[cfg(feature = "docker")]
pub use runtime::docker_images::{BuildRequest, DockerImages};
#[cfg(feature = "docker")]
pub use runtime::docker_volumes::DockerVolumes;
pub use runtime::driver::{Driver, DriverCapabilities, Output};
pub use runtime::fingerprint::{default_route_address, fingerprint, Fingerprint};
pub use runtime::process::{ProcessDriver, OUTPUT_TAIL};
pub use runtime::secret_files::{SecretFiles, SECRETS_MOUNT};
pub use runtime::task_logs::{output_source, ShippedOutputs, TaskLogShipper};
pub use runtime::task_network::TaskNetwork;
pub use runtime::volume_archive::TarStream;
pub use runtime::volume_transfer::{
    copy_volume, fetch_volume, fetch_volume_with, fetch_volume_with_token, serve_volumes, FetchOptions, VolumeServer, VOLUME_PATH,
};
pub use runtime::volumes::{LocalVolumes, Volume, VolumeCapabilities, VolumeManager};
