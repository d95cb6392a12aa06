//! Transforms: JSON parsing, multiline merging, joining pieces, enrichment, filtering;
//! and acknowledgements mapped back through them to a source's checkpoint.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use keelson_logship::transform::{Enrich, Filter, JoinPartial, Multiline, ParseJson, Transform, Transformed};
use keelson_logship::{FileSource, FileSourceConfig, Labels, Record, Source, Stream, StreamSource};

fn records(lines: &[&str]) -> Vec<Record> {
    let labels = Arc::new(Labels::new("app", "1"));
    lines.iter().map(|l| Record::new(labels.clone(), Stream::Stdout, *l)).collect()
}

async fn all(source: &mut dyn Source) -> Vec<Record> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async { while source.read(&mut got, 100).await.expect("read") > 0 {} })
        .await
        .expect("ends");
    got
}

fn lines(rs: &[Record]) -> Vec<&str> {
    rs.iter().map(|r| r.line.as_str()).collect()
}

#[tokio::test]
async fn json_lines_get_fields_and_their_message() {
    let input = records(&[r#"{"msg":"started","port":8080}"#, "plain text", r#"["an","array"]"#]);
    let mut source =
        Transformed::new(StreamSource::new(futures::stream::iter(input)), vec![Box::new(ParseJson::new().message_field("msg"))]);
    let got = all(&mut source).await;
    assert_eq!(lines(&got), ["started", "plain text", r#"["an","array"]"#]);
    assert_eq!(got[0].fields.as_ref().and_then(|f| f.get("port")).and_then(|p| p.as_u64()), Some(8080));
    assert!(got[1].fields.is_none() && got[2].fields.is_none());
}

#[tokio::test]
async fn stack_traces_become_one_record_per_origin() {
    let out = Arc::new(Labels::new("app", "1"));
    let other = Arc::new(Labels::new("app", "2"));
    let mut input = vec![
        Record::new(out.clone(), Stream::Stdout, "Exception in thread main java.lang.IllegalStateException: boom"),
        Record::new(other.clone(), Stream::Stdout, "instance 2 says hi"),
        Record::new(out.clone(), Stream::Stdout, "\tat com.example.App.run(App.java:10)"),
        Record::new(out.clone(), Stream::Stdout, "Caused by: java.io.IOException: disk"),
        Record::new(out.clone(), Stream::Stdout, "\t... 3 more"),
        Record::new(out.clone(), Stream::Stdout, "next line"),
    ];
    input.push(Record::new(other, Stream::Stdout, "\tindented, but another origin's"));
    let mut source = Transformed::new(StreamSource::new(futures::stream::iter(input)), vec![Box::new(Multiline::java())]);
    let got = all(&mut source).await;
    let trace = got.iter().find(|r| r.line.starts_with("Exception")).expect("the trace");
    assert_eq!(trace.line.lines().count(), 4, "{}", trace.line);
    assert!(got.iter().any(|r| r.line == "next line"));
    assert!(got.iter().any(|r| r.line == "instance 2 says hi\n\tindented, but another origin's"), "{:?}", lines(&got));
    assert_eq!(got.len(), 3);

    let limited = Multiline::continues(r"^\s").expect("pattern").limits(2, 1 << 20, Duration::from_secs(1));
    let input = records(&["a", " 1", " 2", " 3"]);
    let mut source = Transformed::new(StreamSource::new(futures::stream::iter(input)), vec![Box::new(limited)]);
    assert_eq!(lines(&all(&mut source).await), ["a\n 1", " 2\n 3"], "at most 2 lines a record");
    assert!(Multiline::starts("(unclosed").expect_err("bad pattern").to_string().contains("(unclosed"));
}

#[tokio::test]
async fn a_held_record_goes_out_after_the_timeout_when_nothing_follows() {
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let mut source = Transformed::new(
        StreamSource::new(rx),
        vec![Box::new(Multiline::continues(r"^\s").expect("pattern").limits(100, 1 << 20, Duration::from_millis(300)))],
    );
    for r in records(&["first", " more"]) {
        tx.unbounded_send(r).expect("send");
    }
    let mut got = Vec::new();
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), source.read(&mut got, 10)).await.expect("released").expect("read");
    assert_eq!(lines(&got), ["first\n more"]);
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn pieces_join_enrich_and_filter() {
    let mut input = records(&["aaaa", "bbbb", "cc", "DEBUG noise", "keep me"]);
    input[0].partial = true;
    input[1].partial = true;
    let chain: Vec<Box<dyn Transform>> = vec![
        Box::new(JoinPartial::new(1 << 20)),
        Box::new(Filter::new(None, Some("^DEBUG")).expect("filter")),
        Box::new(Enrich::new().node("node-1").label("env", "prod")),
    ];
    let mut source = Transformed::new(StreamSource::new(futures::stream::iter(input)), chain);
    let got = all(&mut source).await;
    assert_eq!(lines(&got), ["aaaabbbbcc", "keep me"]);
    assert!(!got[0].partial);
    assert!(got
        .iter()
        .all(|r| r.labels.node.as_deref() == Some("node-1") && r.labels.extra.get("env").map(String::as_str) == Some("prod")));
    assert!(Arc::ptr_eq(&got[0].labels, &got[1].labels), "records of one origin share their labels");
    assert_eq!(source.dropped(), 1, "the filtered line is counted where metrics can read it");
    assert!(Filter::new(Some("[bad"), None).is_err());
}

/// A file read through a merge: acknowledging the merged records advances the file's
/// checkpoint only past lines whose records were all delivered.
#[tokio::test]
async fn acknowledgements_reach_the_checkpoint_through_a_merge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("app.log");
    let mut f = std::fs::File::create(&log).expect("create");
    for i in 0..5 {
        writeln!(f, "event {i}\n  detail {i}a\n  detail {i}b").expect("write");
    }
    drop(f);
    let open = || {
        let mut c = FileSourceConfig::new([log.display().to_string()]);
        c.checkpoints = Some(dir.path().join("cp.json"));
        c.stop_at_eof = true;
        Transformed::new(FileSource::new(c).expect("source"), vec![Box::new(Multiline::continues(r"^\s").expect("pattern"))])
    };
    let mut first = open();
    let got = all(&mut first).await;
    assert_eq!(got.len(), 5);
    assert_eq!(got[1].line, "event 1\n  detail 1a\n  detail 1b");
    first.ack(2).await.expect("ack two merged records");
    drop(first);
    let mut second = open();
    let again = all(&mut second).await;
    assert_eq!(lines(&again), lines(&got[2..]), "resumes after the second merged record, not inside it");
}

/// Remembers the acknowledgements it hears.
#[derive(Debug)]
struct Acks {
    records: Vec<Record>,
    heard: Arc<std::sync::Mutex<Vec<u64>>>,
}

#[async_trait::async_trait]
impl Source for Acks {
    async fn read(&mut self, batch: &mut Vec<Record>, max: usize) -> keelson_logship::Result<usize> {
        let n = max.min(self.records.len());
        batch.extend(self.records.drain(..n));
        Ok(n)
    }

    async fn ack(&mut self, count: u64) -> keelson_logship::Result<()> {
        self.heard.lock().expect("lock").push(count);
        Ok(())
    }
}

#[tokio::test]
async fn filtered_records_are_acknowledged_with_the_delivered_one_before_them() {
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let inner = Acks { records: records(&["keep 1", "DEBUG drop", "DEBUG drop", "keep 2", "DEBUG tail"]), heard: heard.clone() };
    let mut source = Transformed::new(inner, vec![Box::new(Filter::new(None, Some("^DEBUG")).expect("filter"))]);
    let got = all(&mut source).await;
    assert_eq!(lines(&got), ["keep 1", "keep 2"]);
    source.ack(1).await.expect("ack");
    source.ack(2).await.expect("ack");
    // Dropped records need no delivery: each output covers the dropped ones up to the
    // next output's own source record.
    assert_eq!(*heard.lock().expect("lock"), [3, 5], "the first output covers source records 1 to 3, the second 4 and 5");
}
