//! The VXLAN overlay across host namespaces on one underlay segment, with real etcd
//! holding the subnet leases.

#![cfg(feature = "overlay")]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_discovery::{EtcdConfig, EtcdKv, KeyValue};
use keelson_netplumb::{BridgeNetwork, EndpointSpec, KernelConfig, NetworkDriver, NetworkSpec, OverlayConfig, OverlayNetwork};
use keelson_testkit::netns::{Netns, Underlay};
use support::{call, serve, snapshot, Endpoints};

struct Host {
    driver: OverlayNetwork,
    _state: tempfile::TempDir,
}

async fn host(ns: &Netns, name: &str, addr: std::net::Ipv4Addr, kv: Arc<dyn KeyValue>, prefix: &str) -> Host {
    let state = tempfile::tempdir().expect("tempdir");
    let mut kc = KernelConfig::in_dir(state.path());
    kc.host_netns = Some(ns.path());
    let bridge = BridgeNetwork::open(kc).expect("bridge");
    let mut oc = OverlayConfig::new(kv, name, addr);
    oc.prefix = prefix.to_owned();
    oc.lease_ttl = Duration::from_secs(2);
    Host { driver: OverlayNetwork::new(bridge, oc).expect("overlay"), _state: state }
}

fn routes(ns: &Netns) -> String {
    ns.exec("ip", &["route", "show"]).expect("ip route")
}

#[tokio::test]
async fn containers_on_two_hosts_talk_over_vxlan_and_a_dead_host_is_forgotten() {
    let etcd = keelson_testkit::etcd::Etcd::start().expect("etcd");
    let kv: Arc<dyn KeyValue> = Arc::new(EtcdKv::connect(EtcdConfig::new([etcd.client_url()])).await.expect("etcd client"));
    let ul = Underlay::create(2, "172.31.9").expect("underlay");
    let eps = Endpoints::default();
    let before: Vec<String> = ul.hosts.iter().map(snapshot).collect();
    let prefix = format!("test/{}/overlay", std::process::id());
    let h1 = host(&ul.hosts[0], "host1", ul.addresses[0], kv.clone(), &prefix).await;
    let h2 = host(&ul.hosts[1], "host2", ul.addresses[1], kv.clone(), &prefix).await;
    let spec = NetworkSpec::new("ovl").with_subnet("10.244.0.0/16").with_masquerade();
    h1.driver.create_network(spec.clone()).await.expect("join host1");
    let joined = Instant::now();
    h2.driver.create_network(spec.clone()).await.expect("join host2");
    let (s1, s2) = (h1.driver.host_subnet("ovl").expect("s1"), h2.driver.host_subnet("ovl").expect("s2"));
    assert_ne!(s1, s2, "each host has its own subnet");
    // Host 1 learns host 2's subnet from the watch; host 2 learns host 1's from its
    // first listing (its follower runs after create_network returns).
    while !routes(&ul.hosts[0]).contains(&s2.to_string()) || !routes(&ul.hosts[1]).contains(&s1.to_string()) {
        assert!(
            joined.elapsed() < Duration::from_secs(5),
            "the hosts never programmed each other: {} / {}",
            routes(&ul.hosts[0]),
            routes(&ul.hosts[1])
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let c1 = h1.driver.attach(EndpointSpec::new("ovl", "c1").in_netns(eps.path("c1"))).await.expect("attach c1");
    let c2 = h2.driver.attach(EndpointSpec::new("ovl", "c2").in_netns(eps.path("c2"))).await.expect("attach c2");
    assert_eq!(c1.interfaces.last().and_then(|i| i.mtu), Some(1450), "MTU = underlay - 50");
    let (ip1, ip2) = (c1.ipv4().expect("v4"), c2.ipv4().expect("v4"));
    assert!(s1.contains(&ip1) && s2.contains(&ip2));
    serve(&eps.path("c2"), "0.0.0.0:8080", "c2");
    serve(&eps.path("c1"), "0.0.0.0:8080", "c1");
    // Across hosts, with the real source address (no masquerade inside the cluster).
    assert_eq!(call(&eps.path("c1"), &format!("{ip2}:8080")).expect("c1 -> c2 over vxlan"), format!("c2 {ip1}"));
    assert_eq!(call(&eps.path("c2"), &format!("{ip1}:8080")).expect("c2 -> c1 over vxlan"), format!("c1 {ip2}"));

    // The VXLAN port drops what does not come from a peer host, and counts it.
    let intruder = ul.switch();
    intruder.exec("bash", &["-c", &format!("echo x > /dev/udp/{}/4789", ul.addresses[0])]).expect("send from the intruder");
    let table = ul.hosts[0].exec("nft", &["list", "table", "ip", "keelson-ovl-ovl"]).expect("nft");
    assert!(table.contains(&ul.addresses[1].to_string()), "host2 is an accepted peer: {table}");
    let dropped: u64 = table
        .split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a counter on the drop rule");
    assert!(dropped >= 1, "the intruder's datagram was dropped and counted: {table}");

    // Host 2 dies without leaving: its lease (TTL 2 s) expires in etcd and host 1
    // removes its entries.
    h2.driver.detach(&c2.key()).await.expect("detach c2");
    h2.driver.stop_following("ovl");
    let died = Instant::now();
    let fdb = || ul.hosts[0].exec("bridge", &["fdb", "show"]).expect("fdb");
    let neigh = || ul.hosts[0].exec("ip", &["neigh", "show"]).expect("neigh");
    let peers = || ul.hosts[0].exec("nft", &["list", "set", "ip", "keelson-ovl-ovl", "peers"]).expect("nft");
    let h2_addr = ul.addresses[1].to_string();
    // Route, FDB entry, neighbour and the VXLAN port's accept element all go (in that
    // order, the last a moment after the first).
    while routes(&ul.hosts[0]).contains(&s2.to_string())
        || fdb().contains(&h2_addr)
        || neigh().contains(&s2.network().to_string())
        || peers().contains(&h2_addr)
    {
        assert!(
            died.elapsed() < Duration::from_secs(8),
            "host2's route, fdb or neighbour entry, or its VXLAN accept, stayed: {} {} {} {}",
            routes(&ul.hosts[0]),
            fdb(),
            neigh(),
            peers()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(died.elapsed() >= Duration::from_millis(1500), "removed before the lease could expire: {:?}", died.elapsed());

    h1.driver.detach(&c1.key()).await.expect("detach c1");
    h1.driver.delete_network("ovl").await.expect("leave on host1");
    let left = kv.list(&format!("{prefix}/ovl/hosts/")).await.expect("list").entries;
    assert!(left.iter().all(|e| e.key != format!("{prefix}/ovl/hosts/{}-{}", s1.network(), s1.prefix_len())), "host1's subnet went back");
    eps.delete("c1");
    assert_eq!(snapshot(&ul.hosts[0]), before[0], "host1 left something behind");
}

/// A host whose lease expired while it could not renew (a partition) takes its subnet
/// back, and its peers program it again.
#[tokio::test]
async fn a_host_whose_lease_expired_takes_its_subnet_back() {
    let etcd = keelson_testkit::etcd::Etcd::start().expect("etcd");
    let kv: Arc<dyn KeyValue> = Arc::new(EtcdKv::connect(EtcdConfig::new([etcd.client_url()])).await.expect("etcd client"));
    let ul = Underlay::create(2, "172.31.10").expect("underlay");
    let prefix = format!("test/{}/again", std::process::id());
    let h1 = host(&ul.hosts[0], "host1", ul.addresses[0], kv.clone(), &prefix).await;
    let h2 = host(&ul.hosts[1], "host2", ul.addresses[1], kv.clone(), &prefix).await;
    let spec = NetworkSpec::new("ovl").with_subnet("10.245.0.0/16");
    h1.driver.create_network(spec.clone()).await.expect("join host1");
    h2.driver.create_network(spec).await.expect("join host2");
    let s2 = h2.driver.host_subnet("ovl").expect("s2");
    let key = format!("{prefix}/ovl/hosts/{}-{}", s2.network(), s2.prefix_len());
    let lease = kv.get(&key).await.expect("get").expect("host2's key").lease.expect("leased");
    kv.revoke_lease(lease).await.expect("the lease is lost (as after a partition longer than its TTL)");
    let lost = Instant::now();
    loop {
        let back = kv.get(&key).await.expect("get").is_some_and(|e| e.lease.is_some_and(|l| l != lease));
        if back && routes(&ul.hosts[0]).contains(&s2.to_string()) {
            break;
        }
        assert!(lost.elapsed() < Duration::from_secs(5), "host2 never took its subnet back: {}", routes(&ul.hosts[0]));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for d in [&h1.driver, &h2.driver] {
        d.delete_network("ovl").await.expect("leave");
    }
}
