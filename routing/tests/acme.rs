//! ACME against a real CA: Debian's pebble, validating HTTP-01 on the port the proxy
//! serves (its `Http01Challenges` hook answers), resolving the names with keelson's own
//! DNS server, and refusing 30% of good nonces on purpose, so the issuer's retries
//! carry it through. The certificate is stored (0600), installed, served in a real TLS
//! handshake that verifies against pebble's root, reused while fresh and by a second
//! issuer on the same state; a name the CA cannot validate is a typed error naming it.
#![cfg(feature = "acme")]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use keelson_discovery::{Discovery, DnsServer, DnsServerConfig, MemoryDiscovery, Registration, ServiceName};
use keelson_routing::acme::{AcmeConfig, AcmeIssuer, Http01Challenges};
use keelson_routing::{CertStore, Error, MemoryRouter, Proxy, ProxyConfig};
use keelson_testkit::pebble::Pebble;

const NAME: &str = "shop.service.keelson.test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_come_from_pebble_over_http01_answered_by_the_proxy() {
    // keelson's DNS server: shop.service.keelson.test is 127.0.0.1, where the proxy is.
    let discovery = Arc::new(MemoryDiscovery::memory());
    let _shop =
        discovery.register(Registration::new(ServiceName::new("shop").expect("name"), "shop-1", "127.0.0.1", 80)).await.expect("register");
    let dns = DnsServer::start(discovery.clone() as Arc<dyn Discovery>, {
        let mut c = DnsServerConfig::default();
        c.domain = "keelson.test".into();
        c.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c
    })
    .await
    .expect("dns server");

    // The plain-HTTP proxy answering the CA's challenges.
    let challenges = Arc::new(Http01Challenges::default());
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let http_port = plain.local_addr().expect("addr").port();
    let proxy = Arc::new(Proxy::new(Arc::new(MemoryRouter::new()), ProxyConfig::default()).with_hooks(challenges.clone()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(proxy.clone().serve(plain, async move {
        let _ = stopped.await;
    }));

    let pebble = Pebble::start(http_port, dns.local_addr(), 30).expect("pebble");
    let state = tempfile::tempdir().expect("state");
    let config = {
        let mut c = AcmeConfig::new(pebble.directory.clone(), state.path());
        c.ca_file = Some(pebble.ca_file.clone());
        c.contact = vec!["mailto:ops@keelson.test".into()];
        c.attempts = 8;
        c
    };
    let certs = CertStore::new();
    let issuer = AcmeIssuer::new(config.clone(), challenges.clone(), certs.clone());
    let names = vec![NAME.to_owned()];
    let issued = issuer.ensure(&names).await.unwrap_or_else(|e| panic!("issuing: {e}\npebble:\n{}", pebble.log()));
    assert!(issued.issued, "a new certificate");
    assert!(issued.not_after > std::time::SystemTime::now() + Duration::from_secs(24 * 3600), "valid for days at least");
    for file in [&issued.chain, &issued.key, &state.path().join("account.json")] {
        let mode = std::fs::metadata(file).expect("stored").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is for its owner only", file.display());
    }
    assert_eq!(certs.names(), vec![NAME.to_owned()], "installed for the proxy");

    // Served: a TLS handshake naming it verifies against pebble's issuing root.
    let tls = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tls_addr = tls.local_addr().expect("addr");
    let (stop_tls, tls_stopped) = tokio::sync::oneshot::channel::<()>();
    let serving_tls = tokio::spawn(proxy.clone().serve_tls(tls, certs.clone(), async move {
        let _ = tls_stopped.await;
    }));
    let root_pem = pebble.issuing_root().expect("pebble's root");
    let root = keelson_testkit::tls::TestCert {
        der: rustls::pki_types::pem::PemObject::from_pem_slice(root_pem.as_bytes()).expect("root der"),
        chain_pem: root_pem.clone(),
        key_pem: String::new(),
    };
    keelson_testkit::tls::handshake(tls_addr, NAME, &[&root]).await.expect("a verified handshake with the issued certificate");

    // Fresh: reused, by this issuer and by another on the same state (no new account).
    assert!(!issuer.ensure(&names).await.expect("again").issued, "the stored certificate is fresh");
    let again = AcmeIssuer::new(config.clone(), challenges.clone(), CertStore::new());
    assert!(!again.ensure(&names).await.expect("restarted").issued);

    // A name that does not resolve: the CA cannot validate it, and says so.
    let nowhere = vec!["nowhere.service.keelson.test".to_owned()];
    match issuer.issue(&nowhere).await {
        Err(Error::Acme { names, reason }) => {
            assert_eq!(names, "nowhere.service.keelson.test");
            assert!(!reason.is_empty(), "the CA's reason");
        }
        other => panic!("expected the CA to refuse, got {other:?}"),
    }
    // Not a name at all: refused before anything is asked.
    assert!(matches!(issuer.issue(&["*.keelson.test".to_owned()]).await, Err(Error::InvalidInput { .. })));
    assert!(matches!(issuer.issue(&[]).await, Err(Error::InvalidInput { .. })));

    let _ = stop.send(());
    let _ = stop_tls.send(());
    let _ = serving.await;
    let _ = serving_tls.await;
}
