//! A utmem value: the stub Redis keeps in its keyspace, and the slot it shares
//! with the host I/O (a plain state machine; it does no I/O itself).
//!
//! The stub holds an `Arc<Slot>`. The slot's state moves from *pending* (the
//! bytes are in Redis while the PUT is in flight) to *remote* (the host
//! acknowledged; the bytes are dropped right there, on whichever thread saw the
//! acknowledgement) or to *local* (host down or full: the bytes stay in
//! Redis and are offered again later). The main thread reads the state under
//! the slot's own small mutex. When the last reference to a slot goes, the
//! host copy is flushed (after every job that still used it) by the hook the I/O
//! layer installed ([`on_unreferenced`]).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use utmem_client::proto::Placement;

use crate::stats::Stats;

/// Where a value's bytes are.
#[derive(Debug, Clone)]
pub enum State {
    /// In Redis, PUT in flight.
    Pending(Bytes),
    /// In Redis, kept there because the host was down or full; offered again later.
    Local(Bytes),
    /// On the host, with the checksum of the bytes.
    Remote {
        /// CRC32 of the value.
        crc: u32,
        /// Where it is in the host's arena, if this process maps it.
        at: Option<Placement>,
    },
    /// A copy of another value (Redis COPY) that the host has not duplicated yet: its
    /// bytes are the source's, which this keeps alive (no FLUSH) until the copy is made.
    CopyOf(Arc<Slot>),
    /// Neither: the host answered MISS for it, or the RDB it came from could not
    /// include it.
    Lost,
}

/// One value.
#[derive(Debug)]
pub struct Slot {
    /// Object id in the pool; never reused within the pool's life.
    pub oid: u64,
    /// Length in bytes.
    pub len: usize,
    state: Mutex<State>,
    /// Set once a request for this object went to the host: then it must be flushed.
    submitted: AtomicBool,
    /// Set once this value fell back to Redis memory (counted once).
    fell_back: AtomicBool,
}

/// Called with the object id of a value that went to the host once its last
/// reference is gone (the host copy must be flushed): set by the I/O layer.
static ON_UNREFERENCED: std::sync::OnceLock<fn(u64)> = std::sync::OnceLock::new();

/// Has `f` called with the object id of each value that reached the host, once the
/// value's last reference is gone.
pub fn on_unreferenced(f: fn(u64)) {
    ON_UNREFERENCED.get_or_init(|| f);
}

/// What a reader finds.
#[derive(Debug, Clone)]
pub enum Read {
    /// The bytes are here.
    Here(Bytes),
    /// Fetch from the host and check against this CRC.
    Remote(u32),
    /// Gone.
    Lost,
}

impl Slot {
    /// A value whose PUT is about to be submitted.
    pub fn pending(oid: u64, bytes: Bytes) -> Arc<Slot> {
        let s = crate::stats::get();
        Stats::add(&s.pending, 1);
        Stats::add(&s.pending_bytes, len_i64(bytes.len()));
        Arc::new(Slot {
            oid,
            len: bytes.len(),
            state: Mutex::new(State::Pending(bytes)),
            submitted: AtomicBool::new(false),
            fell_back: AtomicBool::new(false),
        })
    }

    /// A value whose bytes stay in Redis (below the threshold where it was loaded).
    pub fn local(oid: u64, bytes: Bytes) -> Arc<Slot> {
        Stats::add(&crate::stats::get().inline_values, 1);
        Arc::new(Slot {
            oid,
            len: bytes.len(),
            state: Mutex::new(State::Local(bytes)),
            submitted: AtomicBool::new(false),
            fell_back: AtomicBool::new(true),
        })
    }

    /// A copy of `src` (a remote value) that the host is asked to duplicate under `oid`;
    /// until it has, reads go to `src`.
    pub fn copy_of(oid: u64, src: &Arc<Slot>) -> Arc<Slot> {
        Arc::new(Slot {
            oid,
            len: src.len,
            state: Mutex::new(State::CopyOf(Arc::clone(src))),
            submitted: AtomicBool::new(false),
            fell_back: AtomicBool::new(false),
        })
    }

    /// The host made the copy: this value is remote under its own object id.
    pub fn copied(&self, crc: u32) {
        let mut st = self.lock();
        if let State::CopyOf(_) = &*st {
            let s = crate::stats::get();
            Stats::add(&s.offloaded_values, 1);
            Stats::add(&s.offloaded_bytes, len_i64(self.len));
            *st = State::Remote { crc, at: None };
        }
    }

    /// The value whose object id holds these bytes on the host: the source of a copy
    /// not made yet, else `None` (this one).
    pub fn source(&self) -> Option<Arc<Slot>> {
        let src = match &*self.lock() {
            State::CopyOf(src) => Arc::clone(src),
            _ => return None,
        };
        Some(src.source().unwrap_or(src))
    }

    /// A value an RDB could not include.
    pub fn lost(oid: u64) -> Arc<Slot> {
        Stats::add(&crate::stats::get().lost_values, 1);
        Arc::new(Slot {
            oid,
            len: 0,
            state: Mutex::new(State::Lost),
            submitted: AtomicBool::new(false),
            fell_back: AtomicBool::new(false),
        })
    }

    /// The host answered MISS for this remote value: it is lost (reads say
    /// `-UTMEMLOST`, saves record it as lost). A value still in Redis is unaffected.
    pub fn mark_lost(&self) {
        let mut st = self.lock();
        if let State::Remote { .. } = &*st {
            let s = crate::stats::get();
            Stats::add(&s.offloaded_values, -1);
            Stats::add(&s.offloaded_bytes, -len_i64(self.len));
            Stats::add(&s.lost_values, 1);
            *st = State::Lost;
        }
    }

    /// True the first time this value falls back to Redis memory.
    pub fn first_fallback(&self) -> bool {
        !self.fell_back.swap(true, Relaxed)
    }

    fn lock(&self) -> Locked<'_> {
        fork_gate::enter();
        Locked(Some(
            self.state.lock().unwrap_or_else(PoisonError::into_inner),
        ))
    }

    /// Where the bytes are (for a copy not made yet: the source's; fetch those with
    /// [`Slot::source`]'s object id).
    pub fn read(&self) -> Read {
        let src = match &*self.lock() {
            State::Pending(b) | State::Local(b) => return Read::Here(b.clone()),
            State::Remote { crc, .. } => return Read::Remote(*crc),
            State::Lost => return Read::Lost,
            State::CopyOf(src) => Arc::clone(src),
        };
        src.read()
    }

    /// Where a remote value sits in the mapped arena, if it does.
    pub fn placement(&self) -> Option<Placement> {
        let src = match &*self.lock() {
            State::Remote { at, .. } => return *at,
            State::CopyOf(src) => Arc::clone(src),
            _ => return None,
        };
        src.placement()
    }

    /// The bytes to PUT, if this value still needs to go to the host (pending, or
    /// local and being offered again, in which case it becomes pending).
    pub fn take_for_put(&self) -> Option<Bytes> {
        let mut st = self.lock();
        let b = match &*st {
            State::Pending(b) => b.clone(),
            State::Local(b) => {
                let b = b.clone();
                let s = crate::stats::get();
                Stats::add(&s.inline_values, -1);
                Stats::add(&s.pending, 1);
                Stats::add(&s.pending_bytes, len_i64(b.len()));
                *st = State::Pending(b.clone());
                b
            }
            State::Remote { .. } | State::Lost | State::CopyOf(_) => return None,
        };
        self.submitted.store(true, Relaxed);
        Some(b)
    }

    /// Marks that a request for this object was sent (COPY target).
    pub fn mark_submitted(&self) {
        self.submitted.store(true, Relaxed);
    }

    /// The host acknowledged the PUT (and placed it `at` in the mapped arena): drop
    /// the bytes here.
    pub fn acked(&self, crc: u32, at: Option<Placement>) {
        let mut st = self.lock();
        if let State::Pending(_) = &*st {
            let s = crate::stats::get();
            Stats::add(&s.pending, -1);
            Stats::add(&s.pending_bytes, -len_i64(self.len));
            Stats::add(&s.offloaded_values, 1);
            Stats::add(&s.offloaded_bytes, len_i64(self.len));
            *st = State::Remote { crc, at };
        }
    }

    /// The PUT failed: keep the bytes in Redis.
    pub fn keep_local(&self) {
        let mut st = self.lock();
        if let State::Pending(b) = &*st {
            let b = b.clone();
            let s = crate::stats::get();
            Stats::add(&s.pending, -1);
            Stats::add(&s.pending_bytes, -len_i64(self.len));
            Stats::add(&s.inline_values, 1);
            *st = State::Local(b);
        }
    }

    /// Approximate bytes this value takes in Redis (MEMORY USAGE).
    pub fn mem_usage(&self) -> usize {
        let held = match &*self.lock() {
            State::Pending(b) | State::Local(b) => b.len(),
            _ => 0,
        };
        std::mem::size_of::<Slot>() + std::mem::size_of::<Stub>() + held
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let s = crate::stats::get();
        match &*self.lock() {
            State::Pending(_) => {
                Stats::add(&s.pending, -1);
                Stats::add(&s.pending_bytes, -len_i64(self.len));
            }
            State::Local(_) => Stats::add(&s.inline_values, -1),
            State::Remote { .. } => {
                Stats::add(&s.offloaded_values, -1);
                Stats::add(&s.offloaded_bytes, -len_i64(self.len));
            }
            State::Lost => Stats::add(&s.lost_values, -1),
            State::CopyOf(_) => {}
        }
        if self.submitted.load(Relaxed) {
            if let Some(flush) = ON_UNREFERENCED.get() {
                flush(self.oid);
            }
        }
    }
}

fn len_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A slot's state, locked inside the fork gate.
struct Locked<'a>(Option<MutexGuard<'a, State>>);

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.0
            .as_deref()
            .expect("a slot guard holds its lock until dropped")
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.0
            .as_deref_mut()
            .expect("a slot guard holds its lock until dropped")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        drop(self.0.take());
        fork_gate::leave();
    }
}

/// Slot locks and fork: a fork child (BGSAVE, AOF rewrite, full sync) reads every value
/// through its slot's mutex, and the I/O and reader threads lock slots all the time; a
/// fork while one of them holds one would leave that mutex locked forever in the
/// child. So every slot lock is taken inside a gate that the forking thread closes
/// first (`pthread_atfork` prepare): it waits until no thread holds a slot lock (each
/// holds one for a few instructions), forks, and opens the gate in parent and child.
pub mod fork_gate {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

    static CLOSED: AtomicBool = AtomicBool::new(false);
    static INSIDE: AtomicUsize = AtomicUsize::new(0);

    pub(super) fn enter() {
        loop {
            INSIDE.fetch_add(1, SeqCst);
            if !CLOSED.load(SeqCst) {
                return;
            }
            INSIDE.fetch_sub(1, SeqCst);
            while CLOSED.load(SeqCst) {
                std::thread::yield_now();
            }
        }
    }

    pub(super) fn leave() {
        INSIDE.fetch_sub(1, SeqCst);
    }

    /// Before fork (in the forking thread, which holds no slot lock): close the gate
    /// and wait for the threads inside to leave.
    pub fn close() {
        CLOSED.store(true, SeqCst);
        while INSIDE.load(SeqCst) > 0 {
            std::hint::spin_loop();
        }
    }

    /// After fork, in the parent and in the child.
    pub fn open() {
        CLOSED.store(false, SeqCst);
    }
}

/// The module value Redis stores for a utmem key.
#[derive(Debug, Clone)]
pub struct Stub(pub Arc<Slot>);

// SAFETY: `Stub` is the only type our data type stores (datatype.rs's callbacks take
// `Box<Stub>`).
unsafe impl crate::raw::ModuleValue for Stub {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A fork while another thread holds a slot's lock must not leave the lock held in
    /// the child: the forking thread waits at the gate. The other thread here holds the
    /// lock almost all the time (1 ms at a stretch), so without the gate the child
    /// would find it locked (and stay blocked forever).
    #[test]
    fn a_fork_never_inherits_a_held_slot_lock() {
        crate::raw::track_forks(fork_gate::close, fork_gate::open);
        let slot = Slot::pending(1, Bytes::from_static(b"value"));
        let stop = Arc::new(AtomicBool::new(false));
        let holder = {
            let (slot, stop) = (Arc::clone(&slot), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    let g = slot.lock();
                    std::thread::sleep(Duration::from_millis(1));
                    drop(g);
                }
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        for _ in 0..5 {
            // SAFETY: the child only polls an atomic-based try_lock and calls _exit.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                let t0 = Instant::now();
                let free = loop {
                    if slot.state.try_lock().is_ok() {
                        break true;
                    }
                    if t0.elapsed() > Duration::from_millis(500) {
                        break false;
                    }
                };
                // SAFETY: ends only the child.
                unsafe { libc::_exit(i32::from(!free)) };
            }
            let mut status = 0;
            // SAFETY: waits for the child we just forked.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "the fork child found the slot locked"
            );
        }
        stop.store(true, Relaxed);
        holder.join().expect("holder");
    }
}
