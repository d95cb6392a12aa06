//! The Consul backend against testkit's fake Consul (Consul's documented samples, served
//! with real blocking-query semantics). With `KEELSON_TEST_CONSUL_ADDR` set, the
//! conformance suite also runs against that real agent.
#![cfg(feature = "consul")]

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keelson_discovery::{
    conformance, consul_next_index, ConsulConfig, ConsulDiscovery, ConsulKv, Discovery, Error, Health, KeyValue, Query, Registration,
    ServiceName,
};
use keelson_testkit::consul::FakeConsul;

fn fixture() -> std::path::PathBuf {
    keelson_testkit::consul::fixture("health_service.json")
}

fn client(url: String) -> ConsulDiscovery {
    let config = {
        let mut built = ConsulConfig::new(url);
        built.wait = Duration::from_secs(2);
        built.min_query_interval = Duration::from_millis(20);
        built
    };
    ConsulDiscovery::new(config).expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_passes_discovery_conformance_on_the_fake_agent() {
    let consul = FakeConsul::start(&fixture()).await.expect("fake consul");
    conformance::discovery_all(&client(consul.url())).await;
}

/// Needs a real Consul agent (none can be installed on keelson's test machines):
/// `KEELSON_TEST_CONSUL_ADDR=http://127.0.0.1:8500 cargo test -p keelson-discovery --all-features --test consul_backend -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Consul agent: set KEELSON_TEST_CONSUL_ADDR and run with --ignored"]
async fn consul_passes_discovery_conformance_on_a_real_agent() {
    let addr =
        std::env::var("KEELSON_TEST_CONSUL_ADDR").expect("set KEELSON_TEST_CONSUL_ADDR to the agent's URL, like http://127.0.0.1:8500");
    conformance::discovery_all(&client(addr)).await;
}

#[tokio::test]
async fn the_documented_sample_is_served_and_read_verbatim() {
    let consul = FakeConsul::start(&fixture()).await.expect("fake consul");
    let d = client(consul.url());
    let redis = d.instances(&Query::service(ServiceName::new("redis").expect("name"))).await.expect("lookup");
    assert_eq!(redis.len(), 1);
    assert_eq!(
        (redis[0].id.as_str(), redis[0].address.as_str(), redis[0].port, redis[0].health),
        ("redis", "10.1.10.12", 8000, Health::Passing)
    );
    assert!(d.services().await.expect("services").contains(&ServiceName::new("redis").expect("name")));
}

async fn next(w: &mut keelson_discovery::SnapshotStream) -> keelson_discovery::Snapshot {
    tokio::time::timeout(Duration::from_secs(5), w.next()).await.expect("snapshot in time").expect("open")
}

#[tokio::test]
async fn blocking_watch_follows_changes_and_survives_an_index_reset() {
    let consul = FakeConsul::start(&fixture()).await.expect("fake consul");
    let d = client(consul.url());
    let web = ServiceName::new("web").expect("name");
    let mut w = d.watch(Query::service(web.clone()).healthy()).await.expect("watch");
    let _ = next(&mut w).await;
    let _a = d.register(Registration::new(web.clone(), "a", "127.0.0.1", 1)).await.expect("register");
    assert_eq!(next(&mut w).await.instances.len(), 1, "blocking query woke on the change");
    // A restarted Consul: the index goes backwards. The watch must reset, not stall.
    consul.set_index(3);
    let _b = d.register(Registration::new(web.clone(), "b", "127.0.0.1", 2)).await.expect("register");
    let s = next(&mut w).await;
    assert_eq!(s.instances.len(), 2, "{s:?}");
    assert_eq!((consul_next_index(50, 3), consul_next_index(0, 0), consul_next_index(5, 9)), (0, 1, 9), "Consul's index rules");
}

#[tokio::test]
async fn health_set_through_the_client_sticks_across_keepalives() {
    let consul = FakeConsul::start(&fixture()).await.expect("fake consul");
    let d = client(consul.url());
    let svc = ServiceName::new("sticky").expect("name");
    let _h = d.register(Registration::new(svc.clone(), "s1", "127.0.0.1", 1).with_ttl(Duration::from_secs(1))).await.expect("register");
    d.set_health(&svc, "s1", Health::Warning).await.expect("health");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let now = d.instances(&Query::service(svc)).await.expect("lookup");
    assert_eq!(now[0].health, Health::Warning, "the keep-alive sends the desired status, not 'passing'");
}

#[tokio::test]
async fn unreachable_agent_is_unavailable_and_bad_config_is_rejected() {
    let port = keelson_testkit::free_port().expect("port");
    let mut config = ConsulConfig::new(format!("http://127.0.0.1:{port}"));
    config.request_timeout = Duration::from_millis(300);
    config.token = Some("secret-token".into());
    assert!(!format!("{config:?}").contains("secret-token"), "token redacted");
    let d = ConsulDiscovery::new(config).expect("client");
    let t0 = std::time::Instant::now();
    let r = d.instances(&Query::service(ServiceName::new("x").expect("name"))).await;
    assert!(matches!(r, Err(Error::Unavailable { .. })), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(matches!(ConsulDiscovery::new(ConsulConfig::new("localhost:8500")), Err(Error::InvalidInput { .. })));
    let _ = Arc::new(d);
}

fn kv_client(url: String) -> ConsulKv {
    let config = {
        let mut built = ConsulConfig::new(url);
        built.wait = Duration::from_secs(2);
        built.min_query_interval = Duration::from_millis(20);
        built
    };
    ConsulKv::new(config).expect("kv client")
}

/// Sessions live 10 s at least on Consul, so the lease scenarios take a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_kv_passes_kv_conformance_on_the_fake_agent() {
    let consul = FakeConsul::start(&fixture()).await.expect("fake consul");
    conformance::kv_all_shared(std::sync::Arc::new(kv_client(consul.url()))).await;
}

#[tokio::test]
async fn consul_kv_values_are_bytes_and_sessions_follow_consul_limits() {
    let consul = FakeConsul::start(&fixture()).await.expect("fake consul");
    let kv = kv_client(consul.url());
    let bytes: Vec<u8> = (0..=255u8).collect();
    kv.put("bin/k", bytes.clone(), None).await.expect("put");
    assert_eq!(kv.get("bin/k").await.expect("get").expect("present").value, bytes);
    assert!(
        matches!(kv.grant_lease(Duration::from_secs(2)).await, Err(Error::InvalidInput { field: "lease ttl", .. })),
        "Consul's 10 s minimum"
    );
    assert!(!kv.capabilities().watch_from_revision, "no history on Consul");
}

#[tokio::test]
async fn tls_to_the_agent_trusts_exactly_the_configured_ca() {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("test certificate");
    let (cert_pem, key_pem) = (key.cert.pem(), key.signing_key.serialize_pem());
    let consul = FakeConsul::start_tls(&fixture(), &cert_pem, &key_pem).await.expect("fake consul over TLS");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert_pem).expect("write CA");
    let config = {
        let mut built = ConsulConfig::new(consul.url());
        built.ca_file = Some(ca);
        built
    };
    assert!(consul.url().starts_with("https://"));
    let d = ConsulDiscovery::new(config).expect("client");
    let redis = d.instances(&Query::service(ServiceName::new("redis").expect("name"))).await.expect("lookup over TLS");
    assert_eq!(redis.len(), 1);

    // Another CA: the handshake fails, as Unavailable, not as a panic or a silent success.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("other certificate");
    let wrong = dir.path().join("wrong.pem");
    std::fs::write(&wrong, other.cert.pem()).expect("write");
    let mut config = {
        let mut built = ConsulConfig::new(consul.url());
        built.ca_file = Some(wrong);
        built
    };
    config.request_timeout = Duration::from_secs(2);
    let d = ConsulDiscovery::new(config).expect("client");
    assert!(matches!(d.instances(&Query::service(ServiceName::new("redis").expect("name"))).await, Err(Error::Unavailable { .. })));
    // https without a CA, or a CA file with no certificate: typed errors.
    assert!(matches!(ConsulDiscovery::new(ConsulConfig::new(consul.url())), Err(Error::InvalidInput { field: "consul ca_file", .. })));
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").expect("write");
    assert!(matches!(
        ConsulDiscovery::new({
            let mut built = ConsulConfig::new(consul.url());
            built.ca_file = Some(empty);
            built
        }),
        Err(Error::InvalidInput { .. })
    ));
}
