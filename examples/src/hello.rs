//! `hello`: a tiny HTTP service. `GET /health` answers `ok`; anything else answers
//! `hello from <id>` on the first line. Each request is logged to stdout, so its output
//! has something to ship. Stops cleanly on SIGTERM or SIGINT.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

/// Serves until SIGTERM or SIGINT.
pub async fn serve(id: String, addr: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("hello {id} listening on {}", listener.local_addr()?);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => { eprintln!("accept failed: {e}"); continue; }
                };
                let id = id.clone();
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let body = if req.uri().path() == "/health" {
                        "ok\n".to_owned()
                    } else {
                        println!("{} {} from {}", req.method(), req.uri().path(), forwarded_for(&req).unwrap_or_else(|| peer.ip().to_string()));
                        format!("hello from {id}\n")
                    };
                    async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body)))) }
                });
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new()).header_read_timeout(std::time::Duration::from_secs(10));
                let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move { let _ = conn.await; });
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    eprintln!("hello {id} stopping");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

fn forwarded_for<B>(req: &http::Request<B>) -> Option<String> {
    req.headers().get("x-forwarded-for")?.to_str().ok().map(str::to_owned)
}
