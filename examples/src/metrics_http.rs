//! A minimal Prometheus endpoint for the reference binaries (`edge`, `node-agent`).

/// A minimal metrics endpoint: GET /metrics in Prometheus text format, 404 otherwise.
pub async fn serve_metrics(listener: tokio::net::TcpListener, registry: std::sync::Arc<prometheus_client::registry::Registry>) {
    use http_body_util::Full;
    use hyper::{Request, Response};
    use std::time::Duration;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let registry = registry.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let registry = registry.clone();
            async move {
                let mut text = String::new();
                if req.uri().path() != "/metrics" {
                    Response::builder().status(404).body(Full::new(bytes::Bytes::from_static(b"try /metrics\n")))
                } else if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
                    Response::builder().status(500).body(Full::new(bytes::Bytes::from_static(b"encoding failed\n")))
                } else {
                    Response::builder()
                        .header("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                        .body(Full::new(bytes::Bytes::from(text)))
                }
            }
        });
        tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service));
    }
}
