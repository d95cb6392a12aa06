//! Runs the real `edge` binary: routes from a file, reload on SIGHUP (a broken file keeps
//! the routes in force), Prometheus metrics, and a clear error for a bad file at start.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use keelson_testkit::http::{echo_server, get};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn routes(entries: &[(&str, SocketAddr)]) -> String {
    let routes: Vec<serde_json::Value> = entries
        .iter()
        .map(|(host, addr)| serde_json::json!({"host": host, "endpoints": [{"id": "e", "addr": addr.to_string()}]}))
        .collect();
    serde_json::json!({ "routes": routes }).to_string()
}

fn signal(child: &Child, s: Signal) {
    kill(Pid::from_raw(i32::try_from(child.id()).expect("pid")), s).expect("signal");
}

/// Starts `edge` with `args`; its stdout is returned for the ready lines.
fn start_edge(args: &[&str]) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child =
        Command::new(env!("CARGO_BIN_EXE_edge")).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("starts");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    (child, out)
}

/// SIGTERM, then a clean exit within 10 s.
fn stop_edge(mut child: Child) {
    signal(&child, Signal::SIGTERM);
    let status = keelson_testkit::wait_exit(&mut child, Duration::from_secs(10)).expect("stops on SIGTERM");
    assert!(status.success(), "{status}");
}

/// Polls until `host` answers `status` through the proxy, for up to 5 s.
async fn until_status(proxy: SocketAddr, host: &str, status: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = get(proxy, host, "/").await.expect("response").status;
        if got == status {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{host}: still {got}, wanted {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_serves_reloads_and_reports_metrics() {
    let (a, _ta) = echo_server("upstream-a").await.expect("a");
    let (b, _tb) = echo_server("upstream-b").await.expect("b");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("routes.json");
    std::fs::write(&file, routes(&[("one.test", a)])).expect("write");
    let listen: SocketAddr = format!("127.0.0.1:{}", keelson_testkit::free_port().expect("port")).parse().expect("addr");
    let metrics: SocketAddr = format!("127.0.0.1:{}", keelson_testkit::free_port().expect("port")).parse().expect("addr");
    let (child, mut out) =
        start_edge(&["--routes", file.to_str().expect("path"), "--listen", &listen.to_string(), "--metrics-listen", &metrics.to_string()]);
    let mut line = String::new();
    out.read_line(&mut line).expect("ready line");
    assert!(line.starts_with("edge serving 1 routes on"), "{line}");

    let r = get(listen, "one.test", "/").await.expect("response");
    assert_eq!((r.status, r.body.lines().next()), (200, Some("upstream-a")), "{}", r.body);
    assert_eq!(get(listen, "two.test", "/").await.expect("response").status, 404);

    // Reload: two.test appears, one.test goes.
    std::fs::write(&file, routes(&[("two.test", b)])).expect("write");
    signal(&child, Signal::SIGHUP);
    until_status(listen, "two.test", 200).await;
    until_status(listen, "one.test", 404).await;
    assert_eq!(get(listen, "two.test", "/").await.expect("response").body.lines().next(), Some("upstream-b"));

    // A broken file is reported and changes nothing.
    std::fs::write(&file, "{\"routes\": [{\"host\": \"three.test\", \"bogus\": 1}]}").expect("write");
    signal(&child, Signal::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(listen, "two.test", "/").await.expect("response").status, 200, "routes in force survive a bad reload");
    assert_eq!(get(listen, "three.test", "/").await.expect("response").status, 404);

    let m = get(metrics, "metrics.test", "/metrics").await.expect("metrics");
    assert_eq!(m.status, 200);
    assert!(m.body.contains(r#"keelson_proxy_requests_total{route="two.test",code="2xx"}"#), "{}", m.body);
    assert!(m.body.contains(r#"keelson_proxy_requests_total{route="",code="4xx"}"#), "{}", m.body);

    stop_edge(child);
}

#[test]
fn a_bad_routes_file_at_start_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("routes.json");
    std::fs::write(&file, "{\"routes\": [{\"host\": \"bad host\", \"endpoints\": []}]}").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_edge")).args(["--routes", file.to_str().expect("path")]).output().expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("edge: ") && err.contains("routes file"), "{err}");
    let missing = Command::new(env!("CARGO_BIN_EXE_edge")).args(["--routes", "/nonexistent/routes.json"]).output().expect("runs");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/routes.json"));
    std::fs::write(&file, "{\"routes\": []}").expect("write");
    let bad_check = Command::new(env!("CARGO_BIN_EXE_edge"))
        .args(["--routes", file.to_str().expect("path"), "--health-check", "ping"])
        .output()
        .expect("runs");
    assert!(!bad_check.status.success());
    assert!(
        String::from_utf8_lossy(&bad_check.stderr).contains("expected tcp or http:/path"),
        "{}",
        String::from_utf8_lossy(&bad_check.stderr)
    );
}

/// `--tls-listen`: TLS termination with the certificate from `--cert`, rotated by SIGHUP
/// (new handshakes get the new certificate; a broken file keeps the one in force).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_terminates_tls_and_rotates_certificates_on_sighup() {
    use keelson_testkit::tls::{handshake, test_cert};
    let (a, _ta) = echo_server("tls-upstream").await.expect("upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("routes.json");
    std::fs::write(&file, routes(&[("one.test", a)])).expect("write");
    let (chain, key) = (dir.path().join("chain.pem"), dir.path().join("key.pem"));
    let first = test_cert(&["one.test"]).expect("cert");
    let second = test_cert(&["one.test"]).expect("cert");
    std::fs::write(&chain, &first.chain_pem).expect("write");
    std::fs::write(&key, &first.key_pem).expect("write");
    let ports = keelson_testkit::free_ports(2).expect("ports");
    let (listen, tls): (SocketAddr, SocketAddr) = (([127, 0, 0, 1], ports[0]).into(), ([127, 0, 0, 1], ports[1]).into());
    let cert_arg = format!("one.test={},{}", chain.display(), key.display());
    let (child, mut out) = start_edge(&[
        "--routes",
        file.to_str().expect("path"),
        "--listen",
        &listen.to_string(),
        "--tls-listen",
        &tls.to_string(),
        "--cert",
        &cert_arg,
    ]);
    let mut line = String::new();
    out.read_line(&mut line).expect("ready line");
    out.read_line(&mut line).expect("TLS line");
    assert!(line.contains("edge serving TLS for [\"one.test\"]"), "{line}");

    let roots = [&first, &second];
    let h = handshake(tls, "one.test", &roots).await.expect("TLS handshake");
    assert_eq!(h.leaf, first.der);
    // A request over TLS reaches the upstream and says it came over https.
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(h.stream)).await.expect("http over tls");
    tokio::spawn(conn);
    let req = http::Request::get("/").header("host", "one.test").body(http_body_util::Empty::<bytes::Bytes>::new()).expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.expect("body").to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.starts_with("tls-upstream\n") && body.contains("x-forwarded-proto: https"), "{body}");

    std::fs::write(&chain, &second.chain_pem).expect("write");
    std::fs::write(&key, &second.key_pem).expect("write");
    signal(&child, Signal::SIGHUP);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while handshake(tls, "one.test", &roots).await.expect("handshake").leaf != second.der {
        assert!(tokio::time::Instant::now() < deadline, "rotated certificate not served within 5 s of SIGHUP");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    std::fs::write(&chain, "garbage").expect("write");
    signal(&child, Signal::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        handshake(tls, "one.test", &roots).await.expect("handshake").leaf,
        second.der,
        "a broken file keeps the certificate in force"
    );

    stop_edge(child);
}

/// `--cert-dir`: names' certificates found in a folder, a name added while edge runs
/// served after SIGHUP (how minipaas installs a domain's own certificate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_serves_certificates_from_a_folder_and_picks_up_new_ones_on_sighup() {
    use keelson_testkit::tls::{handshake, test_cert};
    let (a, _ta) = echo_server("dir-upstream").await.expect("upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("routes.json");
    std::fs::write(&file, routes(&[("one.test", a), ("two.test", a)])).expect("write");
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).expect("certs");
    let (one, two) = (test_cert(&["one.test"]).expect("cert"), test_cert(&["two.test"]).expect("cert"));
    std::fs::write(certs.join("one.test.crt"), &one.chain_pem).expect("write");
    std::fs::write(certs.join("one.test.key"), &one.key_pem).expect("write");
    let ports = keelson_testkit::free_ports(2).expect("ports");
    let (listen, tls): (SocketAddr, SocketAddr) = (([127, 0, 0, 1], ports[0]).into(), ([127, 0, 0, 1], ports[1]).into());
    let (child, mut out) = start_edge(&[
        "--routes",
        file.to_str().expect("path"),
        "--listen",
        &listen.to_string(),
        "--tls-listen",
        &tls.to_string(),
        "--cert-dir",
        certs.to_str().expect("path"),
    ]);
    let mut line = String::new();
    out.read_line(&mut line).expect("ready line");
    let roots = [&one, &two];
    assert_eq!(handshake(tls, "one.test", &roots).await.expect("TLS handshake").leaf, one.der);
    assert!(handshake(tls, "two.test", &roots).await.is_err(), "no certificate for two.test yet");

    std::fs::write(certs.join("two.test.crt"), &two.chain_pem).expect("write");
    std::fs::write(certs.join("two.test.key"), &two.key_pem).expect("write");
    signal(&child, Signal::SIGHUP);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(h) = handshake(tls, "two.test", &roots).await {
            assert_eq!(h.leaf, two.der);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the added certificate not served within 5 s of SIGHUP");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(handshake(tls, "one.test", &roots).await.expect("handshake").leaf, one.der, "the first one stays");
    stop_edge(child);
}

/// A TCP server that greets with `id`, then closes.
async fn greeter(id: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut s, format!("{id}\n").as_bytes()).await;
        }
    });
    addr
}

async fn greeting(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read_to_string(&mut s, &mut text))
        .await
        .expect("in time")
        .expect("read");
    text.trim().to_owned()
}

/// The `tcp` section: a listener per address, endpoints updated by SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_proxies_tcp_routes_and_reloads_them() {
    let (first, second) = (greeter("first").await, greeter("second").await);
    let ports = keelson_testkit::free_ports(2).expect("ports");
    let (listen, tcp): (SocketAddr, SocketAddr) = (([127, 0, 0, 1], ports[0]).into(), ([127, 0, 0, 1], ports[1]).into());
    let file_text = |up: SocketAddr| {
        serde_json::json!({"tcp": [{"listen": tcp.to_string(), "endpoints": [{"id": "g", "addr": up.to_string()}]}]}).to_string()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("routes.json");
    std::fs::write(&file, file_text(first)).expect("write");
    let (child, mut out) = start_edge(&["--routes", file.to_str().expect("path"), "--listen", &listen.to_string()]);
    let mut lines = String::new();
    out.read_line(&mut lines).expect("ready line");
    out.read_line(&mut lines).expect("TCP line");
    assert!(lines.contains(&format!("edge serving TCP on {tcp}")), "{lines}");
    assert_eq!(greeting(tcp).await, "first");

    std::fs::write(&file, file_text(second)).expect("write");
    signal(&child, Signal::SIGHUP);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while greeting(tcp).await != "second" {
        assert!(tokio::time::Instant::now() < deadline, "TCP route not reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_edge(child);
}

/// `--etcd`: instances registered in a real etcd by another process's `KvDiscovery`
/// become routes, and go away when deregistered.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_follows_the_catalog_in_etcd() {
    use std::sync::Arc;

    use keelson_discovery::{Discovery, EtcdConfig, EtcdKv, KvDiscovery, Registration, ServiceName};

    let etcd = keelson_testkit::etcd::Etcd::start().expect("etcd (apt-get install -y etcd-server)");
    let (up, _task) = echo_server("from-etcd").await.expect("upstream");
    let kv = EtcdKv::connect(EtcdConfig::new(vec![etcd.client_url()])).await.expect("connect");
    let discovery = KvDiscovery::new(Arc::new(kv));
    let listen: SocketAddr = format!("127.0.0.1:{}", keelson_testkit::free_port().expect("port")).parse().expect("addr");
    let (child, mut out) = start_edge(&["--etcd", &etcd.client_url(), "--listen", &listen.to_string()]);
    let mut line = String::new();
    out.read_line(&mut line).expect("ready line");
    assert!(line.starts_with("edge serving"), "{line}");
    assert_eq!(get(listen, "cat.test", "/").await.expect("response").status, 404);

    let handle = discovery
        .register(
            Registration::new(ServiceName::new("cat").expect("name"), "cat-1", up.ip().to_string(), up.port())
                .with_tag("keelson.http.host=cat.test"),
        )
        .await
        .expect("register");
    until_status(listen, "cat.test", 200).await;
    assert_eq!(get(listen, "cat.test", "/").await.expect("response").body.lines().next(), Some("from-etcd"));
    handle.deregister().await.expect("deregister");
    until_status(listen, "cat.test", 404).await;

    stop_edge(child);
}

/// `--etcd` across an etcd outage: while etcd is stopped the routes stay and `/metrics`
/// says they are stale (within 10 s); once it is back, staleness clears with no change
/// to the catalog needed.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_reports_an_etcd_outage_as_staleness_and_clears_it_when_etcd_returns() {
    use std::sync::Arc;

    use keelson_discovery::{Discovery, EtcdConfig, EtcdKv, KvDiscovery, Registration, ServiceName};

    let mut etcd = keelson_testkit::etcd::Etcd::start().expect("etcd (apt-get install -y etcd-server)");
    let (up, _task) = echo_server("from-etcd").await.expect("upstream");
    let kv = EtcdKv::connect(EtcdConfig::new(vec![etcd.client_url()])).await.expect("connect");
    let discovery = KvDiscovery::new(Arc::new(kv));
    let _handle = discovery
        .register(
            Registration::new(ServiceName::new("dog").expect("name"), "dog-1", up.ip().to_string(), up.port())
                .with_tag("keelson.http.host=dog.test"),
        )
        .await
        .expect("register");
    let ports = keelson_testkit::free_ports(2).expect("ports");
    let (listen, metrics): (SocketAddr, SocketAddr) = (([127, 0, 0, 1], ports[0]).into(), ([127, 0, 0, 1], ports[1]).into());
    let (child, mut out) =
        start_edge(&["--etcd", &etcd.client_url(), "--listen", &listen.to_string(), "--metrics-listen", &metrics.to_string()]);
    let mut line = String::new();
    out.read_line(&mut line).expect("ready line");
    until_status(listen, "dog.test", 200).await;
    let stale = |m: &str, v: u8| m.contains(&format!("keelson_route_source_stale {v}"));
    assert!(stale(&get(metrics, "m.test", "/metrics").await.expect("metrics").body, 0));

    etcd.stop();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    while !stale(&get(metrics, "m.test", "/metrics").await.expect("metrics").body, 1) {
        assert!(tokio::time::Instant::now() < deadline, "staleness not reported within 12 s of etcd stopping");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(listen, "dog.test", "/").await.expect("get").status, 200, "the last good routes are still served");

    etcd.start_again().expect("etcd again");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !stale(&get(metrics, "m.test", "/metrics").await.expect("metrics").body, 0) {
        assert!(tokio::time::Instant::now() < deadline, "staleness not cleared within 15 s of etcd returning");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(listen, "dog.test", "/").await.expect("get").status, 200);
    stop_edge(child);
}

/// `--consul`: services registered in a Consul agent become routes; when the agent goes
/// away the routes stay and `/metrics` says they are stale.
#[cfg(feature = "consul")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_follows_the_consul_catalog_and_reports_staleness() {
    use keelson_discovery::{ConsulConfig, ConsulDiscovery, Discovery, Registration, ServiceName};
    let fixture = keelson_testkit::consul::fixture("health_service.json");
    let consul = keelson_testkit::consul::FakeConsul::start(&fixture).await.expect("fake consul");
    let (up, _t) = echo_server("from-consul").await.expect("upstream");
    let ports = keelson_testkit::free_ports(2).expect("ports");
    let (listen, metrics): (SocketAddr, SocketAddr) = (([127, 0, 0, 1], ports[0]).into(), ([127, 0, 0, 1], ports[1]).into());
    let (child, mut out) =
        start_edge(&["--consul", &consul.url(), "--listen", &listen.to_string(), "--metrics-listen", &metrics.to_string()]);
    let mut line = String::new();
    out.read_line(&mut line).expect("ready line");

    let config = {
        let mut built = ConsulConfig::new(consul.url());
        built.wait = Duration::from_secs(2);
        built
    };
    let registrar = ConsulDiscovery::new(config).expect("client");
    let reg = Registration::new(ServiceName::new("shop").expect("name"), "shop-1", "127.0.0.1", up.port())
        .with_tag("keelson.http.host=shop.test");
    let _handle = registrar.register(reg).await.expect("register");
    until_status(listen, "shop.test", 200).await;
    assert_eq!(get(listen, "shop.test", "/").await.expect("get").body.lines().next(), Some("from-consul"));
    let m = get(metrics, "m.test", "/metrics").await.expect("metrics").body;
    assert!(m.contains("keelson_route_source_stale 0"), "{m}");

    drop(consul);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !get(metrics, "m.test", "/metrics").await.expect("metrics").body.contains("keelson_route_source_stale 1") {
        assert!(tokio::time::Instant::now() < deadline, "staleness not reported after Consul went away");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(listen, "shop.test", "/").await.expect("get").status, 200, "the last good routes are still served");
    stop_edge(child);
}

/// `--workers 3`: three single-thread runtimes share the address (SO_REUSEPORT); every
/// request is answered and the metrics count all of them, whichever worker served it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_workers_share_the_listen_address_and_the_metrics() {
    let (a, _ta) = echo_server("upstream-a").await.expect("a");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("routes.json");
    std::fs::write(&file, routes(&[("one.test", a)])).expect("write");
    let ports = keelson_testkit::free_ports(2).expect("ports");
    let (listen, metrics): (SocketAddr, SocketAddr) = (([127, 0, 0, 1], ports[0]).into(), ([127, 0, 0, 1], ports[1]).into());
    let (child, mut out) = start_edge(&[
        "--routes",
        file.to_str().expect("path"),
        "--listen",
        &listen.to_string(),
        "--metrics-listen",
        &metrics.to_string(),
        "--workers",
        "3",
    ]);
    let mut line = String::new();
    out.read_line(&mut line).expect("ready line");
    // Workers bind as they start; the ready line comes after the first one. Three
    // sockets must end up listening on the one address.
    let ss = keelson_testkit::require("ss", "iproute2").expect("ss is needed: apt-get install -y iproute2");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let out = Command::new(&ss).args(["-Hltn", &format!("sport = :{}", listen.port())]).output().expect("ss runs");
        let sockets = String::from_utf8_lossy(&out.stdout).lines().count();
        if sockets == 3 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{sockets} sockets listen on {listen}, want 3 (one per worker)");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_status(listen, "one.test", 200).await;
    for _ in 0..30 {
        assert_eq!(get(listen, "one.test", "/").await.expect("response").status, 200);
    }
    let m = get(metrics, "m.test", "/metrics").await.expect("metrics").body;
    let count = m
        .lines()
        .find(|l| l.starts_with(r#"keelson_proxy_requests_total{route="one.test",code="2xx"}"#))
        .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .expect("request counter");
    assert!(count >= 31, "metrics counted {count} of at least 31 requests:\n{m}");
    stop_edge(child);
}

/// `--acme-*`: edge gets its certificate from a real ACME CA (pebble, resolving the name
/// with keelson's DNS server), answering the HTTP-01 challenge on its own listener, and
/// serves it on the TLS listener; restarted on the same state, it serves the stored one
/// without asking the CA again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_gets_its_certificate_from_an_acme_ca() {
    let (dns, _held) = names_at_loopback(&["shop"]).await;
    let ports = keelson_testkit::free_ports(2).expect("ports");
    let (listen, tls_listen) = (format!("127.0.0.1:{}", ports[0]), format!("127.0.0.1:{}", ports[1]));
    let pebble = keelson_testkit::pebble::Pebble::start(ports[0], dns.local_addr(), 5).expect("pebble");
    let dir = tempfile::tempdir().expect("dir");
    let routes_file = dir.path().join("routes.json");
    std::fs::write(&routes_file, routes(&[])).expect("routes");
    let state = dir.path().join("acme");
    let ca = pebble.ca_file.to_str().expect("utf8").to_owned();
    let directory = pebble.directory.clone();
    let args = [
        "--routes",
        routes_file.to_str().expect("utf8"),
        "--listen",
        &listen,
        "--tls-listen",
        &tls_listen,
        "--acme-directory",
        &directory,
        "--acme-domain",
        "shop.service.keelson.test",
        "--acme-state",
        state.to_str().expect("utf8"),
        "--acme-ca-file",
        &ca,
    ];
    let root = pebble.issuing_root_cert().expect("root");
    let tls_addr: SocketAddr = tls_listen.parse().expect("addr");
    let verified = |limit: Duration| {
        let root = root.clone();
        async move {
            let deadline = tokio::time::Instant::now() + limit;
            loop {
                match keelson_testkit::tls::handshake(tls_addr, "shop.service.keelson.test", &[&root]).await {
                    Ok(_) => return true,
                    Err(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(_) => return false,
                }
            }
        }
    };
    let (edge, _out) = start_edge(&args);
    assert!(verified(Duration::from_secs(30)).await, "no certificate from the CA\npebble:\n{}", pebble.log());
    stop_edge(edge);
    let issued = std::fs::read(state.join("certs/shop.service.keelson.test.crt")).expect("stored");

    // Restarted: the stored certificate, at once, with no new order.
    drop(pebble);
    let (edge, _out) = start_edge(&args);
    assert!(verified(Duration::from_secs(10)).await, "the stored certificate is served with the CA gone");
    stop_edge(edge);
    assert_eq!(std::fs::read(state.join("certs/shop.service.keelson.test.crt")).expect("stored"), issued, "not issued again");
}

/// A keelson DNS server answering `<service>.service.keelson.test` with 127.0.0.1 for
/// each of `services` (what pebble resolves the names it validates with); the handles
/// keep the names registered.
async fn names_at_loopback(services: &[&str]) -> (keelson_discovery::DnsServer, Vec<keelson_discovery::RegistrationHandle>) {
    use keelson_discovery::{Discovery, DnsServer, DnsServerConfig, MemoryDiscovery, Registration, ServiceName};
    let discovery = Arc::new(MemoryDiscovery::memory());
    let mut held = Vec::new();
    for service in services {
        held.push(
            discovery.register(Registration::new(ServiceName::new(*service).expect("name"), "i1", "127.0.0.1", 80)).await.expect("reg"),
        );
    }
    let mut dns_config = DnsServerConfig::default();
    dns_config.domain = "keelson.test".into();
    dns_config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    (DnsServer::start(discovery as Arc<dyn Discovery>, dns_config).await.expect("dns"), held)
}

/// `--acme-routed-domain`: each routed host under the domain gets its certificate as its
/// route appears (a reloaded routes file here; the catalog works the same); a routed host
/// outside the domain is never sent to the CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_gets_certificates_for_routed_names_under_its_domain_as_they_appear() {
    let (dns, _held) = names_at_loopback(&["shop", "blog"]).await;
    let ports = keelson_testkit::free_ports(2).expect("ports");
    let (listen, tls_listen) = (format!("127.0.0.1:{}", ports[0]), format!("127.0.0.1:{}", ports[1]));
    let pebble = keelson_testkit::pebble::Pebble::start(ports[0], dns.local_addr(), 5).expect("pebble");
    let dir = tempfile::tempdir().expect("dir");
    let routes_file = dir.path().join("routes.json");
    let upstream: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    std::fs::write(&routes_file, routes(&[("shop.service.keelson.test", upstream), ("elsewhere.test", upstream)])).expect("routes");
    let state = dir.path().join("acme");
    let args = [
        "--routes",
        routes_file.to_str().expect("utf8"),
        "--listen",
        &listen,
        "--tls-listen",
        &tls_listen,
        "--acme-directory",
        &pebble.directory,
        "--acme-routed-domain",
        "service.keelson.test",
        "--acme-state",
        state.to_str().expect("utf8"),
        "--acme-ca-file",
        pebble.ca_file.to_str().expect("utf8"),
    ];
    let root = pebble.issuing_root_cert().expect("root");
    let tls_addr: SocketAddr = tls_listen.parse().expect("addr");
    let verified = |name: &'static str, limit: Duration| {
        let root = root.clone();
        async move {
            let deadline = tokio::time::Instant::now() + limit;
            loop {
                match keelson_testkit::tls::handshake(tls_addr, name, &[&root]).await {
                    Ok(_) => return true,
                    Err(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(_) => return false,
                }
            }
        }
    };
    struct Edge(Option<Child>);
    impl Drop for Edge {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let (child, _out) = start_edge(&args);
    let mut edge = Edge(Some(child));
    assert!(verified("shop.service.keelson.test", Duration::from_secs(30)).await, "no certificate for shop\npebble:\n{}", pebble.log());
    // A new route under the domain: its certificate follows.
    std::fs::write(
        &routes_file,
        routes(&[("shop.service.keelson.test", upstream), ("blog.service.keelson.test", upstream), ("elsewhere.test", upstream)]),
    )
    .expect("routes");
    signal(edge.0.as_ref().expect("edge"), Signal::SIGHUP);
    assert!(verified("blog.service.keelson.test", Duration::from_secs(30)).await, "no certificate for blog\npebble:\n{}", pebble.log());
    stop_edge(edge.0.take().expect("edge"));
    let certs: Vec<String> =
        std::fs::read_dir(state.join("certs")).expect("certs").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(certs.iter().all(|c| !c.contains("elsewhere")), "a name outside the domain was ordered: {certs:?}");
    assert!(!pebble.log().contains("elsewhere.test"), "the CA heard of a name outside the domain");
}
