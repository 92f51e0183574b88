//! The UTMEM.* commands.
//!
//! Every command changes the keyspace at once, on the main thread, and only its
//! reply may wait for the host: UTMEM.SET stores a pending stub (readable from
//! Redis memory at once) and replies when the host acknowledged the PUT; a read
//! of a remote value blocks its own client while the I/O thread fetches it.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redis_module::{Context, NotifyEvent, RedisError, RedisResult, RedisString, RedisValue};

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
            Some(Stub(slot)) => match io::read_near(slot, mapped_max) {
                Read::Here(b) => Have::Value(Val::Bulk(b)),
                Read::Remote(crc) => {
                    Have::Fetch(slot.source().unwrap_or_else(|| Arc::clone(slot)), crc)
                }
                Read::Lost => Have::Value(io::lost_err()),
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
        done: Some(Box::new(move |r| {
            g.set(i, r.map_or_else(|e| e, |()| Val::Ok))
        })),
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

/// SET's expiry options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Ex,
    Px,
    ExAt,
    PxAt,
}

#[derive(Debug, Default)]
struct SetOpts {
    nx: bool,
    xx: bool,
    get: bool,
    keepttl: bool,
    /// Absolute expiry in Unix ms.
    at_ms: Option<i64>,
}

/// Redis's `string2ll`: an optional `-`, then digits without a leading zero (or a
/// lone `0`), within i64. No `+`, no spaces, no `-0`.
pub fn parse_ll(s: &[u8]) -> Option<i64> {
    let digits = s.strip_prefix(b"-").unwrap_or(s);
    let ok = match digits {
        [] => false,
        [b'0'] => digits.len() == s.len(),
        [first, ..] => (b'1'..=b'9').contains(first) && digits.iter().all(u8::is_ascii_digit),
    };
    if !ok {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// Parses SET's options exactly as Redis 7.0 does (`parseExtendedStringArgumentsOrReply`
/// and `getExpireMillisecondsOrReply`): a repeated option is allowed and the last
/// expiry wins, conflicting ones are a syntax error, and only the expiry that wins
/// is parsed as a number. `now` is read once.
fn parse_set_opts(args: &[RedisString], now: i64) -> Result<SetOpts, RedisError> {
    let syntax = || RedisError::Str("ERR syntax error");
    let mut o = SetOpts::default();
    let mut expiry: Option<(Expiry, &RedisString)> = None;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_slice().to_ascii_uppercase();
        let next = args.get(i + 1);
        let kind = expiry.map(|(k, _)| k);
        let only = |k: Expiry| !o.keepttl && kind.is_none_or(|have| have == k);
        match (a.as_slice(), next) {
            (b"NX", _) if !o.xx => o.nx = true,
            (b"XX", _) if !o.nx => o.xx = true,
            (b"GET", _) => o.get = true,
            (b"KEEPTTL", _) if kind.is_none() => o.keepttl = true,
            (b"EX", Some(v)) if only(Expiry::Ex) => (expiry, i) = (Some((Expiry::Ex, v)), i + 1),
            (b"PX", Some(v)) if only(Expiry::Px) => (expiry, i) = (Some((Expiry::Px, v)), i + 1),
            (b"EXAT", Some(v)) if only(Expiry::ExAt) => {
                (expiry, i) = (Some((Expiry::ExAt, v)), i + 1)
            }
            (b"PXAT", Some(v)) if only(Expiry::PxAt) => {
                (expiry, i) = (Some((Expiry::PxAt, v)), i + 1)
            }
            _ => return Err(syntax()),
        }
        i += 1;
    }
    if let Some((kind, v)) = expiry {
        let n = parse_ll(v.as_slice()).ok_or(RedisError::Str(
            "ERR value is not an integer or out of range",
        ))?;
        let bad = || RedisError::Str("ERR invalid expire time in 'utmem.set' command");
        let seconds = matches!(kind, Expiry::Ex | Expiry::ExAt);
        if n <= 0 || (seconds && n > i64::MAX / 1000) {
            return Err(bad());
        }
        let ms = if seconds { n * 1000 } else { n };
        let at = match kind {
            Expiry::Ex | Expiry::Px => ms.checked_add(now).ok_or_else(bad)?,
            Expiry::ExAt | Expiry::PxAt => ms,
        };
        o.at_ms = Some(at);
    }
    Ok(o)
}

/// How a value was stored.
enum Stored {
    /// As a plain string, in place: the key is still open.
    Inline(Key),
    /// As a plain string by a SET run for it (which fired `set` and signalled the key).
    BySet,
    /// As a utmem value whose PUT the caller submits; the key is still open.
    Remote(Key, Arc<Slot>),
}

/// Stores `value` under `name` the way SET does: inline below the threshold, else as a
/// pending utmem value. A key that exists is overwritten in place where the module
/// API allows it (no `new` event, like SET); the TTL is cleared unless `keep_ttl`.
fn store(
    ctx: &Context,
    key: Key,
    name: &RedisString,
    value: &RedisString,
    keep_ttl: bool,
) -> Stored {
    let kind = key.kind();
    if value.len() < config::threshold() {
        Stats::bump(&crate::stats::get().inline_sets);
        let done = match kind {
            KeyKind::Empty => {
                key.set_string(value);
                true
            }
            KeyKind::String => key.overwrite_string(value.as_slice()),
            KeyKind::Ours | KeyKind::Other => false,
        };
        if done {
            if !keep_ttl && kind != KeyKind::Empty {
                key.set_ttl_ms(None);
            }
            return Stored::Inline(key);
        }
        // Another type becomes a string: only SET itself replaces a key without
        // deleting it first (and fires `set` itself).
        drop(key);
        let mut args: Vec<&RedisString> = vec![name, value];
        let keep = RedisString::create(None, "KEEPTTL");
        if keep_ttl {
            args.push(&keep);
        }
        let _ = ctx.call("SET", &args[..]);
        return Stored::BySet;
    }
    // No copy: the PUT is written from Redis's own argument string.
    let held = Bytes::from_owner(crate::raw::HeldArg::hold(value));
    let slot = Slot::pending(io::next_oid(), held);
    if !key.replace_stub(Stub(Arc::clone(&slot))) {
        // Empty, or another type (Redis 7.0's module API deletes and re-adds it).
        let ttl = if keep_ttl { key.abs_expire_ms() } else { None };
        key.set_stub(Stub(Arc::clone(&slot)));
        if let Some(at) = ttl {
            key.set_abs_expire_ms(at);
        }
    } else if !keep_ttl {
        key.set_ttl_ms(None);
    }
    Stored::Remote(key, slot)
}

/// Whether this SET must be answered before the host has the value: a client with
/// CLIENT TRACKING gets the invalidation of an overwritten key after the command,
/// so its reply must not wait (as with SET, the reply comes before the push).
fn must_ack_now(ctx: &Context) -> bool {
    crate::gather::mode(ctx) == crate::gather::Mode::Block && crate::raw::client_tracks(ctx)
}

/// With `on-host-down error`, refuse values that would go to an unreachable host.
/// Never for commands from a master or the AOF: those must apply, and stay local.
fn check_host_for(ctx: &Context, len: usize) -> Result<(), RedisError> {
    if len < config::threshold()
        || !config::error_when_down()
        || io::host_answers()
        || crate::gather::mode(ctx) == crate::gather::Mode::Detached
    {
        return Ok(());
    }
    // Never a round trip here. Not connected: an attempt starts in the background; a
    // host that stopped answering is pinged by the I/O thread until it does again.
    let why = match io::shared().map(|s| s.client.check_connected()) {
        Some(Ok(())) if io::host_answers() => return Ok(()),
        Some(Ok(())) => "the host did not answer in time".to_owned(),
        Some(Err(e)) => e.to_string(),
        None => "the module is not initialised".to_owned(),
    };
    Err(RedisError::String(crate::raw::error_text(&format!(
        "UTMEMDOWN {why} (on-host-down error: nothing was changed)"
    ))))
}

/// UTMEM.SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]
pub fn set(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    crate::raw::release_held();
    if args.len() < 3 {
        return Err(arity("utmem.set"));
    }
    let (name, value) = (&args[1], &args[2]);
    let now = now_ms();
    let o = parse_set_opts(&args[3..], now)?;
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
    if let Some(at) = o.at_ms.filter(|&at| at <= now) {
        // Expired already: the server's own SET does what it does with that (Redis 7.0
        // sets the key and it expires on its next access; later servers delete it).
        // Nothing goes to the host.
        drop(key);
        let at = RedisString::create(None, at.to_string());
        let pxat = RedisString::create(None, "PXAT");
        let _ = ctx.call("SET", &[name, value, &pxat, &at][..]);
        ctx.replicate("UTMEM.SET", &[name, value, &pxat, &at][..]);
        return reply_one(ctx, old.unwrap_or(Have::Value(Val::Ok)));
    }
    check_host_for(ctx, value.len())?;
    let (key, slot) = match store(ctx, key, name, value, o.keepttl) {
        Stored::Inline(key) => (Some(key), None),
        Stored::BySet => (None, None),
        Stored::Remote(key, slot) => (Some(key), Some(slot)),
    };
    // SET's order: `set`, then `expire`; a SET run for us signalled and fired `set`.
    let by_set = key.is_none();
    if !by_set {
        ctx.notify_keyspace_event(NotifyEvent::STRING, "set", name);
    }
    let key = key.unwrap_or_else(|| Key::open(ctx, name));
    let mut repl: Vec<RedisString> = vec![name.clone(), value.clone()];
    if let Some(at) = o.at_ms {
        key.set_abs_expire_ms(at);
        ctx.notify_keyspace_event(NotifyEvent::GENERIC, "expire", name);
        repl.push(RedisString::create(None, "PXAT"));
        repl.push(RedisString::create(None, at.to_string()));
    } else if o.keepttl {
        repl.push(RedisString::create(None, "KEEPTTL"));
    }
    if !by_set {
        key.signal_modified(name);
    }
    drop(key);
    let refs: Vec<&RedisString> = repl.iter().collect();
    ctx.replicate("UTMEM.SET", &refs[..]);
    let (p0, fetch) = match old {
        Some(h) => part(h),
        None => (Some(Val::Ok), None),
    };
    // A channel takes the PUT now: the SET replies once it is in the ring.
    let slot = slot.and_then(|s| io::chan::put(s).err());
    let slot = match slot {
        Some(slot) if must_ack_now(ctx) => {
            io::send(Job::Put { slot, done: None });
            None
        }
        // Write-back (`set-ack local`): the PUT goes on without anyone waiting for it.
        Some(slot) => put_unless_acked_locally(slot),
        None => None,
    };
    let parts = vec![p0, if slot.is_some() { None } else { Some(Val::Ok) }];
    // The reply is part 0 (OK, or the old value for GET) unless the PUT failed the SET.
    let pending = Gather::start(ctx, parts, |mut v| match v.pop() {
        Some(e @ Val::Err(_)) => e,
        _ => v.remove(0),
    });
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
        if io::reply_mapped(ctx, slot, config::mapped_read_max()) {
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
    let now = must_ack_now(ctx);
    let mut slots = Vec::new();
    for (name, value) in &pairs {
        let key = match store(ctx, Key::open(ctx, name), name, value, false) {
            Stored::BySet => continue,
            Stored::Inline(key) => key,
            Stored::Remote(key, s) => {
                // A channel takes the PUT now; else the socket path as before.
                if let Err(s) = io::chan::put(s) {
                    if now {
                        io::send(Job::Put {
                            slot: s,
                            done: None,
                        });
                    } else {
                        slots.extend(put_unless_acked_locally(s));
                    }
                }
                key
            }
        };
        ctx.notify_keyspace_event(NotifyEvent::STRING, "set", name);
        key.signal_modified(name);
    }
    ctx.replicate_verbatim();
    let parts = vec![None; slots.len()];
    let pending = Gather::start(ctx, parts, |v| {
        v.into_iter()
            .find(|p| matches!(p, Val::Err(_)))
            .unwrap_or(Val::Ok)
    });
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
        KeyKind::Ours => key.stub::<Stub>().map_or(0, |s| s.0.len),
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

/// UTMEM.RECALL key: a utmem value becomes a plain string again. 1 if it did.
///
/// The swap happens on the main thread: at once when the bytes are in Redis; after the
/// fetch, as the blocked client's reply callback, when they are on the host; and
/// synchronously (bounded by `timeout-ms`) where a client cannot be blocked (MULTI,
/// Lua) or nobody waits (replicated, AOF).
pub fn recall(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 2 {
        return Err(arity("utmem.recall"));
    }
    let name = &args[1];
    let key = Key::open(ctx, name);
    let (slot, read) = match key.kind() {
        KeyKind::Empty | KeyKind::String => return Ok(RedisValue::Integer(0)),
        KeyKind::Other => return Err(RedisError::WrongType),
        KeyKind::Ours => match key.stub::<Stub>() {
            Some(s) => (Arc::clone(&s.0), s.0.read()),
            None => return Ok(RedisValue::Integer(0)),
        },
    };
    drop(key);
    // A copy not made yet is fetched under its source's object id.
    let fetch_slot = slot.source().unwrap_or_else(|| Arc::clone(&slot));
    let err = |v: Val| match v {
        Val::Err(e) => RedisError::String(crate::raw::error_text(&e)),
        _ => RedisError::Str("ERR utmem: unexpected reply"),
    };
    match read {
        Read::Here(b) => Ok(RedisValue::Integer(i64::from(crate::recall::recall_key(
            ctx, name, &slot, &b,
        )))),
        Read::Lost => Err(err(io::lost_err())),
        Read::Remote(_) if crate::gather::mode(ctx) != crate::gather::Mode::Block => {
            match io::fetch_sync(&slot) {
                Ok(b) => Ok(RedisValue::Integer(i64::from(crate::recall::recall_key(
                    ctx, name, &slot, &b,
                )))),
                Err(e) => Err(err(e.reply())),
            }
        }
        Read::Remote(crc) => {
            let blocked = crate::raw::MainBlocked::block(ctx);
            let owned = name.as_slice().to_vec();
            let s2 = Arc::clone(&slot);
            io::send(Job::Get {
                slot: fetch_slot,
                crc,
                done: Box::new(move |r| {
                    blocked.finish(Box::new(move |ctx| match r {
                        Ok(b) => {
                            let name = RedisString::create_from_slice(ctx.ctx, &owned);
                            Val::Int(i64::from(crate::recall::recall_key(ctx, &name, &s2, &b)))
                        }
                        Err(v) => v,
                    }))
                }),
            });
            Ok(RedisValue::NoReply)
        }
    }
}

/// UTMEM.RECALLALL: brings every utmem value of every database back into Redis as a
/// plain string, in the background; progress in UTMEM.STATS (recall_running, recalled).
pub fn recallall(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 1 {
        return Err(arity("utmem.recallall"));
    }
    let s = crate::stats::get();
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
            crate::stats::get()
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
        out.push(RedisValue::SimpleString(format!("utmem_{k}")));
        out.push(RedisValue::BulkString(v));
    }
    Ok(RedisValue::Array(out))
}
