//! The UTMEM.* commands.
//!
//! Every command changes the keyspace at once, on the main thread, and only its
//! reply may wait for the host: UTMEM.SET stores a pending stub (readable from
//! Redis memory at once) and replies when the host acknowledged the PUT; a read
//! of a remote value blocks its own client while the I/O thread fetches it.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redis_module::{
    Context, NotifyEvent, RedisError, RedisResult, RedisString, RedisValue, ThreadSafeContext,
};

use crate::config;
use crate::gather::Gather;
use crate::io::{self, Job};
use crate::raw::{Key, KeyKind, Val};
use crate::slot::{Read, Slot, Stub};
use crate::stats::Stats;

fn arity(name: &str) -> RedisError {
    RedisError::String(format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What a read finds in a key.
enum Have {
    Missing,
    Value(Val),
    Fetch(Arc<Slot>, u32),
    WrongType,
}

/// `mapped_max`: values up to this long that sit in the mapped arena are copied
/// from there (0: never; the caller tried that already).
fn look(key: &Key, mapped_max: usize) -> Have {
    match key.kind() {
        KeyKind::Empty => Have::Missing,
        KeyKind::String => Have::Value(Val::Bulk(key.string().unwrap_or_default())),
        KeyKind::Ours => match key.stub() {
            Some(Stub(slot)) => match slot.read_near(mapped_max) {
                Read::Here(b) => Have::Value(Val::Bulk(b)),
                Read::Remote(crc) => Have::Fetch(Arc::clone(slot), crc),
                Read::Lost => {
                    Stats::bump(&crate::stats().lost_values);
                    Have::Value(Val::Err(
                        "UTMEMLOST this value could not be saved in the RDB it was loaded from"
                            .into(),
                    ))
                }
            },
            None => Have::Missing,
        },
        KeyKind::Other => Have::WrongType,
    }
}

/// The reply part for `have`, and the fetch to start if it is not known yet.
fn part(have: Have) -> (Option<Val>, Option<(Arc<Slot>, u32)>) {
    match have {
        Have::Missing | Have::WrongType => (Some(Val::Null), None),
        Have::Value(v) => (Some(v), None),
        Have::Fetch(slot, crc) => (None, Some((slot, crc))),
    }
}

fn fetch_into(g: &Gather, i: usize, slot: Arc<Slot>, crc: u32) {
    let g = g.clone();
    io::send(Job::Get {
        slot,
        crc,
        done: Box::new(move |r| {
            g.set(
                i,
                match r {
                    Ok(b) => Val::Bulk(b),
                    Err(v) => v,
                },
            )
        }),
    });
}

/// Replies with one value, fetching it from the host first if it lives there.
fn reply_one(ctx: &Context, have: Have) -> RedisResult {
    let (p, fetch) = part(have);
    let pending = Gather::start(ctx, vec![p], |mut v| v.remove(0));
    if let Some((slot, crc)) = fetch {
        fetch_into(&pending.gather(), 0, slot, crc);
    }
    pending.reply(ctx, config::timeout(), Val::Null)
}

fn put_into(g: &Gather, i: usize, slot: Arc<Slot>) {
    let g = g.clone();
    io::send(Job::Put {
        slot,
        done: Some(Box::new(move || g.set(i, Val::Ok))),
    });
}

/// Sends the PUT now if the SET may be acknowledged before the host has the value
/// (`set-ack local`, within `max-pending-bytes`); else gives the slot back to wait on.
fn put_unless_acked_locally(slot: Arc<Slot>) -> Option<Arc<Slot>> {
    if !config::ack_locally() {
        return Some(slot);
    }
    io::send(Job::Put { slot, done: None });
    None
}

#[derive(Debug, Default)]
struct SetOpts {
    nx: bool,
    xx: bool,
    get: bool,
    keepttl: bool,
    /// Absolute expiry in ms, and whether it came from a relative form (EX/PX).
    at_ms: Option<i64>,
}

fn parse_set_opts(args: &[RedisString]) -> Result<SetOpts, RedisError> {
    let syntax = || RedisError::Str("ERR syntax error");
    let mut o = SetOpts::default();
    let mut i = 0;
    while i < args.len() {
        let a = args[i]
            .try_as_str()
            .map_err(|_| syntax())?
            .to_ascii_uppercase();
        let mut num = |scale: i64, relative: bool| -> Result<i64, RedisError> {
            i += 1;
            let v = args.get(i).ok_or_else(syntax)?;
            let n: i64 =
                v.try_as_str()
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or(RedisError::Str(
                        "ERR value is not an integer or out of range",
                    ))?;
            let bad = || RedisError::Str("ERR invalid expire time in 'utmem.set' command");
            if n <= 0 {
                return Err(bad());
            }
            let ms = n.checked_mul(scale).ok_or_else(bad)?;
            if relative {
                ms.checked_add(now_ms()).ok_or_else(bad)
            } else {
                Ok(ms)
            }
        };
        let expire_set = o.at_ms.is_some() || o.keepttl;
        match a.as_str() {
            "NX" if !o.xx => o.nx = true,
            "XX" if !o.nx => o.xx = true,
            "GET" => o.get = true,
            "KEEPTTL" if !expire_set => o.keepttl = true,
            "EX" if !expire_set => o.at_ms = Some(num(1000, true)?),
            "PX" if !expire_set => o.at_ms = Some(num(1, true)?),
            "EXAT" if !expire_set => o.at_ms = Some(num(1000, false)?),
            "PXAT" if !expire_set => o.at_ms = Some(num(1, false)?),
            _ => return Err(syntax()),
        }
        i += 1;
    }
    Ok(o)
}

/// Stores `value` under an open key: inline below the threshold, else as a pending
/// utmem value whose PUT the caller submits. Clears the TTL like SET.
fn store(key: &Key, value: &RedisString) -> Option<Arc<Slot>> {
    let bytes = value.as_slice();
    if bytes.len() < config::threshold() {
        key.set_string(value);
        Stats::bump(&crate::stats().inline_sets);
        return None;
    }
    // No copy: the PUT is written from Redis's own argument string.
    let held = Bytes::from_owner(crate::raw::HeldArg::hold(value));
    let slot = Slot::pending(io::next_oid(), held);
    key.set_stub(Stub(Arc::clone(&slot)));
    Some(slot)
}

/// With `on-host-down error`, refuse values that would go to an unreachable host.
/// Never for commands from a master or the AOF: those must apply, and stay local.
fn check_host_for(ctx: &Context, len: usize) -> Result<(), RedisError> {
    if len < config::threshold()
        || !config::error_when_down()
        || io::connected()
        || crate::gather::mode(ctx) == crate::gather::Mode::Detached
    {
        return Ok(());
    }
    // Not connected: start an attempt in the background; never wait for a handshake here.
    match io::shared().map(|s| s.client.check_connected()) {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(RedisError::String(crate::raw::error_text(&format!(
            "UTMEMDOWN {e}"
        )))),
        None => Err(RedisError::Str("UTMEMDOWN the module is not initialised")),
    }
}

/// UTMEM.SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]
pub fn set(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    crate::raw::release_held();
    if args.len() < 3 {
        return Err(arity("utmem.set"));
    }
    let (name, value) = (&args[1], &args[2]);
    let o = parse_set_opts(&args[3..])?;
    let key = Key::open(ctx, name);
    let kind = key.kind();
    if o.get && kind == KeyKind::Other {
        return Err(RedisError::WrongType);
    }
    let old = if o.get {
        Some(look(&key, config::mapped_read_max()))
    } else {
        None
    };
    let exists = kind != KeyKind::Empty;
    if (o.nx && exists) || (o.xx && !exists) {
        return reply_one(ctx, old.unwrap_or(Have::Missing));
    }
    check_host_for(ctx, value.len())?;
    let keep = if o.keepttl { key.ttl_ms() } else { None };
    let slot = store(&key, value);
    let mut repl: Vec<RedisString> = vec![name.clone(), value.clone()];
    match o.at_ms {
        Some(at) if at <= now_ms() => {
            key.delete();
            repl = Vec::new();
            ctx.replicate("DEL", &[name][..]);
        }
        Some(at) => {
            key.set_ttl_ms(Some(at - now_ms()));
            repl.push(RedisString::create(None, "PXAT"));
            repl.push(RedisString::create(None, at.to_string()));
        }
        None if o.keepttl => {
            key.set_ttl_ms(keep);
            repl.push(RedisString::create(None, "KEEPTTL"));
        }
        None => {}
    }
    key.signal_modified(name);
    ctx.notify_keyspace_event(NotifyEvent::STRING, "set", name);
    if !repl.is_empty() {
        let refs: Vec<&RedisString> = repl.iter().collect();
        ctx.replicate("UTMEM.SET", &refs[..]);
    }
    drop(key);
    let (p0, fetch) = match old {
        Some(h) => part(h),
        None => (Some(Val::Ok), None),
    };
    // Write-back (`set-ack local`): the PUT goes on without anyone waiting for it.
    let slot = slot.and_then(put_unless_acked_locally);
    let parts = vec![p0, if slot.is_some() { None } else { Some(Val::Ok) }];
    let pending = Gather::start(ctx, parts, |mut v| v.remove(0));
    let g = pending.gather();
    if let Some((s, crc)) = fetch {
        fetch_into(&g, 0, s, crc);
    }
    if let Some(slot) = slot {
        put_into(&g, 1, slot);
    }
    pending.reply(ctx, config::timeout(), Val::Ok)
}

/// UTMEM.GET key
pub fn get(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 2 {
        return Err(arity("utmem.get"));
    }
    let key = Key::open(ctx, &args[1]);
    // The common case, without allocating: the value is in the mapped arena.
    if let Some(Stub(slot)) = key.stub() {
        let replied = io::with_mapped(slot, config::mapped_read_max(), |b| {
            crate::raw::write_reply_bytes(ctx, b)
        });
        if replied.is_some() {
            return Ok(RedisValue::NoReply);
        }
    }
    // Not in the arena (or gone from it): the mapped read was tried above.
    let have = look(&key, 0);
    drop(key);
    match have {
        Have::WrongType => Err(RedisError::WrongType),
        Have::Value(v) => {
            crate::raw::write_reply(ctx, &v);
            Ok(RedisValue::NoReply)
        }
        have => reply_one(ctx, have),
    }
}

/// UTMEM.MGET key [key ...]
pub fn mget(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() < 2 {
        return Err(arity("utmem.mget"));
    }
    let mut parts = Vec::new();
    let mut fetches = Vec::new();
    for (i, name) in args[1..].iter().enumerate() {
        let key = Key::open(ctx, name);
        let (p, f) = part(look(&key, config::mapped_read_max()));
        parts.push(p);
        if let Some(f) = f {
            fetches.push((i, f));
        }
    }
    let pending = Gather::start(ctx, parts, Val::Array);
    for (i, (slot, crc)) in fetches {
        fetch_into(&pending.gather(), i, slot, crc);
    }
    pending.reply(ctx, config::timeout(), Val::Null)
}

/// UTMEM.MSET key value [key value ...]
pub fn mset(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    crate::raw::release_held();
    if args.len() < 3 || args.len().is_multiple_of(2) {
        return Err(arity("utmem.mset"));
    }
    let pairs: Vec<(&RedisString, &RedisString)> =
        args[1..].chunks(2).map(|c| (&c[0], &c[1])).collect();
    for (_, v) in &pairs {
        check_host_for(ctx, v.len())?;
    }
    let mut slots = Vec::new();
    for (name, value) in &pairs {
        let key = Key::open(ctx, name);
        if let Some(s) = store(&key, value).and_then(put_unless_acked_locally) {
            slots.push(s);
        }
        key.signal_modified(name);
        ctx.notify_keyspace_event(NotifyEvent::STRING, "set", name);
    }
    ctx.replicate_verbatim();
    let parts = vec![None; slots.len()];
    let pending = Gather::start(ctx, parts, |_| Val::Ok);
    for (i, s) in slots.into_iter().enumerate() {
        put_into(&pending.gather(), i, s);
    }
    pending.reply(ctx, config::timeout(), Val::Ok)
}

/// UTMEM.GETDEL key
pub fn getdel(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 2 {
        return Err(arity("utmem.getdel"));
    }
    let name = &args[1];
    let key = Key::open(ctx, name);
    let have = look(&key, config::mapped_read_max());
    match have {
        Have::WrongType => return Err(RedisError::WrongType),
        Have::Missing => {}
        _ => {
            // The fetch (if any) holds the slot, so the host copy outlives the key
            // until the value has been read.
            key.delete();
            key.signal_modified(name);
            ctx.notify_keyspace_event(NotifyEvent::GENERIC, "del", name);
            ctx.replicate("DEL", &[name][..]);
        }
    }
    drop(key);
    reply_one(ctx, have)
}

/// UTMEM.STRLEN key: no host round trip.
pub fn strlen(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 2 {
        return Err(arity("utmem.strlen"));
    }
    let key = Key::open(ctx, &args[1]);
    let n = match key.kind() {
        KeyKind::Empty => 0,
        KeyKind::String => key.string_len(),
        KeyKind::Ours => key.stub().map_or(0, |s| s.0.len),
        KeyKind::Other => return Err(RedisError::WrongType),
    };
    Ok(RedisValue::Integer(i64::try_from(n).unwrap_or(i64::MAX)))
}

/// UTMEM.OFFLOAD key: a plain string becomes a utmem value (whatever its size).
/// Replies 1 once the host has it, 0 if there was nothing to do.
pub fn offload(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 2 {
        return Err(arity("utmem.offload"));
    }
    let name = &args[1];
    let key = Key::open(ctx, name);
    match key.kind() {
        KeyKind::Empty | KeyKind::Ours => return Ok(RedisValue::Integer(0)),
        KeyKind::Other => return Err(RedisError::WrongType),
        KeyKind::String => {}
    }
    let bytes = key.string().unwrap_or_default();
    check_host_for(ctx, usize::MAX)?;
    let ttl = key.ttl_ms();
    let slot = Slot::pending(io::next_oid(), bytes);
    key.set_stub(Stub(Arc::clone(&slot)));
    key.set_ttl_ms(ttl);
    key.signal_modified(name);
    drop(key);
    ctx.replicate_verbatim();
    let pending = Gather::start(ctx, vec![None], |_| Val::Int(1));
    put_into(&pending.gather(), 0, slot);
    pending.reply(ctx, config::timeout(), Val::Int(1))
}

/// Makes `name` a plain string again if it still holds `slot`. Main thread (or GIL held).
pub(crate) fn recall_key(
    ctx: &Context,
    name: &RedisString,
    slot: &Arc<Slot>,
    bytes: &[u8],
) -> bool {
    let key = Key::open(ctx, name);
    let same = key.stub().is_some_and(|s| Arc::ptr_eq(&s.0, slot));
    if same {
        let ttl = key.ttl_ms();
        key.set_string(&RedisString::create_from_slice(ctx.ctx, bytes));
        key.set_ttl_ms(ttl);
        key.signal_modified(name);
    }
    same
}

/// UTMEM.RECALL key: a utmem value becomes a plain string again. 1 if it did.
pub fn recall(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 2 {
        return Err(arity("utmem.recall"));
    }
    let name = &args[1];
    let key = Key::open(ctx, name);
    let (slot, read) = match key.kind() {
        KeyKind::Empty | KeyKind::String => return Ok(RedisValue::Integer(0)),
        KeyKind::Other => return Err(RedisError::WrongType),
        KeyKind::Ours => match key.stub() {
            Some(s) => (Arc::clone(&s.0), s.0.read()),
            None => return Ok(RedisValue::Integer(0)),
        },
    };
    drop(key);
    ctx.replicate_verbatim();
    match read {
        Read::Here(b) => Ok(RedisValue::Integer(i64::from(recall_key(
            ctx, name, &slot, &b,
        )))),
        Read::Lost => Err(RedisError::Str("UTMEMLOST this value is lost")),
        Read::Remote(crc) => {
            let pending = Gather::start(ctx, vec![None], |mut v| v.remove(0));
            let g = pending.gather();
            let owned = name.as_slice().to_vec();
            let s2 = Arc::clone(&slot);
            io::send(Job::Get {
                slot,
                crc,
                done: Box::new(move |r| {
                    let v = match r {
                        Ok(b) => {
                            // Rare and explicit: take the GIL to change the keyspace.
                            let tsc = ThreadSafeContext::new();
                            let locked = tsc.lock();
                            let name = RedisString::create_from_slice(locked.ctx, &owned);
                            Val::Int(i64::from(recall_key(&locked, &name, &s2, &b)))
                        }
                        Err(v) => v,
                    };
                    g.set(0, v);
                }),
            });
            pending.reply(ctx, config::timeout(), Val::Int(1))
        }
    }
}

/// UTMEM.RECALLALL: brings every utmem value of every database back into Redis as a
/// plain string, in the background; progress in UTMEM.STATS (recall_running, recalled).
pub fn recallall(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 1 {
        return Err(arity("utmem.recallall"));
    }
    let s = crate::stats();
    if s.recall_running
        .compare_exchange(
            0,
            1,
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        )
        .is_err()
    {
        return Err(RedisError::Str("ERR UTMEM.RECALLALL is already running"));
    }
    let dbs = ctx
        .call("CONFIG", &["GET", "databases"][..])
        .ok()
        .and_then(|v| match v {
            RedisValue::Array(a) => a.get(1).and_then(|x| match x {
                RedisValue::SimpleString(s) | RedisValue::BulkString(s) => s.parse::<i32>().ok(),
                RedisValue::BulkRedisString(s) => s.try_as_str().ok()?.parse::<i32>().ok(),
                _ => None,
            }),
            _ => None,
        })
        .unwrap_or(16);
    std::thread::Builder::new()
        .name("utmem-recallall".into())
        .spawn(move || {
            crate::recall::run_all(dbs);
            crate::stats()
                .recall_running
                .store(0, std::sync::atomic::Ordering::Relaxed);
        })
        .map_err(|e| RedisError::String(format!("ERR cannot start: {e}")))?;
    Ok(RedisValue::SimpleStringStatic("OK"))
}

/// UTMEM.STATS: the same fields as INFO utmem, as name/value pairs.
pub fn stats(_ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 1 {
        return Err(arity("utmem.stats"));
    }
    let mut out = Vec::new();
    for (k, v) in crate::info_fields() {
        out.push(RedisValue::SimpleString(k.to_owned()));
        out.push(RedisValue::BulkString(v));
    }
    Ok(RedisValue::Array(out))
}
