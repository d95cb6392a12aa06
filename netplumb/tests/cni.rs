//! `keelson-cni` called exactly as a runtime calls a plugin: `CNI_*` variables, the
//! configuration on stdin, the result or error on stdout; run inside a namespace that
//! plays the host.

#![cfg(feature = "netlink")]

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use keelson_testkit::netns::Netns;
use serde_json::{json, Value};
use support::{call, serve, snapshot, Endpoints, HostWithOutside};

struct Call<'a> {
    host: &'a Netns,
    conf: &'a Value,
}

impl Call<'_> {
    fn run(&self, command: &str, container: &str, netns: &str, ifname: &str) -> (i32, Value) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", self.host.name(), env!("CARGO_BIN_EXE_keelson-cni")])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn keelson-cni");
        child.stdin.take().expect("stdin").write_all(self.conf.to_string().as_bytes()).expect("write config");
        let out = child.wait_with_output().expect("wait");
        let text = String::from_utf8_lossy(&out.stdout);
        let value =
            if text.trim().is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")) };
        (out.status.code().unwrap_or(-1), value)
    }
}

fn conf(h: &HostWithOutside, name: &str, subnet: &str) -> Value {
    json!({
        "cniVersion": "1.0.0", "name": name, "type": "keelson-cni", "bridge": "ignored0", "isGateway": true,
        "ipMasq": true, "ipam": { "type": "host-local", "subnet": subnet },
        "stateDir": h.state.path(),
    })
}

#[test]
fn add_check_del_gc_status_version_as_a_runtime_calls_them() {
    let h = HostWithOutside::new();
    let eps = Endpoints::default();
    let before = snapshot(&h.host);
    let mut with_ports = conf(&h, "cninet", "10.210.0.0/24");
    with_ports["runtimeConfig"] = json!({ "portMappings": [ { "hostPort": 18300, "containerPort": 8080, "protocol": "tcp" } ] });
    let plain = conf(&h, "cninet", "10.210.0.0/24");
    let c = Call { host: &h.host, conf: &with_ports };
    let p = Call { host: &h.host, conf: &plain };

    let (code, version) = p.run("VERSION", "", "", "");
    assert_eq!(code, 0);
    assert!(version["supportedVersions"].as_array().expect("versions").iter().any(|v| v == "1.0.0"), "{version}");

    let ns1 = eps.path("a1").display().to_string();
    let (code, result) = c.run("ADD", "a1", &ns1, "eth0");
    assert_eq!(code, 0, "{result}");
    assert_eq!(result["cniVersion"], "1.0.0");
    let ifaces = result["interfaces"].as_array().expect("interfaces");
    assert_eq!(ifaces.len(), 2, "host veth and eth0: {result}");
    assert_eq!(ifaces[1]["sandbox"], json!(ns1));
    let ip = &result["ips"][0];
    assert_eq!(ip["interface"], 1);
    assert_eq!(ip["gateway"], "10.210.0.1");
    let addr = ip["address"].as_str().expect("address").split('/').next().expect("ip").to_owned();
    assert_eq!(result["routes"][0], json!({ "dst": "0.0.0.0/0", "gw": "10.210.0.1" }));
    serve(&eps.path("a1"), "0.0.0.0:8080", "a1");
    assert!(call(&h.outside.path(), "192.0.2.1:18300").expect("published through CNI").starts_with("a1 "));
    assert!(call(&eps.path("a1"), "192.0.2.2:9000").expect("masqueraded").ends_with("192.0.2.1"));

    let (code, _) = p.run("CHECK", "a1", &ns1, "eth0");
    assert_eq!(code, 0);
    let (code, err) = c.run("ADD", "a1", &ns1, "eth0");
    assert_eq!((code, err["code"].as_u64()), (1, Some(100)), "the same attachment twice: {err}");

    // A second container, then GC naming only the first: the second goes.
    let ns2 = eps.path("a2").display().to_string();
    let (code, second) = p.run("ADD", "a2", &ns2, "eth0");
    assert_eq!(code, 0, "{second}");
    assert_ne!(second["ips"][0]["address"], result["ips"][0]["address"]);
    let mut gc = plain.clone();
    gc["cni.dev/valid-attachments"] = json!([{ "containerID": "a1", "ifname": "eth0" }]);
    let (code, out) = Call { host: &h.host, conf: &gc }.run("GC", "", "", "");
    assert_eq!(code, 0, "{out}");
    let (code, err) = p.run("CHECK", "a2", &ns2, "eth0");
    assert_eq!(code, 1, "a2 was collected: {err}");
    assert_eq!(eps.link_count("a2"), 1, "a2's interface went with it");
    let (code, _) = p.run("CHECK", "a1", &ns1, "eth0");
    assert_eq!(code, 0, "a1 is valid and stays");

    // DEL twice, and DEL after the namespace is gone: success each time.
    let (code, _) = c.run("DEL", "a1", &ns1, "eth0");
    assert_eq!(code, 0);
    let (code, _) = c.run("DEL", "a1", &ns1, "eth0");
    assert_eq!(code, 0);
    let (code, _) = p.run("DEL", "a2", "/var/run/netns/keelson-gone", "eth0");
    assert_eq!(code, 0);
    assert_eq!(p.run("STATUS", "", "", "").0, 0);
    assert!(!addr.is_empty());

    // The runtime deletes the network's last user; the test removes the network through the library.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    rt.block_on(async {
        use keelson_netplumb::NetworkDriver;
        let d = keelson_netplumb::BridgeNetwork::open(h.config()).expect("open");
        d.delete_network("cninet").await.expect("delete");
    });
    assert_eq!(snapshot(&h.host), before);
}

#[test]
fn bad_calls_are_cni_errors_with_the_spec_codes() {
    let h = HostWithOutside::new();
    let eps = Endpoints::default();
    let ns = eps.path("b1").display().to_string();
    let good = conf(&h, "badnet", "10.211.0.0/24");
    let cases: Vec<(Value, &str, u64)> = vec![
        (json!({ "cniVersion": "9.9.9", "name": "badnet", "type": "keelson-cni" }), "ADD", 1),
        (json!("not a config"), "ADD", 6),
        (conf(&h, "badnet", "10.211.0.7/24"), "ADD", 7),
        (good.clone(), "FROB", 4),
    ];
    for (conf, command, code) in cases {
        let (exit, err) = Call { host: &h.host, conf: &conf }.run(command, "b1", &ns, "eth0");
        assert_eq!((exit, err["code"].as_u64()), (1, Some(code)), "{command} with {conf}: {err}");
        assert!(err["msg"].as_str().is_some_and(|m| !m.is_empty()), "{err}");
    }
    // A missing namespace names it; an interface name too long is invalid configuration.
    let (exit, err) = Call { host: &h.host, conf: &good }.run("ADD", "b1", "/var/run/netns/keelson-missing", "eth0");
    assert_eq!((exit, err["code"].as_u64()), (1, Some(4)), "{err}");
    assert!(err["msg"].as_str().expect("msg").contains("keelson-missing"), "{err}");
    let (exit, err) = Call { host: &h.host, conf: &good }.run("ADD", "b1", &ns, "a-name-too-long-for-linux");
    assert_eq!((exit, err["code"].as_u64()), (1, Some(7)), "{err}");
    // Another subnet for an existing network is refused, not silently used.
    let (exit, _) = Call { host: &h.host, conf: &good }.run("ADD", "b1", &ns, "eth0");
    assert_eq!(exit, 0);
    let (exit, err) = Call { host: &h.host, conf: &conf(&h, "badnet", "10.212.0.0/24") }.run("ADD", "b2", &ns, "eth1");
    assert_eq!((exit, err["code"].as_u64()), (1, Some(7)), "{err}");
    let (exit, _) = Call { host: &h.host, conf: &good }.run("DEL", "b1", &ns, "eth0");
    assert_eq!(exit, 0);
}
