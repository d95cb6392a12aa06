//! The syslog sink against Debian's rsyslog: TCP, TLS and UDP pass sink conformance; a
//! receiver that crashed gets the unacknowledged batch again; a stalled one holds the
//! acknowledgement back.

use std::sync::Arc;
use std::time::Duration;

use keelson_logship::{conformance, Labels, Record, Sink, Stream, SyslogSink, SyslogSinkConfig, SyslogTransport};
use keelson_testkit::rsyslog::{Received, Rsyslog};

/// What rsyslog received for `service`, as records.
fn read_back(rsyslog: &Rsyslog, service: &str) -> Vec<Record> {
    rsyslog.messages().into_iter().filter(|m| m.app == service).map(to_record).collect()
}

fn to_record(m: Received) -> Record {
    let stream = if m.msgid == "stderr" { Stream::Stderr } else { Stream::Stdout };
    let instance = if m.procid == "-" { String::new() } else { m.procid };
    let mut r = Record::new(Arc::new(Labels::new(m.app, instance)), stream, m.msg);
    r.partial = m.sd.contains("partial=\"true\"");
    r
}

fn tcp(rsyslog: &Rsyslog) -> SyslogSink {
    SyslogSink::new(SyslogSinkConfig::new(SyslogTransport::Tcp(rsyslog.tcp_addr().to_string()))).expect("sink")
}

#[tokio::test]
async fn tcp_to_rsyslog_passes_sink_conformance() {
    let rsyslog = Rsyslog::start().expect("rsyslog");
    let sink = tcp(&rsyslog);
    conformance::sink_all(&sink, &|service| read_back(&rsyslog, service)).await;
    let got = rsyslog.messages();
    assert!(got.iter().all(|m| m.pri == "14" || m.pri == "11"), "user.info for stdout, user.err for stderr: {got:?}");
    assert_eq!(sink.stats().connects, 1, "one connection for every batch");
    assert_eq!(sink.capabilities().acknowledgement, keelson_logship::Acknowledgement::Received);
}

#[tokio::test]
async fn udp_to_rsyslog_passes_sink_conformance() {
    let rsyslog = Rsyslog::start().expect("rsyslog");
    let mut config = SyslogSinkConfig::new(SyslogTransport::Udp(rsyslog.udp_addr().to_string()));
    config.max_datagram = 60 * 1024;
    let sink = SyslogSink::new(config).expect("sink");
    assert_eq!(sink.capabilities().acknowledgement, keelson_logship::Acknowledgement::None, "UDP acknowledges nothing");
    conformance::sink_all(&sink, &|service| read_back(&rsyslog, service)).await;
}

#[tokio::test]
async fn tls_to_rsyslog_passes_sink_conformance() {
    let cert = keelson_testkit::tls::test_cert(&["syslog.test"]).expect("cert");
    let rsyslog = Rsyslog::start_tls(&cert).expect("rsyslog with TLS");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone()).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let transport = SyslogTransport::Tls { addr: rsyslog.tcp_addr().to_string(), server_name: "syslog.test".into(), config: Arc::new(tls) };
    let sink = SyslogSink::new(SyslogSinkConfig::new(transport.clone())).expect("sink");
    conformance::sink_all(&sink, &|service| read_back(&rsyslog, service)).await;

    // A certificate for another name is refused, with an error that says so.
    let SyslogTransport::Tls { addr, config, .. } = transport else { unreachable!() };
    let wrong =
        SyslogSink::new(SyslogSinkConfig::new(SyslogTransport::Tls { addr, server_name: "other.test".into(), config })).expect("sink");
    let err = wrong.send(&[Record::now("x", "y", Stream::Stdout, "z")]).await.expect_err("name mismatch");
    assert!(err.to_string().contains("TLS handshake"), "{err}");
}

#[tokio::test]
async fn long_udp_messages_are_cut_and_counted() {
    let rsyslog = Rsyslog::start().expect("rsyslog");
    let mut config = SyslogSinkConfig::new(SyslogTransport::Udp(rsyslog.udp_addr().to_string()));
    config.max_datagram = 1024;
    let sink = SyslogSink::new(config).expect("sink");
    sink.send(&[Record::now("udp-cut", "i", Stream::Stdout, "w".repeat(4000))]).await.expect("send");
    sink.flush().await.expect("flush");
    assert_eq!(sink.stats().truncated, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while read_back(&rsyslog, "udp-cut").is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = read_back(&rsyslog, "udp-cut");
    assert_eq!(got.len(), 1);
    assert!(got[0].line.len() < 1024 && got[0].line.chars().all(|c| c == 'w'), "{}", got[0].line.len());
    let mut bad = SyslogSinkConfig::new(SyslogTransport::Udp("127.0.0.1:9".into()));
    bad.facility = 24;
    assert!(SyslogSink::new(bad).expect_err("facility").to_string().contains("24"));
}

fn batch(service: &str, from: usize, n: usize) -> Vec<Record> {
    (from..from + n).map(|i| Record::now(service, "i", Stream::Stdout, format!("seq={i}"))).collect()
}

async fn wait_for(rsyslog: &Rsyslog, service: &str, n: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got: Vec<String> = read_back(rsyslog, service).into_iter().map(|r| r.line).collect();
        if got.len() >= n || tokio::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_receiver_that_crashed_gets_the_unacknowledged_batch_again() {
    let mut rsyslog = Rsyslog::start().expect("rsyslog");
    let sink = tcp(&rsyslog);
    sink.send(&batch("crash", 0, 100)).await.expect("send");
    sink.flush().await.expect("acknowledged");
    assert_eq!(wait_for(&rsyslog, "crash", 100).await.len(), 100);
    rsyslog.crash_and_restart().expect("restart");
    // The old connection is dead: this batch may be written into it, but it is never
    // acknowledged there.
    let second = batch("crash", 100, 100);
    let first_try = match sink.send(&second).await {
        Ok(()) => sink.flush().await,
        Err(e) => Err(e),
    };
    let err = first_try.expect_err("a dead connection does not acknowledge");
    assert!(err.is_retryable(), "{err}");
    sink.send(&second).await.expect("resend on a new connection");
    sink.flush().await.expect("acknowledged");
    let got = wait_for(&rsyslog, "crash", 200).await;
    let want: Vec<String> = (0..200).map(|i| format!("seq={i}")).collect();
    assert_eq!(got, want, "every line once, in order");
    assert_eq!(sink.stats().connects, 2);
}

#[tokio::test]
async fn a_stalled_receiver_holds_the_acknowledgement_until_it_reads() {
    let rsyslog = Rsyslog::start().expect("rsyslog");
    let sink = Arc::new(tcp(&rsyslog));
    sink.send(&batch("stall", 0, 10)).await.expect("send");
    sink.flush().await.expect("flush");
    rsyslog.pause(true);
    // Enough to fill the socket buffers of both ends: the send itself waits.
    let big: Vec<Record> = (0..40_000).map(|i| Record::now("stall", "i", Stream::Stdout, format!("seq={i} {}", "p".repeat(400)))).collect();
    let delivering = {
        let sink = sink.clone();
        tokio::spawn(async move {
            sink.send(&big).await?;
            sink.flush().await
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!delivering.is_finished(), "no acknowledgement while the receiver does not read");
    rsyslog.pause(false);
    tokio::time::timeout(Duration::from_secs(30), delivering).await.expect("acknowledged once it reads").expect("task").expect("flush");
    assert_eq!(wait_for(&rsyslog, "stall", 40_010).await.len(), 40_010);
}
