//! Reading values straight from the host's arena (local Unix sockets only).
//!
//! On connect, a client that asks for it sends MAP and receives the identity's
//! arena memfd, which it maps read-only. PUT replies then say where each value
//! was placed ([`Placement`]), and a GET of that value is a copy out of the
//! mapping, checked with the value's stamp before and after (see `ARENA_HEADER_LEN`
//! in utmem-proto): a value the host dropped, evicted or reused is never returned,
//! the caller falls back to asking over the socket.

// Offsets are u64 on the wire and usize in memory; every offset cast here was
// checked to lie inside a mapping, whose length is a usize.
#![allow(clippy::cast_possible_truncation)]

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU64, Ordering};

use bytes::Bytes;
use utmem_proto::{
    Limits, MapReply, Op, Placement, ReplyHeader, RequestHeader, RequestId, Status,
    ARENA_HEADER_LEN, REPLY_HEADER_LEN,
};
use utmem_sys::{self as sys, Mmap};

/// A read-only mapping of the host's arena for this client's identity.
#[derive(Debug)]
pub struct Mapped {
    map: Mmap,
}

impl Mapped {
    /// Sends MAP on a socket nobody else reads yet and maps what comes back.
    pub fn open(sock: impl AsFd, limits: &Limits) -> io::Result<Mapped> {
        let fd = sock.as_fd();
        let req = RequestHeader::new(Op::Map, RequestId(0)).encode();
        let mut sent = 0;
        while sent < req.len() {
            sent += nix::unistd::write(fd, &req[sent..])?;
        }
        let mut buf = [0u8; REPLY_HEADER_LEN + MapReply::LEN];
        let mut got = 0;
        let mut memfd: Option<OwnedFd> = None;
        // The header alone first: a refusal has no payload (and no descriptor).
        let mut want = REPLY_HEADER_LEN;
        while got < want {
            let (n, f) = sys::recv_with_fd(fd, &mut buf[got..want])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            memfd = memfd.or(f);
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
        let memfd = memfd.ok_or_else(|| io::Error::other("MAP reply came without a descriptor"))?;
        let len = usize::try_from(reply.len).map_err(io::Error::other)?;
        Ok(Mapped {
            map: Mmap::new(memfd.as_fd(), len, false)?,
        })
    }

    /// Copies the value placed at `p` (`len` bytes) into `out`; false if it is not
    /// there any more (or never was): then `out` holds nothing meaningful.
    pub fn read_into(&self, p: Placement, len: usize, out: &mut Vec<u8>) -> bool {
        let Some(end) = p
            .offset
            .checked_add(ARENA_HEADER_LEN)
            .and_then(|o| o.checked_add(len as u64))
        else {
            return false;
        };
        if end > self.map.len() as u64 || !p.offset.is_multiple_of(8) {
            return false;
        }
        let base = self.map.as_ptr();
        let off = p.offset as usize;
        // SAFETY: `off` is 8-aligned and `off + 16 + len` is inside the mapping (checked
        // above); the stamp is only ever written atomically by the host.
        let stamp = unsafe { AtomicU64::from_ptr(base.add(off).cast::<u64>()) };
        if stamp.load(Ordering::Acquire) != p.stamp {
            return false;
        }
        // SAFETY: in bounds as above; a torn read is caught by the stamp check below.
        let hlen = unsafe { base.add(off + 8).cast::<u64>().read_volatile() };
        if hlen != len as u64 {
            return false;
        }
        out.clear();
        out.reserve(len);
        // SAFETY: source: `len` bytes inside the mapping (checked above), written by
        // the host before it published the stamp we saw, and possibly being rewritten
        // if the host released the value since, which the second stamp check detects.
        // Destination: `out` has capacity for `len` bytes and does not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                base.add(off + ARENA_HEADER_LEN as usize),
                out.as_mut_ptr(),
                len,
            );
            out.set_len(len);
        }
        fence(Ordering::Acquire);
        stamp.load(Ordering::Relaxed) == p.stamp
    }

    /// Maps the pages of the value placed at `p` into this process's page tables
    /// (MADV_POPULATE_READ), so that a later read takes no page faults. A hint: errors
    /// (an older kernel, a bad placement) are ignored.
    pub fn populate(&self, p: Placement, len: u64) {
        let Some(end) = p.offset.checked_add(ARENA_HEADER_LEN + len) else {
            return;
        };
        let end = end.min(self.map.len() as u64);
        let start = p.offset / 4096 * 4096;
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

    /// The value placed at `p` as new `Bytes`, or `None` if it is not there any more.
    pub fn read(&self, p: Placement, len: usize) -> Option<Bytes> {
        let mut v = Vec::new();
        self.read_into(p, len, &mut v).then(|| Bytes::from(v))
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
