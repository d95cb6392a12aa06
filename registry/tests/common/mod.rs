//! What the registry's integration tests share: a keelson server on a free loopback port.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use keelson_registry::server::{Server, ServerConfig};
use keelson_registry::Registry;

/// A server running in this test's runtime; stops when dropped.
pub struct Running {
    pub addr: SocketAddr,
    pub registry: Arc<Registry>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn serve(registry: Registry, config: ServerConfig) -> Running {
    serve_with(registry, |_| config).await
}

/// Like [`serve`], with a configuration that needs the address (a token realm).
pub async fn serve_with(registry: Registry, config: impl FnOnce(SocketAddr) -> ServerConfig) -> Running {
    let registry = Arc::new(registry);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = config(addr);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = Server::new(registry.clone(), config);
    tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    Running { addr, registry, stop: Some(stop) }
}
