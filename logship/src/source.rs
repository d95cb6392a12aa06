//! Sources: where records come from.

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

use crate::error::Result;
use crate::record::{Record, Stream};

/// Produces records until it ends.
#[async_trait]
pub trait Source: Send {
    /// The next record, or `None` when the source has ended.
    async fn next(&mut self) -> Result<Option<Record>>;
}

/// Lines of a child process's stdout and stderr, tagged with service and instance.
/// Ends when both streams close. Invalid UTF-8 is replaced, never an error.
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
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_owned();
                    if tx.send(Record::now(service.clone(), instance.clone(), stream, line)).await.is_err() {
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
