//! Runs the real `minipaas demo` binary: 30 requests reach all 3 replicas, SIGINT stops
//! everything, no replica process survives, and the logs were shipped.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Direct children of `pid`, from /proc.
fn children(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        // Fields after the ")" closing the command name: state, ppid, ...
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        if after.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()) != Some("Z"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_three_replicas_and_stops_cleanly() {
    let data = tempfile::tempdir().expect("tempdir");
    let port = keelson_testkit::free_port().expect("port");
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_minipaas"))
        .args(["demo", "--listen", &listen, "--data-dir"])
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("minipaas starts");
    let pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));

    // The one ready line, with the curl command to try.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        let _ = tx.send(line);
        let mut rest = String::new();
        while stdout.read_line(&mut rest).is_ok_and(|n| n > 0) {}
    });
    let ready = rx.recv_timeout(Duration::from_secs(60)).expect("ready line within 60 s");
    assert!(ready.starts_with("minipaas ready:"), "{ready}");
    assert!(ready.contains(&format!("curl -H 'Host: hello.localhost' http://{listen}/")), "{ready}");

    let replicas = children(pid);
    assert_eq!(replicas.len(), 3, "three replica processes: {replicas:?}");

    let mut answered = BTreeSet::new();
    for _ in 0..30 {
        let r = keelson_testkit::http::get(listen.parse().expect("addr"), "hello.localhost", "/").await.expect("response");
        assert_eq!(r.status, 200, "{}", r.body);
        let first = r.body.lines().next().unwrap_or_default().to_owned();
        assert!(first.starts_with("hello from hello-"), "{first}");
        answered.insert(first);
    }
    assert_eq!(answered.len(), 3, "all 3 replicas answered: {answered:?}");

    kill(Pid::from_raw(pid as i32), Signal::SIGINT).expect("SIGINT");
    let status = keelson_testkit::wait_exit(&mut child, Duration::from_secs(30)).expect("minipaas stops on SIGINT");
    assert!(status.success(), "clean exit: {status}");
    for r in &replicas {
        assert!(!alive(*r), "replica process {r} survived minipaas");
    }

    let log = std::fs::read_to_string(data.path().join("logs/hello.log")).expect("hello.log written");
    let records: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    let instances: BTreeSet<&str> = records.iter().filter_map(|r| r["instance"].as_str()).collect();
    assert_eq!(instances, BTreeSet::from(["hello-1", "hello-2", "hello-3"]));
    let requests = records.iter().filter(|r| r["line"].as_str().is_some_and(|l| l.starts_with("GET / from "))).count();
    assert_eq!(requests, 30, "every request's log line shipped");
    assert!(records.iter().all(|r| r["timestamp"].is_string() && r["service"] == "hello" && r["stream"].is_string()));
}

#[test]
fn demo_refuses_a_port_in_use_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let data = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_minipaas"))
        .args(["demo", "--listen", &addr, "--data-dir"])
        .arg(data.path())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("binding the router to {addr}")), "{err}");
}
