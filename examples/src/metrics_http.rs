//! The operations endpoint of the reference daemons: `GET /metrics` (Prometheus text,
//! with a `keelson_build_info` gauge), `GET /healthz` (200 while the process serves) and
//! `GET /readyz` (200 once the daemon said it is ready, 503 with the reason before and
//! while it drains).

use std::sync::{Arc, Mutex};

use prometheus_client::registry::Registry;

/// Whether a daemon is ready for traffic, shared between it and its `/readyz`.
#[derive(Clone, Debug)]
pub struct Readiness(Arc<Mutex<Result<(), String>>>);

impl Default for Readiness {
    fn default() -> Self {
        Readiness(Arc::new(Mutex::new(Err("starting".into()))))
    }
}

impl Readiness {
    /// Not ready: "starting".
    pub fn new() -> Self {
        Readiness::default()
    }

    /// Ready for traffic.
    pub fn set_ready(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Ok(());
    }

    /// Not ready, and why (`draining`, `etcd unreachable`).
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Err(reason.into());
    }

    /// `Ok` when ready, else the reason.
    pub fn state(&self) -> Result<(), String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Adds `keelson_build_info{binary, version} 1`, so dashboards see which build runs where.
pub fn register_build_info(registry: &mut Registry, binary: &str) {
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    let info: Family<Vec<(&'static str, String)>, Gauge> = Family::default();
    info.get_or_create(&vec![("binary", binary.to_owned()), ("version", env!("CARGO_PKG_VERSION").to_owned())]).set(1);
    registry.register("keelson_build_info", "The running binary and its version (always 1)", info);
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the process ends.
pub async fn serve_metrics(listener: tokio::net::TcpListener, registry: Arc<Registry>, readiness: Readiness) {
    use http_body_util::Full;
    use hyper::{Request, Response};
    use std::time::Duration;
    let text_response = |status: u16, body: String| {
        Response::builder().status(status).header("content-type", "text/plain; charset=utf-8").body(Full::new(bytes::Bytes::from(body)))
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (registry, readiness) = (registry.clone(), readiness.clone());
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let (registry, readiness) = (registry.clone(), readiness.clone());
            async move {
                match req.uri().path() {
                    "/healthz" => text_response(200, "ok\n".into()),
                    "/readyz" => match readiness.state() {
                        Ok(()) => text_response(200, "ready\n".into()),
                        Err(reason) => text_response(503, format!("not ready: {reason}\n")),
                    },
                    "/metrics" => {
                        let mut text = String::new();
                        match prometheus_client::encoding::text::encode(&mut text, &registry) {
                            Ok(()) => Response::builder()
                                .header("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                                .body(Full::new(bytes::Bytes::from(text))),
                            Err(_) => text_response(500, "encoding failed\n".into()),
                        }
                    }
                    _ => text_response(404, "try /metrics, /healthz or /readyz\n".into()),
                }
            }
        });
        tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service));
    }
}
