//! `DockerVolumes`: volumes as Docker Engine named volumes (feature `docker`).
//!
//! Every volume is labelled [`MANAGED_LABEL`], so `list` shows only keelson's. Export and
//! import go through the engine's archive API on a helper container that mounts the
//! volume and is never started; its image (`keelson/volume-helper:1`) is made on the node
//! from an empty root filesystem, so nothing is pulled. The helper is removed when the
//! transfer ends, however it ends.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use bollard::models::{ContainerCreateBody, HostConfig, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, DownloadFromContainerOptionsBuilder, ListContainersOptionsBuilder,
    ListVolumesOptionsBuilder, RemoveContainerOptionsBuilder, RemoveVolumeOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bollard::Docker;
use futures::{StreamExt, TryStreamExt};

use crate::error::{validate_id, Error, Result};
use crate::runtime::docker::{map_err, DockerDriver, MANAGED_LABEL};
use crate::runtime::volume_archive::{checked, TarStream};
use crate::runtime::volumes::{Volume, VolumeCapabilities, VolumeManager};
use crate::task::MountSource;

const BACKEND: &str = "docker volumes";
/// The image of the helper containers (an empty root filesystem, made locally).
pub const HELPER_IMAGE: &str = "keelson/volume-helper:1";
/// Where the helper container mounts the volume.
const HELPER_MOUNT: &str = "/volume";
/// Helper containers are named `<prefix><purpose>-<volume>-<pid>`.
const HELPER_PREFIX: &str = "keelson-volume-";

/// Volumes as Docker named volumes on the local engine.
#[derive(Clone, Debug)]
pub struct DockerVolumes {
    docker: Docker,
    preserve_owners: bool,
}

/// A helper container: removed by [`HelperGuard::remove`], or in the background if dropped
/// (a transfer abandoned half-way).
struct HelperGuard {
    docker: Docker,
    name: Option<String>,
}

async fn remove_helper(docker: &Docker, name: &str) {
    let options = RemoveContainerOptionsBuilder::new().force(true).build();
    match docker.remove_container(name, Some(options)).await {
        Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
        Err(e) => tracing::warn!(container = %name, error = %e, "removing a volume helper container"),
    }
}

impl HelperGuard {
    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }

    async fn remove(mut self) {
        if let Some(name) = self.name.take() {
            remove_helper(&self.docker, &name).await;
        }
    }
}

impl Drop for HelperGuard {
    fn drop(&mut self) {
        let Some(name) = self.name.take() else { return };
        let docker = self.docker.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { remove_helper(&docker, &name).await });
        }
    }
}

impl DockerVolumes {
    /// Connects to the local engine (as [`DockerDriver::connect`]).
    pub async fn connect() -> Result<Self> {
        Ok(DockerDriver::connect().await?.volumes())
    }

    pub(crate) fn with_client(docker: Docker) -> Self {
        DockerVolumes { docker, preserve_owners: false }
    }

    /// Imports keep the owners the archive names (as `LocalVolumes::with_preserve_owners`).
    /// Off by default: files belong to root in the volume. Setuid and setgid bits are
    /// dropped either way.
    pub fn with_preserve_owners(mut self, preserve: bool) -> Self {
        self.preserve_owners = preserve;
        self
    }

    fn volume(name: &str, labels: Option<HashMap<String, String>>) -> Volume {
        let mut labels: BTreeMap<String, String> = labels.unwrap_or_default().into_iter().collect();
        labels.remove(MANAGED_LABEL);
        Volume { name: name.to_owned(), source: MountSource::DockerVolume(name.to_owned()), labels }
    }

    async fn ensure_helper_image(&self) -> Result<()> {
        if self.docker.inspect_image(HELPER_IMAGE).await.is_ok() {
            return Ok(());
        }
        // An empty tar archive (two zero blocks) is a valid, empty root filesystem.
        let empty_rootfs = bytes::Bytes::from(vec![0u8; 1024]);
        let options = CreateImageOptionsBuilder::new().from_src("-").repo("keelson/volume-helper").tag("1").build();
        self.docker
            .create_image(Some(options), Some(bollard::body_full(empty_rootfs)), None)
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| Error::Backend { backend: BACKEND, source: format!("making {HELPER_IMAGE}: {e}").into() })?;
        Ok(())
    }

    /// Creates a never-started container that mounts `volume`, for the archive API.
    async fn helper(&self, volume: &str, purpose: &str) -> Result<HelperGuard> {
        self.ensure_helper_image().await?;
        let name = format!("{HELPER_PREFIX}{purpose}-{volume}-{}", std::process::id());
        let config = ContainerCreateBody {
            image: Some(HELPER_IMAGE.to_owned()),
            // Never run: the engine only needs a command to accept the container.
            cmd: Some(vec!["/keelson-volume-helper".to_owned()]),
            labels: Some(HashMap::from([(MANAGED_LABEL.to_owned(), "1".to_owned())])),
            host_config: Some(HostConfig { binds: Some(vec![format!("{volume}:{HELPER_MOUNT}")]), ..Default::default() }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        self.docker.create_container(Some(options), config).await.map_err(map_err("volume helper", &name))?;
        Ok(HelperGuard { docker: self.docker.clone(), name: Some(name) })
    }
}

impl DockerDriver {
    /// Docker volumes on the same engine as this driver.
    pub fn volumes(&self) -> DockerVolumes {
        DockerVolumes::with_client(self.client().clone())
    }
}

#[async_trait]
impl VolumeManager for DockerVolumes {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn capabilities(&self) -> VolumeCapabilities {
        VolumeCapabilities { durable: true }
    }

    async fn create(&self, name: &str, labels: BTreeMap<String, String>) -> Result<Volume> {
        validate_id("volume name", name)?;
        // The engine's create returns an existing volume as if made: check first, so an
        // existing volume is a conflict, as with every manager.
        match self.get(name).await {
            Ok(_) => return Err(Error::Conflict { kind: "volume", name: name.to_owned(), reason: "already exists".into() }),
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let mut all: HashMap<String, String> = labels.into_iter().collect();
        all.insert(MANAGED_LABEL.to_owned(), "1".to_owned());
        let options = VolumeCreateRequest { name: Some(name.to_owned()), labels: Some(all), ..Default::default() };
        let v = self.docker.create_volume(options).await.map_err(map_err("volume", name))?;
        Ok(Self::volume(name, Some(v.labels)))
    }

    async fn get(&self, name: &str) -> Result<Volume> {
        validate_id("volume name", name)?;
        let v = self.docker.inspect_volume(name).await.map_err(map_err("volume", name))?;
        if !v.labels.contains_key(MANAGED_LABEL) {
            // Someone else's volume: not ours to mount, export or remove.
            return Err(Error::NotFound { kind: "volume", name: name.to_owned() });
        }
        Ok(Self::volume(name, Some(v.labels)))
    }

    async fn list(&self) -> Result<Vec<Volume>> {
        let filters = HashMap::from([("label".to_owned(), vec![MANAGED_LABEL.to_owned()])]);
        let found = self
            .docker
            .list_volumes(Some(ListVolumesOptionsBuilder::new().filters(&filters).build()))
            .await
            .map_err(map_err("volume", "*"))?;
        let mut out: Vec<Volume> = found.volumes.unwrap_or_default().into_iter().map(|v| Self::volume(&v.name, Some(v.labels))).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn remove(&self, name: &str) -> Result<()> {
        self.get(name).await?;
        // Helper containers (never running) left by an abandoned transfer or a crash hold
        // the volume: they go first. A task's container still makes this a conflict.
        let filters = HashMap::from([("volume".to_owned(), vec![name.to_owned()]), ("label".to_owned(), vec![MANAGED_LABEL.to_owned()])]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        for c in self.docker.list_containers(Some(options)).await.map_err(map_err("volume", name))? {
            for helper in c.names.unwrap_or_default().iter().filter(|n| n.trim_start_matches('/').starts_with(HELPER_PREFIX)) {
                remove_helper(&self.docker, helper.trim_start_matches('/')).await;
            }
        }
        // 409 (in use by a container) maps to Conflict: a mounted volume is never removed.
        self.docker.remove_volume(name, Some(RemoveVolumeOptionsBuilder::new().force(false).build())).await.map_err(map_err("volume", name))
    }

    async fn export(&self, name: &str) -> Result<TarStream> {
        self.get(name).await?;
        let guard = self.helper(name, "export").await?;
        // `<mount>/.` archives the contents with entries named `./…`, as `pack_dir` does.
        let options = DownloadFromContainerOptionsBuilder::new().path(&format!("{HELPER_MOUNT}/.")).build();
        let stream = self.docker.download_from_container(guard.name(), Some(options)).map(|chunk| chunk.map_err(std::io::Error::other));
        // At the end of the stream the helper goes before the reader sees the end, so the
        // volume is free again (removable) once the export has been read.
        let cleanup = futures::stream::once(guard.remove()).filter_map(|()| futures::future::ready(None));
        Ok(Box::pin(stream.chain(cleanup)))
    }

    async fn import(&self, name: &str, labels: BTreeMap<String, String>, tar: TarStream) -> Result<Volume> {
        let volume = self.create(name, labels).await?;
        let imported = async {
            let guard = self.helper(name, "import").await?;
            let (checked_tar, verdict) = checked(tar, self.preserve_owners);
            // The engine takes plain bytes; an error in the source ends the stream early
            // and is reported by `verdict` instead.
            let body = checked_tar.take_while(|c| futures::future::ready(c.is_ok())).filter_map(|c| futures::future::ready(c.ok()));
            let options = UploadToContainerOptionsBuilder::new().path(HELPER_MOUNT).build();
            let uploaded = self.docker.upload_to_container(guard.name(), Some(options), bollard::body_stream(body)).await;
            let verdict = verdict.await.unwrap_or_else(|_| Err(Error::invalid("volume archive", name, "checking stopped early")));
            guard.remove().await;
            verdict?;
            uploaded.map_err(|e| Error::invalid("volume archive", name, e.to_string()))?;
            Ok(())
        }
        .await;
        if let Err(e) = imported {
            // All or nothing: the half-filled volume goes (its helper is gone already).
            if let Err(cleanup) = self.docker.remove_volume(name, Some(RemoveVolumeOptionsBuilder::new().force(true).build())).await {
                tracing::warn!(volume = %name, error = %cleanup, "removing a volume whose import failed");
            }
            return Err(e);
        }
        Ok(volume)
    }
}
