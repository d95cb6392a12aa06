//! The baseline snapshot and the suite layer on top of it.
//!
//! The snapshot is tagged with a hash of its inputs (the recipe, and every file of a
//! Dockerfile's context), so `quick` finds the one that matches the recipe as it is now
//! and never reuses one made from an older recipe. The modules are not in the snapshot
//! (editing a module must not invalidate it): a thin layer `FROM <snapshot>` copies the
//! module folders to `/testgrid/modules`, tagged by the hash of the snapshot and the
//! modules, so an unchanged suite reuses it too.

use std::io::Read;
use std::path::Path;

use keelson_scheduler::{BuildRequest, DockerImages};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::suite::{Recipe, Suite, MODULES_IN_IMAGE};
use super::TestgridError;

/// Repository of baseline snapshots.
pub const SNAPSHOT_REPO: &str = "testgrid-baseline";
/// Repository of suite layers.
pub const SUITE_REPO: &str = "testgrid-suite";

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestgridError {
    let context = context.into();
    move |source| TestgridError::Io { context, source }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds every file under `dir` into `hash`, in name order: its path, whether it is
/// executable, and its bytes (a symlink: its target).
fn hash_tree(hash: &mut Sha256, dir: &Path, base: &Path) -> Result<(), TestgridError> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io(format!("reading {}", dir.display())))?
        .collect::<Result<_, _>>()
        .map_err(io(format!("reading {}", dir.display())))?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        let rel = path.strip_prefix(base).unwrap_or(&path).to_string_lossy().into_owned();
        let meta = std::fs::symlink_metadata(&path).map_err(io(format!("reading {}", path.display())))?;
        if meta.is_dir() {
            hash.update(format!("dir {rel}\n"));
            hash_tree(hash, &path, base)?;
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).map_err(io(format!("reading {}", path.display())))?;
            hash.update(format!("link {rel} {}\n", target.display()));
        } else {
            let exec = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0;
            hash.update(format!("file {rel} {exec} {}\n", meta.len()));
            let mut file = std::fs::File::open(&path).map_err(io(format!("reading {}", path.display())))?;
            let mut buf = vec![0; 64 * 1024];
            loop {
                let n = file.read(&mut buf).map_err(io(format!("reading {}", path.display())))?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
            }
        }
    }
    Ok(())
}

/// The hash of what the snapshot is made from (hex).
pub fn baseline_inputs(suite: &Suite) -> Result<String, TestgridError> {
    let mut hash = Sha256::new();
    hash.update(b"testgrid baseline v1\n");
    match &suite.baseline.recipe {
        Recipe::Dockerfile { context, dockerfile } => {
            hash.update(format!("dockerfile {dockerfile}\n"));
            hash_tree(&mut hash, context, context)?;
        }
        Recipe::Setup { from, command } => {
            hash.update(format!("setup from {from}\n"));
            for arg in command {
                hash.update(format!("arg {} {arg}\n", arg.len()));
            }
        }
        Recipe::Image { image } => hash.update(format!("image {image}\n")),
    }
    Ok(hex(&hash.finalize()))
}

/// The snapshot's tag: the image itself for an image recipe, else named by the hash of
/// the recipe's inputs.
pub fn snapshot_tag(suite: &Suite) -> Result<String, TestgridError> {
    Ok(match &suite.baseline.recipe {
        Recipe::Image { image } => image.clone(),
        _ => format!("{SNAPSHOT_REPO}:{}", &baseline_inputs(suite)?[..16]),
    })
}

/// What is remembered of a snapshot: when it was made and how its own test went.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaselineRecord {
    /// Its tag.
    pub tag: String,
    /// The engine's image id.
    pub image_id: String,
    /// When it was made (RFC 3339).
    pub built_at: String,
    /// How long making it took, in seconds.
    pub build_seconds: f64,
    /// Its test's result, when it has one.
    pub test: Option<super::runner::TestOutcome>,
}

impl BaselineRecord {
    fn path(state_dir: &Path, tag: &str) -> std::path::PathBuf {
        let name: String = tag.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' }).collect();
        state_dir.join(format!("{name}.json"))
    }

    /// The record of `tag`, if this state folder has one.
    pub fn load(state_dir: &Path, tag: &str) -> Option<BaselineRecord> {
        let text = std::fs::read_to_string(Self::path(state_dir, tag)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Keeps the record (written whole, then renamed).
    pub fn save(&self, state_dir: &Path) -> Result<(), TestgridError> {
        std::fs::create_dir_all(state_dir).map_err(io(format!("creating {}", state_dir.display())))?;
        let path = Self::path(state_dir, &self.tag);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(|e| io("encoding the baseline record")(std::io::Error::other(e)))?;
        std::fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io(format!("writing {}", path.display())))
    }
}

/// Makes the snapshot as `tag` from the suite's recipe, each line of the build going to
/// `progress`; returns the image id.
pub async fn build_snapshot(
    images: &DockerImages,
    suite: &Suite,
    tag: &str,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<String, TestgridError> {
    let id = match &suite.baseline.recipe {
        Recipe::Dockerfile { context, dockerfile } => {
            let request = BuildRequest::new(context, tag).with_dockerfile(dockerfile.clone()).with_label("keelson.testgrid", "baseline");
            images.build(&request, progress).await?
        }
        Recipe::Setup { from, command } => {
            let labels = [("keelson.testgrid".to_owned(), "baseline".to_owned())].into();
            images.commit_setup(from, command, tag, &labels, progress).await?
        }
        Recipe::Image { image } => images.id_of(image).await?.ok_or_else(|| {
            TestgridError::Scheduler(keelson_scheduler::Error::ImageUnavailable {
                image: image.clone(),
                reason: "the baseline image is not on this engine".into(),
            })
        })?,
    };
    Ok(id)
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), TestgridError> {
    std::fs::create_dir_all(to).map_err(io(format!("creating {}", to.display())))?;
    for entry in std::fs::read_dir(from).map_err(io(format!("reading {}", from.display())))? {
        let entry = entry.map_err(io(format!("reading {}", from.display())))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().map_err(io(format!("reading {}", src.display())))?;
        if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&src).map_err(io(format!("reading {}", src.display())))?;
            std::os::unix::fs::symlink(target, &dst).map_err(io(format!("writing {}", dst.display())))?;
        } else {
            std::fs::copy(&src, &dst).map_err(io(format!("copying {}", src.display())))?;
        }
    }
    Ok(())
}

/// The image every module's test runs from: the snapshot plus the module folders, built
/// unless one with the same snapshot and modules exists. Returns its tag.
pub async fn suite_image(
    images: &DockerImages,
    suite: &Suite,
    snapshot_tag: &str,
    snapshot_id: &str,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<String, TestgridError> {
    let modules = suite.modules_root();
    let mut hash = Sha256::new();
    hash.update(format!("testgrid suite v1\n{snapshot_id}\n"));
    hash_tree(&mut hash, &modules, &modules)?;
    let tag = format!("{SUITE_REPO}:{}", &hex(&hash.finalize())[..16]);
    if images.id_of(&tag).await?.is_some() {
        return Ok(tag);
    }
    let context = tempfile::tempdir().map_err(io("creating the suite layer's build context"))?;
    copy_tree(&modules, &context.path().join("modules"))?;
    let dockerfile = format!("FROM {snapshot_tag}\nCOPY modules {MODULES_IN_IMAGE}\n");
    std::fs::write(context.path().join("Dockerfile"), dockerfile).map_err(io("writing the suite layer's Dockerfile"))?;
    let request = BuildRequest::new(context.path(), &tag).with_label("keelson.testgrid", "suite");
    images.build(&request, progress).await?;
    Ok(tag)
}
