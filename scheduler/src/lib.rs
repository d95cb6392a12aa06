//! Placement, task drivers and volumes for keelson.
//!
//! - [`Scheduler`]: pure, synchronous placement (`plan(&ClusterSnapshot, &Job)`);
//!   [`BinPack`] is the embedded default (best fit on cpu/memory, static ports,
//!   equality constraints, explanations for what did not fit).
//! - [`Driver`]: runs a task on this node; [`ProcessDriver`] runs local processes in
//!   their own process groups (SIGTERM, then SIGKILL after the grace period).
//! - [`VolumeManager`]: named volumes; [`LocalVolumes`] keeps them as directories.
//!
//! ```
//! use keelson_scheduler::{BinPack, ClusterSnapshot, Job, Node, Resources, Scheduler, TaskGroup};
//!
//! let cluster = ClusterSnapshot {
//!     nodes: vec![Node::new("n1", Resources::new(2000, 4096)), Node::new("n2", Resources::new(2000, 4096))],
//!     allocations: vec![],
//! };
//! let job = Job::new("web", vec![TaskGroup::new("http", 3, Resources::new(1000, 512))]);
//! let plan = BinPack.plan(&cluster, &job)?;
//! assert!(plan.is_complete());
//! // Best fit fills n1 before opening n2.
//! assert_eq!(plan.placements.iter().filter(|p| p.node == "n1").count(), 2);
//! # Ok::<(), keelson_scheduler::Error>(())
//! ```

mod driver;
mod error;
mod model;
mod placement;
mod process;
mod volumes;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use driver::{Driver, DriverCapabilities, Output, OutputLine, OutputStream, TaskSpec, TaskState, TaskStatus};
pub use error::{validate_id, Dimension, Error, Result};
pub use model::{
    Allocation, ClusterSnapshot, Constraint, ConstraintOp, Explanation, Job, Node, Placement, Plan, Resources, TaskGroup, Unplaced,
};
pub use placement::{BinPack, Scheduler, SchedulerCapabilities, MAX_GROUP_COUNT};
pub use process::{ProcessDriver, OUTPUT_TAIL};
pub use volumes::{LocalVolumes, Volume, VolumeCapabilities, VolumeManager};
