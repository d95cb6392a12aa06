//! Online garbage collection: the distribution#3254 sequence keeps the image, nothing a
//! manifest refers to is ever collected, and GC every second for 30 s under concurrent
//! pushes and pulls causes no unknown-blob error for live content.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keelson_registry::client::{Client, ClientConfig, NoProgress};
use keelson_registry::server::ServerConfig;
use keelson_registry::{Digest, Error, Registry, RegistryConfig, RepoName};

fn config(grace: Duration) -> RegistryConfig {
    let mut c = RegistryConfig::default();
    c.gc_grace = grace;
    c
}

fn manifest(config: &Digest, config_len: usize, layer: &Digest, layer_len: usize) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": config_len},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.to_string(), "size": layer_len}],
        })
        .to_string(),
    )
}

async fn push_blob(client: &Client, dir: &std::path::Path, repo: &RepoName, bytes: &[u8]) -> Digest {
    let d = Digest::of(bytes);
    let path = dir.join(d.hex());
    std::fs::write(&path, bytes).expect("write blob");
    client.push_blob_file(repo, &d, &path, bytes.len() as u64, &[], &NoProgress).await.expect("push blob");
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_3254_sequence_keeps_the_image_and_unreferenced_blobs_go() {
    let grace = Duration::from_millis(600);
    let dir = tempfile::tempdir().expect("tempdir");
    let server = common::serve(Registry::open_dir(&dir.path().join("r"), config(grace)).expect("open"), ServerConfig::default()).await;
    let client = Client::new(&server.url(), None, ClientConfig::default()).expect("client");
    let repo: RepoName = "gc/app".parse().expect("repo");
    // Right after a start GC defers: leases given before a restart are unknown.
    assert!(server.registry.gc().await.expect("gc").deferred);
    tokio::time::sleep(grace).await;

    // 1. Push a layer, GC runs, push the manifest referring to it (#3254).
    let config_bytes = br#"{"architecture":"amd64","os":"linux"}"#;
    let c = push_blob(&client, dir.path(), &repo, config_bytes).await;
    let l = push_blob(&client, dir.path(), &repo, b"layer one").await;
    let report = server.registry.gc().await.expect("gc");
    assert_eq!(report.blobs_removed, 0, "young blobs are spared: {report:?}");
    let m1 = manifest(&c, config_bytes.len(), &l, 9);
    client.push_manifest(&repo, "v1", m1.clone(), "application/vnd.oci.image.manifest.v1+json").await.expect("manifest");

    // 2. The same, but the layer is old: a client HEADs it (it exists, so it skips the
    // upload), GC runs, then the manifest comes. The HEAD leased the blob.
    let old = push_blob(&client, dir.path(), &repo, b"an old layer").await;
    tokio::time::sleep(grace + Duration::from_millis(100)).await;
    assert_eq!(client.blob_size(&repo, &old).await.expect("head"), Some(12));
    let report = server.registry.gc().await.expect("gc");
    assert_eq!(report.blobs_removed, 0, "a HEAD leases the blob: {report:?}");
    let m2 = manifest(&c, config_bytes.len(), &old, 12);
    client.push_manifest(&repo, "v2", m2, "application/vnd.oci.image.manifest.v1+json").await.expect("manifest after HEAD");

    // 3. An old blob nobody refers to or asked about goes; a manifest naming it after
    // that is refused (not silently accepted with a hole).
    let orphan = push_blob(&client, dir.path(), &repo, b"orphan layer").await;
    tokio::time::sleep(grace + Duration::from_millis(100)).await;
    let report = server.registry.gc().await.expect("gc");
    assert_eq!(report.blobs_removed, 1, "{report:?}");
    assert_eq!(report.bytes_removed, 12);
    let m3 = manifest(&c, config_bytes.len(), &orphan, 12);
    match client.push_manifest(&repo, "v3", m3, "application/vnd.oci.image.manifest.v1+json").await {
        Err(Error::Http { status: 400, code, .. }) => assert_eq!(code, "MANIFEST_BLOB_UNKNOWN"),
        other => panic!("expected MANIFEST_BLOB_UNKNOWN, got {other:?}"),
    }

    // Everything referred to is still there, whole.
    for (tag, layer) in [("v1", l), ("v2", old)] {
        let (d, _, bytes) = client.manifest(&repo, tag).await.expect(tag);
        assert_eq!(Digest::of(&bytes), d);
        assert!(client.blob_size(&repo, &layer).await.expect("head").is_some(), "{tag}'s layer");
    }
    // 4. Deleting v1's manifest frees its layer (once old) but not the shared config.
    let m1_digest = Digest::of(&m1);
    client.raw(http::Method::DELETE, &format!("/v2/{repo}/manifests/{m1_digest}"), &[], Bytes::new(), &[]).await.expect("delete");
    tokio::time::sleep(grace + Duration::from_millis(100)).await;
    let report = server.registry.gc().await.expect("gc");
    assert_eq!(report.blobs_removed, 2, "v1's layer and manifest: {report:?}");
    assert!(client.blob_size(&repo, &c).await.expect("head").is_some(), "the config v2 shares stays");
    let fsck = server.registry.fsck().await.expect("fsck");
    assert!(fsck.is_clean(), "{fsck:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_every_second_for_30s_under_concurrent_pushes_and_pulls_loses_nothing_live() {
    let grace = Duration::from_secs(2);
    let dir = tempfile::tempdir().expect("tempdir");
    let server = common::serve(Registry::open_dir(&dir.path().join("r"), config(grace)).expect("open"), ServerConfig::default()).await;
    let url = server.url();
    tokio::time::sleep(grace).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let deleted: Arc<Mutex<HashSet<Digest>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let (pushes, pulls, removed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));

    let gc = {
        let registry = server.registry.clone();
        let (errors, removed) = (errors.clone(), removed.clone());
        tokio::spawn(async move {
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_secs(1)).await;
                match registry.gc().await {
                    Ok(r) => removed.fetch_add(r.blobs_removed, Ordering::Relaxed),
                    Err(e) => {
                        errors.lock().expect("errors").push(format!("gc: {e}"));
                        0
                    }
                };
            }
        })
    };
    let mut tasks = vec![gc];
    for p in 0..3u64 {
        let client = Client::new(&url, None, ClientConfig::default()).expect("client");
        let (errors, deleted, pushes) = (errors.clone(), deleted.clone(), pushes.clone());
        let work = dir.path().join(format!("push{p}"));
        tasks.push(tokio::spawn(async move {
            let repo: RepoName = format!("load/p{p}").parse().expect("repo");
            let shared = Digest::of(b"shared base layer");
            let mut history: Vec<Digest> = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let layout = work.join(format!("{n}"));
                // A base layer every image shares (HEAD finds it: the #3254 path), and a fresh one.
                keelson_testkit::oci::write_layout(&layout, "latest", &[("linux", "amd64")], &[20_000, 50_000], p * 1_000_000 + n)
                    .expect("layout");
                std::fs::write(layout.join("blobs/sha256").join(shared.hex()), b"shared base layer").expect("shared");
                match client.push_oci_layout(&layout, &repo, "latest", &[], &NoProgress).await {
                    Ok(d) => {
                        pushes.fetch_add(1, Ordering::Relaxed);
                        history.push(d);
                    }
                    Err(e) => errors.lock().expect("errors").push(format!("push {repo} #{n}: {e}")),
                }
                let _ = std::fs::remove_dir_all(&layout);
                // Delete images three pushes old: garbage for the collector.
                if history.len() > 3 {
                    let old = history.remove(0);
                    deleted.lock().expect("deleted").insert(old);
                    let path = format!("/v2/{repo}/manifests/{old}");
                    if let Err(e) = client.raw(http::Method::DELETE, &path, &[], Bytes::new(), &[]).await {
                        errors.lock().expect("errors").push(format!("delete {path}: {e}"));
                    }
                }
            }
        }));
    }
    for q in 0..3u64 {
        let client = Client::new(&url, None, ClientConfig::default()).expect("client");
        let (errors, deleted, pulls) = (errors.clone(), deleted.clone(), pulls.clone());
        let work = dir.path().join(format!("pull{q}"));
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < deadline {
                n += 1;
                let repo: RepoName = format!("load/p{}", n % 3).parse().expect("repo");
                let (d, _, _) = match client.manifest(&repo, "latest").await {
                    Ok(m) => m,
                    Err(Error::Http { status: 404, .. }) => continue, // not pushed yet
                    Err(e) => {
                        errors.lock().expect("errors").push(format!("resolve {repo}: {e}"));
                        continue;
                    }
                };
                let out = work.join(format!("{n}"));
                match client.pull_oci_layout(&repo, &d.to_string(), &out, &NoProgress).await {
                    Ok(_) => {
                        pulls.fetch_add(1, Ordering::Relaxed);
                    }
                    // Content deleted on purpose while being pulled is not live.
                    Err(_) if deleted.lock().expect("deleted").contains(&d) => {}
                    Err(e) => errors.lock().expect("errors").push(format!("pull {repo}@{d}: {e}")),
                }
                let _ = std::fs::remove_dir_all(&out);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let errors = errors.lock().expect("errors").clone();
    assert!(errors.is_empty(), "{} errors, first: {:?}", errors.len(), &errors[..errors.len().min(5)]);
    let (pushes, pulls, removed) = (pushes.load(Ordering::Relaxed), pulls.load(Ordering::Relaxed), removed.load(Ordering::Relaxed));
    eprintln!("{pushes} pushes, {pulls} pulls, {removed} blobs collected in 30 s");
    assert!(pushes >= 30 && pulls >= 30, "too little load to mean anything: {pushes} pushes, {pulls} pulls");
    assert!(removed > 0, "the collector removed nothing: it was not exercised");
    let fsck = server.registry.fsck().await.expect("fsck");
    assert!(fsck.is_clean(), "{fsck:?}");
}
