//! ProcessDriver behaviour beyond the shared contract: process groups leave no orphans;
//! a persistent driver adopts the tasks a previous one left running (never a second copy)
//! and restarts, under their policy, those that died while no driver watched.

use std::time::Duration;

use futures::StreamExt;
use keelson_scheduler::{Driver, Error, Limits, PortMapping, ProcessDriver, RestartPolicy, TaskSpec, TaskState};

fn alive(pid: i32) -> bool {
    // /proc/<pid> exists for live processes and zombies; a zombie's state is 'Z'.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.split_whitespace().nth(2).is_none_or(|s| s != "Z"),
        Err(_) => false,
    }
}

async fn first_line(d: &ProcessDriver, id: &str) -> String {
    let mut out = d.output(id).await.expect("output");
    tokio::time::timeout(Duration::from_secs(10), out.next()).await.expect("line in time").expect("a line").line
}

#[tokio::test]
async fn stop_kills_the_whole_process_group() {
    let d = ProcessDriver::new();
    d.start(TaskSpec::new("tree", ["/bin/sh", "-c", "sleep 300 & echo $!; while true; do sleep 0.1; done"])).await.expect("start");
    let child: i32 = first_line(&d, "tree").await.parse().expect("pid");
    assert!(alive(child), "background child runs");
    d.stop("tree", Duration::from_secs(5)).await.expect("stop");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!alive(child), "background child {child} outlived its task");
}

#[tokio::test]
async fn leader_exit_takes_its_group_along() {
    let d = ProcessDriver::new();
    d.start(TaskSpec::new("leaver", ["/bin/sh", "-c", "sleep 300 & echo $!; exit 0"])).await.expect("start");
    let child: i32 = first_line(&d, "leaver").await.parse().expect("pid");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while alive(child) {
        assert!(tokio::time::Instant::now() < deadline, "orphan {child} survived its leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(d.inspect("leaver").await.expect("inspect").state, TaskState::Exited { code: Some(0), signal: None });
}

#[tokio::test]
async fn dropping_the_driver_kills_its_tasks() {
    let d = ProcessDriver::new();
    d.start(TaskSpec::new("orphan", ["/bin/sh", "-c", "echo $$; while true; do sleep 0.1; done"])).await.expect("start");
    let pid: i32 = first_line(&d, "orphan").await.parse().expect("pid");
    drop(d);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(tokio::time::Instant::now() < deadline, "task {pid} survived its driver");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn missing_program_is_a_typed_error_naming_it() {
    let d = ProcessDriver::new();
    let err = d.start(TaskSpec::new("nope", ["/no/such/program"])).await.expect_err("cannot start");
    assert!(matches!(err, Error::InvalidInput { field: "command", .. }), "{err}");
    assert!(err.to_string().contains("/no/such/program"), "{err}");
    assert!(matches!(d.inspect("nope").await, Err(Error::NotFound { .. })), "nothing recorded");
}

/// Waits until `d` reports `id` with `want` true, or panics after 10 s.
async fn until(d: &ProcessDriver, id: &str, want: impl Fn(&keelson_scheduler::TaskStatus) -> bool) -> keelson_scheduler::TaskStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = d.inspect(id).await.expect("inspect");
        if want(&s) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id} never got there: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_driver_adopts_running_tasks_after_a_restart_and_never_duplicates_them() {
    let dir = tempfile::tempdir().expect("state dir");
    let first = ProcessDriver::persistent(dir.path()).await.expect("driver");
    // It writes all the time: with pipes it would die of SIGPIPE once its reader is gone.
    let svc =
        TaskSpec::new("svc", ["/bin/sh", "-c", "echo $$; while true; do echo tick; sleep 0.05; done"]).with_label("keelson.job", "web");
    first.start(svc.clone()).await.expect("start");
    let pid: i32 = first_line(&first, "svc").await.parse().expect("pid");
    first.start(TaskSpec::new("done", ["/bin/sh", "-c", "echo bye; exit 4"])).await.expect("start");
    until(&first, "done", |s| s.state.is_exited()).await;

    drop(first); // the agent goes away
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alive(pid), "the task outlives its driver (and keeps writing)");

    let second = ProcessDriver::persistent(dir.path()).await.expect("driver");
    let svc_status = second.inspect("svc").await.expect("adopted");
    assert_eq!(svc_status.state, TaskState::Running);
    assert_eq!(svc_status.labels.get("keelson.job").map(String::as_str), Some("web"));
    assert_eq!(first_line(&second, "svc").await, pid.to_string(), "output from before the restart is kept");
    let done = second.inspect("done").await.expect("ended task kept");
    assert_eq!(done.state, TaskState::Exited { code: Some(4), signal: None }, "its exit code recorded");
    assert!(matches!(second.start(svc).await, Err(Error::Conflict { .. })), "never a second one");

    let stopped = second.stop("svc", Duration::from_secs(2)).await.expect("stop an adopted task");
    assert!(stopped.state.is_exited());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!alive(pid), "stopped through the new driver");
    second.remove("svc").await.expect("remove");
    second.remove("done").await.expect("remove");
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0, "records and output files go with their tasks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_died_while_no_driver_watched_is_restarted_under_its_policy() {
    let dir = tempfile::tempdir().expect("state dir");
    let first = ProcessDriver::persistent(dir.path()).await.expect("driver");
    let policy = RestartPolicy { max_restarts: 3, initial_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(1) };
    let spec = TaskSpec { restart: Some(policy), ..TaskSpec::new("worker", ["/bin/sh", "-c", "echo $$; while true; do sleep 0.1; done"]) };
    first.start(spec).await.expect("start");
    let pid: i32 = first_line(&first, "worker").await.parse().expect("pid");
    drop(first);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill the task");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let second = ProcessDriver::persistent(dir.path()).await.expect("driver");
    let restarted = until(&second, "worker", |s| s.restarts == 1 && s.state == TaskState::Running).await;
    assert_eq!(restarted.restarts, 1);
    let mut out = second.output("worker").await.expect("output");
    let mut pids = Vec::new();
    while pids.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(10), out.next()).await.expect("in time").expect("line").line;
        pids.push(line);
    }
    assert_eq!(pids[0], pid.to_string());
    assert_ne!(pids[1], pid.to_string(), "a new process");
    second.stop("worker", Duration::from_secs(2)).await.expect("stop");
    second.remove("worker").await.expect("remove");
}

#[tokio::test]
async fn a_restart_policy_backs_off_doubling_and_capped_and_a_bad_one_is_refused() {
    let bad = serde_json::json!({"max_restarts": 3, "initial_backoff": "soon", "max_backoff": "1s"});
    let err = serde_json::from_value::<RestartPolicy>(bad).expect_err("not a duration");
    assert!(err.to_string().contains("expected number"), "humantime names the problem: {err}");
    let p = RestartPolicy { max_restarts: 9, initial_backoff: Duration::from_millis(100), max_backoff: Duration::from_millis(350) };
    let waits: Vec<Duration> = (0..4).map(|n| p.backoff(n)).collect();
    assert_eq!(waits, [100, 200, 350, 350].map(Duration::from_millis), "doubling, capped");
    assert_eq!(p.backoff(u32::MAX), Duration::from_millis(350), "no overflow");
}

/// Kills a process when dropped (test cleanup, even on failure).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_recorded_group_that_now_belongs_to_another_process_is_never_signalled() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().expect("state dir");
    let first = ProcessDriver::persistent(dir.path()).await.expect("driver");
    first.start(TaskSpec::new("gone", ["/bin/sh", "-c", "echo $$; exec sleep 300"])).await.expect("start");
    let pid: i32 = first_line(&first, "gone").await.parse().expect("pid");
    drop(first);
    // The task dies while no driver watches it...
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill the task");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...and its pid and group go to an unrelated process (as after pid reuse or a
    // reboot): the record now names that process, with the old task's start time.
    let unrelated = KillOnDrop(std::process::Command::new("sleep").arg("60").process_group(0).spawn().expect("spawn"));
    let other = i32::try_from(unrelated.0.id()).expect("pid");
    let path = dir.path().join("gone.json");
    let mut record: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).expect("record")).expect("json");
    record["pid"] = other.into();
    record["pgid"] = other.into();
    std::fs::write(&path, serde_json::to_vec(&record).expect("json")).expect("write record");

    let second = ProcessDriver::persistent(dir.path()).await.expect("driver");
    let status = until(&second, "gone", |s| s.state.is_exited()).await;
    assert!(status.state.is_exited(), "the recorded task is known to be gone");
    second.stop("gone", Duration::from_millis(200)).await.expect("stop a lost task");
    drop(second);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(other), "the unrelated process in the recorded group was signalled");
}

async fn until_exited(d: &ProcessDriver, id: &str) -> keelson_scheduler::TaskStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = d.inspect(id).await.expect("inspect");
        if s.state.is_exited() {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id} did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A task printing 100 MiB with no newline: its output comes in pieces of at most 64 KiB,
/// marked partial and counted, and the process reading it (this one: the agent's
/// driver) grows by at most 16 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_without_newlines_is_cut_into_counted_pieces_with_bounded_memory() {
    let d = ProcessDriver::new();
    let mut registry = prometheus_client::registry::Registry::default();
    d.register_metrics(&mut registry);
    let rss = keelson_testkit::memory::PeakRss::start(Duration::from_millis(20));
    d.start(TaskSpec::new("flood", ["/bin/sh", "-c", "head -c 104857600 /dev/zero | tr '\\0' a"])).await.expect("start");
    let status = until_exited(&d, "flood").await;
    assert_eq!(status.state, TaskState::Exited { code: Some(0), signal: None });
    // 100 MiB / 64 KiB = 1,600 pieces: 1,599 cut, the last ended by the end of output.
    assert_eq!(status.output_lines_split, 1_599);
    let lines: Vec<_> = d.output("flood").await.expect("output").collect().await;
    assert!(!lines.is_empty() && lines.iter().all(|l| l.line.len() <= keelson_scheduler::MAX_LINE_BYTES));
    assert!(lines[..lines.len() - 1].iter().all(|l| l.partial) && !lines[lines.len() - 1].partial, "pieces marked partial but the last");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(text.contains("keelson_driver_output_lines_split_total 1599"), "{text}");
    let grew = rss.growth();
    eprintln!("RSS grew by {} KiB while reading 100 MiB without a newline", grew / 1024);
    assert!(grew <= 16 << 20, "RSS grew by {} MiB", grew >> 20);
    d.remove("flood").await.expect("remove");
}

/// A reader that falls behind misses lines (the task is never slowed by it), and every
/// missed line is counted, in the task's status and in the driver's metrics: what it
/// read plus what it missed is all the task printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_a_slow_reader_misses_are_counted_never_silent() {
    let d = ProcessDriver::new();
    let mut registry = prometheus_client::registry::Registry::default();
    d.register_metrics(&mut registry);
    d.start(TaskSpec::new("chatty", ["/bin/sh", "-c", "sleep 1; seq 1 10000"])).await.expect("start");
    // Subscribed before any line, then not read until the task has ended.
    let out = d.output("chatty").await.expect("output");
    until_exited(&d, "chatty").await;
    let read = out.collect::<Vec<_>>().await.len() as u64;
    let dropped = d.inspect("chatty").await.expect("inspect").output_lines_dropped;
    assert!(dropped > 0, "the reader fell behind");
    assert_eq!(read + dropped, 10_000, "read {read} + missed {dropped}: every line accounted for");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(text.contains(&format!("keelson_driver_output_lines_dropped_total {dropped}")), "{text}");
}

/// Collects a task's output until it ends.
async fn all_output(d: &ProcessDriver, id: &str) -> String {
    let lines: Vec<String> = tokio::time::timeout(Duration::from_secs(30), d.output(id).await.expect("output").map(|l| l.line).collect())
        .await
        .expect("the output ends with the task");
    lines.join("\n")
}

#[tokio::test]
async fn a_task_is_told_its_ports_and_a_mapping_it_cannot_make_is_refused() {
    let d = ProcessDriver::new();
    let spec = TaskSpec {
        ports: vec![PortMapping::new(18080, 18080).named("web"), PortMapping::new(18081, 18081)],
        ..TaskSpec::new("told", ["/bin/sh", "-c", "echo $PORT $KEELSON_PORT_WEB $KEELSON_TASK_ID"])
    };
    assert!(!d.capabilities().publishes_ports);
    d.start(spec).await.expect("start");
    assert_eq!(all_output(&d, "told").await, "18080 18080 told");
    let mapped = TaskSpec { ports: vec![PortMapping::new(80, 18082)], ..TaskSpec::new("mapped", ["/bin/true"]) };
    assert!(matches!(d.start(mapped).await, Err(Error::Unsupported { backend: "process", .. })));
}

/// Whether this machine lets a root process put tasks in control groups with the cpu,
/// memory and pids controllers, read independently of the driver.
fn control_groups_usable() -> bool {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let is_root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")));
    let v2 = std::fs::read_to_string(root.join("cgroup.controllers"))
        .is_ok_and(|c| ["cpu", "memory", "pids"].iter().all(|w| c.split_whitespace().any(|x| x == *w)));
    let v1 = ["cpu", "memory", "pids"].iter().all(|c| root.join(c).join("cgroup.procs").exists());
    is_root && (v2 || v1)
}

/// The task's control-group file `name` for `controller`, read through /proc/<pid>/cgroup.
fn group_file(pid: &str, controller: &str, name: &str) -> String {
    let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup of the task");
    let path = groups
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers.split(',').any(|c| c == controller).then(|| format!("/sys/fs/cgroup/{controller}{path}"))
        })
        .or_else(|| groups.lines().find_map(|l| l.strip_prefix("0::").map(|p| format!("/sys/fs/cgroup{p}"))))
        .expect("the task's group");
    std::fs::read_to_string(format!("{path}/{name}")).expect("group file").trim().to_owned()
}

#[tokio::test]
async fn limits_are_enforced_in_a_control_group_or_refused() {
    let d = ProcessDriver::new();
    let usable = control_groups_usable();
    assert_eq!(d.capabilities().resource_limits, usable, "the capability says what the machine allows");
    let limited =
        |id: &str, limits: Limits, script: &str| TaskSpec { limits: Some(limits), ..TaskSpec::new(id, ["/bin/sh", "-c", script]) };
    if !usable {
        let err = d.start(limited("refused", Limits::new(500, 64), "true")).await.expect_err("refused");
        assert!(matches!(err, Error::Unsupported { backend: "process", .. }), "{err:?}");
        return;
    }
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();

    // CPU and memory limits are what the task's own group says.
    d.start(limited("cpu", Limits::new(500, 64), "echo $$; sleep 30")).await.expect("start");
    let pid = first_line(&d, "cpu").await;
    if v2 {
        assert_eq!(group_file(&pid, "cpu", "cpu.max"), "50000 100000");
        assert_eq!(group_file(&pid, "memory", "memory.max"), (64u64 << 20).to_string());
    } else {
        assert_eq!(group_file(&pid, "cpu", "cpu.cfs_quota_us"), "50000");
        assert_eq!(group_file(&pid, "memory", "memory.limit_in_bytes"), (64u64 << 20).to_string());
    }
    d.stop("cpu", Duration::from_secs(1)).await.expect("stop");

    // Past its memory, the task is killed.
    let hog = "x=$(head -c 134217728 /dev/zero | tr '\\0' a); echo survived ${#x}";
    d.start(limited("hog", Limits::new(0, 16), hog)).await.expect("start");
    let state = until_exited(&d, "hog").await.state;
    assert!(!matches!(state, TaskState::Exited { code: Some(0), .. }), "a 128 MiB string fits no 16 MiB group: {state:?}");
    assert!(!all_output(&d, "hog").await.contains("survived"));

    // Past its process count, fork fails.
    d.start(limited("forks", Limits::default().with_pids(4), "for i in 1 2 3 4 5 6 7 8; do sleep 5 & done; wait")).await.expect("start");
    let output = all_output(&d, "forks").await;
    assert!(output.to_ascii_lowercase().contains("fork"), "fork refused past 4 processes: {output}");

    // Removing a task removes its group.
    for id in ["cpu", "hog", "forks"] {
        until_exited(&d, id).await;
        d.remove(id).await.expect("remove");
    }
    let leftover = if v2 { vec!["/sys/fs/cgroup/keelson/forks".to_owned()] } else { vec!["/sys/fs/cgroup/pids/keelson/forks".to_owned()] };
    assert!(leftover.iter().all(|p| !std::path::Path::new(p).exists()), "{leftover:?}");
}
