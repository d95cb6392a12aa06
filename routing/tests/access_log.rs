//! The access log: one JSON line per request with the route and upstream, written off
//! the request path; a writer that falls behind costs records (counted), not latency.

use std::sync::Arc;
use std::time::Duration;

use keelson_routing::{AccessLog, AccessRecord, Endpoint, Host, MemoryRouter, Proxy, ProxyConfig, Route, RouteChange, Router};
use keelson_testkit::http::{echo_server, get};

#[tokio::test]
async fn every_request_becomes_one_json_line() {
    let (up, _t) = echo_server("up").await.expect("echo");
    let router = Arc::new(MemoryRouter::new());
    router
        .apply(vec![RouteChange::Upsert(Route::new(Host::new("log.test").expect("host"), vec![Endpoint::new("u", up)]))])
        .await
        .expect("apply");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let (log, _writer) = AccessLog::to_file(&path, 1024).await.expect("log");
    let proxy = Arc::new(Proxy::new(router, ProxyConfig::default()).with_access_log(log.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(proxy.serve(listener, std::future::pending()));

    assert_eq!(get(addr, "log.test", "/a?b=c").await.expect("get").status, 200);
    assert_eq!(get(addr, "nowhere.test", "/").await.expect("get").status, 404);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let lines = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().count() >= 2 {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "access log has {:?}", text);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let records: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).expect("a JSON object per line")).collect();
    assert_eq!(records.len(), 2, "{lines}");
    let ok = &records[0];
    assert_eq!((ok["host"].as_str(), ok["target"].as_str(), ok["status"].as_u64()), (Some("log.test"), Some("/a?b=c"), Some(200)));
    assert_eq!((ok["method"].as_str(), ok["protocol"].as_str(), ok["route"].as_str()), (Some("GET"), Some("HTTP/1.1"), Some("log.test")));
    assert_eq!(ok["upstream"].as_str(), Some(up.to_string().as_str()));
    assert!(ok["time"].as_str().is_some_and(|t| t.ends_with('Z') && t.len() == 24), "{ok}");
    assert!(ok["duration_us"].as_u64().is_some());
    let missed = &records[1];
    assert_eq!((missed["status"].as_u64(), missed["route"].is_null(), missed["upstream"].is_null()), (Some(404), true, true));
    assert_eq!(log.dropped(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_stalled_writer_drops_and_counts_records_instead_of_blocking() {
    // The reading half is never read: the writer stalls once its buffers fill.
    let (stalled, _reader) = tokio::io::duplex(16);
    let (log, _writer) = AccessLog::to_writer(stalled, 1);
    let record = AccessRecord {
        time: "2026-11-22T00:00:00.000Z".into(),
        client: "127.0.0.1:1".parse().expect("addr"),
        protocol: "HTTP/1.1".into(),
        method: "GET".into(),
        host: "x.test".into(),
        target: "/".into(),
        status: 200,
        route: None,
        upstream: None,
        duration_us: 1,
    };
    // No await in between: the writer has not run, the queue holds one record.
    for _ in 0..10 {
        log.record(record.clone());
    }
    assert_eq!(log.dropped(), 9);
}
