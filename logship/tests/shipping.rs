//! The file sink passes conformance; shipping from a real child process; retries.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keelson_logship::{conformance, ship, ChildOutputSource, Error, FileSink, Record, ShipConfig, Sink, Stream, StreamSource};

fn read_records(path: &std::path::Path) -> Vec<Record> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| Record::from_json(l).expect("every line is a record")).collect()
}

#[tokio::test]
async fn file_sink_passes_conformance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = FileSink::new(dir.path()).expect("sink");
    assert_eq!(sink.capabilities().acknowledgement, keelson_logship::Acknowledgement::Durable);
    let root = dir.path().to_owned();
    conformance::sink_all(&sink, &move |service| read_records(&root.join(format!("{service}.log")))).await;
}

#[tokio::test]
async fn ships_every_line_of_a_child_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = tokio::process::Command::new("/bin/sh")
        .args(["-c", "i=0; while [ $i -lt 1000 ]; do echo out-$i; echo err-$i >&2; i=$((i+1)); done"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut source = ChildOutputSource::new("chatty", "c-1", child.stdout.take().expect("stdout"), child.stderr.take().expect("stderr"));
    let sink = FileSink::new(dir.path()).expect("sink");
    let stats = ship(&mut source, &sink, &{
        let mut built = ShipConfig::default();
        built.max_batch = 64;
        built
    })
    .await
    .expect("ship");
    assert_eq!(stats.records, 2000);
    let records = read_records(&dir.path().join("chatty.log"));
    let outs: Vec<&str> = records.iter().filter(|r| r.stream == Stream::Stdout).map(|r| r.line.as_str()).collect();
    let expected: Vec<String> = (0..1000).map(|i| format!("out-{i}")).collect();
    assert_eq!(outs, expected, "stdout complete and in order");
    assert_eq!(records.iter().filter(|r| r.stream == Stream::Stderr).count(), 1000);
    assert!(records.iter().all(|r| r.service() == "chatty" && r.instance() == "c-1"));
    let _ = child.wait().await;
}

/// Fails the first `fail` sends with a retryable error, then accepts.
#[derive(Debug, Default)]
struct Flaky {
    fail: u32,
    calls: AtomicU32,
    got: std::sync::Mutex<Vec<Record>>,
}

#[async_trait]
impl Sink for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    async fn send(&self, batch: &[Record]) -> keelson_logship::Result<()> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail {
            return Err(Error::Io { context: "flaky".into(), source: std::io::Error::other("down") });
        }
        self.got.lock().expect("lock").extend_from_slice(batch);
        Ok(())
    }
    async fn flush(&self) -> keelson_logship::Result<()> {
        Ok(())
    }
}

fn records(n: usize) -> StreamSource {
    StreamSource::new(futures::stream::iter((0..n).map(|i| Record::now("s", "i", Stream::Stdout, format!("{i}")))))
}

#[tokio::test]
async fn retryable_sink_errors_resend_the_same_batch() {
    let sink = Flaky { fail: 2, ..Flaky::default() };
    let config = {
        let mut built = ShipConfig::default();
        built.max_batch = 10;
        built.backoff = Duration::from_millis(1);
        built
    };
    let stats = ship(&mut records(25), &sink, &config).await.expect("ship");
    assert_eq!((stats.records, stats.batches, stats.retries), (25, 3, 2));
    let got: Vec<String> = sink.got.lock().expect("lock").iter().map(|r| r.line.clone()).collect();
    assert_eq!(got, (0..25).map(|i| i.to_string()).collect::<Vec<_>>(), "nothing lost, nothing duplicated");
}

#[tokio::test]
async fn a_sink_that_stays_down_stops_shipping_with_its_error() {
    let sink = Flaky { fail: u32::MAX, ..Flaky::default() };
    let config = {
        let mut built = ShipConfig::default();
        built.attempts = 3;
        built.backoff = Duration::from_millis(1);
        built
    };
    let err = ship(&mut records(5), &sink, &config).await.expect_err("gives up");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert_eq!(sink.calls.load(Ordering::SeqCst), 3);
    assert!(matches!(
        ship(&mut records(1), &sink, &{
            let mut built = ShipConfig::default();
            built.max_batch = 0;
            built
        })
        .await,
        Err(Error::InvalidInput { .. })
    ));
}

/// A sink down for longer than a run's attempts: the run fails, holding what it read;
/// the next run delivers it first. Every record arrives once, in order.
#[tokio::test]
async fn records_read_before_a_sink_outage_are_held_and_delivered_in_order() {
    let sink = Flaky { fail: 5, ..Flaky::default() };
    // Three attempts per run, so the outage of 5 sends outlasts the first run.
    let config = {
        let mut built = ShipConfig::default();
        built.max_batch = 10;
        built.attempts = 3;
        built.backoff = Duration::from_millis(1);
        built
    };
    let mut shipper = keelson_logship::Shipper::new(config).expect("config");
    let mut source = records(25);
    let first = shipper.run(&mut source, &sink).await;
    assert!(matches!(first, Err(Error::Io { .. })), "the outage outlasts the first run: {first:?}");
    let held: Vec<String> = shipper.held().map(|r| r.line.clone()).collect();
    assert_eq!(held, (0..20).map(|i| i.to_string()).collect::<Vec<_>>(), "the batch in delivery and the one read ahead are held");
    assert!(sink.got.lock().expect("lock").is_empty());
    let stats = shipper.run(&mut source, &sink).await.expect("the sink is back");
    assert_eq!((stats.records, stats.batches, stats.retries), (25, 3, 4), "2 retries per run, then every batch");
    assert_eq!(shipper.held().count(), 0);
    let got: Vec<String> = sink.got.lock().expect("lock").iter().map(|r| r.line.clone()).collect();
    assert_eq!(got, (0..25).map(|i| i.to_string()).collect::<Vec<_>>(), "every record, once, in order");
}

/// The pause between attempts grows, is jittered, and never passes its cap (plus its
/// jitter, at most as much again).
#[test]
fn retry_pauses_grow_with_jitter_up_to_a_cap() {
    let config = {
        let mut built = ShipConfig::default();
        built.backoff = Duration::from_millis(20);
        built.max_backoff = Duration::from_millis(500);
        built
    };
    let pauses: Vec<Duration> = config.pauses().take(12).collect();
    assert!(pauses.iter().all(|p| *p >= Duration::from_millis(20) && *p <= Duration::from_millis(1_000)), "{pauses:?}");
    assert!(pauses[6..].iter().all(|p| *p >= Duration::from_millis(500)), "capped at 500 ms before jitter: {pauses:?}");
    let again: Vec<Duration> = config.pauses().take(12).collect();
    assert_ne!(pauses, again, "two shippers do not pause in lock step");
}

#[tokio::test]
async fn the_sources_pass_source_conformance() {
    let expected: Vec<Record> = (0..50)
        .map(|i| Record::now("conf-svc", "i1", if i % 3 == 0 { Stream::Stderr } else { Stream::Stdout }, format!("line {i}")))
        .collect();
    let text = |stream: Stream| -> Vec<u8> {
        expected.iter().filter(|r| r.stream == stream).flat_map(|r| format!("{}\n", r.line).into_bytes()).collect()
    };
    let mut child =
        ChildOutputSource::new("conf-svc", "i1", std::io::Cursor::new(text(Stream::Stdout)), std::io::Cursor::new(text(Stream::Stderr)));
    conformance::source_all(&mut child, &expected).await;
    let mut stream = StreamSource::new(futures::stream::iter(expected.clone()));
    conformance::source_all(&mut stream, &expected).await;
}
