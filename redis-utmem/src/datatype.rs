//! The `utmem-val` data type: what Redis does with a utmem key's stub when it
//! saves, loads, rewrites, copies or frees it.
//!
//! RDB and AOF carry the values themselves, so Redis can always be restored
//! without the host. Saving runs in the fork child for BGSAVE (it fetches
//! remote values over a connection of its own) and on the main thread for SAVE
//! and DEBUG RELOAD. Loading creates pending values and hands their PUTs to the
//! I/O thread, so the load itself never waits for the host.

use std::os::raw::{c_int, c_void};

use redis_module::native_types::RedisType;
use redis_module::raw::{self, RedisModuleIO, RedisModuleString};

use crate::io::{self, FetchError, Job};
use crate::raw::{emit_set, rdb_load as load_pair, rdb_save as save_pair};
use crate::slot::{Read, Slot, Stub};

const ENC_VERSION: c_int = 1;
/// RDB flag: the value follows.
const FLAG_VALUE: u64 = 0;
/// RDB flag: the value could not be read when saving; it loads as lost.
const FLAG_LOST: u64 = 1;

/// The registered type.
pub static UTMEM_TYPE: RedisType = RedisType::new(
    "utmem-val",
    ENC_VERSION,
    raw::RedisModuleTypeMethods {
        version: raw::REDISMODULE_TYPE_METHOD_VERSION as u64,
        rdb_load: Some(rdb_load),
        rdb_save: Some(rdb_save),
        aof_rewrite: Some(aof_rewrite),
        free: Some(free),
        mem_usage: Some(mem_usage),
        digest: None,
        aux_load: None,
        aux_save: None,
        aux_save2: None,
        aux_save_triggers: 0,
        free_effort: None,
        unlink: None,
        copy: Some(copy),
        defrag: None,
        copy2: None,
        free_effort2: None,
        mem_usage2: None,
        unlink2: None,
    },
);

/// The raw type pointer (set once the type is registered).
pub fn raw_type() -> *mut raw::RedisModuleType {
    *UTMEM_TYPE.raw_type.borrow()
}

/// # Safety
/// `value` must be a pointer this module gave Redis (a `Box<Stub>`).
unsafe fn stub<'a>(value: *mut c_void) -> Option<&'a Stub> {
    // SAFETY: guaranteed by the caller.
    unsafe { value.cast::<Stub>().as_ref() }
}

unsafe extern "C" fn rdb_save(rdb: *mut RedisModuleIO, value: *mut c_void) {
    // SAFETY: Redis passes back a value of our type.
    let Some(s) = (unsafe { stub(value) }) else {
        return;
    };
    match io::fetch_sync(&s.0) {
        Ok(b) => save_pair(rdb, FLAG_VALUE, &b),
        // Gone for good (the host answered MISS, or bytes that fail the checksum): the
        // snapshot records it as lost, and loads as lost (reads say UTMEMLOST).
        Err(e @ (FetchError::Lost | FetchError::Corrupt(_))) => {
            if let FetchError::Corrupt(why) = &e {
                crate::raw::log_warning(&format!(
                    "utmem: object {} is saved as lost: {why}",
                    s.0.oid
                ));
            }
            save_pair(rdb, FLAG_LOST, &[]);
        }
        // Only unreachable: it may come back, so a snapshot must not call it lost.
        Err(FetchError::Down(why)) if crate::raw::in_fork_child() => {
            crate::raw::log_warning(&format!(
                "utmem: BGSAVE/replication snapshot aborted: object {} is on a host that cannot be reached ({why}); retry once the host is back",
                s.0.oid
            ));
            // SAFETY: _exit in a fork child ends only the child; Redis sees a failed save.
            unsafe { libc::_exit(1) };
        }
        Err(FetchError::Down(why)) => {
            // A save on the main thread cannot fail from here; SAVE, SHUTDOWN and DEBUG
            // RELOAD are refused up front while the host does not answer (see filter.rs),
            // so this is a host that went away during the save.
            crate::raw::log_warning(&format!(
                "utmem: object {} could not be read for SAVE ({why}); it is saved as lost",
                s.0.oid
            ));
            save_pair(rdb, FLAG_LOST, &[]);
        }
    }
}

unsafe extern "C" fn rdb_load(rdb: *mut RedisModuleIO, encver: c_int) -> *mut c_void {
    if encver != ENC_VERSION {
        return std::ptr::null_mut();
    }
    let Some((flag, bytes)) = load_pair(rdb) else {
        return std::ptr::null_mut(); // I/O error: Redis (diskless load) handles it
    };
    let oid = io::next_oid();
    let slot = if flag == FLAG_LOST {
        Slot::lost(oid)
    } else if bytes.len() < crate::config::threshold() {
        // Below this server's threshold (RESTORE or MIGRATE from a server with a lower
        // one): the bytes stay in Redis.
        Slot::local(oid, bytes)
    } else {
        let slot = Slot::pending(oid, bytes);
        io::send(Job::Put {
            slot: std::sync::Arc::clone(&slot),
            done: None,
        });
        slot
    };
    Box::into_raw(Box::new(Stub(slot))).cast::<c_void>()
}

unsafe extern "C" fn aof_rewrite(
    aof: *mut RedisModuleIO,
    key: *mut RedisModuleString,
    value: *mut c_void,
) {
    // SAFETY: Redis passes back a value of our type.
    let Some(s) = (unsafe { stub(value) }) else {
        return;
    };
    match io::fetch_sync(&s.0) {
        // SAFETY: `aof` and `key` are what Redis passed to this callback.
        Ok(b) => unsafe { emit_set(aof, key, &b) },
        // An AOF has no way to say "lost": the key is left out (logged).
        Err(e @ (FetchError::Lost | FetchError::Corrupt(_))) => {
            crate::raw::log_warning(&format!(
                "utmem: object {} is lost ({e:?}); the AOF rewrite leaves its key out",
                s.0.oid
            ));
        }
        Err(FetchError::Down(why)) => {
            crate::raw::log_warning(&format!(
                "utmem: AOF rewrite aborted: object {} is on a host that cannot be reached ({why})",
                s.0.oid
            ));
            if crate::raw::in_fork_child() {
                // SAFETY: as in rdb_save: only the child ends, the rewrite fails.
                unsafe { libc::_exit(1) };
            }
        }
    }
}

unsafe extern "C" fn free(value: *mut c_void) {
    if !value.is_null() {
        // SAFETY: the box was created by us; Redis frees each value exactly once. The
        // slot flushes its host copy when its last reference goes (see slot.rs).
        drop(unsafe { Box::from_raw(value.cast::<Stub>()) });
    }
}

unsafe extern "C" fn mem_usage(value: *const c_void) -> usize {
    // SAFETY: Redis passes back a value of our type.
    unsafe { value.cast::<Stub>().as_ref() }.map_or(0, |s| s.0.mem_usage())
}

unsafe extern "C" fn copy(
    _from: *mut RedisModuleString,
    _to: *mut RedisModuleString,
    value: *const c_void,
) -> *mut c_void {
    // SAFETY: Redis passes back a value of our type.
    let Some(s) = (unsafe { value.cast::<Stub>().as_ref() }) else {
        return std::ptr::null_mut();
    };
    let oid = io::next_oid();
    let slot = match s.0.read() {
        Read::Here(b) => {
            let slot = Slot::pending(oid, b);
            io::send(Job::Put {
                slot: std::sync::Arc::clone(&slot),
                done: None,
            });
            slot
        }
        // The host copies it; until it has, the copy reads the source's bytes (and keeps
        // them from being flushed), so a host that is down or full loses nothing.
        Read::Remote(_) => {
            let slot = Slot::copy_of(oid, &s.0);
            io::send(Job::Copy {
                dst: std::sync::Arc::clone(&slot),
            });
            slot
        }
        Read::Lost => Slot::lost(oid),
    };
    Box::into_raw(Box::new(Stub(slot))).cast::<c_void>()
}
