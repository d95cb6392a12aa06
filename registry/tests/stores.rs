//! Both stores pass the conformance suite; the filesystem store's sessions survive a
//! restart and are never removed by another process opening the store.

use keelson_registry::{conformance, BlobStore, Digest, FsBlobStore, MemoryBlobStore};

fn bytes(b: &[u8]) -> keelson_registry::BlobReader {
    Box::new(std::io::Cursor::new(b.to_vec()))
}

#[tokio::test]
async fn memory_store_passes_conformance() {
    conformance::store_all(&MemoryBlobStore::new()).await;
}

#[tokio::test]
async fn fs_store_passes_conformance() {
    let dir = tempfile::tempdir().expect("tempdir");
    conformance::store_all(&FsBlobStore::open(dir.path()).expect("open")).await;
}

#[tokio::test]
async fn fs_store_resumes_an_upload_after_a_restart_and_opening_removes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 199) as u8).collect();
    let d = Digest::of(&data);
    let first = FsBlobStore::open(dir.path()).expect("open");
    let id = first.begin_upload().await.expect("begin");
    first.append(&id, 0, bytes(&data[..1_000_000])).await.expect("append");
    // Another process opens the same store while the upload is open: it must not
    // touch the session (the old store cleared uploads/ on open).
    let second = FsBlobStore::open(dir.path()).expect("second open");
    assert_eq!(second.upload_status(&id).await.expect("status").size, 1_000_000);
    drop(first);
    // The restarted process has no running hash: it resumes from the file's size and
    // the commit hashes the file once.
    second.append(&id, 1_000_000, bytes(&data[1_000_000..])).await.expect("resume");
    let wrong = second.commit(&id, &Digest::of(b"not it")).await.expect_err("mismatch");
    assert!(matches!(wrong, keelson_registry::Error::DigestMismatch { actual, .. } if actual == d), "{wrong}");
    assert!(second.list_uploads().await.expect("uploads").is_empty(), "a mismatch ends the session");

    let id = second.begin_upload().await.expect("begin");
    second.append(&id, 0, bytes(&data[..10])).await.expect("append");
    let third = FsBlobStore::open(dir.path()).expect("third open");
    third.append(&id, 10, bytes(&data[10..])).await.expect("append from another handle");
    assert_eq!(third.commit(&id, &d).await.expect("commit"), data.len() as u64);
    assert_eq!(second.stat(&d).await.expect("stat").map(|s| s.size), Some(data.len() as u64));
}
