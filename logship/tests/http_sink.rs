//! The HTTP sink against a local server that parses what it gets: NDJSON passes sink
//! conformance; Loki and Elasticsearch bodies have their APIs' shape; statuses decide
//! retries; the token is sent and never shown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keelson_logship::{conformance, ship, HttpFormat, HttpSink, HttpSinkConfig, Labels, Record, ShipConfig, Sink, Stream, StreamSource};

#[derive(Debug, Clone)]
struct Got {
    auth: Option<String>,
    content_type: Option<String>,
    body: String,
}

/// A server that keeps every request and answers the scripted statuses in turn (then
/// 200), with `answer` as the body.
#[derive(Clone, Default)]
struct Server {
    got: Arc<Mutex<Vec<Got>>>,
    script: Arc<Mutex<Vec<u16>>>,
    answer: Arc<Mutex<String>>,
}

impl Server {
    async fn start(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let server = server.clone();
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let server = server.clone();
                    async move {
                        let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
                        let (auth, content_type) = (header("authorization"), header("content-type"));
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let status = {
                            let mut script = server.script.lock().expect("lock");
                            if script.is_empty() {
                                200
                            } else {
                                script.remove(0)
                            }
                        };
                        if status == 200 {
                            server.got.lock().expect("lock").push(Got {
                                auth,
                                content_type,
                                body: String::from_utf8_lossy(&body).into_owned(),
                            });
                        }
                        let answer = server.answer.lock().expect("lock").clone();
                        Ok::<_, Infallible>(
                            hyper::Response::builder().status(status).body(Full::new(Bytes::from(answer))).expect("response"),
                        )
                    }
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service));
            }
        });
        addr
    }

    fn bodies(&self) -> Vec<Got> {
        self.got.lock().expect("lock").clone()
    }
}

fn sink(addr: SocketAddr, format: HttpFormat) -> HttpSink {
    let mut config = HttpSinkConfig::new(format!("http://{addr}/push"), format);
    config.bearer_token = Some("t0ken-s3cret".into());
    config.timeout = Duration::from_secs(5);
    HttpSink::new(config).expect("sink")
}

#[tokio::test]
async fn ndjson_passes_sink_conformance_with_the_token() {
    let server = Server::default();
    let addr = server.start().await;
    let s = sink(addr, HttpFormat::Ndjson);
    assert!(!format!("{s:?}").contains("t0ken-s3cret"), "the token never shows");
    assert_eq!(s.capabilities().acknowledgement, keelson_logship::Acknowledgement::Stored);
    let read_back = |service: &str| -> Vec<Record> {
        server
            .bodies()
            .iter()
            .flat_map(|g| g.body.lines().map(|l| Record::from_json(l).expect("NDJSON record")).collect::<Vec<_>>())
            .filter(|r| r.service() == service)
            .collect()
    };
    conformance::sink_all(&s, &read_back).await;
    let got = server.bodies();
    assert!(got
        .iter()
        .all(|g| g.auth.as_deref() == Some("Bearer t0ken-s3cret") && g.content_type.as_deref() == Some("application/x-ndjson")));
}

fn sample() -> Vec<Record> {
    let web = Arc::new(Labels::new("web", "web-1").with_container("c0ffee").with_node("n1"));
    let db = Arc::new(Labels::new("db", "db-1"));
    vec![Record::new(web.clone(), Stream::Stdout, "a"), Record::new(db, Stream::Stderr, "b"), Record::new(web, Stream::Stdout, "c")]
}

#[tokio::test]
async fn loki_push_groups_records_into_streams() {
    let server = Server::default();
    let addr = server.start().await;
    sink(addr, HttpFormat::Loki).send(&sample()).await.expect("send");
    let body: serde_json::Value = serde_json::from_str(&server.bodies()[0].body).expect("JSON");
    let streams = body["streams"].as_array().expect("streams");
    assert_eq!(streams.len(), 2, "{body}");
    assert_eq!(streams[0]["stream"], serde_json::json!({"service": "web", "instance": "web-1", "node": "n1", "stream": "stdout"}));
    let values = streams[0]["values"].as_array().expect("values");
    assert_eq!(values.len(), 2);
    assert!(values[0][0].as_str().expect("ts").parse::<u128>().is_ok(), "nanoseconds as a string");
    assert_eq!(values[0][1], "a");
    assert_eq!(values[0][2]["container"], "c0ffee", "structured metadata");
    assert_eq!(streams[1]["values"][0].as_array().expect("value").len(), 2, "no metadata, no third element");
}

#[tokio::test]
async fn elasticsearch_bulk_creates_and_counts_item_errors() {
    let server = Server::default();
    let addr = server.start().await;
    *server.answer.lock().expect("lock") =
        r#"{"errors":true,"items":[{"create":{"status":201}},{"create":{"status":400,"error":{"type":"mapper_parsing_exception"}}},{"create":{"status":201}}]}"#.into();
    let s = sink(addr, HttpFormat::ElasticsearchBulk { index: "logs-app".into() });
    s.send(&sample()).await.expect("a bulk with a permanent item error is acknowledged");
    assert_eq!(s.rejected(), 1);
    let body = server.bodies()[0].body.clone();
    let lines: Vec<serde_json::Value> = body.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(lines[0], serde_json::json!({"create": {"_index": "logs-app"}}));
    assert_eq!(lines[1]["line"], "a");
    assert!(lines[1]["@timestamp"].is_string());
    *server.answer.lock().expect("lock") = r#"{"errors":true,"items":[{"create":{"status":429}}]}"#.into();
    let err = s.send(&sample()[..1]).await.expect_err("429 items send the batch again");
    assert!(err.is_retryable(), "{err}");
}

#[tokio::test]
async fn statuses_decide_what_is_retried() {
    let server = Server::default();
    let addr = server.start().await;
    *server.script.lock().expect("lock") = vec![503, 429];
    let s = sink(addr, HttpFormat::Ndjson);
    let mut config = ShipConfig::default();
    config.backoff = Duration::from_millis(5);
    let records: Vec<Record> = (0..10).map(|i| Record::now("r", "1", Stream::Stdout, format!("{i}"))).collect();
    let stats =
        ship(&mut StreamSource::new(futures::stream::iter(records)), &s, &config).await.expect("delivered after two retryable answers");
    assert_eq!((stats.records, stats.retries), (10, 2));
    assert_eq!(server.bodies().len(), 1, "one acknowledged request");

    *server.script.lock().expect("lock") = vec![400];
    let err = s.send(&sample()).await.expect_err("400");
    assert!(!err.is_retryable() && err.to_string().contains("400"), "{err}");
    let refused = HttpSink::new(HttpSinkConfig::new("ftp://x/y", HttpFormat::Ndjson)).expect_err("scheme");
    assert!(refused.to_string().contains("ftp://x/y"), "{refused}");
    // Nobody listening: retryable.
    let port = keelson_testkit::free_port().expect("port");
    let err = sink(SocketAddr::from(([127, 0, 0, 1], port)), HttpFormat::Ndjson).send(&sample()).await.expect_err("refused");
    assert!(err.is_retryable(), "{err}");
}
