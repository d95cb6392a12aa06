//! Both stores pass the conformance suite; the filesystem store's crash safety.

use keelson_registry::{conformance, BlobStore, Digest, FsBlobStore, MemoryBlobStore};

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
async fn fs_store_leaves_no_upload_after_a_mismatch_and_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsBlobStore::open(dir.path()).expect("open");
    let good = Digest::of(b"kept");
    store.put(&good, Box::new(std::io::Cursor::new(b"kept".to_vec()))).await.expect("put");
    let _ = store.put(&Digest::of(b"x"), Box::new(std::io::Cursor::new(b"y".to_vec()))).await.expect_err("mismatch");
    assert_eq!(std::fs::read_dir(dir.path().join("uploads")).expect("uploads").count(), 0, "no temp file left");
    // A crash mid-upload leaves a partial file in uploads/; reopening clears it and keeps blobs.
    std::fs::write(dir.path().join("uploads/partial"), b"half a blob").expect("fake partial");
    let reopened = FsBlobStore::open(dir.path()).expect("reopen");
    assert_eq!(reopened.list().await.expect("list"), vec![good]);
    assert_eq!(std::fs::read_dir(dir.path().join("uploads")).expect("uploads").count(), 0);
}
