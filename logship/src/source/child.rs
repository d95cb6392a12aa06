//! Output of a child process, or of any stream of records.

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use super::Source;
use crate::error::Result;
use crate::lines::{LineReader, MAX_LINE_BYTES};
use crate::record::{Labels, Record, Stream};

/// Lines of a child process's stdout and stderr, labelled with service and instance.
/// Ends when both streams close. Invalid UTF-8 is replaced, never an error; lines longer
/// than [`MAX_LINE_BYTES`] come as several records marked `partial`. A pipe has no
/// checkpoint: what the process wrote before a crash of the reader is gone with the pipe.
#[derive(Debug)]
pub struct ChildOutputSource {
    rx: mpsc::Receiver<Record>,
}

impl ChildOutputSource {
    /// Reads `stdout` and `stderr` (a child's pipes, say) concurrently.
    pub fn new(
        service: &str,
        instance: &str,
        stdout: impl AsyncRead + Send + Unpin + 'static,
        stderr: impl AsyncRead + Send + Unpin + 'static,
    ) -> Self {
        Self::with_labels(Labels::new(service, instance), stdout, stderr)
    }

    /// Reads `stdout` and `stderr`, labelling every record with `labels`.
    pub fn with_labels(
        labels: Labels,
        stdout: impl AsyncRead + Send + Unpin + 'static,
        stderr: impl AsyncRead + Send + Unpin + 'static,
    ) -> Self {
        // Bounded: a slow sink pushes back on the readers (and so on the child's pipe)
        // instead of growing memory.
        let (tx, rx) = mpsc::channel(1024);
        let labels = std::sync::Arc::new(labels);
        spawn_reader(tx.clone(), labels.clone(), Stream::Stdout, stdout);
        spawn_reader(tx, labels, Stream::Stderr, stderr);
        ChildOutputSource { rx }
    }
}

fn spawn_reader(tx: mpsc::Sender<Record>, labels: std::sync::Arc<Labels>, stream: Stream, reader: impl AsyncRead + Send + Unpin + 'static) {
    tokio::spawn(async move {
        // Lines are cut at MAX_LINE_BYTES: output without newlines cannot grow memory.
        let mut lines = LineReader::new(reader, MAX_LINE_BYTES);
        loop {
            match lines.next_line().await {
                Ok(None) => return,
                Ok(Some(line)) => {
                    let record = Record { partial: line.partial, ..Record::new(labels.clone(), stream, line.text) };
                    if tx.send(record).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(service = %labels.service, instance = %labels.instance, ?stream, error = %e, "output read failed");
                    return;
                }
            }
        }
    });
}

#[async_trait]
impl Source for ChildOutputSource {
    async fn read(&mut self, batch: &mut Vec<Record>, max: usize) -> Result<usize> {
        Ok(self.rx.recv_many(batch, max.max(1)).await)
    }
}

/// Lines of one reader (stdin, a socket, a pipe) as records of one stream; ends at the
/// reader's end. Like [`ChildOutputSource`], a reader has no checkpoint.
#[derive(Debug)]
pub struct ReaderSource {
    inner: ChildOutputSource,
}

impl ReaderSource {
    /// Lines of `reader`, labelled with `labels`, as `stream`.
    pub fn new(labels: Labels, stream: Stream, reader: impl AsyncRead + Send + Unpin + 'static) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        spawn_reader(tx, std::sync::Arc::new(labels), stream, reader);
        ReaderSource { inner: ChildOutputSource { rx } }
    }

    /// Lines of this process's standard input.
    pub fn stdin(labels: Labels) -> Self {
        Self::new(labels, Stream::Stdout, tokio::io::stdin())
    }
}

#[async_trait]
impl Source for ReaderSource {
    async fn read(&mut self, batch: &mut Vec<Record>, max: usize) -> Result<usize> {
        self.inner.read(batch, max).await
    }
}

/// Any stream of records as a source (a driver's output mapped to records, say).
pub struct StreamSource {
    stream: futures::stream::Fuse<BoxStream<'static, Record>>,
}

impl std::fmt::Debug for StreamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSource").finish_non_exhaustive()
    }
}

impl StreamSource {
    /// Wraps `stream`.
    pub fn new(stream: impl futures::Stream<Item = Record> + Send + 'static) -> Self {
        // Fused: an ended stream may be polled again (a read after the end says 0 again).
        StreamSource { stream: stream.boxed().fuse() }
    }
}

#[async_trait]
impl Source for StreamSource {
    async fn read(&mut self, batch: &mut Vec<Record>, max: usize) -> Result<usize> {
        let Some(first) = self.stream.next().await else { return Ok(0) };
        batch.push(first);
        let mut n = 1;
        // Then whatever is ready now, without waiting.
        while n < max {
            match futures::FutureExt::now_or_never(self.stream.next()) {
                Some(Some(r)) => {
                    batch.push(r);
                    n += 1;
                }
                _ => break,
            }
        }
        Ok(n)
    }
}
