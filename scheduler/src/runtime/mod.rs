//! The node runtime: drivers that run tasks (local processes, Docker), volume managers
//! and the tar streams that move volumes between nodes, and the node agent that runs
//! what the cluster store assigns to its node. Depends on `orchestrate` (for the store
//! and the specs it reads) and the shared vocabulary.

pub(crate) mod agent;
pub(crate) mod cgroups;
#[cfg(feature = "docker")]
pub(crate) mod docker;
#[cfg(feature = "docker")]
pub(crate) mod docker_images;
#[cfg(feature = "docker")]
pub(crate) mod docker_volumes;
pub(crate) mod driver;
pub(crate) mod fingerprint;
pub(crate) mod process;
pub(crate) mod process_record;
pub(crate) mod run_exec;
pub(crate) mod secret_files;
pub(crate) mod task_logs;
pub(crate) mod task_network;
pub(crate) mod volume_archive;
pub(crate) mod volume_transfer;
pub(crate) mod volumes;
