//! TCP proxying: a listener whose connections go to a route's endpoints byte for byte,
//! chosen by the TLS server name (SNI passthrough: the proxy reads the ClientHello
//! without consuming it and never decrypts) or, for clients that send no SNI or do not
//! speak TLS, by the listener's default route.
//!
//! Routes live in any [`Router`]: the route for SNI `db.example` is the route of host
//! `db.example` (wildcards work as for HTTP), and the default route is the one of host
//! [`TCP_DEFAULT_HOST`]. Balancing, endpoint health, passive ejection and in-flight
//! counts are the HTTP proxy's. A connect failure is retried on another endpoint: nothing
//! has been sent yet, so it is always safe.
//!
//! On Linux, bytes move with splice(2) through a pipe per direction and never enter user
//! space ([`TcpProxyConfig::zero_copy`], on by default); elsewhere, or when turned off,
//! they are copied with `copy_bidirectional`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::OutlierPolicy;
use crate::router::Router;

/// The host name of a TCP listener's default route (RFC 2606 reserves `.invalid`, so no
/// client can send it as a server name).
pub const TCP_DEFAULT_HOST: &str = "tcp-default.keelson.invalid";

/// TCP proxy settings.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct TcpProxyConfig {
    /// Time to connect to an endpoint (default 2 s).
    pub connect_timeout: Duration,
    /// Time a client has to send its ClientHello before the default route is used for a
    /// client that sent nothing TLS-like, or the connection is closed (default 5 s).
    pub sni_timeout: Duration,
    /// Endpoints tried per connection at most (default 3).
    pub max_attempts: u32,
    /// How long connections may run on after shutdown began (default 30 s).
    pub drain_grace: Duration,
    /// Passive ejection of endpoints that refuse connections.
    pub outlier: OutlierPolicy,
    /// Relay bytes with splice(2) instead of copying them through user space (default
    /// on; Linux only, ignored elsewhere).
    pub zero_copy: bool,
}

impl Default for TcpProxyConfig {
    fn default() -> Self {
        TcpProxyConfig {
            connect_timeout: Duration::from_secs(2),
            sni_timeout: Duration::from_secs(5),
            max_attempts: 3,
            drain_grace: Duration::from_secs(30),
            outlier: OutlierPolicy::default(),
            zero_copy: true,
        }
    }
}

/// A TCP (and TLS passthrough) proxy over a [`Router`].
#[derive(Debug)]
pub struct TcpProxy {
    router: Arc<dyn Router>,
    config: TcpProxyConfig,
    connections: TaskTracker,
    close: CancellationToken,
}

impl TcpProxy {
    /// A proxy for `router`'s routes.
    pub fn new(router: Arc<dyn Router>, config: TcpProxyConfig) -> Self {
        TcpProxy { router, config, connections: TaskTracker::new(), close: CancellationToken::new() }
    }

    /// Serves `listener` until `shutdown` completes; then open connections get
    /// `drain_grace` to finish before they are closed.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let proxy = self.clone();
                        self.connections.spawn(async move { proxy.handle(stream, peer).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        self.connections.close();
        if tokio::time::timeout(self.config.drain_grace, self.connections.wait()).await.is_err() {
            tracing::info!(open = self.connections.len(), "closing TCP connections after the drain grace");
            self.close.cancel();
            self.connections.wait().await;
        }
    }

    async fn handle(&self, mut client: TcpStream, peer: SocketAddr) {
        let _ = client.set_nodelay(true);
        // A listener with only a default route needs no SNI, and must not wait for a
        // client that expects the server to speak first (SMTP, MySQL).
        let only_default = {
            let table = self.router.snapshot();
            table.len() == 1 && table.lookup(TCP_DEFAULT_HOST).is_some()
        };
        let sniffed = if only_default { Ok(Ok(None)) } else { tokio::time::timeout(self.config.sni_timeout, peek_sni(&client)).await };
        let sni = match sniffed {
            Ok(Ok(sni)) => sni,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "reading the client's first bytes failed");
                return;
            }
            // A server-speaks-first protocol (or an idle client): the default route.
            Err(_) => None,
        };
        let host = sni.as_deref().unwrap_or(TCP_DEFAULT_HOST);
        let mut tried = 0;
        let mut upstream = loop {
            let table = self.router.snapshot();
            let Some(route) = table.lookup(host) else {
                tracing::debug!(%peer, sni = ?sni, "no TCP route; closing");
                return;
            };
            let Some(picked) = route.pick_for(None) else {
                tracing::debug!(%peer, host, "no healthy endpoint; closing");
                return;
            };
            let (addr, stats) = (picked.endpoint.addr, picked.stats.clone());
            drop(table);
            tried += 1;
            let in_flight = crate::InFlight::start(stats.clone());
            match tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    stats.record_success();
                    in_flight.finish();
                    break (stream, stats);
                }
                outcome => {
                    let why = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => "connect timed out".to_owned(),
                    };
                    stats.record_failure(&self.config.outlier);
                    in_flight.fail(self.config.connect_timeout);
                    tracing::warn!(%peer, %addr, host, error = %why, "TCP endpoint unreachable");
                    if tried >= self.config.max_attempts {
                        return;
                    }
                }
            }
        };
        let _ = upstream.0.set_nodelay(true);
        // The connection counts as in flight for least-requests balancing while it lasts.
        let open = crate::InFlight::start(upstream.1.clone());
        tokio::select! {
            copied = relay(&mut client, &mut upstream.0, self.config.zero_copy) => {
                if let Err(e) = copied {
                    tracing::debug!(%peer, error = %e, "TCP connection ended with an error");
                }
            }
            () = self.close.cancelled() => tracing::debug!(%peer, "TCP connection closed by shutdown"),
        }
        open.finish();
    }
}

/// Moves bytes both ways until both sides have finished sending.
async fn relay(client: &mut TcpStream, upstream: &mut TcpStream, zero_copy: bool) -> std::io::Result<(u64, u64)> {
    #[cfg(target_os = "linux")]
    if zero_copy {
        return crate::splice::relay(client, upstream).await;
    }
    let _ = zero_copy;
    tokio::io::copy_bidirectional(client, upstream).await
}

/// The server name of a TLS ClientHello at the start of `stream`, read with `peek` so
/// the bytes stay for the upstream. `Ok(None)` when the client does not speak TLS or
/// sends no SNI. rustls parses the hello, so no hand-written TLS parser is involved.
async fn peek_sni(stream: &TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = vec![0u8; 16 * 1024 + 5];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        // A TLS handshake record starts with 0x16; anything else is not TLS.
        if buf[0] != 0x16 {
            return Ok(None);
        }
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd = &buf[..n];
        if acceptor.read_tls(&mut rd).is_err() {
            return Ok(None);
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Ok(accepted.client_hello().server_name().map(str::to_ascii_lowercase)),
            // The hello is not complete yet: wait for more bytes.
            Ok(None) if n < buf.len() => tokio::time::sleep(Duration::from_millis(2)).await,
            Ok(None) | Err(_) => return Ok(None),
        }
    }
}
