//! From a commit in a git repository to an image in a registry: the commit's tree is
//! exported into a fresh folder (`git archive`, so the repository, bare or not, is only
//! read), its Dockerfile built, the image pushed. What `pipeline` does on every push and
//! what minipaas's git deploys do, with each step's output handed to one progress
//! callback.
//!
//! ```no_run
//! # async fn demo() -> Result<(), keelson_examples::git_build::GitBuildError> {
//! use keelson_examples::git_build::{build_and_push, CommitBuild};
//! let images = keelson_scheduler::DockerImages::connect().await?;
//! let build = CommitBuild::new("/srv/git/shop.git", "main", "127.0.0.1:5000/shop");
//! let built = build_and_push(&images, &build, &mut |line| eprintln!("{line}")).await?;
//! println!("{} is {}", built.image, built.commit);
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};

use keelson_scheduler::{BuildRequest, DockerImages, RegistryAuth};

/// Why a commit could not become an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GitBuildError {
    /// git could not read the commit.
    #[error("git: {0}")]
    Git(String),
    /// The commit has no Dockerfile where expected.
    #[error("commit {commit}: no {dockerfile} at the top of its tree")]
    NoDockerfile {
        /// The commit.
        commit: String,
        /// The Dockerfile looked for.
        dockerfile: String,
    },
    /// The registry refused the credentials (checked before building: the engine
    /// retries a refused push for most of a minute before it gives up).
    #[error("registry {registry} refused the credentials of {user:?}: {reason}")]
    Refused {
        /// The registry.
        registry: String,
        /// The user.
        user: String,
        /// What it answered.
        reason: String,
    },
    /// The registry could not be asked (down, unreachable, not a registry).
    #[error("registry {registry}: {reason}")]
    Registry {
        /// The registry.
        registry: String,
        /// What failed.
        reason: String,
    },
    /// Building or pushing failed (the error carries the build's last lines).
    #[error(transparent)]
    Image(#[from] keelson_scheduler::Error),
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

/// What to build.
#[derive(Clone, Debug)]
pub struct CommitBuild {
    /// The repository (a bare one, or a checkout's `.git`).
    pub repo: PathBuf,
    /// A commit, branch or tag.
    pub rev: String,
    /// The image's repository, with its registry (`127.0.0.1:5000/shop`); the tag is
    /// the commit's first 12 hex digits.
    pub repository: String,
    /// The Dockerfile, relative to the tree's top (default `Dockerfile`).
    pub dockerfile: String,
    /// Credentials for the registry.
    pub auth: Option<RegistryAuth>,
    /// Labels on the image (the commit is always one: `keelson.git.commit`).
    pub labels: Vec<(String, String)>,
}

impl CommitBuild {
    /// Builds `rev` of `repo` as `repository:<commit>`.
    pub fn new(repo: impl Into<PathBuf>, rev: impl Into<String>, repository: impl Into<String>) -> Self {
        CommitBuild {
            repo: repo.into(),
            rev: rev.into(),
            repository: repository.into(),
            dockerfile: "Dockerfile".into(),
            auth: None,
            labels: Vec::new(),
        }
    }
}

/// A built and pushed commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltCommit {
    /// The full commit id.
    pub commit: String,
    /// The image reference pushed (`repository:<commit[..12]>`).
    pub image: String,
    /// The manifest digest the registry took, when the engine said.
    pub digest: Option<String>,
    /// The engine's id of the image.
    pub image_id: String,
}

fn git(repo: &Path, args: &[&str]) -> Result<Vec<u8>, GitBuildError> {
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(repo)
        .args(args)
        .output()
        .map_err(|e| GitBuildError::Git(format!("running git: {e}")))?;
    if !out.status.success() {
        return Err(GitBuildError::Git(format!("git {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(out.stdout)
}

/// The full id of `rev` in `repo`.
pub fn resolve(repo: &Path, rev: &str) -> Result<String, GitBuildError> {
    let out = git(repo, &["rev-parse", "--verify", "--quiet", &format!("{rev}^{{commit}}")])?;
    Ok(String::from_utf8_lossy(&out).trim().to_owned())
}

/// Exports the tree of `commit` into `into` (which should be empty).
pub fn export_commit(repo: &Path, commit: &str, into: &Path) -> Result<(), GitBuildError> {
    let tar = git(repo, &["archive", "--format=tar", commit])?;
    let mut archive = tar::Archive::new(std::io::Cursor::new(tar));
    archive.set_preserve_permissions(true);
    archive.unpack(into).map_err(|source| GitBuildError::Io { context: format!("unpacking {commit} into {}", into.display()), source })
}

/// Asks the registry whether `auth` may push to `repository` (a token or basic-auth
/// round trip on `/v2/`), so that wrong credentials fail at once.
pub async fn check_credentials(auth: &RegistryAuth, repository: &str) -> Result<(), GitBuildError> {
    let refused = |reason: String| GitBuildError::Refused { registry: auth.server.clone(), user: auth.username.clone(), reason };
    // The engine speaks plain HTTP only to registries on loopback; so does this check.
    let host = auth.server.rsplit_once(':').map_or(auth.server.as_str(), |(h, _)| h);
    let scheme = if host == "localhost" || host.starts_with("127.") || host == "[::1]" { "http" } else { "https" };
    let client = keelson_registry::client::Client::new(
        &format!("{scheme}://{}", auth.server),
        Some(keelson_registry::client::Credentials::new(auth.username.clone(), auth.password())),
        keelson_registry::client::ClientConfig::default(),
    )
    .map_err(|e| GitBuildError::Registry { registry: auth.server.clone(), reason: e.to_string() })?;
    let path = repository.split_once('/').map_or("", |(_, p)| p);
    let scopes = [format!("repository:{path}:push,pull")];
    let answer = client
        .raw(http::Method::GET, "/v2/", &[], bytes::Bytes::new(), &scopes)
        .await
        .map_err(|e| GitBuildError::Registry { registry: auth.server.clone(), reason: e.to_string() })?;
    match answer.status {
        s if s.is_success() => Ok(()),
        s @ (http::StatusCode::UNAUTHORIZED | http::StatusCode::FORBIDDEN) => Err(refused(format!("{s} on /v2/"))),
        s => Err(GitBuildError::Registry { registry: auth.server.clone(), reason: format!("{s} on /v2/") }),
    }
}

/// A commit built on the local engine, with its tree (kept while the value lives, for
/// tests that read it).
#[derive(Debug)]
pub struct LocalBuild {
    /// The full commit id.
    pub commit: String,
    /// The image reference (`repository:<commit[..12]>`).
    pub image: String,
    /// The engine's id of the image.
    pub image_id: String,
    /// The commit's tree.
    pub tree: tempfile::TempDir,
}

/// Exports `build.rev` and builds its Dockerfile on the local engine (after checking the
/// registry credentials, so a push would not be refused after a long build); every line
/// goes to `progress`.
pub async fn build_commit(
    images: &DockerImages,
    build: &CommitBuild,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<LocalBuild, GitBuildError> {
    let commit = resolve(&build.repo, &build.rev)?;
    if let Some(auth) = &build.auth {
        check_credentials(auth, &build.repository).await?;
    }
    let tree = tempfile::tempdir().map_err(|source| GitBuildError::Io { context: "a folder for the commit's tree".into(), source })?;
    progress(&format!("checking out {}", &commit[..12.min(commit.len())]));
    export_commit(&build.repo, &commit, tree.path())?;
    if !tree.path().join(&build.dockerfile).is_file() {
        return Err(GitBuildError::NoDockerfile { commit, dockerfile: build.dockerfile.clone() });
    }
    let image = format!("{}:{}", build.repository, &commit[..12.min(commit.len())]);
    let mut request =
        BuildRequest::new(tree.path(), &image).with_dockerfile(build.dockerfile.clone()).with_label("keelson.git.commit", &commit);
    for (k, v) in &build.labels {
        request = request.with_label(k, v);
    }
    progress(&format!("building {image}"));
    let image_id = images.build(&request, progress).await?;
    Ok(LocalBuild { commit, image, image_id, tree })
}

/// Pushes a local build to its registry.
pub async fn push_build(
    images: &DockerImages,
    local: &LocalBuild,
    auth: Option<&RegistryAuth>,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<BuiltCommit, GitBuildError> {
    progress(&format!("pushing {}", local.image));
    let digest = images.push(&local.image, auth, progress).await?;
    Ok(BuiltCommit { commit: local.commit.clone(), image: local.image.clone(), digest, image_id: local.image_id.clone() })
}

/// Exports `build.rev`, builds its Dockerfile and pushes the image: [`build_commit`]
/// then [`push_build`].
pub async fn build_and_push(
    images: &DockerImages,
    build: &CommitBuild,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<BuiltCommit, GitBuildError> {
    let local = build_commit(images, build, progress).await?;
    push_build(images, &local, build.auth.as_ref(), progress).await
}
