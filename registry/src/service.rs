//! [`Registry`]: the distribution-spec operations over a [`BlobStore`] and the
//! metadata store, with the garbage collector that runs beside them and `fsck`.
//! The HTTP server is a thin layer over this; so is anything embedding a registry.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{Descriptor, ManifestInfo, DEFAULT_MAX_MANIFEST};
use crate::meta::{Meta, Page};
use crate::reference::{Reference, RepoName};
use crate::store::{BlobReader, BlobStat, BlobStore, FsBlobStore, MemoryBlobStore, UploadId, UploadStatus};

/// Limits and windows of a registry.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RegistryConfig {
    /// Largest manifest accepted (bytes).
    pub max_manifest_size: u64,
    /// Garbage collection spares blobs younger than this, blobs a client was told
    /// exist (HEAD, mount, upload) within it, and everything for this long after the
    /// registry starts (leases are kept in memory).
    pub gc_grace: Duration,
    /// Upload sessions idle for this long are ended by garbage collection.
    pub upload_idle_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            max_manifest_size: DEFAULT_MAX_MANIFEST,
            gc_grace: Duration::from_secs(3600),
            upload_idle_timeout: Duration::from_secs(24 * 3600),
        }
    }
}

/// What one garbage collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcReport {
    /// Blobs examined.
    pub blobs_seen: usize,
    /// Blobs removed (no manifest refers to them; old and not leased).
    pub blobs_removed: usize,
    /// Bytes freed by those.
    pub bytes_removed: u64,
    /// Unreferenced blobs kept because they are young or leased.
    pub blobs_spared: usize,
    /// Idle upload sessions ended.
    pub uploads_removed: usize,
    /// True if the sweep was skipped: the registry started less than a grace window ago.
    pub deferred: bool,
}

/// What `fsck` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FsckReport {
    /// Blobs whose bytes were hashed.
    pub blobs_checked: usize,
    /// Blobs whose bytes do not hash to their name.
    pub corrupt: Vec<Digest>,
    /// Blob links and manifest links whose blob or manifest, or a blob a manifest
    /// refers to, is missing.
    pub missing: Vec<String>,
    /// Tags that point to no manifest of their repository.
    pub dangling_tags: Vec<String>,
}

impl FsckReport {
    /// Nothing corrupt, missing or dangling.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty() && self.dangling_tags.is_empty()
    }
}

/// A registry: blobs, manifests, tags and sessions, with their invariants kept.
#[derive(Debug)]
pub struct Registry {
    store: Arc<dyn BlobStore>,
    meta: Arc<Meta>,
    config: RegistryConfig,
    /// When a client was last told a blob exists: the sweep spares it for a grace window.
    leases: Mutex<HashMap<Digest, Instant>>,
    /// Held shared by whatever makes a blob live (a lease, a manifest commit), held
    /// exclusively by the sweep while it re-checks and deletes one blob.
    sweep: tokio::sync::RwLock<()>,
    started: Instant,
    /// Manifest bytes by digest: readers are served from memory, without a trip
    /// through the blocking pool that uploads keep busy. Content-addressed, so never stale.
    manifests: Mutex<ManifestCache>,
}

/// Recently read or written manifests, up to a byte budget.
#[derive(Debug, Default)]
struct ManifestCache {
    entries: HashMap<Digest, Arc<[u8]>>,
    bytes: usize,
}

/// Bytes of manifests kept in memory.
const MANIFEST_CACHE_BYTES: usize = 32 << 20;

impl ManifestCache {
    fn insert(&mut self, d: Digest, bytes: Arc<[u8]>) {
        if bytes.len() > MANIFEST_CACHE_BYTES / 8 || self.entries.contains_key(&d) {
            return;
        }
        while self.bytes + bytes.len() > MANIFEST_CACHE_BYTES {
            // Any entry will do: a miss costs one file read.
            let Some(victim) = self.entries.keys().next().copied() else { break };
            if let Some(v) = self.entries.remove(&victim) {
                self.bytes -= v.len();
            }
        }
        self.bytes += bytes.len();
        self.entries.insert(d, bytes);
    }
}

fn not_found(kind: &'static str, name: impl ToString) -> Error {
    Error::NotFound { kind, name: name.to_string() }
}

impl Registry {
    /// A registry over `store` and `meta`.
    pub fn new(store: Arc<dyn BlobStore>, meta: Meta, config: RegistryConfig) -> Registry {
        Registry {
            store,
            meta: Arc::new(meta),
            config,
            leases: Mutex::default(),
            sweep: tokio::sync::RwLock::new(()),
            started: Instant::now(),
            manifests: Mutex::default(),
        }
    }

    /// A durable registry in `root`: blobs under it, metadata in `root/meta.redb`.
    pub fn open_dir(root: &Path, config: RegistryConfig) -> Result<Registry> {
        let store = FsBlobStore::open(root)?;
        let meta = Meta::open(&root.join("meta.redb"))?;
        Ok(Registry::new(Arc::new(store), meta, config))
    }

    /// A registry in memory.
    pub fn in_memory(config: RegistryConfig) -> Result<Registry> {
        Ok(Registry::new(Arc::new(MemoryBlobStore::new()), Meta::in_memory()?, config))
    }

    /// Its configuration.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Its blob store.
    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.store
    }

    /// Runs a metadata write off the async threads: durable commits fsync.
    async fn meta_write<T: Send + 'static>(&self, f: impl FnOnce(&Meta) -> Result<T> + Send + 'static) -> Result<T> {
        let meta = self.meta.clone();
        tokio::task::spawn_blocking(move || f(&meta)).await.map_err(|e| Error::Metadata(format!("metadata task: {e}")))?
    }

    fn lease(&self, d: &Digest) {
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).insert(*d, Instant::now());
    }

    fn leased_within(&self, d: &Digest, window: Duration) -> bool {
        let leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        leases.get(d).is_some_and(|t| t.elapsed() < window)
    }

    // ---- blobs ----

    /// The blob `d` of `repo`, if the repository holds it. A client told it exists
    /// will refer to it next, so this leases it against the sweep.
    pub async fn blob(&self, repo: &RepoName, d: &Digest) -> Result<Option<BlobStat>> {
        let _live = self.sweep.read().await;
        if !self.meta.blob_linked(repo.as_str(), d)? {
            return Ok(None);
        }
        let stat = self.store.stat(d).await?;
        if stat.is_some() {
            self.lease(d);
        }
        Ok(stat)
    }

    /// Reads `len` bytes (`None`: to the end) of `repo`'s blob `d` from `offset`.
    pub async fn read_blob(&self, repo: &RepoName, d: &Digest, offset: u64, len: Option<u64>) -> Result<BlobReader> {
        if !self.meta.blob_linked(repo.as_str(), d)? {
            return Err(Error::blob_not_found(d));
        }
        self.store.open_range(d, offset, len).await
    }

    /// Removes the blob from `repo` (the bytes go when nothing refers to them).
    pub async fn delete_blob(&self, repo: &RepoName, d: &Digest) -> Result<()> {
        let (r, d2) = (repo.to_string(), *d);
        if self.meta_write(move |m| m.unlink_blob(&r, &d2)).await? {
            Ok(())
        } else {
            Err(Error::blob_not_found(d))
        }
    }

    /// Makes `from`'s blob `d` part of `repo` without moving bytes. `None` if `from`
    /// does not hold it (the client then uploads).
    pub async fn mount(&self, repo: &RepoName, from: &RepoName, d: &Digest) -> Result<Option<u64>> {
        let _live = self.sweep.read().await;
        if !self.meta.blob_linked(from.as_str(), d)? {
            return Ok(None);
        }
        let Some(stat) = self.store.stat(d).await? else { return Ok(None) };
        let (r, d2) = (repo.to_string(), *d);
        self.meta_write(move |m| m.link_blob(&r, &d2, stat.size)).await?;
        self.lease(d);
        Ok(Some(stat.size))
    }

    /// Starts an upload session in `repo`.
    pub async fn begin_upload(&self, repo: &RepoName) -> Result<UploadId> {
        let id = self.store.begin_upload().await?;
        let (i, r) = (id.to_string(), repo.to_string());
        self.meta_write(move |m| m.begin_session(&i, &r)).await?;
        Ok(id)
    }

    fn check_session(&self, repo: &RepoName, id: &UploadId) -> Result<()> {
        match self.meta.session_repo(id.as_str())? {
            Some(r) if r == repo.as_str() => Ok(()),
            _ => Err(Error::upload_not_found(id)),
        }
    }

    /// A session's progress.
    pub async fn upload_status(&self, repo: &RepoName, id: &UploadId) -> Result<UploadStatus> {
        self.check_session(repo, id)?;
        self.store.upload_status(id).await
    }

    /// Appends to a session at `offset` (its current size).
    pub async fn append(&self, repo: &RepoName, id: &UploadId, offset: u64, content: BlobReader) -> Result<u64> {
        self.check_session(repo, id)?;
        self.store.append(id, offset, content).await
    }

    /// Commits a session as blob `d` of `repo`. The session ends either way.
    pub async fn finish_upload(&self, repo: &RepoName, id: &UploadId, d: &Digest) -> Result<u64> {
        self.check_session(repo, id)?;
        let i = id.to_string();
        let size = match self.store.commit(id, d).await {
            Ok(size) => size,
            Err(e) => {
                let _ = self.meta_write(move |m| m.end_session(&i)).await;
                return Err(e);
            }
        };
        let (r, d2) = (repo.to_string(), *d);
        self.meta_write(move |m| m.finish_session(&i, &r, &d2, size)).await?;
        self.lease(d);
        Ok(size)
    }

    /// Ends a session and drops its bytes.
    pub async fn cancel_upload(&self, repo: &RepoName, id: &UploadId) -> Result<()> {
        self.check_session(repo, id)?;
        let cancelled = self.store.cancel(id).await;
        let i = id.to_string();
        self.meta_write(move |m| m.end_session(&i)).await?;
        cancelled
    }

    /// A whole blob in one call (the spec's monolithic upload).
    pub async fn put_blob(&self, repo: &RepoName, d: &Digest, content: BlobReader) -> Result<u64> {
        let id = self.begin_upload(repo).await?;
        if let Err(e) = self.append(repo, &id, 0, content).await {
            let _ = self.cancel_upload(repo, &id).await;
            return Err(e);
        }
        self.finish_upload(repo, &id, d).await
    }

    // ---- manifests ----

    /// Stores a manifest under `reference` (a tag, or the digest its bytes must hash to).
    /// Every blob and manifest it refers to must be in `repo`. Returns its digest.
    pub async fn put_manifest(&self, repo: &RepoName, reference: &Reference, bytes: Vec<u8>, content_type: &str) -> Result<Digest> {
        let limit = self.config.max_manifest_size;
        if bytes.len() as u64 > limit {
            return Err(Error::TooLarge { what: "manifest", size: bytes.len() as u64, limit });
        }
        let d = Digest::of(&bytes);
        if let Reference::Digest(expected) = reference {
            if *expected != d {
                return Err(Error::DigestMismatch { expected: *expected, actual: d });
            }
        }
        let info = ManifestInfo::parse(&bytes, content_type)?;
        let _live = self.sweep.read().await;
        for b in &info.blobs {
            if self.store.stat(b).await?.is_none() {
                return Err(Error::ManifestReferenceUnknown { repository: repo.to_string(), digest: *b });
            }
        }
        let shared: Arc<[u8]> = bytes.into();
        if self.store.stat(&d).await?.is_none() {
            self.store.put(&d, Box::new(std::io::Cursor::new(shared.clone()))).await?;
        }
        let tag = match reference {
            Reference::Tag(t) => Some(t.to_string()),
            Reference::Digest(_) => None,
        };
        let r = repo.to_string();
        self.meta_write(move |m| m.put_manifest(&r, &d, &info, tag.as_deref())).await?;
        self.manifests.lock().unwrap_or_else(|p| p.into_inner()).insert(d, shared);
        Ok(d)
    }

    /// Resolves a reference to a manifest of `repo`.
    pub fn resolve(&self, repo: &RepoName, reference: &Reference) -> Result<(Digest, ManifestInfo)> {
        let d = match reference {
            Reference::Digest(d) => *d,
            Reference::Tag(t) => self.meta.tag(repo.as_str(), t.as_str())?.ok_or_else(|| not_found("manifest", format!("{repo}:{t}")))?,
        };
        let info = self.meta.manifest(repo.as_str(), &d)?.ok_or_else(|| not_found("manifest", format!("{repo}@{d}")))?;
        Ok((d, info))
    }

    /// A manifest's digest, what is known of it, and its bytes.
    pub async fn manifest(&self, repo: &RepoName, reference: &Reference) -> Result<(Digest, ManifestInfo, Vec<u8>)> {
        let (d, info) = self.resolve(repo, reference)?;
        let cached = self.manifests.lock().unwrap_or_else(|p| p.into_inner()).entries.get(&d).cloned();
        if let Some(bytes) = cached {
            return Ok((d, info, bytes.to_vec()));
        }
        let bytes = self.store.read_to_vec(&d, self.config.max_manifest_size).await?;
        self.manifests.lock().unwrap_or_else(|p| p.into_inner()).insert(d, bytes.as_slice().into());
        Ok((d, info, bytes))
    }

    /// Deletes a manifest by digest (with the tags pointing to it), or only a tag.
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        let r = repo.to_string();
        let deleted = match reference {
            Reference::Digest(d) => {
                let d = *d;
                self.meta_write(move |m| m.delete_manifest(&r, &d)).await?
            }
            Reference::Tag(t) => {
                let t = t.to_string();
                self.meta_write(move |m| m.delete_tag(&r, &t)).await?
            }
        };
        if deleted {
            Ok(())
        } else {
            Err(not_found("manifest", format!("{repo}:{reference}")))
        }
    }

    /// Tags of `repo`, sorted, after `last`, at most `n`.
    pub fn tags(&self, repo: &RepoName, last: Option<&str>, n: usize) -> Result<Page> {
        if !self.meta.repo_exists(repo.as_str())? {
            return Err(not_found("repository", repo));
        }
        self.meta.tags(repo.as_str(), last, n)
    }

    /// Repositories, sorted, after `last`, at most `n`.
    pub fn catalog(&self, last: Option<&str>, n: usize) -> Result<Page> {
        self.meta.catalog(last, n)
    }

    /// Descriptors of the manifests in `repo` whose subject is `d`, of `artifact_type` if given.
    pub fn referrers(&self, repo: &RepoName, d: &Digest, artifact_type: Option<&str>) -> Result<Vec<Descriptor>> {
        Ok(self
            .meta
            .referrers(repo.as_str(), d)?
            .into_iter()
            .filter(|(_, info)| artifact_type.is_none() || info.artifact_type.as_deref() == artifact_type)
            .map(|(d, info)| info.descriptor(d))
            .collect())
    }

    // ---- maintenance ----

    /// Removes blobs no manifest refers to, sparing the young and the leased, and ends
    /// idle upload sessions. Safe while clients push and pull: each removal re-checks
    /// under the sweep lock, which a manifest commit and a lease hold shared.
    pub async fn gc(&self) -> Result<GcReport> {
        self.collect(true).await
    }

    /// Garbage collection by a process that opened the store only for it: the
    /// metadata store admits one process, so no server runs and no lease is outstanding,
    /// and there is no reason to wait a grace window after starting.
    pub async fn gc_offline(&self) -> Result<GcReport> {
        self.collect(false).await
    }

    async fn collect(&self, online: bool) -> Result<GcReport> {
        let mut report = GcReport::default();
        let now = SystemTime::now();
        for (id, status) in self.store.list_uploads().await? {
            let idle = now.duration_since(status.last_activity).unwrap_or_default();
            if idle >= self.config.upload_idle_timeout && self.store.cancel(&id).await.is_ok() {
                report.uploads_removed += 1;
                let i = id.to_string();
                self.meta_write(move |m| m.end_session(&i)).await?;
            }
        }
        let grace = self.config.gc_grace;
        if online && self.started.elapsed() < grace {
            // A lease given before a restart was lost with the process: wait it out.
            report.deferred = true;
            return Ok(report);
        }
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, t| t.elapsed() < grace);
        let blobs = self.store.list().await?;
        report.blobs_seen = blobs.len();
        for d in blobs {
            if self.meta.refs(&d)? > 0 {
                continue;
            }
            let _exclusive = self.sweep.write().await;
            let Some(stat) = self.store.stat(&d).await? else { continue };
            let young = SystemTime::now().duration_since(stat.created).unwrap_or_default() < grace;
            if self.meta.refs(&d)? > 0 || young || self.leased_within(&d, grace) {
                report.blobs_spared += 1;
                continue;
            }
            // Links first, bytes second: a crash between leaves an unlinked blob that
            // the next sweep removes, never a link to bytes that are gone.
            self.meta_write(move |m| m.forget_blob(&d)).await?;
            match self.store.delete(&d).await {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            report.blobs_removed += 1;
            report.bytes_removed += stat.size;
        }
        Ok(report)
    }

    /// Verifies every blob's bytes against its digest, that every manifest link has its
    /// manifest and the blobs it refers to, and that every tag points to a manifest.
    pub async fn fsck(&self) -> Result<FsckReport> {
        let mut report = FsckReport::default();
        for d in self.store.list().await? {
            report.blobs_checked += 1;
            let mut reader = match self.store.open(&d).await {
                Ok(r) => r,
                Err(Error::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = reader.read(&mut buf).await.map_err(crate::store::io_error("reading blob"))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            if Digest::from_hasher(hasher) != d {
                report.corrupt.push(d);
            }
        }
        for (repo, d) in self.meta.blob_links()? {
            // Garbage collection forgets the links of what it removes: a link without
            // its blob is a blob lost.
            if self.store.stat(&d).await?.is_none() {
                report.missing.push(format!("blob {d} of repository {repo}"));
            }
        }
        for (repo, d) in &self.meta.manifest_links()? {
            if self.store.stat(d).await?.is_none() {
                report.missing.push(format!("manifest {repo}@{d}"));
                continue;
            }
            let Some(info) = self.meta.manifest(repo, d)? else { continue };
            for b in &info.blobs {
                if self.store.stat(b).await?.is_none() {
                    report.missing.push(format!("blob {b} of manifest {repo}@{d}"));
                }
            }
        }
        for (repo, tag, d) in self.meta.all_tags()? {
            if self.meta.manifest(&repo, &d)?.is_none() {
                report.dangling_tags.push(format!("{repo}:{tag} -> {d}"));
            }
        }
        Ok(report)
    }
}
