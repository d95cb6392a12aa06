//! The DNS server serving discovery, queried with `dig` (an independent client).
#![cfg(feature = "dns-server")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::{Discovery, DnsServer, DnsServerConfig, Health, MemoryDiscovery, Registration, ServiceName};
use keelson_testkit::dnsmasq::dig;

async fn serve(d: Arc<dyn Discovery>) -> DnsServer {
    let config = {
        let mut built = DnsServerConfig::default();
        built.domain = "keelson.test".into();
        built.ttl = 7;
        built.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        built
    };
    DnsServer::start(d, config).await.expect("server starts")
}

/// `dig` blocks; run it off the runtime.
async fn ask(addr: SocketAddr, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || dig(addr, &args.iter().map(String::as_str).collect::<Vec<_>>()).expect("dig runs"))
        .await
        .expect("join")
}

fn lines(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out.lines().map(str::to_owned).filter(|l| !l.is_empty()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_and_srv_for_healthy_instances() {
    let d = Arc::new(MemoryDiscovery::memory());
    let web = ServiceName::new("web").expect("name");
    let _a = d.register(Registration::new(web.clone(), "web-1", "127.0.0.11", 8080)).await.expect("reg");
    let _b = d.register(Registration::new(web.clone(), "web-2", "127.0.0.12", 8081)).await.expect("reg");
    let _c =
        d.register(Registration::new(web.clone(), "web-3", "127.0.0.13", 8082).with_initial_health(Health::Critical)).await.expect("reg");
    let server = serve(d.clone()).await;
    let addr = server.local_addr();

    assert_eq!(lines(&ask(addr, &["+short", "web.service.keelson.test", "A"]).await), vec!["127.0.0.11", "127.0.0.12"], "healthy only");
    assert_eq!(
        lines(&ask(addr, &["+short", "_web._tcp.keelson.test", "SRV"]).await),
        vec!["1 1 8080 web-1.web.service.keelson.test.", "1 1 8081 web-2.web.service.keelson.test."]
    );
    assert_eq!(lines(&ask(addr, &["+short", "web.service.keelson.test", "SRV"]).await).len(), 2, "Consul-style SRV name");
    assert_eq!(lines(&ask(addr, &["+short", "web-2.web.service.keelson.test", "A"]).await), vec!["127.0.0.12"], "SRV targets resolve");
    let full = ask(addr, &["_web._tcp.keelson.test", "SRV"]).await;
    // The two targets' addresses, and the OPT record: dig asks with EDNS, and a query with
    // an OPT record gets one back (RFC 6891 6.1.1).
    assert!(full.contains("ADDITIONAL: 3") && full.contains("EDNS: version: 0"), "targets' addresses sent as additional records:\n{full}");
    let additional = full.split(";; ADDITIONAL SECTION:").nth(1).unwrap_or_default();
    assert_eq!(additional.lines().filter(|l| l.contains("\tA\t")).count(), 2, "{full}");
    assert!(full.contains(" 7\tIN\tSRV") || full.contains("\t7\tIN\tSRV"), "configured TTL:\n{full}");
    assert!(full.contains("flags: qr aa"), "authoritative:\n{full}");

    // Changes in discovery reach DNS without a restart.
    d.set_health(&web, "web-1", Health::Critical).await.expect("health");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = lines(&ask(addr, &["+short", "web.service.keelson.test", "A"]).await);
        if now == vec!["127.0.0.12"] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_other_zones_and_answers_nxdomain_for_unknown_names() {
    let d = Arc::new(MemoryDiscovery::memory());
    let server = serve(d).await;
    let addr = server.local_addr();
    assert!(ask(addr, &["example.com", "A"]).await.contains("status: REFUSED"), "not a recursive resolver");
    assert!(ask(addr, &["nope.service.keelson.test", "A"]).await.contains("status: NXDOMAIN"));
    assert!(ask(addr, &["a.b.c.d.keelson.test", "A"]).await.contains("status: NXDOMAIN"));
    // Garbage on the wire does not take the server down.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    for junk in [&b"\x00"[..], &[0xff; 12], &[0u8; 600]] {
        let _ = sock.send_to(junk, addr);
    }
    assert!(ask(addr, &["nope.service.keelson.test", "A"]).await.contains("status: NXDOMAIN"), "still serving");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_udp_answers_are_truncated_with_tc_and_complete_over_tcp() {
    let d = Arc::new(MemoryDiscovery::memory());
    let big = ServiceName::new("big").expect("name");
    let mut handles = Vec::new();
    for i in 0..100u8 {
        handles.push(d.register(Registration::new(big.clone(), format!("b{i}"), format!("127.0.1.{i}"), 9000)).await.expect("reg"));
    }
    let server = serve(d).await;
    let addr = server.local_addr();
    let udp = ask(addr, &["+ignore", "+noedns", "big.service.keelson.test", "SRV"]).await;
    let flags = udp.lines().find(|l| l.starts_with(";; flags:")).unwrap_or_default();
    assert!(flags.split(';').nth(2).is_some_and(|f| f.split_whitespace().any(|x| x == "tc")), "UDP answer truncated with TC:\n{udp}");
    let tcp = ask(addr, &["+tcp", "+short", "big.service.keelson.test", "SRV"]).await;
    assert_eq!(tcp.lines().count(), 100, "all 100 over TCP");
    server.shutdown().await;
}

#[tokio::test]
async fn bad_domain_and_no_udp_worker_are_typed_errors() {
    let d: Arc<dyn Discovery> = Arc::new(MemoryDiscovery::memory());
    let config = {
        let mut built = DnsServerConfig::default();
        built.domain = "Bad_Domain".into();
        built.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        built
    };
    assert!(matches!(DnsServer::start(d.clone(), config).await, Err(keelson_discovery::Error::InvalidInput { field: "dns domain", .. })));
    let config = {
        let mut built = DnsServerConfig::default();
        built.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        built.udp_workers = 0;
        built
    };
    assert!(matches!(DnsServer::start(d, config).await, Err(keelson_discovery::Error::InvalidInput { field: "dns udp_workers", .. })));
}

/// The zone is served as an authority: SOA and NS at the apex, NODATA (NOERROR, no
/// records) for a name that exists only as a parent (`service.<zone>`) or lacks the type
/// asked for, NXDOMAIN only for names with nothing at or below them, and the SOA with
/// the negative TTL in the authority section of every negative answer (RFC 2308, 8020).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zone_answers_as_an_authority_with_soa_ns_and_nodata() {
    let d = Arc::new(MemoryDiscovery::memory());
    let web = ServiceName::new("web").expect("name");
    let _a = d.register(Registration::new(web, "web-1", "127.0.0.11", 8080)).await.expect("reg");
    let config = {
        let mut built = DnsServerConfig::default();
        built.domain = "keelson.test".into();
        built.ttl = 7;
        built.negative_ttl = 11;
        built.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        built
    };
    let server = DnsServer::start(d, config).await.expect("server starts");
    let addr = server.local_addr();

    let soa = ask(addr, &["keelson.test", "SOA"]).await;
    assert!(soa.contains("status: NOERROR") && soa.contains("flags: qr aa"), "{soa}");
    let short = ask(addr, &["+short", "keelson.test", "SOA"]).await;
    assert!(short.starts_with("ns.keelson.test. hostmaster.keelson.test. "), "{short}");
    assert!(short.trim_end().ends_with(" 11"), "the SOA minimum is the negative TTL: {short}");
    assert_eq!(lines(&ask(addr, &["+short", "keelson.test", "NS"]).await), vec!["ns.keelson.test."]);
    assert_eq!(lines(&ask(addr, &["+short", "ns.keelson.test", "A"]).await), vec!["127.0.0.1"], "the NS resolves");

    // Empty non-terminals and missing types: NODATA with the SOA.
    for (name, rtype) in [("service.keelson.test", "A"), ("_tcp.keelson.test", "SRV"), ("web.service.keelson.test", "TXT")] {
        let out = ask(addr, &[name, rtype]).await;
        assert!(out.contains("status: NOERROR") && out.contains("ANSWER: 0"), "{name} {rtype}: NODATA\n{out}");
        assert!(out.contains("AUTHORITY: 1") && out.contains("\t11\tIN\tSOA\tns.keelson.test."), "{name} {rtype}: SOA, TTL 11\n{out}");
    }
    // Nothing at or below: NXDOMAIN, with the SOA.
    let out = ask(addr, &["nope.service.keelson.test", "A"]).await;
    assert!(out.contains("status: NXDOMAIN") && out.contains("\t11\tIN\tSOA\t"), "{out}");
    server.shutdown().await;
}

/// Through a real recursive resolver (unbound, default hardening, forwarding the zone to
/// keelson): names resolve, absent names are NXDOMAIN, a parent's NODATA does not hide
/// the names below it, and negative answers are cached no longer than the negative TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recursive_resolver_resolves_the_zone_and_caches_negatives_by_its_soa() {
    let d = Arc::new(MemoryDiscovery::memory());
    let web = ServiceName::new("web").expect("name");
    let _a = d.register(Registration::new(web.clone(), "web-1", "127.0.0.11", 8080)).await.expect("reg");
    let config = {
        let mut built = DnsServerConfig::default();
        built.domain = "keelson.test".into();
        built.ttl = 1;
        built.negative_ttl = 2;
        built.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        built
    };
    let server = DnsServer::start(d.clone(), config).await.expect("server starts");
    let resolver = tokio::task::spawn_blocking({
        let addr = server.local_addr();
        move || keelson_testkit::unbound::Unbound::forwarding("keelson.test", addr)
    })
    .await
    .expect("join")
    .expect("unbound (apt-get install -y unbound)");
    let r = resolver.addr();

    // The parent first: its NODATA must not make the resolver believe nothing is below.
    let parent = ask(r, &["service.keelson.test", "A"]).await;
    assert!(parent.contains("status: NOERROR"), "{parent}");
    assert_eq!(lines(&ask(r, &["+short", "web.service.keelson.test", "A"]).await), vec!["127.0.0.11"]);
    assert_eq!(lines(&ask(r, &["+short", "_web._tcp.keelson.test", "SRV"]).await), vec!["1 1 8080 web-1.web.service.keelson.test."]);
    let absent = ask(r, &["api.service.keelson.test", "A"]).await;
    assert!(absent.contains("status: NXDOMAIN"), "{absent}");

    // The negative answer is cached for the SOA's 2 s at most: once `api` exists, the
    // resolver finds it within a few seconds (not the default negative cache of hours).
    let api = ServiceName::new("api").expect("name");
    let _b = d.register(Registration::new(api, "api-1", "127.0.0.12", 9090)).await.expect("reg");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if lines(&ask(r, &["+short", "api.service.keelson.test", "A"]).await) == vec!["127.0.0.12"] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the negative answer outlived its SOA's TTL");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(resolver);
    server.shutdown().await;
}

/// The UDP fast path patches only the id, RD and the question into a pre-encoded answer:
/// the question comes back in the client's case (DNS 0x20), ANY is answered as SRV with
/// the question still ANY, and several SO_REUSEPORT workers answer on one port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_answers_keep_the_question_as_asked_and_reuseport_workers_share_the_port() {
    let d = Arc::new(MemoryDiscovery::memory());
    let web = ServiceName::new("web").expect("name");
    let _a = d.register(Registration::new(web, "web-1", "127.0.0.11", 8080)).await.expect("reg");
    let config = {
        let mut built = DnsServerConfig::default();
        built.domain = "keelson.test".into();
        built.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        built.udp_workers = 3;
        built
    };
    let server = DnsServer::start(d, config).await.expect("server starts");
    let addr = server.local_addr();
    for _ in 0..6 {
        let mixed = ask(addr, &["WeB.SeRvIcE.KeElSoN.TeSt", "A"]).await;
        let question = mixed.split(";; QUESTION SECTION:").nth(1).and_then(|q| q.lines().nth(1)).unwrap_or_default();
        assert!(question.starts_with(";WeB.SeRvIcE.KeElSoN.TeSt."), "question in the client's case:\n{mixed}");
        assert!(mixed.contains("127.0.0.11") && mixed.contains("flags: qr aa rd;"), "answered, RD copied:\n{mixed}");
    }
    let any = ask(addr, &["web.service.keelson.test", "ANY"]).await;
    assert!(any.contains("IN\tANY") && any.contains("IN\tSRV\t1 1 8080"), "ANY answered with SRV:\n{any}");
    let plain = ask(addr, &["+noedns", "web.service.keelson.test", "A"]).await;
    assert!(plain.contains("127.0.0.11") && !plain.contains("OPT PSEUDOSECTION"), "no EDNS asked, none sent:\n{plain}");
    server.shutdown().await;
}

/// Bytes that are not a query get FORMERR (when they carry an id), a response gets no
/// answer at all (no reflection loops), and a name outside the zone is REFUSED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_and_responses_are_not_answered_as_queries() {
    let server = serve(Arc::new(MemoryDiscovery::memory())).await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    client.connect(server.local_addr()).await.expect("connect");
    let mut buf = [0u8; 512];
    let mut exchange = async |packet: &[u8]| -> Option<Vec<u8>> {
        client.send(packet).await.expect("send");
        match tokio::time::timeout(Duration::from_millis(500), client.recv(&mut buf)).await {
            Ok(Ok(n)) => Some(buf[..n].to_vec()),
            _ => None,
        }
    };
    // A header that promises a question the packet does not hold.
    let garbage = exchange(&[0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0x07, b'k']).await.expect("an answer");
    assert_eq!((garbage[0], garbage[1]), (0x12, 0x34), "the id answered");
    assert_eq!(garbage[2] & 0x80, 0x80, "a response");
    assert_eq!(garbage[3] & 0x0f, 1, "FORMERR");
    // The same header with QR set: a response, never answered.
    assert!(exchange(&[0x12, 0x35, 0x81, 0x00, 0, 0, 0, 0, 0, 0, 0, 0]).await.is_none(), "a response was answered");
    // Another zone.
    let mut other = vec![0x12, 0x36, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    other.extend_from_slice(b"\x07example\x03com\x00\x00\x01\x00\x01");
    let refused = exchange(&other).await.expect("an answer");
    assert_eq!(refused[3] & 0x0f, 5, "REFUSED");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_hosts_answer_beside_the_catalog_and_bad_ones_are_refused() {
    let d = Arc::new(MemoryDiscovery::memory());
    let web = ServiceName::new("web").expect("name");
    let _a = d.register(Registration::new(web, "web-1", "127.0.0.11", 8080)).await.expect("reg");
    let mut config = DnsServerConfig::default();
    config.domain = "cloud.test".into();
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let lb = std::net::IpAddr::from([10, 78, 0, 11]);
    config.hosts = vec![("@".into(), lb), ("master.edge".into(), lb), ("Web".into(), "::1".parse().expect("ip"))];
    let server = DnsServer::start(d.clone(), config.clone()).await.expect("server starts");
    let addr = server.local_addr();
    // Over UDP (the fast path) and TCP alike.
    for transport in ["+notcp", "+tcp"] {
        assert_eq!(lines(&ask(addr, &[transport, "+short", "cloud.test", "A"]).await), vec!["10.78.0.11"], "the apex");
        assert_eq!(lines(&ask(addr, &[transport, "+short", "master.edge.cloud.test", "A"]).await), vec!["10.78.0.11"]);
        assert_eq!(lines(&ask(addr, &[transport, "+short", "web.cloud.test", "AAAA"]).await), vec!["::1"], "names are case-blind");
        assert_eq!(lines(&ask(addr, &[transport, "+short", "web.service.cloud.test", "A"]).await), vec!["127.0.0.11"], "the catalog too");
    }
    let between = ask(addr, &["edge.cloud.test", "A"]).await;
    assert!(between.contains("status: NOERROR") && between.contains("ANSWER: 0"), "a name above a host is NODATA:\n{between}");
    let soa = ask(addr, &["+short", "cloud.test", "SOA"]).await;
    assert!(soa.starts_with("ns.cloud.test. hostmaster.cloud.test."), "the apex keeps its SOA:\n{soa}");
    server.shutdown().await;

    for bad in ["ns", "x.service", "-x", "a b"] {
        let mut c = config.clone();
        c.hosts = vec![(bad.into(), lb)];
        let err = DnsServer::start(d.clone(), c).await.expect_err(bad);
        assert!(err.to_string().contains(bad), "{bad}: {err}");
    }
}
