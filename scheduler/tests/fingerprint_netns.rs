//! The advertised address comes from the default route's interface, read in the
//! calling thread's network namespace: checked inside test hosts' namespaces (one with a
//! default route over a veth, one without), never against this machine's own routes.

use std::net::IpAddr;

use keelson_scheduler::default_route_address;

/// Runs `f` on a thread that has entered the namespace at `path`.
fn inside<T: Send + 'static>(path: std::path::PathBuf, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns (needs root)");
        f()
    })
    .join()
    .expect("the thread in the namespace")
}

#[test]
fn the_address_of_the_default_routes_interface_is_advertised() {
    let pid = std::process::id();
    let host = keelson_testkit::netns::Netns::create("fp-host").expect("namespace");
    let (host_if, ns_if) = (format!("fph{}", pid % 100_000), format!("fpn{}", pid % 100_000));
    host.add_veth(&host_if, "10.93.0.1/24", &ns_if, "10.93.0.2/24").expect("veth");
    host.exec("ip", &["route", "add", "default", "via", "10.93.0.1"]).expect("default route");
    let found = inside(host.path(), || default_route_address().expect("read"));
    assert_eq!(found, Some("10.93.0.2".parse::<IpAddr>().expect("ip")));

    // No default route: nothing to advertise (the agent then asks for --address).
    let bare = keelson_testkit::netns::Netns::create("fp-bare").expect("namespace");
    bare.exec("ip", &["link", "set", "lo", "up"]).expect("lo");
    assert_eq!(inside(bare.path(), || default_route_address().expect("read")), None);
}
