//! The module's I/O thread: Redis's main thread hands it jobs over a channel and
//! returns at once; the thread batches what it collected into one
//! `submit_many` (one vectored write), and completions run on the client's
//! reader thread, which finishes slots and replies to blocked clients without
//! Redis's global lock.
//!
//! It also holds back host FLUSHes while a fork child (BGSAVE, AOF rewrite,
//! full sync) may still read the values, offers values kept in Redis to the
//! host again once it can take them, and caps the bytes of PUTs in flight.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use utmem_client::proto::{Key, Placement, Status};
use utmem_client::{Client, ClientError, Completion, Options, Pool, Request, Response};

use crate::raw::Val;
use crate::slot::{Read, Slot};
use crate::stats::Stats;

/// What the main thread (or a free callback on any thread) asks of the I/O thread.
#[allow(missing_debug_implementations)] // holds completion closures
pub enum Job {
    /// Send the slot's bytes to the host; `done` runs once the value is on the host
    /// or was kept in Redis.
    Put {
        /// The value.
        slot: Arc<Slot>,
        /// Completion: `Err(reply)` if the SET must fail (`on-host-down error` and the
        /// host did not take the value; the value is kept in Redis all the same).
        done: Option<PutDone>,
    },
    /// Fetch a remote value and check its CRC.
    Get {
        /// The value.
        slot: Arc<Slot>,
        /// Its CRC.
        crc: u32,
        /// Completion with the bytes or the error reply.
        done: Box<dyn FnOnce(Result<Bytes, Val>) + Send>,
    },
    /// Have the host duplicate a copy's source under the copy's object id.
    Copy {
        /// The copy ([`Slot::copy_of`]).
        dst: Arc<Slot>,
    },
    /// Drop an object on the host.
    Flush(u64),
    /// A fork child was born (`true`) or died.
    Fork(bool),
    /// Something changed; look at the waiting PUTs again.
    Wake,
}

/// What a waiting UTMEM.SET is told when its PUT is done.
pub type PutDone = Box<dyn FnOnce(Result<(), Val>) + Send>;

/// False from a request that found the host unreachable or timed out until the next
/// request the host answers: while false, `on-host-down error` refuses at once.
static HOST_ANSWERS: AtomicBool = AtomicBool::new(true);

/// Whether the host answered the last requests (as far as the module knows, without I/O).
pub fn host_answers() -> bool {
    HOST_ANSWERS.load(Relaxed) && connected()
}

fn note_answer<T>(r: &Result<T, ClientError>) {
    match r {
        Ok(_) | Err(ClientError::Refused { .. }) => HOST_ANSWERS.store(true, Relaxed),
        Err(ClientError::Timeout(_) | ClientError::Unreachable { .. }) => {
            HOST_ANSWERS.store(false, Relaxed)
        }
        Err(_) => {}
    }
}

/// Process-wide state of the loaded module.
#[allow(missing_debug_implementations)] // holds the job channel
pub struct Shared {
    /// The connection to the host.
    pub client: Client,
    /// The module's persistent pool.
    pub pool: Pool,
    /// Its name.
    pub pool_name: String,
    /// Whether it is a durable pool (`durable yes`).
    pub durable: bool,
    /// The transport spec.
    pub spec: String,
    /// `Sender` is `Sync`: every thread sends without a lock of ours.
    tx: Sender<Job>,
    next_oid: std::sync::atomic::AtomicU64,
    /// Bytes of PUTs submitted and not yet answered.
    inflight_bytes: AtomicI64,
    waiting: AtomicBool,
    retry: Mutex<Vec<Weak<Slot>>>,
}

static SHARED: OnceLock<Shared> = OnceLock::new();
/// How long the I/O thread collects jobs after the first one woke it.
const LINGER: Duration = Duration::from_micros(20);
static CHILD: Mutex<Option<(u32, Client, Pool)>> = Mutex::new(None);

/// The module's state; `None` before OnLoad finished.
pub fn shared() -> Option<&'static Shared> {
    SHARED.get()
}

fn in_parent() -> bool {
    !crate::raw::in_fork_child()
}

/// Starts the I/O thread and connects (a host that is down now is retried later).
/// The pool is emptied the first time it is opened: RDB and AOF are the source of truth.
/// A durable pool (`durable`) keeps its values across host restarts; a host that is
/// reachable now and keeps no durable pools is an error.
pub fn start(
    spec: &str,
    pool_name: &str,
    timeout: Duration,
    durable: bool,
) -> Result<&'static Shared, String> {
    let client = Client::connect_lazy(
        spec,
        Options {
            timeout,
            map: true,
            ..Options::default()
        },
    )
    .map_err(|e| format!("option transport: {e}"))?;
    if durable {
        check_durable(&client, timeout)?;
    }
    let pool = client.register(pool_request(pool_name, durable), true);
    let (tx, rx) = mpsc::channel();
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(1));
    let state = Shared {
        client: client.clone(),
        pool,
        pool_name: pool_name.to_owned(),
        durable,
        spec: spec.to_owned(),
        tx,
        // Fresh object ids across restarts too, even if the pool could not be emptied.
        next_oid: std::sync::atomic::AtomicU64::new(now_us),
        inflight_bytes: AtomicI64::new(0),
        waiting: AtomicBool::new(false),
        retry: Mutex::new(Vec::new()),
    };
    if SHARED.set(state).is_err() {
        return Err("the module is already loaded in this process".into());
    }
    std::thread::Builder::new()
        .name("utmem-io".into())
        .spawn(move || run(rx, client, pool))
        .map_err(|e| format!("cannot start the I/O thread: {e}"))?;
    shared().ok_or_else(|| "not initialised".to_owned())
}

/// NEW_POOL of the module's pool.
fn pool_request(name: &str, durable: bool) -> utmem_client::proto::NewPool {
    utmem_client::proto::NewPool {
        kind: utmem_client::proto::PoolKind::Private(name.to_owned()),
        ephemeral: false,
        durable,
    }
}

/// `durable yes`: the host must offer durable pools. Waits (at most `timeout`, at
/// most 2 s) for the host's HELLO; a host that cannot be reached now is checked
/// when it can (its NEW_POOL refusal leaves values in Redis, logged).
fn check_durable(client: &Client, timeout: Duration) -> Result<(), String> {
    let t0 = std::time::Instant::now();
    let wait = timeout.min(Duration::from_secs(2));
    loop {
        if let Some(h) = client.hello() {
            if h.capabilities & utmem_client::proto::CAP_DURABLE == 0 {
                return Err(format!(
                    "option durable: the host at {} keeps no durable pools \
                     (start utmem-hostd with --data-dir DIR), or load without `durable yes`",
                    client.target()
                ));
            }
            return Ok(());
        }
        if t0.elapsed() >= wait {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A fresh object id.
pub fn next_oid() -> u64 {
    shared().map_or(0, |s| s.next_oid.fetch_add(1, Relaxed))
}

/// Hands a job to the I/O thread (from any thread of the parent process).
pub fn send(job: Job) {
    if let Some(s) = shared() {
        if in_parent() {
            let _ = s.tx.send(job);
        }
    }
}

/// Flushes an object on the host (deferred while a fork child runs).
pub fn flush(oid: u64) {
    send(Job::Flush(oid));
}

/// Whether the host is reachable right now, as far as the client knows.
pub fn connected() -> bool {
    shared().is_some_and(|s| s.client.is_connected())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The client to use from this process: the module's own in Redis, a fresh one
/// (its own connection, same identity and pool) in a fork child, whose copy of the
/// parent's client has no threads behind it.
fn client_here() -> Option<(Client, Pool)> {
    let s = shared()?;
    if in_parent() {
        return Some((s.client.clone(), s.pool));
    }
    let pid = std::process::id();
    let mut child = lock(&CHILD);
    if let Some((p, c, pool)) = child.as_ref() {
        if *p == pid {
            return Some((c.clone(), *pool));
        }
    }
    let opts = Options {
        timeout: crate::config::timeout(),
        ..Options::default()
    };
    let c = Client::connect_lazy(&s.spec, opts).ok()?;
    let pool = c.register(pool_request(&s.pool_name, s.durable), false);
    *child = Some((pid, c.clone(), pool));
    Some((c, pool))
}

/// Why a synchronous fetch failed.
#[derive(Debug)]
pub enum FetchError {
    /// The host answered MISS (or the value was known lost): it is gone for good.
    Lost,
    /// The host is unreachable or did not answer in time: the value may come back.
    Down(String),
    /// The host returned bytes that do not match the checksum.
    Corrupt(String),
}

impl FetchError {
    /// The reply a client gets for it.
    pub fn reply(&self) -> Val {
        match self {
            FetchError::Lost => lost_err(),
            FetchError::Down(why) => down_err(why),
            FetchError::Corrupt(why) => Val::Err(why.clone()),
        }
    }
}

/// Until when (ms on the module's clock) synchronous fetches fail at once: one of them
/// found the host down, and a save must not wait a timeout per value.
static SYNC_DOWN_UNTIL: AtomicU64 = AtomicU64::new(0);

fn clock_ms() -> u64 {
    static T0: OnceLock<Instant> = OnceLock::new();
    u64::try_from(T0.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The value's bytes, fetched synchronously if they are on the host (RDB save, AOF
/// rewrite, RECALLALL): from the mapped arena when this process maps it, else with a
/// round trip. After one fetch found the host down, the next ones within `timeout-ms`
/// fail at once, so a save never waits more than one timeout in all.
pub fn fetch_sync(slot: &Slot) -> Result<Bytes, FetchError> {
    let src = slot.source();
    let slot = src.as_deref().unwrap_or(slot);
    match slot.read() {
        Read::Here(b) => Ok(b),
        Read::Lost => Err(FetchError::Lost),
        Read::Remote(crc) => {
            if let Some(b) = read_mapped(slot, usize::MAX) {
                return Ok(b);
            }
            if clock_ms() < SYNC_DOWN_UNTIL.load(Relaxed) {
                return Err(FetchError::Down(
                    "the host did not answer a moment ago".into(),
                ));
            }
            let (c, pool) = client_here()
                .ok_or_else(|| FetchError::Down("the module is not initialised".into()))?;
            let r = c.get(pool, Key::new(slot.oid, 0));
            note_answer(&r);
            match r {
                Ok(Some(v)) => check(slot, crc, v).map_err(|e| match e {
                    Val::Err(e) => FetchError::Corrupt(e),
                    _ => FetchError::Corrupt("UTMEMCORRUPT".into()),
                }),
                Ok(None)
                | Err(ClientError::Refused {
                    status: Status::Miss | Status::UnknownPool,
                    ..
                }) => {
                    slot.mark_lost();
                    Err(FetchError::Lost)
                }
                Err(e) => {
                    let ms = u64::try_from(crate::config::timeout().as_millis()).unwrap_or(0);
                    SYNC_DOWN_UNTIL.store(clock_ms() + ms, Relaxed);
                    Err(FetchError::Down(e.to_string()))
                }
            }
        }
    }
}

/// Where `slot` sits in the mapped arena and the client that maps it, if it is to be
/// read from there: placed, at most `max` bytes, and this is not a fork child (which
/// must not touch the parent's client).
fn mapped_at(slot: &Slot, max: usize) -> Option<(Placement, &'static Client)> {
    if max == 0 || slot.len > max || !in_parent() {
        return None;
    }
    Some((slot.placement()?, &shared()?.client))
}

fn count_mapped(hit: bool) {
    let stats = crate::stats();
    Stats::bump(if hit {
        &stats.mapped_reads
    } else {
        &stats.mapped_fallbacks
    });
}

/// A copy of `slot`'s bytes from the host's mapped arena (no round trip); `None` if the
/// value is not to be read from there (see [`mapped_at`]) or was not there any more
/// (counted). The copy is volatile and its stamp checked after it, so these are never
/// bytes that changed while they were read.
pub fn read_mapped(slot: &Slot, max: usize) -> Option<Bytes> {
    let (at, client) = mapped_at(slot, max)?;
    let mut buf = Vec::new();
    let hit = client.read_mapped(at, slot.len, &mut buf);
    count_mapped(hit);
    hit.then(|| Bytes::from(buf))
}

/// Replies to the command of `ctx` with `slot`'s bytes straight from the mapped arena:
/// one copy, made by Redis into the client's reply. True if it replied.
///
/// Safe with the arena protocol: the stamp is checked with the reader word held, and
/// the host never writes a value's bytes while a reader may be in them (it parks freed
/// space until the reader word moves on). If the value was dropped while Redis copied,
/// the reply is the value as it was when the read began, which is where this read
/// takes effect.
pub fn reply_mapped(ctx: &redis_module::Context, slot: &Slot, max: usize) -> bool {
    let Some((at, client)) = mapped_at(slot, max) else {
        return false;
    };
    let len = slot.len;
    let mut replied = false;
    let _ = client.with_mapped(at, len, |vs| {
        let guard = vs.ptr_guard();
        // SAFETY: the guard keeps the volatile slice's `len` bytes mapped until it drops.
        unsafe { crate::raw::write_reply_from(ctx, guard.as_ptr(), len.min(vs.len())) };
        replied = true;
    });
    count_mapped(replied);
    replied
}

fn check(slot: &Slot, crc: u32, v: Bytes) -> Result<Bytes, Val> {
    if v.len() != slot.len || crc32fast::hash(&v) != crc {
        Stats::bump(&crate::stats().checksum_errors);
        return Err(Val::Err(format!(
            "UTMEMCORRUPT the host returned {} bytes that do not match the stored checksum",
            v.len()
        )));
    }
    Ok(v)
}

/// The reply for a value known to be lost.
pub fn lost_err() -> Val {
    Stats::bump(&crate::stats().lost_reads);
    Val::Err("UTMEMLOST the host no longer has this value (host restarted or pool dropped)".into())
}

fn down_err(why: &str) -> Val {
    Val::Err(format!("UTMEMDOWN {why}"))
}

/// The reply for a failed read of `slot`; a MISS makes the value lost.
fn err_reply(slot: &Slot, e: &ClientError) -> Val {
    match e {
        ClientError::Refused {
            status: Status::Miss | Status::UnknownPool,
            ..
        } => {
            slot.mark_lost();
            lost_err()
        }
        e => down_err(&e.to_string()),
    }
}

struct Io {
    rx: Receiver<Job>,
    client: Client,
    pool: Pool,
    fork_running: bool,
    deferred: Vec<u64>,
    waiting: VecDeque<Job>,
    last_retry: Instant,
}

fn run(rx: Receiver<Job>, client: Client, pool: Pool) {
    let mut io = Io {
        rx,
        client,
        pool,
        fork_running: false,
        deferred: Vec::new(),
        waiting: VecDeque::new(),
        last_retry: Instant::now(),
    };
    // Short sleeps: the kernel's default 50 µs timer slack would triple LINGER.
    // SAFETY: prctl(PR_SET_TIMERSLACK) takes a plain integer and affects this thread only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000u64) };
    loop {
        let mut batch: Vec<(Request, Completion)> = Vec::new();
        match io.rx.recv_timeout(Duration::from_secs(1)) {
            Ok(job) => {
                io.handle(job, &mut batch);
                // Linger a moment, not parked on the channel: jobs sent meanwhile wake
                // nobody (no futex call on Redis's main thread) and go out in one batch.
                if !LINGER.is_zero() {
                    std::thread::sleep(LINGER);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        while batch.len() < 1024 {
            match io.rx.try_recv() {
                Ok(job) => io.handle(job, &mut batch),
                Err(_) => break,
            }
        }
        io.drain_waiting(&mut batch);
        if io.last_retry.elapsed() >= Duration::from_secs(1) {
            io.last_retry = Instant::now();
            io.retry(&mut batch);
            if !HOST_ANSWERS.load(Relaxed) {
                // Nobody else may ask (`on-host-down error` refuses at once): find out.
                batch.push((Request::Ping, Box::new(|r| note_answer(&r))));
            }
        }
        if !batch.is_empty() {
            io.client.submit_many(batch);
        }
    }
}

impl Io {
    fn handle(&mut self, job: Job, batch: &mut Vec<(Request, Completion)>) {
        match job {
            Job::Put { slot, done } => {
                if self.over_cap(slot.len) {
                    self.waiting.push_back(Job::Put { slot, done });
                    if let Some(s) = shared() {
                        s.waiting.store(true, Relaxed);
                    }
                } else {
                    self.put(slot, done, batch);
                }
            }
            Job::Get { slot, crc, done } => {
                let t0 = Instant::now();
                let s2 = Arc::clone(&slot);
                batch.push((
                    Request::Get {
                        pool: self.pool,
                        key: Key::new(slot.oid, 0),
                    },
                    Box::new(move |r: Result<Response, ClientError>| {
                        crate::stats().rtt_us(micros(t0));
                        note_answer(&r);
                        let out = match r {
                            Ok(Response::Value(v)) => check(&s2, crc, v),
                            Ok(_) => {
                                s2.mark_lost();
                                Err(lost_err())
                            }
                            Err(e) => Err(err_reply(&s2, &e)),
                        };
                        done(out);
                    }),
                ));
            }
            Job::Copy { dst } => {
                // The source may have been copied from a copy not made yet.
                let Some(src) = dst.source() else { return };
                let Read::Remote(crc) = src.read() else {
                    return; // lost meanwhile: nothing to copy (reads say UTMEMLOST)
                };
                dst.mark_submitted();
                batch.push((
                    Request::Copy {
                        pool: self.pool,
                        src: Key::new(src.oid, 0),
                        dst: Key::new(dst.oid, 0),
                    },
                    Box::new(move |r: Result<Response, ClientError>| {
                        note_answer(&r);
                        match r {
                            Ok(_) => dst.copied(crc),
                            Err(ClientError::Refused {
                                status: Status::Miss | Status::UnknownPool,
                                ..
                            }) => src.mark_lost(),
                            // Host full or down: reads keep going to the source, whose
                            // bytes stay on the host; the COPY is tried again later.
                            Err(_) => remember_for_retry(&dst),
                        }
                    }),
                ));
            }
            Job::Flush(oid) => {
                if self.fork_running {
                    self.deferred.push(oid);
                } else {
                    batch.push(self.flush_req(oid));
                }
            }
            Job::Fork(born) => {
                self.fork_running = born;
                if !born {
                    for oid in std::mem::take(&mut self.deferred) {
                        batch.push(self.flush_req(oid));
                    }
                }
            }
            Job::Wake => {}
        }
    }

    fn flush_req(&self, oid: u64) -> (Request, Completion) {
        (
            Request::Flush {
                pool: self.pool,
                key: Key::new(oid, 0),
            },
            Box::new(|_| {}),
        )
    }

    fn over_cap(&self, len: usize) -> bool {
        let Some(s) = shared() else { return false };
        let cap = crate::config::MAX_PENDING_BYTES.load(Relaxed);
        let inflight = s.inflight_bytes.load(Relaxed);
        cap > 0 && inflight > 0 && inflight + i64::try_from(len).unwrap_or(i64::MAX) > cap
    }

    fn drain_waiting(&mut self, batch: &mut Vec<(Request, Completion)>) {
        while let Some(Job::Put { slot, .. }) = self.waiting.front() {
            if self.over_cap(slot.len) {
                return;
            }
            if let Some(Job::Put { slot, done }) = self.waiting.pop_front() {
                self.put(slot, done, batch);
            }
        }
        if self.waiting.is_empty() {
            if let Some(s) = shared() {
                s.waiting.store(false, Relaxed);
            }
        }
    }

    fn put(
        &mut self,
        slot: Arc<Slot>,
        done: Option<PutDone>,
        batch: &mut Vec<(Request, Completion)>,
    ) {
        let Some(bytes) = slot.take_for_put() else {
            if let Some(d) = done {
                d(Ok(()));
            }
            return;
        };
        let crc = crc32fast::hash(&bytes);
        let len = i64::try_from(bytes.len()).unwrap_or(i64::MAX);
        if let Some(s) = shared() {
            s.inflight_bytes.fetch_add(len, Relaxed);
        }
        let t0 = Instant::now();
        let key = Key::new(slot.oid, 0);
        batch.push((
            Request::Put {
                pool: self.pool,
                key,
                value: bytes,
            },
            Box::new(move |r: Result<Response, ClientError>| {
                let stats = crate::stats();
                stats.rtt_us(micros(t0));
                note_answer(&r);
                let mut outcome = Ok(());
                match r {
                    Ok(Response::Placed(at)) => slot.acked(crc, Some(at)),
                    Ok(_) => slot.acked(crc, None),
                    Err(e) => {
                        let full = matches!(
                            &e,
                            ClientError::Refused {
                                status: Status::NoSpace | Status::TooLarge,
                                ..
                            }
                        );
                        if slot.first_fallback() {
                            Stats::bump(if full {
                                &stats.no_space_fallbacks
                            } else {
                                &stats.host_down_fallbacks
                            });
                        }
                        // A host that is down or did not answer in time is "down" for
                        // `on-host-down error`; the value stays in Redis either way.
                        if !full && crate::config::error_when_down() {
                            outcome = Err(Val::Err(format!(
                                "UTMEMDOWN {e}; the value was kept in Redis"
                            )));
                        }
                        slot.keep_local();
                        remember_for_retry(&slot);
                    }
                }
                if let Some(s) = shared() {
                    s.inflight_bytes.fetch_sub(len, Relaxed);
                    if s.waiting.load(Relaxed) {
                        send(Job::Wake);
                    }
                }
                if let Some(d) = done {
                    d(outcome);
                }
            }),
        ));
    }

    /// Offers values kept in Redis to the host again, once it is reachable.
    fn retry(&mut self, batch: &mut Vec<(Request, Completion)>) {
        let Some(s) = shared() else { return };
        if lock(&s.retry).is_empty() {
            return;
        }
        if !self.client.is_connected() {
            // A ping makes the client try to reconnect (within its backoff).
            batch.push((Request::Ping, Box::new(|_| {})));
            return;
        }
        let slots: Vec<Weak<Slot>> = std::mem::take(&mut *lock(&s.retry));
        for w in slots {
            if let Some(slot) = w.upgrade() {
                if slot.source().is_some() {
                    self.handle(Job::Copy { dst: slot }, batch);
                } else {
                    self.handle(Job::Put { slot, done: None }, batch);
                }
            }
        }
    }
}

fn remember_for_retry(slot: &Arc<Slot>) {
    if let Some(s) = shared() {
        lock(&s.retry).push(Arc::downgrade(slot));
    }
}

fn micros(t0: Instant) -> u64 {
    u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX)
}
