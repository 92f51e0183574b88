//! An identity: who the host says a client is (a VM, a uid, a listener name),
//! with its quota, its byte account and the pools it has open.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use utmem_proto::{PoolId, PoolKind};

use super::pool::Pool;
use super::{lock, read, write};

/// Counters kept per identity and per pool; all monotonic.
#[derive(Debug, Default)]
pub struct Counters {
    pub(crate) puts: AtomicU64,
    pub(crate) gets: AtomicU64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) evictions: AtomicU64,
    /// PUTs refused: NO_SPACE or TOO_LARGE.
    pub(crate) refusals: AtomicU64,
    /// PUTs refused with NO_SPACE.
    pub(crate) no_space: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
}

#[derive(Debug, Default)]
pub(crate) struct PoolTable {
    pub(crate) by_kind: HashMap<PoolKind, PoolId>,
    pub(crate) by_id: HashMap<PoolId, Arc<Pool>>,
    pub(crate) next: u32,
}

/// One identity and its account.
#[derive(Debug)]
pub struct Identity {
    pub(crate) name: String,
    pub(crate) quota: AtomicU64,
    /// Value bytes held by this identity's pools.
    pub(crate) used: AtomicU64,
    /// Bytes charged to it (values, their overhead, PUTs in flight): capped by the quota.
    pub(crate) charged: AtomicU64,
    /// Values charged to this identity.
    pub(crate) values: AtomicU64,
    pub(crate) counters: Counters,
    pub(crate) pools: RwLock<PoolTable>,
    pub(crate) dropped: AtomicBool,
    connections: AtomicUsize,
    /// Connections over the cap still waiting for their DENIED reply.
    refusals_pending: AtomicUsize,
    last_seen: Mutex<Instant>,
    /// The value arena its local clients map, made on the first MAP.
    pub(crate) arena: Mutex<Option<Arc<super::Arena>>>,
    /// The log of its durable pools, made when the first one opens (or at recovery).
    pub(crate) journal: Mutex<Option<Arc<super::journal::Journal>>>,
}

impl Identity {
    pub(crate) fn new(name: String, quota: u64) -> Self {
        Identity {
            name,
            quota: AtomicU64::new(quota),
            used: AtomicU64::new(0),
            charged: AtomicU64::new(0),
            values: AtomicU64::new(0),
            counters: Counters::default(),
            pools: RwLock::new(PoolTable::default()),
            dropped: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            refusals_pending: AtomicUsize::new(0),
            last_seen: Mutex::new(Instant::now()),
            arena: Mutex::new(None),
            journal: Mutex::new(None),
        }
    }

    /// The identity's name, e.g. `cid:3`, `uid:1000`, `vm-a`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its quota in bytes.
    pub fn quota(&self) -> u64 {
        self.quota.load(Relaxed)
    }

    /// Value bytes its pools hold.
    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    /// Bytes charged to it: value bytes, per-value overhead and PUTs in flight.
    pub fn charged(&self) -> u64 {
        self.charged.load(Relaxed)
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Relaxed)
    }

    /// Counts a new connection unless `max` are open already; false then.
    pub fn try_connect(&self, max: usize) -> bool {
        let ok = self
            .connections
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .is_ok();
        if ok {
            *lock(&self.last_seen) = Instant::now();
        }
        ok
    }

    /// True once the operator dropped it: its pools are gone; reconnect to get a fresh one.
    pub fn is_dropped(&self) -> bool {
        self.dropped.load(Relaxed)
    }

    /// The pool behind a handle.
    pub fn pool(&self, id: PoolId) -> Option<Arc<Pool>> {
        read(&self.pools).by_id.get(&id).cloned()
    }

    /// Pools this identity has open, by id.
    pub fn open_pools(&self) -> Vec<(PoolId, Arc<Pool>)> {
        let mut v: Vec<_> = read(&self.pools)
            .by_id
            .iter()
            .map(|(id, p)| (*id, Arc::clone(p)))
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }

    pub(crate) fn forget(&self, id: PoolId) -> Option<Arc<Pool>> {
        let mut t = write(&self.pools);
        let pool = t.by_id.remove(&id)?;
        t.by_kind.retain(|_, v| *v != id);
        Some(pool)
    }

    /// Counts a connection over the cap that will be answered DENIED, unless `max`
    /// such are pending already (then it is closed at once); false then.
    pub fn try_refuse(&self, max: usize) -> bool {
        self.refusals_pending
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .is_ok()
    }

    /// A refused connection ended.
    pub fn refusal_done(&self) {
        self.refusals_pending.fetch_sub(1, Relaxed);
    }

    /// A connection of this identity began.
    pub fn connected(&self) {
        self.connections.fetch_add(1, Relaxed);
        *lock(&self.last_seen) = Instant::now();
    }

    /// A connection of this identity ended.
    pub fn disconnected(&self) {
        self.connections.fetch_sub(1, Relaxed);
        *lock(&self.last_seen) = Instant::now();
    }

    pub(crate) fn idle_since(&self) -> Option<Instant> {
        (self.connections.load(Relaxed) == 0).then(|| *lock(&self.last_seen))
    }
}
