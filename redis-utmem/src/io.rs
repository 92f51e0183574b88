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
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use utmem_client::proto::{Key, Status};
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
        /// Completion.
        done: Option<Box<dyn FnOnce() + Send>>,
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
    /// Duplicate `src` into `dst` inside the host.
    Copy {
        /// Source.
        src: Arc<Slot>,
        /// Target (already marked remote with the source's CRC).
        dst: Arc<Slot>,
    },
    /// Drop an object on the host.
    Flush(u64),
    /// A fork child was born (`true`) or died.
    Fork(bool),
    /// Something changed; look at the waiting PUTs again.
    Wake,
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
pub fn start(spec: &str, pool_name: &str, timeout: Duration) -> Result<&'static Shared, String> {
    let client = Client::connect_lazy(
        spec,
        Options {
            timeout,
            map: true,
            ..Options::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let pool = client.register_pool(
        utmem_client::proto::PoolKind::Private(pool_name.to_owned()),
        false,
        true,
    );
    let (tx, rx) = mpsc::channel();
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(1));
    let state = Shared {
        client: client.clone(),
        pool,
        pool_name: pool_name.to_owned(),
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
    let c = Client::connect_lazy(&s.spec, Options::default()).ok()?;
    let pool = c.register_pool(
        utmem_client::proto::PoolKind::Private(s.pool_name.clone()),
        false,
        false,
    );
    *child = Some((pid, c.clone(), pool));
    Some((c, pool))
}

/// The value's bytes, fetched synchronously if they are on the host (RDB save, AOF
/// rewrite, MULTI/Lua). The error is the reply to give.
pub fn fetch_sync(slot: &Slot) -> Result<Bytes, Val> {
    match slot.read() {
        Read::Here(b) => Ok(b),
        Read::Lost => Err(lost_err()),
        Read::Remote(crc) => {
            let (c, pool) = client_here().ok_or_else(|| down_err("module not initialised"))?;
            match c.get(pool, Key::new(slot.oid, 0)) {
                Ok(Some(v)) => check(slot, crc, v),
                Ok(None) => Err(lost_err()),
                Err(e) => Err(err_reply(&e)),
            }
        }
    }
}

/// Runs `f` on the bytes of `slot` read from the host's mapped arena (no round trip);
/// `None` if the value is not in the arena, is longer than `max`, was not there any more
/// (counted), or this is a fork child (which must not touch the parent's client). The
/// arena is memory the host may change, so the bytes are copied into a buffer of this
/// thread and their stamp checked after the copy before `f` sees them: a reply made
/// from them is never one of bytes that changed.
pub fn with_mapped<R>(slot: &Slot, max: usize, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
    thread_local! {
        static MAPPED_COPY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    if max == 0 || slot.len > max || !in_parent() {
        return None;
    }
    let at = slot.placement()?;
    let stats = crate::stats();
    let client = &shared()?.client;
    let r = MAPPED_COPY.with_borrow_mut(|buf| {
        client
            .read_mapped(at, slot.len, buf)
            .then(|| f(&buf[..slot.len]))
    });
    Stats::bump(if r.is_some() {
        &stats.mapped_reads
    } else {
        &stats.mapped_fallbacks
    });
    r
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

fn lost_err() -> Val {
    Stats::bump(&crate::stats().lost_values);
    Val::Err("UTMEMLOST the host no longer has this value (host restarted or pool dropped)".into())
}

fn down_err(why: &str) -> Val {
    Val::Err(format!("UTMEMDOWN {why}"))
}

fn err_reply(e: &ClientError) -> Val {
    match e {
        ClientError::Refused {
            status: Status::Miss | Status::UnknownPool,
            ..
        } => lost_err(),
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
                        let out = match r {
                            Ok(Response::Value(v)) => check(&s2, crc, v),
                            Ok(_) => Err(lost_err()),
                            Err(e) => Err(err_reply(&e)),
                        };
                        done(out);
                    }),
                ));
            }
            Job::Copy { src, dst } => {
                dst.mark_submitted();
                let client = self.client.clone();
                let pool = self.pool;
                batch.push((
                    Request::Copy {
                        pool,
                        src: Key::new(src.oid, 0),
                        dst: Key::new(dst.oid, 0),
                    },
                    Box::new(move |r: Result<Response, ClientError>| {
                        if r.is_ok() {
                            return;
                        }
                        // The host could not copy (full, or down): hold the copy in Redis.
                        client.submit(
                            Request::Get {
                                pool,
                                key: Key::new(src.oid, 0),
                            },
                            move |r| {
                                if let Ok(Response::Value(v)) = r {
                                    dst.replace_with_local(v);
                                    remember_for_retry(&dst);
                                }
                            },
                        );
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
        done: Option<Box<dyn FnOnce() + Send>>,
        batch: &mut Vec<(Request, Completion)>,
    ) {
        let Some(bytes) = slot.take_for_put() else {
            if let Some(d) = done {
                d();
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
                match r {
                    Ok(Response::Placed(at)) => slot.acked(crc, Some(at)),
                    Ok(_) => slot.acked(crc, None),
                    Err(e) => {
                        match &e {
                            ClientError::Refused {
                                status: Status::NoSpace | Status::TooLarge,
                                ..
                            } => Stats::bump(&stats.no_space_fallbacks),
                            _ => Stats::bump(&stats.host_down_fallbacks),
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
                    d();
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
                self.handle(Job::Put { slot, done: None }, batch);
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
