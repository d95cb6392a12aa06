//! The etcd backend against a real etcd locked down as production should be (TLS with a
//! CA, `--client-cert-auth`, `auth enable`, a user whose role reads and writes one prefix):
//! the right credentials work; a wrong CA, a missing client certificate, a wrong password
//! and a key outside the role's prefix are each a typed error naming the cause; and a
//! password is never sent in plain text unless allowed.
#![cfg(feature = "etcd")]

use std::time::Duration;

use keelson_discovery::{Error, EtcdConfig, EtcdKv, EtcdTls, KeyValue};
use keelson_testkit::etcd_secure::{SecureEtcd, PASSWORD, PREFIX, USER};

fn config(etcd: &SecureEtcd, tls: EtcdTls, password: &str) -> EtcdConfig {
    {
        let mut built = EtcdConfig::new([etcd.client_url()]);
        built.credentials = Some((USER.into(), password.into()));
        built.tls = Some(tls);
        built.connect_timeout = Duration::from_secs(5);
        built
    }
}

fn good_tls(etcd: &SecureEtcd) -> EtcdTls {
    let (cert, key) = etcd.client_files();
    EtcdTls::from_files(&etcd.ca_file(), Some(&cert), Some(&key)).expect("tls files")
}

async fn connect_and_write(config: EtcdConfig, key: &str) -> Result<(), Error> {
    let kv = EtcdKv::connect(config).await?;
    kv.put(key, b"v".to_vec(), None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secured_etcd_takes_the_right_credentials_and_names_every_wrong_one() {
    let etcd = tokio::task::spawn_blocking(SecureEtcd::start).await.expect("join").expect("secured etcd");
    let key = format!("{PREFIX}ok");

    // The right CA, client certificate, user and password: reads and writes its prefix.
    let kv = EtcdKv::connect(config(&etcd, good_tls(&etcd), PASSWORD)).await.expect("the right credentials connect");
    kv.put(&key, b"hello".to_vec(), None).await.expect("write inside the prefix");
    assert_eq!(kv.get(&key).await.expect("read").expect("present").value, b"hello");
    let lease = kv.grant_lease(Duration::from_secs(5)).await.expect("leases");
    kv.put(&format!("{PREFIX}leased"), b"x".to_vec(), Some(lease)).await.expect("a key on a lease");

    // A key outside the role's prefix.
    let outside = kv.put("other/x", b"v".to_vec(), None).await;
    assert!(matches!(&outside, Err(Error::PermissionDenied { .. })), "{outside:?}");

    // A wrong password.
    let r = connect_and_write(config(&etcd, good_tls(&etcd), "wrong"), &key).await;
    assert!(matches!(&r, Err(Error::Unauthenticated { .. })), "{r:?}");

    // A CA that did not sign etcd's certificate.
    let other = keelson_testkit::tls::TestCa::new("another CA").expect("ca");
    let wrong_ca = EtcdTls { ca_pem: other.cert_pem.into_bytes(), ..good_tls(&etcd) };
    let r = connect_and_write(config(&etcd, wrong_ca, PASSWORD), &key).await;
    assert!(matches!(&r, Err(Error::Tls { reason, .. }) if reason.to_ascii_lowercase().contains("certificate")), "{r:?}");

    // No client certificate, where etcd demands one.
    let no_cert = EtcdTls { identity: None, ..good_tls(&etcd) };
    let r = connect_and_write(config(&etcd, no_cert, PASSWORD), &key).await;
    assert!(matches!(&r, Err(Error::Tls { reason, .. }) if reason.to_ascii_lowercase().contains("certificate")), "{r:?}");
    eprintln!("without a client certificate: {}", r.expect_err("refused"));

    // A password over plain HTTP is refused before anything is sent.
    let plain = {
        let mut built = EtcdConfig::new(["http://127.0.0.1:1"]);
        built.credentials = Some((USER.into(), PASSWORD.into()));
        built
    };
    let r = EtcdKv::connect(plain).await;
    assert!(matches!(&r, Err(Error::InvalidInput { field: "etcd password", .. })), "{r:?}");
    // https:// without a CA to trust, and TLS with an http:// endpoint, are refused too.
    let r = EtcdKv::connect(EtcdConfig::new([etcd.client_url()])).await;
    assert!(matches!(&r, Err(Error::InvalidInput { field: "etcd endpoints", .. })), "{r:?}");
    let r = EtcdKv::connect({
        let mut built = EtcdConfig::new(["http://127.0.0.1:1"]);
        built.tls = Some(good_tls(&etcd));
        built
    })
    .await;
    assert!(matches!(&r, Err(Error::InvalidInput { field: "etcd endpoint", .. })), "{r:?}");

    // Nothing of a secret reaches a Debug print.
    let printed = format!("{:?}", config(&etcd, good_tls(&etcd), PASSWORD));
    assert!(!printed.contains(PASSWORD) && !printed.contains("PRIVATE KEY"), "{printed}");
}
