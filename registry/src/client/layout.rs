//! Images between a registry and an OCI image layout directory (`oci-layout`,
//! `index.json`, `blobs/sha256/…`), as skopeo, buildah and `docker buildx --output
//! type=oci` write them. Multi-architecture images (an index) move whole.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;

use super::{Client, Progress};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{ManifestInfo, OCI_INDEX};
use crate::reference::RepoName;

/// The annotation naming an image in an OCI layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn blob_path(dir: &Path, d: &Digest) -> PathBuf {
    dir.join("blobs/sha256").join(d.hex())
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

fn layout_error(dir: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidInput { field: "OCI layout", value: dir.display().to_string(), reason: reason.into() }
}

/// The top manifest of the layout: the `index.json` entry named `tag`, else its only entry.
fn top_entry(dir: &Path, index: &serde_json::Value, tag: &str) -> Result<(Digest, String)> {
    let entries = index["manifests"].as_array().ok_or_else(|| layout_error(dir, "index.json has no manifests"))?;
    let named = entries.iter().find(|e| e["annotations"][REF_NAME].as_str() == Some(tag));
    let entry = match (named, entries.len()) {
        (Some(e), _) => e,
        (None, 1) => &entries[0],
        (None, n) => return Err(layout_error(dir, format!("{n} images and none named {tag:?}"))),
    };
    let d: Digest = entry["digest"].as_str().unwrap_or("").parse().map_err(Error::from)?;
    let media_type = entry["mediaType"].as_str().unwrap_or("").to_owned();
    Ok((d, media_type))
}

/// What every step of one push shares.
#[derive(Clone, Copy)]
struct PushJob<'a> {
    dir: &'a Path,
    repo: &'a RepoName,
    mount_from: &'a [RepoName],
    progress: &'a dyn Progress,
}

impl Client {
    /// Pushes the image of the OCI layout `dir` (the `index.json` entry named `tag`,
    /// or its only one) to `repo:tag`: blobs in parallel, each mounted from one of
    /// `mount_from` when it holds it, then manifests bottom-up. Returns the digest of
    /// the top manifest.
    pub async fn push_oci_layout(
        &self,
        dir: &Path,
        repo: &RepoName,
        tag: &str,
        mount_from: &[RepoName],
        progress: &dyn Progress,
    ) -> Result<Digest> {
        let text = tokio::fs::read(dir.join("index.json")).await.map_err(io(format!("reading {}/index.json", dir.display())))?;
        let index: serde_json::Value = serde_json::from_slice(&text).map_err(|e| layout_error(dir, format!("index.json: {e}")))?;
        let (top, media_type) = top_entry(dir, &index, tag)?;
        let job = PushJob { dir, repo, mount_from, progress };
        self.push_tree(&job, top, media_type, Some(tag)).await?;
        Ok(top)
    }

    fn push_tree<'a>(
        &'a self,
        job: &'a PushJob<'a>,
        d: Digest,
        media_type: String,
        tag: Option<&'a str>,
    ) -> futures::future::BoxFuture<'a, Result<()>> {
        let PushJob { dir, repo, mount_from, progress } = *job;
        Box::pin(async move {
            let path = blob_path(dir, &d);
            let bytes = tokio::fs::read(&path).await.map_err(io(format!("reading {}", path.display())))?;
            if Digest::of(&bytes) != d {
                return Err(layout_error(dir, format!("blob {d} does not hash to its name")));
            }
            let info = ManifestInfo::parse(&bytes, &media_type)?;
            for child in &info.manifests {
                let child_bytes = tokio::fs::read(blob_path(dir, child)).await.map_err(io(format!("reading manifest {child}")))?;
                let child_type = ManifestInfo::parse(&child_bytes, "")?.media_type;
                self.push_tree(job, *child, child_type, None).await?;
            }
            futures::stream::iter(info.blobs.iter().copied())
                .map(|b| async move {
                    let p = blob_path(dir, &b);
                    let size = tokio::fs::metadata(&p).await.map_err(io(format!("reading {}", p.display())))?.len();
                    self.push_blob_file(repo, &b, &p, size, mount_from, progress).await
                })
                .buffer_unordered(self.config.parallel.max(1))
                .try_collect::<Vec<_>>()
                .await?;
            let reference = tag.map_or_else(|| d.to_string(), str::to_owned);
            self.push_manifest(repo, &reference, Bytes::from(bytes), &info.media_type).await?;
            Ok(())
        })
    }

    /// Pulls `repo:reference` (a tag or digest) into the OCI layout `dir` (created if
    /// needed; blobs already there are kept), naming it `reference` in `index.json`.
    /// Blobs move in parallel, each resumable and verified. Returns the top digest.
    pub async fn pull_oci_layout(&self, repo: &RepoName, reference: &str, dir: &Path, progress: &dyn Progress) -> Result<Digest> {
        let blobs = dir.join("blobs/sha256");
        tokio::fs::create_dir_all(&blobs).await.map_err(io(format!("creating {}", blobs.display())))?;
        let (d, media_type, bytes) = self.manifest(repo, reference).await?;
        let size = bytes.len();
        self.pull_tree(repo, dir, d, bytes, &media_type, progress).await?;
        tokio::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .await
            .map_err(io(format!("writing {}/oci-layout", dir.display())))?;
        let index_path = dir.join("index.json");
        let mut entries: Vec<serde_json::Value> = match tokio::fs::read(&index_path).await {
            Ok(text) => {
                serde_json::from_slice::<serde_json::Value>(&text).ok().and_then(|v| v["manifests"].as_array().cloned()).unwrap_or_default()
            }
            Err(_) => Vec::new(),
        };
        entries.retain(|e| e["annotations"][REF_NAME].as_str() != Some(reference));
        let media_type = ManifestInfo::parse(&tokio::fs::read(blob_path(dir, &d)).await.unwrap_or_default(), &media_type)
            .map(|i| i.media_type)
            .unwrap_or(media_type);
        entries.push(json!({"mediaType": media_type, "digest": d.to_string(), "size": size, "annotations": {REF_NAME: reference}}));
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries});
        tokio::fs::write(&index_path, index.to_string()).await.map_err(io(format!("writing {}", index_path.display())))?;
        Ok(d)
    }

    fn pull_tree<'a>(
        &'a self,
        repo: &'a RepoName,
        dir: &'a Path,
        d: Digest,
        bytes: Bytes,
        media_type: &'a str,
        progress: &'a dyn Progress,
    ) -> futures::future::BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let info = ManifestInfo::parse(&bytes, media_type)?;
            for child in &info.manifests {
                let (cd, ct, cb) = self.manifest(repo, &child.to_string()).await?;
                self.pull_tree(repo, dir, cd, cb, &ct, progress).await?;
            }
            futures::stream::iter(info.blobs.iter().copied())
                .map(|b| async move {
                    let p = blob_path(dir, &b);
                    if super::hash_file(&p).await.ok() == Some(b) {
                        progress.done(&b, true);
                        return Ok(());
                    }
                    self.pull_blob_to_file(repo, &b, &p, progress).await.map(|_| ())
                })
                .buffer_unordered(self.config.parallel.max(1))
                .try_collect::<Vec<_>>()
                .await?;
            let path = blob_path(dir, &d);
            tokio::fs::write(&path, &bytes).await.map_err(io(format!("writing {}", path.display())))?;
            Ok(())
        })
    }
}
