//! One pool: its values, its byte count and, for ephemeral pools, its eviction order.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use utmem_proto::{Key, ObjectId, PoolKind};

use super::eviction::{EvictionPolicy, Lru};
use super::identity::{Counters, Identity};
use super::journal::Journal;
use super::lock;

/// A pool of values; all its bytes are charged to one account.
#[derive(Debug)]
pub struct Pool {
    pub(crate) kind: PoolKind,
    pub(crate) ephemeral: bool,
    /// Its changes go to this log first (a durable pool; see [`super::journal`]).
    pub(crate) journal: Option<Arc<Journal>>,
    /// The identity charged for this pool's bytes (for a shared pool, its own account).
    pub(crate) account: Arc<Identity>,
    /// What was done to this pool, by whichever identity (all grantees of a shared pool).
    pub(crate) counters: Counters,
    inner: Mutex<PoolInner>,
}

#[derive(Debug, Default)]
pub(crate) struct PoolInner {
    pub(crate) destroyed: bool,
    values: BTreeMap<Key, Bytes>,
    bytes: u64,
    eviction: Option<Box<dyn EvictionPolicy>>,
}

/// A value that left a pool; its bytes must be released from the account.
pub(crate) struct Removed(pub(crate) u64);

impl PoolInner {
    pub(crate) fn get(&mut self, key: Key) -> Option<Bytes> {
        let v = self.values.get(&key)?.clone();
        if let Some(e) = self.eviction.as_mut() {
            e.touch(key);
        }
        Some(v)
    }

    pub(crate) fn len_of(&self, key: Key) -> Option<u64> {
        self.values.get(&key).map(|v| v.len() as u64)
    }

    /// Stores `value`; returns whether a value was replaced. Bytes were reserved by the caller.
    pub(crate) fn insert(&mut self, key: Key, value: Bytes) -> bool {
        self.bytes += value.len() as u64;
        if let Some(e) = self.eviction.as_mut() {
            e.insert(key);
        }
        match self.values.insert(key, value) {
            Some(old) => {
                self.bytes -= old.len() as u64;
                true
            }
            None => false,
        }
    }

    pub(crate) fn remove(&mut self, key: Key) -> Option<Removed> {
        let v = self.values.remove(&key)?;
        if let Some(e) = self.eviction.as_mut() {
            e.remove(key);
        }
        self.bytes -= v.len() as u64;
        Some(Removed(v.len() as u64))
    }

    pub(crate) fn keys_of(&self, oid: ObjectId) -> Vec<Key> {
        let lo = Key {
            oid,
            ..Key::default()
        };
        let hi = Key {
            oid,
            index: utmem_proto::Index(u32::MAX),
        };
        self.values.range(lo..=hi).map(|(k, _)| *k).collect()
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = (&Key, &Bytes)> {
        self.values.iter()
    }

    pub(crate) fn victim(&self) -> Option<Key> {
        self.eviction.as_ref().and_then(|e| e.victim())
    }

    pub(crate) fn drain(&mut self) -> (u64, u64) {
        let n = self.values.len() as u64;
        let bytes = self.bytes;
        self.values.clear();
        self.bytes = 0;
        if self.eviction.is_some() {
            self.eviction = Some(Box::<Lru>::default());
        }
        (n, bytes)
    }

    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.values.len() as u64, self.bytes)
    }
}

impl Pool {
    pub(crate) fn new(
        kind: PoolKind,
        ephemeral: bool,
        journal: Option<Arc<Journal>>,
        account: Arc<Identity>,
    ) -> Self {
        let inner = PoolInner {
            eviction: ephemeral.then(|| Box::<Lru>::default() as Box<dyn EvictionPolicy>),
            ..PoolInner::default()
        };
        Pool {
            kind,
            ephemeral,
            journal,
            account,
            counters: Counters::default(),
            inner: Mutex::new(inner),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, PoolInner> {
        lock(&self.inner)
    }

    /// Name or uuid of the pool.
    pub fn kind(&self) -> &PoolKind {
        &self.kind
    }

    /// Whether the host may drop its values to make room.
    pub fn is_ephemeral(&self) -> bool {
        self.ephemeral
    }

    /// Whether its values survive a restart of the host.
    pub fn is_durable(&self) -> bool {
        self.journal.is_some()
    }

    /// Values and bytes it holds now.
    pub fn counts(&self) -> (u64, u64) {
        self.lock().counts()
    }
}
