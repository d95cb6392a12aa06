//! The registry's metadata in one transactional store (redb): repositories, tags,
//! manifest links, blob links, reference counts, referrers and upload sessions. Every
//! change that a client is told succeeded is one durable transaction, so a crash leaves
//! each change whole or absent; blobs themselves live in the [`BlobStore`](crate::BlobStore).
//!
//! Reference counts make garbage collection a point lookup per blob instead of a walk
//! of every manifest: `refs[d]` is the number of manifest links that refer to `d` (as
//! config, layer or index entry) plus the links of the manifest `d` itself.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::ManifestInfo;

const REPOS: TableDefinition<'_, &str, ()> = TableDefinition::new("repos");
const TAGS: TableDefinition<'_, (&str, &str), &str> = TableDefinition::new("tags");
const MANIFESTS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("manifests");
const BLOB_LINKS: TableDefinition<'_, (&str, &str), u64> = TableDefinition::new("blob_links");
const LINKED_BY: TableDefinition<'_, (&str, &str), ()> = TableDefinition::new("linked_by");
const REFS: TableDefinition<'_, &str, u64> = TableDefinition::new("refs");
const REFERRERS: TableDefinition<'_, (&str, &str, &str), ()> = TableDefinition::new("referrers");
const UPLOADS: TableDefinition<'_, &str, &str> = TableDefinition::new("uploads");

/// Above every character of a tag or digest: the upper bound of a prefix range.
const HIGH: &str = "\u{7f}";

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::Metadata(e.to_string())
}

/// The metadata store.
pub struct Meta {
    db: Database,
}

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meta").finish_non_exhaustive()
    }
}

/// A page of names (tags or repositories) and whether more follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// The names, sorted.
    pub names: Vec<String>,
    /// Whether names follow the last one.
    pub more: bool,
}

impl Meta {
    /// Opens (or creates) the store at `path`. Only one process may hold it: another
    /// gets [`Error::Metadata`] saying the database is already open.
    pub fn open(path: &Path) -> Result<Meta> {
        let db = Database::create(path).map_err(|e| Error::Metadata(format!("opening {}: {e}", path.display())))?;
        Meta::init(db)
    }

    /// A store in memory.
    pub fn in_memory() -> Result<Meta> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new()).map_err(db_err)?;
        Meta::init(db)
    }

    fn init(db: Database) -> Result<Meta> {
        let tx = db.begin_write().map_err(db_err)?;
        {
            tx.open_table(REPOS).map_err(db_err)?;
            tx.open_table(TAGS).map_err(db_err)?;
            tx.open_table(MANIFESTS).map_err(db_err)?;
            tx.open_table(BLOB_LINKS).map_err(db_err)?;
            tx.open_table(LINKED_BY).map_err(db_err)?;
            tx.open_table(REFS).map_err(db_err)?;
            tx.open_table(REFERRERS).map_err(db_err)?;
            tx.open_table(UPLOADS).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(Meta { db })
    }

    /// Runs `f` in one durable write transaction. Every commit is durable: redb 4.6's
    /// reclamation of pages after non-durable commits tripped its own assertion (a page
    /// freed while a read transaction still held it) under concurrent uploads, reads and
    /// GC (the `gc` soak test, once in CI), so sessions pay an fsync rather than risk it.
    fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T>) -> Result<T> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let out = f(&tx)?;
        tx.commit().map_err(db_err)?;
        Ok(out)
    }

    fn read(&self) -> Result<redb::ReadTransaction> {
        self.db.begin_read().map_err(db_err)
    }

    /// Whether `repo` holds the blob `d` (uploaded or mounted there).
    pub fn blob_linked(&self, repo: &str, d: &Digest) -> Result<bool> {
        let t = self.read()?.open_table(BLOB_LINKS).map_err(db_err)?;
        Ok(t.get((repo, d.to_string().as_str())).map_err(db_err)?.is_some())
    }

    /// Records that `repo` holds the blob `d`. Durable: the client is told so next.
    pub fn link_blob(&self, repo: &str, d: &Digest, size: u64) -> Result<()> {
        let ds = d.to_string();
        self.write(|tx| {
            tx.open_table(REPOS).map_err(db_err)?.insert(repo, ()).map_err(db_err)?;
            tx.open_table(BLOB_LINKS).map_err(db_err)?.insert((repo, ds.as_str()), size).map_err(db_err)?;
            tx.open_table(LINKED_BY).map_err(db_err)?.insert((ds.as_str(), repo), ()).map_err(db_err)?;
            Ok(())
        })
    }

    /// Forgets that `repo` holds `d`; false if it did not.
    pub fn unlink_blob(&self, repo: &str, d: &Digest) -> Result<bool> {
        let ds = d.to_string();
        self.write(|tx| {
            let had = tx.open_table(BLOB_LINKS).map_err(db_err)?.remove((repo, ds.as_str())).map_err(db_err)?.is_some();
            tx.open_table(LINKED_BY).map_err(db_err)?.remove((ds.as_str(), repo)).map_err(db_err)?;
            Ok(had)
        })
    }

    /// Records an upload session of `repo` (durably, as every commit; see `write`).
    pub fn begin_session(&self, id: &str, repo: &str) -> Result<()> {
        self.write(|tx| {
            tx.open_table(UPLOADS).map_err(db_err)?.insert(id, repo).map_err(db_err)?;
            Ok(())
        })
    }

    /// The repository a session belongs to.
    pub fn session_repo(&self, id: &str) -> Result<Option<String>> {
        let t = self.read()?.open_table(UPLOADS).map_err(db_err)?;
        Ok(t.get(id).map_err(db_err)?.map(|v| v.value().to_owned()))
    }

    /// Ends a session with its blob linked into `repo`, in one durable transaction: the
    /// client is told the blob is there next.
    pub fn finish_session(&self, id: &str, repo: &str, d: &Digest, size: u64) -> Result<()> {
        let ds = d.to_string();
        self.write(|tx| {
            tx.open_table(UPLOADS).map_err(db_err)?.remove(id).map_err(db_err)?;
            tx.open_table(REPOS).map_err(db_err)?.insert(repo, ()).map_err(db_err)?;
            tx.open_table(BLOB_LINKS).map_err(db_err)?.insert((repo, ds.as_str()), size).map_err(db_err)?;
            tx.open_table(LINKED_BY).map_err(db_err)?.insert((ds.as_str(), repo), ()).map_err(db_err)?;
            Ok(())
        })
    }

    /// Forgets a session.
    pub fn end_session(&self, id: &str) -> Result<()> {
        self.write(|tx| {
            tx.open_table(UPLOADS).map_err(db_err)?.remove(id).map_err(db_err)?;
            Ok(())
        })
    }

    /// Every session and its repository.
    pub fn sessions(&self) -> Result<Vec<(String, String)>> {
        let t = self.read()?.open_table(UPLOADS).map_err(db_err)?;
        let mut out = Vec::new();
        for e in t.iter().map_err(db_err)? {
            let (k, v) = e.map_err(db_err)?;
            out.push((k.value().to_owned(), v.value().to_owned()));
        }
        Ok(out)
    }

    /// Stores a manifest link (and a tag, if given) in one durable transaction, after
    /// checking that `repo` holds every blob and manifest it refers to. Returns whether
    /// the link is new.
    pub fn put_manifest(&self, repo: &str, d: &Digest, info: &ManifestInfo, tag: Option<&str>) -> Result<bool> {
        let ds = d.to_string();
        let encoded = serde_json::to_vec(info).map_err(db_err)?;
        self.write(|tx| {
            let mut manifests = tx.open_table(MANIFESTS).map_err(db_err)?;
            {
                let links = tx.open_table(BLOB_LINKS).map_err(db_err)?;
                for b in &info.blobs {
                    if links.get((repo, b.to_string().as_str())).map_err(db_err)?.is_none() {
                        return Err(Error::ManifestReferenceUnknown { repository: repo.to_owned(), digest: *b });
                    }
                }
                for m in &info.manifests {
                    if manifests.get((repo, m.to_string().as_str())).map_err(db_err)?.is_none() {
                        return Err(Error::ManifestReferenceUnknown { repository: repo.to_owned(), digest: *m });
                    }
                }
            }
            let new = manifests.insert((repo, ds.as_str()), encoded.as_slice()).map_err(db_err)?.is_none();
            if new {
                let mut refs = tx.open_table(REFS).map_err(db_err)?;
                for r in info.blobs.iter().chain(&info.manifests).chain(std::iter::once(d)) {
                    let rs = r.to_string();
                    let n = refs.get(rs.as_str()).map_err(db_err)?.map_or(0, |v| v.value());
                    refs.insert(rs.as_str(), n + 1).map_err(db_err)?;
                }
                if let Some(subject) = info.subject {
                    tx.open_table(REFERRERS)
                        .map_err(db_err)?
                        .insert((repo, subject.to_string().as_str(), ds.as_str()), ())
                        .map_err(db_err)?;
                }
                tx.open_table(REPOS).map_err(db_err)?.insert(repo, ()).map_err(db_err)?;
            }
            if let Some(tag) = tag {
                tx.open_table(TAGS).map_err(db_err)?.insert((repo, tag), ds.as_str()).map_err(db_err)?;
            }
            Ok(new)
        })
    }

    /// A manifest linked in `repo`.
    pub fn manifest(&self, repo: &str, d: &Digest) -> Result<Option<ManifestInfo>> {
        let t = self.read()?.open_table(MANIFESTS).map_err(db_err)?;
        let Some(v) = t.get((repo, d.to_string().as_str())).map_err(db_err)? else { return Ok(None) };
        serde_json::from_slice(v.value()).map(Some).map_err(db_err)
    }

    /// The digest a tag points to.
    pub fn tag(&self, repo: &str, tag: &str) -> Result<Option<Digest>> {
        let t = self.read()?.open_table(TAGS).map_err(db_err)?;
        let Some(v) = t.get((repo, tag)).map_err(db_err)? else { return Ok(None) };
        v.value().parse().map(Some).map_err(db_err)
    }

    /// Removes a tag; false if there was none.
    pub fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool> {
        self.write(|tx| Ok(tx.open_table(TAGS).map_err(db_err)?.remove((repo, tag)).map_err(db_err)?.is_some()))
    }

    /// Removes a manifest link, the tags pointing to it and its referrer entry, and
    /// releases its references; false if `repo` did not hold it.
    pub fn delete_manifest(&self, repo: &str, d: &Digest) -> Result<bool> {
        let ds = d.to_string();
        self.write(|tx| {
            let Some(encoded) =
                tx.open_table(MANIFESTS).map_err(db_err)?.remove((repo, ds.as_str())).map_err(db_err)?.map(|v| v.value().to_vec())
            else {
                return Ok(false);
            };
            let info: ManifestInfo = serde_json::from_slice(&encoded).map_err(db_err)?;
            let mut refs = tx.open_table(REFS).map_err(db_err)?;
            for r in info.blobs.iter().chain(&info.manifests).chain(std::iter::once(d)) {
                let rs = r.to_string();
                let n = refs.get(rs.as_str()).map_err(db_err)?.map_or(0, |v| v.value());
                if n <= 1 {
                    refs.remove(rs.as_str()).map_err(db_err)?;
                } else {
                    refs.insert(rs.as_str(), n - 1).map_err(db_err)?;
                }
            }
            if let Some(subject) = info.subject {
                tx.open_table(REFERRERS).map_err(db_err)?.remove((repo, subject.to_string().as_str(), ds.as_str())).map_err(db_err)?;
            }
            let mut tags = tx.open_table(TAGS).map_err(db_err)?;
            // A read error aborts the transaction: a tag must not outlive its manifest.
            let mut pointing = Vec::new();
            for e in tags.range((repo, "")..(repo, HIGH)).map_err(db_err)? {
                let (k, v) = e.map_err(db_err)?;
                if v.value() == ds {
                    pointing.push(k.value().1.to_owned());
                }
            }
            for t in pointing {
                tags.remove((repo, t.as_str())).map_err(db_err)?;
            }
            Ok(true)
        })
    }

    /// How many manifest links refer to `d`.
    pub fn refs(&self, d: &Digest) -> Result<u64> {
        let t = self.read()?.open_table(REFS).map_err(db_err)?;
        Ok(t.get(d.to_string().as_str()).map_err(db_err)?.map_or(0, |v| v.value()))
    }

    /// Forgets every repository's link to a blob that garbage collection removed.
    pub fn forget_blob(&self, d: &Digest) -> Result<()> {
        let ds = d.to_string();
        self.write(|tx| {
            let mut by = tx.open_table(LINKED_BY).map_err(db_err)?;
            let mut repos = Vec::new();
            for e in by.range((ds.as_str(), "")..(ds.as_str(), HIGH)).map_err(db_err)? {
                repos.push(e.map_err(db_err)?.0.value().1.to_owned());
            }
            let mut links = tx.open_table(BLOB_LINKS).map_err(db_err)?;
            for r in repos {
                by.remove((ds.as_str(), r.as_str())).map_err(db_err)?;
                links.remove((r.as_str(), ds.as_str())).map_err(db_err)?;
            }
            Ok(())
        })
    }

    /// Whether a repository exists (holds or held a blob or manifest).
    pub fn repo_exists(&self, repo: &str) -> Result<bool> {
        let t = self.read()?.open_table(REPOS).map_err(db_err)?;
        Ok(t.get(repo).map_err(db_err)?.is_some())
    }

    /// Tags of `repo` after `last`, at most `n`, sorted.
    pub fn tags(&self, repo: &str, last: Option<&str>, n: usize) -> Result<Page> {
        let t = self.read()?.open_table(TAGS).map_err(db_err)?;
        let start = last.unwrap_or("");
        let mut names = Vec::new();
        let mut more = false;
        for e in t.range((repo, start)..(repo, HIGH)).map_err(db_err)? {
            let (k, _) = e.map_err(db_err)?;
            let tag = k.value().1;
            if last == Some(tag) {
                continue;
            }
            if names.len() == n {
                more = true;
                break;
            }
            names.push(tag.to_owned());
        }
        Ok(Page { names, more })
    }

    /// Repositories after `last`, at most `n`, sorted: a range read of one table.
    pub fn catalog(&self, last: Option<&str>, n: usize) -> Result<Page> {
        let t = self.read()?.open_table(REPOS).map_err(db_err)?;
        let mut names = Vec::new();
        let mut more = false;
        let iter = match last {
            Some(l) => t.range::<&str>((std::ops::Bound::Excluded(l), std::ops::Bound::Unbounded)).map_err(db_err)?,
            None => t.iter().map_err(db_err)?,
        };
        for e in iter {
            let (k, _) = e.map_err(db_err)?;
            if names.len() == n {
                more = true;
                break;
            }
            names.push(k.value().to_owned());
        }
        Ok(Page { names, more })
    }

    /// The manifests in `repo` whose subject is `subject`.
    pub fn referrers(&self, repo: &str, subject: &Digest) -> Result<Vec<(Digest, ManifestInfo)>> {
        let ss = subject.to_string();
        let tx = self.read()?;
        let refs = tx.open_table(REFERRERS).map_err(db_err)?;
        let manifests = tx.open_table(MANIFESTS).map_err(db_err)?;
        let mut out = Vec::new();
        for e in refs.range((repo, ss.as_str(), "")..(repo, ss.as_str(), HIGH)).map_err(db_err)? {
            let (k, _) = e.map_err(db_err)?;
            let referrer = k.value().2;
            if let Some(v) = manifests.get((repo, referrer)).map_err(db_err)? {
                let info: ManifestInfo = serde_json::from_slice(v.value()).map_err(db_err)?;
                out.push((referrer.parse().map_err(db_err)?, info));
            }
        }
        Ok(out)
    }

    /// Every tag: (repository, tag, digest).
    pub fn all_tags(&self) -> Result<Vec<(String, String, Digest)>> {
        let t = self.read()?.open_table(TAGS).map_err(db_err)?;
        let mut out = Vec::new();
        for e in t.iter().map_err(db_err)? {
            let (k, v) = e.map_err(db_err)?;
            let (r, tag) = k.value();
            out.push((r.to_owned(), tag.to_owned(), v.value().parse().map_err(db_err)?));
        }
        Ok(out)
    }

    /// Every manifest link: (repository, digest).
    pub fn manifest_links(&self) -> Result<Vec<(String, Digest)>> {
        pairs(&self.read()?.open_table(MANIFESTS).map_err(db_err)?)
    }

    /// Every blob link: (repository, digest).
    pub fn blob_links(&self) -> Result<Vec<(String, Digest)>> {
        pairs(&self.read()?.open_table(BLOB_LINKS).map_err(db_err)?)
    }
}

fn pairs<V: redb::Value + 'static>(t: &impl ReadableTable<(&'static str, &'static str), V>) -> Result<Vec<(String, Digest)>> {
    let mut out = Vec::new();
    for e in t.iter().map_err(db_err)? {
        let (k, _) = e.map_err(db_err)?;
        let (r, d) = k.value();
        out.push((r.to_owned(), d.parse().map_err(db_err)?));
    }
    Ok(out)
}
