//! Reading values straight from the host's arena (local Unix sockets only).
//!
//! On connect, a client that asks for it sends MAP and receives the identity's
//! arena memfd, which it maps read-only. PUT replies then say where each value
//! was placed ([`Placement`]), and a GET of that value reads the mapping in place:
//! the client makes its reader word odd, checks the value's stamp, uses the bytes and
//! makes the word even (the host never reuses space a reader may be in; see
//! [`Placement`]). A value the host dropped, evicted or replaced has no valid stamp
//! and is never returned: the caller asks over the socket instead.

// Offsets are u64 on the wire and usize in memory; every offset cast here was
// checked to lie inside a mapping, whose length is a usize.
#![allow(clippy::cast_possible_truncation)]

use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};

use utmem_proto::{
    Limits, MapReply, Op, Placement, ReplyHeader, RequestHeader, RequestId, Status,
    ARENA_HEADER_LEN, REPLY_HEADER_LEN,
};
use utmem_sys::{self as sys, Mmap};

/// A read-only mapping of the host's arena for this client's identity.
#[derive(Debug)]
pub struct Mapped {
    map: Mmap,
    /// Pages below this offset were populated before: space the host reuses is
    /// already in our page tables (unless the host punched it since: a minor fault).
    populated_to: AtomicU64,
    /// This connection's reader word (a page; the u64 at its start).
    word: Mmap,
}

impl Mapped {
    /// Sends MAP on a socket nobody else reads yet and maps what comes back.
    pub fn open(mut sock: &UnixStream, limits: &Limits) -> io::Result<Mapped> {
        sock.write_all(&RequestHeader::new(Op::Map, RequestId(0)).encode())?;
        let fd = sock.as_fd();
        let mut buf = [0u8; REPLY_HEADER_LEN + MapReply::LEN];
        let mut got = 0;
        let mut fds: Vec<OwnedFd> = Vec::new();
        // The header alone first: a refusal has no payload (and no descriptor).
        let mut want = REPLY_HEADER_LEN;
        while got < want {
            let (n, f) = sys::recv_with_fds(fd, &mut buf[got..want])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            fds.extend(f);
            got += n;
            if got == REPLY_HEADER_LEN {
                let mut hb = [0u8; REPLY_HEADER_LEN];
                hb.copy_from_slice(&buf[..REPLY_HEADER_LEN]);
                let h = ReplyHeader::decode(&hb, limits)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if h.op != Op::Map || h.status != Status::Ok {
                    return Err(io::Error::other(format!("MAP refused: {:?}", h.status)));
                }
                want = buf.len();
            }
        }
        let reply = MapReply::decode(&buf[REPLY_HEADER_LEN..])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let [arena, word] = <[OwnedFd; 2]>::try_from(fds).map_err(|f| {
            io::Error::other(format!(
                "MAP reply came with {} descriptors, not 2",
                f.len()
            ))
        })?;
        let len = usize::try_from(reply.len).map_err(io::Error::other)?;
        Ok(Mapped {
            map: Mmap::new(arena.as_fd(), len, false)?,
            populated_to: AtomicU64::new(0),
            word: Mmap::new(word.as_fd(), 4096, true)?,
        })
    }

    fn word(&self) -> &AtomicU64 {
        // SAFETY: a page-aligned shared page of our own; its first u64 is only
        // accessed atomically (here and by the host).
        unsafe { AtomicU64::from_ptr(self.word.as_ptr().cast::<u64>()) }
    }

    /// Runs `f` on the value placed at `p` (`len` bytes), in place in the mapping;
    /// `None` if it is not there any more. The host does not reuse the bytes while `f`
    /// runs, so keep `f` short (a copy into a reply).
    pub fn with_value<R>(&self, p: Placement, len: usize, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let end = p
            .offset
            .checked_add(ARENA_HEADER_LEN)?
            .checked_add(len as u64)?;
        if end > self.map.len() as u64 || !p.offset.is_multiple_of(8) {
            return None;
        }
        let base = self.map.as_ptr();
        let off = p.offset as usize;
        let word = self.word();
        word.fetch_add(1, Ordering::SeqCst);
        // SAFETY: `off` is 8-aligned and `off + 16 + len` is inside the mapping (checked
        // above); the stamp is only ever written atomically by the host.
        let stamp = unsafe { AtomicU64::from_ptr(base.add(off).cast::<u64>()) };
        // SAFETY: in bounds as above, written by the host before the stamp.
        let ok = stamp.load(Ordering::SeqCst) == p.stamp
            && unsafe { base.add(off + 8).cast::<u64>().read_volatile() } == len as u64;
        let r =
            ok.then(|| {
                // SAFETY: `len` bytes inside the mapping, published with the stamp we just
                // saw; our odd reader word keeps the host from reusing them until we are done.
                f(unsafe {
                    std::slice::from_raw_parts(base.add(off + ARENA_HEADER_LEN as usize), len)
                })
            });
        word.fetch_add(1, Ordering::Release);
        r
    }

    /// Copies the value placed at `p` (`len` bytes) into `out`; false if it is not
    /// there any more (or never was).
    pub fn read_into(&self, p: Placement, len: usize, out: &mut Vec<u8>) -> bool {
        self.with_value(p, len, |b| {
            out.clear();
            out.extend_from_slice(b);
        })
        .is_some()
    }

    /// Maps the pages of the value placed at `p` into this process's page tables
    /// (MADV_POPULATE_READ), so that a later read takes no page faults; only pages
    /// beyond what was populated before (the host reuses low space first), so a PUT
    /// into reused space costs no system call. A hint: errors (an older kernel, a bad
    /// placement) are ignored.
    pub fn populate(&self, p: Placement, len: u64) {
        let Some(end) = p.offset.checked_add(ARENA_HEADER_LEN + len) else {
            return;
        };
        let end = end.min(self.map.len() as u64);
        let before = self.populated_to.fetch_max(end, Ordering::Relaxed);
        let start = p.offset.max(before) / 4096 * 4096;
        if start >= end {
            return;
        }
        // SAFETY: the range lies inside our mapping (clamped above); POPULATE_READ only
        // faults pages in for reading, it never changes their contents.
        unsafe {
            libc::madvise(
                self.map.as_ptr().add(start as usize).cast(),
                (end - start) as usize,
                libc::MADV_POPULATE_READ,
            )
        };
    }
}
