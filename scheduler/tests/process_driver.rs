//! ProcessDriver behaviour beyond the shared contract: process groups leave no orphans.

use std::time::Duration;

use futures::StreamExt;
use keelson_scheduler::{Driver, Error, ProcessDriver, TaskSpec, TaskState};

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
