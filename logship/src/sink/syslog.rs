//! Syslog out: RFC 5424 over TCP or TLS with octet counting (RFC 6587), or over UDP.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Mutex;

use super::Sink;
use crate::error::{Error, Result};
use crate::record::Record;
use crate::syslog::{Encoder5424, Header5424, FACILITY_USER, SD_ID};

/// How [`SyslogSink`] reaches the receiver.
#[derive(Clone)]
#[non_exhaustive]
pub enum SyslogTransport {
    /// TCP to `host:port`, octet-counted frames.
    Tcp(String),
    /// TLS over TCP to `host:port` (RFC 5425), octet-counted frames.
    Tls {
        /// `host:port`.
        addr: String,
        /// The name the server's certificate must carry.
        server_name: String,
        /// Roots, client certificate and the rest.
        config: Arc<rustls::ClientConfig>,
    },
    /// UDP to `host:port` (RFC 5426), one message per datagram.
    Udp(String),
}

impl std::fmt::Debug for SyslogTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyslogTransport::Tcp(addr) => write!(f, "tcp://{addr}"),
            SyslogTransport::Tls { addr, server_name, .. } => write!(f, "tls://{addr} ({server_name})"),
            SyslogTransport::Udp(addr) => write!(f, "udp://{addr}"),
        }
    }
}

/// Settings of a [`SyslogSink`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SyslogSinkConfig {
    /// Where to send.
    pub transport: SyslogTransport,
    /// HOSTNAME for records without a `node` label (default: this machine's name).
    pub hostname: String,
    /// Facility for records without a priority (default 1, `user`).
    pub facility: u8,
    /// Structured-data id of the container, image and partial labels (default [`SD_ID`]).
    pub sd_id: String,
    /// Connecting gives up after this long (default 5 s).
    pub connect_timeout: Duration,
    /// UDP messages longer than this are cut to it and counted (default 8 KiB, as
    /// rsyslog's default `maxMessageSize`).
    pub max_datagram: usize,
}

impl SyslogSinkConfig {
    /// Defaults, sending over `transport`.
    pub fn new(transport: SyslogTransport) -> Self {
        SyslogSinkConfig {
            transport,
            hostname: local_hostname(),
            facility: FACILITY_USER,
            sd_id: SD_ID.to_owned(),
            connect_timeout: Duration::from_secs(5),
            max_datagram: 8192,
        }
    }
}

fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
}

/// Counters of a [`SyslogSink`], for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyslogSinkStats {
    /// Messages written.
    pub messages: u64,
    /// Bytes written (frames included).
    pub bytes: u64,
    /// Connections made (the first one included).
    pub connects: u64,
    /// UDP messages cut to `max_datagram`.
    pub truncated: u64,
}

/// Sends records as RFC 5424 syslog messages.
///
/// Over TCP and TLS a batch is acknowledged once the receiver's TCP stack has taken every
/// byte of it: `flush` waits until the socket's send queue is empty (`SIOCOUTQ`), so a
/// crash of the shipper after the acknowledgement loses nothing. (Syslog has no
/// application acknowledgement: what a receiver had taken but not yet processed when it
/// crashed is lost with it, as with every plain syslog sender.) A connection the
/// receiver closed is noticed by `flush` and the batch is sent again on a new one. While
/// the receiver does not read, `send` waits: the stall reaches the sources as
/// backpressure, never as memory.
///
/// Over UDP nothing is acknowledged by the receiver: `flush` returns at once.
#[derive(Debug)]
pub struct SyslogSink {
    config: SyslogSinkConfig,
    conn: Mutex<Conn>,
    messages: AtomicU64,
    bytes: AtomicU64,
    connects: AtomicU64,
    truncated: AtomicU64,
}

#[derive(Debug, Default)]
struct Conn {
    stream: Option<Stream>,
    /// Frames of the batch being sent, reused between batches.
    buf: Vec<u8>,
    encoder: Encoder5424,
}

enum Stream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Udp(UdpSocket),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stream::Tcp(_) => "tcp",
            Stream::Tls(_) => "tls",
            Stream::Udp(_) => "udp",
        })
    }
}

impl Stream {
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
            Stream::Tls(s) => Some(s.get_ref().0),
            Stream::Udp(_) => None,
        }
    }
}

impl SyslogSink {
    /// A sink sending as `config` says; it connects on the first batch.
    pub fn new(config: SyslogSinkConfig) -> Result<Self> {
        if config.facility > 23 {
            return Err(Error::InvalidInput {
                field: "syslog facility",
                value: config.facility.to_string(),
                reason: "must be 0 to 23".into(),
            });
        }
        if config.max_datagram < 480 {
            // RFC 5426 section 3.2: every receiver takes 480 bytes over IPv4.
            return Err(Error::InvalidInput {
                field: "syslog max_datagram",
                value: config.max_datagram.to_string(),
                reason: "must be at least 480".into(),
            });
        }
        Ok(SyslogSink {
            config,
            conn: Mutex::new(Conn::default()),
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            truncated: AtomicU64::new(0),
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> SyslogSinkStats {
        SyslogSinkStats {
            messages: self.messages.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
            truncated: self.truncated.load(Ordering::Relaxed),
        }
    }

    fn header(&self) -> Header5424<'_> {
        Header5424 { hostname: &self.config.hostname, facility: self.config.facility, sd_id: &self.config.sd_id }
    }

    async fn connect(&self) -> Result<Stream> {
        let timeout = self.config.connect_timeout;
        let within = |what: String| move |_| Error::Timeout { operation: what, after: timeout };
        let stream = match &self.config.transport {
            SyslogTransport::Tcp(addr) => {
                let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr.as_str()))
                    .await
                    .map_err(within(format!("connecting to {addr}")))?
                    .map_err(|source| Error::Io { context: format!("connecting to syslog receiver {addr}"), source })?;
                let _ = tcp.set_nodelay(true);
                Stream::Tcp(tcp)
            }
            SyslogTransport::Tls { addr, server_name, config } => {
                let name = rustls::pki_types::ServerName::try_from(server_name.clone()).map_err(|e| Error::InvalidInput {
                    field: "syslog TLS server name",
                    value: server_name.clone(),
                    reason: e.to_string(),
                })?;
                let connect = async {
                    let tcp = TcpStream::connect(addr.as_str())
                        .await
                        .map_err(|source| Error::Io { context: format!("connecting to syslog receiver {addr}"), source })?;
                    let _ = tcp.set_nodelay(true);
                    tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|source| Error::Io { context: format!("TLS handshake with syslog receiver {addr}"), source })
                };
                let tls = tokio::time::timeout(timeout, connect).await.map_err(within(format!("connecting to {addr}")))??;
                Stream::Tls(Box::new(tls))
            }
            SyslogTransport::Udp(addr) => {
                let bind = if addr.starts_with('[') { "[::]:0" } else { "0.0.0.0:0" };
                let socket = UdpSocket::bind(bind).await.map_err(|source| Error::Io { context: "binding a UDP socket".into(), source })?;
                socket
                    .connect(addr.as_str())
                    .await
                    .map_err(|source| Error::Io { context: format!("resolving syslog receiver {addr}"), source })?;
                Stream::Udp(socket)
            }
        };
        self.connects.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(transport = ?self.config.transport, "connected to syslog receiver");
        Ok(stream)
    }
}

#[async_trait]
impl Sink for SyslogSink {
    fn name(&self) -> &'static str {
        "syslog"
    }

    fn capabilities(&self) -> super::SinkCapabilities {
        let ack = match self.config.transport {
            SyslogTransport::Udp(_) => super::Acknowledgement::None,
            _ => super::Acknowledgement::Received,
        };
        super::SinkCapabilities::new(ack, false)
    }

    async fn send(&self, batch: &[Record]) -> Result<()> {
        let mut conn = self.conn.lock().await;
        if conn.stream.is_none() {
            conn.stream = Some(self.connect().await?);
        }
        let Conn { stream, buf, encoder } = &mut *conn;
        buf.clear();
        let header = self.header();
        let result = match stream {
            Some(Stream::Udp(socket)) => {
                let mut result = Ok(());
                for record in batch {
                    buf.clear();
                    encoder.encode(buf, record, &header, false);
                    if buf.len() > self.config.max_datagram {
                        buf.truncate(self.config.max_datagram);
                        self.truncated.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Err(e) = socket.send(buf).await {
                        result = Err(e);
                        break;
                    }
                    self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
                }
                result
            }
            Some(s) => {
                for record in batch {
                    encoder.encode(buf, record, &header, true);
                }
                let written = match s {
                    Stream::Tcp(tcp) => tcp.write_all(buf).await,
                    Stream::Tls(tls) => tls.write_all(buf).await,
                    Stream::Udp(_) => Ok(()),
                };
                if written.is_ok() {
                    self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
                }
                written
            }
            None => Ok(()),
        };
        // Big batches must not pin their buffer for the life of the sink.
        if buf.capacity() > 4 << 20 {
            *buf = Vec::new();
        }
        match result {
            Ok(()) => {
                self.messages.fetch_add(batch.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(source) => {
                *stream = None;
                Err(Error::Io { context: format!("sending to syslog receiver {:?}", self.config.transport), source })
            }
        }
    }

    async fn flush(&self) -> Result<()> {
        let mut conn = self.conn.lock().await;
        let Some(stream) = conn.stream.as_mut() else { return Ok(()) };
        if let Stream::Tls(tls) = stream {
            if let Err(source) = tls.flush().await {
                conn.stream = None;
                return Err(Error::Io { context: "flushing TLS to the syslog receiver".into(), source });
            }
        }
        let Some(tcp) = stream.tcp() else { return Ok(()) };
        match wait_until_taken(tcp).await {
            Ok(()) => Ok(()),
            Err(source) => {
                conn.stream = None;
                Err(Error::Io { context: format!("waiting for syslog receiver {:?} to take the batch", self.config.transport), source })
            }
        }
    }
}

/// Waits until the peer's TCP stack has acknowledged every byte written to `tcp`, or
/// the peer closed or reset the connection (an error). The kernel has no event for "all
/// acknowledged", so this polls the send queue: first by yielding (a receiver keeping up
/// on a LAN answers within tens of microseconds, far below the timer's 1 ms), then
/// sleeping from 1 ms up to 5 ms (a stalled receiver costs at most 1,000 wake-ups a
/// second, usually 200).
async fn wait_until_taken(tcp: &TcpStream) -> std::io::Result<()> {
    const SPINS: u32 = 256;
    let mut polls = 0u32;
    let mut pause = Duration::from_millis(1);
    loop {
        // A reset first: its queue may read as empty once the kernel dropped it.
        if let Some(e) = tcp.take_error()? {
            return Err(e);
        }
        if crate::sys::unsent_bytes(tcp)? == 0 {
            return Ok(());
        }
        if crate::sys::peer_closed(tcp)? {
            return Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "the receiver closed the connection"));
        }
        polls += 1;
        if polls < SPINS {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }
}
