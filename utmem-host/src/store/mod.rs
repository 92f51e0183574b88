//! The pool store: identities, their pools, byte accounting, quotas and the
//! host-wide capacity. No sockets: the daemon's sessions call into it.
//!
//! Locking: the identity map and the shared-pool map are touched only when a
//! connection starts or a pool is opened. The hot path (PUT/GET/FLUSH) takes
//! the caller identity's pool table for reading and then one pool's mutex;
//! byte accounting is lock-free (atomic reservations against the quota and
//! the capacity). No operation holds two pool locks at once.
//!
//! Accounting: every value is *charged* its length plus a fixed per-value
//! overhead ([`StoreOptions::value_overhead`], the host's own bookkeeping for it),
//! so an empty value is not free; quotas and the capacity cap the charge. The
//! byte counts that STATS and the admin view show stay the values' lengths. A PUT
//! over a socket reserves its charge when its header arrives ([`Store::reserve_put`])
//! and stores the payload later ([`Store::commit_put`]); a reservation not committed
//! is given back when dropped.

mod arena;
mod durable;
mod eviction;
mod identity;
mod journal;
mod policy;
mod pool;
mod record;
mod recovery;
mod reservation;
mod snapshot;

pub(crate) use arena::memfd;
pub use arena::{extent_len, Arena, ArenaBuf, ReaderWord};
pub use durable::{DurableOptions, RecoveryReport};
pub use eviction::{EvictionPolicy, Lru};
pub use identity::Identity;
pub use journal::{wait_durable, FsyncPolicy, COMPACT_FLOOR};
pub use policy::{Policy, SharedGrant};
pub use pool::Pool;
pub use reservation::Reservation;
pub use snapshot::{HostSnapshot, IdentitySnapshot, PoolCounters, PoolSnapshot};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{
    Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};
use std::time::Duration;

use bytes::Bytes;
use utmem_proto::{IdentityStats, Key, NewPool, ObjectId, PoolId, PoolKind, PoolUuid, Status};

use identity::Counters;
use pool::{PoolInner, Removed};
use record::{record_len, Kind};

/// Identities of shared pools' own accounts start with this prefix.
pub const SHARED_ACCOUNT_PREFIX: &str = "shared:";

/// Per-value charge and per-identity caps of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Bytes charged per value on top of its length (the host's bookkeeping for it).
    pub value_overhead: u64,
    /// Pools an identity may have open at once.
    pub max_pools: usize,
}

impl Default for StoreOptions {
    /// Exact value bytes, no pool cap: what [`Store::new`] gives (the daemon sets both).
    fn default() -> Self {
        StoreOptions {
            value_overhead: 0,
            max_pools: usize::MAX,
        }
    }
}

/// What `utmem-hostd` charges per value: measured at 96 bytes per stored empty
/// value (map node, `Bytes` handle, allocation), rounded up.
pub const VALUE_OVERHEAD: u64 = 128;

/// The pool store.
#[derive(Debug)]
pub struct Store {
    capacity: u64,
    max_value: u64,
    opts: StoreOptions,
    /// Value bytes held host-wide.
    used: AtomicU64,
    /// Bytes charged host-wide (values, their overhead, reservations), capped by `capacity`.
    charged: Arc<AtomicU64>,
    identities: RwLock<HashMap<String, Arc<Identity>>>,
    shared: Mutex<HashMap<PoolUuid, Arc<Pool>>>,
    policy: RwLock<Policy>,
    /// The data directory, once [`Store::open_data_dir`] ran: durable pools allowed.
    durable: OnceLock<durable::Durability>,
    /// Guest device regions being served, by identity name (see `server::device`).
    devices: Mutex<HashMap<String, utmem_proto::DeviceReply>>,
}

impl Store {
    /// A store holding at most `capacity` value bytes, values of at most `max_value` bytes.
    pub fn new(capacity: u64, max_value: u64, policy: Policy) -> Self {
        Self::with_options(capacity, max_value, policy, StoreOptions::default())
    }

    /// Like [`Store::new`], with a per-value overhead and per-identity caps.
    pub fn with_options(capacity: u64, max_value: u64, policy: Policy, opts: StoreOptions) -> Self {
        Store {
            capacity,
            max_value,
            opts,
            used: AtomicU64::new(0),
            charged: Arc::new(AtomicU64::new(0)),
            identities: RwLock::new(HashMap::new()),
            shared: Mutex::new(HashMap::new()),
            policy: RwLock::new(policy),
            durable: OnceLock::new(),
            devices: Mutex::new(HashMap::new()),
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

    /// Bytes charged host-wide: values, their overhead and PUTs in flight.
    pub fn charged(&self) -> u64 {
        self.charged.load(Relaxed)
    }

    /// What a value of `len` bytes is charged.
    pub fn charge_of(&self, len: u64) -> u64 {
        len.saturating_add(self.opts.value_overhead)
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
        let a = Arena::new(&ident.name, self.arena_len(ident))?;
        *slot = Some(Arc::clone(&a));
        Ok(a)
    }

    fn arena_len(&self, ident: &Identity) -> u64 {
        ident
            .quota()
            .min(self.capacity)
            .saturating_mul(2)
            .min(1 << 40)
    }

    /// The arena of a guest device's identity, made now with room for the device's
    /// header and slots before it: `plan(arena_len)` says the region's length and
    /// where the arena starts. Fails if the identity already has an arena (a local
    /// client mapped it first): device identities are set up at start.
    pub fn device_arena(
        &self,
        ident: &Identity,
        plan: impl FnOnce(u64) -> (u64, u64),
    ) -> std::io::Result<Arc<Arena>> {
        let mut slot = lock(&ident.arena);
        if let Some(a) = slot.as_ref() {
            return Err(std::io::Error::other(format!(
                "identity {} already has a {}-byte arena",
                ident.name,
                a.len()
            )));
        }
        let (len, prefix) = plan(self.arena_len(ident));
        let a = Arena::with_prefix(&ident.name, len, prefix)?;
        *slot = Some(Arc::clone(&a));
        Ok(a)
    }

    /// Records which device region serves `name` now (`None`: none).
    pub fn set_device(&self, name: &str, d: Option<utmem_proto::DeviceReply>) {
        let mut devs = lock(&self.devices);
        match d {
            Some(d) => devs.insert(name.to_owned(), d),
            None => devs.remove(name),
        };
    }

    /// The device region serving `name`, if one does.
    pub fn device(&self, name: &str) -> Option<utmem_proto::DeviceReply> {
        lock(&self.devices).get(name).copied()
    }

    /// Opens a pool for `caller`: the same name (or uuid) gives the same pool again.
    pub fn open_pool(&self, caller: &Arc<Identity>, req: &NewPool) -> Result<PoolId, Status> {
        if caller.is_dropped() {
            return Err(Status::Denied);
        }
        if req.durable && (req.ephemeral || self.durable.get().is_none()) {
            return Err(Status::BadRequest);
        }
        let known = read(&caller.pools).by_kind.get(&req.kind).copied();
        if let Some(id) = known {
            match caller.pool(id) {
                // A shared pool another grantee destroyed (or the operator dropped):
                // this handle is dead; opening the uuid again gives a fresh pool.
                Some(pool) if pool.lock().destroyed => {
                    caller.forget(id);
                }
                Some(pool)
                    if pool.ephemeral == req.ephemeral && pool.is_durable() == req.durable =>
                {
                    return Ok(id)
                }
                Some(_) => return Err(Status::BadRequest),
                None => return Err(Status::UnknownPool),
            }
        }
        if read(&caller.pools).by_id.len() >= self.opts.max_pools {
            tracing::warn!(
                identity = %caller.name,
                max_pools = self.opts.max_pools,
                "NEW_POOL refused: the identity has as many pools open as it may"
            );
            return Err(Status::NoSpace);
        }
        let pool = match &req.kind {
            PoolKind::Private(_) => Arc::new(Pool::new(
                req.kind.clone(),
                req.ephemeral,
                self.journal_if(req.durable, caller)?,
                Arc::clone(caller),
            )),
            PoolKind::Shared(uuid) => {
                if !read(&self.policy).grants(uuid, &caller.name) {
                    return Err(Status::Denied);
                }
                let mut shared = lock(&self.shared);
                // A pool destroyed behind the map's back (drop-identity of its account)
                // is gone: the uuid starts over.
                if shared.get(uuid).is_some_and(|p| p.lock().destroyed) {
                    shared.remove(uuid);
                }
                if let Some(p) = shared.get(uuid) {
                    if p.ephemeral != req.ephemeral || p.is_durable() != req.durable {
                        return Err(Status::BadRequest);
                    }
                    Arc::clone(p)
                } else {
                    let account = self.identity(&format!(
                        "{SHARED_ACCOUNT_PREFIX}{}",
                        uuid::Uuid::from_bytes(uuid.0)
                    ));
                    let journal = self.journal_if(req.durable, &account)?;
                    let p = Arc::new(Pool::new(req.kind.clone(), req.ephemeral, journal, account));
                    Self::register(&p.account, &p)?;
                    shared.insert(*uuid, Arc::clone(&p));
                    p
                }
            }
        };
        Self::register(caller, &pool)
    }

    /// Gives `pool` a handle in `ident`. Handles are never reused: once all 2^32 - 1
    /// were given out, NO_SPACE (a stale handle must never reach another pool).
    fn register(ident: &Identity, pool: &Arc<Pool>) -> Result<PoolId, Status> {
        let mut t = write(&ident.pools);
        if let Some(id) = t.by_kind.get(&pool.kind) {
            return Ok(*id);
        }
        let Some(next) = t.next.checked_add(1) else {
            tracing::warn!(identity = %ident.name, "NEW_POOL refused: every pool id was used");
            return Err(Status::NoSpace);
        };
        t.next = next;
        let id = PoolId(next);
        t.by_kind.insert(pool.kind.clone(), id);
        t.by_id.insert(id, Arc::clone(pool));
        Ok(id)
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
        if let Some(j) = &pool.journal {
            let (n, bytes) = inner.counts();
            let dead = n * record_len(&pool.kind, 0) + bytes;
            if let Err(e) = j.append(Kind::DropPool, &pool.kind, Key::default(), &[], dead) {
                tracing::error!(dir = %j.dir().display(), "cannot log a pool drop: {e}");
            }
        }
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
        let status = match self.reserve_put(caller, pool, key, value.len() as u64) {
            Ok(r) => self.commit_put(caller, pool, key, value, r),
            Err(s) => s,
        };
        if pool.journal.is_some() {
            wait_durable();
        }
        status
    }

    /// Reserves what a PUT of `len` bytes under `key` will be charged, before its
    /// payload is read (the same rules as [`Store::put`]; an ephemeral pool drops the
    /// old value now). Dropping the reservation gives the bytes back.
    pub fn reserve_put(
        &self,
        caller: &Identity,
        pool: &Pool,
        key: Key,
        len: u64,
    ) -> Result<Reservation, Status> {
        if len > self.max_value {
            bump(caller, pool, |c| &c.refusals);
            return Err(Status::TooLarge);
        }
        let acct = &pool.account;
        let new = self.charge_of(len);
        for attempt in 0..2 {
            let need = {
                let mut inner = pool.lock();
                if inner.destroyed {
                    return Err(Status::UnknownPool);
                }
                if pool.ephemeral {
                    if let Some(Removed(n)) = inner.remove(key) {
                        self.release(acct, n, 1);
                    }
                }
                let old = inner.len_of(key).map_or(0, |n| self.charge_of(n));
                let need = new.saturating_sub(old);
                if self.reserve(acct, need)
                    || (pool.ephemeral && self.evict_until(pool, &mut inner, need))
                {
                    return Ok(self.reservation(acct, need));
                }
                need
            };
            if attempt == 1 || self.make_room(pool, need) == 0 {
                break;
            }
        }
        refuse_no_space(caller, pool);
        Err(Status::NoSpace)
    }

    fn reservation(&self, acct: &Arc<Identity>, n: u64) -> Reservation {
        Reservation::new(Arc::clone(acct), Arc::clone(&self.charged), n)
    }

    /// Stores `value` (whose length [`Store::reserve_put`] was given) with what was
    /// reserved for it. If another connection changed the key in between so that more
    /// is needed and it does not fit: NO_SPACE, nothing changed.
    pub fn commit_put(
        &self,
        caller: &Identity,
        pool: &Pool,
        key: Key,
        value: Bytes,
        mut res: Reservation,
    ) -> Status {
        let acct = &pool.account;
        let len = value.len() as u64;
        let new = self.charge_of(len);
        if let Some(j) = &pool.journal {
            j.throttle();
        }
        let mut inner = pool.lock();
        if inner.destroyed {
            return Status::UnknownPool;
        }
        if pool.ephemeral {
            if let Some(Removed(n)) = inner.remove(key) {
                self.release(acct, n, 1);
            }
        }
        let old_len = inner.len_of(key);
        let old = old_len.map_or(0, |n| self.charge_of(n));
        let need = new.saturating_sub(old);
        if res.bytes() < need {
            let more = need - res.bytes();
            if !(self.reserve(acct, more)
                || (pool.ephemeral && self.evict_until(pool, &mut inner, more)))
            {
                refuse_no_space(caller, pool);
                return Status::NoSpace;
            }
            res.add(more);
        }
        if let Some(j) = &pool.journal {
            let dead = old_len.map_or(0, |n| record_len(&pool.kind, n));
            if let Err(e) = j.append(Kind::Put, &pool.kind, key, &value, dead) {
                tracing::error!(dir = %j.dir().display(), "PUT refused: cannot log it: {e}");
                refuse_no_space(caller, pool);
                return Status::NoSpace;
            }
            if j.needs_compaction() {
                self.compact_later(j, acct);
            }
        }
        // From here the value is stored: the account keeps `need` of the reservation
        // (the growth over the old value) and gives back the rest, and what the old
        // value was charged beyond the new one.
        let spare = res.take() - need;
        self.unreserve(acct, spare + old.saturating_sub(new));
        self.used.fetch_add(len, Relaxed);
        acct.used.fetch_add(len, Relaxed);
        if let Some(o) = old_len {
            self.used.fetch_sub(o, Relaxed);
            acct.used.fetch_sub(o, Relaxed);
        }
        if !inner.insert(key, value) {
            acct.values.fetch_add(1, Relaxed);
        }
        bump(caller, pool, |c| &c.puts);
        Status::Ok
    }

    /// Evicts from a locked ephemeral pool until `need` bytes are reserved.
    fn evict_until(&self, pool: &Pool, inner: &mut PoolInner, need: u64) -> bool {
        let acct = &pool.account;
        while let Some(victim) = inner.victim() {
            if let Some(Removed(n)) = inner.remove(victim) {
                self.release(acct, n, 1);
                bump(acct, pool, |c| &c.evictions);
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
                    bump(acct, &pool, |c| &c.evictions);
                    freed += self.charge_of(n);
                }
            }
            if self.would_fit(acct, need) {
                break;
            }
        }
        freed
    }

    fn would_fit(&self, acct: &Identity, need: u64) -> bool {
        acct.charged().saturating_add(need) <= acct.quota()
            && self.charged().saturating_add(need) <= self.capacity
    }

    /// Charges `n` bytes to `acct` and the host if both stay under their caps.
    fn reserve(&self, acct: &Identity, n: u64) -> bool {
        if n == 0 {
            return true;
        }
        let capped = |a: &AtomicU64, cap: u64| {
            a.fetch_update(Relaxed, Relaxed, |v| v.checked_add(n).filter(|s| *s <= cap))
                .is_ok()
        };
        if !capped(&acct.charged, acct.quota()) {
            return false;
        }
        if !capped(&self.charged, self.capacity) {
            acct.charged.fetch_sub(n, Relaxed);
            return false;
        }
        true
    }

    fn unreserve(&self, acct: &Identity, n: u64) {
        acct.charged.fetch_sub(n, Relaxed);
        self.charged.fetch_sub(n, Relaxed);
    }

    /// A value of `bytes` bytes (or `values` values of `bytes` in all) left `acct`.
    fn release(&self, acct: &Identity, bytes: u64, values: u64) {
        acct.used.fetch_sub(bytes, Relaxed);
        acct.values.fetch_sub(values, Relaxed);
        self.used.fetch_sub(bytes, Relaxed);
        self.unreserve(
            acct,
            bytes.saturating_add(values.saturating_mul(self.opts.value_overhead)),
        );
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
        bump(caller, pool, |c| &c.gets);
        match got {
            Some(v) => {
                bump(caller, pool, |c| &c.hits);
                Ok(v)
            }
            None => {
                bump(caller, pool, |c| &c.misses);
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
        if let (Some(j), Some(n)) = (&pool.journal, inner.len_of(key)) {
            let dead = record_len(&pool.kind, n);
            if let Err(e) = j.append(Kind::Flush, &pool.kind, key, &[], dead) {
                tracing::error!(dir = %j.dir().display(), "cannot log a FLUSH: {e}");
            }
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
        let keys = inner.keys_of(oid);
        if let (Some(j), false) = (&pool.journal, keys.is_empty()) {
            let dead: u64 = keys
                .iter()
                .filter_map(|k| inner.len_of(*k))
                .map(|n| record_len(&pool.kind, n))
                .sum();
            let key = Key {
                oid,
                ..Key::default()
            };
            if let Err(e) = j.append(Kind::FlushObject, &pool.kind, key, &[], dead) {
                tracing::error!(dir = %j.dir().display(), "cannot log a FLUSH_OBJECT: {e}");
            }
        }
        for key in keys {
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
        if name.starts_with(SHARED_ACCOUNT_PREFIX) {
            // A shared pool's own account: its uuid starts over on the next open.
            lock(&self.shared).retain(|_, p| !Arc::ptr_eq(&p.account, &ident));
        }
        let before = ident.used();
        let journal = lock(&ident.journal).take();
        if let Some(j) = &journal {
            // Its durable data goes too: nothing more is logged, the directory is removed.
            if let Err(e) = j.delete() {
                tracing::error!(dir = %j.dir().display(), "cannot delete durable data: {e}");
            }
        }
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
            // Durable data outlives idleness: only drop-identity removes it.
            .filter(|i| lock(&i.journal).is_none())
            .filter(|i| i.idle_since().is_some_and(|t| t.elapsed() >= idle))
            .map(|i| i.name.clone())
            .collect();
        for name in &stale {
            self.drop_identity(name);
        }
        stale
    }
}

/// Bumps one counter of `who` and the same counter of `pool`.
fn bump(who: &Identity, pool: &Pool, which: fn(&Counters) -> &AtomicU64) {
    Counters::bump(which(&who.counters));
    Counters::bump(which(&pool.counters));
}

fn refuse_no_space(who: &Identity, pool: &Pool) {
    bump(who, pool, |c| &c.refusals);
    bump(who, pool, |c| &c.no_space);
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

#[cfg(test)]
mod tests {
    use super::*;
    use utmem_proto::PoolKind;

    fn store(capacity: u64, quota: u64, opts: StoreOptions) -> Store {
        Store::with_options(capacity, 1 << 20, Policy::new(quota), opts)
    }

    fn charged() -> StoreOptions {
        StoreOptions {
            value_overhead: VALUE_OVERHEAD,
            max_pools: 8,
        }
    }

    fn private(s: &Store, who: &Arc<Identity>, name: &str) -> Arc<Pool> {
        let req = NewPool {
            kind: PoolKind::Private(name.into()),
            ephemeral: false,
            durable: false,
        };
        let id = s.open_pool(who, &req).expect("open");
        who.pool(id).expect("pool")
    }

    #[test]
    fn empty_values_are_charged_their_overhead() {
        let s = store(1 << 20, 64 * VALUE_OVERHEAD, charged());
        let a = s.identity("a");
        let p = private(&s, &a, "p");
        let mut stored = 0;
        for i in 0..1000 {
            match s.put(&a, &p, Key::new(i, 0), Bytes::new()) {
                Status::Ok => stored += 1,
                st => {
                    assert_eq!(st, Status::NoSpace);
                    break;
                }
            }
        }
        assert_eq!(stored, 64);
        assert_eq!((a.used(), a.charged()), (0, 64 * VALUE_OVERHEAD));
        // Replacing a value costs only the growth; flushing gives everything back.
        assert_eq!(s.put(&a, &p, Key::new(0, 0), Bytes::new()), Status::Ok);
        for i in 0..64 {
            assert_eq!(s.flush(&p, Key::new(i, 0)), Status::Ok);
        }
        assert_eq!((a.charged(), s.charged(), s.used()), (0, 0, 0));
    }

    #[test]
    fn a_reservation_holds_quota_until_committed_or_dropped() {
        let s = store(1 << 20, 10_000, charged());
        let a = s.identity("a");
        let p = private(&s, &a, "p");
        let r = s.reserve_put(&a, &p, Key::new(1, 0), 6000).expect("fits");
        assert_eq!(a.charged(), 6000 + VALUE_OVERHEAD);
        // A second one does not fit while the first is held.
        assert_eq!(
            s.reserve_put(&a, &p, Key::new(2, 0), 6000).unwrap_err(),
            Status::NoSpace
        );
        drop(r);
        assert_eq!((a.charged(), s.charged()), (0, 0));
        let r = s
            .reserve_put(&a, &p, Key::new(2, 0), 6000)
            .expect("fits again");
        let v = Bytes::from(vec![1u8; 6000]);
        assert_eq!(s.commit_put(&a, &p, Key::new(2, 0), v, r), Status::Ok);
        assert_eq!((a.used(), a.charged()), (6000, 6000 + VALUE_OVERHEAD));
        // Replacing it with a smaller value gives back the difference.
        assert_eq!(
            s.put(&a, &p, Key::new(2, 0), Bytes::from_static(b"x")),
            Status::Ok
        );
        assert_eq!((a.used(), a.charged()), (1, 1 + VALUE_OVERHEAD));
        assert_eq!(s.used(), 1);
    }

    #[test]
    fn pool_ids_never_wrap() {
        let s = store(1 << 20, 1 << 20, StoreOptions::default());
        let a = s.identity("a");
        write(&a.pools).next = u32::MAX - 1;
        let last = private(&s, &a, "last");
        assert_eq!(
            read(&a.pools).by_kind.get(last.kind()),
            Some(&PoolId(u32::MAX))
        );
        let req = NewPool {
            kind: PoolKind::Private("one-too-many".into()),
            ephemeral: false,
            durable: false,
        };
        assert_eq!(s.open_pool(&a, &req), Err(Status::NoSpace));
        s.destroy_pool(&a, PoolId(u32::MAX));
        assert_eq!(s.open_pool(&a, &req), Err(Status::NoSpace), "never reused");
    }

    #[test]
    fn pools_per_identity_are_capped() {
        let s = store(1 << 20, 1 << 20, charged());
        let a = s.identity("a");
        for i in 0..8 {
            private(&s, &a, &format!("p{i}"));
        }
        let req = NewPool {
            kind: PoolKind::Private("p8".into()),
            ephemeral: false,
            durable: false,
        };
        assert_eq!(s.open_pool(&a, &req), Err(Status::NoSpace));
        // Reopening one it has is not a new pool.
        private(&s, &a, "p3");
        s.destroy_pool(&a, PoolId(1));
        assert!(s.open_pool(&a, &req).is_ok());
    }

    fn shared_store() -> (Store, PoolUuid, NewPool) {
        let u = PoolUuid([7; 16]);
        let mut policy = Policy::new(1 << 20);
        policy.shared.insert(
            u,
            SharedGrant {
                quota: 1 << 20,
                identities: ["a".to_owned(), "b".to_owned()].into(),
            },
        );
        let s = Store::with_options(1 << 20, 1 << 20, policy, charged());
        let req = NewPool {
            kind: PoolKind::Shared(u),
            ephemeral: false,
            durable: false,
        };
        (s, u, req)
    }

    #[test]
    fn a_shared_pool_destroyed_by_one_grantee_reopens_fresh_for_the_others() {
        let (s, _, req) = shared_store();
        let (a, b) = (s.identity("a"), s.identity("b"));
        let pa = s.open_pool(&a, &req).expect("a");
        let pb = s.open_pool(&b, &req).expect("b");
        let pool = b.pool(pb).expect("pool");
        assert_eq!(
            s.put(&b, &pool, Key::new(1, 0), Bytes::from_static(b"v")),
            Status::Ok
        );
        s.destroy_pool(&a, pa);
        assert_eq!(s.get(&b, &pool, Key::new(1, 0)), Err(Status::UnknownPool));
        let pb2 = s.open_pool(&b, &req).expect("reopen");
        assert_ne!(pb2, pb, "a fresh handle");
        let fresh = b.pool(pb2).expect("pool");
        assert_eq!(s.get(&b, &fresh, Key::new(1, 0)), Err(Status::Miss));
        assert_eq!(
            s.put(&b, &fresh, Key::new(1, 0), Bytes::from_static(b"w")),
            Status::Ok
        );
        let pa2 = s.open_pool(&a, &req).expect("a reopens");
        let seen = a.pool(pa2).expect("pool");
        assert_eq!(
            s.get(&a, &seen, Key::new(1, 0)),
            Ok(Bytes::from_static(b"w"))
        );
    }

    #[test]
    fn dropping_a_shared_account_lets_its_uuid_start_over() {
        let (s, u, req) = shared_store();
        let a = s.identity("a");
        let pa = s.open_pool(&a, &req).expect("a");
        let pool = a.pool(pa).expect("pool");
        assert_eq!(
            s.put(&a, &pool, Key::new(1, 0), Bytes::from_static(b"v")),
            Status::Ok
        );
        let account = format!("{SHARED_ACCOUNT_PREFIX}{}", uuid::Uuid::from_bytes(u.0));
        assert_eq!(s.drop_identity(&account), Some(1));
        assert_eq!(s.charged(), 0);
        let again = s.open_pool(&a, &req).expect("reopen");
        let pool = a.pool(again).expect("pool");
        assert_eq!(s.get(&a, &pool, Key::new(1, 0)), Err(Status::Miss));
        assert_eq!(
            s.put(&a, &pool, Key::new(1, 0), Bytes::from_static(b"w")),
            Status::Ok
        );
    }
}
