//! The value arena: the shared-memory layout of the values a host places for local
//! clients, and the two protocols that make reading them safe. The host
//! (`utmem-host`'s store) writes it; clients (`utmem-client`'s `Mapped`) map it
//! read-only. This module is the one description both sides use.
//!
//! # Layout
//!
//! One memfd per identity. Each value takes an extent of [`extent_len`]`(len)` bytes
//! (`ARENA_HEADER_LEN + len`, rounded up to [`ARENA_ALIGN`]) at an
//! [`ARENA_ALIGN`]-aligned offset, the value's [`Placement`] offset:
//!
//! | offset in the extent | size | field |
//! |---|---|---|
//! | [`STAMP_AT`] (0) | 8 | stamp (u64, native byte order, accessed atomically) |
//! | [`LEN_AT`] (8) | 8 | the value's length (u64, native byte order) |
//! | [`ARENA_HEADER_LEN`] (16) | `len` | the value's bytes |
//!
//! # Stamps: a seqlock with a one-way version
//!
//! The host writes the bytes, then the length, then the stamp (release); it clears
//! the stamp first (sequentially consistent), before the extent can be reused, and
//! never issues a stamp twice. A reader that sees the placement's stamp (and length)
//! before and after copying therefore copied exactly the value the PUT stored; any
//! other outcome tells it to ask over the socket instead.
//!
//! # The reader word: using the bytes in place
//!
//! A reader may also use the bytes in place (Redis replies straight from the mapping,
//! without copying them out first). For that, each mapping connection gets a *reader
//! word*: a one-page memfd, mapped read-write by both sides, whose first u64
//! ([`READER_WORD_OFF`]) the reader makes odd ([`ReaderWordMem::enter`], an atomic
//! increment) before it checks a stamp and even again ([`ReaderWordMem::leave`])
//! when it is done with the bytes: odd means "inside a value". Releasing a value
//! clears its stamp and then looks at every reader word (both sequentially
//! consistent, Dekker style, against the reader's increment and stamp load): if one
//! is odd ([`is_inside`]), the extent is parked until that word differs from what it
//! read ("odd and unchanged since"), so bytes are never reused under a reader that
//! saw a valid stamp. So a matching stamp means the bytes are the value that PUT
//! stored until the word moves.
//!
//! A reader with many threads must keep the one word odd while *any* of them is
//! inside, and unchanged while they overlap (a second increment would tell the host
//! the first reader had left): it counts its threads privately and moves the word
//! only on the first entry and the last exit (`utmem-client`'s `Mapped`).
//!
//! What the host does about a word that never moves on (parking is capped; the words
//! that pin the oldest parked space are revoked and their connections dropped) is
//! host policy, in `utmem-host`'s arena.
//!
//! # Hostile memory
//!
//! A client's mapping of the arena may change under it at any time, and both sides
//! can write a reader word: all of it is read here with atomics or volatile copies
//! ([`VolatileSlice`]), never through a `&[u8]`.

// Offsets are u64 on the wire and usize in memory; every offset cast here was
// checked to lie inside a mapping, whose length is a usize.
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{MmapRegion, VolatileMemory, VolatileSlice};

use crate::payload::Placement;

/// Bytes before each value in the arena: its stamp (u64, written last, cleared
/// first) and its length (u64).
pub const ARENA_HEADER_LEN: u64 = 16;
/// Values in the arena start at multiples of this.
pub const ARENA_ALIGN: u64 = 64;
/// Offset of the stamp in a value's header.
pub const STAMP_AT: u64 = 0;
/// Offset of the length in a value's header.
pub const LEN_AT: u64 = 8;

/// Bytes of a reader word's memfd (one page; both sides map all of it).
pub const READER_WORD_LEN: usize = 4096;
/// Offset of the reader word (a u64) in its page.
pub const READER_WORD_OFF: usize = 0;

/// Extent size of a value of `len` bytes.
pub fn extent_len(len: u64) -> u64 {
    (ARENA_HEADER_LEN + len).div_ceil(ARENA_ALIGN) * ARENA_ALIGN
}

/// Offset of the bytes of the value whose header is at `offset`.
pub const fn data_at(offset: u64) -> u64 {
    offset + ARENA_HEADER_LEN
}

/// End of the header and `len` bytes of a value at `offset`; `None` on overflow.
pub fn value_end(offset: u64, len: u64) -> Option<u64> {
    offset.checked_add(ARENA_HEADER_LEN)?.checked_add(len)
}

/// Whether a reader word that reads `v` says its reader is inside a value (odd).
pub const fn is_inside(v: u64) -> bool {
    v % 2 == 1
}

/// A mapping of an arena, as either side sees it: the host's own read-write mapping,
/// or a client's read-only one. Headers are accessed atomically, value bytes only as
/// volatile memory: the host may change a client's view at any time.
#[derive(Debug)]
pub struct ArenaMem {
    map: MmapRegion,
}

impl ArenaMem {
    /// The arena mapped by `map` (the caller mapped it shared, and checked that the
    /// file cannot shrink under it).
    pub fn new(map: MmapRegion) -> ArenaMem {
        ArenaMem { map }
    }

    /// The mapping (for the host's own writes of value bytes, and `madvise`).
    pub fn region(&self) -> &MmapRegion {
        &self.map
    }

    /// Bytes mapped.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Never true: a mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The header cell at `at`, if it is inside the mapping and 8-aligned.
    fn cell(&self, at: u64) -> Option<&AtomicU64> {
        let at = usize::try_from(at).ok()?;
        self.map.get_atomic_ref::<AtomicU64>(at).ok()
    }

    fn header_cell(&self, offset: u64, field: u64) -> &AtomicU64 {
        offset
            .checked_add(field)
            .and_then(|at| self.cell(at))
            .expect("extents lie inside the arena, 64-aligned")
    }

    /// The stamp of the extent at `offset` (acquire; zero: no value there). Host
    /// side: `offset` is an extent it handed out.
    pub fn stamp(&self, offset: u64) -> u64 {
        self.header_cell(offset, STAMP_AT).load(Ordering::Acquire)
    }

    /// Host: makes the extent at `offset`, whose `len` bytes are written, a value
    /// with `stamp`: the length first, then the stamp (release), so a reader that
    /// sees the stamp sees the length and the bytes.
    pub fn publish(&self, offset: u64, len: u64, stamp: u64) {
        self.header_cell(offset, LEN_AT)
            .store(len, Ordering::Relaxed);
        self.header_cell(offset, STAMP_AT)
            .store(stamp, Ordering::Release);
    }

    /// Host: clears the stamp of the extent at `offset` before the extent can be
    /// reused (sequentially consistent: the caller then looks at the reader words).
    pub fn clear_stamp(&self, offset: u64) {
        self.header_cell(offset, STAMP_AT)
            .store(0, Ordering::SeqCst);
    }

    /// Reader: the value PUT placed at `p` (`len` bytes), if it lies inside the
    /// mapping. Nothing is read yet: check it with [`Value::is_current`].
    pub fn value(&self, p: Placement, len: usize) -> Option<Value<'_>> {
        let end = value_end(p.offset, len as u64)?;
        if end > self.len() || !p.offset.is_multiple_of(8) {
            return None;
        }
        Some(Value {
            stamp: self.cell(p.offset + STAMP_AT)?,
            len: self.cell(p.offset + LEN_AT)?,
            bytes: self.map.get_slice(data_at(p.offset) as usize, len).ok()?,
            want: p.stamp,
        })
    }
}

/// A value of a mapped arena, located but not trusted: its header and bytes may
/// change at any time, so every look is atomic or volatile.
#[derive(Debug)]
pub struct Value<'a> {
    stamp: &'a AtomicU64,
    len: &'a AtomicU64,
    bytes: VolatileSlice<'a>,
    want: u64,
}

impl Value<'_> {
    /// Whether the header holds the placement's stamp and length: the bytes are the
    /// value (sequentially consistent, against the host's stamp clear and its look at
    /// the reader words).
    pub fn is_current(&self) -> bool {
        self.stamp.load(Ordering::SeqCst) == self.want
            && self.len.load(Ordering::Acquire) == self.bytes.len() as u64
    }

    /// Whether the stamp is still the placement's (after using the bytes: if not,
    /// whatever was made of them must be thrown away).
    pub fn still_current(&self) -> bool {
        self.stamp.load(Ordering::SeqCst) == self.want
    }

    /// The value's bytes, as volatile memory (copy them out with
    /// [`VolatileSlice::copy_to`], volatile reads).
    pub fn bytes(&self) -> VolatileSlice<'_> {
        self.bytes
    }
}

/// A mapping of a reader word's page (both sides map it read-write; see the module
/// docs). Only its word is ever accessed, atomically.
#[derive(Debug)]
pub struct ReaderWordMem {
    map: MmapRegion,
}

impl ReaderWordMem {
    /// The reader word in `map`; `None` if the mapping is shorter than
    /// [`READER_WORD_LEN`].
    pub fn new(map: MmapRegion) -> Option<ReaderWordMem> {
        (map.len() >= READER_WORD_LEN).then_some(ReaderWordMem { map })
    }

    /// The word.
    pub fn word(&self) -> &AtomicU64 {
        self.map
            .get_atomic_ref::<AtomicU64>(READER_WORD_OFF)
            .expect("the word page is page-aligned and a page long")
    }

    /// Its value now (sequentially consistent).
    pub fn load(&self) -> u64 {
        self.word().load(Ordering::SeqCst)
    }

    /// Reader: makes the word odd before looking at a stamp.
    pub fn enter(&self) {
        self.word().fetch_add(1, Ordering::SeqCst);
    }

    /// Reader: makes the word even once done with the bytes.
    pub fn leave(&self) {
        self.word().fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use vm_memory::{Bytes as _, FileOffset};

    use super::*;

    fn file(len: u64) -> File {
        let f = tempfile::tempfile().expect("tmp");
        f.set_len(len).expect("len");
        f
    }

    fn map(f: &File, writable: bool) -> MmapRegion {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let len = f.metadata().expect("meta").len() as usize;
        let fo = FileOffset::new(f.try_clone().expect("dup"), 0);
        MmapRegion::build(Some(fo), len, prot, libc::MAP_SHARED).expect("map")
    }

    #[test]
    fn layout() {
        assert_eq!((STAMP_AT, LEN_AT, ARENA_HEADER_LEN), (0, 8, 16));
        assert_eq!(data_at(128), 144);
        assert_eq!(extent_len(0), 64);
        assert_eq!(extent_len(48), 64);
        assert_eq!(extent_len(49), 128);
        assert_eq!(extent_len(5000), 5056);
        assert_eq!(value_end(64, 5), Some(85));
        assert_eq!(value_end(u64::MAX - 8, 1), None);
        assert!(is_inside(1) && !is_inside(0) && !is_inside(u64::MAX - 1));
        assert_eq!(READER_WORD_OFF % 8, 0);
    }

    /// The host publishes through its writable mapping; a read-only mapping of the
    /// same file (a client's) finds the value, and loses it once the stamp goes.
    #[test]
    fn write_then_read_round_trip() {
        let f = file(1 << 16);
        let host = ArenaMem::new(map(&f, true));
        let client = ArenaMem::new(map(&f, false));
        assert_eq!(client.len(), 1 << 16);
        let (off, bytes) = (ARENA_ALIGN * 3, b"hello, arena");
        host.region()
            .as_volatile_slice()
            .write_slice(bytes, data_at(off) as usize)
            .expect("inside");
        host.publish(off, bytes.len() as u64, 77);
        assert_eq!(host.stamp(off), 77);

        let p = Placement {
            offset: off,
            stamp: 77,
        };
        let v = client.value(p, bytes.len()).expect("inside");
        assert!(v.is_current());
        let mut out = vec![0u8; bytes.len()];
        assert_eq!(v.bytes().copy_to(&mut out[..]), bytes.len());
        assert_eq!(&out, bytes);
        assert!(v.still_current());

        host.clear_stamp(off);
        assert!(!v.still_current(), "a cleared stamp is seen at once");
        assert!(!client.value(p, bytes.len()).expect("inside").is_current());
    }

    #[test]
    fn a_wrong_stamp_or_length_is_not_the_value() {
        let f = file(1 << 16);
        let host = ArenaMem::new(map(&f, true));
        let client = ArenaMem::new(map(&f, false));
        host.publish(0, 10, 5);
        let at = |stamp| Placement { offset: 0, stamp };
        assert!(client.value(at(5), 10).expect("inside").is_current());
        assert!(!client.value(at(6), 10).expect("inside").is_current());
        assert!(!client.value(at(5), 11).expect("inside").is_current());
        // Replaced under the reader: same extent, a new stamp.
        let v = client.value(at(5), 10).expect("inside");
        host.publish(0, 10, 6);
        assert!(!v.still_current());
    }

    #[test]
    fn placements_outside_the_mapping_are_refused() {
        let f = file(1 << 16);
        let client = ArenaMem::new(map(&f, false));
        let p = |offset| Placement { offset, stamp: 1 };
        assert!(client.value(p(0), (1 << 16) - 16).is_some());
        assert!(client.value(p(0), (1 << 16) - 15).is_none());
        assert!(client.value(p((1 << 16) - 8), 0).is_none());
        assert!(client.value(p(u64::MAX - 7), 0).is_none());
        assert!(client.value(p(4), 1).is_none(), "unaligned header");
    }

    #[test]
    fn the_reader_word_is_odd_while_inside() {
        let f = file(READER_WORD_LEN as u64);
        let reader = ReaderWordMem::new(map(&f, true)).expect("a page");
        let host = ReaderWordMem::new(map(&f, true)).expect("a page");
        assert!(!is_inside(host.load()));
        reader.enter();
        let v = host.load();
        assert!(is_inside(v));
        reader.leave();
        assert!(!is_inside(host.load()));
        assert_ne!(host.load(), v, "moved on");
        assert!(ReaderWordMem::new(map(&file(100), true)).is_none(), "short");
    }
}
