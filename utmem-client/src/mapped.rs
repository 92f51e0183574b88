//! Reading values straight from the host's arena (local Unix sockets only).
//!
//! On connect, a client that asks for it sends MAP and receives the identity's
//! arena memfd and a reader-word memfd. Both must be sealed against shrinking and
//! growing and at least as long as announced, or nothing is mapped (a process that
//! binds the socket path must not be able to make us fault with SIGBUS). PUT
//! replies then say where each value was placed ([`Placement`]), and a read of that
//! value takes it from the mapping: enter as a reader, check the value's stamp, copy
//! the bytes with volatile reads ([`VolatileSlice`]: the host may change the memory
//! at any time, so no `&[u8]` to it is ever made), check the stamp again, leave. A
//! value the host dropped, evicted or replaced has no valid stamp and is never
//! returned: the caller asks over the socket instead. The layout, the stamp check and
//! the reader-word protocol are [`utmem_proto::arena`]'s; this module adds the
//! mapping checks and the counting of our own threads.
//!
//! # The reader word, with many threads
//!
//! The host parks released space while the connection's one reader word is odd and
//! unchanged since the release. So the word must be odd while *any* thread of ours
//! is inside a value, and must not change while one is: a second reader that bumped
//! it would tell the host the first one had left. The threads therefore count
//! themselves in private memory ([`Mapped::readers`]) and only the first one in
//! (0 → 1) and the last one out (1 → 0) move the word, each with one increment;
//! while a transition is in flight, others wait a few spins and otherwise give up
//! (the caller then reads over the socket). A busy period admits a bounded number of
//! entries, so overlapping readers cannot keep the word odd, and the host's space
//! parked, for ever.

// Offsets are u64 on the wire and usize in memory; every offset cast here was
// checked to lie inside a mapping, whose length is a usize.
#![allow(clippy::cast_possible_truncation)]

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};

use utmem_proto::arena::{value_end, ArenaMem, ReaderWordMem, READER_WORD_LEN};
use utmem_proto::{
    Limits, MapReply, Op, Placement, ReplyHeader, RequestHeader, RequestId, Status,
    REPLY_HEADER_LEN,
};
use utmem_sys as sys;
use vm_memory::{FileOffset, MmapRegion, VolatileSlice};

/// `readers`: threads inside a value now (low 32 bits).
const COUNT: u64 = 0xffff_ffff;
/// `readers`: one entry admitted in this busy period (bits 32..62).
const ENTRY: u64 = 1 << 32;
/// `readers`: the first reader in or the last one out is moving the shared word.
const TRANSITION: u64 = 1 << 63;
/// Entries one busy period admits; later ones wait for it to end (or give up).
const PERIOD_ENTRIES: u64 = 1024;
/// Spins a reader waits for a transition or the end of a busy period.
const SPINS: u32 = 256;

/// A read-only mapping of the host's arena for this client's identity.
#[derive(Debug)]
pub struct Mapped {
    arena: ArenaMem,
    /// Pages below this offset were populated before: space the host reuses is
    /// already in our page tables (unless the host punched it since: a minor fault).
    populated_to: AtomicU64,
    /// This connection's reader word, shared with the host.
    word: ReaderWordMem,
    /// Private: readers inside now, entries admitted in this busy period, and whether
    /// the shared word is being moved (see the module docs).
    readers: AtomicU64,
    /// The guest device whose slot the reader word is (held open: closing it gives
    /// the slot back).
    _device: Option<std::sync::Arc<crate::device::Device>>,
}

/// Why a MAP was not taken.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The socket failed or the host refused.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The host sent a descriptor that could fault a reader (not sealed, too short).
    #[error("unsafe {what} descriptor: {why}")]
    Unsafe {
        /// "arena" or "reader word".
        what: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

impl Mapped {
    /// Sends MAP on a socket nobody else reads yet and maps what comes back, after
    /// checking that neither descriptor can shrink under us.
    pub fn open(sock: &UnixStream, limits: &Limits) -> Result<Mapped, MapError> {
        let (payload, fds) = request_fds(sock, Op::Map, MapReply::LEN, limits)?;
        let reply = MapReply::decode(&payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let [arena, word] = <[OwnedFd; 2]>::try_from(fds).map_err(|f| {
            io::Error::other(format!(
                "MAP reply came with {} descriptors, not 2",
                f.len()
            ))
        })?;
        let len = usize::try_from(reply.len).map_err(io::Error::other)?;
        Ok(Mapped {
            arena: ArenaMem::new(map_sealed(arena, len, false, "arena")?),
            populated_to: AtomicU64::new(0),
            word: map_word(word)?,
            readers: AtomicU64::new(0),
            _device: None,
        })
    }

    /// A mapping made elsewhere (the guest device's): the arena and this client's
    /// reader word.
    pub(crate) fn from_parts(
        arena: ArenaMem,
        word: ReaderWordMem,
        device: std::sync::Arc<crate::device::Device>,
    ) -> Mapped {
        Mapped {
            arena,
            populated_to: AtomicU64::new(0),
            word,
            readers: AtomicU64::new(0),
            _device: Some(device),
        }
    }

    /// Enters as a reader; false if the word is busy changing hands for longer than a
    /// few spins, or this busy period admitted its share (the caller reads over the
    /// socket instead).
    fn enter(&self) -> bool {
        for _ in 0..SPINS {
            let s = self.readers.load(Ordering::SeqCst);
            let count = s & COUNT;
            let entries = (s & !TRANSITION) >> 32;
            if s & TRANSITION != 0 || (count > 0 && entries >= PERIOD_ENTRIES) || count == COUNT {
                std::hint::spin_loop();
                continue;
            }
            if count == 0 {
                // First one in: make the word odd, then let the others join.
                if self
                    .readers
                    .compare_exchange(
                        s,
                        TRANSITION | ENTRY | 1,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    )
                    .is_ok()
                {
                    self.word.enter();
                    self.readers.store(ENTRY | 1, Ordering::SeqCst);
                    return true;
                }
            } else if self
                .readers
                .compare_exchange(s, s + ENTRY + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                // The word is odd (no transition in flight and someone inside): join.
                return true;
            }
        }
        false
    }

    /// Leaves; the last one out makes the word even.
    fn exit(&self) {
        loop {
            let s = self.readers.load(Ordering::SeqCst);
            // We are inside, so nobody else can be moving the word now.
            debug_assert!(s & TRANSITION == 0 && s & COUNT > 0);
            if s & COUNT == 1 {
                if self
                    .readers
                    .compare_exchange(s, TRANSITION, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    self.word.leave();
                    self.readers.store(0, Ordering::SeqCst);
                    return;
                }
            } else if self
                .readers
                .compare_exchange(s, s - 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return;
            }
        }
    }

    /// Runs `f` on the value placed at `p` (`len` bytes) as volatile memory; `None`
    /// if it is not there (or the readers are busy), and also `None` if its stamp
    /// changed by the time `f` returned: whatever `f` did with the bytes must then be
    /// thrown away. The host keeps the space while `f` runs, so keep `f` short.
    pub fn with_value<R>(
        &self,
        p: Placement,
        len: usize,
        f: impl FnOnce(VolatileSlice<'_>) -> R,
    ) -> Option<R> {
        let value = self.arena.value(p, len)?;
        if !self.enter() {
            return None;
        }
        let _inside = Inside(self);
        if !value.is_current() {
            return None;
        }
        let r = f(value.bytes());
        value.still_current().then_some(r)
    }

    /// Copies the value placed at `p` (`len` bytes) into `out` (reusing its
    /// allocation); false if it is not there any more (or never was), and then
    /// `out` holds nothing useful.
    pub fn read_into(&self, p: Placement, len: usize, out: &mut Vec<u8>) -> bool {
        // Grows (and zeroes) only past what `out` held before; a reused buffer is not
        // written twice.
        out.resize(len, 0);
        self.with_value(p, len, |b| b.copy_to(&mut out[..]) == len)
            .unwrap_or(false)
    }

    /// Maps the pages of the value placed at `p` into this process's page tables
    /// (MADV_POPULATE_READ), so that a later read takes no page faults; only pages
    /// beyond what was populated before (the host reuses low space first), so a PUT
    /// into reused space costs no system call. A hint: errors (an older kernel, a bad
    /// placement) are ignored.
    pub fn populate(&self, p: Placement, len: u64) {
        let Some(end) = value_end(p.offset, len) else {
            return;
        };
        let end = end.min(self.arena.len());
        let before = self.populated_to.fetch_max(end, Ordering::Relaxed);
        let start = p.offset.max(before) / 4096 * 4096;
        if start >= end {
            return;
        }
        // SAFETY: the range lies inside our mapping (clamped above; the mapping is
        // page-aligned); POPULATE_READ only faults pages in for reading, it never
        // changes their contents, and the file cannot shrink (sealed, checked).
        unsafe {
            libc::madvise(
                self.arena.region().as_ptr().add(start as usize).cast(),
                (end - start) as usize,
                libc::MADV_POPULATE_READ,
            )
        };
    }
}

/// Leaves the reader count when dropped (also when `f` panics).
struct Inside<'a>(&'a Mapped);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.0.exit();
    }
}

/// Maps a reader word's page read-write, after the same checks as the arena.
fn map_word(fd: OwnedFd) -> Result<ReaderWordMem, MapError> {
    let map = map_sealed(fd, READER_WORD_LEN, true, "reader word")?;
    ReaderWordMem::new(map).ok_or_else(|| MapError::Unsafe {
        what: "reader word",
        why: "shorter than a page".into(),
    })
}

/// Maps `fd` (`len` bytes, shared) after checking that it is sealed against shrinking
/// and growing and at least `len` bytes long: a file that could shrink would turn our
/// reads into SIGBUS.
/// Sends `op` (no payload) on a socket nobody else reads yet and reads its reply: the
/// `reply_len`-byte payload and the descriptors that came with it (SCM_RIGHTS). A
/// refusal is an error (it has no payload and no descriptor).
pub(crate) fn request_fds(
    mut sock: &UnixStream,
    op: Op,
    reply_len: usize,
    limits: &Limits,
) -> Result<(Vec<u8>, Vec<OwnedFd>), MapError> {
    sock.write_all(&RequestHeader::new(op, RequestId(0)).encode())?;
    let mut buf = vec![0u8; REPLY_HEADER_LEN + reply_len];
    let mut got = 0;
    let mut fds: Vec<OwnedFd> = Vec::new();
    // The header alone first: a refusal has no payload (and no descriptor).
    let mut want = REPLY_HEADER_LEN;
    while got < want {
        let (n, f) = sys::recv_with_fds(sock.as_fd(), &mut buf[got..want])?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        fds.extend(f);
        got += n;
        if got == REPLY_HEADER_LEN {
            let mut hb = [0u8; REPLY_HEADER_LEN];
            hb.copy_from_slice(&buf[..REPLY_HEADER_LEN]);
            let h = ReplyHeader::decode(&hb, limits)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if h.op != op || h.status != Status::Ok {
                let name = format!("{op:?}").to_uppercase();
                return Err(io::Error::other(format!("{name} refused: {}", h.status)).into());
            }
            want = buf.len();
        }
    }
    buf.drain(..REPLY_HEADER_LEN);
    Ok((buf, fds))
}

/// Checks that `fd` is a memfd sealed against shrinking and growing and at least
/// `len` bytes long, so that a mapping of it can never fault under us.
pub(crate) fn check_sealed(fd: &OwnedFd, len: u64, what: &'static str) -> Result<(), MapError> {
    let bad = |why: String| MapError::Unsafe { what, why };
    let need = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    let seals = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GET_SEALS)
        .map_err(|e| bad(format!("cannot read its seals ({e}): not a sealable memfd")))?;
    if seals & need != need {
        return Err(bad(format!(
            "seals {seals:#x} lack F_SEAL_SHRINK|F_SEAL_GROW"
        )));
    }
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| bad(format!("fstat: {e}")))?;
    let size = u64::try_from(st.st_size).unwrap_or(0);
    if size < len {
        return Err(bad(format!("{size} bytes, {len} announced")));
    }
    if len == 0 {
        return Err(bad("empty".into()));
    }
    Ok(())
}

fn map_sealed(
    fd: OwnedFd,
    len: usize,
    writable: bool,
    what: &'static str,
) -> Result<MmapRegion, MapError> {
    check_sealed(&fd, len as u64, what)?;
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    MmapRegion::build(
        Some(FileOffset::new(File::from(fd), 0)),
        len,
        prot,
        libc::MAP_SHARED,
    )
    .map_err(|e| MapError::Io(io::Error::other(e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64, seals: i32) -> OwnedFd {
        // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor.
        let fd = unsafe { libc::memfd_create(c"utmem-test".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nothing else.
        let f = File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        f.set_len(len).expect("set_len");
        if seals != 0 {
            nix::fcntl::fcntl(
                f.as_raw_fd(),
                nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::from_bits_truncate(seals)),
            )
            .expect("seal");
        }
        OwnedFd::from(f)
    }

    fn mapped(arena_len: u64) -> Mapped {
        let s = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        Mapped {
            arena: ArenaMem::new(
                map_sealed(memfd(arena_len, s), arena_len as usize, false, "arena").expect("arena"),
            ),
            populated_to: AtomicU64::new(0),
            word: map_word(memfd(4096, s)).expect("word"),
            readers: AtomicU64::new(0),
            _device: None,
        }
    }

    #[test]
    fn only_sealed_long_enough_memfds_are_mapped() {
        let s = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        assert!(map_sealed(memfd(8192, s), 8192, false, "arena").is_ok());
        let e = map_sealed(memfd(8192, 0), 8192, false, "arena").expect_err("unsealed");
        assert!(e.to_string().contains("F_SEAL_SHRINK"), "{e}");
        let e = map_sealed(memfd(8192, libc::F_SEAL_GROW), 8192, false, "arena")
            .expect_err("may shrink");
        assert!(e.to_string().contains("lack"), "{e}");
        let e = map_sealed(memfd(4096, s), 8192, false, "arena").expect_err("short");
        assert!(e.to_string().contains("4096 bytes, 8192 announced"), "{e}");
        let file = tempfile::tempfile().expect("tmp");
        file.set_len(8192).expect("len");
        assert!(map_sealed(OwnedFd::from(file), 8192, false, "arena").is_err());
    }

    /// The word the host sees: odd exactly while someone is inside, unchanged while
    /// readers overlap, and moved on once the last one left.
    #[test]
    fn overlapping_readers_keep_the_word_odd_and_unchanged() {
        let m = mapped(8192);
        let w = || m.word.load();
        assert_eq!(w(), 0);
        assert!(m.enter());
        let v = w();
        assert_eq!(v % 2, 1);
        assert!(m.enter()); // a second thread joins
        assert_eq!(w(), v, "a joining reader must not move the word");
        m.exit(); // the first one leaves; the second is still inside
        assert_eq!(w(), v, "still inside: the host must keep parking");
        m.exit();
        assert_eq!(w() % 2, 0);
        assert!(m.enter());
        assert_ne!(w(), v, "a new busy period has a new odd value");
        m.exit();
        assert_eq!(m.readers.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_busy_period_admits_a_bounded_number_of_entries() {
        let m = mapped(8192);
        assert!(m.enter()); // one reader stays inside throughout
        for _ in 1..PERIOD_ENTRIES {
            assert!(m.enter());
            m.exit();
        }
        assert!(
            !m.enter(),
            "the period is full: later readers use the socket"
        );
        m.exit();
        assert!(m.enter(), "a new period starts once everyone left");
        m.exit();
    }

    #[test]
    fn many_threads_keep_the_count_exact() {
        let m = std::sync::Arc::new(mapped(8192));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = std::sync::Arc::clone(&m);
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if m.enter() {
                            assert_eq!(m.word.load() % 2, 1, "inside, odd");
                            m.exit();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(m.readers.load(Ordering::SeqCst), 0);
        assert_eq!(m.word.load() % 2, 0);
    }
}
