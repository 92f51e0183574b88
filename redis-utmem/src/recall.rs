//! UTMEM.RECALLALL: for users leaving utmem (MODULE UNLOAD is refused while
//! the data type holds keys). Walks every database with SCAN in batches; holds
//! the GIL only to scan and to swap values, never while waiting for the host.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use redis_module::{Context, RedisString, RedisValue, ThreadSafeContext};

use crate::raw::{select_db, Key};
use crate::slot::{Slot, Stub};

fn bytes_of(v: &RedisValue) -> Option<Vec<u8>> {
    match v {
        RedisValue::BulkRedisString(s) => Some(s.as_slice().to_vec()),
        RedisValue::BulkString(s) | RedisValue::SimpleString(s) => Some(s.as_bytes().to_vec()),
        RedisValue::StringBuffer(b) => Some(b.clone()),
        _ => None,
    }
}

/// One SCAN step of db `db`: the next cursor and the utmem keys found with their slots.
/// A key name and the value it held when scanned.
type Found = (Vec<u8>, Arc<Slot>);

fn scan(ctx: &Context, db: i32, cursor: &str) -> Option<(String, Vec<Found>)> {
    if !select_db(ctx, db) {
        return None;
    }
    let reply = ctx
        .call("SCAN", &[cursor, "TYPE", "utmem-val", "COUNT", "200"][..])
        .ok()?;
    let RedisValue::Array(parts) = reply else {
        return None;
    };
    let next = String::from_utf8(bytes_of(parts.first()?)?).ok()?;
    let mut found = Vec::new();
    if let Some(RedisValue::Array(keys)) = parts.get(1) {
        for k in keys {
            let Some(name) = bytes_of(k) else { continue };
            let rs = RedisString::create_from_slice(ctx.ctx, &name);
            let key = Key::open(ctx, &rs);
            if let Some(s) = key.stub::<Stub>() {
                found.push((name, Arc::clone(&s.0)));
            }
        }
    }
    Some((next, found))
}

/// Recalls every utmem value of databases `0..dbs`.
pub fn run_all(dbs: i32) {
    let stats = crate::stats::get();
    for db in 0..dbs {
        let mut cursor = "0".to_owned();
        loop {
            let step = {
                let tsc = ThreadSafeContext::new();
                let ctx = tsc.lock();
                scan(&ctx, db, &cursor)
            };
            let Some((next, found)) = step else { break };
            // Fetch without the GIL.
            let fetched: Vec<_> = found
                .into_iter()
                .filter_map(|(name, slot)| {
                    crate::io::fetch_sync(&slot).ok().map(|b| (name, slot, b))
                })
                .collect();
            {
                let tsc = ThreadSafeContext::new();
                let ctx = tsc.lock();
                if select_db(&ctx, db) {
                    for (name, slot, b) in &fetched {
                        let rs = RedisString::create_from_slice(ctx.ctx, name);
                        if recall_key(&ctx, &rs, slot, b) {
                            stats.recalled.fetch_add(1, Relaxed);
                        }
                    }
                }
            }
            if next == "0" {
                break;
            }
            cursor = next;
        }
    }
}

/// Makes `name` a plain string again if it still holds `slot`, and propagates that as
/// the plain write it is (`SET key value [PXAT ms]`). Main thread (or GIL held).
pub fn recall_key(ctx: &Context, name: &RedisString, slot: &Arc<Slot>, bytes: &[u8]) -> bool {
    let key = Key::open(ctx, name);
    if !key.stub::<Stub>().is_some_and(|s| Arc::ptr_eq(&s.0, slot)) {
        return false;
    }
    let at = key.abs_expire_ms();
    drop(key);
    let value = RedisString::create_from_slice(ctx.ctx, bytes);
    let keep = RedisString::create(None, "KEEPTTL");
    // SET itself replaces the key in place, keeps its TTL and signals it.
    let _ = ctx.call("SET", &[name, &value, &keep][..]);
    match at {
        Some(at) => {
            let pxat = RedisString::create(None, "PXAT");
            let at = RedisString::create(None, at.to_string());
            ctx.replicate("SET", &[name, &value, &pxat, &at][..]);
        }
        None => ctx.replicate("SET", &[name, &value][..]),
    }
    true
}
