//! Conformance scenarios every `BlobStore` passes (feature `conformance`).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use tokio::io::AsyncReadExt;

use crate::{BlobReader, BlobStore, Digest, Error};

fn bytes(b: &[u8]) -> BlobReader {
    Box::new(std::io::Cursor::new(b.to_vec()))
}

async fn read_all(mut r: BlobReader) -> Vec<u8> {
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.unwrap();
    out
}

/// Every blob store scenario. Expects an empty store.
pub async fn store_all(store: &dyn BlobStore) {
    store_round_trip(store).await;
    store_rejects_digest_mismatch(store).await;
    store_delete_and_not_found(store).await;
    store_chunked_upload(store).await;
    store_upload_cancel_and_unknown(store).await;
    store_ranged_reads(store).await;
}

/// Put, stat (size and a fresh creation time), read back, list; a second put of the
/// same blob succeeds.
pub async fn store_round_trip(store: &dyn BlobStore) {
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let d = Digest::of(&data);
    assert_eq!(store.stat(&d).await.unwrap(), None);
    assert_eq!(store.put(&d, bytes(&data)).await.unwrap(), data.len() as u64);
    let stat = store.stat(&d).await.unwrap().unwrap();
    assert_eq!(stat.size, data.len() as u64);
    let age = SystemTime::now().duration_since(stat.created).unwrap_or_default();
    assert!(age < Duration::from_secs(60), "created {age:?} ago");
    assert_eq!(read_all(store.open(&d).await.unwrap()).await, data);
    assert_eq!(store.put(&d, bytes(&data)).await.unwrap(), data.len() as u64, "idempotent");
    assert!(store.list().await.unwrap().contains(&d));
    let empty = Digest::of(b"");
    store.put(&empty, Box::new(tokio::io::empty())).await.unwrap();
    assert_eq!(read_all(store.open(&empty).await.unwrap()).await, b"");
    assert!(store.list_uploads().await.unwrap().is_empty(), "puts leave no session behind");
}

/// Bytes that do not match their digest are rejected and leave nothing behind.
pub async fn store_rejects_digest_mismatch(store: &dyn BlobStore) {
    let claimed = Digest::of(b"the bytes we promised");
    let before = store.list().await.unwrap();
    match store.put(&claimed, bytes(b"other bytes")).await {
        Err(Error::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, claimed);
            assert_eq!(actual, Digest::of(b"other bytes"));
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert_eq!(store.stat(&claimed).await.unwrap(), None);
    assert_eq!(store.stat(&Digest::of(b"other bytes")).await.unwrap(), None, "not stored under its real digest either");
    assert_eq!(store.list().await.unwrap(), before);
    assert!(store.list_uploads().await.unwrap().is_empty(), "the mismatched session ended");
}

/// Deleting removes; absent blobs are typed NotFound.
pub async fn store_delete_and_not_found(store: &dyn BlobStore) {
    let d = Digest::of(b"short-lived");
    store.put(&d, bytes(b"short-lived")).await.unwrap();
    store.delete(&d).await.unwrap();
    assert!(matches!(store.open(&d).await, Err(Error::NotFound { kind: "blob", name }) if name == d.to_string()));
    assert!(matches!(store.delete(&d).await, Err(Error::NotFound { .. })));
}

/// A blob in three appends; an append at the wrong offset writes nothing and says
/// where the session ends; the session is listed until committed.
pub async fn store_chunked_upload(store: &dyn BlobStore) {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let d = Digest::of(&data);
    let id = store.begin_upload().await.unwrap();
    assert_eq!(store.upload_status(&id).await.unwrap().size, 0);
    assert_eq!(store.append(&id, 0, bytes(&data[..100_000])).await.unwrap(), 100_000);
    match store.append(&id, 50_000, bytes(&data[50_000..150_000])).await {
        Err(Error::UploadOffset { expected: 100_000, got: 50_000, .. }) => {}
        other => panic!("expected UploadOffset, got {other:?}"),
    }
    assert_eq!(store.upload_status(&id).await.unwrap().size, 100_000, "the refused append wrote nothing");
    assert_eq!(store.append(&id, 100_000, bytes(&data[100_000..250_000])).await.unwrap(), 250_000);
    assert_eq!(store.append(&id, 250_000, bytes(&data[250_000..])).await.unwrap(), data.len() as u64);
    assert!(store.list_uploads().await.unwrap().iter().any(|(i, s)| *i == id && s.size == data.len() as u64));
    assert_eq!(store.commit(&id, &d).await.unwrap(), data.len() as u64);
    assert_eq!(read_all(store.open(&d).await.unwrap()).await, data);
    assert!(matches!(store.upload_status(&id).await, Err(Error::NotFound { kind: "upload", .. })), "the session ended");
}

/// Cancel drops a session; unknown sessions are typed NotFound everywhere.
pub async fn store_upload_cancel_and_unknown(store: &dyn BlobStore) {
    let id = store.begin_upload().await.unwrap();
    store.append(&id, 0, bytes(b"abandoned")).await.unwrap();
    store.cancel(&id).await.unwrap();
    let gone = |r: Result<(), Error>| matches!(r, Err(Error::NotFound { kind: "upload", .. }));
    assert!(gone(store.cancel(&id).await));
    assert!(gone(store.append(&id, 0, bytes(b"x")).await.map(|_| ())));
    assert!(gone(store.commit(&id, &Digest::of(b"abandoned")).await.map(|_| ())));
    assert!(gone(store.upload_status(&id).await.map(|_| ())));
    assert_eq!(store.stat(&Digest::of(b"abandoned")).await.unwrap(), None);
    assert!(store.list_uploads().await.unwrap().is_empty());
}

/// Ranged reads: a middle slice, a tail, an empty read at the end, and a start past
/// the end refused with the blob's size.
pub async fn store_ranged_reads(store: &dyn BlobStore) {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 241) as u8).collect();
    let d = Digest::of(&data);
    store.put(&d, bytes(&data)).await.unwrap();
    assert_eq!(read_all(store.open_range(&d, 100, Some(900)).await.unwrap()).await, &data[100..1000]);
    assert_eq!(read_all(store.open_range(&d, 9_000, None).await.unwrap()).await, &data[9_000..]);
    assert_eq!(read_all(store.open_range(&d, 9_990, Some(1_000)).await.unwrap()).await, &data[9_990..], "clipped at the end");
    assert!(read_all(store.open_range(&d, 10_000, None).await.unwrap()).await.is_empty());
    match store.open_range(&d, 10_001, None).await {
        Err(Error::RangeNotSatisfiable { offset: 10_001, size: 10_000 }) => {}
        Err(e) => panic!("expected RangeNotSatisfiable, got {e:?}"),
        Ok(_) => panic!("expected RangeNotSatisfiable, got a reader"),
    }
}
