//! Hostile input: oversized manifests (a configured cap), lying lengths, malformed
//! digests, sessions of another repository, slow uploads (a per-read timeout) and
//! clients that disconnect mid-upload (the session keeps what arrived and resumes).

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, StatusCode};
use keelson_registry::client::{Client, ClientConfig};
use keelson_registry::server::ServerConfig;
use keelson_registry::{Digest, Registry, RegistryConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn setup(max_manifest: u64, idle: Duration) -> (common::Running, Client) {
    let mut config = RegistryConfig::default();
    config.max_manifest_size = max_manifest;
    let mut server_config = ServerConfig::default();
    server_config.body_idle_timeout = idle;
    let server = common::serve(Registry::in_memory(config).expect("registry"), server_config).await;
    let client = Client::new(&server.url(), None, ClientConfig::default()).expect("client");
    (server, client)
}

fn code(r: &keelson_registry::client::RawResponse) -> String {
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    v["errors"][0]["code"].as_str().unwrap_or("").to_owned()
}

async fn start_session(client: &Client, repo: &str) -> String {
    let r = client.raw(Method::POST, &format!("/v2/{repo}/blobs/uploads/"), &[], Bytes::new(), &[]).await.expect("post");
    assert_eq!(r.status, StatusCode::ACCEPTED);
    r.headers[header::LOCATION].to_str().expect("location").to_owned()
}

#[tokio::test]
async fn oversized_manifests_and_bad_digests_are_refused_by_name() {
    let (_server, client) = setup(1024, Duration::from_secs(5)).await;
    let big = Bytes::from(format!(r#"{{"schemaVersion":2,"pad":"{}"}}"#, "x".repeat(2000)));
    let ct = [(header::CONTENT_TYPE, "application/vnd.oci.image.manifest.v1+json".to_owned())];
    let r = client.raw(Method::PUT, "/v2/h/app/manifests/big", &ct, big, &[]).await.expect("put");
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(code(&r), "MANIFEST_INVALID");
    assert!(String::from_utf8_lossy(&r.body).contains("limit of 1024"), "{:?}", r.body);

    for (bad, why) in [("sha256:xyz", "short"), ("md5:d41d8cd98f00b204e9800998ecf8427e", "algorithm"), ("sha256:%2e%2e", "encoded")] {
        let r = client
            .raw(Method::POST, &format!("/v2/h/app/blobs/uploads/?digest={bad}"), &[], Bytes::from_static(b"x"), &[])
            .await
            .expect("post");
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{why}");
        assert_eq!(code(&r), "DIGEST_INVALID", "{why}");
    }
    // A manifest whose index entries are not in the repository.
    let missing = Digest::of(b"no such manifest");
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": missing.to_string(), "size": 3}]});
    let ct = [(header::CONTENT_TYPE, "application/vnd.oci.image.index.v1+json".to_owned())];
    let r = client.raw(Method::PUT, "/v2/h/app/manifests/idx", &ct, Bytes::from(index.to_string()), &[]).await.expect("put");
    assert_eq!((r.status, code(&r).as_str()), (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN"));
    // A huge page size is capped, not an error.
    let r = client.raw(Method::GET, "/v2/_catalog?n=99999999999", &[], Bytes::new(), &[]).await.expect("catalog");
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn sessions_are_bound_to_their_repository_and_lengths_must_agree() {
    let (_server, client) = setup(1 << 20, Duration::from_secs(5)).await;
    let loc = start_session(&client, "h/one").await;
    let id = loc.rsplit('/').next().expect("id");
    let r =
        client.raw(Method::PATCH, &format!("/v2/h/two/blobs/uploads/{id}"), &[], Bytes::from_static(b"data"), &[]).await.expect("patch");
    assert_eq!((r.status, code(&r).as_str()), (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"), "another repository's session");
    let headers = [(header::CONTENT_RANGE, "0-9".to_owned()), (header::CONTENT_LENGTH, "4".to_owned())];
    let r = client.raw(Method::PATCH, &loc, &headers, Bytes::from_static(b"data"), &[]).await.expect("patch");
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "Content-Range covers 10 bytes, the body has 4");
    let r = client.raw(Method::GET, &loc, &[], Bytes::new(), &[]).await.expect("status");
    assert_eq!(r.headers[header::RANGE], "0-0", "nothing was written");
}

/// Sends a PATCH by hand: its head, then `sent` of `declared` body bytes.
async fn partial_patch(addr: std::net::SocketAddr, path: &str, declared: usize, sent: &[u8]) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head =
        format!("PATCH {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Length: {declared}\r\n\r\n");
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(sent).await.expect("body");
    s.flush().await.expect("flush");
    s
}

#[tokio::test]
async fn a_stalled_upload_times_out_and_a_dropped_one_resumes() {
    let (server, client) = setup(1 << 20, Duration::from_millis(400)).await;
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let d = Digest::of(&data);

    // Stalled: the client sends half and goes quiet. The server gives up on the read
    // within the idle timeout (answering 408 or closing), not after the client's whim.
    let loc = start_session(&client, "h/slow").await;
    let mut s = partial_patch(server.addr, &loc, data.len(), &data[..40_000]).await;
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.expect("the server ends a stalled upload");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    let text = String::from_utf8_lossy(&buf);
    assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    let r = client.raw(Method::GET, &loc, &[], Bytes::new(), &[]).await.expect("status");
    assert_eq!(r.status, StatusCode::NO_CONTENT, "the session outlives its stalled request");
    let held: u64 = r.headers[header::RANGE].to_str().expect("range").split('-').nth(1).expect("end").parse::<u64>().expect("n") + 1;
    assert!(held <= 40_000, "holds {held}");

    // Dropped: the client disconnects mid-body; the session keeps what arrived and the
    // upload resumes from the registry's Range to a blob with the right digest.
    let loc = start_session(&client, "h/drop").await;
    let s = partial_patch(server.addr, &loc, data.len(), &data[..60_000]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    let held = loop {
        let r = client.raw(Method::GET, &loc, &[], Bytes::new(), &[]).await.expect("status");
        let end: u64 = r.headers[header::RANGE].to_str().expect("range").split('-').nth(1).expect("end").parse().expect("n");
        // Wait for the server to notice the hang-up (the append ends then).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let again = client.raw(Method::GET, &loc, &[], Bytes::new(), &[]).await.expect("status");
        if again.headers[header::RANGE] == r.headers[header::RANGE] {
            break if end == 0 { 0 } else { end + 1 };
        }
    };
    assert!(held <= 60_000, "holds {held}");
    let rest = Bytes::copy_from_slice(&data[held as usize..]);
    let headers = [(header::CONTENT_RANGE, format!("{held}-{}", data.len() - 1)), (header::CONTENT_LENGTH, rest.len().to_string())];
    let put = format!("{loc}?digest={d}");
    let r = client.raw(Method::PUT, &put, &headers, rest, &[]).await.expect("resume");
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", String::from_utf8_lossy(&r.body));
    let r = client.raw(Method::GET, &format!("/v2/h/drop/blobs/{d}"), &[], Bytes::new(), &[]).await.expect("get");
    assert_eq!(r.body[..], data[..]);
}
