//! Zero-copy relaying of a TCP connection's bytes with splice(2): socket → pipe →
//! socket, so payload never enters user space (HAProxy's `option splice-auto` does the
//! same). Each direction has its own pipe; a direction that reaches end of stream shuts
//! down the write side of the other socket (half-close, as `copy_bidirectional` does) and
//! the relay ends when both directions have.
//!
//! The sockets stay in tokio's reactor: a splice that would block clears the socket's
//! readiness through `try_io` and the task waits for the next edge. The pipe ends are
//! non-blocking, so a splice never parks the runtime's thread.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{splice, OFlag, SpliceFFlags};
use nix::sys::socket::{shutdown, Shutdown};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per splice call: the default pipe capacity (16 pages).
const CHUNK: usize = 64 * 1024;

/// Relays bytes both ways between `a` and `b` until both directions reach end of stream;
/// returns the bytes moved a → b and b → a. Falls back to copying through user space if
/// the kernel cannot give a pipe (descriptor limits).
pub(crate) async fn relay(a: &mut TcpStream, b: &mut TcpStream) -> io::Result<(u64, u64)> {
    let (Ok(a_to_b), Ok(b_to_a)) =
        (nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC), nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC))
    else {
        tracing::debug!("no pipe for splice; copying through user space");
        return tokio::io::copy_bidirectional(a, b).await;
    };
    let (a, b) = (&*a, &*b);
    tokio::try_join!(one_way(a, b, &a_to_b), one_way(b, a, &b_to_a))
}

/// Moves bytes from `from` to `to` through `pipe` until `from` ends, then half-closes `to`.
async fn one_way(from: &TcpStream, to: &TcpStream, pipe: &(OwnedFd, OwnedFd)) -> io::Result<u64> {
    let (pipe_out, pipe_in) = (pipe.0.as_fd(), pipe.1.as_fd());
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
    loop {
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || splice(from.as_fd(), None, pipe_in, None, CHUNK, flags).map_err(io::Error::from)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // The peer finished sending: pass the end of stream on, keep the other way open.
            match shutdown(to.as_raw_fd(), Shutdown::Write) {
                Ok(()) | Err(nix::errno::Errno::ENOTCONN) => return Ok(total),
                Err(e) => return Err(e.into()),
            }
        }
        // Drain what the pipe holds before reading more, so it never fills up.
        let mut pending = n;
        while pending > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || splice(pipe_out, None, to.as_fd(), None, pending, flags).map_err(io::Error::from)) {
                Ok(m) => pending -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}
