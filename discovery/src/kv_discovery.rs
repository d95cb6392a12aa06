//! `KvDiscovery`: `Discovery` on top of any `KeyValue`. Each instance is one JSON record at
//! `<root>/services/<service>/<id>`, attached to a lease shared by the instances this
//! process registered with the same TTL (see [`shared_lease`]): registering is one write,
//! a released or dropped handle deletes its record at once, and the instances of a
//! process that dies disappear after their TTL on every backend alike.

mod shared_lease;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::discovery::{
    Discovery, DiscoveryCapabilities, Health, Instance, Query, Registration, RegistrationHandle, RegistrationLease, Snapshot,
    SnapshotStream,
};
use crate::error::{Error, Result};
use crate::kv::{Expect, KeyValue, KvEntry, KvEventKind};
use crate::memory_kv::MemoryKv;
use crate::name::{validate_instance_id, ServiceName};

/// Default key root for service records.
pub const DEFAULT_ROOT: &str = "keelson";

/// `Discovery` stored in a `KeyValue`.
#[derive(Clone, Debug)]
pub struct KvDiscovery {
    kv: Arc<dyn KeyValue>,
    root: String,
    retry: Duration,
    leases: Arc<shared_lease::SharedLeases>,
}

/// The embedded default: [`KvDiscovery`] over a [`MemoryKv`]. Needs no server.
pub type MemoryDiscovery = KvDiscovery;

impl KvDiscovery {
    /// Discovery in an in-process [`MemoryKv`].
    pub fn memory() -> Self {
        KvDiscovery::new(Arc::new(MemoryKv::new()))
    }

    /// Discovery in `kv`, under [`DEFAULT_ROOT`].
    pub fn new(kv: Arc<dyn KeyValue>) -> Self {
        KvDiscovery { kv, root: DEFAULT_ROOT.to_owned(), retry: Duration::from_millis(500), leases: Arc::default() }
    }

    /// Uses `root` as the key prefix, to keep several catalogs in one store.
    pub fn with_root(mut self, root: impl Into<String>) -> Result<Self> {
        let root = root.into();
        crate::kv::validate_key(&root)?;
        self.root = root.trim_end_matches('/').to_owned();
        Ok(self)
    }

    /// The store underneath.
    pub fn kv(&self) -> &Arc<dyn KeyValue> {
        &self.kv
    }

    fn prefix_for(&self, service: Option<&ServiceName>) -> String {
        match service {
            Some(s) => format!("{}/services/{}/", self.root, s),
            None => format!("{}/services/", self.root),
        }
    }

    fn key(&self, service: &ServiceName, id: &str) -> String {
        format!("{}{}", self.prefix_for(Some(service)), id)
    }

    async fn read(&self, service: &ServiceName, id: &str) -> Result<(KvEntry, Record)> {
        validate_instance_id(id)?;
        let key = self.key(service, id);
        let entry = self.kv.get(&key).await?.ok_or_else(|| Error::NotFound { kind: "instance", name: format!("{service}/{id}") })?;
        let record = Record::decode(&entry)?;
        Ok((entry, record))
    }
}

/// The schema version of the catalog records this version writes.
const RECORD_SCHEMA: u32 = 1;

/// The stored form of an instance. Tolerant: fields a newer writer added are kept in
/// `newer` and written back with a health update, so catalogs survive rolling upgrades.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    #[serde(default)]
    schema: u32,
    service: ServiceName,
    id: String,
    address: String,
    port: u16,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
    health: Health,
    #[serde(flatten)]
    newer: BTreeMap<String, serde_json::Value>,
}

impl Record {
    fn decode(entry: &KvEntry) -> Result<Record> {
        serde_json::from_slice(&entry.value).map_err(|e| Error::Backend {
            backend: "kv-discovery",
            source: format!("record {:?} is not a service record: {e}", entry.key).into(),
        })
    }

    fn encode(&self) -> Vec<u8> {
        // Serialising plain strings, numbers and JSON values cannot fail.
        serde_json::to_vec(&Record { schema: RECORD_SCHEMA, ..self.clone() }).unwrap_or_default()
    }

    fn into_instance(self) -> Instance {
        Instance {
            service: self.service,
            id: self.id,
            address: self.address,
            port: self.port,
            tags: self.tags,
            meta: self.meta,
            health: self.health,
        }
    }
}

/// One registration on its shared lease: releasing or dropping it deletes the record.
#[derive(Debug)]
struct KvLease {
    shared: Arc<shared_lease::SharedLease>,
    key: String,
    generation: u64,
    released: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl RegistrationLease for KvLease {
    async fn release(&self) -> Result<()> {
        self.released.store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.release(&self.key, self.generation).await
    }
}

impl Drop for KvLease {
    fn drop(&mut self) {
        if self.released.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        // Without a runtime (the process is ending), the shared lease expires instead.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (shared, key, generation) = (self.shared.clone(), std::mem::take(&mut self.key), self.generation);
            runtime.spawn(async move {
                if let Err(error) = shared.release(&key, generation).await {
                    tracing::warn!(%key, %error, "could not delete a dropped registration; it expires with the process's lease");
                }
            });
        }
    }
}

#[async_trait]
impl Discovery for KvDiscovery {
    fn backend(&self) -> &'static str {
        self.kv.backend()
    }

    fn capabilities(&self) -> DiscoveryCapabilities {
        DiscoveryCapabilities::new(true, true, true)
    }

    async fn register(&self, registration: Registration) -> Result<RegistrationHandle> {
        registration.validate()?;
        let key = self.key(&registration.service, &registration.id);
        let record = Record {
            schema: RECORD_SCHEMA,
            newer: BTreeMap::new(),
            service: registration.service.clone(),
            id: registration.id.clone(),
            address: registration.address,
            port: registration.port,
            tags: registration.tags,
            meta: registration.meta,
            health: registration.initial_health,
        };
        let ttl = registration.ttl;
        crate::kv::validate_ttl(ttl)?;
        let shared = self.leases.for_ttl(&self.kv, ttl);
        let generation = shared.register(&key, record).await?;
        tracing::debug!(service = %registration.service, id = %registration.id, "registered");
        Ok(RegistrationHandle::new(
            registration.service,
            registration.id,
            Box::new(KvLease { shared, key, generation, released: false.into() }),
        ))
    }

    async fn deregister(&self, service: &ServiceName, id: &str) -> Result<()> {
        validate_instance_id(id)?;
        let key = self.key(service, id);
        self.leases.forget(&key).await;
        if self.kv.delete(&key).await? {
            Ok(())
        } else {
            Err(Error::NotFound { kind: "instance", name: format!("{service}/{id}") })
        }
    }

    async fn set_health(&self, service: &ServiceName, id: &str, health: Health) -> Result<()> {
        // Read-modify-CAS, so a concurrent re-registration is never overwritten with stale data.
        loop {
            let (entry, mut record) = self.read(service, id).await?;
            if record.health == health {
                return Ok(());
            }
            record.health = health;
            match self.kv.compare_and_swap(&entry.key, Expect::Version(entry.version), record.encode(), entry.lease).await {
                Ok(_) => return Ok(()),
                Err(Error::VersionMismatch { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    async fn instances(&self, query: &Query) -> Result<Vec<Instance>> {
        let list = self.kv.list(&self.prefix_for(query.service.as_ref())).await?;
        Ok(sorted(decode_all(&list.entries).into_values().filter(|i| query.matches(i)).collect()))
    }

    async fn services(&self) -> Result<Vec<ServiceName>> {
        let list = self.kv.list(&self.prefix_for(None)).await?;
        let mut names: Vec<ServiceName> = decode_all(&list.entries).into_values().map(|i| i.service).collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn watch(&self, query: Query) -> Result<SnapshotStream> {
        let prefix = self.prefix_for(query.service.as_ref());
        // The first list happens here so that a bad backend fails the call, not the stream.
        let list = self.kv.list(&prefix).await?;
        let state = WatchState {
            kv: self.kv.clone(),
            prefix,
            query,
            retry: self.retry,
            all: decode_all(&list.entries),
            revision: list.revision,
            last_sent: None,
            events: None,
            error: None,
            pauses: crate::retry_pauses(self.retry, self.retry * 10),
        };
        Ok(futures::stream::unfold(state, WatchState::next).boxed())
    }
}

/// Decodes records keyed by their KV key; undecodable records are skipped with a warning
/// rather than failing every lookup of the service.
fn decode_all(entries: &[KvEntry]) -> BTreeMap<String, Instance> {
    entries
        .iter()
        .filter_map(|e| match Record::decode(e) {
            Ok(r) => Some((e.key.clone(), r.into_instance())),
            Err(err) => {
                tracing::warn!(%err, "skipping record");
                None
            }
        })
        .collect()
}

fn sorted(mut instances: Vec<Instance>) -> Vec<Instance> {
    instances.sort_by(|a, b| (&a.service, &a.id).cmp(&(&b.service, &b.id)));
    instances
}

struct WatchState {
    kv: Arc<dyn KeyValue>,
    prefix: String,
    query: Query,
    retry: Duration,
    /// Every instance under the prefix, by key, as of `revision`.
    all: BTreeMap<String, Instance>,
    revision: u64,
    last_sent: Option<(Vec<Instance>, Option<String>)>,
    events: Option<crate::kv::KvWatch>,
    /// The backend error the view is stale because of, until a read succeeds again.
    error: Option<String>,
    /// Pauses between attempts while the backend fails; reset once it answers.
    pauses: crate::RetryPauses,
}

impl WatchState {
    async fn next(mut self) -> Option<(Snapshot, Self)> {
        loop {
            let view = sorted(self.all.values().filter(|i| self.query.matches(i)).cloned().collect());
            let sent = (view, self.error.clone());
            if self.last_sent.as_ref() != Some(&sent) {
                self.last_sent = Some(sent.clone());
                return Some((Snapshot { version: self.revision, instances: sent.0, error: sent.1 }, self));
            }
            self.advance().await;
        }
    }

    /// Notes a backend error. Returns whether it starts a new failure episode, which the
    /// caller reports once (the last good view, with the error) before retrying quietly.
    fn failed(&mut self, e: &Error) -> bool {
        let first = self.error.is_none();
        self.error = Some(e.to_string());
        first
    }

    /// Applies the next batch of changes, resuming or re-listing after errors. Only ever
    /// replaces `all` with a successful read, so errors never empty the view; the first
    /// error of an episode returns early so that it is reported on the stream.
    async fn advance(&mut self) {
        loop {
            let mut events = match self.events.take() {
                Some(events) => events,
                None => match self.kv.watch(&self.prefix, Some(self.revision + 1)).await {
                    Ok(_) if self.error.is_some() => {
                        // Back: say so now, not at the next change (there may be none for a
                        // long time, and followers show staleness until then), with a view
                        // read now rather than the one from before the outage.
                        self.relist().await;
                        self.pauses = crate::retry_pauses(self.retry, self.retry * 10);
                        return;
                    }
                    Ok(w) => w,
                    Err(Error::Compacted { .. }) => {
                        // The re-listed view may already differ: let the caller compare.
                        self.relist().await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "discovery watch failed; retrying");
                        let report = self.failed(&e);
                        tokio::time::sleep(self.pauses.next().unwrap_or(self.retry)).await;
                        if report {
                            return;
                        }
                        continue;
                    }
                },
            };
            match events.next().await {
                Some(Ok(first)) => {
                    if self.error.take().is_some() {
                        self.pauses = crate::retry_pauses(self.retry, self.retry * 10);
                    }
                    self.apply(first);
                    // Coalesce whatever else is already there into one snapshot.
                    while let Some(Some(Ok(ev))) = futures::FutureExt::now_or_never(events.next()) {
                        self.apply(ev);
                    }
                    self.events = Some(events);
                    return;
                }
                Some(Err(Error::Compacted { .. })) => {
                    self.relist().await;
                    return;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, revision = self.revision, "discovery watch interrupted; resuming");
                    let report = self.failed(&e);
                    tokio::time::sleep(self.pauses.next().unwrap_or(self.retry)).await;
                    if report {
                        return;
                    }
                }
                None => tokio::time::sleep(self.pauses.next().unwrap_or(self.retry)).await,
            }
        }
    }

    fn apply(&mut self, ev: crate::kv::KvEvent) {
        self.revision = ev.revision;
        match ev.kind {
            KvEventKind::Delete => {
                self.all.remove(&ev.key);
            }
            KvEventKind::Put => {
                let entry = KvEntry { key: ev.key.clone(), value: ev.value, version: ev.revision, create_revision: 0, lease: None };
                match Record::decode(&entry) {
                    Ok(r) => {
                        self.all.insert(ev.key, r.into_instance());
                    }
                    Err(err) => tracing::warn!(%err, "skipping record"),
                }
            }
        }
    }

    async fn relist(&mut self) {
        loop {
            match self.kv.list(&self.prefix).await {
                Ok(list) => {
                    self.all = decode_all(&list.entries);
                    self.revision = list.revision;
                    self.error = None;
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "discovery re-list failed; retrying");
                    self.failed(&e);
                    tokio::time::sleep(self.pauses.next().unwrap_or(self.retry)).await;
                }
            }
        }
    }
}
