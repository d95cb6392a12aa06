//! A syslog receiver: UDP and TCP (octet counting and newline framing, RFC 6587), RFC
//! 5424 and RFC 3164, spilling to a [`DiskQueue`] because senders cannot be paused.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, UdpSocket};

use super::Source;
use crate::error::{Error, Result};
use crate::queue::{DiskQueue, DiskQueueConfig, QueueSource};
use crate::record::{Labels, Record, Stream};
use crate::syslog::{parse, Format, SD_ID};

/// Settings of a [`SyslogSource`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SyslogSourceConfig {
    /// UDP address to listen on (none by default).
    pub udp: Option<SocketAddr>,
    /// TCP address to listen on (none by default).
    pub tcp: Option<SocketAddr>,
    /// Serve the TCP listener over TLS (RFC 5425) with this configuration; a client
    /// certificate verifier in it makes senders prove who they are (mutual TLS).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Where received messages wait for the sink.
    pub queue_dir: PathBuf,
    /// Size and overflow of that queue. With [`crate::Overflow::Block`] a full queue
    /// stops reading TCP connections (senders wait) and UDP (the kernel drops datagrams
    /// once the socket buffer is full, uncounted here): prefer `DropOldest` for UDP.
    pub queue: DiskQueueConfig,
    /// Longest message kept (default 64 KiB); longer ones are cut and counted.
    pub max_message: usize,
    /// TCP connections at once at most (default 256); more are refused and counted.
    pub max_connections: usize,
    /// A TCP connection silent this long is closed (default 5 min).
    pub idle_timeout: Duration,
    /// Labels for what a message does not say (its APP-NAME is the service, PROCID the
    /// instance, HOSTNAME the node).
    pub labels: Labels,
}

impl SyslogSourceConfig {
    /// Defaults, queueing under `queue_dir`; set `udp` and/or `tcp`.
    pub fn new(queue_dir: impl Into<PathBuf>) -> Self {
        SyslogSourceConfig {
            udp: None,
            tcp: None,
            tls: None,
            queue_dir: queue_dir.into(),
            queue: DiskQueueConfig::default(),
            max_message: 64 * 1024,
            max_connections: 256,
            idle_timeout: Duration::from_secs(300),
            labels: Labels::new("syslog", ""),
        }
    }
}

/// Counters of a [`SyslogSource`], for metrics.
#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    unparsed: AtomicU64,
    truncated: AtomicU64,
    bad_frames: AtomicU64,
    connections: AtomicU64,
    refused: AtomicU64,
    handshakes_failed: AtomicU64,
    lost: AtomicU64,
}

/// What a [`SyslogSource`] saw so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyslogSourceStats {
    /// Messages received (and queued).
    pub received: u64,
    /// Messages that were neither RFC 5424 nor RFC 3164 (kept whole as the line).
    pub unparsed: u64,
    /// Messages longer than `max_message`, cut to it.
    pub truncated: u64,
    /// TCP connections closed for a frame that made no sense (a length that is not a
    /// number): what they had sent before it was kept.
    pub bad_frames: u64,
    /// TCP connections accepted.
    pub connections: u64,
    /// TCP connections refused over `max_connections`.
    pub refused: u64,
    /// TLS handshakes that failed (no or an untrusted client certificate, say).
    pub handshakes_failed: u64,
    /// UDP messages received but not queued because the queue failed (a disk error);
    /// TCP senders see their connection closed instead.
    pub lost: u64,
    /// Records dropped by the queue's overflow policy.
    pub dropped: u64,
}

/// Receives syslog over UDP and TCP into a disk queue and reads records from it. The
/// listeners run until the source is dropped.
#[derive(Debug)]
pub struct SyslogSource {
    queue: Arc<DiskQueue>,
    reader: QueueSource,
    counters: Arc<Counters>,
    udp: Option<SocketAddr>,
    tcp: Option<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for SyslogSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl SyslogSource {
    /// Opens the queue and binds the listeners.
    pub async fn start(config: SyslogSourceConfig) -> Result<SyslogSource> {
        if config.udp.is_none() && config.tcp.is_none() {
            return Err(Error::InvalidInput {
                field: "syslog source",
                value: "no udp, no tcp".into(),
                reason: "listen on UDP, TCP or both".into(),
            });
        }
        if config.max_message < 480 {
            return Err(Error::InvalidInput {
                field: "syslog max_message",
                value: config.max_message.to_string(),
                reason: "must be at least 480 (RFC 5426)".into(),
            });
        }
        let queue = DiskQueue::open(&config.queue_dir, config.queue)?;
        let counters = Arc::new(Counters::default());
        let config = Arc::new(config);
        let mut tasks = Vec::new();
        let mut udp_addr = None;
        if let Some(addr) = config.udp {
            let socket =
                UdpSocket::bind(addr).await.map_err(|source| Error::Io { context: format!("binding syslog UDP {addr}"), source })?;
            udp_addr = socket.local_addr().ok();
            tasks.push(tokio::spawn(receive_udp(socket, queue.clone(), counters.clone(), config.clone())));
        }
        let mut tcp_addr = None;
        if let Some(addr) = config.tcp {
            let listener =
                TcpListener::bind(addr).await.map_err(|source| Error::Io { context: format!("binding syslog TCP {addr}"), source })?;
            tcp_addr = listener.local_addr().ok();
            tasks.push(tokio::spawn(accept_tcp(listener, queue.clone(), counters.clone(), config.clone())));
        }
        Ok(SyslogSource { reader: queue.source(), queue, counters, udp: udp_addr, tcp: tcp_addr, tasks })
    }

    /// The UDP address bound, if any.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp
    }

    /// The TCP address bound, if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// Counters so far.
    pub fn stats(&self) -> SyslogSourceStats {
        let c = &self.counters;
        SyslogSourceStats {
            received: c.received.load(Ordering::Relaxed),
            unparsed: c.unparsed.load(Ordering::Relaxed),
            truncated: c.truncated.load(Ordering::Relaxed),
            bad_frames: c.bad_frames.load(Ordering::Relaxed),
            connections: c.connections.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            handshakes_failed: c.handshakes_failed.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            dropped: self.queue.stats().dropped,
        }
    }
}

#[async_trait]
impl Source for SyslogSource {
    fn capabilities(&self) -> super::SourceCapabilities {
        // Senders cannot be paused: the disk queue takes what the sink has not.
        super::SourceCapabilities::new(true, false)
    }

    async fn read(&mut self, batch: &mut Vec<Record>, max: usize) -> Result<usize> {
        self.reader.read(batch, max).await
    }

    async fn ack(&mut self, count: u64) -> Result<()> {
        self.reader.ack(count).await
    }
}

/// The record a message becomes.
fn to_record(bytes: &[u8], peer: SocketAddr, counters: &Counters, config: &SyslogSourceConfig) -> Record {
    let p = parse(bytes);
    counters.received.fetch_add(1, Ordering::Relaxed);
    if p.format == Format::Unparsed {
        counters.unparsed.fetch_add(1, Ordering::Relaxed);
    }
    let mut labels = config.labels.clone();
    if let Some(app) = p.app_name {
        labels.service = app;
    }
    if let Some(procid) = p.procid {
        labels.instance = procid;
    }
    labels.node = p.hostname.or(labels.node);
    labels.extra.insert("peer".into(), peer.ip().to_string());
    let mut partial = false;
    for (id, params) in p.structured {
        for (name, value) in params {
            match (id == SD_ID, name.as_str()) {
                (true, "container") => labels.container = Some(value),
                (true, "image") => labels.image = Some(value),
                (true, "partial") => partial = value == "true",
                _ => {
                    labels.extra.insert(format!("{id}.{name}"), value);
                }
            }
        }
    }
    let stream = if p.msgid.as_deref() == Some("stderr") { Stream::Stderr } else { Stream::Stdout };
    let mut record = Record::new(Arc::new(labels), stream, p.message);
    record.timestamp = p.timestamp.unwrap_or_else(SystemTime::now);
    record.priority = p.priority;
    record.partial = partial;
    record
}

async fn receive_udp(socket: UdpSocket, queue: Arc<DiskQueue>, counters: Arc<Counters>, config: Arc<SyslogSourceConfig>) {
    let mut buf = vec![0u8; 65_536];
    let mut batch = Vec::new();
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(error = %e, "syslog UDP receive failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        batch.push(message(&buf[..n], peer, &counters, &config));
        // Whatever else is waiting goes in the same write.
        while batch.len() < 512 {
            match socket.try_recv_from(&mut buf) {
                Ok((n, peer)) => batch.push(message(&buf[..n], peer, &counters, &config)),
                Err(_) => break,
            }
        }
        if let Err(e) = queue.push(&batch).await {
            counters.lost.fetch_add(batch.len() as u64, Ordering::Relaxed);
            tracing::error!(error = %e, lost = batch.len(), "syslog messages could not be queued");
        }
        batch.clear();
    }
}

/// A datagram or frame as a record, cut to `max_message`.
fn message(bytes: &[u8], peer: SocketAddr, counters: &Counters, config: &SyslogSourceConfig) -> Record {
    let bytes = if bytes.len() > config.max_message {
        counters.truncated.fetch_add(1, Ordering::Relaxed);
        &bytes[..config.max_message]
    } else {
        bytes
    };
    to_record(bytes, peer, counters, config)
}

async fn accept_tcp(listener: TcpListener, queue: Arc<DiskQueue>, counters: Arc<Counters>, config: Arc<SyslogSourceConfig>) {
    let open = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(error = %e, "syslog TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, max = config.max_connections, "syslog TCP connection refused: too many open");
            continue;
        };
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let (queue, counters, config) = (queue.clone(), counters.clone(), config.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let ended = match &config.tls {
                None => receive_tcp(stream, peer, &queue, &counters, &config).await,
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => receive_tcp(tls_stream, peer, &queue, &counters, &config).await,
                        Ok(Err(e)) => {
                            counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%peer, error = %e, "syslog TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%peer, "syslog TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "syslog TCP connection ended");
            }
        });
    }
}

/// Reads frames until the peer closes: octet-counted when a frame starts with a digit,
/// else newline-terminated (RFC 6587 allows both on one port).
async fn receive_tcp(
    stream: impl AsyncRead + Unpin,
    peer: SocketAddr,
    queue: &DiskQueue,
    counters: &Counters,
    config: &SyslogSourceConfig,
) -> std::io::Result<()> {
    let mut reader = BufReader::with_capacity(256 * 1024, stream);
    let mut frame = Vec::new();
    let mut batch = Vec::new();
    loop {
        let first = match tokio::time::timeout(config.idle_timeout, reader.fill_buf()).await {
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
            Ok(buf) => match buf?.first() {
                None => break,
                Some(b) => *b,
            },
        };
        frame.clear();
        let cut = if first.is_ascii_digit() {
            let Some(len) = read_length(&mut reader).await? else {
                counters.bad_frames.fetch_add(1, Ordering::Relaxed);
                break;
            };
            let keep = len.min(config.max_message);
            frame.resize(keep, 0);
            reader.read_exact(&mut frame).await?;
            // The rest of an over-long frame is read and dropped.
            tokio::io::copy(&mut (&mut reader).take((len - keep) as u64), &mut tokio::io::sink()).await?;
            len > keep
        } else {
            read_line_capped(&mut reader, &mut frame, config.max_message).await?
        };
        if cut {
            counters.truncated.fetch_add(1, Ordering::Relaxed);
        }
        batch.push(to_record(&frame, peer, counters, config));
        if batch.len() >= 512 || reader.buffer().is_empty() {
            queue.push(&batch).await.map_err(std::io::Error::other)?;
            batch.clear();
        }
    }
    queue.push(&batch).await.map_err(std::io::Error::other)
}

/// The `LEN ` of an octet-counted frame: up to 10 digits and a space; `None` if the
/// bytes are not that (nothing more is read than 11 bytes).
async fn read_length(reader: &mut BufReader<impl AsyncRead + Unpin>) -> std::io::Result<Option<usize>> {
    let mut len: usize = 0;
    for _ in 0..11 {
        match reader.read_u8().await? {
            b' ' => return Ok(Some(len)),
            d if d.is_ascii_digit() => len = len * 10 + usize::from(d - b'0'),
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// Reads one newline-terminated line into `line` (without the newline), keeping at most
/// `max` bytes and dropping the rest of a longer one. Returns whether it was cut.
async fn read_line_capped(reader: &mut BufReader<impl AsyncRead + Unpin>, line: &mut Vec<u8>, max: usize) -> std::io::Result<bool> {
    let mut cut = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(cut);
        }
        let (chunk, done) = match memchr::memchr(b'\n', buf) {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = max.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        cut |= chunk.len() > room;
        let used = done.unwrap_or(buf.len());
        reader.consume(used);
        if done.is_some() {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(cut);
        }
    }
}
