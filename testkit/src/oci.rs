//! OCI image layouts written from nothing, for registry tests and benches: layers are
//! real tar archives of pseudo-random (incompressible) bytes, configs name their
//! diff ids, and several platforms make an image index.

use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::tools::{io, TestkitError};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `n` pseudo-random bytes from `seed` (xorshift: fast, and the same seed gives the same bytes).
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.truncate(n);
    out
}

fn write_blob(dir: &Path, bytes: &[u8]) -> Result<String, TestkitError> {
    let d = digest(bytes);
    let path = dir.join("blobs/sha256").join(&d[7..]);
    std::fs::write(&path, bytes).map_err(io(format!("writing {}", path.display())))?;
    Ok(d)
}

fn layer_tar(size: usize, seed: u64) -> Result<Vec<u8>, TestkitError> {
    let mut builder = tar::Builder::new(Vec::new());
    let data = random_bytes(size, seed);
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    builder.append_data(&mut header, format!("data/{seed}.bin"), data.as_slice()).map_err(io("building a layer"))?;
    builder.into_inner().map_err(io("building a layer"))
}

/// One platform's image: a manifest, its config and layers. Returns the manifest's
/// descriptor as JSON.
fn image(dir: &Path, os: &str, arch: &str, layer_sizes: &[usize], seed: u64) -> Result<serde_json::Value, TestkitError> {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, size) in layer_sizes.iter().enumerate() {
        let tar = layer_tar(*size, seed.wrapping_mul(1000).wrapping_add(i as u64))?;
        let d = write_blob(dir, &tar)?;
        diff_ids.push(d.clone());
        layers.push(serde_json::json!({"mediaType": LAYER, "digest": d, "size": tar.len()}));
    }
    let config = serde_json::json!({
        "architecture": arch, "os": os,
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string();
    let config_d = write_blob(dir, config.as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config_d, "size": config.len()},
        "layers": layers,
    })
    .to_string();
    let d = write_blob(dir, manifest.as_bytes())?;
    Ok(serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d, "size": manifest.len(), "platform": {"os": os, "architecture": arch}}))
}

/// Writes an OCI layout in `dir` holding one image named `tag`: for one platform an
/// image manifest, for several an index of them. `seed` varies the layer bytes.
/// Returns the digest of the top manifest.
pub fn write_layout(dir: &Path, tag: &str, platforms: &[(&str, &str)], layer_sizes: &[usize], seed: u64) -> Result<String, TestkitError> {
    std::fs::create_dir_all(dir.join("blobs/sha256")).map_err(io("creating the layout"))?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io("writing oci-layout"))?;
    let mut descriptors = Vec::new();
    for (i, (os, arch)) in platforms.iter().enumerate() {
        descriptors.push(image(dir, os, arch, layer_sizes, seed.wrapping_add(i as u64 * 7919))?);
    }
    let mut top = if descriptors.len() == 1 {
        let mut d = descriptors.remove(0);
        d.as_object_mut().map(|o| o.remove("platform"));
        d
    } else {
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}).to_string();
        let d = write_blob(dir, index.as_bytes())?;
        serde_json::json!({"mediaType": OCI_INDEX, "digest": d, "size": index.len()})
    };
    top["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let top_digest = top["digest"].as_str().unwrap_or_default().to_owned();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [top]});
    std::fs::write(dir.join("index.json"), index.to_string()).map_err(io("writing index.json"))?;
    Ok(top_digest)
}

/// Every blob file of a layout: (name, digest of its bytes), sorted: two layouts whose
/// lists are equal hold the same bytes.
pub fn blobs(dir: &Path) -> Result<Vec<(String, String)>, TestkitError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir.join("blobs/sha256")).map_err(io("listing blobs"))? {
        let e = e.map_err(io("listing blobs"))?;
        let bytes = std::fs::read(e.path()).map_err(io("reading a blob"))?;
        out.push((e.file_name().to_string_lossy().into_owned(), digest(&bytes)));
    }
    out.sort();
    Ok(out)
}
