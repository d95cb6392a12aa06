//! kill -9 at random moments of uploads, manifest puts, tag moves, deletions and GC
//! sweeps, then `fsck`: nothing corrupt, and every acknowledged manifest (with its
//! blobs) and tag is still there. The server is this test binary run again with a role
//! (testkit's child convention); `KEELSON_REGISTRY_KILLS` sets the number of kills
//! (50 here, 500 in the soak bench).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keelson_registry::client::{Client, ClientConfig, NoProgress};
use keelson_registry::server::{Server, ServerConfig};
use keelson_registry::{Digest, Reference, Registry, RegistryConfig, RepoName};
use keelson_testkit::child::{mark, role, RoleChild};

const TEST: &str = "kill_9_at_random_moments_then_fsck_finds_nothing_lost_or_corrupt";
const ROLE: &str = "registry-server";

fn config() -> RegistryConfig {
    let mut c = RegistryConfig::default();
    // Short, so that sweeps run (and are killed) within the test's windows.
    c.gc_grace = Duration::from_millis(100);
    c
}

/// The child: a server and a collector sweeping every 30 ms, until killed.
fn serve_child() {
    let root = std::env::var("KR_ROOT").expect("KR_ROOT");
    let port: u16 = std::env::var("KR_PORT").expect("KR_PORT").parse().expect("port");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let registry = Arc::new(Registry::open_dir(root.as_ref(), config()).expect("open"));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        let gc = registry.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(30)).await;
                let _ = gc.gc().await;
            }
        });
        mark("ready");
        Server::new(registry, ServerConfig::default()).serve(listener, std::future::pending()).await;
    });
}

/// What clients were told, and what was in flight when the server died.
#[derive(Default)]
struct Acked {
    manifests: HashMap<Digest, RepoName>,
    uncertain: HashSet<Digest>,
    tags: HashMap<(RepoName, String), Digest>,
    uncertain_tags: HashSet<(RepoName, String)>,
}

/// A deterministic pseudo-random sequence (the kill moments and choices vary per run
/// index, and a failure reproduces).
fn rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

async fn workload(client: Client, work: std::path::PathBuf, acked: Arc<Mutex<Acked>>, seed: u64) {
    let mut r = seed | 1;
    for n in 0.. {
        let repo: RepoName = format!("crash/r{}", rand(&mut r) % 2).parse().expect("repo");
        match rand(&mut r) % 4 {
            // Push a new image under a tag.
            0 | 1 => {
                let tag = format!("t{}", rand(&mut r) % 4);
                let layout = work.join(format!("{seed}-{n}"));
                let size = 1_000 + (rand(&mut r) % 600_000) as usize;
                keelson_testkit::oci::write_layout(&layout, &tag, &[("linux", "amd64")], &[size, 5_000], rand(&mut r)).expect("layout");
                acked.lock().expect("acked").uncertain_tags.insert((repo.clone(), tag.clone()));
                let pushed = client.push_oci_layout(&layout, &repo, &tag, &[], &NoProgress).await;
                let _ = std::fs::remove_dir_all(&layout);
                let Ok(d) = pushed else { return };
                let mut a = acked.lock().expect("acked");
                a.manifests.insert(d, repo.clone());
                a.tags.insert((repo.clone(), tag.clone()), d);
                a.uncertain_tags.remove(&(repo, tag));
            }
            // Move a tag to another acknowledged manifest of the repository.
            2 => {
                let target = {
                    let a = acked.lock().expect("acked");
                    a.manifests.iter().find(|(d, r)| **r == repo && !a.uncertain.contains(*d)).map(|(d, _)| *d)
                };
                let Some(d) = target else { continue };
                let Ok((_, media_type, bytes)) = client.manifest(&repo, &d.to_string()).await else { return };
                let tag = format!("t{}", rand(&mut r) % 4);
                acked.lock().expect("acked").uncertain_tags.insert((repo.clone(), tag.clone()));
                if client.push_manifest(&repo, &tag, bytes, &media_type).await.is_err() {
                    return;
                }
                let mut a = acked.lock().expect("acked");
                a.tags.insert((repo.clone(), tag.clone()), d);
                a.uncertain_tags.remove(&(repo, tag));
            }
            // Delete an acknowledged manifest (and the tags on it): garbage for the sweeps.
            _ => {
                let target = {
                    let a = acked.lock().expect("acked");
                    a.manifests.iter().find(|(_, r)| **r == repo).map(|(d, _)| *d)
                };
                let Some(d) = target else { continue };
                acked.lock().expect("acked").uncertain.insert(d);
                let path = format!("/v2/{repo}/manifests/{d}");
                match client.raw(http::Method::DELETE, &path, &[], bytes::Bytes::new(), &[]).await {
                    Ok(resp) if resp.status == http::StatusCode::ACCEPTED => {
                        let mut a = acked.lock().expect("acked");
                        a.manifests.remove(&d);
                        a.uncertain.remove(&d);
                        a.tags.retain(|_, t| *t != d);
                    }
                    _ => return,
                }
            }
        }
    }
}

#[test]
fn kill_9_at_random_moments_then_fsck_finds_nothing_lost_or_corrupt() {
    if role().as_deref() == Some(ROLE) {
        return serve_child();
    }
    let kills: u64 = std::env::var("KEELSON_REGISTRY_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("registry");
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut r = 0x5eed_u64;
    let mut checked = 0usize;
    for i in 0..kills {
        let port = keelson_testkit::free_port().expect("port");
        let mut child = RoleChild::start(TEST, ROLE, &[("KR_ROOT", root.display().to_string()), ("KR_PORT", port.to_string())]);
        child.wait_for("ready", Duration::from_secs(30));
        let window = Duration::from_millis(20 + rand(&mut r) % 600);
        rt.block_on(async {
            let client = Client::new(&format!("http://127.0.0.1:{port}"), None, ClientConfig::default()).expect("client");
            let work = tokio::spawn(workload(client, dir.path().join("work"), acked.clone(), i + 1));
            tokio::time::sleep(window).await;
            child.kill();
            work.await.expect("workload");
        });
        // The dead server's store, opened as the next server would open it.
        let registry = Registry::open_dir(&root, config()).expect("reopen after kill -9");
        let fsck = rt.block_on(registry.fsck()).expect("fsck");
        assert!(fsck.is_clean(), "after kill {i} ({window:?} in): {fsck:?}");
        let a = acked.lock().expect("acked");
        eprintln!("kill {i}: {window:?} in, fsck clean over {} blobs, {} acknowledged manifests", fsck.blobs_checked, a.manifests.len());
        for (d, repo) in a.manifests.iter().filter(|(d, _)| !a.uncertain.contains(*d)) {
            let (_, info, _) = rt
                .block_on(registry.manifest(repo, &Reference::Digest(*d)))
                .unwrap_or_else(|e| panic!("after kill {i}: acknowledged manifest {repo}@{d} lost: {e}"));
            for b in &info.blobs {
                assert!(rt.block_on(registry.store().stat(b)).expect("stat").is_some(), "after kill {i}: blob {b} of {repo}@{d} lost");
            }
            checked += 1;
        }
        for ((repo, tag), d) in a.tags.iter().filter(|(k, d)| !a.uncertain_tags.contains(*k) && !a.uncertain.contains(*d)) {
            let (found, _) = registry
                .resolve(repo, &Reference::Tag(tag.parse().expect("tag")))
                .unwrap_or_else(|e| panic!("after kill {i}: acknowledged tag {repo}:{tag} lost: {e}"));
            assert_eq!(found, *d, "after kill {i}: tag {repo}:{tag}");
        }
    }
    assert!(checked > kills as usize, "only {checked} acknowledged manifests were checked over {kills} kills");
}
