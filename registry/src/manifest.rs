//! What the registry reads from a manifest: its media type, the blobs and manifests it
//! refers to (which must exist, and which garbage collection keeps), its subject and
//! artifact type (for the referrers API).

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Manifests this registry stores. Docker schema 1 is refused: it is deprecated, signed
/// over a mutable form, and no current client pushes it.
pub const ACCEPTED: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// Default cap on a manifest's size: the spec asks registries to accept at least 4 MiB.
pub const DEFAULT_MAX_MANIFEST: u64 = 4 << 20;

/// A content descriptor, as it appears in manifests and the referrers list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the content.
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Artifact type (referrers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
    /// Platform (index entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    schema_version: Option<u32>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    subject: Option<Descriptor>,
    annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

/// What the registry keeps about a stored manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestInfo {
    /// The media type it was stored with (and is served with).
    pub media_type: String,
    /// Its size.
    pub size: u64,
    /// Blobs it refers to: the config and the layers.
    pub blobs: Vec<Digest>,
    /// Manifests it refers to (an index's entries).
    pub manifests: Vec<Digest>,
    /// The manifest it is about, if it is a referrer.
    pub subject: Option<Digest>,
    /// Its artifact type: `artifactType`, else the config's media type.
    pub artifact_type: Option<String>,
    /// Its annotations.
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ManifestInfo {
    /// Parses `bytes` sent with `content_type` (empty if the client sent none).
    pub fn parse(bytes: &[u8], content_type: &str) -> Result<ManifestInfo> {
        let bad = |reason: String| Error::ManifestInvalid { reason };
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| bad(format!("not a JSON manifest: {e}")))?;
        if raw.schema_version != Some(2) {
            return Err(bad(format!("schemaVersion must be 2, not {:?}", raw.schema_version)));
        }
        let content_type = content_type.split(';').next().unwrap_or("").trim();
        let declared = raw.media_type.as_deref();
        let media_type = match (content_type, declared) {
            ("" | "application/json" | "application/octet-stream", Some(d)) => d.to_owned(),
            ("" | "application/json" | "application/octet-stream", None) => {
                if raw.manifests.is_empty() { OCI_MANIFEST } else { OCI_INDEX }.to_owned()
            }
            (c, Some(d)) if c != d => return Err(bad(format!("Content-Type {c:?} differs from the manifest's mediaType {d:?}"))),
            (c, _) => c.to_owned(),
        };
        if !ACCEPTED.contains(&media_type.as_str()) {
            return Err(bad(format!("media type {media_type:?} is not one of {}", ACCEPTED.join(", "))));
        }
        let is_index = media_type == OCI_INDEX || media_type == DOCKER_LIST;
        let mut blobs = Vec::new();
        if is_index {
            if raw.config.is_some() || !raw.layers.is_empty() {
                return Err(bad("an index has no config or layers".into()));
            }
        } else {
            let config = raw.config.as_ref().ok_or_else(|| bad("an image manifest needs a config".into()))?;
            if !raw.manifests.is_empty() {
                return Err(bad("an image manifest has no manifests list".into()));
            }
            blobs.push(config.digest);
            blobs.extend(raw.layers.iter().map(|l| l.digest));
        }
        blobs.sort();
        blobs.dedup();
        let mut manifests: Vec<Digest> = raw.manifests.iter().map(|m| m.digest).collect();
        manifests.sort();
        manifests.dedup();
        let artifact_type = raw.artifact_type.or_else(|| if is_index { None } else { raw.config.map(|c| c.media_type) });
        Ok(ManifestInfo {
            media_type,
            size: bytes.len() as u64,
            blobs,
            manifests,
            subject: raw.subject.map(|s| s.digest),
            artifact_type,
            annotations: raw.annotations,
        })
    }

    /// The descriptor of this manifest, as the referrers list shows it.
    pub fn descriptor(&self, digest: Digest) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest,
            size: self.size,
            artifact_type: self.artifact_type.clone(),
            annotations: self.annotations.clone(),
            platform: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_references_and_refuses_what_it_cannot_store() {
        let c = Digest::of(b"config");
        let l = Digest::of(b"layer");
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.example+json","digest":"{c}","size":6}},"layers":[{{"mediaType":"x","digest":"{l}","size":5}}]}}"#
        );
        let info = ManifestInfo::parse(m.as_bytes(), OCI_MANIFEST).expect("parses");
        assert_eq!(info.blobs.len(), 2);
        assert_eq!(info.artifact_type.as_deref(), Some("application/vnd.example+json"));
        assert!(ManifestInfo::parse(m.as_bytes(), DOCKER_MANIFEST).is_err(), "content type contradicts mediaType");
        assert!(ManifestInfo::parse(b"{", "").is_err());
        assert!(ManifestInfo::parse(br#"{"schemaVersion":1}"#, "").is_err());
        let bad_digest = m.replace(&c.to_string(), "sha256:1234");
        assert!(ManifestInfo::parse(bad_digest.as_bytes(), "").is_err());
    }
}
