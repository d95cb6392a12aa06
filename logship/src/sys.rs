//! What the kernel knows about a TCP connection that no safe API tells.

use std::os::fd::AsRawFd;

use tokio::net::TcpStream;

/// Bytes written to `tcp` that the peer has not acknowledged yet (`SIOCOUTQ`, the same
/// request number as `TIOCOUTQ` on Linux).
#[allow(unsafe_code)]
pub(crate) fn unsent_bytes(tcp: &TcpStream) -> std::io::Result<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: the descriptor is open for as long as `tcp` is borrowed, and SIOCOUTQ
    // writes one c_int through the pointer, which points at a live c_int.
    let rc = unsafe { libc::ioctl(tcp.as_raw_fd(), libc::TIOCOUTQ, &mut queued as *mut libc::c_int) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(queued).unwrap_or(0))
}

/// Whether the peer closed its side (a read would see the end) or reset the connection
/// (an error). Peeks, so bytes the peer sent (TLS session tickets) stay for their reader.
pub(crate) fn peer_closed(tcp: &TcpStream) -> std::io::Result<bool> {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match tcp.try_io(tokio::io::Interest::READABLE, || socket2::SockRef::from(tcp).peek(&mut byte)) {
        Ok(0) => Ok(true),
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}
