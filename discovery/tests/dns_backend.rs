//! The DNS backend against a real dnsmasq, and against keelson's own DNS server.
#![cfg(feature = "dns")]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keelson_discovery::{Discovery, DnsConfig, DnsDiscovery, Error, Health, Query, Registration, ServiceName};
use keelson_testkit::dnsmasq::{DnsRecord, Dnsmasq};

fn a(name: &str, last: u8) -> DnsRecord {
    DnsRecord::A { name: name.into(), ip: Ipv4Addr::new(127, 0, 2, last) }
}

fn srv(name: &str, target: &str, port: u16) -> DnsRecord {
    DnsRecord::Srv { name: name.into(), target: target.into(), port, priority: 1, weight: 10 }
}

fn config(server: SocketAddr) -> DnsConfig {
    {
        let mut built = DnsConfig::new(vec![server], "zone.test");
        built.min_refresh = Duration::from_millis(200);
        built.max_refresh = Duration::from_secs(2);
        built
    }
}

fn ids(v: &[keelson_discovery::Instance]) -> Vec<(String, String, u16)> {
    v.iter().map(|i| (i.id.clone(), i.address.clone(), i.port)).collect()
}

#[tokio::test]
async fn srv_then_consul_style_then_a_fallback() {
    let records = [
        srv("_web._tcp.zone.test", "w1.zone.test", 8080),
        srv("_web._tcp.zone.test", "w2.zone.test", 8081),
        a("w1.zone.test", 1),
        a("w2.zone.test", 2),
        srv("api.service.zone.test", "w1.zone.test", 9000),
        a("db.zone.test", 9),
    ];
    let dns = Dnsmasq::start(&records, 1).expect("dnsmasq");
    let mut cfg = config(dns.addr());
    cfg.default_port = Some(5432);
    let d = DnsDiscovery::new(cfg).expect("resolver");
    let web = d.instances(&Query::service(ServiceName::new("web").expect("name"))).await.expect("web");
    assert_eq!(
        ids(&web),
        vec![("w1.zone.test:8080".into(), "127.0.2.1".into(), 8080), ("w2.zone.test:8081".into(), "127.0.2.2".into(), 8081)]
    );
    assert!(web.iter().all(|i| i.health == Health::Passing));
    let api = d.instances(&Query::service(ServiceName::new("api").expect("name"))).await.expect("api");
    assert_eq!(ids(&api), vec![("w1.zone.test:9000".into(), "127.0.2.1".into(), 9000)], "Consul-style SRV name");
    let db = d.instances(&Query::service(ServiceName::new("db").expect("name"))).await.expect("db");
    assert_eq!(ids(&db), vec![("127.0.2.9:5432".into(), "127.0.2.9".into(), 5432)], "A record on the default port");
    let none = d.instances(&Query::service(ServiceName::new("ghost").expect("name"))).await.expect("no records is not an error");
    assert!(none.is_empty());
}

#[tokio::test]
async fn dns_passes_the_read_only_conformance_suite() {
    let records = [
        srv("_web._tcp.zone.test", "w1.zone.test", 8080),
        srv("_web._tcp.zone.test", "w2.zone.test", 8081),
        a("w1.zone.test", 1),
        a("w2.zone.test", 2),
    ];
    let dns = Dnsmasq::start(&records, 1).expect("dnsmasq");
    let d = DnsDiscovery::new(config(dns.addr())).expect("resolver");
    keelson_discovery::conformance::discovery_read_only_all(
        &d,
        &ServiceName::new("web").expect("name"),
        &["w1.zone.test:8080", "w2.zone.test:8081"],
    )
    .await;
}

#[tokio::test]
async fn dns_is_read_only_and_says_so() {
    let dns = Dnsmasq::start(&[a("x.zone.test", 1)], 1).expect("dnsmasq");
    let d = DnsDiscovery::new(config(dns.addr())).expect("resolver");
    let svc = ServiceName::new("x").expect("name");
    assert!(!d.capabilities().register);
    assert!(matches!(
        d.register(Registration::new(svc.clone(), "i", "127.0.0.1", 1)).await,
        Err(Error::Unsupported { backend: "dns", .. })
    ));
    assert!(matches!(d.set_health(&svc, "i", Health::Critical).await, Err(Error::Unsupported { .. })));
    assert!(matches!(d.services().await, Err(Error::Unsupported { .. })));
    assert!(matches!(d.instances(&Query::all()).await, Err(Error::Unsupported { .. })));
    assert!(matches!(DnsDiscovery::new(DnsConfig::new(vec![], "zone.test")), Err(Error::InvalidInput { .. })));
    assert!(matches!(DnsDiscovery::new(DnsConfig::new(vec![dns.addr()], "bad_domain")), Err(Error::InvalidInput { .. })));
}

#[tokio::test]
async fn a_running_watch_picks_up_a_record_change() {
    let before = [srv("_web._tcp.zone.test", "w1.zone.test", 8080), a("w1.zone.test", 1)];
    let dns = Dnsmasq::start(&before, 1).expect("dnsmasq");
    let d = DnsDiscovery::new(config(dns.addr())).expect("resolver");
    let mut w = d.watch(Query::service(ServiceName::new("web").expect("name"))).await.expect("watch");
    let first = w.next().await.expect("snapshot");
    assert_eq!(ids(&first.instances), vec![("w1.zone.test:8080".into(), "127.0.2.1".into(), 8080)]);
    let after = [
        srv("_web._tcp.zone.test", "w1.zone.test", 8080),
        srv("_web._tcp.zone.test", "w3.zone.test", 8083),
        a("w1.zone.test", 1),
        a("w3.zone.test", 3),
    ];
    let _dns = tokio::task::spawn_blocking(move || dns.restart_with(&after, 1).expect("restart")).await.expect("join");
    let next = tokio::time::timeout(Duration::from_secs(10), w.next()).await.expect("change seen within 10 s").expect("open");
    assert_eq!(next.instances.len(), 2, "{:?}", next.instances);
    assert!(next.version > first.version);
}

#[tokio::test]
async fn unreachable_server_is_unavailable_within_the_timeout() {
    let dead = SocketAddr::from(([127, 0, 0, 1], keelson_testkit::free_port().expect("port")));
    let mut cfg = config(dead);
    cfg.timeout = Duration::from_millis(300);
    let d = DnsDiscovery::new(cfg).expect("resolver");
    let t0 = std::time::Instant::now();
    let r = d.instances(&Query::service(ServiceName::new("web").expect("name"))).await;
    assert!(matches!(r, Err(Error::Unavailable { .. })), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

/// keelson end to end: discovery served by keelson's DNS server, read back by the DNS
/// backend.
#[cfg(feature = "dns-server")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_back_what_the_keelson_dns_server_serves() {
    use keelson_discovery::{DnsServer, DnsServerConfig, MemoryDiscovery};
    let source = Arc::new(MemoryDiscovery::memory());
    let web = ServiceName::new("web").expect("name");
    let _h = source.register(Registration::new(web.clone(), "web-1", "127.0.3.1", 7001)).await.expect("reg");
    let _g = source.register(Registration::new(web.clone(), "web-2", "127.0.3.2", 7002)).await.expect("reg");
    let server = DnsServer::start(source, {
        let mut built = DnsServerConfig::default();
        built.domain = "zone.test".into();
        built.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        built
    })
    .await
    .expect("server");
    let d = DnsDiscovery::new(config(server.local_addr())).expect("resolver");
    let got = d.instances(&Query::service(web)).await.expect("lookup");
    assert_eq!(
        ids(&got),
        vec![
            ("web-1.web.service.zone.test:7001".into(), "127.0.3.1".into(), 7001),
            ("web-2.web.service.zone.test:7002".into(), "127.0.3.2".into(), 7002)
        ]
    );
    server.shutdown().await;
}
