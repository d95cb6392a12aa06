//! Conformance scenarios every `BlobStore` passes (feature `conformance`).

#![allow(clippy::unwrap_used)]

use tokio::io::AsyncReadExt;

use crate::{BlobStore, Digest, Error};

async fn read_all(store: &dyn BlobStore, d: &Digest) -> Vec<u8> {
    let mut out = Vec::new();
    store.open(d).await.unwrap().read_to_end(&mut out).await.unwrap();
    out
}

/// Every blob store scenario. Expects an empty store.
pub async fn store_all(store: &dyn BlobStore) {
    store_round_trip(store).await;
    store_rejects_digest_mismatch(store).await;
    store_delete_and_not_found(store).await;
}

/// Put, stat, read back, list; a second put of the same blob is a no-op.
pub async fn store_round_trip(store: &dyn BlobStore) {
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let d = Digest::of(&data);
    assert_eq!(store.stat(&d).await.unwrap(), None);
    assert_eq!(store.put(&d, Box::new(std::io::Cursor::new(data.clone()))).await.unwrap(), data.len() as u64);
    assert_eq!(store.stat(&d).await.unwrap(), Some(data.len() as u64));
    assert_eq!(read_all(store, &d).await, data);
    assert_eq!(store.put(&d, Box::new(std::io::Cursor::new(data.clone()))).await.unwrap(), data.len() as u64, "idempotent");
    assert!(store.list().await.unwrap().contains(&d));
    let empty = Digest::of(b"");
    store.put(&empty, Box::new(tokio::io::empty())).await.unwrap();
    assert_eq!(read_all(store, &empty).await, b"");
}

/// Bytes that do not match their digest are rejected and leave nothing behind.
pub async fn store_rejects_digest_mismatch(store: &dyn BlobStore) {
    let claimed = Digest::of(b"the bytes we promised");
    let before = store.list().await.unwrap();
    match store.put(&claimed, Box::new(std::io::Cursor::new(b"other bytes".to_vec()))).await {
        Err(Error::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, claimed);
            assert_eq!(actual, Digest::of(b"other bytes"));
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert_eq!(store.stat(&claimed).await.unwrap(), None);
    assert_eq!(store.stat(&Digest::of(b"other bytes")).await.unwrap(), None, "not stored under its real digest either");
    assert_eq!(store.list().await.unwrap(), before);
}

/// Deleting removes; absent blobs are typed NotFound.
pub async fn store_delete_and_not_found(store: &dyn BlobStore) {
    let d = Digest::of(b"short-lived");
    store.put(&d, Box::new(std::io::Cursor::new(b"short-lived".to_vec()))).await.unwrap();
    store.delete(&d).await.unwrap();
    assert!(matches!(store.open(&d).await, Err(Error::NotFound { kind: "blob", name }) if name == d.to_string()));
    assert!(matches!(store.delete(&d).await, Err(Error::NotFound { .. })));
}
