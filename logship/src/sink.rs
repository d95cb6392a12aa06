//! Sinks: where records go.

use std::collections::HashMap;
use std::path::PathBuf;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use crate::error::{Error, Result};
use crate::record::{validate_service, Record};

/// Accepts batches of records. `send` returning `Ok` is the acknowledgement: the records
/// are the sink's responsibility from then on (after `flush` for durable sinks).
#[async_trait]
pub trait Sink: Send + Sync + std::fmt::Debug {
    /// The sink's name.
    fn name(&self) -> &'static str;

    /// Writes a batch, in order. On error, none or some of the batch may have been
    /// written; the shipper resends the whole batch (at-least-once).
    async fn send(&self, batch: &[Record]) -> Result<()>;

    /// Makes everything sent so far durable.
    async fn flush(&self) -> Result<()>;
}

/// JSON lines, one file per service: `<dir>/<service>.log`, appended to. Each line holds
/// timestamp, service, instance, stream and line.
#[derive(Debug)]
pub struct FileSink {
    dir: PathBuf,
    files: Mutex<HashMap<String, tokio::fs::File>>,
}

impl FileSink {
    /// Writes under `dir`, creating it.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io { context: format!("creating log dir {}", dir.display()), source })?;
        Ok(FileSink { dir, files: Mutex::new(HashMap::new()) })
    }

    /// The file records of `service` go to.
    pub fn path_for(&self, service: &str) -> PathBuf {
        self.dir.join(format!("{service}.log"))
    }
}

#[async_trait]
impl Sink for FileSink {
    fn name(&self) -> &'static str {
        "file"
    }

    async fn send(&self, batch: &[Record]) -> Result<()> {
        // Validate the whole batch first: a bad record must not leave half a batch written.
        for r in batch {
            validate_service(&r.service)?;
        }
        let mut by_service: Vec<(&str, String)> = Vec::new();
        for r in batch {
            match by_service.iter_mut().find(|(s, _)| *s == r.service) {
                Some((_, text)) => text.push_str(&r.to_json_line()),
                None => by_service.push((&r.service, r.to_json_line())),
            }
        }
        let mut files = self.files.lock().await;
        for (service, text) in by_service {
            if !files.contains_key(service) {
                let path = self.path_for(service);
                let f = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .await
                    .map_err(|source| Error::Io { context: format!("opening {}", path.display()), source })?;
                files.insert(service.to_owned(), f);
            }
            if let Some(f) = files.get_mut(service) {
                f.write_all(text.as_bytes()).await.map_err(|source| Error::Io { context: format!("writing {service}.log"), source })?;
            }
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let mut files = self.files.lock().await;
        for (service, f) in files.iter_mut() {
            f.flush().await.map_err(|source| Error::Io { context: format!("flushing {service}.log"), source })?;
            f.sync_data().await.map_err(|source| Error::Io { context: format!("syncing {service}.log"), source })?;
        }
        Ok(())
    }
}
