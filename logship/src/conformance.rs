//! Conformance scenarios every `Source` and every `Sink` passes (feature `conformance`).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use crate::{Record, Sink, Source, Stream};

/// What every sink must carry through: service, instance, stream, line and the partial
/// flag (timestamps and extra labels depend on the format).
pub fn essence(r: &Record) -> (String, String, Stream, String, bool) {
    (r.service().to_owned(), r.instance().to_owned(), r.stream, r.line.clone(), r.partial)
}

/// Every sink scenario. `read_back` returns what the sink's far end holds for `service`,
/// in order (the test reads the file, parses the receiver's output, queries the server);
/// it is asked again for up to 10 s while the far end may still be writing.
pub async fn sink_all(sink: &dyn Sink, read_back: &(dyn Fn(&str) -> Vec<Record> + Sync)) {
    sink_delivers_batches_in_order(sink, read_back).await;
    sink_keeps_text_intact(sink, read_back).await;
}

async fn eventually(read_back: &(dyn Fn(&str) -> Vec<Record> + Sync), service: &str, want: usize) -> Vec<Record> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = read_back(service);
        if got.len() >= want || tokio::time::Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An empty batch is fine; two batches arrive whole and in order once flushed.
pub async fn sink_delivers_batches_in_order(sink: &dyn Sink, read_back: &(dyn Fn(&str) -> Vec<Record> + Sync)) {
    let batch: Vec<Record> = (0..5)
        .map(|i| {
            let mut r = Record::now(
                "conf-svc",
                format!("i{}", i % 2),
                if i % 2 == 0 { Stream::Stdout } else { Stream::Stderr },
                format!("line {i}"),
            );
            r.partial = i == 3;
            r
        })
        .collect();
    sink.send(&[]).await.unwrap();
    sink.send(&batch[..3]).await.unwrap();
    sink.send(&batch[3..]).await.unwrap();
    sink.flush().await.unwrap();
    let got: Vec<_> = eventually(read_back, "conf-svc", batch.len()).await.iter().map(essence).collect();
    let want: Vec<_> = batch.iter().map(essence).collect();
    assert_eq!(got, want, "every record, in order, fields intact");
}

/// Unicode, quotes, brackets, backslashes and a 10 KiB line arrive as they were sent.
pub async fn sink_keeps_text_intact(sink: &dyn Sink, read_back: &(dyn Fn(&str) -> Vec<Record> + Sync)) {
    let lines = ["grüße 🚢 \"quoted\" [brackets] back\\slash", "  leading and trailing spaces  ", &"x".repeat(10 * 1024)];
    let batch: Vec<Record> = lines.iter().map(|l| Record::now("conf-text", "i0", Stream::Stdout, *l)).collect();
    sink.send(&batch).await.unwrap();
    sink.flush().await.unwrap();
    let got: Vec<String> = eventually(read_back, "conf-text", batch.len()).await.into_iter().map(|r| r.line).collect();
    assert_eq!(got, lines, "text arrives byte for byte");
}

/// Every source scenario. `source` was built over input that yields `expected` (the test
/// writes the lines, starts the child, ...); timestamps are the source's own.
pub async fn source_all(source: &mut dyn Source, expected: &[Record]) {
    source_delivers_everything_then_ends(source, expected).await;
}

type Key = (String, String, Stream);

fn by_origin<'a>(records: impl Iterator<Item = &'a Record>) -> HashMap<Key, Vec<(String, bool)>> {
    let mut map: HashMap<Key, Vec<(String, bool)>> = HashMap::new();
    for r in records {
        map.entry((r.service().to_owned(), r.instance().to_owned(), r.stream)).or_default().push((r.line.clone(), r.partial));
    }
    map
}

async fn read_all(source: &mut dyn Source, limit: Option<usize>) -> Vec<Record> {
    let mut got = Vec::new();
    let read = async {
        loop {
            let room = limit.map_or(64, |l| (l - got.len()).min(64));
            if room == 0 || source.read(&mut got, room).await.unwrap() == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.expect("the source ends once its input has");
    got
}

/// The source yields each expected record once, with service, instance, stream, line and
/// partial flag intact, in order within each instance and stream (streams read
/// concurrently may interleave), then 0, and 0 again when asked again.
pub async fn source_delivers_everything_then_ends(source: &mut dyn Source, expected: &[Record]) {
    let got = read_all(source, None).await;
    assert_eq!(by_origin(got.iter()), by_origin(expected.iter()), "every record once, in order within its instance and stream");
    let mut more = Vec::new();
    assert_eq!(source.read(&mut more, 8).await.unwrap(), 0, "an ended source stays ended");
    source.ack(got.len() as u64).await.unwrap();
}

/// For sources with checkpoints. `open` builds the source afresh over the same input
/// and checkpoint store (as a restart would); the input yields `expected` (at least 10
/// records, in one order). A source that acknowledged some records and was dropped
/// resumes after the last acknowledged one: nothing acknowledged comes again and
/// nothing unacknowledged is skipped.
pub async fn source_resumes_after_its_checkpoint(open: &(dyn Fn() -> Box<dyn Source> + Sync), expected: &[Record]) {
    assert!(expected.len() >= 10, "the scenario needs at least 10 records");
    let lines = |rs: &[Record]| rs.iter().map(|r| r.line.clone()).collect::<Vec<_>>();
    let third = expected.len() / 3;
    // Read two thirds, acknowledge one third, "crash".
    let mut first = open();
    let got = read_all(&mut *first, Some(2 * third)).await;
    assert_eq!(lines(&got), lines(&expected[..2 * third]));
    first.ack(third as u64).await.unwrap();
    drop(first);
    // The restart re-reads from the first unacknowledged record.
    let mut second = open();
    let got = read_all(&mut *second, None).await;
    assert_eq!(lines(&got), lines(&expected[third..]), "resumes right after the acknowledged records");
    second.ack(got.len() as u64).await.unwrap();
    drop(second);
    // Everything acknowledged: nothing comes again.
    let mut third_run = open();
    let got = read_all(&mut *third_run, None).await;
    assert!(got.is_empty(), "acknowledged records are not sent again: {:?}", lines(&got));
}
