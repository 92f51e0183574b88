//! The pool store: identities, their pools, byte accounting, quotas and the
//! host-wide capacity. No sockets: the daemon's sessions call into it.
//!
//! Locking: the identity map and the shared-pool map are touched only when a
//! connection starts or a pool is opened. The hot path (PUT/GET/FLUSH) takes
//! the caller identity's pool table for reading and then one pool's mutex;
//! byte accounting is lock-free (atomic reservations against the quota and
//! the capacity). No operation holds two pool locks at once.

mod arena;
mod eviction;
mod identity;
mod policy;
mod pool;
mod snapshot;

pub use arena::{extent_len, Arena, ArenaBuf, ReaderWord};
pub use eviction::{EvictionPolicy, Lru};
pub use identity::Identity;
pub use policy::{Policy, SharedGrant};
pub use pool::Pool;
pub use snapshot::{HostSnapshot, IdentitySnapshot, PoolSnapshot};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use bytes::Bytes;
use utmem_proto::{IdentityStats, Key, NewPool, ObjectId, PoolId, PoolKind, PoolUuid, Status};

use identity::Counters;
use pool::{PoolInner, Removed};

/// Identities of shared pools' own accounts start with this prefix.
pub const SHARED_ACCOUNT_PREFIX: &str = "shared:";

/// The pool store.
#[derive(Debug)]
pub struct Store {
    capacity: u64,
    max_value: u64,
    used: AtomicU64,
    identities: RwLock<HashMap<String, Arc<Identity>>>,
    shared: Mutex<HashMap<PoolUuid, Arc<Pool>>>,
    policy: RwLock<Policy>,
}

impl Store {
    /// A store holding at most `capacity` value bytes, values of at most `max_value` bytes.
    pub fn new(capacity: u64, max_value: u64, policy: Policy) -> Self {
        Store {
            capacity,
            max_value,
            used: AtomicU64::new(0),
            identities: RwLock::new(HashMap::new()),
            shared: Mutex::new(HashMap::new()),
            policy: RwLock::new(policy),
        }
    }

    /// Host-wide capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Largest value accepted.
    pub fn max_value(&self) -> u64 {
        self.max_value
    }

    /// Value bytes held host-wide.
    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    /// The identity named `name`, created on first use.
    pub fn identity(&self, name: &str) -> Arc<Identity> {
        if let Some(i) = read(&self.identities).get(name) {
            return Arc::clone(i);
        }
        let quota = self.quota_for(name);
        Arc::clone(
            write(&self.identities)
                .entry(name.to_owned())
                .or_insert_with(|| Arc::new(Identity::new(name.to_owned(), quota))),
        )
    }

    fn quota_for(&self, name: &str) -> u64 {
        let policy = read(&self.policy);
        match name
            .strip_prefix(SHARED_ACCOUNT_PREFIX)
            .and_then(|u| uuid::Uuid::parse_str(u).ok())
        {
            Some(u) => policy
                .shared
                .get(&PoolUuid(*u.as_bytes()))
                .map_or(0, |g| g.quota),
            None => policy.quota_of(name),
        }
    }

    /// Replaces quotas and grants (SIGHUP). Lowering a quota below what an identity
    /// holds drops nothing; its PUTs are refused until it is under again.
    pub fn set_policy(&self, policy: Policy) {
        *write(&self.policy) = policy;
        for (name, ident) in read(&self.identities).iter() {
            ident.quota.store(self.quota_for(name), Relaxed);
        }
    }

    /// The arena of `ident`, made on first use: twice what the identity may hold
    /// (its quota, or the host capacity if that is lower), so fragmentation never
    /// makes it the limit; a PUT that finds no room in it is kept in ordinary memory.
    pub fn arena(&self, ident: &Identity) -> std::io::Result<Arc<Arena>> {
        let mut slot = lock(&ident.arena);
        if let Some(a) = slot.as_ref() {
            return Ok(Arc::clone(a));
        }
        let len = ident
            .quota()
            .min(self.capacity)
            .saturating_mul(2)
            .min(1 << 40);
        let a = Arena::new(&ident.name, len)?;
        *slot = Some(Arc::clone(&a));
        Ok(a)
    }

    /// Opens a pool for `caller`: the same name (or uuid) gives the same pool again.
    pub fn open_pool(&self, caller: &Arc<Identity>, req: &NewPool) -> Result<PoolId, Status> {
        if caller.is_dropped() {
            return Err(Status::Denied);
        }
        if let Some(id) = read(&caller.pools).by_kind.get(&req.kind) {
            let pool = caller.pool(*id).ok_or(Status::UnknownPool)?;
            return if pool.ephemeral == req.ephemeral {
                Ok(*id)
            } else {
                Err(Status::BadRequest)
            };
        }
        let pool = match &req.kind {
            PoolKind::Private(_) => Arc::new(Pool::new(
                req.kind.clone(),
                req.ephemeral,
                Arc::clone(caller),
            )),
            PoolKind::Shared(uuid) => {
                if !read(&self.policy).grants(uuid, &caller.name) {
                    return Err(Status::Denied);
                }
                let mut shared = lock(&self.shared);
                if let Some(p) = shared.get(uuid) {
                    if p.ephemeral != req.ephemeral {
                        return Err(Status::BadRequest);
                    }
                    Arc::clone(p)
                } else {
                    let account = self.identity(&format!(
                        "{SHARED_ACCOUNT_PREFIX}{}",
                        uuid::Uuid::from_bytes(uuid.0)
                    ));
                    let p = Arc::new(Pool::new(req.kind.clone(), req.ephemeral, account));
                    Self::register(&p.account, &p);
                    shared.insert(*uuid, Arc::clone(&p));
                    p
                }
            }
        };
        Ok(Self::register(caller, &pool))
    }

    fn register(ident: &Identity, pool: &Arc<Pool>) -> PoolId {
        let mut t = write(&ident.pools);
        if let Some(id) = t.by_kind.get(&pool.kind) {
            return *id;
        }
        t.next += 1;
        let id = PoolId(t.next);
        t.by_kind.insert(pool.kind.clone(), id);
        t.by_id.insert(id, Arc::clone(pool));
        id
    }

    /// Drops a pool and its values. Destroying an unknown id is not an error.
    pub fn destroy_pool(&self, caller: &Identity, id: PoolId) {
        let Some(pool) = caller.forget(id) else {
            return;
        };
        if let PoolKind::Shared(uuid) = &pool.kind {
            let mut shared = lock(&self.shared);
            if shared.get(uuid).is_some_and(|p| Arc::ptr_eq(p, &pool)) {
                shared.remove(uuid);
            }
            drop(shared);
            for (pid, p) in pool.account.open_pools() {
                if Arc::ptr_eq(&p, &pool) {
                    pool.account.forget(pid);
                }
            }
        }
        self.destroy(&pool);
    }

    fn destroy(&self, pool: &Pool) {
        let mut inner = pool.lock();
        inner.destroyed = true;
        let (n, bytes) = inner.drain();
        drop(inner);
        self.release(&pool.account, bytes, n);
    }

    /// Stores `value` under `key`, replacing the old value.
    ///
    /// Persistent pools: if it does not fit (after dropping the account's ephemeral
    /// values), NO_SPACE and the old value stays. Ephemeral pools: the old value is
    /// dropped first, then least-recently-used values until the new one fits.
    pub fn put(&self, caller: &Identity, pool: &Pool, key: Key, value: Bytes) -> Status {
        let len = value.len() as u64;
        if len > self.max_value {
            Counters::bump(&caller.counters.refusals);
            return Status::TooLarge;
        }
        let mut value = Some(value);
        for attempt in 0..2 {
            let need = {
                let mut inner = pool.lock();
                if inner.destroyed {
                    return Status::UnknownPool;
                }
                match self.put_locked(pool, &mut inner, key, &mut value) {
                    Ok(()) => {
                        Counters::bump(&caller.counters.puts);
                        return Status::Ok;
                    }
                    Err(need) => need,
                }
            };
            if attempt == 1 || self.make_room(pool, need) == 0 {
                break;
            }
        }
        Counters::bump(&caller.counters.refusals);
        Status::NoSpace
    }

    /// Inserts if the bytes can be reserved; else returns the bytes still needed.
    fn put_locked(
        &self,
        pool: &Pool,
        inner: &mut PoolInner,
        key: Key,
        value: &mut Option<Bytes>,
    ) -> Result<(), u64> {
        let acct = &pool.account;
        let len = value.as_ref().map_or(0, |v| v.len() as u64);
        if pool.ephemeral {
            if let Some(Removed(n)) = inner.remove(key) {
                self.release(acct, n, 1);
            }
        }
        let old = inner.len_of(key);
        let fits = match old {
            Some(old) if old >= len => {
                self.release(acct, old - len, 0);
                true
            }
            _ => {
                let need = len - old.unwrap_or(0);
                self.reserve(acct, need) || (pool.ephemeral && self.evict_until(inner, acct, need))
            }
        };
        if !fits {
            return Err(len - old.unwrap_or(0));
        }
        let Some(v) = value.take() else {
            return Ok(());
        };
        if !inner.insert(key, v) {
            acct.values.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    /// Evicts from a locked ephemeral pool until `need` bytes are reserved.
    fn evict_until(&self, inner: &mut PoolInner, acct: &Identity, need: u64) -> bool {
        while let Some(victim) = inner.victim() {
            if let Some(Removed(n)) = inner.remove(victim) {
                self.release(acct, n, 1);
                Counters::bump(&acct.counters.evictions);
            }
            if self.reserve(acct, need) {
                return true;
            }
        }
        false
    }

    /// Drops values of the account's other ephemeral pools (in pool-id order, LRU
    /// inside each) until `need` more bytes would fit. Returns the bytes freed.
    fn make_room(&self, except: &Pool, need: u64) -> u64 {
        let acct = &except.account;
        let mut freed = 0;
        for (_, pool) in acct.open_pools() {
            if !pool.ephemeral
                || std::ptr::eq(Arc::as_ptr(&pool), except)
                || !Arc::ptr_eq(&pool.account, acct)
            {
                continue;
            }
            let mut inner = pool.lock();
            while !self.would_fit(acct, need) {
                let Some(victim) = inner.victim() else { break };
                if let Some(Removed(n)) = inner.remove(victim) {
                    self.release(acct, n, 1);
                    Counters::bump(&acct.counters.evictions);
                    freed += n;
                }
            }
            if self.would_fit(acct, need) {
                break;
            }
        }
        freed
    }

    fn would_fit(&self, acct: &Identity, need: u64) -> bool {
        acct.used().saturating_add(need) <= acct.quota()
            && self.used().saturating_add(need) <= self.capacity
    }

    fn reserve(&self, acct: &Identity, n: u64) -> bool {
        if n == 0 {
            return true;
        }
        let capped = |a: &AtomicU64, cap: u64| {
            a.fetch_update(Relaxed, Relaxed, |v| v.checked_add(n).filter(|s| *s <= cap))
                .is_ok()
        };
        if !capped(&acct.used, acct.quota()) {
            return false;
        }
        if !capped(&self.used, self.capacity) {
            acct.used.fetch_sub(n, Relaxed);
            return false;
        }
        true
    }

    fn release(&self, acct: &Identity, bytes: u64, values: u64) {
        acct.used.fetch_sub(bytes, Relaxed);
        acct.values.fetch_sub(values, Relaxed);
        self.used.fetch_sub(bytes, Relaxed);
    }

    /// The value under `key`; `Err(Miss)` if there is none.
    pub fn get(&self, caller: &Identity, pool: &Pool, key: Key) -> Result<Bytes, Status> {
        let got = {
            let mut inner = pool.lock();
            if inner.destroyed {
                return Err(Status::UnknownPool);
            }
            inner.get(key)
        };
        Counters::bump(&caller.counters.gets);
        match got {
            Some(v) => {
                Counters::bump(&caller.counters.hits);
                Ok(v)
            }
            None => {
                Counters::bump(&caller.counters.misses);
                Err(Status::Miss)
            }
        }
    }

    /// Drops one key. Not an error if it is absent.
    pub fn flush(&self, pool: &Pool, key: Key) -> Status {
        let mut inner = pool.lock();
        if inner.destroyed {
            return Status::UnknownPool;
        }
        if let Some(Removed(n)) = inner.remove(key) {
            self.release(&pool.account, n, 1);
        }
        Status::Ok
    }

    /// Drops every index of one object. Not an error if there are none.
    pub fn flush_object(&self, pool: &Pool, oid: ObjectId) -> Status {
        let mut inner = pool.lock();
        if inner.destroyed {
            return Status::UnknownPool;
        }
        for key in inner.keys_of(oid) {
            if let Some(Removed(n)) = inner.remove(key) {
                self.release(&pool.account, n, 1);
            }
        }
        Status::Ok
    }

    /// Copies the value under `src` to `dst` inside the pool. The bytes are shared in
    /// memory but charged twice: accounting stays exact per key whatever happens later.
    pub fn copy(&self, caller: &Identity, pool: &Pool, src: Key, dst: Key) -> Status {
        let value = {
            let mut inner = pool.lock();
            if inner.destroyed {
                return Status::UnknownPool;
            }
            inner.get(src)
        };
        match value {
            Some(v) => self.put(caller, pool, dst, v),
            None => Status::Miss,
        }
    }

    /// What a guest may see of itself.
    pub fn stats(&self, ident: &Identity) -> IdentityStats {
        let c = &ident.counters;
        IdentityStats {
            pools: read(&ident.pools).by_id.len() as u64,
            values: ident.values.load(Relaxed),
            bytes: ident.used(),
            quota: ident.quota(),
            puts: c.puts.load(Relaxed),
            gets: c.gets.load(Relaxed),
            hits: c.hits.load(Relaxed),
            misses: c.misses.load(Relaxed),
            evictions: c.evictions.load(Relaxed),
            refusals: c.refusals.load(Relaxed),
        }
    }

    /// Frees every pool of an identity (a VM that is gone) and forgets it, so that a
    /// new tenant under the same name starts empty. Returns the bytes freed, or
    /// `None` if no such identity exists.
    pub fn drop_identity(&self, name: &str) -> Option<u64> {
        let ident = write(&self.identities).remove(name)?;
        ident.dropped.store(true, Relaxed);
        let before = ident.used();
        for (id, pool) in ident.open_pools() {
            if Arc::ptr_eq(&pool.account, &ident) {
                self.destroy(&pool);
            }
            ident.forget(id);
        }
        Some(before)
    }

    /// Drops identities with no connection for longer than `idle`; returns their names.
    pub fn expire_idle(&self, idle: Duration) -> Vec<String> {
        let stale: Vec<String> = read(&self.identities)
            .values()
            .filter(|i| !i.name.starts_with(SHARED_ACCOUNT_PREFIX))
            .filter(|i| i.idle_since().is_some_and(|t| t.elapsed() >= idle))
            .map(|i| i.name.clone())
            .collect();
        for name in &stale {
            self.drop_identity(name);
        }
        stale
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(PoisonError::into_inner)
}
