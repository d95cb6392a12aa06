//! Moving a volume between nodes over HTTP: one node serves its volumes
//! (`serve_volumes`), another pulls one into its own manager (`fetch_volume`). Each
//! "node" is a `LocalVolumes` root of its own; the transfer runs over real TCP on
//! loopback. Failure paths: unknown volume, existing target, a source that dies
//! half-way, one that stalls before answering, and one that is not there at all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keelson_scheduler::{
    conformance, fetch_volume_with, fetch_volume_with_token, serve_volumes, Error, LocalVolumes, VolumeManager, VolumeServer,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const TOKEN: &str = "test-token";

/// `fetch_volume` with this file's token.
async fn fetch_volume(addr: SocketAddr, name: &str, into: &dyn VolumeManager) -> keelson_scheduler::Result<keelson_scheduler::Volume> {
    fetch_volume_with_token(addr, name, into, Some(TOKEN)).await
}

/// A node serving the volumes under `root` on a loopback port until the sender drops.
async fn serving(root: &std::path::Path) -> (SocketAddr, Arc<LocalVolumes>, tokio::sync::oneshot::Sender<()>) {
    let volumes = Arc::new(LocalVolumes::new(root).expect("root"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served: Arc<dyn VolumeManager> = volumes.clone();
    tokio::spawn(serve_volumes(listener, served, TOKEN, async move {
        let _ = stopped.await;
    }));
    (addr, volumes, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_is_pulled_from_another_node_whole_with_its_labels() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let (addr, source, _stop) = serving(a.path()).await;
    let labels = BTreeMap::from([("app".to_owned(), "db".to_owned()), ("tier".to_owned(), "data".to_owned())]);
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let files: [(&str, &[u8], u32); 2] = [("db/table", &big, 0o600), ("db/PG_VERSION", b"16\n", 0o644)];
    source.import("pgdata", labels.clone(), conformance::archive_of(&files, &[("current", "db")])).await.expect("seed");

    let dest = LocalVolumes::new(b.path()).expect("dest");
    let pulled = fetch_volume(addr, "pgdata", &dest).await.expect("fetch");
    assert_eq!(pulled.labels, labels);
    assert_eq!(conformance::export_listing(&dest, "pgdata").await, conformance::export_listing(source.as_ref(), "pgdata").await);
    assert_eq!(std::fs::read(b.path().join("pgdata/data/db/table")).expect("on disk"), big);

    assert!(matches!(fetch_volume(addr, "pgdata", &dest).await, Err(Error::Conflict { .. })), "an existing volume is not overwritten");
    assert!(matches!(fetch_volume(addr, "no-such", &dest).await, Err(Error::NotFound { .. })));
    assert!(matches!(fetch_volume(addr, "../etc", &dest).await, Err(Error::InvalidInput { field: "volume name", .. })));
}

/// A fake source that answers 200 and then sends `body` raw (chunked framing included),
/// then closes: what a node dying mid-transfer looks like on the wire.
async fn fake_source(head_and_body: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut request = [0u8; 1024];
            let _ = s.read(&mut request).await;
            let _ = s.write_all(&head_and_body).await;
            let _ = s.shutdown().await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_dies_half_way_leaves_nothing_on_the_destination() {
    let b = tempfile::tempdir().expect("b");
    let dest = LocalVolumes::new(b.path()).expect("dest");
    let mut archive = Vec::new();
    let mut stream = conformance::archive_of(&[("big", &[5u8; 100_000], 0o644)], &[]);
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        archive.extend_from_slice(&chunk.expect("chunk"));
    }
    // A chunked body that promises the whole archive but ends after 60 KB.
    let half = &archive[..60_000];
    let mut wire = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-tar\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    wire.extend_from_slice(format!("{:x}\r\n", archive.len()).as_bytes());
    wire.extend_from_slice(half);
    let addr = fake_source(wire).await;
    let r = fetch_volume(addr, "cut", &dest).await;
    assert!(r.is_err(), "a cut transfer must fail: {r:?}");
    assert!(matches!(dest.get("cut").await, Err(Error::NotFound { .. })));
    assert!(dest.list().await.expect("list").is_empty(), "no volume, no staging left visible");
    assert_eq!(std::fs::read_dir(b.path()).expect("root").count(), 0, "staging directory removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_source_is_unavailable_and_a_stopped_server_refuses() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let dest = LocalVolumes::new(b.path()).expect("dest");
    let (addr, source, stop) = serving(a.path()).await;
    source.create("x", BTreeMap::new()).await.expect("create");
    drop(stop);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = fetch_volume(addr, "x", &dest).await;
    assert!(matches!(r, Err(Error::Unavailable { .. })), "{r:?}");
    assert!(matches!(dest.get("x").await, Err(Error::NotFound { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_token_refuses_requests_without_it() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let source = Arc::new(LocalVolumes::new(a.path()).expect("a"));
    source.import("secret", BTreeMap::new(), conformance::archive_of(&[("key", b"hunter2", 0o600)], &[])).await.expect("seed");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let served: Arc<dyn VolumeManager> = source.clone();
    let server = VolumeServer::new(served).with_token("s3cret-token").expect("token");
    tokio::spawn(server.serve(listener, std::future::pending()));
    let dest = LocalVolumes::new(b.path()).expect("dest");

    for wrong in [None, Some("guess"), Some("s3cret-tokeN"), Some("s3cret-token-and-more")] {
        let r = fetch_volume_with_token(addr, "secret", &dest, wrong).await;
        assert!(matches!(r, Err(Error::Denied { .. })), "{wrong:?}: {r:?}");
        assert!(matches!(dest.get("secret").await, Err(Error::NotFound { .. })));
    }
    fetch_volume_with_token(addr, "secret", &dest, Some("s3cret-token")).await.expect("the right token");
    assert_eq!(std::fs::read(b.path().join("secret/data/key")).expect("on disk"), b"hunter2");

    let served: Arc<dyn VolumeManager> = source;
    assert!(matches!(VolumeServer::new(served.clone()).with_token(""), Err(Error::InvalidInput { .. })));
    assert!(matches!(VolumeServer::new(served).with_token("bad\ntoken"), Err(Error::InvalidInput { .. })));
}

/// Nothing is open by default: a server without a token refuses to start (unless told
/// it may, explicitly), and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_a_token_refuses_to_start_unless_told_insecure() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let source = Arc::new(LocalVolumes::new(a.path()).expect("a"));
    source.create("open", BTreeMap::new()).await.expect("create");
    let served: Arc<dyn VolumeManager> = source;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let r = VolumeServer::new(served.clone()).serve(listener, std::future::pending()).await;
    assert!(matches!(&r, Err(Error::InvalidInput { field: "volume server token", .. })), "{r:?}");
    assert!(r.expect_err("refused").to_string().contains("insecure_no_auth"), "the error names the way out");

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(VolumeServer::new(served).insecure_no_auth().serve(listener, std::future::pending()));
    let dest = LocalVolumes::new(b.path()).expect("dest");
    fetch_volume_with_token(addr, "open", &dest, None).await.expect("an explicitly open server serves anyone");
}

fn client_trusting(cert: &keelson_testkit::tls::TestCert) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone()).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Over TLS: a client that trusts the server's certificate and has the token gets the
/// volume; one that trusts another certificate, or speaks plain HTTP, gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_move_over_tls_to_clients_that_trust_the_server() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let source = Arc::new(LocalVolumes::new(a.path()).expect("a"));
    source.import("tls-vol", BTreeMap::new(), conformance::archive_of(&[("key", b"over tls", 0o600)], &[])).await.expect("seed");
    let cert = keelson_testkit::tls::test_cert(&["volumes.node-a"]).expect("cert");
    let other = keelson_testkit::tls::test_cert(&["volumes.node-a"]).expect("another cert");
    let certs = keelson_routing::CertStore::new();
    certs.set_fallback(cert.chain_pem.as_bytes(), cert.key_pem.as_bytes()).expect("cert store");
    let served: Arc<dyn VolumeManager> = source;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = VolumeServer::new(served).with_token(TOKEN).expect("token").with_tls(certs.server_config());
    tokio::spawn(server.serve(listener, std::future::pending()));
    let dest = LocalVolumes::new(b.path()).expect("dest");

    let untrusting = {
        let mut built = keelson_scheduler::FetchOptions::default();
        built.token = Some(TOKEN.into());
        built.tls = Some((client_trusting(&other), "volumes.node-a".into()));
        built
    };
    let r = fetch_volume_with(addr, "tls-vol", &dest, &untrusting).await;
    assert!(matches!(r, Err(Error::Denied { .. })), "a certificate the client does not trust: {r:?}");
    let r = fetch_volume_with_token(addr, "tls-vol", &dest, Some(TOKEN)).await;
    assert!(r.is_err(), "plain HTTP to a TLS server gets nothing: {r:?}");
    assert!(matches!(dest.get("tls-vol").await, Err(Error::NotFound { .. })));

    let trusting = {
        let mut built = keelson_scheduler::FetchOptions::default();
        built.token = Some(TOKEN.into());
        built.tls = Some((client_trusting(&cert), "volumes.node-a".into()));
        built
    };
    fetch_volume_with(addr, "tls-vol", &dest, &trusting).await.expect("over TLS");
    assert_eq!(std::fs::read(b.path().join("tls-vol/data/key")).expect("on disk"), b"over tls");
}

/// Owners named by an archive are kept only when asked (`with_preserve_owners`), and
/// setuid is dropped even then.
#[tokio::test]
async fn owners_are_kept_only_when_asked() {
    assert!(nix::unistd::geteuid().is_root(), "only root can give files to another owner: run the tests as root, as CI does");
    let dir = tempfile::tempdir().expect("dir");
    let v = LocalVolumes::new(dir.path()).expect("root").with_preserve_owners(true);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_mode(0o4750);
    h.set_uid(4242);
    h.set_gid(4343);
    b.append_data(&mut h, "owned", &b"hi"[..]).expect("append");
    v.import("kept", BTreeMap::new(), conformance::chunked(b.into_inner().expect("tar"))).await.expect("import");
    let meta = std::fs::metadata(dir.path().join("kept/data/owned")).expect("file");
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.gid()), (4242, 4343), "owners kept when asked");
    assert_eq!(meta.mode() & 0o7777, 0o750, "setuid dropped even then");
}
