//! The value arena: one memfd per identity that local clients map read-only, so a
//! GET of a value placed there is a memory copy in the guest instead of a round trip.
//!
//! The layout (stamp, length, extents), the stamp protocol and the reader-word
//! protocol are described, and accessed, in [`utmem_proto::arena`], which clients
//! use too. What is here is the host's bookkeeping around them: allocation, parking
//! released space while a reader may still be in it, and revoking readers that stay.
//!
//! Each mapping connection gets its own reader word; a connection may MAP once. A
//! reader that never moves on keeps only its own identity's freed space parked, and
//! only while its connection lasts (plus a second's grace). Parked space is capped
//! (an eighth of the arena): past the cap, the words that pin the oldest parked
//! extents are revoked (no longer honoured) and the daemon drops their connections.
//!
//! Clients get a read-only descriptor of the arena (the memfd reopened read-only
//! through `/proc/self/fd`, the memfd itself then made mode 0), so their mapping
//! cannot be made writable and they cannot punch holes or write into it. That is why
//! the host may write value bytes through `&mut [u8]` into its own mapping, and hand
//! them out as [`Bytes`]: no other process can write that memory.
//!
//! The store keeps arena values as ordinary [`Bytes`] (`Bytes::from_owner`): the
//! extent is released when the last reference goes, so a socket GET in the middle
//! of a writev keeps the bytes alive. Free space is tracked with a best-fit map
//! that coalesces neighbours; freed pages go back to the kernel (punched holes) in
//! batches, so the host's memory follows what the arena holds. The file is sealed
//! against shrinking and growing: a client cannot make the host fault.

// Offsets are u64 on the wire and usize in memory; every offset cast here was
// checked to lie inside a mapping, whose length is a usize.
#![allow(clippy::cast_possible_truncation)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use utmem_proto::arena::{data_at, is_inside, ArenaMem, ReaderWordMem, READER_WORD_LEN};
pub use utmem_proto::extent_len;
use utmem_proto::Placement;
use vm_memory::{FileOffset, MmapRegion};

use super::lock;

/// Free ranges at least this long get their pages punched when the arena trims.
const PUNCH_MIN: u64 = 64 << 10;
const PAGE: u64 = 4096;

/// An identity's arena.
#[derive(Debug)]
pub struct Arena {
    file: Arc<File>,
    /// The same memfd, opened read-only: what clients receive.
    read_only: File,
    /// Our own read-write mapping of it.
    mem: ArenaMem,
    len: u64,
    next_stamp: AtomicU64,
    free: Mutex<FreeMap>,
    readers: Mutex<Vec<Arc<ReaderWord>>>,
}

/// One mapping connection's reader word (see the module docs).
#[derive(Debug)]
pub struct ReaderWord {
    file: Arc<File>,
    mem: ReaderWordMem,
    /// When the connection ended: the word is forgotten once it is even, or after
    /// [`CLOSED_GRACE`] whatever it says (a reader that is gone or misbehaves must not
    /// pin space or descriptors for ever).
    closed: Mutex<Option<Instant>>,
    /// Set when it pinned more parked space than the cap: no longer honoured; the
    /// connection that owns it is dropped.
    revoked: AtomicBool,
}

/// How long a reader word is honoured after its connection ended. A client drops its
/// mapping when it sees the connection end, after the read in progress.
const CLOSED_GRACE: Duration = Duration::from_secs(1);

impl ReaderWord {
    /// The memfd the client maps read-write.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The connection that owned it is gone.
    pub fn close(&self) {
        lock(&self.closed).get_or_insert_with(Instant::now);
    }

    /// True once the arena stopped honouring this word (it stayed odd while parked
    /// space grew past the cap): its connection must be dropped.
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Relaxed)
    }

    /// Whether a reader behind this word may still be inside the value it was in when
    /// the word read `v`.
    fn still_at(&self, v: u64) -> bool {
        self.mem.load() == v && !self.expired() && !self.is_revoked()
    }

    fn expired(&self) -> bool {
        lock(&self.closed).is_some_and(|t| t.elapsed() >= CLOSED_GRACE)
    }

    fn forgettable(&self) -> bool {
        self.is_revoked()
            || lock(&self.closed).is_some() && (!is_inside(self.mem.load()) || self.expired())
    }
}

/// A released extent that a reader may still be reading: the reader words that were
/// odd at release, with the values they had.
#[derive(Debug)]
struct Parked {
    off: u64,
    len: u64,
    busy: Vec<(Arc<ReaderWord>, u64)>,
}

impl Parked {
    fn still_busy(&self) -> bool {
        self.busy.iter().any(|(r, v)| r.still_at(*v))
    }
}

/// A sealed memfd of `len` bytes (it can neither shrink nor grow: a peer that maps it
/// cannot make us fault).
pub(crate) fn memfd(name: &str, len: u64) -> io::Result<File> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))?;
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(len)?;
    // Sealed against shrinking: a client that truncated it would make us fault.
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own; F_ADD_SEALS takes an int argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// `file` mapped shared and read-write, all `len` bytes of it.
fn map_shared(file: &Arc<File>, len: u64) -> io::Result<MmapRegion> {
    let size = usize::try_from(len).map_err(io::Error::other)?;
    MmapRegion::build(
        Some(FileOffset::from_arc(Arc::clone(file), 0)),
        size,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .map_err(|e| io::Error::other(e.to_string()))
}

/// `file` opened again, read-only, through `/proc/self/fd`; the memfd is then made
/// mode 0, so that a client cannot open it for writing that way either.
fn reopen_read_only(file: &File) -> io::Result<File> {
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let ro = std::fs::OpenOptions::new().read(true).open(path)?;
    // SAFETY: fchmod on a descriptor we own.
    if unsafe { libc::fchmod(file.as_raw_fd(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ro)
}

#[derive(Debug, Default)]
struct FreeMap {
    by_off: BTreeMap<u64, u64>,
    by_len: BTreeSet<(u64, u64)>,
    /// Bytes freed since the last trim.
    dirty: u64,
    /// Released extents a reader may still be reading, oldest first.
    parked: Vec<Parked>,
    /// Their bytes.
    parked_bytes: u64,
    /// Cap on `parked_bytes`.
    parked_cap: u64,
    /// Trim once `dirty` reaches this.
    trim_at: u64,
}

impl FreeMap {
    fn insert(&mut self, off: u64, len: u64) {
        self.by_off.insert(off, len);
        self.by_len.insert((len, off));
    }

    fn remove(&mut self, off: u64, len: u64) {
        self.by_off.remove(&off);
        self.by_len.remove(&(len, off));
    }

    /// Best fit: the shortest free range that holds `len`.
    fn take(&mut self, len: u64) -> Option<u64> {
        let &(have, off) = self.by_len.range((len, 0)..).next()?;
        self.remove(off, have);
        if have > len {
            self.insert(off + len, have - len);
        }
        Some(off)
    }

    /// Returns a range, merged with free neighbours.
    fn give(&mut self, mut off: u64, mut len: u64) {
        if let Some((&p, &plen)) = self.by_off.range(..off).next_back() {
            if p + plen == off {
                self.remove(p, plen);
                off = p;
                len += plen;
            }
        }
        if let Some(&nlen) = self.by_off.get(&(off + len)) {
            self.remove(off + len, nlen);
            len += nlen;
        }
        self.insert(off, len);
    }

    /// Gives back a released extent and counts it towards the next trim.
    fn release(&mut self, off: u64, len: u64) {
        self.give(off, len);
        self.dirty += len;
    }
}

impl Arena {
    /// A new arena of `len` bytes (rounded up to a power of two, as a PCI BAR
    /// exposing it to a VM would need). Pages are allocated only when written.
    pub fn new(name: &str, len: u64) -> io::Result<Arc<Arena>> {
        Self::with_prefix(name, len.max(1 << 20).next_power_of_two(), 0)
    }

    /// A new arena of `len` bytes (a power of two) whose first `prefix` bytes are
    /// never allocated: a guest device region keeps its header and channel slots
    /// there (see `utmem_proto::device`), and the whole memfd is the VM's BAR.
    pub fn with_prefix(name: &str, len: u64, prefix: u64) -> io::Result<Arc<Arena>> {
        if !len.is_power_of_two() || !prefix.is_multiple_of(PAGE) || prefix >= len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("arena of {len} bytes with a {prefix}-byte prefix"),
            ));
        }
        let file = Arc::new(memfd(&format!("utmem-arena-{name}"), len)?);
        let mem = ArenaMem::new(map_shared(&file, len)?);
        let read_only = reopen_read_only(&file)?;
        let mut free = FreeMap {
            trim_at: (len / 8).clamp(4 << 20, 64 << 20),
            parked_cap: len / 8,
            ..FreeMap::default()
        };
        free.insert(prefix, len - prefix);
        // A random start (std's per-process random keys) keeps stamps of arenas from
        // earlier host runs from matching this one's.
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Ok(Arc::new(Arena {
            file,
            read_only,
            mem,
            len,
            next_stamp: AtomicU64::new(seed | 1),
            free: Mutex::new(free),
            readers: Mutex::new(Vec::new()),
        }))
    }

    /// A new reader word for a connection that maps this arena.
    pub fn new_reader(&self) -> io::Result<Arc<ReaderWord>> {
        let file = Arc::new(memfd("utmem-reader", READER_WORD_LEN as u64)?);
        let mem = ReaderWordMem::new(map_shared(&file, READER_WORD_LEN as u64)?)
            .ok_or_else(|| io::Error::other("reader word mapping shorter than a page"))?;
        let r = Arc::new(ReaderWord {
            file,
            mem,
            closed: Mutex::new(None),
            revoked: AtomicBool::new(false),
        });
        let mut readers = lock(&self.readers);
        readers.retain(|r| !r.forgettable());
        readers.push(Arc::clone(&r));
        Ok(r)
    }

    /// The read-write memfd itself: for a VMM that maps the whole region into a
    /// guest (the guest can then write every byte of it; see `server::device`).
    pub fn region_file(&self) -> &Arc<File> {
        &self.file
    }

    /// A reader word at `off` in the arena's own file (a guest device slot's page,
    /// inside the prefix), honoured like a connection's until [`ReaderWord::close`].
    pub fn reader_at(&self, off: u64) -> io::Result<Arc<ReaderWord>> {
        let size = READER_WORD_LEN as u64;
        if !off.is_multiple_of(PAGE) || off.checked_add(size).is_none_or(|e| e > self.len) {
            return Err(io::Error::other(format!(
                "reader word at {off} outside the arena"
            )));
        }
        let map = MmapRegion::build(
            Some(FileOffset::from_arc(Arc::clone(&self.file), off)),
            READER_WORD_LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| io::Error::other(e.to_string()))?;
        let mem = ReaderWordMem::new(map)
            .ok_or_else(|| io::Error::other("reader word mapping shorter than a page"))?;
        mem.word().store(0, Ordering::SeqCst);
        let r = Arc::new(ReaderWord {
            file: Arc::clone(&self.file),
            mem,
            closed: Mutex::new(None),
            revoked: AtomicBool::new(false),
        });
        let mut readers = lock(&self.readers);
        readers.retain(|r| !r.forgettable());
        readers.push(Arc::clone(&r));
        Ok(r)
    }

    /// Reader words that are odd now, with their values.
    fn busy_readers(&self) -> Vec<(Arc<ReaderWord>, u64)> {
        let mut readers = lock(&self.readers);
        readers.retain(|r| !r.forgettable());
        readers
            .iter()
            .filter_map(|r| {
                let v = r.mem.load();
                is_inside(v).then(|| (Arc::clone(r), v))
            })
            .collect()
    }

    /// Bytes a client maps.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true: an arena has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The descriptor a client maps: read-only.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read_only.as_fd()
    }

    /// Room for a value of `len` bytes; `None` if the arena has no free range that long.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Option<ArenaBuf> {
        let ext = extent_len(len as u64);
        let mut free = lock(&self.free);
        Self::unpark(&mut free);
        let off = free.take(ext)?;
        drop(free);
        Some(ArenaBuf {
            arena: Arc::clone(self),
            off,
            len,
            stamp: 0,
        })
    }

    fn release(&self, off: u64, len: usize) {
        // Clear the stamp before the extent can be handed out again, then see who may
        // have read it before: both sequentially consistent, against the reader's
        // word increment and stamp load.
        self.mem.clear_stamp(off);
        let busy = self.busy_readers();
        let ext = extent_len(len as u64);
        let mut free = lock(&self.free);
        Self::unpark(&mut free);
        if !busy.is_empty() {
            free.parked.push(Parked {
                off,
                len: ext,
                busy,
            });
            free.parked_bytes += ext;
            Self::revoke_stuck(&mut free);
            return;
        }
        free.release(off, ext);
        if free.dirty >= free.trim_at {
            free.dirty = 0;
            self.trim(&free);
        }
    }

    /// Frees parked extents no reader can still be reading.
    fn unpark(free: &mut FreeMap) {
        if free.parked.is_empty() {
            return;
        }
        let parked = std::mem::take(&mut free.parked);
        for p in parked {
            if p.still_busy() {
                free.parked.push(p);
            } else {
                free.parked_bytes -= p.len;
                free.release(p.off, p.len);
            }
        }
    }

    /// While parked space is over the cap, revokes the words that still pin the
    /// oldest parked extent (a reader inside a value for microseconds has moved on
    /// long before; one stuck odd has not), then frees what they pinned.
    fn revoke_stuck(free: &mut FreeMap) {
        while free.parked_bytes > free.parked_cap {
            Self::unpark(free);
            let Some(oldest) = free.parked.first() else {
                return;
            };
            for (r, v) in &oldest.busy {
                if r.still_at(*v) {
                    r.revoked.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        parked = free.parked_bytes,
                        cap = free.parked_cap,
                        "a reader word stayed odd while released space piled up: revoked"
                    );
                }
            }
        }
    }

    /// Gives the pages of long free ranges back to the kernel.
    fn trim(&self, free: &FreeMap) {
        for (&off, &len) in free.by_off.iter() {
            if len < PUNCH_MIN {
                continue;
            }
            let start = off.div_ceil(PAGE) * PAGE;
            let end = (off + len) / PAGE * PAGE;
            if end <= start {
                continue;
            }
            let (Ok(s), Ok(n)) = (i64::try_from(start), i64::try_from(end - start)) else {
                continue;
            };
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: fallocate on our own memfd; the range is free (no stamp, no
            // value), so a concurrent reader can only see zeros and a stale stamp check.
            if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, s, n) } < 0 {
                tracing::debug!("arena trim: {}", io::Error::last_os_error());
                return;
            }
        }
    }

    /// Free bytes (for tests and stats).
    pub fn free_bytes(&self) -> u64 {
        lock(&self.free).by_off.values().sum()
    }
}

/// One extent of an arena holding a value; the owner behind an arena `Bytes`.
#[derive(Debug)]
pub struct ArenaBuf {
    arena: Arc<Arena>,
    off: u64,
    len: usize,
    stamp: u64,
}

impl ArenaBuf {
    // Value bytes are handled as `&[u8]`/`&mut [u8]` here, unlike anywhere else in
    // shared memory: this is the host's own mapping, and clients only ever get a
    // read-only descriptor of it (see the module docs), so no other process can write
    // these bytes. Headers go through `ArenaMem`, atomically.
    fn data_ptr(&self) -> *mut u8 {
        // SAFETY: the extent lies inside the mapping; the data follows the header.
        unsafe {
            self.arena
                .mem
                .region()
                .as_ptr()
                .add(data_at(self.off) as usize)
        }
    }

    /// The value's bytes, to be filled before [`ArenaBuf::publish`].
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the extent is ours alone until released (the free map handed it
        // out once); readers elsewhere only copy it after checking a stamp we have
        // not written yet, and no other process can write it (read-only descriptors).
        unsafe { std::slice::from_raw_parts_mut(self.data_ptr(), self.len) }
    }

    /// Writes the header (length, then a fresh stamp) and turns the extent into a value.
    pub fn publish(mut self) -> (Bytes, Placement) {
        let mut stamp = 0;
        while stamp == 0 {
            stamp = self.arena.next_stamp.fetch_add(1, Ordering::Relaxed);
        }
        self.arena.mem.publish(self.off, self.len as u64, stamp);
        self.stamp = stamp;
        let p = Placement {
            offset: self.off,
            stamp,
        };
        (Bytes::from_owner(self), p)
    }
}

impl AsRef<[u8]> for ArenaBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the extent is ours until drop; after publish nobody writes it (not
        // even a client: they only get a read-only descriptor).
        unsafe { std::slice::from_raw_parts(self.data_ptr(), self.len) }
    }
}

impl Drop for ArenaBuf {
    fn drop(&mut self) {
        self.arena.release(self.off, self.len);
    }
}

#[cfg(test)]
mod tests {
    use utmem_proto::ARENA_ALIGN;
    use utmem_sys::Mmap;

    use super::*;

    impl Arena {
        /// The value `bytes`, copied into the arena; `None` if there is no room.
        fn place(self: &Arc<Self>, bytes: &[u8]) -> Option<(Bytes, Placement)> {
            let mut buf = self.alloc(bytes.len())?;
            buf.bytes_mut().copy_from_slice(bytes);
            Some(buf.publish())
        }
    }

    fn stamp_at(a: &Arena, off: u64) -> u64 {
        a.mem.stamp(off)
    }

    #[test]
    fn place_release_and_coalesce() {
        let a = Arena::new("t", 1 << 20).unwrap();
        assert_eq!(a.len(), 1 << 20);
        let (v1, p1) = a.place(b"hello").unwrap();
        let (v2, p2) = a.place(&[7u8; 5000]).unwrap();
        assert_eq!(&v1[..], b"hello");
        assert_eq!(v2.len(), 5000);
        assert_ne!(p1.stamp, p2.stamp);
        assert_eq!(p1.offset % ARENA_ALIGN, 0);
        assert_eq!(p2.offset % ARENA_ALIGN, 0);
        assert_eq!(stamp_at(&a, p1.offset), p1.stamp);
        let used = extent_len(5) + extent_len(5000);
        assert_eq!(a.free_bytes(), a.len() - used);
        let clone = v2.clone();
        drop(v2);
        assert_eq!(stamp_at(&a, p2.offset), p2.stamp, "a clone keeps it alive");
        drop(clone);
        assert_eq!(stamp_at(&a, p2.offset), 0, "stamp cleared on release");
        drop(v1);
        assert_eq!(a.free_bytes(), a.len());
        assert_eq!(lock(&a.free).by_off.len(), 1, "coalesced into one range");
    }

    #[test]
    fn full_arena_refuses_and_recovers() {
        let a = Arena::new("t", 1 << 20).unwrap();
        let mut held = Vec::new();
        while let Some(v) = a.place(&[1u8; 60_000]) {
            held.push(v);
        }
        assert!(held.len() >= 16);
        assert!(a.place(&[1u8; 60_000]).is_none());
        held.clear();
        assert!(a.place(&vec![2u8; 900_000]).is_some());
    }

    #[test]
    fn a_busy_reader_parks_released_extents() {
        let a = Arena::new("t", 1 << 20).unwrap();
        let r = a.new_reader().unwrap();
        let (v, p) = a.place(&[5u8; 10_000]).unwrap();
        r.mem.enter(); // a reader is inside
        drop(v);
        assert_eq!(stamp_at(&a, p.offset), 0, "stamp cleared at once");
        let len = extent_len(10_000);
        assert_eq!(a.free_bytes(), a.len() - len, "parked, not free");
        let (w, _) = a.place(b"other").unwrap();
        assert_eq!(a.free_bytes(), a.len() - len - extent_len(5));
        r.mem.leave(); // the reader left
        drop(w);
        assert_eq!(a.free_bytes(), a.len(), "unparked once the reader moved on");
        assert!(lock(&a.free).parked.is_empty());
    }

    #[test]
    fn a_gone_reader_stops_pinning_space_after_the_grace() {
        let a = Arena::new("t", 1 << 20).unwrap();
        let r = a.new_reader().unwrap();
        r.mem.enter(); // inside, and then the connection ends
        let (v, _) = a.place(&[1u8; 5000]).unwrap();
        drop(v);
        r.close();
        assert!(a.free_bytes() < a.len(), "parked while within the grace");
        std::thread::sleep(CLOSED_GRACE);
        let (w, _) = a.place(b"x").unwrap();
        drop(w);
        assert_eq!(a.free_bytes(), a.len(), "freed after the grace");
        assert!(lock(&a.readers).is_empty(), "and the word forgotten");
    }

    #[test]
    fn a_reader_stuck_odd_is_revoked_at_the_parking_cap() {
        let a = Arena::new("t", 1 << 20).unwrap();
        let stuck = a.new_reader().unwrap();
        let fine = a.new_reader().unwrap();
        stuck.mem.enter(); // inside, for ever
        let cap = a.len() / 8;
        let mut parked = 0;
        while parked <= cap {
            let (v, _) = a.place(&[3u8; 4000]).unwrap();
            drop(v);
            parked += extent_len(4000);
            assert_eq!(stuck.is_revoked(), parked > cap, "parked {parked}");
        }
        assert!(!fine.is_revoked());
        assert_eq!(
            a.free_bytes(),
            a.len(),
            "everything it pinned is free again"
        );
        assert!(lock(&a.free).parked.is_empty());
    }

    #[test]
    fn clients_get_a_read_only_descriptor() {
        let a = Arena::new("t", 1 << 20).unwrap();
        // SAFETY: F_GETFL on a descriptor we own.
        let flags = unsafe { libc::fcntl(a.fd().as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
        assert!(
            Mmap::new(a.fd(), 4096, true).is_err(),
            "no writable mapping"
        );
        assert!(Mmap::new(a.fd(), 4096, false).is_ok());
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a descriptor we own; it must fail.
        assert!(unsafe { libc::fallocate(a.fd().as_raw_fd(), mode, 0, 4096) } < 0);
    }

    #[test]
    fn stamps_are_never_reused() {
        let a = Arena::new("t", 1 << 20).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let (_v, p) = a.place(b"x").unwrap();
            assert!(seen.insert(p.stamp));
        }
    }
}
