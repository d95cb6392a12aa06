//! Conformance scenarios every `Source` and every `Sink` passes (feature `conformance`).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use crate::{Error, Record, Sink, Source, Stream};

/// Every sink scenario. `read_back` returns what the sink has durably stored for
/// `service`, in order (the test reads the file, queries the server, ...).
pub async fn sink_all(sink: &dyn Sink, read_back: &(dyn Fn(&str) -> Vec<Record> + Sync)) {
    let batch: Vec<Record> = (0..5)
        .map(|i| {
            Record::now("conf-svc", format!("i{}", i % 2), if i % 2 == 0 { Stream::Stdout } else { Stream::Stderr }, format!("line {i}"))
        })
        .collect();
    sink.send(&[]).await.unwrap();
    sink.send(&batch[..3]).await.unwrap();
    sink.send(&batch[3..]).await.unwrap();
    sink.flush().await.unwrap();
    assert_eq!(read_back("conf-svc"), batch, "every record, in order, fields intact");

    let bad = vec![Record::now("conf-svc", "i0", Stream::Stdout, "ok"), Record::now("../escape", "i0", Stream::Stdout, "bad")];
    match sink.send(&bad).await {
        Err(Error::InvalidInput { field: "record service", value, .. }) => assert_eq!(value, "../escape"),
        other => panic!("bad service must be rejected, got {other:?}"),
    }
    sink.flush().await.unwrap();
    assert_eq!(read_back("conf-svc").len(), batch.len(), "a rejected batch writes nothing");
}

/// Every source scenario. `source` was built over input that yields `expected` (the test
/// writes the lines, starts the child, ...); timestamps are the source's own.
pub async fn source_all(source: &mut dyn Source, expected: &[Record]) {
    source_delivers_everything_then_ends(source, expected).await;
}

/// The source yields each expected record once, with service, instance, stream, line and
/// partial flag intact, in order within each instance and stream (streams read
/// concurrently may interleave), then `None`, and `None` again when asked again.
pub async fn source_delivers_everything_then_ends(source: &mut dyn Source, expected: &[Record]) {
    type Key = (String, String, Stream);
    let key = |r: &Record| -> Key { (r.service.clone(), r.instance.clone(), r.stream) };
    let mut got: HashMap<Key, Vec<(String, bool)>> = HashMap::new();
    let read = async {
        while let Some(r) = source.next().await.unwrap() {
            got.entry(key(&r)).or_default().push((r.line, r.partial));
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), read).await.expect("the source ends once its input has");
    let mut want: HashMap<Key, Vec<(String, bool)>> = HashMap::new();
    for r in expected {
        want.entry(key(r)).or_default().push((r.line.clone(), r.partial));
    }
    assert_eq!(got, want, "every record once, in order within its instance and stream");
    assert!(source.next().await.unwrap().is_none(), "an ended source stays ended");
}
