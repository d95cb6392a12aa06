//! The bridge driver against the real kernel: each test makes a namespace that plays the
//! host (so the root namespace, dockerd's and parallel tests' changes stay out of the
//! before/after snapshots), an "outside world" namespace behind it, and a namespace per
//! endpoint. Root is required; these run in `scripts/test`.

#![cfg(feature = "netlink")]

mod support;

use keelson_netplumb::conformance::{self, Fixture};
use keelson_netplumb::{AttachmentKey, BridgeNetwork, EndpointSpec, Error, Ipam, NetworkDriver, NetworkSpec, PortMapping};
use support::{call, serve, snapshot, Endpoints, HostWithOutside};

#[tokio::test]
async fn bridge_passes_conformance() {
    let h = HostWithOutside::new();
    let eps = Endpoints::default();
    let d = BridgeNetwork::open(h.config()).expect("open");
    let network = |name: &str, n: u8| NetworkSpec::new(name).with_subnet(format!("10.200.{n}.0/24"));
    let endpoint = |net: &str, id: &str| EndpointSpec::new(net, id).in_netns(eps.path(&id.replace(' ', "_")));
    let before = snapshot(&h.host);
    conformance::network_all(&d, &Fixture { network: &network, endpoint: &endpoint }).await;
    assert_eq!(snapshot(&h.host), before, "the conformance run left something in the host namespace");
}

#[tokio::test]
async fn endpoints_reach_each_other_the_outside_through_nat_and_published_ports() {
    let h = HostWithOutside::new();
    let eps = Endpoints::default();
    let d = BridgeNetwork::open(h.config()).expect("open");
    let before = snapshot(&h.host);
    d.create_network(NetworkSpec::new("apps").with_subnet("10.201.0.0/24").with_masquerade()).await.expect("create");
    let c1 = d.attach(EndpointSpec::new("apps", "c1").in_netns(eps.path("c1"))).await.expect("attach c1");
    let c2 =
        d.attach(EndpointSpec::new("apps", "c2").in_netns(eps.path("c2")).publish(PortMapping::tcp(18080, 8080))).await.expect("attach c2");
    let (ip1, ip2) = (c1.ipv4().expect("c1 v4"), c2.ipv4().expect("c2 v4"));
    assert_eq!(c2.routes[0].gw, Some("10.201.0.1".parse().expect("ip")), "default route via the bridge");
    assert_eq!(c2.interfaces.last().and_then(|i| i.sandbox.clone()), Some(eps.path("c2")));
    serve(&eps.path("c2"), "0.0.0.0:8080", "c2");
    // nft reads back what was programmed over netlink: one element per published port.
    let table = h.host.exec("nft", &["list", "table", "ip", "keelson-apps"]).expect("nft list");
    assert!(table.contains(&format!("18080 : {ip2}")), "{table}");
    assert!(table.contains("18080 : 8080") && table.contains("masquerade") && table.contains("dnat"), "{table}");

    // Container to container on one bridge: the peer sees the real source.
    assert_eq!(call(&eps.path("c1"), &format!("{ip2}:8080")).expect("c1 -> c2"), format!("c2 {ip1}"));
    // To the outside world: masqueraded to the host's address.
    assert_eq!(call(&eps.path("c1"), "192.0.2.2:9000").expect("c1 -> outside"), "outside 192.0.2.1");
    // From the outside world to the published port.
    assert_eq!(call(&h.outside.path(), "192.0.2.1:18080").expect("outside -> published").split(' ').next(), Some("c2"));
    // From the host itself, on localhost and on its own address.
    assert!(call(&h.host.path(), "127.0.0.1:18080").expect("localhost -> published").starts_with("c2 "));
    assert!(call(&h.host.path(), "192.0.2.1:18080").expect("host -> published").starts_with("c2 "));
    // Hairpin: a neighbour and the endpoint itself through the published port.
    assert!(call(&eps.path("c1"), "192.0.2.1:18080").expect("c1 -> published").starts_with("c2 "));
    assert!(call(&eps.path("c2"), "192.0.2.1:18080").expect("c2 -> own published port").starts_with("c2 "));

    // Another network is isolated from this one.
    d.create_network(NetworkSpec::new("other").with_subnet("10.202.0.0/24")).await.expect("create other");
    let c3 = d.attach(EndpointSpec::new("other", "c3").in_netns(eps.path("c3"))).await.expect("attach c3");
    assert!(call(&eps.path("c3"), &format!("{ip2}:8080")).is_err(), "other network reached apps");

    // Detach withdraws the published port at once.
    d.detach(&c2.key()).await.expect("detach c2");
    assert!(call(&h.outside.path(), "192.0.2.1:18080").is_err(), "port still published after detach");
    for key in [c1.key(), c3.key()] {
        d.detach(&key).await.expect("detach");
    }
    d.delete_network("apps").await.expect("delete");
    d.delete_network("other").await.expect("delete other");
    assert!(d.gc(&[]).await.expect("gc").removed.is_empty());
    eps.delete("c1");
    eps.delete("c3");
    assert_eq!(snapshot(&h.host), before, "links, addresses, routes, neighbours, fdb or rules left behind");
}

#[tokio::test]
async fn bad_input_is_a_typed_error_and_creates_nothing() {
    let h = HostWithOutside::new();
    let eps = Endpoints::default();
    let d = BridgeNetwork::open(h.config()).expect("open");
    let before = snapshot(&h.host);
    d.create_network(NetworkSpec::new("a").with_subnet("10.203.0.0/16")).await.expect("create");
    match d.create_network(NetworkSpec::new("b").with_subnet("10.203.4.0/24")).await {
        Err(Error::Conflict { kind: "subnet", name, .. }) => assert_eq!(name, "10.203.4.0/24"),
        other => panic!("overlapping subnet: {other:?}"),
    }
    for bad in ["10.0.0.0/33", "10.0.0.1/24", "banana", "fd00::/64"] {
        assert!(
            matches!(d.create_network(NetworkSpec::new("b").with_subnet(bad)).await, Err(Error::InvalidInput { field: "subnet", .. })),
            "{bad}"
        );
    }
    let mut huge_mtu = NetworkSpec::new("b").with_subnet("10.204.0.0/24");
    huge_mtu.mtu = Some(70_000);
    assert!(matches!(d.create_network(huge_mtu).await, Err(Error::InvalidInput { field: "mtu", .. })));
    assert_eq!(d.list().await.expect("list").len(), 1, "no network half-created");

    // A missing namespace.
    let missing = EndpointSpec::new("a", "ghost").in_netns("/var/run/netns/keelson-no-such-namespace");
    assert!(matches!(d.attach(missing).await, Err(Error::NotFound { kind: "network namespace", .. })));
    // No namespace at all.
    assert!(matches!(d.attach(EndpointSpec::new("a", "nons")).await, Err(Error::InvalidInput { field: "endpoint netns", .. })));
    // A host port taken by another attachment.
    let p1 = d.attach(EndpointSpec::new("a", "p1").in_netns(eps.path("p1")).publish(PortMapping::tcp(18081, 80))).await.expect("p1");
    let taken = EndpointSpec::new("a", "p2").in_netns(eps.path("p2")).publish(PortMapping::tcp(18081, 81));
    assert!(matches!(d.attach(taken).await, Err(Error::Conflict { kind: "host port", .. })));
    // An exhausted pool: a /29 has five endpoint addresses.
    d.create_network(NetworkSpec::new("tiny").with_subnet("10.205.0.0/29")).await.expect("tiny");
    let mut tiny = Vec::new();
    for i in 0..5 {
        let id = format!("t{i}");
        tiny.push(d.attach(EndpointSpec::new("tiny", &id).in_netns(eps.path(&id))).await.expect("tiny attach"));
    }
    match d.attach(EndpointSpec::new("tiny", "t5").in_netns(eps.path("t5"))).await {
        Err(Error::PoolExhausted { network, .. }) => assert_eq!(network, "tiny"),
        other => panic!("exhausted pool: {other:?}"),
    }
    assert_eq!(eps.link_count("t5"), 1, "only lo in the refused endpoint's namespace");
    for a in tiny.iter().chain([&p1]) {
        d.detach(&a.key()).await.expect("detach");
    }
    d.delete_network("tiny").await.expect("delete");
    d.delete_network("a").await.expect("delete");
    assert_eq!(snapshot(&h.host), before);
}

#[tokio::test]
async fn gc_reclaims_attachments_whose_namespaces_were_deleted() {
    let h = HostWithOutside::new();
    let eps = Endpoints::default();
    let d = BridgeNetwork::open(h.config()).expect("open");
    let before = snapshot(&h.host);
    d.create_network(NetworkSpec::new("g").with_subnet("10.206.0.0/24").with_masquerade()).await.expect("create");
    let mut keys = Vec::new();
    for i in 0..5u16 {
        let id = format!("g{i}");
        let a =
            d.attach(EndpointSpec::new("g", &id).in_netns(eps.path(&id)).publish(PortMapping::tcp(18100 + i, 80))).await.expect("attach");
        keys.push(a.key());
    }
    // The runtime dies and its namespaces go, with no detach.
    for i in 0..5 {
        eps.delete(&format!("g{i}"));
    }
    let report = d.gc(&[]).await.expect("gc");
    assert_eq!(report.removed.len(), 5, "{report:?}");
    assert!(d.ipam().leases("g").await.expect("leases").is_empty(), "zero IPAM reservations left");
    // Detach after gc (a runtime retrying) is still fine.
    d.detach(&keys[0]).await.expect("detach after gc");
    d.detach(&AttachmentKey::new("g", "never", "eth0")).await.expect("detach of something never attached");
    d.delete_network("g").await.expect("delete");
    assert_eq!(snapshot(&h.host), before);
}

/// In the root namespace beside dockerd, whose FORWARD policy is drop: the network's
/// traffic is accepted in DOCKER-USER while it exists, and the rules go with it.
#[tokio::test]
async fn works_in_the_root_namespace_beside_dockerd() {
    let state = tempfile::tempdir().expect("tempdir");
    let eps = Endpoints::default();
    let config = keelson_netplumb::KernelConfig::in_dir(state.path());
    // Declared after the endpoints, so dropped before them: detach, then namespaces go.
    let _cleanup = support::CleanupGuard { config: config.clone() };
    let d = BridgeNetwork::open(config).expect("open");
    let net = format!("root{}", std::process::id() % 100_000);
    d.create_network(NetworkSpec::new(&net).with_subnet("10.207.0.0/24").with_masquerade()).await.expect("create");
    let c1 = d.attach(EndpointSpec::new(&net, "r1").in_netns(eps.path("r1"))).await.expect("attach r1");
    let c2 =
        d.attach(EndpointSpec::new(&net, "r2").in_netns(eps.path("r2")).publish(PortMapping::tcp(18090, 8080))).await.expect("attach r2");
    serve(&eps.path("r2"), "0.0.0.0:8080", "r2");
    let ip2 = c2.ipv4().expect("v4");
    let docker_user = || std::process::Command::new("nft").args(["list", "chain", "ip", "filter", "DOCKER-USER"]).output().expect("nft");
    let dockerd = docker_user().status.success();
    if dockerd {
        let rules = String::from_utf8_lossy(&docker_user().stdout).into_owned();
        let ours = rules.lines().filter(|l| l.contains(&format!("comment \"keelson:{}\"", keelson_bridge(&net)))).count();
        assert_eq!(ours, 2, "an iifname and an oifname accept: {rules}");
    }
    assert_eq!(
        call(&eps.path("r1"), &format!("{ip2}:8080")).expect("r1 -> r2 across a drop-policy FORWARD"),
        format!("r2 {}", c1.ipv4().expect("v4"))
    );
    let root = std::path::PathBuf::from("/proc/self/ns/net");
    assert!(call(&root, "127.0.0.1:18090").expect("localhost -> published").starts_with("r2 "));
    for a in [&c1, &c2] {
        d.detach(&a.key()).await.expect("detach");
    }
    d.delete_network(&net).await.expect("delete");
    if dockerd {
        let rules = String::from_utf8_lossy(&docker_user().stdout).into_owned();
        assert!(!rules.contains(&keelson_bridge(&net)), "DOCKER-USER rules left: {rules}");
    }
    let links = std::process::Command::new("ip").args(["-o", "link", "show"]).output().expect("ip");
    assert!(!String::from_utf8_lossy(&links.stdout).contains(&keelson_bridge(&net)), "bridge left in the root namespace");
}

/// The bridge name netplumb derives from a network name (FNV-1a, as the driver does).
fn keelson_bridge(network: &str) -> String {
    let h = network.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("kpb{:08x}", h as u32)
}

/// The part a child process plays (see `keelson_testkit::child`): 50 attach/detach
/// operations on the churn network until it is killed, from the environment the parent
/// set.
async fn churn_as_child() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by the parent"));
    let seed: u64 = var("KEELSON_CHURN_SEED").parse().expect("seed");
    let eps: Vec<String> = var("KEELSON_CHURN_ENDPOINTS").split(',').map(str::to_owned).collect();
    let mut config = keelson_netplumb::KernelConfig::in_dir(var("KEELSON_CHURN_STATE"));
    config.host_netns = Some(var("KEELSON_CHURN_HOST").into());
    let d = BridgeNetwork::open(config).expect("open");
    let mut x = seed;
    for _ in 0..50 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let i = (x >> 33) as usize % eps.len();
        let id = format!("k{i}");
        let mut spec = EndpointSpec::new("churn", &id).in_netns(&eps[i]);
        if i.is_multiple_of(3) {
            spec = spec.publish(PortMapping::tcp(18200 + i as u16, 80));
        }
        match d.attach(spec).await {
            Ok(_) => {}
            Err(Error::Conflict { .. }) => d.detach(&AttachmentKey::new("churn", &id, "eth0")).await.expect("detach"),
            Err(e) => panic!("attach: {e}"),
        }
    }
}

#[tokio::test]
async fn twenty_kill_9s_during_a_thousand_attaches_and_detaches_leak_nothing_after_gc() {
    if keelson_testkit::child::role().is_some() {
        return churn_as_child().await;
    }
    let h = HostWithOutside::new();
    let eps = Endpoints::default();
    let d = BridgeNetwork::open(h.config()).expect("open");
    let before = snapshot(&h.host);
    d.create_network(NetworkSpec::new("churn").with_subnet("10.208.0.0/24").with_masquerade()).await.expect("create");
    let paths: Vec<String> = (0..10).map(|i| eps.path(&format!("k{i}")).display().to_string()).collect();
    let mut killed = 0;
    for round in 0..20u64 {
        let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
            .args(["--exact", "twenty_kill_9s_during_a_thousand_attaches_and_detaches_leak_nothing_after_gc", "--test-threads", "1", "-q"])
            .env(keelson_testkit::child::ROLE_VAR, "churner")
            .env("KEELSON_CHURN_STATE", h.state.path())
            .env("KEELSON_CHURN_HOST", h.host.path())
            .env("KEELSON_CHURN_ENDPOINTS", paths.join(","))
            .env("KEELSON_CHURN_SEED", round.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        // A point that moves from round to round, inside the child's 50 operations.
        std::thread::sleep(std::time::Duration::from_millis(20 + (round * 53) % 150));
        if child.try_wait().expect("try_wait").is_none() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL);
            killed += 1;
        }
        let status = child.wait().expect("wait");
        assert!(status.success() || status.code().is_none(), "the child failed on its own: {status}");
        let leases = d.ipam().leases("churn").await.expect("leases");
        let distinct: std::collections::HashSet<_> = leases.iter().map(|l| l.address).collect();
        assert_eq!(distinct.len(), leases.len(), "an address was handed out twice");
    }
    assert!(killed >= 10, "most children were killed mid-run ({killed} of 20): the kill points need moving");
    let report = d.gc(&[]).await.expect("gc");
    assert!(d.ipam().leases("churn").await.expect("leases").is_empty(), "zero IPAM reservations after gc: {report:?}");
    for i in 0..10 {
        assert_eq!(eps.link_count(&format!("k{i}")), 1, "endpoint k{i} still has a link");
    }
    let table = h.host.exec("nft", &["list", "table", "ip", "keelson-churn"]).expect("nft");
    assert!(!table.contains("elements"), "published ports left: {table}");
    d.delete_network("churn").await.expect("delete");
    assert_eq!(snapshot(&h.host), before);
}

/// Concurrent detaches are deleted in batches (one group delete): every one reports
/// success, and nothing is left.
#[tokio::test]
async fn concurrent_detaches_all_complete_and_leave_nothing() {
    let h = HostWithOutside::new();
    let eps = Endpoints::default();
    let d = BridgeNetwork::open(h.config()).expect("open");
    let before = snapshot(&h.host);
    d.create_network(NetworkSpec::new("many").with_subnet("10.209.0.0/24")).await.expect("create");
    let mut keys = Vec::new();
    for i in 0..12 {
        let id = format!("m{i}");
        keys.push(d.attach(EndpointSpec::new("many", &id).in_netns(eps.path(&id))).await.expect("attach").key());
    }
    let results = futures::future::join_all(keys.iter().map(|k| d.detach(k))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    for i in 0..12 {
        assert_eq!(eps.link_count(&format!("m{i}")), 1, "m{i} still has its interface");
    }
    assert!(d.ipam().leases("many").await.expect("leases").is_empty());
    d.delete_network("many").await.expect("delete");
    assert_eq!(snapshot(&h.host), before);
}
