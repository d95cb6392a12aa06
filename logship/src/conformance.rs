//! Conformance scenarios every `Sink` passes (feature `conformance`).

#![allow(clippy::unwrap_used)]

use crate::{Error, Record, Sink, Stream};

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
