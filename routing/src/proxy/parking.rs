//! Idle clear-text connections held without hyper's buffers ("parking").
//!
//! hyper's HTTP/1 connection keeps an 8 KiB read buffer and an 8 KiB write buffer for
//! as long as it lives and offers no way to release them between requests: an idle
//! keep-alive connection cost edge about 17 KB, against well under 1 KB in nginx and
//! HAProxy. So a clear-text connection is served in sessions. A session is one hyper
//! connection over a shared handle to the socket; once the connection has been quiet
//! for [`ProxyConfig::park_idle_after`](crate::ProxyConfig::park_idle_after) with every
//! request answered, the session is ended with hyper's graceful shutdown, which on an
//! idle HTTP/1 connection closes nothing the client can see: the handle's shutdown is
//! skipped, hyper and its buffers are dropped, and what remains is the socket and a
//! small task waiting for it to become readable. The next bytes start a new session.
//!
//! Quiet means: no byte read or written during a whole check period, and no byte read
//! since the last byte written. A request still being read or waiting for its upstream
//! has read since the last write, so it is never cut; bytes hyper had read ahead would
//! be lost if a session ended under them, and by that rule it never does. HTTP/2
//! connections (prior knowledge, seen in the preface) are never parked: ending an h2
//! session sends GOAWAY. TLS connections are not either: the TLS stream sits between the
//! socket and hyper and holds buffered records of its own.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What a session's socket handle records for the quiet check.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    /// Reads and writes that moved bytes, counted.
    moves: AtomicU64,
    /// A byte was read after the last byte written: a request is being read or served.
    read_since_write: AtomicBool,
    /// The session is being ended to park: its shutdown must not reach the socket.
    parking: AtomicBool,
    /// The client spoke HTTP/2: never park.
    h2: AtomicBool,
}

impl Activity {
    pub(crate) fn moves(&self) -> u64 {
        self.moves.load(Ordering::Relaxed)
    }

    /// Quiet since `seen` (an earlier [`Activity::moves`]) with every request answered.
    pub(crate) fn quiet_since(&self, seen: u64) -> bool {
        self.moves() == seen && !self.read_since_write.load(Ordering::Relaxed) && !self.h2.load(Ordering::Relaxed)
    }

    pub(crate) fn start_parking(&self) {
        self.parking.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_parking(&self) -> bool {
        self.parking.load(Ordering::Relaxed)
    }

    pub(crate) fn new_session(&self) {
        self.parking.store(false, Ordering::Relaxed);
        self.read_since_write.store(false, Ordering::Relaxed);
    }

    pub(crate) fn set_h2(&self) {
        self.h2.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_h2(&self) -> bool {
        self.h2.load(Ordering::Relaxed)
    }
}

/// The socket, shared by the connection task and the session's hyper connection. A
/// mutex rather than split halves: tokio's owned halves cannot be kept apart from the
/// session (dropping the write half shuts the socket down), and the lock is taken only
/// by the one task that owns the connection, so it never waits.
pub(crate) type SharedSocket = Arc<Mutex<TcpStream>>;

pub(crate) fn lock(socket: &SharedSocket) -> MutexGuard<'_, TcpStream> {
    socket.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits until the socket has bytes (or its end) to read, holding no buffer; returns
/// whether they begin an HTTP/2 connection preface.
pub(crate) async fn readable(socket: &SharedSocket) -> io::Result<bool> {
    let mut first = [0u8; 3];
    std::future::poll_fn(|cx| {
        let mut buf = ReadBuf::new(&mut first);
        lock(socket).poll_peek(cx, &mut buf).map_ok(|_| buf.filled() == b"PRI")
    })
    .await
}

/// A session's handle to the socket: hyper's IO.
#[derive(Debug)]
pub(crate) struct SessionIo {
    socket: SharedSocket,
    activity: Arc<Activity>,
}

impl SessionIo {
    pub(crate) fn new(socket: SharedSocket, activity: Arc<Activity>) -> Self {
        SessionIo { socket, activity }
    }

    fn moved(&self, read: bool) {
        self.activity.moves.fetch_add(1, Ordering::Relaxed);
        self.activity.read_since_write.store(read, Ordering::Relaxed);
    }
}

impl AsyncRead for SessionIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *lock(&self.socket)).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.moved(true);
        }
        polled
    }
}

impl AsyncWrite for SessionIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut *lock(&self.socket)).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.moved(false);
        }
        polled
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut *lock(&self.socket)).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.moved(false);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A TcpStream has nothing to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.activity.is_parking() {
            // The session ends, the connection does not.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut *lock(&self.socket)).poll_shutdown(cx)
    }
}
