//! Making images on a Docker Engine: building from a directory with a Dockerfile, and
//! snapshotting the result of a setup command (run in a container from a base image, then
//! committed). What a test grid's baseline and a pipeline's build step need, with the
//! build's progress handed to the caller line by line.
//!
//! ```no_run
//! # async fn demo() -> keelson_scheduler::Result<()> {
//! use keelson_scheduler::{BuildRequest, DockerImages, RegistryAuth};
//! let images = DockerImages::connect().await?;
//! let request = BuildRequest::new("./app", "127.0.0.1:5000/shop:v1").with_label("team", "shop");
//! let id = images.build(&request, &mut |line| eprintln!("{line}")).await?;
//! let auth = RegistryAuth::new("127.0.0.1:5000", "ci", "secret-from-a-file")?;
//! let digest = images.push("127.0.0.1:5000/shop:v1", Some(&auth), &mut |line| eprintln!("{line}")).await?;
//! println!("{id} pushed as {digest:?}");
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CommitContainerOptionsBuilder, CreateContainerOptionsBuilder, LogsOptionsBuilder, PushImageOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder, TagImageOptionsBuilder, WaitContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::runtime::docker::{image_registry, RegistryAuth};

const BACKEND: &str = "docker";

/// How long a build or a setup command may take before it is given up (default 30 min).
const DEFAULT_LIMIT: Duration = Duration::from_secs(30 * 60);

/// An image to build from a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildRequest {
    /// The build context: every file under it is sent to the engine.
    pub context: PathBuf,
    /// The Dockerfile, relative to the context (default `Dockerfile`).
    pub dockerfile: String,
    /// The tag the image gets (`repo:tag`).
    pub tag: String,
    /// Labels set on the image.
    pub labels: BTreeMap<String, String>,
}

impl BuildRequest {
    /// Builds `context/Dockerfile` as `tag`.
    pub fn new(context: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        BuildRequest { context: context.into(), dockerfile: "Dockerfile".into(), tag: tag.into(), labels: BTreeMap::new() }
    }

    /// Uses another Dockerfile of the context.
    pub fn with_dockerfile(mut self, dockerfile: impl Into<String>) -> Self {
        self.dockerfile = dockerfile.into();
        self
    }

    /// Adds a label to the image.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// Builds and snapshots images on one Docker Engine.
#[derive(Clone, Debug)]
pub struct DockerImages {
    docker: Docker,
    limit: Duration,
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable { backend: BACKEND, reason: e.to_string() }
}

impl DockerImages {
    /// Connects to the local engine (`DOCKER_HOST` or the default socket).
    pub async fn connect() -> Result<Self> {
        Self::with_client(Docker::connect_with_local_defaults().map_err(unavailable)?).await
    }

    /// Connects to the engine at a Unix socket path.
    pub async fn connect_unix(socket: &Path) -> Result<Self> {
        Self::with_client(Docker::connect_with_unix(&socket.to_string_lossy(), 120, bollard::API_DEFAULT_VERSION).map_err(unavailable)?)
            .await
    }

    async fn with_client(docker: Docker) -> Result<Self> {
        let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
            .await
            .map_err(|_| Error::Timeout { operation: "docker version negotiation", after: Duration::from_secs(10) })?
            .map_err(unavailable)?;
        Ok(DockerImages { docker, limit: DEFAULT_LIMIT })
    }

    /// Gives a build or setup command at most `limit` (default 30 minutes).
    pub fn with_limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    /// The image's id if the engine has it.
    pub async fn id_of(&self, image: &str) -> Result<Option<String>> {
        match self.docker.inspect_image(image).await {
            Ok(found) => Ok(found.id),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Builds `request`, handing each line of the build's output to `progress`; returns
    /// the image id. A failed step is [`Error::BuildFailed`] with the engine's message
    /// and the output's last lines.
    pub async fn build(&self, request: &BuildRequest, progress: &mut (dyn FnMut(&str) + Send)) -> Result<String> {
        if !request.context.join(&request.dockerfile).is_file() {
            return Err(Error::invalid(
                "Dockerfile",
                request.context.join(&request.dockerfile).display().to_string(),
                "no such file in the build context",
            ));
        }
        let context = request.context.clone();
        let tar = tokio::task::spawn_blocking(move || context_tar(&context))
            .await
            .map_err(|e| unavailable(format!("packing the build context: {e}")))?
            .map_err(|e| Error::invalid("build context", request.context.display().to_string(), e.to_string()))?;
        let labels: HashMap<String, String> = request.labels.clone().into_iter().collect();
        let options = BuildImageOptionsBuilder::default()
            .dockerfile(&request.dockerfile)
            .t(&request.tag)
            .labels(&labels)
            .rm(true)
            .forcerm(true)
            .build();
        let mut tail = Tail::default();
        let mut id = None;
        let run = async {
            let mut stream = self.docker.build_image(options, None, Some(bollard::body_full(tar.into())));
            while let Some(item) = stream.next().await {
                let info = item.map_err(|e| build_failed(&request.tag, e.to_string(), &tail))?;
                if let Some(text) = info.stream.as_deref().or(info.status.as_deref()) {
                    for line in text.lines().filter(|l| !l.trim().is_empty()) {
                        tail.push(line);
                        progress(line);
                    }
                }
                if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                    return Err(build_failed(&request.tag, detail, &tail));
                }
                if let Some(aux) = info.aux.and_then(|a| a.id) {
                    id = Some(aux);
                }
            }
            Ok(())
        };
        tokio::time::timeout(self.limit, run).await.map_err(|_| Error::Timeout { operation: "docker build", after: self.limit })??;
        match id {
            Some(id) => Ok(id),
            None => self.id_of(&request.tag).await?.ok_or_else(|| build_failed(&request.tag, "the engine reported no image".into(), &tail)),
        }
    }

    /// Runs `command` in a container from `from` and, if it exits 0, commits the
    /// container as `tag` (with `labels`); the container is removed either way. Each
    /// output line goes to `progress`. Returns the new image's id.
    pub async fn commit_setup(
        &self,
        from: &str,
        command: &[String],
        tag: &str,
        labels: &BTreeMap<String, String>,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<String> {
        if command.is_empty() {
            return Err(Error::invalid("setup command", "", "empty"));
        }
        let name = format!("keelson-setup-{}-{}", std::process::id(), rand_suffix());
        let body = ContainerCreateBody {
            image: Some(from.to_owned()),
            cmd: Some(command.to_vec()),
            labels: Some(labels.clone().into_iter().collect()),
            ..Default::default()
        };
        self.docker.create_container(Some(CreateContainerOptionsBuilder::default().name(&name).build()), body).await.map_err(
            |e| match e {
                bollard::errors::Error::DockerResponseServerError { status_code: 404, message } => {
                    Error::ImageUnavailable { image: from.to_owned(), reason: message }
                }
                other => unavailable(other),
            },
        )?;
        let removed = RemoveOnDrop { docker: self.docker.clone(), name: name.clone() };
        let result = tokio::time::timeout(self.limit, self.setup_in(&name, tag, labels, progress))
            .await
            .map_err(|_| Error::Timeout { operation: "setup command", after: self.limit })
            .and_then(|r| r);
        removed.now().await;
        result
    }

    async fn setup_in(
        &self,
        name: &str,
        tag: &str,
        labels: &BTreeMap<String, String>,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<String> {
        self.docker.start_container(name, None::<bollard::query_parameters::StartContainerOptions>).await.map_err(unavailable)?;
        let mut tail = Tail::default();
        let logs = LogsOptionsBuilder::default().follow(true).stdout(true).stderr(true).build();
        let mut output = self.docker.logs(name, Some(logs));
        while let Some(chunk) = output.next().await {
            let Ok(chunk) = chunk else { break };
            for line in String::from_utf8_lossy(&chunk.into_bytes()).lines() {
                tail.push(line);
                progress(line);
            }
        }
        let mut wait = self.docker.wait_container(name, None::<WaitContainerOptions>);
        let code = match wait.next().await {
            Some(Ok(status)) => status.status_code,
            // bollard reports a non-zero exit as an error carrying the code.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => return Err(unavailable(e)),
            None => return Err(unavailable("the engine ended the wait with no status")),
        };
        if code != 0 {
            return Err(build_failed(tag, format!("the setup command exited with {code}"), &tail));
        }
        let options = CommitContainerOptionsBuilder::default().container(name).repo(tag).build();
        let config = bollard::models::ContainerConfig { labels: Some(labels.clone().into_iter().collect()), ..Default::default() };
        let id = self.docker.commit_container(options, config).await.map_err(unavailable)?;
        Ok(id.id)
    }

    /// Pushes `image` (`host[:port]/repository:tag`) to its registry, with `auth` if
    /// given (it must be for the image's registry); each status line (a layer pushing,
    /// pushed, mounted) goes to `progress`. Returns the manifest digest the registry
    /// took, as the engine reports it. A refusal is [`Error::Denied`]; any other failure
    /// [`Error::Unavailable`] naming the image. The engine retries a refused push for
    /// most of a minute (its `max-upload-attempts` with back-off) before it reports the
    /// refusal: check credentials with the registry first where that matters.
    pub async fn push(&self, image: &str, auth: Option<&RegistryAuth>, progress: &mut (dyn FnMut(&str) + Send)) -> Result<Option<String>> {
        let registry = image_registry(image)
            .ok_or_else(|| Error::invalid("image", image, "names no registry: expected host[:port]/repository:tag"))?;
        if let Some(a) = auth.filter(|a| a.server != registry) {
            return Err(Error::invalid("registry credentials", a.server.clone(), format!("the image is on {registry}")));
        }
        // The tag is after the last ':' that follows the last '/' (a port has a '/' after it).
        let (name, tag) = match image.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (name, tag),
            _ => (image, "latest"),
        };
        let options = PushImageOptionsBuilder::new().tag(tag).build();
        let mut digest = None;
        let mut tail = Tail::default();
        let run = async {
            let mut stream = self.docker.push_image(name, Some(options), auth.map(RegistryAuth::credentials));
            while let Some(item) = stream.next().await {
                let info = item.map_err(|e| push_failed(image, e.to_string()))?;
                if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                    return Err(push_failed(
                        image,
                        format!("{detail} (last lines: {})", tail.0.iter().cloned().collect::<Vec<_>>().join(" | ")),
                    ));
                }
                if let Some(status) = info.status.as_deref() {
                    let line = status.to_owned();
                    if let Some(d) = status.split_whitespace().skip_while(|w| *w != "digest:").nth(1) {
                        digest = Some(d.to_owned());
                    }
                    tail.push(&line);
                    progress(&line);
                }
            }
            Ok(())
        };
        tokio::time::timeout(self.limit, run).await.map_err(|_| Error::Timeout { operation: "docker push", after: self.limit })??;
        Ok(digest)
    }

    /// Gives `image` a second name, `target` (`host:port/repository:tag`), as
    /// `docker tag` does: what [`DockerImages::push`] needs to push a local image to a
    /// registry. [`Error::NotFound`] if the engine has no `image`.
    pub async fn tag(&self, image: &str, target: &str) -> Result<()> {
        let (repo, tag) = match target.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, tag),
            _ => (target, "latest"),
        };
        let options = TagImageOptionsBuilder::new().repo(repo).tag(tag).build();
        match self.docker.tag_image(image, Some(options)).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
                Err(Error::NotFound { kind: "image", name: image.to_owned() })
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Removes an image (absent is fine).
    pub async fn remove(&self, image: &str) -> Result<()> {
        match self.docker.remove_image(image, Some(RemoveImageOptionsBuilder::default().force(true).build()), None).await {
            Ok(_) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }
}

/// A few bits that differ between calls in one process.
fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Removes the setup container even when the caller's future is dropped.
struct RemoveOnDrop {
    docker: Docker,
    name: String,
}

impl RemoveOnDrop {
    async fn now(mut self) {
        let name = std::mem::take(&mut self.name);
        let _ = self.docker.remove_container(&name, Some(RemoveContainerOptionsBuilder::default().force(true).build())).await;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let (docker, name) = (self.docker.clone(), std::mem::take(&mut self.name));
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = docker.remove_container(&name, Some(RemoveContainerOptionsBuilder::default().force(true).build())).await;
            });
        }
    }
}

/// The last lines of a build's output, for its error.
#[derive(Default)]
struct Tail(std::collections::VecDeque<String>);

impl Tail {
    const LINES: usize = 20;

    fn push(&mut self, line: &str) {
        if self.0.len() == Self::LINES {
            self.0.pop_front();
        }
        self.0.push_back(line.to_owned());
    }
}

fn push_failed(image: &str, reason: String) -> Error {
    let lower = reason.to_ascii_lowercase();
    if lower.contains("unauthorized") || lower.contains("authentication required") || lower.contains("denied") {
        Error::Denied { operation: "docker push", reason: format!("{image}: {reason}") }
    } else {
        Error::Unavailable { backend: BACKEND, reason: format!("pushing {image}: {reason}") }
    }
}

fn build_failed(image: &str, reason: String, tail: &Tail) -> Error {
    let output = tail.0.iter().map(String::as_str).collect::<Vec<_>>().join("\n");
    Error::BuildFailed { image: image.to_owned(), reason, output }
}

/// The build context as a tar archive, symlinks kept as links (never followed out of the
/// context).
fn context_tar(dir: &Path) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Deterministic);
    builder.append_dir_all(".", dir)?;
    builder.into_inner()
}
