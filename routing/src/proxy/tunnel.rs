//! Copying both ways through an upgraded connection (a WebSocket, say) without a buffer
//! per connection while it idles.
//!
//! `tokio::io::copy_bidirectional` keeps an 8 KiB buffer per direction for the life of
//! the tunnel: 16 KiB for every open WebSocket, most of which idle. Here a read borrows
//! the thread's scratch buffer for the duration of one poll and hands the bytes straight
//! to the other side; only what that side cannot take at once is copied into a buffer
//! of its own, which is freed as soon as it is written. An idle tunnel holds no buffer.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The scratch buffer one thread's tunnels read into.
const SCRATCH: usize = 16 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// One direction of a tunnel.
#[derive(Debug, Default)]
struct Direction {
    /// Bytes read but not yet written (empty, with no allocation, when caught up).
    pending: Vec<u8>,
    written: usize,
    /// The reading side ended: shut the writing side down, then this direction is done.
    read_done: bool,
    done: bool,
}

impl Direction {
    /// Moves bytes from `from` to `to` until `from` has nothing more right now (Pending),
    /// or both its end and the shutdown of `to` are through (Ready).
    fn poll_copy<R, W>(&mut self, cx: &mut Context<'_>, mut from: Pin<&mut R>, mut to: Pin<&mut W>) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.written < self.pending.len() {
                let n = ready!(to.as_mut().poll_write(cx, &self.pending[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                if self.written == self.pending.len() {
                    // Caught up: give the memory back.
                    self.pending = Vec::new();
                    self.written = 0;
                }
                continue;
            }
            if self.read_done {
                ready!(to.as_mut().poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            let step = SCRATCH_BUF.with(|scratch| -> Poll<io::Result<()>> {
                let mut scratch = scratch.borrow_mut();
                let mut buf = ReadBuf::new(&mut scratch[..]);
                ready!(from.as_mut().poll_read(cx, &mut buf))?;
                let data = buf.filled();
                if data.is_empty() {
                    self.read_done = true;
                    return Poll::Ready(Ok(()));
                }
                // Straight to the other side; keep only what it cannot take now.
                let taken = match to.as_mut().poll_write(cx, data) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => 0,
                };
                if taken < data.len() {
                    self.pending = data[taken..].to_vec();
                    self.written = 0;
                }
                Poll::Ready(Ok(()))
            });
            ready!(step)?;
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both have ended (each end passed on as a
/// shutdown of the other side), or either fails.
pub(crate) fn copy_both_ways<A, B>(a: A, b: B) -> impl Future<Output = io::Result<()>>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    Tunnel { a, b, a_to_b: Direction::default(), b_to_a: Direction::default() }
}

struct Tunnel<A, B> {
    a: A,
    b: B,
    a_to_b: Direction,
    b_to_a: Direction,
}

impl<A, B> Future for Tunnel<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let forward = this.a_to_b.poll_copy(cx, Pin::new(&mut this.a), Pin::new(&mut this.b))?;
        let backward = this.b_to_a.poll_copy(cx, Pin::new(&mut this.b), Pin::new(&mut this.a))?;
        if forward.is_ready() && backward.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_through_backpressure_and_passes_each_end_on() {
        // Small pipes, so the far side cannot take a whole read at once.
        let (near_a, mut far_a) = tokio::io::duplex(64);
        let (near_b, mut far_b) = tokio::io::duplex(64);
        let tunnel = tokio::spawn(copy_both_ways(near_a, near_b));
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            far_a.write_all(&sent).await.expect("write");
            far_a.shutdown().await.expect("shutdown");
            let mut back = Vec::new();
            far_a.read_to_end(&mut back).await.expect("read back");
            back
        });
        let mut got = Vec::new();
        far_b.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, payload, "every byte, in order");
        far_b.write_all(b"answer").await.expect("answer");
        far_b.shutdown().await.expect("shutdown");
        assert_eq!(writer.await.expect("writer"), b"answer");
        tunnel.await.expect("tunnel task").expect("tunnel ends cleanly");
    }
}
