//! `git push` deploys: a bare repository per app under the controller's data folder, its
//! `post-receive` hook calling `minipaas hook`, which asks the controller to build the
//! pushed commit ([`ImageBuilder`]: its Dockerfile, with Docker, pushed to the registry)
//! and release it. The hook's output is the build's, so the pusher sees it as git's
//! `remote:` lines. A commit carrying `minipaas.toml` replaces the app's manifest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::platform::{Platform, PlatformError};

/// The manifest file a commit may carry.
pub const MANIFEST_FILE: &str = "minipaas.toml";

/// Builds a commit of an app's repository into an image in the registry.
pub trait ImageBuilder: Send + Sync + std::fmt::Debug {
    /// Builds `rev` of `repo` for `app`, reporting progress; returns (commit, image).
    fn build<'a>(
        &'a self,
        repo: &'a Path,
        rev: &'a str,
        app: &'a str,
        progress: &'a mut (dyn FnMut(&str) + Send),
    ) -> BoxFuture<'a, Result<(String, String), String>>;
}

/// A push to release.
#[derive(Clone, Copy, Debug)]
pub struct Push<'a> {
    /// The app.
    pub app: &'a str,
    /// The commit pushed.
    pub rev: &'a str,
    /// Who pushed.
    pub by: &'a str,
    /// How long to wait for its release to go live.
    pub rollout_timeout: Duration,
}

/// The apps' bare repositories.
#[derive(Clone, Debug)]
pub struct GitRepos {
    root: PathBuf,
    hook: String,
}

impl GitRepos {
    /// Repositories under `root`; each one's `post-receive` runs `hook_command` with the
    /// app's name appended (a shell command line, e.g. `'/usr/bin/minipaas' hook --controller
    /// http://127.0.0.1:7800 --app`).
    pub fn new(root: impl Into<PathBuf>, hook_command: impl Into<String>) -> GitRepos {
        GitRepos { root: root.into(), hook: hook_command.into() }
    }

    /// Where `app`'s repository is (what `git push` is given).
    pub fn path(&self, app: &str) -> PathBuf {
        self.root.join(format!("{app}.git"))
    }

    /// Creates `app`'s bare repository with its hook (again if it is there: the hook is
    /// rewritten, the history kept).
    pub fn init(&self, app: &str) -> Result<PathBuf, PlatformError> {
        let repo = self.path(app);
        std::fs::create_dir_all(&self.root).map_err(|e| io_error(&self.root, e))?;
        git(&self.root, &["init", "-q", "--bare", "-b", "main", path_str(&repo)?])?;
        let hook = repo.join("hooks").join("post-receive");
        std::fs::write(&hook, format!("#!/bin/sh\n# minipaas: build and release what was pushed.\nexec {} {app}\n", self.hook))
            .map_err(|e| io_error(&hook, e))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).map_err(|e| io_error(&hook, e))?;
        Ok(repo)
    }

    /// Removes `app`'s repository.
    pub fn remove(&self, app: &str) -> Result<(), PlatformError> {
        let repo = self.path(app);
        match std::fs::remove_dir_all(&repo) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(&repo, e)),
        }
    }

    /// Builds `rev` of `app`'s repository and releases it: the commit's manifest (if it
    /// has one) becomes the app's, the image goes to every service that builds, and this
    /// waits for the rollout to end. Progress goes to `progress` line by line.
    pub async fn deploy_push(
        &self,
        platform: &Platform,
        builder: &dyn ImageBuilder,
        push: &Push<'_>,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Vec<(String, u64)>, PlatformError> {
        let Push { app, rev, by, rollout_timeout } = *push;
        platform.apps.get(app).await?;
        let repo = self.path(app);
        if let Some(manifest) = file_at(&repo, rev, MANIFEST_FILE)? {
            platform.apps.set_manifest(app, &manifest).await?;
            progress(&format!("{MANIFEST_FILE}: the app's manifest now"));
        }
        let (commit, image) = builder.build(&repo, rev, app, progress).await.map_err(PlatformError::Invalid)?;
        let short = &commit[..12.min(commit.len())];
        let made = platform.releases.deploy(app, &image, by, &format!("git push {short}")).await?;
        for (service, version) in &made {
            progress(&format!("{service}: release v{version} rolling out"));
        }
        let deadline = Instant::now() + rollout_timeout;
        for (service, version) in &made {
            wait_live(platform, app, service, *version, deadline).await?;
            progress(&format!("{service}: v{version} is live"));
        }
        Ok(made)
    }
}

/// Waits until release `version` of `service` is the stable one with every task healthy
/// in the catalog; an error when its rollout ended otherwise or `deadline` passes.
pub async fn wait_live(platform: &Platform, app: &str, service: &str, version: u64, deadline: Instant) -> Result<(), PlatformError> {
    loop {
        if let Some(s) = platform.store.group_state(app, service).await? {
            if s.deployment.is_none() && s.stable != version && s.stable != 0 {
                return Err(PlatformError::Invalid(format!(
                    "{service}: v{version} did not go live ({:?}); v{} runs",
                    s.last_outcome, s.stable
                )));
            }
            if s.deployment.is_none() && s.stable == version {
                let healthy = platform.ps(app).await?.iter().filter(|i| i.service == service && i.release == version && i.healthy).count();
                if healthy >= s.count as usize {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            return Err(PlatformError::Invalid(format!("{service}: v{version} is not live in time; see minipaas ps and minipaas logs")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `path` in commit `rev` of `repo`, if the commit has it.
fn file_at(repo: &Path, rev: &str, path: &str) -> Result<Option<String>, PlatformError> {
    if rev.starts_with('-') || rev.contains(':') {
        return Err(PlatformError::Invalid(format!("revision {rev:?}")));
    }
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["show", &format!("{rev}:{path}")])
        .output()
        .map_err(|e| PlatformError::Unavailable(format!("git: {e}")))?;
    if out.status.success() {
        Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
    } else {
        Ok(None)
    }
}

fn git(dir: &Path, args: &[&str]) -> Result<(), PlatformError> {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().map_err(|e| PlatformError::Unavailable(format!("git: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(PlatformError::Unavailable(format!("git {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
    }
}

fn path_str(p: &Path) -> Result<&str, PlatformError> {
    p.to_str().ok_or_else(|| PlatformError::Invalid(format!("{}: not UTF-8", p.display())))
}

fn io_error(path: &Path, e: std::io::Error) -> PlatformError {
    PlatformError::Unavailable(format!("{}: {e}", path.display()))
}

/// Builds with the Docker Engine here and pushes to a registry
/// ([`crate::git_build::build_and_push`]): images are `<registry>/<app>:<commit>`.
#[cfg(feature = "docker")]
#[derive(Debug)]
pub struct DockerBuilder {
    /// The engine.
    pub images: keelson_scheduler::DockerImages,
    /// The registry, as image names spell it (`127.0.0.1:5000`).
    pub registry: String,
    /// Its credentials.
    pub auth: Option<keelson_scheduler::RegistryAuth>,
}

#[cfg(feature = "docker")]
impl ImageBuilder for DockerBuilder {
    fn build<'a>(
        &'a self,
        repo: &'a Path,
        rev: &'a str,
        app: &'a str,
        progress: &'a mut (dyn FnMut(&str) + Send),
    ) -> BoxFuture<'a, Result<(String, String), String>> {
        Box::pin(async move {
            let mut build = crate::git_build::CommitBuild::new(repo, rev, format!("{}/{app}", self.registry));
            build.auth = self.auth.clone();
            build.labels.push(("keelson.minipaas.app".into(), app.into()));
            let built = crate::git_build::build_and_push(&self.images, &build, progress).await.map_err(|e| e.to_string())?;
            Ok((built.commit, built.image))
        })
    }
}
