//! Each helper starts the real thing, and the thing works, checked with an independent
//! client. These need root, Docker, and the Debian packages scripts/test installs.

use std::net::Ipv4Addr;

use keelson_testkit::dnsmasq::{DnsRecord, Dnsmasq};
use keelson_testkit::etcd::Etcd;
use keelson_testkit::netns::Netns;
use keelson_testkit::{docker, require, run, TestkitError};

#[test]
fn etcd_starts_and_stores() {
    let etcd = Etcd::start().expect("etcd starts");
    assert!(etcd.healthy());
    // Through etcd's own JSON gateway: key "a2V5" is base64 "key", value "dmFs" is "val".
    etcd.request("POST", "/v3/kv/put", r#"{"key":"a2V5","value":"dmFs"}"#).expect("put");
    let got = etcd.request("POST", "/v3/kv/range", r#"{"key":"a2V5"}"#).expect("range");
    assert!(got.contains("\"value\":\"dmFs\""), "{got}");
    let addr = etcd.client_addr();
    drop(etcd);
    assert!(std::net::TcpStream::connect(addr).is_err(), "etcd stopped on drop");
}

#[test]
fn dnsmasq_serves_a_and_srv_records() {
    let records = [
        DnsRecord::A { name: "web1.keelson.test".into(), ip: Ipv4Addr::new(127, 0, 0, 11) },
        DnsRecord::Srv { name: "_web._tcp.keelson.test".into(), target: "web1.keelson.test".into(), port: 8080, priority: 1, weight: 10 },
    ];
    let dns = Dnsmasq::start(&records, 5).expect("dnsmasq starts");
    assert_eq!(dns.dig_short("web1.keelson.test", "A").expect("dig A"), vec!["127.0.0.11"]);
    assert_eq!(dns.dig_short("_web._tcp.keelson.test", "SRV").expect("dig SRV"), vec!["1 10 8080 web1.keelson.test."]);
    assert_eq!(dns.dig_short("elsewhere.example", "A").expect("dig"), Vec::<String>::new(), "no upstream resolution");
}

#[test]
fn docker_runs_the_scratch_busybox_image() {
    let version = docker::engine_version().expect("Docker Engine answers");
    assert!(!version.is_empty());
    let image = docker::busybox_image().expect("image builds");
    let docker = require("docker", "docker.io").expect("docker cli");
    let out = run(&docker, &["run", "--rm", "--network", "none", &image, "/bin/busybox", "echo", "keelson-ok"]).expect("container runs");
    assert_eq!(out.trim(), "keelson-ok");
    assert_eq!(docker::busybox_image().expect("cached"), image, "same busybox, same image");
}

#[test]
fn netns_hosts_talk_over_veth() {
    let ns = Netns::create("kt").expect("netns");
    // The peer's name must be unique on the host; the namespace name carries the pid.
    let host_if = format!("ktv{}", std::process::id() % 100_000);
    ns.add_veth(&host_if, "10.254.7.1/30", "eth0", "10.254.7.2/30").expect("veth");
    let out = ns.exec("/bin/busybox", &["ping", "-c", "1", "-W", "2", "10.254.7.1"]).expect("ping from the namespace to the host end");
    assert!(out.contains("1 packets received"), "{out}");
    let name = ns.name().to_owned();
    drop(ns);
    let ip = require("ip", "iproute2").expect("ip");
    assert!(!run(&ip, &["netns", "list"]).expect("list").contains(&name), "namespace deleted on drop");
    // The kernel tears the pair down asynchronously after the namespace goes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while run(&ip, &["link", "show", &host_if]).is_ok() {
        assert!(std::time::Instant::now() < deadline, "host veth end {host_if} still there 5 s after the namespace was deleted");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_missing_tool_names_its_package() {
    match require("keelson-no-such-tool", "keelson-pkg") {
        Err(e @ TestkitError::Missing { .. }) => assert!(e.to_string().contains("apt-get install -y keelson-pkg"), "{e}"),
        other => panic!("expected Missing, got {other:?}"),
    }
}
