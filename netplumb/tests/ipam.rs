//! IPAM never hands out an address twice: not to concurrent processes sharing one
//! journal, not across `kill -9` of any of them, not across hosts sharing a `KeyValue`.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use keelson_netplumb::{AttachmentKey, Error, Ipam, LeaseRequest, LocalIpam, Pool, PortMapping};

fn request(net: &str, id: &str) -> LeaseRequest {
    LeaseRequest::new(AttachmentKey::new(net, id, "eth0"))
}

#[tokio::test]
async fn local_ipam_leases_releases_and_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let ipam = LocalIpam::open(dir.path()).unwrap();
    let pool = Pool::parse("10.30.0.0/29").unwrap();
    let a = ipam.allocate(&pool, request("n", "a")).await.unwrap();
    assert_eq!(a.address, Ipv4Addr::new(10, 30, 0, 2));
    assert!(matches!(ipam.allocate(&pool, request("n", "a")).await, Err(Error::Conflict { kind: "attachment", .. })));
    for id in ["b", "c", "d", "e"] {
        ipam.allocate(&pool, request("n", id)).await.unwrap();
    }
    match ipam.allocate(&pool, request("n", "f")).await {
        Err(Error::PoolExhausted { network, subnet }) => assert_eq!((network.as_str(), subnet.as_str()), ("n", "10.30.0.0/29")),
        other => panic!("expected an exhausted pool, got {other:?}"),
    }
    assert_eq!(ipam.release("n", &a.key).await.unwrap(), Some(a.clone()));
    assert_eq!(ipam.release("n", &a.key).await.unwrap(), None, "releasing twice is fine");
    let again = ipam.allocate(&pool, request("n", "f")).await.unwrap();
    assert_eq!(again.address, a.address, "the only free address");
    // A second handle (as another process would have) reads the same leases.
    let other = LocalIpam::open(dir.path()).unwrap();
    assert_eq!(other.leases("n").await.unwrap().len(), 5);
    assert!(matches!(other.forget_network("n").await, Err(Error::Conflict { .. })), "leases still held");
}

/// A released address asked for again comes back, though the usual order would give the
/// next one; one held by another, or outside the pool, is a hint ignored.
async fn a_preferred_address_is_given_when_free(ipam: &dyn Ipam) {
    let pool = Pool::parse("10.33.0.0/24").unwrap();
    let a = ipam.allocate(&pool, request("p", "a")).await.unwrap();
    let b = ipam.allocate(&pool, request("p", "b")).await.unwrap();
    ipam.release("p", &a.key).await.unwrap();
    let back = ipam.allocate(&pool, request("p", "a2").preferring(Some(a.address))).await.unwrap();
    assert_eq!(back.address, a.address, "the address it had");
    let held = ipam.allocate(&pool, request("p", "c").preferring(Some(b.address))).await.unwrap();
    assert!(held.address != b.address && held.address != a.address, "held by another: the next free one, {held:?}");
    let outside = ipam.allocate(&pool, request("p", "d").preferring(Some(Ipv4Addr::new(10, 34, 0, 9)))).await.unwrap();
    assert!(pool.subnet.contains(&outside.address), "outside the pool: ignored, {outside:?}");
    let gateway = ipam.allocate(&pool, request("p", "e").preferring(Some(pool.gateway))).await.unwrap();
    assert_ne!(gateway.address, pool.gateway, "never the gateway");
    assert_distinct(&ipam.leases("p").await.unwrap());
}

#[tokio::test]
async fn local_ipam_gives_a_preferred_address_when_free() {
    let dir = tempfile::tempdir().unwrap();
    a_preferred_address_is_given_when_free(&LocalIpam::open(dir.path()).unwrap()).await;
}

#[tokio::test]
async fn local_ipam_refuses_a_published_port_twice_across_networks() {
    let dir = tempfile::tempdir().unwrap();
    let ipam = LocalIpam::open(dir.path()).unwrap();
    let pool = Pool::parse("10.31.0.0/24").unwrap();
    let mut r = request("n1", "a");
    r.ports.push(PortMapping::tcp(8080, 80));
    ipam.allocate(&pool, r).await.unwrap();
    let mut r = request("n2", "b");
    r.ports.push(PortMapping::tcp(8080, 8080));
    match ipam.allocate(&Pool::parse("10.32.0.0/24").unwrap(), r).await {
        Err(Error::Conflict { kind: "host port", name, .. }) => assert_eq!(name, "8080/tcp"),
        other => panic!("expected a port conflict, got {other:?}"),
    }
    assert!(ipam.leases("n2").await.unwrap().is_empty());
}

#[tokio::test]
async fn local_ipam_drops_leases_of_an_earlier_boot_and_torn_lines() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::parse("10.33.0.0/24").unwrap();
    {
        let ipam = LocalIpam::open(dir.path()).unwrap();
        ipam.allocate(&pool, request("n", "a")).await.unwrap();
    }
    // A torn line (power loss mid-write) is ignored and cut off.
    let journal = dir.path().join("n.journal");
    let mut bytes = std::fs::read(&journal).unwrap();
    bytes.extend_from_slice(br#"{"lease":{"key":{"netw"#);
    std::fs::write(&journal, &bytes).unwrap();
    let ipam = LocalIpam::open(dir.path()).unwrap();
    assert_eq!(ipam.leases("n").await.unwrap().len(), 1);
    let b = ipam.allocate(&pool, request("n", "b")).await.unwrap();
    assert_eq!(b.address, Ipv4Addr::new(10, 33, 0, 3));
    // Another boot: nothing of the last one is held.
    std::fs::write(dir.path().join("boot_id"), "an-earlier-boot").unwrap();
    let ipam = LocalIpam::open(dir.path()).unwrap();
    assert!(ipam.leases("n").await.unwrap().is_empty());
}

#[tokio::test]
async fn local_ipam_compacts_without_losing_leases() {
    let dir = tempfile::tempdir().unwrap();
    let ipam = LocalIpam::open(dir.path()).unwrap();
    let reader = LocalIpam::open(dir.path()).unwrap();
    let pool = Pool::parse("10.34.0.0/24").unwrap();
    let keep = ipam.allocate(&pool, request("n", "keep")).await.unwrap();
    assert_eq!(reader.leases("n").await.unwrap(), vec![keep.clone()], "the reader has a cursor now");
    for i in 0..400 {
        let l = ipam.allocate(&pool, request("n", &format!("t{i}"))).await.unwrap();
        ipam.release("n", &l.key).await.unwrap();
    }
    let lines = std::fs::read_to_string(dir.path().join("n.journal")).unwrap().lines().count();
    assert!(lines < 300, "compacted: {lines} lines");
    assert_eq!(reader.leases("n").await.unwrap(), vec![keep], "a reader notices the new file");
    // The round robin carries on after the last address handed out, not from the start.
    let next = ipam.allocate(&pool, request("n", "next")).await.unwrap();
    assert_ne!(next.address, Ipv4Addr::new(10, 34, 0, 3));
}

/// The part a child process plays (see `keelson_testkit::child`): allocate 200 leases,
/// releasing every third, in the journal directory `dir`.
async fn allocate_as_child(dir: &str) {
    let me = std::process::id();
    let ipam = LocalIpam::open(dir).unwrap();
    let pool = Pool::parse("10.40.0.0/16").unwrap();
    for i in 0..200 {
        let lease = ipam.allocate(&pool, request("shared", &format!("p{me}-{i}"))).await.unwrap();
        if i % 3 == 0 {
            ipam.release("shared", &lease.key).await.unwrap();
        }
    }
}

const CHILD_DIR: &str = "KEELSON_IPAM_CHILD_DIR";

/// When this process is a child (a role is set), plays it and returns true.
async fn played_child() -> bool {
    match (keelson_testkit::child::role(), std::env::var(CHILD_DIR)) {
        (Some(_), Ok(dir)) => {
            allocate_as_child(&dir).await;
            true
        }
        _ => false,
    }
}

/// Runs `test` of this binary again as an allocating child on `dir`.
fn spawn_child(test: &str, dir: &std::path::Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--test-threads", "1", "-q"])
        .env(keelson_testkit::child::ROLE_VAR, "allocator")
        .env(CHILD_DIR, dir)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn assert_distinct(leases: &[keelson_netplumb::Lease]) {
    let addrs: HashSet<_> = leases.iter().map(|l| l.address).collect();
    assert_eq!(addrs.len(), leases.len(), "an address was handed out twice");
    let keys: HashSet<_> = leases.iter().map(|l| &l.key).collect();
    assert_eq!(keys.len(), leases.len(), "a key holds two leases");
}

#[tokio::test]
async fn concurrent_processes_never_share_an_address() {
    if played_child().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..4).map(|_| spawn_child("concurrent_processes_never_share_an_address", dir.path())).collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let leases = LocalIpam::open(dir.path()).unwrap().leases("shared").await.unwrap();
    assert_eq!(leases.len(), 4 * (200 - 67), "every process kept two thirds of its leases");
    assert_distinct(&leases);
}

#[tokio::test]
async fn kill_9_at_random_points_never_shares_an_address() {
    if played_child().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let me = "kill_9_at_random_points_never_shares_an_address";
    for round in 0..10u64 {
        let mut a = spawn_child(me, dir.path());
        let mut b = spawn_child(me, dir.path());
        // Kill one mid-run at a point that moves from round to round.
        std::thread::sleep(Duration::from_millis(5 + (round * 37) % 60));
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(a.id() as i32), nix::sys::signal::Signal::SIGKILL);
        let _ = a.wait();
        assert!(b.wait().unwrap().success());
        let leases = LocalIpam::open(dir.path()).unwrap().leases("shared").await.unwrap();
        assert_distinct(&leases);
    }
}

#[cfg(feature = "cluster")]
mod cluster {
    use super::*;
    use keelson_discovery::MemoryKv;
    use keelson_netplumb::KvIpam;
    use std::sync::Arc;

    #[tokio::test]
    async fn kv_ipam_gives_a_preferred_address_when_free() {
        let kv: Arc<dyn keelson_discovery::KeyValue> = Arc::new(MemoryKv::new());
        a_preferred_address_is_given_when_free(&KvIpam::new(kv, "keelson/netplumb/ipam")).await;
    }

    #[tokio::test]
    async fn kv_ipam_hosts_racing_never_share_an_address() {
        let kv: Arc<dyn keelson_discovery::KeyValue> = Arc::new(MemoryKv::new());
        let pool = Pool::parse("10.50.0.0/24").unwrap();
        let tasks: Vec<_> = (0..4)
            .map(|h| {
                let ipam = KvIpam::new(kv.clone(), "keelson/netplumb/ipam");
                tokio::spawn(async move {
                    for i in 0..40 {
                        ipam.allocate(&pool, request("wide", &format!("h{h}-{i}"))).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let ipam = KvIpam::new(kv, "keelson/netplumb/ipam");
        let leases = ipam.leases("wide").await.unwrap();
        assert_eq!(leases.len(), 160);
        assert_distinct(&leases);
        let first = &leases[0];
        assert_eq!(ipam.release("wide", &first.key).await.unwrap().as_ref(), Some(first));
        assert_eq!(ipam.release("wide", &first.key).await.unwrap(), None);
        for i in 0..(253 - 159) {
            ipam.allocate(&pool, request("wide", &format!("fill{i}"))).await.unwrap();
        }
        assert!(matches!(ipam.allocate(&pool, request("wide", "over")).await, Err(Error::PoolExhausted { .. })));
    }
}
