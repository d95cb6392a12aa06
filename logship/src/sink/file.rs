//! JSON lines in one file per service, rotated by size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::Sink;
use crate::error::{Error, Result};
use crate::record::{validate_service, Record};

/// When [`FileSink`] rotates and how many old files it keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileSinkConfig {
    /// Rotate `<service>.log` once it holds this many bytes (default 64 MiB); `None`
    /// never rotates.
    pub max_bytes: Option<u64>,
    /// Rotated files kept per service, `<service>.log.1` (newest) to `<service>.log.<keep>`
    /// (default 5); older ones are deleted.
    pub keep: usize,
}

impl Default for FileSinkConfig {
    fn default() -> Self {
        FileSinkConfig { max_bytes: Some(64 << 20), keep: 5 }
    }
}

/// JSON lines, one file per service: `<dir>/<service>.log`, appended to and rotated by
/// size. Each line holds the timestamp, the labels, the stream and the line (see
/// [`Record::to_json_line`]). `flush` syncs the files: acknowledged records survive a
/// power loss.
#[derive(Debug)]
pub struct FileSink {
    dir: PathBuf,
    config: FileSinkConfig,
    files: Mutex<HashMap<String, Open>>,
}

#[derive(Debug)]
struct Open {
    file: tokio::fs::File,
    size: u64,
    /// Written since the last sync.
    dirty: bool,
}

impl FileSink {
    /// Writes under `dir`, creating it, with the default rotation.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        Self::with_config(dir, FileSinkConfig::default())
    }

    /// Writes under `dir`, creating it, rotating as `config` says.
    pub fn with_config(dir: impl Into<PathBuf>, config: FileSinkConfig) -> Result<Self> {
        let dir = dir.into();
        if config.max_bytes == Some(0) {
            return Err(Error::InvalidInput { field: "file sink max_bytes", value: "0".into(), reason: "must be at least 1".into() });
        }
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io { context: format!("creating log dir {}", dir.display()), source })?;
        Ok(FileSink { dir, config, files: Mutex::new(HashMap::new()) })
    }

    /// The file records of `service` go to.
    pub fn path_for(&self, service: &str) -> PathBuf {
        self.dir.join(format!("{service}.log"))
    }

    /// The `n`th rotated file of `service` (1 is the newest).
    pub fn rotated_path(&self, service: &str, n: usize) -> PathBuf {
        self.dir.join(format!("{service}.log.{n}"))
    }

    async fn open(&self, service: &str) -> Result<Open> {
        let path = self.path_for(service);
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(|source| io_error("opening", &path, source))?;
        let size = file.metadata().await.map_err(|source| io_error("reading the size of", &path, source))?.len();
        Ok(Open { file, size, dirty: false })
    }

    /// Syncs and closes `service`'s file and shifts the rotated ones up by one.
    async fn rotate(&self, service: &str, open: &mut Open) -> Result<()> {
        let path = self.path_for(service);
        open.file.sync_data().await.map_err(|source| io_error("syncing", &path, source))?;
        if self.config.keep == 0 {
            tokio::fs::remove_file(&path).await.map_err(|source| io_error("removing", &path, source))?;
        } else {
            let oldest = self.rotated_path(service, self.config.keep);
            match tokio::fs::remove_file(&oldest).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(io_error("removing", &oldest, source)),
            }
            for n in (1..self.config.keep).rev() {
                let from = self.rotated_path(service, n);
                match tokio::fs::rename(&from, self.rotated_path(service, n + 1)).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(io_error("rotating", &from, source)),
                }
            }
            tokio::fs::rename(&path, self.rotated_path(service, 1)).await.map_err(|source| io_error("rotating", &path, source))?;
        }
        *open = self.open(service).await?;
        Ok(())
    }
}

fn io_error(doing: &str, path: &Path, source: std::io::Error) -> Error {
    Error::Io { context: format!("{doing} {}", path.display()), source }
}

#[async_trait]
impl Sink for FileSink {
    fn name(&self) -> &'static str {
        "file"
    }

    fn capabilities(&self) -> super::SinkCapabilities {
        super::SinkCapabilities::new(super::Acknowledgement::Durable, true)
    }

    async fn send(&self, batch: &[Record]) -> Result<()> {
        // Validate the whole batch first: a bad record must not leave half a batch written.
        for r in batch {
            validate_service(r.service())?;
        }
        let mut by_service: Vec<(&str, String)> = Vec::new();
        for r in batch {
            match by_service.iter_mut().find(|(s, _)| *s == r.service()) {
                Some((_, text)) => text.push_str(&r.to_json_line()),
                None => by_service.push((r.service(), r.to_json_line())),
            }
        }
        let mut files = self.files.lock().await;
        for (service, text) in by_service {
            if !files.contains_key(service) {
                let open = self.open(service).await?;
                files.insert(service.to_owned(), open);
            }
            let Some(open) = files.get_mut(service) else { continue };
            // Rotation happens between batches of a service, never inside a line.
            if self.config.max_bytes.is_some_and(|max| open.size > 0 && open.size + text.len() as u64 > max) {
                self.rotate(service, open).await?;
            }
            open.file.write_all(text.as_bytes()).await.map_err(|source| io_error("writing", &self.path_for(service), source))?;
            open.size += text.len() as u64;
            open.dirty = true;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let mut files = self.files.lock().await;
        for (service, open) in files.iter_mut().filter(|(_, o)| o.dirty) {
            let path = self.path_for(service);
            open.file.flush().await.map_err(|source| io_error("flushing", &path, source))?;
            open.file.sync_data().await.map_err(|source| io_error("syncing", &path, source))?;
            open.dirty = false;
        }
        Ok(())
    }
}
