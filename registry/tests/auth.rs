//! Authentication and authorization end to end: htpasswd basic auth with
//! per-repository rules, bearer tokens from the token endpoint (keelson's client,
//! skopeo and Docker all follow the challenge), and TLS.

mod common;

use bytes::Bytes;
use http::{header, Method, StatusCode};
use keelson_registry::client::{Client, ClientConfig, Credentials, NoProgress};
use keelson_registry::server::{Acl, Auth, Htpasswd, ServerConfig, Tokens};
use keelson_registry::{Error, Registry, RegistryConfig};

fn users() -> Htpasswd {
    let alice = bcrypt::hash("alice-pw", 4).expect("hash");
    let bob = bcrypt::hash("bob-pw", 4).expect("hash");
    Htpasswd::parse(&format!("alice:{alice}\nbob:{bob}\n")).expect("htpasswd")
}

fn acl() -> Acl {
    Acl::parse("alice team/* pull,push,delete\nbob team/* pull\n* public/* pull\nalice * pull\n").expect("acl")
}

async fn push_image(client: &Client, dir: &std::path::Path, repo: &str, seed: u64) -> Result<keelson_registry::Digest, Error> {
    let layout = dir.join(format!("layout-{seed}"));
    keelson_testkit::oci::write_layout(&layout, "v1", &[("linux", "amd64")], &[10_000], seed).expect("layout");
    client.push_oci_layout(&layout, &repo.parse()?, "v1", &[], &NoProgress).await
}

fn status_of(e: &Error) -> u16 {
    match e {
        Error::Http { status, .. } => *status,
        other => panic!("expected an HTTP error, got {other:?}"),
    }
}

#[tokio::test]
async fn basic_auth_with_per_repository_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = common::serve(
        Registry::in_memory(RegistryConfig::default()).expect("registry"),
        ServerConfig::with_auth(Auth::Basic { users: users(), acl: acl() }),
    )
    .await;
    let anonymous = Client::new(&server.url(), None, ClientConfig::default()).expect("client");
    let r = anonymous.raw(Method::GET, "/v2/", &[], Bytes::new(), &[]).await.expect("get");
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.headers[header::WWW_AUTHENTICATE].to_str().expect("challenge").starts_with("Basic "));
    let wrong = Client::new(&server.url(), Some(Credentials::new("alice", "nope")), ClientConfig::default()).expect("client");
    assert_eq!(status_of(&push_image(&wrong, dir.path(), "team/app", 1).await.expect_err("wrong password")), 401);

    let alice = Client::new(&server.url(), Some(Credentials::new("alice", "alice-pw")), ClientConfig::default()).expect("client");
    let d = push_image(&alice, dir.path(), "team/app", 2).await.expect("alice pushes to team/");
    assert_eq!(status_of(&push_image(&alice, dir.path(), "other/app", 3).await.expect_err("not hers")), 403);
    let bob = Client::new(&server.url(), Some(Credentials::new("bob", "bob-pw")), ClientConfig::default()).expect("client");
    assert_eq!(bob.manifest(&"team/app".parse().expect("repo"), "v1").await.expect("bob pulls").0, d);
    assert_eq!(status_of(&push_image(&bob, dir.path(), "team/app", 4).await.expect_err("bob may not push")), 403);
    // The catalog needs a rule for `*`.
    assert_eq!(alice.raw(Method::GET, "/v2/_catalog", &[], Bytes::new(), &[]).await.expect("catalog").status, StatusCode::OK);
    assert_eq!(bob.raw(Method::GET, "/v2/_catalog", &[], Bytes::new(), &[]).await.expect("catalog").status, StatusCode::FORBIDDEN);
}

fn bearer(addr: std::net::SocketAddr) -> ServerConfig {
    let tokens = Tokens::new(&[42u8; 32], format!("http://{addr}/token"), "keelson-test").expect("tokens");
    ServerConfig::with_auth(Auth::Bearer { users: users(), acl: acl(), tokens })
}

#[tokio::test]
async fn bearer_tokens_grant_only_the_scopes_the_rules_allow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = common::serve_with(Registry::in_memory(RegistryConfig::default()).expect("registry"), bearer).await;
    let anonymous = Client::new(&server.url(), None, ClientConfig::default()).expect("client");
    let r = anonymous.raw(Method::GET, "/v2/team/app/tags/list", &[], Bytes::new(), &[]).await.expect("get");
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let challenge = r.headers[header::WWW_AUTHENTICATE].to_str().expect("challenge").to_owned();
    assert!(challenge.starts_with("Bearer realm=") && challenge.contains(r#"scope="repository:team/app:pull""#), "{challenge}");
    let r = anonymous
        .raw(Method::GET, "/token?service=keelson-test&scope=repository:team/app:pull", &[], Bytes::new(), &[])
        .await
        .expect("token");
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "no token without credentials");

    let alice = Client::new(&server.url(), Some(Credentials::new("alice", "alice-pw")), ClientConfig::default()).expect("client");
    let d = push_image(&alice, dir.path(), "team/app", 1).await.expect("alice pushes with a token");
    assert_eq!(status_of(&push_image(&alice, dir.path(), "other/app", 2).await.expect_err("no push scope there")), 401);
    let bob = Client::new(&server.url(), Some(Credentials::new("bob", "bob-pw")), ClientConfig::default()).expect("client");
    let pulled = dir.path().join("pulled");
    assert_eq!(bob.pull_oci_layout(&"team/app".parse().expect("repo"), "v1", &pulled, &NoProgress).await.expect("bob pulls"), d);
    assert_eq!(status_of(&push_image(&bob, dir.path(), "team/app", 3).await.expect_err("bob's token lacks push")), 401);
    let wrong = Client::new(&server.url(), Some(Credentials::new("bob", "alice-pw")), ClientConfig::default()).expect("client");
    assert_eq!(status_of(&wrong.manifest(&"team/app".parse().expect("repo"), "v1").await.expect_err("wrong password")), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_and_docker_log_in_through_the_token_endpoint() {
    keelson_testkit::docker::engine_version().expect("docker engine");
    let skopeo = keelson_testkit::require("skopeo", "skopeo").expect("skopeo");
    let image = keelson_testkit::docker::busybox_image().expect("busybox image");
    let dir = tempfile::tempdir().expect("tempdir");
    let server = common::serve_with(Registry::in_memory(RegistryConfig::default()).expect("registry"), bearer).await;
    let layout = dir.path().join("layout");
    keelson_testkit::oci::write_layout(&layout, "v1", &[("linux", "amd64")], &[10_000], 9).expect("layout");
    let out = tokio::process::Command::new(&skopeo)
        .args(["copy", "--preserve-digests", "--dest-tls-verify=false", "--dest-creds", "alice:alice-pw"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{}/team/skopeo:v1", server.addr))
        .output()
        .await
        .expect("skopeo");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tokio::process::Command::new(&skopeo)
        .args(["copy", "--preserve-digests", "--dest-tls-verify=false", "--dest-creds", "bob:bob-pw"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{}/team/skopeo:v2", server.addr))
        .output()
        .await
        .expect("skopeo");
    assert!(!out.status.success(), "bob may not push");

    // Docker: log in with a client config of this test's own (never the user's or the daemon's).
    let docker_config = dir.path().join("docker-config");
    let docker = |args: Vec<String>| {
        let docker_config = docker_config.clone();
        async move { tokio::process::Command::new("docker").env("DOCKER_CONFIG", &docker_config).args(&args).output().await.expect("docker") }
    };
    let host = format!("127.0.0.1:{}", server.addr.port());
    let target = format!("{host}/team/docker:v1");
    struct Untag(String);
    impl Drop for Untag {
        fn drop(&mut self) {
            let _ = std::process::Command::new("docker").args(["rmi", "-f", &self.0]).output();
        }
    }
    let _untag = Untag(target.clone());
    let out = docker(vec!["tag".into(), image, target.clone()]).await;
    assert!(out.status.success());
    let out = docker(vec!["push".into(), target.clone()]).await;
    assert!(!out.status.success(), "push without login must fail");
    let out = std::process::Command::new("docker")
        .env("DOCKER_CONFIG", &docker_config)
        .args(["login", "--username", "alice", "--password-stdin", &host])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(b"alice-pw")?;
            c.wait_with_output()
        })
        .expect("docker login");
    assert!(out.status.success(), "login: {}", String::from_utf8_lossy(&out.stderr));
    let out = docker(vec!["push".into(), target.clone()]).await;
    assert!(out.status.success(), "push after login: {}", String::from_utf8_lossy(&out.stderr));
    let out = docker(vec!["rmi".into(), target.clone()]).await;
    assert!(out.status.success());
    let out = docker(vec!["pull".into(), target.clone()]).await;
    assert!(out.status.success(), "pull: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn tls_serves_https_to_a_client_that_trusts_the_ca() {
    let ca = keelson_testkit::tls::TestCa::new("keelson test CA").expect("ca");
    let cert = ca.issue("registry", &["127.0.0.1", "localhost"]).expect("cert");
    let mut config = ServerConfig::default();
    config.tls = Some(keelson_registry::server::tls_config(cert.chain_pem.as_bytes(), cert.key_pem.as_bytes()).expect("tls"));
    let server = common::serve(Registry::in_memory(RegistryConfig::default()).expect("registry"), config).await;
    let url = format!("https://localhost:{}", server.addr.port());
    let mut trusting = ClientConfig::default();
    trusting.ca_pem = Some(ca.cert_pem.as_bytes().to_vec());
    let client = Client::new(&url, None, trusting).expect("client");
    assert_eq!(client.raw(Method::GET, "/v2/", &[], Bytes::new(), &[]).await.expect("https").status, StatusCode::OK);
    let untrusting = Client::new(&url, None, ClientConfig::default()).expect("client");
    assert!(matches!(untrusting.raw(Method::GET, "/v2/", &[], Bytes::new(), &[]).await, Err(Error::Transport { .. })));
}
