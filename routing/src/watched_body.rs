//! A body that gives up when it stalls, and says when it has been sent whole.
//!
//! A proxy holds two connections per request; a peer that stops sending in the middle of
//! a body (an upstream that hangs mid-response, a client that stops uploading) would hold
//! both forever. [`Watched`] fails the body with a timeout after `idle` without a frame,
//! which makes hyper close the stream on the other side: the other peer sees the
//! connection cut, never a hang. It also reports the end of a request body, so the
//! upstream's time to answer is counted from the moment the request was sent whole.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// The error of any body the proxy forwards.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A body that stalled for longer than its idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("{what} body sent nothing for {idle:?}; cut")]
pub struct BodyIdle {
    /// Whose body (`request`, `response`).
    pub what: &'static str,
    /// The idle timeout.
    pub idle: Duration,
}

/// `inner`, failed after `idle` without a frame; `ended` fires once it has ended.
pub(crate) struct Watched<B> {
    inner: Pin<Box<B>>,
    what: &'static str,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    ended: Option<tokio::sync::oneshot::Sender<()>>,
}

impl<B> Watched<B> {
    pub(crate) fn new(inner: B, what: &'static str, idle: Duration) -> Self {
        Watched { inner: Box::pin(inner), what, idle, timer: None, ended: None }
    }

    /// Also resolves the returned receiver when the body has been read to its end.
    pub(crate) fn with_end_signal(mut self) -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ended = Some(tx);
        (self, rx)
    }
}

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.timer = None;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                if let Some(ended) = self.ended.take() {
                    let _ = ended.send(());
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                let idle = self.idle;
                let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        tracing::debug!(what = self.what, ?idle, "body stalled; cutting it");
                        Poll::Ready(Some(Err(Box::new(BodyIdle { what: self.what, idle }))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client connection whose writes fail once they have been blocked for `idle`: a
/// client that stops reading its response (its receive window full) is cut, instead of
/// holding the proxy's connection and the upstream's forever. (While it reads, however
/// slowly, writes complete and the clock starts again.)
pub(crate) struct StallGuard<IO> {
    io: IO,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<IO> StallGuard<IO> {
    pub(crate) fn new(io: IO, idle: Duration) -> Self {
        StallGuard { io, idle, timer: None }
    }

    /// `Pending` from a write: arms the clock, and fails once it has run out.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let idle = self.idle;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                tracing::debug!(?idle, "client stopped reading; closing its connection");
                Poll::Ready(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("client read nothing for {idle:?}")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StallGuard<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for StallGuard<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Pending => self.stalled(cx).map(Err),
            ready => {
                self.timer = None;
                ready
            }
        }
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.stalled(cx).map(Err),
            ready => {
                self.timer = None;
                ready
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Pending => self.stalled(cx).map(Err),
            ready => {
                self.timer = None;
                ready
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
