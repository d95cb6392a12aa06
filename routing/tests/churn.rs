//! Routes and endpoints change ten times a second while clients load the proxy, a
//! WebSocket and a long HTTP/2 stream stay open on untouched routes: no client sees an
//! error and the long-lived connections are not disturbed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keelson_routing::{Endpoint, Host, MemoryRouter, PathPrefix, Proxy, ProxyConfig, Route, RouteChange, Router};
use keelson_testkit::http::{echo_server, get, websocket_echo};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const CHANGES_PER_SEC: u64 = 10;
const SECONDS: u64 = 3;
const TICKS: usize = 60;

fn host(h: &str) -> Host {
    Host::new(h).expect("host")
}

/// An HTTP/1.1 upstream that streams `TICKS` chunks, one every 50 ms.
async fn ticker() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|_req: Request<Incoming>| async {
                    let ticks = futures::stream::unfold(0usize, |i| async move {
                        if i == TICKS {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(format!("tick {i}\n")))), i + 1))
                    });
                    Ok::<_, Infallible>(Response::new(StreamBody::new(ticks)))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_error_while_routes_change_ten_times_a_second() {
    let mut echoes = Vec::new();
    for i in 0..4 {
        echoes.push(echo_server(&format!("e{i}")).await.expect("echo"));
    }
    let addrs: Vec<SocketAddr> = echoes.iter().map(|(a, _)| *a).collect();
    let (ws_up, stream_up) = (websocket_echo().await.expect("websocket server"), ticker().await);
    let router = Arc::new(MemoryRouter::new());
    router
        .apply(vec![
            RouteChange::Upsert(Route::new(host("busy.test"), vec![Endpoint::new("e0", addrs[0]), Endpoint::new("e1", addrs[1])])),
            RouteChange::Upsert(Route::new(host("ws.test"), vec![Endpoint::new("w", ws_up)])),
            RouteChange::Upsert(Route::new(host("stream.test"), vec![Endpoint::new("s", stream_up)])),
        ])
        .await
        .expect("apply");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy_addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy = tokio::spawn(Arc::new(Proxy::new(router.clone(), ProxyConfig::default())).serve(listener, async move {
        let _ = stopped.await;
    }));

    // The long-lived connections, opened before the churn starts.
    let ws_tcp = TcpStream::connect(proxy_addr).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async("ws://ws.test/".into_client_request().expect("request"), ws_tcp).await.expect("ws");
    let h2_tcp = TcpStream::connect(proxy_addr).await.expect("connect");
    let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2_tcp)).await.expect("h2");
    tokio::spawn(conn);
    let req = Request::get("http://stream.test/ticks").body(Full::new(Bytes::new())).expect("request");
    let resp = h2.send_request(req).await.expect("stream response");
    assert_eq!(resp.status(), StatusCode::OK);
    let ticks = tokio::spawn(async move { resp.into_body().collect().await.map(|b| b.to_bytes()) });

    // Load on the route whose endpoints change.
    let done = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (done, ok, failed) = (done.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                match get(proxy_addr, "busy.test", "/").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => {
                        eprintln!("client saw {}: {}", r.status, r.body);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("client error: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }

    // The churn: every 100 ms busy.test gets another live endpoint set, and a throwaway
    // route with a path prefix comes or goes.
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / CHANGES_PER_SEC));
    let mut ws_echoes = 0;
    for n in 0..(CHANGES_PER_SEC * SECONDS) as usize {
        tick.tick().await;
        let set: Vec<Endpoint> = (0..1 + n % 3).map(|k| (n + k) % 4).map(|i| Endpoint::new(format!("e{i}"), addrs[i])).collect();
        let temp = host(&format!("temp{}.test", n % 5));
        let mut changes = vec![RouteChange::Upsert(Route::new(host("busy.test"), set))];
        changes.push(if router.snapshot().lookup_path(temp.as_str(), "/x").is_some() {
            RouteChange::Remove(temp)
        } else {
            RouteChange::Upsert(Route::new(temp, vec![Endpoint::new("t", addrs[n % 4])]).with_path(PathPrefix::new("/x").expect("prefix")))
        });
        router.apply(changes).await.expect("change");
        // The WebSocket on its untouched route keeps answering.
        let text = format!("still here {n}");
        ws.send(Message::text(text.clone())).await.expect("ws send during churn");
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text => ws_echoes += 1,
            other => panic!("WebSocket disturbed by route changes: {other:?}"),
        }
    }
    done.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client");
    }

    let body =
        tokio::time::timeout(Duration::from_secs(10), ticks).await.expect("stream ends").expect("join").expect("HTTP/2 stream intact");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(text.lines().count(), TICKS, "every chunk of the long stream arrived: {text}");
    assert_eq!(ws_echoes, (CHANGES_PER_SEC * SECONDS) as usize);
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} client errors among {} requests during churn", ok + failed);
    assert!(ok > 100, "the load was real: {ok} requests");
    // Long-lived connections closed by their clients let the shutdown finish at once.
    ws.close(None).await.expect("ws close");
    drop(ws);
    drop(h2);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), proxy).await.expect("proxy drains once clients left").expect("join");
}
