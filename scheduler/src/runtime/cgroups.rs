//! Resource limits for the process driver: one control group per task, under a
//! `keelson` group, on cgroup v2 (the unified hierarchy) or, where the controllers are
//! still on v1 hierarchies, on the `cpu`, `memory` and `pids` ones.
//!
//! A task joins its group before its program starts: the driver runs the program through
//! `/bin/sh`, which writes its own pid into the group and then `exec`s the program (same
//! pid), so nothing the program forks can start outside the group. (Joining after spawn
//! would leave a window; `clone3(CLONE_INTO_CGROUP)` would need unsafe code.)

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::task::Limits;

const BACKEND: &str = "process";
/// The CFS period a CPU quota is expressed in (100 ms, the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// The control groups the driver can create tasks in.
#[derive(Clone, Debug)]
pub(crate) enum Cgroups {
    /// cgroup v2: `<root>/keelson/<task>/` with cpu, memory and pids enabled.
    V2 { root: PathBuf, parent: PathBuf },
    /// cgroup v1: `<controller mount>/keelson/<task>/` for each of cpu, memory, pids.
    V1 { cpu: PathBuf, memory: PathBuf, pids: PathBuf },
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Backend { backend: BACKEND, source: format!("{context}: {e}").into() }
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(io(format!("writing {value:?} to {}", path.display())))
}

impl Cgroups {
    /// The groups under `root` (normally `/sys/fs/cgroup`), if this process may create
    /// them (root) and cpu, memory and pids are available. Only reads: nothing on the
    /// host changes until a task with limits starts.
    pub(crate) fn detect(root: &Path) -> Option<Cgroups> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        if let Ok(controllers) = std::fs::read_to_string(root.join("cgroup.controllers")) {
            let have: Vec<&str> = controllers.split_whitespace().collect();
            return ["cpu", "memory", "pids"]
                .iter()
                .all(|c| have.contains(c))
                .then(|| Cgroups::V2 { root: root.to_owned(), parent: root.join("keelson") });
        }
        let v1 = |c: &str| root.join(c).join("cgroup.procs").exists().then(|| root.join(c).join("keelson"));
        Some(Cgroups::V1 { cpu: v1("cpu")?, memory: v1("memory")?, pids: v1("pids")? })
    }

    /// Creates the `keelson` parents (idempotent); on v2, enables the controllers for
    /// the subtree, which fails where the root's own group holds processes (a container
    /// without its own cgroup namespace): the task then fails to start, naming why.
    fn prepare(&self) -> Result<()> {
        match self {
            Cgroups::V2 { root, parent } => {
                // Children get controllers only if every ancestor enables them for its subtree.
                write(&root.join("cgroup.subtree_control"), "+cpu +memory +pids")?;
                std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
                write(&parent.join("cgroup.subtree_control"), "+cpu +memory +pids")
            }
            Cgroups::V1 { cpu, memory, pids } => {
                for dir in [cpu, memory, pids] {
                    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
                }
                Ok(())
            }
        }
    }

    fn dirs(&self, task: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V2 { parent, .. } => vec![parent.join(task)],
            Cgroups::V1 { cpu, memory, pids } => vec![cpu.join(task), memory.join(task), pids.join(task)],
        }
    }

    /// Creates (or updates) `task`'s group with `limits`; returns the `cgroup.procs`
    /// files the task's process must join.
    pub(crate) fn create(&self, task: &str, limits: &Limits) -> Result<Vec<PathBuf>> {
        self.prepare()?;
        let dirs = self.dirs(task);
        for dir in &dirs {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let memory = limits.memory_mb.saturating_mul(1024 * 1024);
        let quota = limits.cpu_millis.saturating_mul(CPU_PERIOD_US) / 1000;
        match self {
            Cgroups::V2 { .. } => {
                let dir = &dirs[0];
                let cpu =
                    if limits.cpu_millis == 0 { format!("max {CPU_PERIOD_US}") } else { format!("{} {CPU_PERIOD_US}", quota.max(1000)) };
                write(&dir.join("cpu.max"), &cpu)?;
                write(&dir.join("memory.max"), &if memory == 0 { "max".to_owned() } else { memory.to_string() })?;
                if memory != 0 && dir.join("memory.swap.max").exists() {
                    // Over the limit means killed, not swapped out slowly.
                    write(&dir.join("memory.swap.max"), "0")?;
                }
                write(&dir.join("pids.max"), &if limits.pids == 0 { "max".to_owned() } else { limits.pids.to_string() })?;
            }
            Cgroups::V1 { .. } => {
                let (cpu, mem, pids) = (&dirs[0], &dirs[1], &dirs[2]);
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &if limits.cpu_millis == 0 { "-1".to_owned() } else { quota.max(1000).to_string() })?;
                write(&mem.join("memory.limit_in_bytes"), &if memory == 0 { "-1".to_owned() } else { memory.to_string() })?;
                if memory != 0 && mem.join("memory.memsw.limit_in_bytes").exists() {
                    write(&mem.join("memory.memsw.limit_in_bytes"), &memory.to_string())?;
                }
                write(&pids.join("pids.max"), &if limits.pids == 0 { "max".to_owned() } else { limits.pids.to_string() })?;
            }
        }
        Ok(dirs.iter().map(|d| d.join("cgroup.procs")).collect())
    }

    /// Kills whatever is left in `task`'s group (processes that left its process group)
    /// and removes the group.
    pub(crate) fn remove(&self, task: &str) {
        for dir in self.dirs(task) {
            if !dir.exists() {
                continue;
            }
            for _ in 0..50 {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                let pids: Vec<i32> = procs.split_whitespace().filter_map(|p| p.parse().ok()).collect();
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if let Err(e) = std::fs::remove_dir(&dir) {
                tracing::warn!(group = %dir.display(), error = %e, "removing a task's control group");
            }
        }
    }

    /// `command` run inside `procs` groups: `/bin/sh` joins them, then becomes the program.
    pub(crate) fn wrap(procs: &[PathBuf], command: &[String]) -> Vec<String> {
        let script = r#"while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@""#;
        let mut out = vec!["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned(), "keelson-limits".to_owned()];
        out.extend(procs.iter().map(|p| p.display().to_string()));
        out.push("--".to_owned());
        out.extend(command.iter().cloned());
        out
    }
}
