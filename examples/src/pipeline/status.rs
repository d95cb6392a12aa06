//! The pipeline's status endpoint: `GET /v1/runs` (every run, oldest first; `?job=` for
//! one job's) and `GET /v1/runs/<id>` as JSON, `GET /healthz`. Read-only; it listens
//! where `--listen` says (loopback by default).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;

use crate::pipeline_runs::RunLog;

fn json(status: u16, body: String) -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

async fn answer(runs: &RunLog, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET {
        return json(405, r#"{"error":"only GET"}"#.into());
    }
    let path = req.uri().path();
    if path == "/healthz" {
        return json(200, r#"{"status":"ok"}"#.into());
    }
    let job = req.uri().query().and_then(|q| form_query(q, "job"));
    let listed = match runs.list(job.as_deref()).await {
        Ok(l) => l,
        Err(e) => return json(503, serde_json::json!({ "error": e }).to_string()),
    };
    if path == "/v1/runs" {
        return json(200, serde_json::to_string(&listed).unwrap_or_default());
    }
    if let Some(id) = path.strip_prefix("/v1/runs/") {
        return match listed.iter().find(|r| r.id == id) {
            Some(run) => json(200, serde_json::to_string(run).unwrap_or_default()),
            None => json(404, serde_json::json!({ "error": format!("no run {id}") }).to_string()),
        };
    }
    json(404, serde_json::json!({ "error": format!("no such path {path}") }).to_string())
}

fn form_query(query: &str, name: &str) -> Option<String> {
    query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v.to_owned())
}

/// Serves the status endpoint on `listener` until `stop` resolves.
pub async fn serve(listener: tokio::net::TcpListener, runs: Arc<RunLog>, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "status endpoint accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let runs = runs.clone();
        let service = hyper::service::service_fn(move |req| {
            let runs = runs.clone();
            async move { Ok::<_, Infallible>(answer(&runs, req).await) }
        });
        tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service));
    }
}
