//! `MemoryKv`: the embedded `KeyValue`, with etcd's semantics in one process.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::kv::{self, Compare, Expect, KeyValue, KvCapabilities, KvEntry, KvEvent, KvEventKind, KvList, KvWatch, LeaseId, Txn, TxnOp};

const BACKEND: &str = "memory";

/// How many past events a `MemoryKv` keeps for watches that start in the past.
pub const DEFAULT_HISTORY: usize = 10_000;

/// An in-process key-value store with revisions, compare-and-swap, TTL leases that
/// expire by themselves (deleting their keys and emitting delete events), and watches
/// that resume from any revision still in its bounded history.
///
/// Cloning is cheap and shares the store.
#[derive(Clone, Debug)]
pub struct MemoryKv {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    /// Live events with their sequence number (one per event: a transaction's events
    /// share a revision, so the revision alone cannot tell a duplicate from a sibling).
    events: broadcast::Sender<(u64, KvEvent)>,
    history_limit: usize,
}

#[derive(Debug, Default)]
struct State {
    revision: u64,
    /// Highest revision dropped from `history`; watches must start after it.
    compacted: u64,
    entries: BTreeMap<String, Stored>,
    history: VecDeque<(u64, KvEvent)>,
    /// Sequence number of the last event recorded.
    event_seq: u64,
    /// Sequence number of the last event dropped from `history`.
    compacted_seq: u64,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    reaper_running: bool,
}

#[derive(Debug)]
struct Stored {
    value: Vec<u8>,
    version: u64,
    create_revision: u64,
    lease: Option<LeaseId>,
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

impl Default for MemoryKv {
    fn default() -> Self {
        MemoryKv::new()
    }
}

impl MemoryKv {
    /// A store keeping [`DEFAULT_HISTORY`] past events.
    pub fn new() -> Self {
        MemoryKv::with_history(DEFAULT_HISTORY)
    }

    /// A store keeping `history` past events (at least 1); older revisions are compacted.
    pub fn with_history(history: usize) -> Self {
        let (events, _) = broadcast::channel(1024);
        MemoryKv {
            inner: Arc::new(Inner {
                state: Mutex::new(State { next_lease: 1, ..State::default() }),
                events,
                history_limit: history.max(1),
            }),
        }
    }

    /// The current store revision.
    pub fn revision(&self) -> u64 {
        self.inner.lock().revision
    }
}

impl Inner {
    /// Locks the state and expires due leases first, so every reader sees lease expiry
    /// at its deadline even between reaper ticks.
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic mid-update elsewhere; the state is still
        // structurally valid (every update is applied after its checks), so keep going.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.expire_due(&mut state, Instant::now());
        state
    }

    fn expire_due(&self, state: &mut State, now: Instant) {
        let due: Vec<LeaseId> = state.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        for id in due {
            tracing::debug!(lease = id, "lease expired");
            self.drop_lease(state, id);
        }
    }

    fn drop_lease(&self, state: &mut State, id: LeaseId) -> bool {
        let Some(lease) = state.leases.remove(&id) else { return false };
        for key in lease.keys {
            self.remove_key(state, &key, None);
        }
        true
    }

    /// Records a change at a new revision, or at `at` when it is one of several writes of
    /// a transaction (which share their revision, as in etcd).
    fn record(&self, state: &mut State, kind: KvEventKind, key: &str, value: Vec<u8>, at: Option<u64>) -> u64 {
        state.revision = at.unwrap_or(state.revision + 1);
        let event = KvEvent { revision: state.revision, kind, key: key.to_owned(), value };
        state.event_seq += 1;
        state.history.push_back((state.event_seq, event.clone()));
        while state.history.len() > self.history_limit {
            if let Some((seq, old)) = state.history.pop_front() {
                state.compacted = old.revision;
                state.compacted_seq = seq;
            }
        }
        // Sent under the state lock so that live events are in revision order. No receiver
        // is not an error.
        let _ = self.events.send((state.event_seq, event));
        state.revision
    }

    fn remove_key(&self, state: &mut State, key: &str, at: Option<u64>) -> bool {
        let Some(old) = state.entries.remove(key) else { return false };
        if let Some(lease) = old.lease.and_then(|id| state.leases.get_mut(&id)) {
            lease.keys.remove(key);
        }
        self.record(state, KvEventKind::Delete, key, Vec::new(), at);
        true
    }

    fn check_lease(state: &State, lease: Option<LeaseId>) -> Result<()> {
        match lease {
            Some(id) if !state.leases.contains_key(&id) => Err(Error::NotFound { kind: "lease", name: id.to_string() }),
            _ => Ok(()),
        }
    }

    fn write(&self, state: &mut State, key: &str, value: Vec<u8>, lease: Option<LeaseId>, at: Option<u64>) -> Result<u64> {
        Self::check_lease(state, lease)?;
        let previous = state.entries.get(key).map(|s| (s.create_revision, s.lease));
        if let Some(old_lease) = previous.and_then(|(_, l)| l).filter(|l| Some(*l) != lease) {
            if let Some(l) = state.leases.get_mut(&old_lease) {
                l.keys.remove(key);
            }
        }
        if let Some(l) = lease.and_then(|id| state.leases.get_mut(&id)) {
            l.keys.insert(key.to_owned());
        }
        let revision = self.record(state, KvEventKind::Put, key, value.clone(), at);
        let create_revision = previous.map_or(revision, |(c, _)| c);
        state.entries.insert(key.to_owned(), Stored { value, version: revision, create_revision, lease });
        Ok(revision)
    }

    /// Background expiry, so that delete events fire even when nobody calls the store.
    /// Holds only a weak reference: it ends when the last `MemoryKv` handle is dropped.
    fn start_reaper(self: &Arc<Self>, state: &mut State) {
        if state.reaper_running {
            return;
        }
        state.reaper_running = true;
        let weak: Weak<Inner> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let next = {
                    let Some(inner) = weak.upgrade() else { return };
                    let state = inner.lock();
                    state.leases.values().map(|l| l.deadline).min()
                };
                let cap = Instant::now() + Duration::from_millis(250);
                tokio::time::sleep_until(next.map_or(cap, |d| d.min(cap))).await;
            }
        });
    }
}

#[async_trait]
impl KeyValue for MemoryKv {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> KvCapabilities {
        KvCapabilities::new(true, true, false)
    }

    async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        kv::validate_key(key)?;
        let state = self.inner.lock();
        Ok(state.entries.get(key).map(|s| entry(key, s)))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<u64> {
        kv::validate_key(key)?;
        kv::validate_value(key, &value)?;
        let mut state = self.inner.lock();
        self.inner.write(&mut state, key, value, lease, None)
    }

    async fn compare_and_swap(&self, key: &str, expect: Expect, value: Vec<u8>, lease: Option<LeaseId>) -> Result<u64> {
        kv::validate_key(key)?;
        kv::validate_value(key, &value)?;
        let mut state = self.inner.lock();
        let actual = state.entries.get(key).map(|s| s.version);
        if actual != expect.version() {
            return Err(Error::VersionMismatch { key: key.to_owned(), expected: expect.version(), actual });
        }
        self.inner.write(&mut state, key, value, lease, None)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        kv::validate_key(key)?;
        let mut state = self.inner.lock();
        Ok(self.inner.remove_key(&mut state, key, None))
    }

    async fn txn(&self, txn: Txn) -> Result<u64> {
        txn.validate(BACKEND, &self.capabilities())?;
        let mut state = self.inner.lock();
        for compare in &txn.compares {
            match compare {
                Compare::Key { key, expect } => {
                    let actual = state.entries.get(key).map(|s| s.version);
                    if actual != expect.version() {
                        return Err(Error::VersionMismatch { key: key.clone(), expected: expect.version(), actual });
                    }
                }
                Compare::Lease { key, lease } => {
                    if state.entries.get(key).and_then(|s| s.lease) != Some(*lease) {
                        return Err(Error::Fenced { key: key.clone(), lease: *lease });
                    }
                }
            }
        }
        for op in &txn.ops {
            if let TxnOp::Put { lease, .. } = op {
                Inner::check_lease(&state, *lease)?;
            }
        }
        // Every check passed: nothing below can fail, so the writes land whole.
        let at = state.revision + 1;
        for op in txn.ops {
            match op {
                TxnOp::Put { key, value, lease } => {
                    self.inner.write(&mut state, &key, value, lease, Some(at))?;
                }
                TxnOp::Delete { key } => {
                    self.inner.remove_key(&mut state, &key, Some(at));
                }
            }
        }
        Ok(state.revision)
    }

    async fn list(&self, prefix: &str) -> Result<KvList> {
        let state = self.inner.lock();
        let entries =
            state.entries.range(prefix.to_owned()..).take_while(|(k, _)| k.starts_with(prefix)).map(|(k, s)| entry(k, s)).collect();
        Ok(KvList { revision: state.revision, entries })
    }

    async fn watch(&self, prefix: &str, from_revision: Option<u64>) -> Result<KvWatch> {
        let (rx, backlog, last_seq) = {
            let state = self.inner.lock();
            let from = from_revision.unwrap_or(state.revision + 1);
            if from <= state.compacted {
                return Err(Error::Compacted { requested: from, oldest: state.compacted + 1 });
            }
            // Subscribe while holding the lock: every event is either in the backlog or
            // arrives on the channel, never neither.
            let rx = self.inner.events.subscribe();
            let backlog: VecDeque<KvEvent> =
                state.history.iter().map(|(_, e)| e).filter(|e| e.revision >= from && e.key.starts_with(prefix)).cloned().collect();
            (rx, backlog, state.event_seq)
        };
        let watch =
            MemoryWatch { inner: Arc::downgrade(&self.inner), prefix: prefix.to_owned(), rx, pending: backlog, last_seq, done: false };
        Ok(futures::stream::unfold(watch, MemoryWatch::next).boxed())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        kv::validate_ttl(ttl)?;
        let mut state = self.inner.lock();
        self.inner.start_reaper(&mut state);
        let id = state.next_lease;
        state.next_lease += 1;
        state.leases.insert(id, Lease { ttl, deadline: Instant::now() + ttl, keys: BTreeSet::new() });
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut state = self.inner.lock();
        let l = state.leases.get_mut(&lease).ok_or_else(|| Error::NotFound { kind: "lease", name: lease.to_string() })?;
        l.deadline = Instant::now() + l.ttl;
        Ok(())
    }

    async fn lease_ttl(&self, lease: LeaseId) -> Result<kv::LeaseTtl> {
        let state = self.inner.lock();
        let l = state.leases.get(&lease).ok_or_else(|| Error::NotFound { kind: "lease", name: lease.to_string() })?;
        Ok(kv::LeaseTtl::new(l.ttl, l.deadline.saturating_duration_since(Instant::now())))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let mut state = self.inner.lock();
        if self.inner.drop_lease(&mut state, lease) {
            Ok(())
        } else {
            Err(Error::NotFound { kind: "lease", name: lease.to_string() })
        }
    }
}

fn entry(key: &str, s: &Stored) -> KvEntry {
    KvEntry { key: key.to_owned(), value: s.value.clone(), version: s.version, create_revision: s.create_revision, lease: s.lease }
}

struct MemoryWatch {
    inner: Weak<Inner>,
    prefix: String,
    rx: broadcast::Receiver<(u64, KvEvent)>,
    pending: VecDeque<KvEvent>,
    /// Sequence number of the last event taken from the store (delivered, queued, or
    /// outside the prefix); anything at or below it is a duplicate.
    last_seq: u64,
    done: bool,
}

impl MemoryWatch {
    async fn next(mut self) -> Option<(Result<KvEvent>, Self)> {
        if self.done {
            return None;
        }
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((Ok(event), self));
            }
            match self.rx.recv().await {
                Ok((seq, event)) => {
                    if seq > self.last_seq {
                        self.last_seq = seq;
                        if event.key.starts_with(&self.prefix) {
                            self.pending.push_back(event);
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // We fell behind the live channel: refill from history, or report that
                    // the gap can no longer be filled.
                    let inner = self.inner.upgrade()?;
                    let state = inner.lock();
                    if self.last_seq < state.compacted_seq {
                        let err = Error::Compacted { requested: state.compacted, oldest: state.compacted + 1 };
                        drop(state);
                        self.done = true;
                        return Some((Err(err), self));
                    }
                    let last = self.last_seq;
                    self.pending.extend(
                        state.history.iter().filter(|(seq, e)| *seq > last && e.key.starts_with(&self.prefix)).map(|(_, e)| e.clone()),
                    );
                    self.last_seq = state.event_seq;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}
