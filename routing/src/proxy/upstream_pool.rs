//! Upstream HTTP/1.1 connections, pooled per endpoint over hyper's low-level client.
//!
//! Why not hyper-util's pooled client: it keys its pool by (scheme, authority) and hashes
//! the authority a byte at a time with SipHash several times per request, checks a
//! connection out through a waiter queue and hands each request over a channel; under
//! callgrind that was about a tenth of edge's instructions per proxied request. Here the
//! endpoint's address finds its pool, the pool is a short list of `SendRequest`s, and a
//! request goes straight to the connection it takes.
//!
//! A connection goes back to its pool once the response head has arrived; while its
//! body is still streaming it is not ready and a checkout passes it over. One that the
//! upstream closed while idle gives the request back unsent (`try_send_request`), and the
//! next connection is tried, so an idle close never fails a request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::proxy::ProxyBody;

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// No connection: nothing reached the upstream.
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    /// No connection within the connect timeout.
    #[error("connecting to {addr}: no answer within {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    /// The exchange failed on an open connection.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// hyper-util's pooled client (HTTP/2 upstreams) failed.
    #[error(transparent)]
    Pooled(#[from] hyper_util::client::legacy::Error),
}

impl UpstreamError {
    /// Whether the request certainly did not reach the upstream.
    pub(crate) fn is_connect(&self) -> bool {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. } => true,
            UpstreamError::Http(_) => false,
            UpstreamError::Pooled(e) => e.is_connect(),
        }
    }
}

/// The pools of every endpoint one proxy has talked to.
#[derive(Debug)]
pub(crate) struct UpstreamPools {
    by_addr: RwLock<HashMap<SocketAddr, Arc<EndpointPool>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
}

#[derive(Debug, Default)]
struct EndpointPool {
    /// Most recently used last.
    idle: Mutex<Vec<Idle>>,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

impl UpstreamPools {
    pub(crate) fn new(connect_timeout: Duration, idle_timeout: Duration, max_idle: usize) -> Self {
        UpstreamPools { by_addr: RwLock::default(), connect_timeout, idle_timeout, max_idle }
    }

    fn pool(&self, addr: SocketAddr) -> Arc<EndpointPool> {
        if let Some(pool) = self.by_addr.read().unwrap_or_else(|p| p.into_inner()).get(&addr) {
            return pool.clone();
        }
        self.by_addr.write().unwrap_or_else(|p| p.into_inner()).entry(addr).or_default().clone()
    }

    /// Sends `req` (origin-form URI, Host set) to `addr` on a pooled connection, or on a
    /// new one.
    pub(crate) async fn request(&self, addr: SocketAddr, mut req: Request<ProxyBody>) -> Result<Response<Incoming>, UpstreamError> {
        let pool = self.pool(addr);
        while let Some(mut sender) = pool.checkout(self.idle_timeout) {
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    pool.put_back(sender, self.max_idle);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // Closed by the upstream while idle: the request was not sent.
                    Some(unsent) => req = unsent,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let mut sender = self.connect(addr).await?;
        let resp = sender.send_request(req).await?;
        pool.put_back(sender, self.max_idle);
        Ok(resp)
    }

    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<ProxyBody>, UpstreamError> {
        let stream = match tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => return Err(UpstreamError::Connect { addr, source }),
            Err(_) => return Err(UpstreamError::ConnectTimeout { addr, timeout: self.connect_timeout }),
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

impl EndpointPool {
    /// The most recently used connection ready for a request; closed and expired ones
    /// are dropped, busy ones (a response body still streaming) stay.
    fn checkout(&self, idle_timeout: Duration) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let found = idle.iter().rposition(|c| c.sender.is_ready() || c.sender.is_closed())?;
            let candidate = idle.remove(found);
            // Closed, or idle past the timeout: dropped (closing it), look again.
            if !candidate.sender.is_closed() && candidate.since.elapsed() < idle_timeout {
                return Some(candidate.sender);
            }
        }
    }

    fn put_back(&self, sender: SendRequest<ProxyBody>, max_idle: usize) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < max_idle {
            idle.push(Idle { sender, since: Instant::now() });
        }
    }
}
