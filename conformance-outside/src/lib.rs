//! Every keelson trait implemented by a crate that is not the one defining it, as a team
//! writing its own backend would: capabilities built from `Default`, every result type
//! produced by public API. Each wrapper delegates to the embedded default and marks what
//! it did (a counter), so the tests in `tests/` can show the conformance suites ran
//! through the wrapper and not around it.
//!
//! ```
//! use keelson_conformance_outside::OutsideRouter;
//! use keelson_routing::Router;
//!
//! let router = OutsideRouter::default();
//! assert_eq!(router.name(), "outside");
//! assert!(!router.capabilities().durable);
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

/// Calls a wrapper passed on to the backend it wraps.
#[derive(Debug, Default)]
pub struct Calls(AtomicU64);

impl Calls {
    fn hit(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// How many calls went through.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

mod discovery {
    use keelson_discovery::{
        Discovery, DiscoveryCapabilities, Expect, Health, Instance, KeyValue, KvCapabilities, KvEntry, KvList, KvLock, KvWatch, LeaseId,
        MemoryDiscovery, MemoryKv, Query, Registration, RegistrationHandle, Result, ServiceName, SnapshotStream, Txn,
    };

    use super::*;

    /// A `KeyValue` over [`MemoryKv`], every method forwarded (the provided ones too:
    /// a wrapper that left `txn` or `list_page` to the trait's defaults would hide the
    /// backend's own).
    #[derive(Debug, Default)]
    pub struct OutsideKv {
        inner: MemoryKv,
        /// Calls forwarded.
        pub calls: Calls,
    }

    #[async_trait]
    impl KeyValue for OutsideKv {
        fn backend(&self) -> &'static str {
            "outside"
        }

        fn capabilities(&self) -> KvCapabilities {
            let inner = self.inner.capabilities();
            let mut caps = KvCapabilities::default();
            caps.watch_from_revision = inner.watch_from_revision;
            caps.leases = inner.leases;
            caps.durable = false;
            caps.with_min_lease_ttl(inner.min_lease_ttl).with_txn_limits(inner.max_txn_ops, inner.max_txn_bytes)
        }

        async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
            self.calls.hit();
            self.inner.get(key).await
        }

        async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<u64> {
            self.calls.hit();
            self.inner.put(key, value, lease).await
        }

        async fn compare_and_swap(&self, key: &str, expect: Expect, value: Vec<u8>, lease: Option<LeaseId>) -> Result<u64> {
            self.calls.hit();
            self.inner.compare_and_swap(key, expect, value, lease).await
        }

        async fn delete(&self, key: &str) -> Result<bool> {
            self.calls.hit();
            self.inner.delete(key).await
        }

        async fn txn(&self, txn: Txn) -> Result<u64> {
            self.calls.hit();
            self.inner.txn(txn).await
        }

        async fn list(&self, prefix: &str) -> Result<KvList> {
            self.calls.hit();
            self.inner.list(prefix).await
        }

        async fn list_page(&self, prefix: &str, after: Option<&str>, limit: usize, revision: Option<u64>) -> Result<KvList> {
            self.calls.hit();
            self.inner.list_page(prefix, after, limit, revision).await
        }

        async fn watch(&self, prefix: &str, from_revision: Option<u64>) -> Result<KvWatch> {
            self.calls.hit();
            self.inner.watch(prefix, from_revision).await
        }

        async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
            self.calls.hit();
            self.inner.grant_lease(ttl).await
        }

        async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
            self.calls.hit();
            self.inner.keep_alive(lease).await
        }

        async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
            self.calls.hit();
            self.inner.revoke_lease(lease).await
        }

        async fn lease_ttl(&self, lease: LeaseId) -> Result<keelson_discovery::LeaseTtl> {
            self.calls.hit();
            self.inner.lease_ttl(lease).await
        }

        async fn lock(&self, key: &str, ttl: Duration, wait: Duration) -> Result<KvLock> {
            self.calls.hit();
            self.inner.lock(key, ttl, wait).await
        }

        async fn unlock(&self, lock: &KvLock) -> Result<()> {
            self.calls.hit();
            self.inner.unlock(lock).await
        }
    }

    /// A `Discovery` over the embedded [`MemoryDiscovery`].
    #[derive(Debug)]
    pub struct OutsideDiscovery {
        inner: MemoryDiscovery,
        /// Calls forwarded.
        pub calls: Calls,
    }

    impl Default for OutsideDiscovery {
        fn default() -> Self {
            OutsideDiscovery { inner: MemoryDiscovery::memory(), calls: Calls::default() }
        }
    }

    #[async_trait]
    impl Discovery for OutsideDiscovery {
        fn backend(&self) -> &'static str {
            "outside"
        }

        fn capabilities(&self) -> DiscoveryCapabilities {
            let inner = self.inner.capabilities();
            let mut caps = DiscoveryCapabilities::default();
            caps.register = inner.register;
            caps.set_health = inner.set_health;
            caps.query_all_services = inner.query_all_services;
            caps
        }

        async fn register(&self, registration: Registration) -> Result<RegistrationHandle> {
            self.calls.hit();
            self.inner.register(registration).await
        }

        async fn deregister(&self, service: &ServiceName, id: &str) -> Result<()> {
            self.calls.hit();
            self.inner.deregister(service, id).await
        }

        async fn set_health(&self, service: &ServiceName, id: &str, health: Health) -> Result<()> {
            self.calls.hit();
            self.inner.set_health(service, id, health).await
        }

        async fn instances(&self, query: &Query) -> Result<Vec<Instance>> {
            self.calls.hit();
            self.inner.instances(query).await
        }

        async fn services(&self) -> Result<Vec<ServiceName>> {
            self.calls.hit();
            self.inner.services().await
        }

        async fn watch(&self, query: Query) -> Result<SnapshotStream> {
            self.calls.hit();
            self.inner.watch(query).await
        }
    }
}

mod scheduler {
    use keelson_scheduler::{
        ClusterSnapshot, Driver, DriverCapabilities, Job, LocalVolumes, Output, PlacementEngine, Plan, ProcessDriver, Result, Scheduler,
        SchedulerCapabilities, TarStream, TaskSpec, TaskStatus, Volume, VolumeCapabilities, VolumeManager,
    };

    use super::*;

    /// A `Scheduler` over the [`PlacementEngine`].
    #[derive(Debug, Default)]
    pub struct OutsideScheduler {
        inner: PlacementEngine,
        /// Plans made.
        pub calls: Calls,
    }

    impl Scheduler for OutsideScheduler {
        fn name(&self) -> &'static str {
            "outside"
        }

        fn capabilities(&self) -> SchedulerCapabilities {
            let inner = self.inner.capabilities();
            let mut caps = SchedulerCapabilities::default();
            caps.constraints = inner.constraints;
            caps.affinities_and_spread = inner.affinities_and_spread;
            caps.volumes = inner.volumes;
            caps.ports = inner.ports;
            caps.preemption = inner.preemption;
            caps
        }

        fn plan(&self, snapshot: &ClusterSnapshot, job: &Job) -> Result<Plan> {
            self.calls.hit();
            self.inner.plan(snapshot, job)
        }
    }

    /// A `Driver` over the [`ProcessDriver`].
    #[derive(Debug, Default)]
    pub struct OutsideDriver {
        inner: ProcessDriver,
        /// Calls forwarded.
        pub calls: Calls,
    }

    #[async_trait]
    impl Driver for OutsideDriver {
        fn name(&self) -> &'static str {
            "outside"
        }

        fn capabilities(&self) -> DriverCapabilities {
            let inner = self.inner.capabilities();
            let mut caps = DriverCapabilities::default();
            caps.images = inner.images;
            caps.resource_limits = inner.resource_limits;
            caps
        }

        async fn start(&self, spec: TaskSpec) -> Result<TaskStatus> {
            self.calls.hit();
            self.inner.start(spec).await
        }

        async fn stop(&self, id: &str, grace: Duration) -> Result<TaskStatus> {
            self.calls.hit();
            self.inner.stop(id, grace).await
        }

        async fn inspect(&self, id: &str) -> Result<TaskStatus> {
            self.calls.hit();
            self.inner.inspect(id).await
        }

        async fn output(&self, id: &str) -> Result<Output> {
            self.calls.hit();
            self.inner.output(id).await
        }

        async fn list(&self) -> Result<Vec<TaskStatus>> {
            self.calls.hit();
            self.inner.list().await
        }

        async fn remove(&self, id: &str) -> Result<()> {
            self.calls.hit();
            self.inner.remove(id).await
        }
    }

    /// A `VolumeManager` over [`LocalVolumes`].
    #[derive(Debug)]
    pub struct OutsideVolumes {
        inner: LocalVolumes,
        /// Calls forwarded.
        pub calls: Calls,
    }

    impl OutsideVolumes {
        /// Volumes as directories under `root`.
        pub fn new(root: &std::path::Path) -> Result<Self> {
            Ok(OutsideVolumes { inner: LocalVolumes::new(root)?, calls: Calls::default() })
        }
    }

    #[async_trait]
    impl VolumeManager for OutsideVolumes {
        fn name(&self) -> &'static str {
            "outside"
        }

        fn capabilities(&self) -> VolumeCapabilities {
            let mut caps = VolumeCapabilities::default();
            caps.durable = self.inner.capabilities().durable;
            caps
        }

        async fn create(&self, name: &str, labels: BTreeMap<String, String>) -> Result<Volume> {
            self.calls.hit();
            self.inner.create(name, labels).await
        }

        async fn get(&self, name: &str) -> Result<Volume> {
            self.calls.hit();
            self.inner.get(name).await
        }

        async fn list(&self) -> Result<Vec<Volume>> {
            self.calls.hit();
            self.inner.list().await
        }

        async fn remove(&self, name: &str) -> Result<()> {
            self.calls.hit();
            self.inner.remove(name).await
        }

        async fn export(&self, name: &str) -> Result<TarStream> {
            self.calls.hit();
            self.inner.export(name).await
        }

        async fn import(&self, name: &str, labels: BTreeMap<String, String>, tar: TarStream) -> Result<Volume> {
            self.calls.hit();
            self.inner.import(name, labels, tar).await
        }
    }
}

mod routing {
    use keelson_routing::{MemoryRouter, Result, RouteChange, RouteTable, Router, RouterCapabilities};

    use super::*;

    /// A `Router` over the [`MemoryRouter`].
    #[derive(Debug, Default)]
    pub struct OutsideRouter {
        inner: MemoryRouter,
        /// Changes applied.
        pub calls: Calls,
    }

    #[async_trait]
    impl Router for OutsideRouter {
        fn name(&self) -> &'static str {
            "outside"
        }

        fn capabilities(&self) -> RouterCapabilities {
            let mut caps = RouterCapabilities::default();
            caps.durable = self.inner.capabilities().durable;
            caps
        }

        async fn apply(&self, changes: Vec<RouteChange>) -> Result<u64> {
            self.calls.hit();
            self.inner.apply(changes).await
        }

        fn snapshot(&self) -> Arc<RouteTable> {
            self.inner.snapshot()
        }
    }
}

mod netplumb {
    use keelson_netplumb::{
        Attachment, AttachmentKey, EndpointSpec, GcReport, HostNetwork, NetworkCapabilities, NetworkDriver, NetworkInfo, NetworkSpec,
        Result,
    };

    use super::*;

    /// A `NetworkDriver` over [`HostNetwork`].
    #[derive(Debug)]
    pub struct OutsideNetwork {
        inner: HostNetwork,
        /// Calls forwarded.
        pub calls: Calls,
    }

    impl Default for OutsideNetwork {
        fn default() -> Self {
            OutsideNetwork { inner: HostNetwork::new(), calls: Calls::default() }
        }
    }

    #[async_trait]
    impl NetworkDriver for OutsideNetwork {
        fn name(&self) -> &'static str {
            "outside"
        }

        fn capabilities(&self) -> NetworkCapabilities {
            let inner = self.inner.capabilities();
            let mut caps = NetworkCapabilities::default();
            caps.isolated_endpoints = inner.isolated_endpoints;
            caps.port_mappings = inner.port_mappings;
            caps.multi_host = inner.multi_host;
            caps
        }

        async fn create_network(&self, spec: NetworkSpec) -> Result<NetworkInfo> {
            self.calls.hit();
            self.inner.create_network(spec).await
        }

        async fn delete_network(&self, name: &str) -> Result<()> {
            self.calls.hit();
            self.inner.delete_network(name).await
        }

        async fn attach(&self, spec: EndpointSpec) -> Result<Attachment> {
            self.calls.hit();
            self.inner.attach(spec).await
        }

        async fn detach(&self, key: &AttachmentKey) -> Result<()> {
            self.calls.hit();
            self.inner.detach(key).await
        }

        async fn check(&self, key: &AttachmentKey) -> Result<Attachment> {
            self.calls.hit();
            self.inner.check(key).await
        }

        async fn inspect(&self, name: &str) -> Result<NetworkInfo> {
            self.calls.hit();
            self.inner.inspect(name).await
        }

        async fn list(&self) -> Result<Vec<NetworkInfo>> {
            self.calls.hit();
            self.inner.list().await
        }

        async fn gc(&self, valid: &[AttachmentKey]) -> Result<GcReport> {
            self.calls.hit();
            self.inner.gc(valid).await
        }
    }
}

mod registry {
    use keelson_registry::{BlobReader, BlobStat, BlobStore, Digest, MemoryBlobStore, Result, StoreCapabilities, UploadId, UploadStatus};

    use super::*;

    /// A `BlobStore` over the [`MemoryBlobStore`], built only from public types.
    #[derive(Debug, Default)]
    pub struct OutsideBlobStore {
        inner: MemoryBlobStore,
        /// Our session ids and the inner store's.
        ids: std::sync::Mutex<std::collections::HashMap<UploadId, UploadId>>,
        /// Calls forwarded.
        pub calls: Calls,
    }

    #[async_trait]
    impl BlobStore for OutsideBlobStore {
        fn name(&self) -> &'static str {
            "outside"
        }

        fn capabilities(&self) -> StoreCapabilities {
            let mut caps = StoreCapabilities::default();
            caps.durable = self.inner.capabilities().durable;
            caps
        }

        async fn stat(&self, digest: &Digest) -> Result<Option<BlobStat>> {
            self.calls.hit();
            // Rebuilt through the public constructor, as a backend of its own would.
            Ok(self.inner.stat(digest).await?.map(|s| BlobStat::new(s.size, s.created)))
        }

        async fn open_range(&self, digest: &Digest, offset: u64, len: Option<u64>) -> Result<BlobReader> {
            self.calls.hit();
            self.inner.open_range(digest, offset, len).await
        }

        async fn delete(&self, digest: &Digest) -> Result<()> {
            self.calls.hit();
            self.inner.delete(digest).await
        }

        async fn list(&self) -> Result<Vec<Digest>> {
            self.calls.hit();
            self.inner.list().await
        }

        async fn begin_upload(&self) -> Result<UploadId> {
            self.calls.hit();
            // An id of its own making, parsed as any backend would.
            let id: UploadId = format!("outside-{}", self.calls.count()).parse()?;
            let inner = self.inner.begin_upload().await?;
            self.ids.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), inner);
            Ok(id)
        }

        async fn upload_status(&self, id: &UploadId) -> Result<UploadStatus> {
            self.calls.hit();
            let s = self.inner.upload_status(&self.inner_id(id)?).await?;
            Ok(UploadStatus::new(s.size, s.last_activity))
        }

        async fn append(&self, id: &UploadId, offset: u64, content: BlobReader) -> Result<u64> {
            self.calls.hit();
            self.inner.append(&self.inner_id(id)?, offset, content).await
        }

        async fn commit(&self, id: &UploadId, expected: &Digest) -> Result<u64> {
            self.calls.hit();
            let inner = self.inner_id(id)?;
            self.ids.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
            self.inner.commit(&inner, expected).await
        }

        async fn cancel(&self, id: &UploadId) -> Result<()> {
            self.calls.hit();
            let inner = self.inner_id(id)?;
            self.ids.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
            self.inner.cancel(&inner).await
        }

        async fn list_uploads(&self) -> Result<Vec<(UploadId, UploadStatus)>> {
            self.calls.hit();
            let ids: Vec<(UploadId, UploadId)> =
                self.ids.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(a, b)| (a.clone(), b.clone())).collect();
            let mut out = Vec::new();
            for (outer, inner) in ids {
                out.push((outer, self.inner.upload_status(&inner).await?));
            }
            out.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(out)
        }
    }

    impl OutsideBlobStore {
        fn inner_id(&self, id: &UploadId) -> Result<UploadId> {
            self.ids
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .cloned()
                .ok_or_else(|| keelson_registry::Error::NotFound { kind: "upload", name: id.to_string() })
        }
    }
}

mod logship {
    use keelson_logship::{FileSink, Record, Result, Sink, Source};

    use super::*;

    /// A `Source` of records given up front, produced by the public `Record` API.
    #[derive(Debug, Default)]
    pub struct OutsideSource {
        records: std::collections::VecDeque<Record>,
        /// Reads that handed out records.
        pub calls: Calls,
        /// The highest acknowledgement heard.
        pub acked: u64,
        /// Records acknowledged over every run, kept across "restarts".
        checkpoint: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
        skipped: u64,
    }

    impl OutsideSource {
        /// A source that yields `records`, then ends.
        pub fn new(records: Vec<Record>) -> Self {
            OutsideSource { records: records.into(), calls: Calls::default(), acked: 0, checkpoint: None, skipped: 0 }
        }

        /// A source over `records` that starts after the `checkpoint`th and advances it
        /// as records are acknowledged.
        pub fn with_checkpoint(records: Vec<Record>, checkpoint: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
            let skipped = checkpoint.load(std::sync::atomic::Ordering::SeqCst);
            let records = records.into_iter().skip(usize::try_from(skipped).unwrap_or(usize::MAX)).collect();
            OutsideSource { records, calls: Calls::default(), acked: 0, checkpoint: Some(checkpoint), skipped }
        }
    }

    #[async_trait]
    impl Source for OutsideSource {
        async fn read(&mut self, batch: &mut Vec<Record>, max: usize) -> Result<usize> {
            let n = max.min(self.records.len());
            batch.extend(self.records.drain(..n));
            if n > 0 {
                self.calls.hit();
            }
            Ok(n)
        }

        fn capabilities(&self) -> keelson_logship::SourceCapabilities {
            keelson_logship::SourceCapabilities::new(self.checkpoint.is_some(), true)
        }

        async fn ack(&mut self, count: u64) -> Result<()> {
            self.acked = self.acked.max(count);
            if let Some(saved) = &self.checkpoint {
                saved.store(self.skipped + self.acked, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(())
        }
    }

    /// A `Sink` over [`FileSink`].
    #[derive(Debug)]
    pub struct OutsideSink {
        inner: FileSink,
        /// Batches forwarded.
        pub calls: Calls,
    }

    impl OutsideSink {
        /// One file per service under `dir`.
        pub fn new(dir: &std::path::Path) -> Result<Self> {
            Ok(OutsideSink { inner: FileSink::new(dir)?, calls: Calls::default() })
        }
    }

    #[async_trait]
    impl Sink for OutsideSink {
        fn name(&self) -> &'static str {
            "outside"
        }

        fn capabilities(&self) -> keelson_logship::SinkCapabilities {
            self.inner.capabilities()
        }

        async fn send(&self, batch: &[Record]) -> Result<()> {
            self.calls.hit();
            self.inner.send(batch).await
        }

        async fn flush(&self) -> Result<()> {
            self.inner.flush().await
        }
    }
}

pub use discovery::{OutsideDiscovery, OutsideKv};
pub use logship::{OutsideSink, OutsideSource};
pub use netplumb::OutsideNetwork;
pub use registry::OutsideBlobStore;
pub use routing::OutsideRouter;
pub use scheduler::{OutsideDriver, OutsideScheduler, OutsideVolumes};
