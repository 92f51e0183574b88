//! The Redis module API calls the `redis-module` crate does not wrap the way the
//! module needs them: raw key access (string DMA, module values, expiry), replies
//! to blocked clients from any thread without an extra copy, AOF emission,
//! the fork-child server event. Every unsafe block is here.

use std::ffi::CString;
use std::os::raw::{c_char, c_int, c_void};
use std::ptr;

use bytes::Bytes;
use redis_module::raw::{
    self, RedisModuleBlockedClient, RedisModuleCtx, RedisModuleIO, RedisModuleKey,
    RedisModuleString,
};
use redis_module::{Context, RedisString};

/// A reply, built on any thread and written on the thread that owns the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    /// `+OK`
    Ok,
    /// A nil bulk.
    Null,
    /// A bulk string.
    Bulk(Bytes),
    /// An error line (without the leading `-`), e.g. `UTMEMDOWN host unreachable`.
    Err(String),
    /// An integer.
    Int(i64),
    /// An array.
    Array(Vec<Val>),
}

/// An error line clients can parse: ASCII only (RESP clients reject invalid UTF-8 and
/// some cut long lines), one line.
pub fn error_text(e: &str) -> String {
    e.chars()
        .map(|c| match c {
            '\r' | '\n' | '\0' => ' ',
            c if c.is_ascii() => c,
            _ => '?',
        })
        .collect()
}

/// Replies on a command's context with a bulk string Redis copies from `len` bytes at
/// `p` (memory another process may write: no Rust reference to it is made).
///
/// # Safety
/// `p` must be valid for reads of `len` bytes until this returns.
pub unsafe fn write_reply_from(ctx: &Context, p: *const u8, len: usize) {
    // SAFETY: `ctx` is the live context of the running command; the caller guarantees
    // `p`/`len`; the reply function copies the bytes before returning.
    unsafe {
        raw::RedisModule_ReplyWithStringBuffer.expect("api")(ctx.ctx, p.cast::<c_char>(), len);
    }
}

/// Writes `v` as the reply on `ctx` (a command's context, or the thread-safe
/// context of a blocked client).
pub fn write_reply(ctx: &Context, v: &Val) {
    let ctx = ctx.ctx;
    // SAFETY: `ctx` is a live context owned by the caller (a command's context on the
    // main thread, or a thread-safe context of a blocked client); the reply functions
    // copy their arguments before returning.
    unsafe {
        match v {
            Val::Ok => {
                raw::RedisModule_ReplyWithSimpleString.expect("api")(ctx, c"OK".as_ptr());
            }
            Val::Null => {
                raw::RedisModule_ReplyWithNull.expect("api")(ctx);
            }
            Val::Bulk(b) => {
                raw::RedisModule_ReplyWithStringBuffer.expect("api")(
                    ctx,
                    b.as_ptr().cast::<c_char>(),
                    b.len(),
                );
            }
            Val::Err(e) => {
                let msg = CString::new(error_text(e)).unwrap_or_default();
                raw::RedisModule_ReplyWithError.expect("api")(ctx, msg.as_ptr());
            }
            Val::Int(i) => {
                raw::RedisModule_ReplyWithLongLong.expect("api")(ctx, *i);
            }
            Val::Array(items) => {
                let n = libc::c_long::try_from(items.len()).unwrap_or(libc::c_long::MAX);
                raw::RedisModule_ReplyWithArray.expect("api")(ctx, n);
                let c = Context::new(ctx);
                for it in items {
                    write_reply(&c, it);
                }
            }
        }
    }
}

/// A client blocked until its reply is ready; the reply may be sent from any thread.
#[derive(Debug)]
pub struct Blocked(*mut RedisModuleBlockedClient);

// SAFETY: a blocked-client handle is designed to be handed to another thread; Redis
// serialises the unblock itself.
unsafe impl Send for Blocked {}

impl Blocked {
    /// Blocks the client running the command of `ctx` (no timeout: our requests have their own).
    pub fn block(ctx: &Context) -> Blocked {
        // SAFETY: `ctx.ctx` is the live context of the command being executed.
        let bc =
            unsafe { raw::RedisModule_BlockClient.expect("api")(ctx.ctx, None, None, None, 0) };
        Blocked(bc)
    }

    /// Sends the reply and unblocks the client. Needs no lock: replies to a blocked
    /// client's thread-safe context are buffered and moved to the client on unblock.
    pub fn finish(mut self, v: &Val) {
        let bc = std::mem::replace(&mut self.0, ptr::null_mut());
        // SAFETY: `bc` came from RedisModule_BlockClient and is unblocked exactly once
        // (the field is nulled so Drop does not do it again).
        unsafe {
            let tsc = raw::RedisModule_GetThreadSafeContext.expect("api")(bc);
            write_reply(&Context::new(tsc), v);
            raw::RedisModule_FreeThreadSafeContext.expect("api")(tsc);
            raw::RedisModule_UnblockClient.expect("api")(bc, ptr::null_mut());
        }
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        if !self.0.is_null() {
            let bc = std::mem::replace(&mut self.0, ptr::null_mut());
            let v = Val::Err("ERR utmem: the request was dropped".into());
            Blocked(bc).finish(&v);
        }
    }
}

/// Work to finish a blocked command on Redis's main thread; it returns the reply.
pub type OnMain = Box<dyn FnOnce(&Context) -> Val + Send>;

/// A client blocked until work that must run on the main thread (it changes the
/// keyspace) can finish its command: [`MainBlocked::finish`] may be called from any
/// thread, and Redis then runs the closure on its main thread, with the GIL, as the
/// blocked client's reply callback.
#[derive(Debug)]
pub struct MainBlocked(*mut RedisModuleBlockedClient);

// SAFETY: as for `Blocked`: the handle is meant to be passed to another thread.
unsafe impl Send for MainBlocked {}

extern "C" fn main_reply(
    ctx: *mut RedisModuleCtx,
    _argv: *mut *mut RedisModuleString,
    _argc: c_int,
) -> c_int {
    // SAFETY: Redis calls this on the main thread with the context of the unblocked
    // client; the private data is the `Box<Option<OnMain>>` that `finish` passed. Redis
    // frees it afterwards through `main_free`, so only its content is taken here.
    unsafe {
        let p = raw::RedisModule_GetBlockedClientPrivateData.expect("api")(ctx);
        if let Some(f) = p.cast::<Option<OnMain>>().as_mut().and_then(Option::take) {
            let c = Context::new(ctx);
            let v = f(&c);
            write_reply(&c, &v);
        }
    }
    0
}

extern "C" fn main_free(_ctx: *mut RedisModuleCtx, p: *mut c_void) {
    if !p.is_null() {
        // SAFETY: `p` is the `Box<Option<OnMain>>` given to UnblockClient; Redis calls
        // this once, after the reply callback (or instead of it, if the client went away).
        drop(unsafe { Box::from_raw(p.cast::<Option<OnMain>>()) });
    }
}

impl MainBlocked {
    /// Blocks the client running the command of `ctx`.
    pub fn block(ctx: &Context) -> MainBlocked {
        // SAFETY: `ctx.ctx` is the live context of the command being executed; the
        // callbacks are plain extern fns.
        let bc = unsafe {
            raw::RedisModule_BlockClient.expect("api")(
                ctx.ctx,
                Some(main_reply),
                None,
                Some(main_free),
                0,
            )
        };
        MainBlocked(bc)
    }

    /// Runs `f` on the main thread and replies with what it returns.
    pub fn finish(mut self, f: OnMain) {
        let bc = std::mem::replace(&mut self.0, ptr::null_mut());
        let p = Box::into_raw(Box::new(Some(f))).cast::<c_void>();
        // SAFETY: `bc` came from BlockClient and is unblocked exactly once; Redis passes
        // `p` to `main_reply` (which takes the closure) and then to `main_free`.
        unsafe {
            raw::RedisModule_UnblockClient.expect("api")(bc, p);
        }
    }
}

impl Drop for MainBlocked {
    fn drop(&mut self) {
        if !self.0.is_null() {
            let bc = std::mem::replace(&mut self.0, ptr::null_mut());
            MainBlocked(bc).finish(Box::new(|_| {
                Val::Err("ERR utmem: the request was dropped".into())
            }));
        }
    }
}

/// The value type of the module's data type: every value Redis holds under that
/// type is a `Box` of it.
///
/// # Safety
/// Implemented by exactly one type, the one the data type's callbacks take.
pub unsafe trait ModuleValue {}

/// Where our data type's pointer comes from (set at load, before any command).
static OUR_TYPE: std::sync::OnceLock<fn() -> *mut raw::RedisModuleType> =
    std::sync::OnceLock::new();

/// Names the module's data type: `f` gives its pointer once it is registered.
pub fn set_module_type(f: fn() -> *mut raw::RedisModuleType) {
    OUR_TYPE.get_or_init(|| f);
}

fn our_type() -> *mut raw::RedisModuleType {
    OUR_TYPE.get().map_or(ptr::null_mut(), |f| f())
}

/// What a key holds.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// No such key.
    Empty,
    /// A plain string.
    String,
    /// A utmem value.
    Ours,
    /// Anything else (list, hash, another module's type...).
    Other,
}

/// An open key; closed on drop.
#[derive(Debug)]
pub struct Key {
    ctx: *mut RedisModuleCtx,
    key: *mut RedisModuleKey,
}

const NO_EXPIRE: i64 = -1;
/// `REDISMODULE_OK` as the API functions return it.
const REDISMODULE_OK: c_int = 0;

impl Key {
    /// Opens `name` for reading and writing.
    pub fn open(ctx: &Context, name: &RedisString) -> Key {
        let mode = (raw::REDISMODULE_READ | raw::REDISMODULE_WRITE) as c_int;
        // SAFETY: `ctx` is live for the command; `name` is a valid RedisModuleString.
        let key = unsafe {
            raw::RedisModule_OpenKey.expect("api")(ctx.ctx, name.inner, mode)
                .cast::<RedisModuleKey>()
        };
        Key { ctx: ctx.ctx, key }
    }

    fn module_type(&self) -> *mut raw::RedisModuleType {
        // SAFETY: `self.key` is an open key.
        unsafe { raw::RedisModule_ModuleTypeGetType.expect("api")(self.key) }
    }

    /// What it holds.
    pub fn kind(&self) -> KeyKind {
        // SAFETY: `self.key` is an open key.
        let t = unsafe { raw::RedisModule_KeyType.expect("api")(self.key) };
        match isize::try_from(t).unwrap_or(-1) {
            raw::REDISMODULE_KEYTYPE_EMPTY => KeyKind::Empty,
            raw::REDISMODULE_KEYTYPE_STRING => KeyKind::String,
            raw::REDISMODULE_KEYTYPE_MODULE if self.module_type() == our_type() => KeyKind::Ours,
            _ => KeyKind::Other,
        }
    }

    /// The value of our module type this key holds.
    pub fn stub<T: ModuleValue>(&self) -> Option<&T> {
        if self.kind() != KeyKind::Ours {
            return None;
        }
        // SAFETY: the key holds our module type, whose values are always `Box<T>`
        // pointers (the `ModuleValue` contract); the value lives as long as the key
        // stays open and unmodified, which the borrow of `self` ensures.
        unsafe {
            let p = raw::RedisModule_ModuleTypeGetValue.expect("api")(self.key);
            p.cast::<T>().as_ref()
        }
    }

    /// The bytes of a plain string (copied, since the key may change afterwards).
    pub fn string(&self) -> Option<Bytes> {
        if self.kind() != KeyKind::String {
            return None;
        }
        let mut len: usize = 0;
        // SAFETY: the key holds a string; DMA in read mode gives a pointer valid until
        // the key is modified or closed, and we copy out at once.
        unsafe {
            let p = raw::RedisModule_StringDMA.expect("api")(
                self.key,
                &mut len,
                raw::REDISMODULE_READ as c_int,
            );
            if p.is_null() {
                return Some(Bytes::new());
            }
            Some(Bytes::copy_from_slice(std::slice::from_raw_parts(
                p.cast::<u8>(),
                len,
            )))
        }
    }

    /// Length of a plain string without copying it.
    pub fn string_len(&self) -> usize {
        // SAFETY: `self.key` is an open key.
        unsafe { raw::RedisModule_ValueLength.expect("api")(self.key) }
    }

    /// Replaces the value with a plain string (TTL cleared).
    pub fn set_string(&self, s: &RedisString) {
        // SAFETY: the key is open for writing; StringSet retains what it needs of `s`.
        unsafe {
            raw::RedisModule_StringSet.expect("api")(self.key, s.inner);
        }
    }

    /// Replaces the value with a utmem stub (TTL cleared).
    pub fn set_stub<T: ModuleValue>(&self, stub: T) {
        let p = Box::into_raw(Box::new(stub)).cast::<c_void>();
        // SAFETY: the key is open for writing; ownership of the box passes to Redis,
        // which frees it through our type's `free` callback.
        unsafe {
            raw::RedisModule_ModuleTypeSetValue.expect("api")(self.key, our_type(), p);
        }
    }

    /// Replaces the stub of a key that already holds a utmem value, in place: no
    /// delete and re-add (so no `new` keyspace event), TTL kept. `false` (and the
    /// stub dropped) if the key does not hold a utmem value.
    pub fn replace_stub<T: ModuleValue>(&self, stub: T) -> bool {
        if self.kind() != KeyKind::Ours {
            return false;
        }
        let p = Box::into_raw(Box::new(stub)).cast::<c_void>();
        let mut old: *mut c_void = ptr::null_mut();
        // SAFETY: the key is open for writing and holds our type; on success Redis owns
        // `p` and hands back the previous value, a `Box<Stub>` we created, which we free.
        unsafe {
            let ok = raw::RedisModule_ModuleTypeReplaceValue.expect("api")(
                self.key,
                our_type(),
                p,
                &mut old,
            ) == REDISMODULE_OK;
            if !ok {
                drop(Box::from_raw(p.cast::<T>()));
                return false;
            }
            if !old.is_null() {
                drop(Box::from_raw(old.cast::<T>()));
            }
        }
        true
    }

    /// Overwrites a plain string's bytes in place (no `new` keyspace event, TTL kept).
    /// `false` if the key does not hold a string.
    pub fn overwrite_string(&self, b: &[u8]) -> bool {
        if self.kind() != KeyKind::String {
            return false;
        }
        // SAFETY: the key is open for writing and holds a string: truncate resizes it,
        // and DMA in write mode gives a pointer to exactly `len` writable bytes, valid
        // until the key is modified again; we copy `b` in at once.
        unsafe {
            if raw::RedisModule_StringTruncate.expect("api")(self.key, b.len()) != REDISMODULE_OK {
                return false;
            }
            if b.is_empty() {
                return true;
            }
            let mut len = 0usize;
            let p = raw::RedisModule_StringDMA.expect("api")(
                self.key,
                &mut len,
                raw::REDISMODULE_WRITE as c_int,
            );
            if p.is_null() || len != b.len() {
                return false;
            }
            ptr::copy_nonoverlapping(b.as_ptr(), p.cast::<u8>(), len);
        }
        true
    }

    /// The absolute expiry (Unix ms), if the key has a TTL.
    pub fn abs_expire_ms(&self) -> Option<i64> {
        // SAFETY: `self.key` is an open key.
        let t = unsafe { raw::RedisModule_GetAbsExpire.expect("api")(self.key) };
        (t != NO_EXPIRE).then_some(t)
    }

    /// Sets the absolute expiry (Unix ms; a time in the past expires the key the way
    /// SET's does: on its next access or by the active expiry cycle).
    pub fn set_abs_expire_ms(&self, at: i64) {
        // SAFETY: the key is open for writing.
        unsafe {
            raw::RedisModule_SetAbsExpire.expect("api")(self.key, at);
        }
    }

    /// Milliseconds to live, if the key has a TTL.
    pub fn ttl_ms(&self) -> Option<i64> {
        // SAFETY: `self.key` is an open key.
        let t = unsafe { raw::RedisModule_GetExpire.expect("api")(self.key) };
        (t != NO_EXPIRE).then_some(t)
    }

    /// Sets (`Some`) or removes (`None`) the TTL.
    pub fn set_ttl_ms(&self, ms: Option<i64>) {
        // SAFETY: the key is open for writing.
        unsafe {
            raw::RedisModule_SetExpire.expect("api")(self.key, ms.unwrap_or(NO_EXPIRE));
        }
    }

    /// Deletes the key.
    pub fn delete(&self) {
        // SAFETY: the key is open for writing.
        unsafe {
            raw::RedisModule_DeleteKey.expect("api")(self.key);
        }
    }

    /// Tells WATCH and client-side caching that the key changed.
    pub fn signal_modified(&self, name: &RedisString) {
        // SAFETY: `self.ctx` is the live context the key was opened with.
        unsafe {
            raw::RedisModule_SignalModifiedKey.expect("api")(self.ctx, name.inner);
        }
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        // SAFETY: opened in `Key::open`, closed exactly once here.
        unsafe { raw::RedisModule_CloseKey.expect("api")(self.key) };
    }
}

/// Emits `UTMEM.SET key value` into an AOF rewrite.
///
/// # Safety
/// `aof` and `key` must be the pointers Redis passed to the aof_rewrite callback.
pub unsafe fn emit_set(aof: *mut RedisModuleIO, key: *mut RedisModuleString, value: &[u8]) {
    // SAFETY: `aof` and `key` are valid per the contract; format "sb" takes a
    // RedisModuleString and a (pointer, length) pair that EmitAOF copies.
    unsafe {
        raw::RedisModule_EmitAOF.expect("api")(
            aof,
            c"UTMEM.SET".as_ptr(),
            c"sb".as_ptr(),
            key,
            value.as_ptr().cast::<c_char>(),
            value.len(),
        );
    }
}

/// Writes a u64 and a buffer into an RDB.
pub fn rdb_save(rdb: *mut RedisModuleIO, flag: u64, value: &[u8]) {
    raw::save_unsigned(rdb, flag);
    raw::save_slice(rdb, value);
}

/// Reads what [`rdb_save`] wrote; `None` on an I/O error (diskless load).
pub fn rdb_load(rdb: *mut RedisModuleIO) -> Option<(u64, Bytes)> {
    let flag = raw::load_unsigned(rdb).ok()?;
    let buf = raw::load_string_buffer(rdb).ok()?;
    Some((flag, Bytes::copy_from_slice(buf.as_ref())))
}

/// Logs a warning to the Redis log.
pub fn log_warning(msg: &str) {
    redis_module::logging::log_warning(msg);
}

/// Declares that rdb_load copes with I/O errors (diskless replica load), and that the
/// module signals modified keys itself: a key opened for writing and closed unchanged
/// (every UTMEM.* command opens its keys that way) must not touch WATCH or send a
/// tracking invalidation, as GET does not.
pub fn set_module_options(ctx: &Context) {
    let flags = raw::REDISMODULE_OPTIONS_HANDLE_IO_ERRORS | (1 << 1); // NO_IMPLICIT_SIGNAL_MODIFIED
                                                                      // SAFETY: called from OnLoad with the module's context.
    unsafe {
        raw::RedisModule_SetModuleOptions.expect("api")(ctx.ctx, flags as c_int);
    }
}

/// Calls `f(true)` when a fork child (BGSAVE, AOF rewrite, full sync) is born and
/// `f(false)` when it dies.
pub fn on_fork_child(ctx: &Context, f: fn(bool)) {
    FORK_HANDLER.get_or_init(|| f);
    let event = raw::RedisModuleEvent {
        id: raw::REDISMODULE_EVENT_FORK_CHILD,
        dataver: 1,
    };
    // SAFETY: OnLoad context; the callback is a plain extern fn that lives forever.
    unsafe {
        raw::RedisModule_SubscribeToServerEvent.expect("api")(ctx.ctx, event, Some(fork_event));
    }
}

static FORK_HANDLER: std::sync::OnceLock<fn(bool)> = std::sync::OnceLock::new();

static BEFORE_SLEEP: std::sync::OnceLock<fn(&Context)> = std::sync::OnceLock::new();

/// Calls `f` on the main thread each time Redis's event loop is about to wait for
/// events.
pub fn on_before_sleep(ctx: &Context, f: fn(&Context)) {
    BEFORE_SLEEP.get_or_init(|| f);
    let event = raw::RedisModuleEvent {
        id: raw::REDISMODULE_EVENT_EVENTLOOP,
        dataver: 1,
    };
    // SAFETY: OnLoad context; the callback is a plain extern fn that lives forever.
    unsafe {
        raw::RedisModule_SubscribeToServerEvent.expect("api")(ctx.ctx, event, Some(loop_event));
    }
}

extern "C" fn loop_event(
    ctx: *mut RedisModuleCtx,
    _eid: raw::RedisModuleEvent,
    subevent: u64,
    _data: *mut c_void,
) {
    if subevent == raw::REDISMODULE_SUBEVENT_EVENTLOOP_BEFORE_SLEEP {
        if let Some(f) = BEFORE_SLEEP.get() {
            f(&Context::new(ctx));
        }
    }
}

static ON_READABLE: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Watches `fd` in Redis's event loop: `f` runs on the main thread when it is readable.
/// One callback for every watched descriptor (the first one given). False if Redis
/// refused (an old server without the API, or a bad descriptor).
pub fn watch_readable(fd: c_int, f: fn()) -> bool {
    ON_READABLE.get_or_init(|| f);
    // SAFETY: main thread; the callback is a plain extern fn that lives forever and
    // takes no user data.
    unsafe {
        match raw::RedisModule_EventLoopAdd {
            Some(add) => {
                add(
                    fd,
                    raw::REDISMODULE_EVENTLOOP_READABLE as c_int,
                    Some(readable),
                    ptr::null_mut(),
                ) == REDISMODULE_OK
            }
            None => false,
        }
    }
}

/// Stops watching `fd`.
pub fn unwatch(fd: c_int) {
    // SAFETY: main thread; removing a descriptor that is not watched is harmless.
    unsafe {
        if let Some(del) = raw::RedisModule_EventLoopDel {
            del(fd, raw::REDISMODULE_EVENTLOOP_READABLE as c_int);
        }
    }
}

extern "C" fn readable(_fd: c_int, _data: *mut c_void, _mask: c_int) {
    if let Some(f) = ON_READABLE.get() {
        f();
    }
}

extern "C" fn fork_event(
    _ctx: *mut RedisModuleCtx,
    _eid: raw::RedisModuleEvent,
    subevent: u64,
    _data: *mut c_void,
) {
    if let Some(f) = FORK_HANDLER.get() {
        f(subevent == raw::REDISMODULE_SUBEVENT_FORK_CHILD_BORN);
    }
}

/// Adds the module's INFO section (named after the module; Redis prefixes each
/// field with `utmem_`).
pub fn info_section(info: &redis_module::InfoContext, fields: &[(&str, String)]) {
    let ctx = info.ctx;
    // SAFETY: `ctx` is the live INFO context Redis passed to our handler; the field
    // functions copy their arguments.
    unsafe {
        raw::RedisModule_InfoAddSection.expect("api")(ctx, ptr::null());
        for (k, v) in fields {
            let (Ok(k), Ok(v)) = (CString::new(*k), CString::new(v.as_str())) else {
                continue;
            };
            raw::RedisModule_InfoAddFieldCString.expect("api")(ctx, k.as_ptr(), v.as_ptr());
        }
    }
}

/// Whether the client running the command of `ctx` has CLIENT TRACKING on.
pub fn client_tracks(ctx: &Context) -> bool {
    // SAFETY: `ctx` is the live context of a command; the info struct is version 1,
    // which GetClientInfoById fills in.
    unsafe {
        let id = raw::RedisModule_GetClientId.expect("api")(ctx.ctx);
        if id == 0 {
            return false;
        }
        let mut ci: raw::RedisModuleClientInfo = std::mem::zeroed();
        ci.version = 1;
        let ok =
            raw::RedisModule_GetClientInfoById.expect("api")((&raw mut ci).cast::<c_void>(), id)
                == REDISMODULE_OK;
        ok && ci.flags & u64::from(raw::REDISMODULE_CLIENTINFO_FLAG_TRACKING) != 0
    }
}

/// The arguments of a command a filter sees.
#[derive(Debug)]
pub struct FilterArgs(*mut raw::RedisModuleCommandFilterCtx);

impl FilterArgs {
    /// Whether there are no words at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many words, the command name included.
    pub fn len(&self) -> usize {
        // SAFETY: the filter context is live for the duration of the callback.
        let n = unsafe { raw::RedisModule_CommandFilterArgsCount.expect("api")(self.0) };
        usize::try_from(n).unwrap_or(0)
    }

    /// Word `i`, if there is one.
    pub fn arg(&self, i: usize) -> Option<&[u8]> {
        let pos = c_int::try_from(i).ok()?;
        // SAFETY: the filter context is live; the string it returns stays valid while the
        // callback runs, and we only borrow its bytes for that long.
        unsafe {
            let s = raw::RedisModule_CommandFilterArgGet.expect("api")(self.0, pos);
            if s.is_null() {
                return None;
            }
            let mut len = 0usize;
            let p = raw::RedisModule_StringPtrLen.expect("api")(s, &mut len);
            Some(std::slice::from_raw_parts(p.cast::<u8>(), len))
        }
    }

    /// Makes the command `words` instead.
    pub fn replace_all(&self, words: &[&[u8]]) {
        // SAFETY: the filter context is live; strings created with a NULL context are
        // owned by Redis once passed to ArgReplace/ArgInsert, as the API requires.
        unsafe {
            while self.len() > words.len() {
                let last = c_int::try_from(self.len() - 1).unwrap_or(0);
                raw::RedisModule_CommandFilterArgDelete.expect("api")(self.0, last);
            }
            for (i, w) in words.iter().enumerate() {
                let Ok(pos) = c_int::try_from(i) else { return };
                let s = raw::RedisModule_CreateString.expect("api")(
                    ptr::null_mut(),
                    w.as_ptr().cast::<c_char>(),
                    w.len(),
                );
                if i < self.len() {
                    raw::RedisModule_CommandFilterArgReplace.expect("api")(self.0, pos, s);
                } else {
                    raw::RedisModule_CommandFilterArgInsert.expect("api")(self.0, pos, s);
                }
            }
        }
    }
}

static FILTER: std::sync::OnceLock<fn(&FilterArgs)> = std::sync::OnceLock::new();

extern "C" fn filter_cb(fctx: *mut raw::RedisModuleCommandFilterCtx) {
    if let Some(f) = FILTER.get() {
        f(&FilterArgs(fctx));
    }
}

/// Runs `f` on every command before Redis executes it (not on the module's own calls).
pub fn register_filter(ctx: &Context, f: fn(&FilterArgs)) -> bool {
    FILTER.get_or_init(|| f);
    // SAFETY: OnLoad context; the callback is a plain extern fn that lives forever.
    unsafe {
        match raw::RedisModule_RegisterCommandFilter {
            Some(reg) => !reg(ctx.ctx, Some(filter_cb), 1 /* NOSELF */).is_null(),
            None => false,
        }
    }
}

/// Selects database `db` on a context.
pub fn select_db(ctx: &Context, db: i32) -> bool {
    // SAFETY: `ctx` is live and the GIL is held by the caller.
    unsafe { raw::RedisModule_SelectDb.expect("api")(ctx.ctx, db) == 0 } // REDISMODULE_OK
}

static COMMAND_INFO_VERSION: raw::RedisModuleCommandInfoVersion =
    raw::RedisModuleCommandInfoVersion {
        version: 1,
        sizeof_historyentry: std::mem::size_of::<raw::RedisModuleCommandHistoryEntry>(),
        sizeof_keyspec: std::mem::size_of::<raw::RedisModuleCommandKeySpec>(),
        sizeof_arg: std::mem::size_of::<raw::RedisModuleCommandArg>(),
    };

/// Declares a command's arity and summary (COMMAND INFO/DOCS; Redis then checks the
/// arity itself). Key positions were declared when the command was created.
pub fn set_command_info(
    ctx: &Context,
    name: &str,
    arity: i32,
    summary: &'static std::ffi::CStr,
) -> bool {
    let Ok(cname) = CString::new(name) else {
        return false;
    };
    // SAFETY: the API table is written once by RedisModule_Init, before OnLoad code runs.
    let api = unsafe { (raw::RedisModule_GetCommand, raw::RedisModule_SetCommandInfo) };
    let (Some(get), Some(set)) = api else {
        return false;
    };
    let info = raw::RedisModuleCommandInfo {
        version: &COMMAND_INFO_VERSION,
        summary: summary.as_ptr(),
        complexity: ptr::null(),
        since: ptr::null(),
        history: ptr::null_mut(),
        tips: ptr::null(),
        arity,
        key_specs: ptr::null_mut(),
        args: ptr::null_mut(),
    };
    // SAFETY: OnLoad context; the command was registered by this module; Redis copies
    // what it keeps of `info` (the summary is 'static anyway).
    unsafe {
        let cmd = get(ctx.ctx, cname.as_ptr());
        !cmd.is_null() && set(cmd, &info) == 0
    }
}

static IN_FORK_CHILD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What runs around a fork: before it, and after it (in parent and child).
type ForkHooks = (fn(), fn());
static FORK_HOOKS: std::sync::OnceLock<ForkHooks> = std::sync::OnceLock::new();

extern "C" fn before_fork() {
    if let Some((close, _)) = FORK_HOOKS.get() {
        close();
    }
}

extern "C" fn after_fork_parent() {
    if let Some((_, open)) = FORK_HOOKS.get() {
        open();
    }
}

extern "C" fn mark_fork_child() {
    IN_FORK_CHILD.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some((_, open)) = FORK_HOOKS.get() {
        open();
    }
}

/// Arranges for [`in_fork_child`] to turn true in every forked child (getpid is a
/// syscall on every call with today's glibc; this is a load), with `prepare` run
/// before each fork and `done` after it, in parent and child (they must only touch
/// atomics: fork handlers must be async-signal-safe).
pub fn track_forks(prepare: fn(), done: fn()) {
    if FORK_HOOKS.set((prepare, done)).is_err() {
        return; // registered already
    }
    // SAFETY: registers handlers that only touch atomics and call the hooks above.
    unsafe {
        libc::pthread_atfork(
            Some(before_fork),
            Some(after_fork_parent),
            Some(mark_fork_child),
        );
    }
}

/// True in a process forked from Redis (BGSAVE, AOF rewrite, full sync child).
pub fn in_fork_child() -> bool {
    IN_FORK_CHILD.load(std::sync::atomic::Ordering::Relaxed)
}

/// A command argument kept alive after its command, so a value can go to the host
/// straight from Redis's own memory instead of being copied on the main thread.
///
/// Redis strings are reference-counted without atomics, so the reference is taken
/// on the main thread and given back there too: dropping a `HeldArg` on any thread
/// only queues it, and [`release_held`] (main thread) frees what was queued.
#[derive(Debug)]
pub struct HeldArg {
    s: *mut RedisModuleString,
    data: *const u8,
    len: usize,
}

// SAFETY: the string's bytes are immutable while we hold a reference, so reading them
// from any thread is fine; the reference count is only touched on the main thread
// (`hold` and `release_held`).
unsafe impl Send for HeldArg {}
// SAFETY: as above; shared access only reads the immutable bytes.
unsafe impl Sync for HeldArg {}

static HELD_RELEASES: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

impl HeldArg {
    /// Takes a reference to `s`. Main thread only.
    pub fn hold(s: &RedisString) -> HeldArg {
        let mut len = 0usize;
        // SAFETY: `s` is a live argument string on the main thread; RetainString with a
        // NULL context increments its reference count; StringPtrLen returns its bytes,
        // which stay put and unchanged while the reference is held.
        unsafe {
            raw::RedisModule_RetainString.expect("api")(ptr::null_mut(), s.inner);
            let data = raw::RedisModule_StringPtrLen.expect("api")(s.inner, &mut len);
            HeldArg {
                s: s.inner,
                data: data.cast::<u8>(),
                len,
            }
        }
    }
}

impl AsRef<[u8]> for HeldArg {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `data`/`len` describe the held string's bytes, alive and immutable
        // until the reference is released (after this value is gone).
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }
}

impl Drop for HeldArg {
    fn drop(&mut self) {
        HELD_RELEASES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(self.s as usize);
    }
}

/// Gives back the references of dropped [`HeldArg`]s. Main thread only.
pub fn release_held() {
    let queued = std::mem::take(
        &mut *HELD_RELEASES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for p in queued {
        // SAFETY: each pointer was retained once by `HeldArg::hold` and is released once
        // here, on the main thread.
        unsafe {
            raw::RedisModule_FreeString.expect("api")(ptr::null_mut(), p as *mut RedisModuleString)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[test]
    fn error_lines_are_single_line_ascii() {
        assert_eq!(
            error_text("UTMEMDOWN next attempt in 873µs\r\nx"),
            "UTMEMDOWN next attempt in 873?s  x"
        );
    }
}
