//! The module's shared-memory channel to the host (a local Unix transport whose host
//! offers one, and `channel yes`): UTMEM.SET's PUT is a copy into staging and a
//! descriptor in the ring, made on Redis's main thread, with no I/O thread, no reader
//! thread and (while the host is awake) no system call.
//!
//! Acknowledgement (`set-ack host`): the SET replies once its descriptor is published
//! in the ring. Until the host's completion arrives the slot stays *pending* and
//! Redis serves it from its own copy; a completion turns it remote (its bytes are
//! dropped), NO_SPACE (or any refusal) turns it local, and so does a channel that dies
//! (the host went away, or the connection it belonged to ended): nothing answered +OK
//! is ever lost.
//!
//! Completions are drained on the main thread, before Redis sleeps (the event loop's
//! before-sleep event); with requests in flight a 1 ms timer bounds that sleep, so
//! the host never has to wake Redis up (its *complete* eventfd, watched by Redis's
//! event loop, only says that the host ended the channel). The host is kicked once
//! per batch, and only if it said it is going to sleep. Values larger than half of staging, a full
//! ring, a fork child, `on-host-down error` (whose SETs wait for the host's answer)
//! and `channel no` use the socket path as before.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

use utmem_client::proto::{Key, Placement, PoolId, Status};
use utmem_client::Channel;

use super::shared::{remember_for_retry, shared};
use super::socket::{send, Job};
use crate::slot::Slot;
use crate::stats::Stats;

/// What a request in the ring is for.
enum Work {
    Put { slot: Arc<Slot>, crc: u32 },
    Flush(u64),
}

struct Live {
    ch: Arc<Channel>,
    gen: u64,
    pool: PoolId,
    /// Requests in the ring, in submission order (completions come in that order).
    inflight: VecDeque<(u64, Work)>,
    /// Watched by Redis's event loop.
    watched: bool,
    /// Requests were published since the last look at the host's wake-up flag.
    unkicked: bool,
}

static LIVE: Mutex<Option<Live>> = Mutex::new(None);
/// A fork child is running: FLUSHes wait (on the I/O thread) until it is gone.
static FORK_RUNNING: AtomicBool = AtomicBool::new(false);
/// Whether the last look found a usable channel (INFO).
static IN_USE: AtomicBool = AtomicBool::new(false);
/// Requests sent through the channel, and host kicks.
pub static SUBMITTED: AtomicU64 = AtomicU64::new(0);
/// Times the host was kicked.
pub static KICKS: AtomicU64 = AtomicU64::new(0);

fn lock() -> std::sync::MutexGuard<'static, Option<Live>> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether UTMEM.SET's PUTs go through a channel now (for INFO: `path:channel`).
pub fn in_use() -> bool {
    IN_USE.load(Relaxed)
}

/// A fork child was born (`true`) or died.
pub fn set_fork_running(running: bool) {
    FORK_RUNNING.store(running, Relaxed);
}

/// Slots let go of while [`LIVE`] is held: dropped after it is released, since the
/// last reference's drop sends a FLUSH, which takes the lock again.
type Grave = Vec<Arc<Slot>>;

/// Gives up on requests of a channel that died: their values stay in Redis (and are
/// offered again later); their FLUSHes go over the socket.
fn abandon(live: Live, grave: &mut Grave) {
    if live.watched {
        crate::raw::unwatch(live.ch.complete_fd().as_raw_fd());
    }
    live.ch.abandon();
    for (_, w) in live.inflight {
        match w {
            Work::Put { slot, .. } => {
                fall_back(&slot, false);
                grave.push(slot);
            }
            Work::Flush(oid) => send(Job::Flush(oid)),
        }
    }
}

fn fall_back(slot: &Arc<Slot>, full: bool) {
    if slot.first_fallback() {
        let s = crate::stats::get();
        Stats::bump(if full {
            &s.no_space_fallbacks
        } else {
            &s.host_down_fallbacks
        });
    }
    slot.keep_local();
    remember_for_retry(slot);
}

/// The live channel, after switching to the client's current one if the connection
/// changed (the old one's requests are abandoned). Main thread or any thread.
fn current<'a>(g: &'a mut Option<Live>, grave: &mut Grave) -> Option<&'a mut Live> {
    let shared = shared()?;
    let now = shared.client.channel();
    let same = match (&*g, &now) {
        (Some(l), Some((ch, gen))) => l.gen == *gen && Arc::ptr_eq(&l.ch, ch) && !ch.is_dead(),
        _ => false,
    };
    if !same {
        if let Some(old) = g.take() {
            abandon(old, grave);
        }
        if let Some((ch, gen)) = now.filter(|(ch, _)| !ch.is_dead()) {
            let pool = shared.client.pool_id(shared.pool)?;
            *g = Some(Live {
                ch,
                gen,
                pool,
                inflight: VecDeque::new(),
                watched: false,
                unkicked: false,
            });
        }
    }
    IN_USE.store(g.is_some(), Relaxed);
    g.as_mut()
}

/// The channel to publish in: the one in use (its liveness is checked before each
/// sleep, in [`before_sleep`]; requests published in a channel that died meanwhile are
/// abandoned there), or the client's current one.
fn for_publishing<'a>(g: &'a mut Option<Live>, grave: &mut Grave) -> Option<&'a mut Live> {
    if g.is_some() {
        return g.as_mut();
    }
    current(g, grave)
}

fn usable() -> bool {
    crate::config::CHANNEL.load(Relaxed) && !crate::raw::in_fork_child()
}

/// Publishes `slot`'s PUT in the channel: `Ok` if it is in the ring (the SET may reply
/// now), else the slot back for the socket path.
pub fn put(slot: Arc<Slot>) -> Result<(), Arc<Slot>> {
    // `on-host-down error` needs the host's answer before the reply: the socket path.
    if !usable() || crate::config::error_when_down() {
        return Err(slot);
    }
    // Bytes waiting for the host (this value's included) stay within
    // `max-pending-bytes`: beyond it, the socket path waits for the host.
    let cap = crate::config::MAX_PENDING_BYTES.load(Relaxed);
    if cap > 0 && crate::stats::get().pending_bytes.load(Relaxed) > cap {
        return Err(slot);
    }
    let mut grave = Grave::new();
    let mut g = lock();
    let Some(live) = for_publishing(&mut g, &mut grave) else {
        drop(g);
        drop(grave);
        return Err(slot);
    };
    if slot.len as u64 > live.ch.max_payload() {
        return Err(slot);
    }
    let Some(bytes) = slot.take_for_put() else {
        return Ok(()); // remote already: nothing to send
    };
    let crc = crc32fast::hash(&bytes);
    match live.ch.put(live.pool, Key::new(slot.oid, 0), &bytes) {
        Some(id) => {
            live.inflight.push_back((id, Work::Put { slot, crc }));
            live.unkicked = true;
            SUBMITTED.fetch_add(1, Relaxed);
            Ok(())
        }
        None => Err(slot),
    }
    // (`grave` is dropped after `g`: locals drop in reverse order.)
}

/// Sends a FLUSH of `oid` through the channel; false if the caller must use the socket
/// (no channel, or a fork child may still read the value).
pub fn flush(oid: u64) -> bool {
    if !usable() || FORK_RUNNING.load(Relaxed) {
        return false;
    }
    let mut grave = Grave::new();
    let mut g = lock();
    let Some(live) = for_publishing(&mut g, &mut grave) else {
        return false;
    };
    match live.ch.flush(live.pool, Key::new(oid, 0)) {
        Some(id) => {
            live.inflight.push_back((id, Work::Flush(oid)));
            live.unkicked = true;
            SUBMITTED.fetch_add(1, Relaxed);
            true
        }
        None => false,
    }
}

/// Applies what completed. Main thread (slots turn remote there, so Redis frees the
/// bytes it no longer needs on its own thread).
fn drain(live: &mut Live, grave: &mut Grave) {
    let mut done = Vec::new();
    live.ch.drain(|c| done.push(c));
    for c in done {
        let Some((id, work)) = live.inflight.pop_front() else {
            break;
        };
        debug_assert_eq!(id, c.id, "the channel checks the order");
        match work {
            Work::Put { slot, crc } => {
                match c.status {
                    Status::Ok => {
                        let at = (c.arg1 != 0).then_some(Placement {
                            offset: c.arg0,
                            stamp: c.arg1,
                        });
                        slot.acked(crc, at);
                    }
                    s => fall_back(&slot, matches!(s, Status::NoSpace | Status::TooLarge)),
                }
                grave.push(slot);
            }
            Work::Flush(_) => {}
        }
    }
}

/// A wake-up timer is set (see [`before_sleep`]).
static TIMER_SET: AtomicBool = AtomicBool::new(false);
/// How long Redis may sleep with requests in flight before it looks at the ring again.
const LOOK_AGAIN: std::time::Duration = std::time::Duration::from_millis(1);

/// Before Redis sleeps: applies completions and kicks the host once for everything
/// published since (only if it said it is going to sleep). With requests still in
/// flight, a 1 ms timer makes sure Redis looks again even if nothing else wakes it;
/// under load something always does first, so completions never cost a wake-up.
pub fn before_sleep(ctx: &redis_module::Context) {
    if !usable() {
        return;
    }
    let mut grave = Grave::new();
    let mut g = lock();
    let Some(live) = current(&mut g, &mut grave) else {
        return;
    };
    if !live.watched {
        live.watched = crate::raw::watch_readable(live.ch.complete_fd().as_raw_fd(), on_kick);
    }
    drain(live, &mut grave);
    if std::mem::take(&mut live.unkicked) && live.ch.kick() {
        KICKS.fetch_add(1, Relaxed);
    }
    let waiting = !live.inflight.is_empty();
    drop(g);
    if waiting && !TIMER_SET.swap(true, Relaxed) {
        ctx.create_timer(LOOK_AGAIN, |_, ()| TIMER_SET.store(false, Relaxed), ());
    }
}

/// The host kicked the *complete* eventfd.
fn on_kick() {
    let mut grave = Grave::new();
    let mut g = lock();
    if let Some(live) = g.as_mut() {
        live.ch.clear_wakeup();
        drain(live, &mut grave);
    }
    drop(g);
}
