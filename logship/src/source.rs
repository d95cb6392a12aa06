//! Sources: where records come from.

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use crate::error::Result;
use crate::lines::{LineReader, MAX_LINE_BYTES};
use crate::record::{Record, Stream};

/// Produces records until it ends.
#[async_trait]
pub trait Source: Send {
    /// The next record, or `None` when the source has ended.
    async fn next(&mut self) -> Result<Option<Record>>;
}

/// Lines of a child process's stdout and stderr, tagged with service and instance.
/// Ends when both streams close. Invalid UTF-8 is replaced, never an error; lines longer
/// than [`MAX_LINE_BYTES`] come as several records marked `partial`.
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
        // Bounded: a slow sink pushes back on the readers instead of growing memory.
        let (tx, rx) = mpsc::channel(1024);
        spawn_reader(tx.clone(), service, instance, Stream::Stdout, stdout);
        spawn_reader(tx, service, instance, Stream::Stderr, stderr);
        ChildOutputSource { rx }
    }
}

fn spawn_reader(tx: mpsc::Sender<Record>, service: &str, instance: &str, stream: Stream, reader: impl AsyncRead + Send + Unpin + 'static) {
    let (service, instance) = (service.to_owned(), instance.to_owned());
    tokio::spawn(async move {
        // Lines are cut at MAX_LINE_BYTES: output without newlines cannot grow memory.
        let mut lines = LineReader::new(reader, MAX_LINE_BYTES);
        loop {
            match lines.next_line().await {
                Ok(None) => return,
                Ok(Some(line)) => {
                    let record = Record { partial: line.partial, ..Record::now(service.clone(), instance.clone(), stream, line.text) };
                    if tx.send(record).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(%service, %instance, ?stream, error = %e, "output read failed");
                    return;
                }
            }
        }
    });
}

#[async_trait]
impl Source for ChildOutputSource {
    async fn next(&mut self) -> Result<Option<Record>> {
        Ok(self.rx.recv().await)
    }
}

/// Any stream of records as a source (a driver's output mapped to records, say).
pub struct StreamSource {
    stream: BoxStream<'static, Record>,
}

impl std::fmt::Debug for StreamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSource").finish_non_exhaustive()
    }
}

impl StreamSource {
    /// Wraps `stream`.
    pub fn new(stream: impl futures::Stream<Item = Record> + Send + 'static) -> Self {
        StreamSource { stream: stream.boxed() }
    }
}

#[async_trait]
impl Source for StreamSource {
    async fn next(&mut self) -> Result<Option<Record>> {
        Ok(self.stream.next().await)
    }
}
