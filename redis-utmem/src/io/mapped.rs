//! Reads straight from the host's mapped arena (no round trip), for values the host
//! placed there.

use bytes::Bytes;
use utmem_client::proto::Placement;
use utmem_client::Client;

use super::shared::{in_parent, shared};
use crate::slot::{Read, Slot};
use crate::stats::Stats;

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
    let stats = crate::stats::get();
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

/// Like [`Slot::read`], but a remote value of at most `mapped_max` bytes that sits in
/// the mapped arena is copied from there (no round trip).
pub fn read_near(slot: &Slot, mapped_max: usize) -> Read {
    match read_mapped(slot, mapped_max) {
        Some(b) => Read::Here(b),
        None => slot.read(),
    }
}
