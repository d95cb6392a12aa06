//! Runs the real `dns-catalog` binary and asks it with `dig`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn dns_catalog_answers_registered_services() {
    let port = keelson_testkit::free_port().expect("port");
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dns-catalog"))
        .args([
            "--listen",
            &addr,
            "--domain",
            "corp.test",
            "--register",
            "api=api-1@127.0.0.21:9000",
            "--register",
            "api=api-2@127.0.0.22:9001",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
    assert!(line.starts_with("dns-catalog serving corp.test on"), "{line}");
    let a = keelson_testkit::dnsmasq::dig(addr.parse().expect("addr"), &["+short", "api.service.corp.test", "A"]).expect("dig");
    let mut got: Vec<&str> = a.lines().collect();
    got.sort();
    assert_eq!(got, vec!["127.0.0.21", "127.0.0.22"]);
    let srv = keelson_testkit::dnsmasq::dig(addr.parse().expect("addr"), &["+short", "_api._tcp.corp.test", "SRV"]).expect("dig");
    assert_eq!(srv.lines().count(), 2, "{srv}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    keelson_testkit::wait_exit(&mut child, Duration::from_secs(10)).expect("stops on SIGINT");
}

#[test]
fn bad_registration_is_rejected_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_dns-catalog")).args(["--register", "Bad_Name=x@127.0.0.1:1"]).output().expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("service name"), "{}", String::from_utf8_lossy(&out.stderr));
}
