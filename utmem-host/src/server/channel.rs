//! Shared-memory channels (see `utmem_proto::channel`): a local client asks for one
//! over its Unix connection and gets the region's memfd and two eventfds; a small
//! fixed set of service threads serves every channel of the daemon.
//!
//! The region is hostile input. A service thread keeps its own ring indices and
//! geometry, copies each descriptor into its own memory once and validates it, copies
//! PUT payloads out of staging into the identity's arena (or an exactly-sized buffer)
//! with volatile reads, and answers each descriptor with one completion. A ring index
//! that runs ahead of the ring, a payload outside staging or a broken chunk sequence
//! ends that channel (logged, [`HOST_DEAD`] set) and nothing else.
//!
//! Waking: a thread that found nothing to do spins for [`SPIN_FOR`] if the machine
//! has a whole core idle (on saturated cores, spinning is CPU taken from Redis);
//! otherwise, while it had work within [`NAP_WINDOW`], it naps [`NAP`] between looks
//! without asking to be kicked, so a client that publishes all the time never makes
//! a system call for it. After that it arms [`HOST_NEED_WAKEUP`] in each of its
//! channels, looks at every submission ring once more, and sleeps on the channels'
//! *submit* eventfds until kicked.

// Staging offsets were checked against the staging length (a usize) before any cast.
#![allow(clippy::cast_possible_truncation)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use utmem_proto::channel::{
    arm, wants_kick, ChannelMem, Cqe, Geometry, Sqe, CLIENT_NEED_WAKEUP, HOST_DEAD,
    HOST_NEED_WAKEUP, SQE_MORE,
};
use utmem_proto::{Op, RequestId, Status};
use vm_memory::VolatileSlice;

use utmem_sys as sys;

use crate::store::{memfd, Arena, ArenaBuf, Identity, Pool, Reservation, Store};

/// Channels one connection may open.
pub const MAX_PER_CONNECTION: usize = 8;
/// Submission and completion ring entries of a channel.
pub const RING_ENTRIES: u32 = 1024;
/// Staging bytes of a channel.
pub const STAGING_LEN: u64 = 8 << 20;
/// Descriptors one channel gets served before the thread looks at the others.
const BUDGET: u32 = 256;
/// How long a thread spins for new work before sleeping, when a core is idle.
pub const SPIN_FOR: Duration = Duration::from_micros(20);
/// After work, a thread naps this long between looks (no kick needed) ...
pub const NAP: Duration = Duration::from_millis(1);
/// ... until it found nothing for this long; then it sleeps until kicked.
pub const NAP_WINDOW: Duration = Duration::from_millis(10);
const WAKER: Token = Token(usize::MAX);

/// The geometry of every channel this daemon makes.
pub const GEOMETRY: Geometry = Geometry {
    sq_entries: RING_ENTRIES,
    cq_entries: RING_ENTRIES,
    staging_len: STAGING_LEN,
};

/// The service threads.
#[derive(Debug)]
pub struct Service {
    threads: Vec<Thread>,
    next: AtomicUsize,
}

#[derive(Debug)]
struct Thread {
    tx: Sender<Channel>,
    waker: Arc<Waker>,
}

/// What the connection that opened a channel holds: dropping it ends the channel.
#[derive(Debug)]
pub struct ChannelHandle {
    closed: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl Drop for ChannelHandle {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

/// A new channel's descriptors for the client: region, submit, complete.
#[derive(Debug)]
pub struct ChannelFds {
    /// The region's memfd.
    pub region: OwnedFd,
    /// The client kicks this.
    pub submit: OwnedFd,
    /// The host kicks this.
    pub complete: OwnedFd,
    /// The region's length.
    pub len: u64,
}

impl Service {
    /// Starts `n` service threads.
    pub fn start(n: usize) -> io::Result<Arc<Service>> {
        let threads = (0..n.max(1))
            .map(|i| {
                let poll = Poll::new()?;
                let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
                let (tx, rx) = mpsc::channel();
                let mut w = Worker {
                    poll,
                    rx,
                    channels: Vec::new(),
                    idle: IdleCores::default(),
                };
                thread::Builder::new()
                    .name(format!("utmem-chan-{i}"))
                    .spawn(move || w.run())?;
                Ok(Thread { tx, waker })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Arc::new(Service {
            threads,
            next: AtomicUsize::new(0),
        }))
    }

    /// Makes a channel for `ident` and hands it to a service thread.
    pub fn open(
        &self,
        store: &Arc<Store>,
        ident: &Arc<Identity>,
    ) -> io::Result<(ChannelHandle, ChannelFds)> {
        let len = GEOMETRY.region_len();
        let file = memfd(&format!("utmem-channel-{}", ident.name()), len)?;
        let region = file.try_clone()?;
        let mem = ChannelMem::map(file, GEOMETRY).map_err(io::Error::other)?;
        mem.init_header();
        let submit = sys::eventfd()?;
        let complete = sys::eventfd()?;
        let arena = store.arena(ident).ok();
        let handle = self.serve(
            store,
            ident,
            arena,
            mem,
            submit.try_clone()?,
            complete.try_clone()?,
        )?;
        Ok((
            handle,
            ChannelFds {
                region: OwnedFd::from(region),
                submit,
                complete,
                len,
            },
        ))
    }
}

impl Service {
    /// Serves a channel whose header the caller wrote, in `mem`, for `ident`: PUTs
    /// that fit go to `arena`. The host waits for kicks on `submit` (it may be shared
    /// with other channels, as a guest device's doorbell is) and kicks `complete`.
    pub fn serve(
        &self,
        store: &Arc<Store>,
        ident: &Arc<Identity>,
        arena: Option<Arc<Arena>>,
        mem: ChannelMem,
        submit: OwnedFd,
        complete: OwnedFd,
    ) -> io::Result<ChannelHandle> {
        let closed = Arc::new(AtomicBool::new(false));
        let ch = Channel {
            mem,
            sq_head: 0,
            cq_tail: 0,
            submit,
            complete,
            exec: Exec {
                store: Arc::clone(store),
                owner: Arc::clone(ident),
                ident: Arc::clone(ident),
                arena,
                partial: None,
            },
            closed: Arc::clone(&closed),
        };
        let t = &self.threads[self.next.fetch_add(1, Ordering::Relaxed) % self.threads.len()];
        t.tx.send(ch)
            .map_err(|_| io::Error::other("the channel service thread is gone"))?;
        t.waker.wake()?;
        Ok(ChannelHandle {
            closed,
            waker: Arc::clone(&t.waker),
        })
    }
}

/// A PUT arriving in chunks.
#[derive(Debug)]
enum Partial {
    /// Being copied into `dst`.
    Filling {
        id: RequestId,
        pool: Arc<Pool>,
        key: utmem_proto::Key,
        res: Reservation,
        dst: Dest,
        got: u64,
        total: u64,
    },
    /// Refused at its first chunk: the rest are answered `status` and dropped.
    Refused { id: RequestId, status: Status },
}

#[derive(Debug)]
enum Dest {
    Arena(ArenaBuf),
    Own(Vec<u8>),
}

impl Dest {
    /// Copies `src` (volatile) to `at`; the caller checked that it fits the value.
    /// An own buffer grows only by what arrives (its capacity was reserved).
    fn fill(&mut self, at: usize, src: &VolatileSlice<'_>) {
        let end = at + src.len();
        let dst = match self {
            Dest::Arena(b) => &mut b.bytes_mut()[at..end],
            Dest::Own(v) => {
                v.resize(end, 0);
                &mut v[at..end]
            }
        };
        src.copy_to(dst);
    }
}

/// The host's side of one channel: all of its state is in host memory.
#[derive(Debug)]
struct Channel {
    mem: ChannelMem,
    /// Our submission head and completion tail; the shared copies are only written.
    sq_head: u32,
    cq_tail: u32,
    submit: OwnedFd,
    complete: OwnedFd,
    exec: Exec,
    closed: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Exec {
    store: Arc<Store>,
    /// The identity the channel was made for (its arena is `arena`).
    owner: Arc<Identity>,
    /// The identity now (a fresh one if the operator dropped the owner).
    ident: Arc<Identity>,
    arena: Option<Arc<Arena>>,
    partial: Option<Partial>,
}

/// Why a channel is ended.
type Garbage = String;

impl Channel {
    /// Serves up to `budget` descriptors; the count, or why the channel must end.
    fn serve(&mut self, budget: u32) -> Result<u32, Garbage> {
        let mut sq = self.mem.sq_consumer().at(self.sq_head);
        let mut cq = self.mem.cq_producer().at(self.cq_tail);
        let ready = sq.ready().map_err(|e| e.to_string())?;
        let room = cq.room().map_err(|e| e.to_string())?;
        let n = ready.min(room).min(budget);
        for _ in 0..n {
            let sqe = Sqe::decode(&sq.pop());
            let cqe = self.exec.run(&self.mem, &sqe)?;
            cq.push(&cqe.encode());
        }
        if n > 0 {
            // `fsync always`: completions of durable changes are published once their
            // records are on disk (one wait per batch).
            crate::store::wait_durable();
            sq.release();
            cq.publish();
            self.sq_head = sq.head;
            self.cq_tail = cq.tail;
            if wants_kick(self.mem.client_flags(), CLIENT_NEED_WAKEUP) {
                sys::eventfd_kick(self.complete.as_fd());
            }
        }
        Ok(n)
    }

    fn pending(&self) -> bool {
        self.mem
            .sq_consumer()
            .at(self.sq_head)
            .ready()
            .map_or(true, |n| n > 0)
    }
}

fn done(sqe: &Sqe, status: Status) -> Cqe {
    Cqe {
        id: sqe.id,
        op: sqe.op,
        status,
        arg0: 0,
        arg1: 0,
    }
}

impl Exec {
    fn pool(&mut self, sqe: &Sqe) -> Option<Arc<Pool>> {
        if let Some(p) = self.ident.pool(sqe.pool) {
            return Some(p);
        }
        if self.ident.is_dropped() {
            self.ident = self.store.identity(self.owner.name());
            return self.ident.pool(sqe.pool);
        }
        None
    }

    /// One descriptor (already in our memory): its completion, or garbage.
    fn run(&mut self, mem: &ChannelMem, sqe: &Sqe) -> Result<Cqe, Garbage> {
        if let Some(p) = self.partial.take() {
            return self.chunk(mem, sqe, p);
        }
        let Some(op) = sqe.op() else {
            return Ok(done(sqe, Status::BadRequest));
        };
        if op == Op::Ping {
            return Ok(done(sqe, Status::Ok));
        }
        if op == Op::Put {
            return self.put(mem, sqe);
        }
        let Some(pool) = self.pool(sqe) else {
            return Ok(done(sqe, Status::UnknownPool));
        };
        let store = Arc::clone(&self.store);
        Ok(match op {
            Op::Get => {
                let buf = mem.staging(sqe.offset, sqe.len).ok_or_else(|| {
                    format!("GET buffer {}+{} outside staging", sqe.offset, sqe.len)
                })?;
                match store.get(&self.ident, &pool, sqe.key) {
                    Ok(v) if v.len() as u64 <= sqe.len => {
                        buf.subslice(0, v.len())
                            .map_err(|e| e.to_string())?
                            .copy_from(&v[..]);
                        Cqe {
                            arg0: v.len() as u64,
                            ..done(sqe, Status::Ok)
                        }
                    }
                    Ok(v) => Cqe {
                        arg0: v.len() as u64,
                        ..done(sqe, Status::TooLarge)
                    },
                    Err(s) => done(sqe, s),
                }
            }
            Op::Flush => done(sqe, store.flush(&pool, sqe.key)),
            Op::FlushObject => done(sqe, store.flush_object(&pool, sqe.key.oid)),
            Op::Copy => done(sqe, store.copy(&self.ident, &pool, sqe.key, sqe.dst)),
            _ => done(sqe, Status::BadRequest),
        })
    }

    fn put(&mut self, mem: &ChannelMem, sqe: &Sqe) -> Result<Cqe, Garbage> {
        let more = sqe.flags & SQE_MORE != 0;
        let src = mem
            .staging(sqe.offset, sqe.len)
            .ok_or_else(|| format!("PUT payload {}+{} outside staging", sqe.offset, sqe.len))?;
        if sqe.len > sqe.total || (!more && sqe.len != sqe.total) || (more && sqe.len == 0) {
            return Err(format!(
                "PUT chunk of {} bytes of a {}-byte value (more: {more})",
                sqe.len, sqe.total
            ));
        }
        let refuse = |me: &mut Self, status| {
            if more {
                me.partial = Some(Partial::Refused { id: sqe.id, status });
            }
            Ok(done(sqe, status))
        };
        let Some(pool) = self.pool(sqe) else {
            return refuse(self, Status::UnknownPool);
        };
        let res = match self
            .store
            .reserve_put(&self.ident, &pool, sqe.key, sqe.total)
        {
            Ok(r) => r,
            Err(s) => return refuse(self, s),
        };
        let total = sqe.total as usize;
        let placed = self
            .arena
            .as_ref()
            .filter(|_| Arc::ptr_eq(&pool.account, &self.owner))
            .and_then(|a| a.alloc(total));
        let mut dst = match placed {
            Some(b) => Dest::Arena(b),
            None => {
                let mut v = Vec::new();
                if v.try_reserve_exact(total).is_err() {
                    return refuse(self, Status::NoSpace);
                }
                Dest::Own(v)
            }
        };
        dst.fill(0, &src);
        if more {
            self.partial = Some(Partial::Filling {
                id: sqe.id,
                pool,
                key: sqe.key,
                res,
                dst,
                got: sqe.len,
                total: sqe.total,
            });
            return Ok(Cqe {
                arg0: sqe.len,
                ..done(sqe, Status::Ok)
            });
        }
        Ok(self.commit(sqe, &pool, sqe.key, dst, res))
    }

    fn chunk(&mut self, mem: &ChannelMem, sqe: &Sqe, p: Partial) -> Result<Cqe, Garbage> {
        let more = sqe.flags & SQE_MORE != 0;
        let same = |id: RequestId| sqe.op == Op::Put as u8 && sqe.id == id && sqe.op().is_some();
        match p {
            Partial::Refused { id, status } => {
                if !same(id) {
                    return Err(format!(
                        "descriptor {:?} in the middle of chunked PUT {id:?}",
                        sqe.id
                    ));
                }
                if more {
                    self.partial = Some(Partial::Refused { id, status });
                }
                Ok(done(sqe, status))
            }
            Partial::Filling {
                id,
                pool,
                key,
                res,
                mut dst,
                got,
                total,
            } => {
                if !same(id) || sqe.total != total {
                    return Err(format!(
                        "descriptor {:?} in the middle of chunked PUT {id:?}",
                        sqe.id
                    ));
                }
                let end = got
                    .checked_add(sqe.len)
                    .filter(|e| *e <= total && (more || *e == total))
                    .ok_or_else(|| {
                        format!("chunks of PUT {id:?} do not add up to {total} bytes")
                    })?;
                let src = mem.staging(sqe.offset, sqe.len).ok_or_else(|| {
                    format!("PUT payload {}+{} outside staging", sqe.offset, sqe.len)
                })?;
                dst.fill(got as usize, &src);
                if more {
                    self.partial = Some(Partial::Filling {
                        id,
                        pool,
                        key,
                        res,
                        dst,
                        got: end,
                        total,
                    });
                    return Ok(Cqe {
                        arg0: end,
                        ..done(sqe, Status::Ok)
                    });
                }
                Ok(self.commit(sqe, &pool, key, dst, res))
            }
        }
    }

    fn commit(
        &self,
        sqe: &Sqe,
        pool: &Pool,
        key: utmem_proto::Key,
        dst: Dest,
        res: Reservation,
    ) -> Cqe {
        let (value, at) = match dst {
            Dest::Arena(b) => {
                let (v, p) = b.publish();
                (v, Some(p))
            }
            Dest::Own(v) => (Bytes::from(v), None),
        };
        let status = self.store.commit_put(&self.ident, pool, key, value, res);
        match (status, at) {
            (Status::Ok, Some(p)) => Cqe {
                arg0: p.offset,
                arg1: p.stamp,
                ..done(sqe, Status::Ok)
            },
            (s, _) => done(sqe, s),
        }
    }
}

struct Worker {
    poll: Poll,
    rx: Receiver<Channel>,
    channels: Vec<Option<Channel>>,
    idle: IdleCores,
}

impl Worker {
    fn run(&mut self) {
        // Naps of NAP, not NAP plus the kernel's default 50 µs of timer slack.
        // SAFETY: prctl(PR_SET_TIMERSLACK) takes a plain integer and affects this thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 10_000u64) };
        let mut events = Events::with_capacity(256);
        let mut last_work = Instant::now();
        loop {
            let did = self.serve_all();
            if did > 0 {
                last_work = Instant::now();
                continue;
            }
            let idle_for = last_work.elapsed();
            if idle_for < SPIN_FOR && self.idle.a_core_is_idle() {
                std::hint::spin_loop();
                continue;
            }
            if idle_for < NAP_WINDOW {
                // Busy lately: nap without asking to be kicked, so that clients
                // publishing all the time never pay for a kick.
                thread::sleep(NAP);
                self.adopt();
                continue;
            }
            // Going to sleep: ask to be kicked, then look once more.
            for ch in self.channels.iter().flatten() {
                arm(ch.mem.host_flags(), HOST_NEED_WAKEUP);
            }
            let ready = self.channels.iter().flatten().any(Channel::pending);
            if !ready {
                if let Err(e) = self.poll.poll(&mut events, Some(Duration::from_secs(1))) {
                    if e.kind() != io::ErrorKind::Interrupted {
                        tracing::error!("channel service poll failed: {e}");
                        thread::sleep(Duration::from_millis(100));
                    }
                }
                for ev in events.iter() {
                    if ev.token() == WAKER {
                        self.adopt();
                    } else if let Some(Some(ch)) = self.channels.get(ev.token().0) {
                        sys::eventfd_drain(ch.submit.as_fd());
                    }
                }
            }
            for ch in self.channels.iter().flatten() {
                ch.mem
                    .host_flags()
                    .fetch_and(!HOST_NEED_WAKEUP, Ordering::SeqCst);
            }
            last_work = Instant::now();
        }
    }

    fn adopt(&mut self) {
        while let Ok(ch) = self.rx.try_recv() {
            let i = match self.channels.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.channels.push(None);
                    self.channels.len() - 1
                }
            };
            let raw = ch.submit.as_raw_fd();
            if let Err(e) =
                self.poll
                    .registry()
                    .register(&mut SourceFd(&raw), Token(i), Interest::READABLE)
            {
                tracing::error!("cannot watch a channel: {e}");
                continue;
            }
            tracing::debug!(identity = %ch.exec.owner.name(), "channel opened");
            self.channels[i] = Some(ch);
        }
    }

    fn serve_all(&mut self) -> u32 {
        let mut did = 0;
        for i in 0..self.channels.len() {
            let Some(ch) = self.channels[i].as_mut() else {
                continue;
            };
            if ch.closed.load(Ordering::SeqCst) {
                self.close(i, None);
                continue;
            }
            match ch.serve(BUDGET) {
                Ok(n) => did += n,
                Err(why) => self.close(i, Some(why)),
            }
        }
        did
    }

    fn close(&mut self, i: usize, why: Option<Garbage>) {
        let Some(ch) = self.channels[i].take() else {
            return;
        };
        let raw = ch.submit.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        let name = ch.exec.owner.name();
        match why {
            None => tracing::debug!(identity = %name, "channel closed"),
            Some(why) => tracing::warn!(identity = %name, "channel ended: {why}"),
        }
        ch.mem.host_flags().fetch_or(HOST_DEAD, Ordering::SeqCst);
        sys::eventfd_kick(ch.complete.as_fd());
        // A partial PUT's reservation and buffer go with it.
    }
}

/// Whether the machine has a whole core idle, from `/proc/stat`, sampled at most every
/// 100 ms.
#[derive(Debug, Default)]
struct IdleCores {
    at: Option<Instant>,
    last: (u64, u64),
    idle: bool,
}

impl IdleCores {
    fn a_core_is_idle(&mut self) -> bool {
        if self
            .at
            .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return self.idle;
        }
        self.at = Some(Instant::now());
        let Some((idle, total)) = cpu_times() else {
            return false;
        };
        let (di, dt) = (
            idle.saturating_sub(self.last.0),
            total.saturating_sub(self.last.1),
        );
        self.last = (idle, total);
        let cores = thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        // Idle time worth a whole core over the interval.
        self.idle = dt > 0 && di * cores >= dt;
        self.idle
    }
}

fn cpu_times() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((idle, v.iter().sum()))
}
