//! `logd` and the platform's logs: the server refuses to start without a token, refuses
//! pushes without it, names bad lines, answers queries by service, instance and time; and
//! end to end, a job deployed through `keelson-ctl` on a `node-agent` shipping to logd
//! shows its output in `keelson-ctl logs`, including lines written while logd restarted.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_logship::{HttpFormat, HttpSink, HttpSinkConfig, Labels, Record, Sink, Stream};

const TOKEN: &str = "logd-test-token-0123456789";

/// A logd process, killed on drop.
struct Logd {
    child: Child,
    addr: SocketAddr,
}

impl Logd {
    fn start(dir: &std::path::Path, addr: SocketAddr) -> Logd {
        Logd::start_with(dir, addr, &[])
    }

    fn start_with(dir: &std::path::Path, addr: SocketAddr, extra: &[&std::ffi::OsStr]) -> Logd {
        let token_file = dir.join("token");
        std::fs::write(&token_file, TOKEN).expect("token file");
        let child = Command::new(env!("CARGO_BIN_EXE_logd"))
            .arg("--dir")
            .arg(dir.join("logs"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--token-file")
            .arg(&token_file)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("logd starts");
        keelson_testkit::wait_for_tcp(addr, Duration::from_secs(10)).expect("logd listens");
        Logd { child, addr }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Logd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], keelson_testkit::free_port().expect("port")))
}

fn sink(addr: SocketAddr, token: Option<&str>) -> HttpSink {
    let mut config = HttpSinkConfig::new(format!("http://{addr}/v1/push"), HttpFormat::Ndjson);
    config.bearer_token = token.map(str::to_owned);
    HttpSink::new(config).expect("sink")
}

async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.as_deref().map(|a| vec![("authorization", a)]).unwrap_or_default();
    let reply = keelson_testkit::http::request(addr, "GET", "logd", path, &headers).await.expect("request");
    (reply.status, reply.body)
}

#[tokio::test]
async fn logd_needs_a_token_stores_pushes_and_answers_queries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_logd")).arg("--dir").arg(dir.path()).output().expect("logd runs");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("token"), "no token, no start");

    let logd = Logd::start(dir.path(), free_addr());
    let web1 = Arc::new(Labels::new("shop.web", "t-1"));
    let web2 = Arc::new(Labels::new("shop.web", "t-2"));
    let db = Arc::new(Labels::new("shop.db", "t-3"));
    let batch = vec![
        Record::new(web1.clone(), Stream::Stdout, "w1 first"),
        Record::new(db, Stream::Stderr, "db only"),
        Record::new(web2, Stream::Stdout, "w2"),
        Record::new(web1, Stream::Stdout, "w1 second"),
    ];
    let err = sink(logd.addr, None).send(&batch).await.expect_err("no token");
    assert!(err.to_string().contains("401"), "{err}");
    let err = sink(logd.addr, Some("wrong-token-wrong-token")).send(&batch).await.expect_err("wrong token");
    assert!(err.to_string().contains("401"), "{err}");
    sink(logd.addr, Some(TOKEN)).send(&batch).await.expect("stored");

    let lines = |body: &str| body.lines().map(|l| Record::from_json(l).expect("NDJSON").line).collect::<Vec<_>>();
    let (status, body) = get(logd.addr, "/v1/logs?service=shop.web", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(lines(&body), ["w1 first", "w2", "w1 second"]);
    let (_, body) = get(logd.addr, "/v1/logs?service=shop.*&instance=t-1&tail=1", Some(TOKEN)).await;
    assert_eq!(lines(&body), ["w1 second"]);
    let (_, body) = get(logd.addr, "/v1/logs?service=shop.*", Some(TOKEN)).await;
    assert_eq!(lines(&body).len(), 4, "every group of the job");
    let (status, body) = get(logd.addr, "/v1/logs?service=shop.web&since=2099-01-01T00:00:00Z", Some(TOKEN)).await;
    assert_eq!((status, body.as_str()), (200, ""), "nothing that new");
    let (status, _) = get(logd.addr, "/v1/logs?service=shop.web", None).await;
    assert_eq!(status, 401, "queries need the token too");
    let (status, body) = get(logd.addr, "/v1/logs?service=../etc", Some(TOKEN)).await;
    assert!(status == 400 && body.contains("../etc"), "{status} {body}");
    let (status, _) = get(logd.addr, "/healthz", None).await;
    assert_eq!(status, 200);

    // A bad line is named; nothing of that push is stored.
    let reply = keelson_testkit::http::request_with_body(
        logd.addr,
        "POST",
        "/v1/push",
        &[("authorization", &format!("Bearer {TOKEN}"))],
        format!("{}not json\n", batch[0].to_json_line()).into_bytes(),
    )
    .await
    .expect("push");
    assert!(reply.status == 400 && reply.body.contains("line 2"), "{} {}", reply.status, reply.body);
    let (_, body) = get(logd.addr, "/v1/logs?service=shop.web", Some(TOKEN)).await;
    assert_eq!(lines(&body).len(), 3);
}

/// A syslog client config trusting `ca`, presenting `client` if given.
fn syslog_tls(ca: &keelson_testkit::tls::TestCa, client: Option<&keelson_testkit::tls::TestCert>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    Arc::new(match client {
        Some(c) => {
            let chain =
                rustls::pki_types::CertificateDer::pem_slice_iter(c.chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>().expect("chain");
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).expect("key");
            builder.with_client_auth_cert(chain, key).expect("client auth")
        }
        None => builder.with_no_client_auth(),
    })
}

#[tokio::test]
async fn syslog_over_mutual_tls_reaches_queries_and_strangers_are_refused() {
    use keelson_logship::{SyslogSink, SyslogSinkConfig, SyslogTransport};
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = keelson_testkit::tls::TestCa::new("logd test CA").expect("CA");
    let other_ca = keelson_testkit::tls::TestCa::new("someone else").expect("CA");
    let server = ca.issue("logd", &["logd.test"]).expect("server cert");
    let agent = ca.issue("agent-1", &["agent-1.test"]).expect("client cert");
    let stranger = other_ca.issue("stranger", &["stranger.test"]).expect("client cert");
    let files = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let (cert, key, client_ca) =
        (files("server.pem", &server.chain_pem), files("server.key", &server.key_pem), files("ca.pem", &ca.cert_pem));
    let (http, syslog) = (free_addr(), free_addr());
    let syslog_text = syslog.to_string();
    let flags: Vec<&std::ffi::OsStr> = vec![
        "--syslog-listen".as_ref(),
        syslog_text.as_ref(),
        "--syslog-tls-cert".as_ref(),
        cert.as_os_str(),
        "--syslog-tls-key".as_ref(),
        key.as_os_str(),
        "--syslog-client-ca".as_ref(),
        client_ca.as_os_str(),
    ];
    let _logd = Logd::start_with(dir.path(), http, &flags);
    keelson_testkit::wait_for_tcp(syslog, Duration::from_secs(10)).expect("syslog listens");
    let send = |client: Option<&keelson_testkit::tls::TestCert>, service: &str| {
        let transport = SyslogTransport::Tls { addr: syslog.to_string(), server_name: "logd.test".into(), config: syslog_tls(&ca, client) };
        let sink = SyslogSink::new(SyslogSinkConfig::new(transport)).expect("sink");
        let batch: Vec<Record> = (0..3).map(|i| Record::now(service, "s-1", Stream::Stdout, format!("{service} {i}"))).collect();
        async move {
            match sink.send(&batch).await {
                Ok(()) => sink.flush().await,
                Err(e) => Err(e),
            }
        }
    };
    send(Some(&agent), "sys.app").await.expect("the agent's certificate is accepted");
    let _ = send(Some(&stranger), "sys.stranger").await;
    let _ = send(None, "sys.anonymous").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let (status, body) = get(http, "/v1/logs?service=sys.*", Some(TOKEN)).await;
        assert_eq!(status, 200, "{body}");
        let lines: Vec<String> = body.lines().map(|l| Record::from_json(l).expect("NDJSON").line).collect();
        if lines.len() >= 3 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, body) = get(http, "/v1/logs?service=sys.*", Some(TOKEN)).await;
    assert_eq!(lines, ["sys.app 0", "sys.app 1", "sys.app 2"]);
    assert_eq!(body.lines().count(), 3, "nothing from a certificate of another CA or from no certificate: {body}");
}

#[cfg(all(feature = "etcd", feature = "docker"))]
mod end_to_end {
    use super::*;
    use keelson_scheduler::NODE_LABEL;

    /// A node agent, killed on drop with its node's containers.
    struct Agent {
        node: String,
        child: Child,
    }

    impl Drop for Agent {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            keelson_testkit::docker::remove_containers(&[&format!("label={NODE_LABEL}={}", self.node)]);
        }
    }

    fn ctl(args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_keelson-ctl")).args(args).output().expect("keelson-ctl runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The numbers of the `line N` records `keelson-ctl logs` prints for job `chat`.
    fn printed(logd: SocketAddr, token_file: &std::path::Path) -> Vec<u64> {
        let (code, out, err) =
            ctl(&["logs", "chat", "--logd", &format!("http://{logd}"), "--token-file", token_file.to_str().expect("utf-8")]);
        assert_eq!(code, 0, "{err}");
        out.lines().filter_map(|l| l.rsplit_once("line ").and_then(|(_, n)| n.trim().parse().ok())).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_jobs_output_reaches_keelson_ctl_logs_across_a_logd_restart() {
        let image = keelson_testkit::docker::busybox_image().unwrap_or_else(|e| panic!("the busybox test image: {e}"));
        let etcd = keelson_testkit::etcd::Etcd::start().unwrap_or_else(|e| panic!("etcd for this test: {e}"));
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = free_addr();
        let mut logd = Logd::start(dir.path(), addr);
        let token_file = dir.path().join("token");
        let node = format!("logs-{}", std::process::id());
        let _agent = Agent {
            child: Command::new(env!("CARGO_BIN_EXE_node-agent"))
                .args([
                    "--etcd",
                    &etcd.client_url(),
                    "--node",
                    &node,
                    "--cpu",
                    "4000",
                    "--memory",
                    "4096",
                    "--ttl",
                    "2s",
                    "--interval",
                    "200ms",
                    "--address",
                    "127.0.0.1",
                ])
                .args(["--ports", "27600-27649", "--logs-to", &format!("http://{addr}/v1/push")])
                .arg("--logs-token-file")
                .arg(&token_file)
                .stdout(Stdio::null())
                .stderr(Stdio::from(std::fs::File::create(dir.path().join("agent.log")).expect("agent log")))
                .spawn()
                .expect("node-agent starts"),
            node: node.clone(),
        };
        let spec = serde_json::json!({
            "group": {
                "desired": {"job": "chat", "group": "say", "version": 1, "count": 1, "resources": {"cpu_millis": 100, "memory_mb": 32}, "ports": 0, "volumes": []},
                "task": {"image": image, "command": ["/bin/sh", "-c", "i=0; while true; do echo \"line $i\"; i=$((i+1)); sleep 0.1; done"]},
                "service": null
            }
        });
        let file = dir.path().join("chat.json");
        std::fs::write(&file, spec.to_string()).expect("deploy file");
        let (code, _, err) = ctl(&["--etcd", &etcd.client_url(), "deploy", file.to_str().expect("utf-8")]);
        assert_eq!(code, 0, "{err}");

        let wait_for = |want: u64, limit: Duration| {
            let deadline = Instant::now() + limit;
            loop {
                let got = printed(addr, &token_file);
                if got.iter().any(|n| *n >= want) {
                    return got;
                }
                if Instant::now() >= deadline {
                    let agent = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
                    panic!("line {want} never showed; last: {:?}; the agent said:\n{agent}", got.last());
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        };
        let before = wait_for(5, Duration::from_secs(90));
        // logd goes away for 3 s (about 30 lines), and comes back on the same port and files.
        logd.kill();
        let last_before = *before.last().expect("lines");
        std::thread::sleep(Duration::from_secs(3));
        let _logd = Logd::start(dir.path(), addr);
        let after = wait_for(last_before + 40, Duration::from_secs(60));
        let mut sorted = after.clone();
        sorted.sort_unstable();
        sorted.dedup();
        let top = *sorted.last().expect("lines");
        let missing: Vec<u64> = (0..=top).filter(|n| sorted.binary_search(n).is_err()).collect();
        assert!(missing.is_empty(), "lines missing after logd's restart: {missing:?}");
        assert!(top > last_before + 30, "lines written while logd was down arrived");

        // --follow streams what comes next.
        let mut follow = Command::new(env!("CARGO_BIN_EXE_keelson-ctl"))
            .args(["logs", "chat", "say", "--follow", "--tail", "1", "--logd", &format!("http://{addr}")])
            .arg("--token-file")
            .arg(&token_file)
            .stdout(Stdio::piped())
            .spawn()
            .expect("keelson-ctl logs --follow");
        let stdout = follow.stdout.take().expect("stdout");
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            let mut seen = Vec::new();
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(n) = line.rsplit_once("line ").and_then(|(_, n)| n.trim().parse::<u64>().ok()) {
                    seen.push(n);
                    if seen.len() >= 10 {
                        break;
                    }
                }
            }
            seen
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = follow.kill();
        let _ = follow.wait();
        let seen = reader.join().expect("reader");
        assert_eq!(seen.len(), 10, "ten lines followed: {seen:?}");
        assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "in order, none missing: {seen:?}");
        assert!(seen[9] > top, "new lines, not only the history");
    }
}
