//! A shared-memory channel: the same requests as the socket protocol, as
//! descriptors in rings that client and host share, so that a request to a host that
//! is awake costs no system call.
//!
//! The host creates a channel for a local client (CHANNEL over its Unix connection)
//! and passes the region's memfd and two eventfds: *submit* (the client kicks the
//! host) and *complete* (the host kicks the client). The guest device and a VMM
//! doorbell reach the same layout another way; `include/utmem_channel.h` is this
//! layout in C, checked against these constants by a test.
//!
//! # Region layout (all integers little-endian)
//!
//! | offset | size | field | written by |
//! |---|---|---|---|
//! | 0 | 4 | magic `UTCH` | host, at creation |
//! | 4 | 4 | version ([`CHANNEL_VERSION`]) | host |
//! | 8 | 8 | feature bits ([`FEAT_CHUNKS`], [`FEAT_NEED_WAKEUP`]) | host |
//! | 16 | 4 | submission ring entries (a power of two) | host |
//! | 20 | 4 | completion ring entries (a power of two, ≥ submission entries) | host |
//! | 24 | 8 | submission ring offset | host |
//! | 32 | 8 | completion ring offset | host |
//! | 40 | 8 | staging offset | host |
//! | 48 | 8 | staging length | host |
//! | 56 | 8 | region length | host |
//! | 128 | 4 | submission tail | client |
//! | 192 | 4 | submission head | host |
//! | 256 | 4 | completion tail | host |
//! | 320 | 4 | completion head | client |
//! | 384 | 4 | host flags ([`HOST_NEED_WAKEUP`], [`HOST_DEAD`]) | host sets, client may clear NEED_WAKEUP |
//! | 448 | 4 | client flags ([`CLIENT_NEED_WAKEUP`]) | client sets, host may clear |
//!
//! Each index word sits in its own 64-byte line. Indices run freely and wrap at 2^32;
//! an entry's slot is `index & (entries - 1)`. The submission ring holds
//! [`SQE_LEN`]-byte [`Sqe`]s, the completion ring [`CQE_LEN`]-byte [`Cqe`]s.
//!
//! # Rules
//! - Single producer, single consumer per ring. The producer writes entries, then
//!   stores the tail with release ordering; the consumer loads the tail with acquire
//!   ordering, copies each entry out once, then stores the head with release ordering.
//! - The host answers every descriptor with exactly one completion, in submission
//!   order, and consumes a descriptor only when the completion ring has room for its
//!   answer. A payload in staging belongs to the host from publication until its
//!   completion; the client may reuse it afterwards.
//! - Notification suppression (as io_uring's NEED_WAKEUP): before sleeping, the host
//!   sets [`HOST_NEED_WAKEUP`], looks at the submission tail once more, and sleeps on
//!   *submit* only if nothing came. A client that published clears the flag (an atomic
//!   swap) and writes *submit* only if it was set, so an awake host is never kicked
//!   and a batch costs at most one kick. The other way round with
//!   [`CLIENT_NEED_WAKEUP`] and *complete*.
//! - Everything in the region may change at any time: the host keeps its own indices
//!   and geometry, copies each descriptor into its own memory once and validates it; an
//!   index that runs ahead of what the ring can hold, or a payload outside staging,
//!   ends the channel ([`HOST_DEAD`]) and nothing else.
//! - A PUT larger than the staging area goes in chunks ([`SQE_MORE`] on every chunk
//!   but the last, same request id, consecutive descriptors, each chunk's `total` the
//!   whole value's length); each chunk is answered (so its staging can be reused) and
//!   the value becomes visible only with the last one.

// The region is at most a few GiB and every offset below was checked against its
// length, which is a usize.
#![allow(clippy::cast_possible_truncation)]

use std::fs::File;
use std::sync::atomic::{fence, AtomicU32, Ordering};

use vm_memory::{Bytes as _, FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

use crate::op::{Op, Status};
use crate::types::{Key, PoolId, RequestId};

/// `UTCH` read as a little-endian u32.
pub const CHANNEL_MAGIC: u32 = u32::from_le_bytes(*b"UTCH");
/// The layout version this crate speaks.
pub const CHANNEL_VERSION: u32 = 1;
/// Length of the header (one page); the submission ring follows it.
pub const CHANNEL_HEADER_LEN: u64 = 4096;
/// Size of a submission descriptor.
pub const SQE_LEN: usize = 64;
/// Size of a completion.
pub const CQE_LEN: usize = 32;

/// Feature: PUTs larger than staging go in chunks ([`SQE_MORE`]).
pub const FEAT_CHUNKS: u64 = 1 << 0;
/// Feature: notification suppression with the NEED_WAKEUP flags.
pub const FEAT_NEED_WAKEUP: u64 = 1 << 1;
/// The features this crate implements.
pub const FEATURES: u64 = FEAT_CHUNKS | FEAT_NEED_WAKEUP;

/// Host flag: the host is going to sleep; kick *submit* after publishing.
pub const HOST_NEED_WAKEUP: u32 = 1 << 0;
/// Host flag: the host ended this channel (it found garbage in it, or is closing).
pub const HOST_DEAD: u32 = 1 << 1;
/// Client flag: the client is going to sleep; kick *complete* after completing.
pub const CLIENT_NEED_WAKEUP: u32 = 1 << 0;

/// Descriptor flag: more chunks of this PUT follow.
pub const SQE_MORE: u8 = 1 << 0;

/// Header field offsets.
pub mod off {
    /// Magic (u32).
    pub const MAGIC: usize = 0;
    /// Version (u32).
    pub const VERSION: usize = 4;
    /// Feature bits (u64).
    pub const FEATURES: usize = 8;
    /// Submission ring entries (u32).
    pub const SQ_ENTRIES: usize = 16;
    /// Completion ring entries (u32).
    pub const CQ_ENTRIES: usize = 20;
    /// Submission ring offset (u64).
    pub const SQ_OFF: usize = 24;
    /// Completion ring offset (u64).
    pub const CQ_OFF: usize = 32;
    /// Staging offset (u64).
    pub const STAGING_OFF: usize = 40;
    /// Staging length (u64).
    pub const STAGING_LEN: usize = 48;
    /// Region length (u64).
    pub const REGION_LEN: usize = 56;
    /// Submission tail (u32, client).
    pub const SQ_TAIL: usize = 128;
    /// Submission head (u32, host).
    pub const SQ_HEAD: usize = 192;
    /// Completion tail (u32, host).
    pub const CQ_TAIL: usize = 256;
    /// Completion head (u32, client).
    pub const CQ_HEAD: usize = 320;
    /// Host flags (u32).
    pub const HOST_FLAGS: usize = 384;
    /// Client flags (u32).
    pub const CLIENT_FLAGS: usize = 448;
}

/// Submission descriptor field offsets.
pub mod sqe_off {
    /// Op (u8, the socket protocol's op numbers).
    pub const OP: usize = 0;
    /// Flags (u8, [`super::SQE_MORE`]).
    pub const FLAGS: usize = 1;
    /// Reserved, zero (u16).
    pub const RESERVED: usize = 2;
    /// Pool id (u32).
    pub const POOL: usize = 4;
    /// Request id (u64), echoed by the completion.
    pub const ID: usize = 8;
    /// Key object id (u64).
    pub const OID: usize = 16;
    /// Key index (u32).
    pub const INDEX: usize = 24;
    /// COPY: destination key index (u32).
    pub const DST_INDEX: usize = 28;
    /// Payload offset in staging (u64): PUT bytes, or GET's destination buffer.
    pub const OFFSET: usize = 32;
    /// Payload length (u64).
    pub const LEN: usize = 40;
    /// PUT: the whole value's length (u64; equals LEN unless chunked).
    pub const TOTAL: usize = 48;
    /// COPY: destination key object id (u64).
    pub const DST_OID: usize = 56;
}

/// Completion field offsets.
pub mod cqe_off {
    /// Request id (u64).
    pub const ID: usize = 0;
    /// Op of the request (u8).
    pub const OP: usize = 8;
    /// Status (u8).
    pub const STATUS: usize = 9;
    /// PUT: placement offset; GET: value length (u64).
    pub const ARG0: usize = 16;
    /// PUT: placement stamp, zero if the value is not in the arena (u64).
    pub const ARG1: usize = 24;
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A submission descriptor, in the reader's own memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sqe {
    /// The op byte (unchecked: see [`Sqe::op`]).
    pub op: u8,
    /// [`SQE_MORE`] or zero.
    pub flags: u8,
    /// Must be zero.
    pub reserved: u16,
    /// Pool.
    pub pool: PoolId,
    /// Request id.
    pub id: RequestId,
    /// Key.
    pub key: Key,
    /// COPY's destination.
    pub dst: Key,
    /// Offset of the payload in staging.
    pub offset: u64,
    /// Payload length.
    pub len: u64,
    /// The value's whole length (PUT).
    pub total: u64,
}

impl Sqe {
    /// Wire bytes.
    pub fn encode(&self) -> [u8; SQE_LEN] {
        use sqe_off as o;
        let mut b = [0u8; SQE_LEN];
        b[o::OP] = self.op;
        b[o::FLAGS] = self.flags;
        b[o::RESERVED..o::RESERVED + 2].copy_from_slice(&self.reserved.to_le_bytes());
        b[o::POOL..o::POOL + 4].copy_from_slice(&self.pool.0.to_le_bytes());
        b[o::ID..o::ID + 8].copy_from_slice(&self.id.0.to_le_bytes());
        b[o::OID..o::OID + 8].copy_from_slice(&self.key.oid.0.to_le_bytes());
        b[o::INDEX..o::INDEX + 4].copy_from_slice(&self.key.index.0.to_le_bytes());
        b[o::DST_INDEX..o::DST_INDEX + 4].copy_from_slice(&self.dst.index.0.to_le_bytes());
        b[o::OFFSET..o::OFFSET + 8].copy_from_slice(&self.offset.to_le_bytes());
        b[o::LEN..o::LEN + 8].copy_from_slice(&self.len.to_le_bytes());
        b[o::TOTAL..o::TOTAL + 8].copy_from_slice(&self.total.to_le_bytes());
        b[o::DST_OID..o::DST_OID + 8].copy_from_slice(&self.dst.oid.0.to_le_bytes());
        b
    }

    /// Parses wire bytes (any bytes parse; [`Sqe::op`] and the host check them).
    pub fn decode(b: &[u8; SQE_LEN]) -> Sqe {
        use sqe_off as o;
        Sqe {
            op: b[o::OP],
            flags: b[o::FLAGS],
            reserved: u16::from_le_bytes([b[o::RESERVED], b[o::RESERVED + 1]]),
            pool: PoolId(u32_at(b, o::POOL)),
            id: RequestId(u64_at(b, o::ID)),
            key: Key::new(u64_at(b, o::OID), u32_at(b, o::INDEX)),
            dst: Key::new(u64_at(b, o::DST_OID), u32_at(b, o::DST_INDEX)),
            offset: u64_at(b, o::OFFSET),
            len: u64_at(b, o::LEN),
            total: u64_at(b, o::TOTAL),
        }
    }

    /// The op, if it is one a channel carries (PUT, GET, FLUSH, FLUSH_OBJECT, COPY,
    /// PING) and the reserved bits are zero.
    pub fn op(&self) -> Option<Op> {
        if self.reserved != 0 || self.flags & !SQE_MORE != 0 {
            return None;
        }
        match Op::try_from(self.op).ok()? {
            op @ (Op::Put | Op::Get | Op::Flush | Op::FlushObject | Op::Copy | Op::Ping) => {
                Some(op)
            }
            _ => None,
        }
    }
}

/// A completion, in the reader's own memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cqe {
    /// The request's id.
    pub id: RequestId,
    /// The request's op byte.
    pub op: u8,
    /// Outcome.
    pub status: Status,
    /// PUT: placement offset; GET: value length.
    pub arg0: u64,
    /// PUT: placement stamp (zero: not in the arena).
    pub arg1: u64,
}

impl Cqe {
    /// Wire bytes.
    pub fn encode(&self) -> [u8; CQE_LEN] {
        use cqe_off as o;
        let mut b = [0u8; CQE_LEN];
        b[o::ID..o::ID + 8].copy_from_slice(&self.id.0.to_le_bytes());
        b[o::OP] = self.op;
        b[o::STATUS] = self.status as u8;
        b[o::ARG0..o::ARG0 + 8].copy_from_slice(&self.arg0.to_le_bytes());
        b[o::ARG1..o::ARG1 + 8].copy_from_slice(&self.arg1.to_le_bytes());
        b
    }

    /// Parses wire bytes; `None` for an unknown status.
    pub fn decode(b: &[u8; CQE_LEN]) -> Option<Cqe> {
        use cqe_off as o;
        Some(Cqe {
            id: RequestId(u64_at(b, o::ID)),
            op: b[o::OP],
            status: Status::try_from(b[o::STATUS]).ok()?,
            arg0: u64_at(b, o::ARG0),
            arg1: u64_at(b, o::ARG1),
        })
    }
}

/// The geometry of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Submission ring entries (a power of two).
    pub sq_entries: u32,
    /// Completion ring entries (a power of two, at least `sq_entries`).
    pub cq_entries: u32,
    /// Staging bytes.
    pub staging_len: u64,
}

/// Why a region is not a channel this crate can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A header field is out of range.
    #[error("bad channel header: {0}")]
    Header(&'static str),
    /// The region could not be mapped.
    #[error("cannot map the channel: {0}")]
    Map(String),
}

const fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Geometry {
    /// Largest ring; keeps every index difference well inside u32.
    pub const MAX_ENTRIES: u32 = 1 << 16;
    /// Largest staging area.
    pub const MAX_STAGING: u64 = 1 << 30;

    /// Checks the rules (powers of two, bounds).
    pub fn check(&self) -> Result<(), LayoutError> {
        let pow2 = |n: u32| n.is_power_of_two() && n <= Self::MAX_ENTRIES;
        if !pow2(self.sq_entries) || !pow2(self.cq_entries) {
            return Err(LayoutError::Header(
                "ring entries are not powers of two up to 65536",
            ));
        }
        if self.cq_entries < self.sq_entries {
            return Err(LayoutError::Header(
                "completion ring smaller than submission ring",
            ));
        }
        if self.staging_len == 0 || self.staging_len > Self::MAX_STAGING {
            return Err(LayoutError::Header("staging length is 0 or over 1 GiB"));
        }
        Ok(())
    }

    /// Offset of the submission ring.
    pub const fn sq_off(&self) -> u64 {
        CHANNEL_HEADER_LEN
    }

    /// Offset of the completion ring.
    pub const fn cq_off(&self) -> u64 {
        self.sq_off() + self.sq_entries as u64 * SQE_LEN as u64
    }

    /// Offset of staging (page-aligned).
    pub const fn staging_off(&self) -> u64 {
        align_up(
            self.cq_off() + self.cq_entries as u64 * CQE_LEN as u64,
            4096,
        )
    }

    /// Bytes of the whole region (page-aligned).
    pub const fn region_len(&self) -> u64 {
        align_up(self.staging_off() + self.staging_len, 4096)
    }
}

/// A mapped channel region, as either side sees it. Every access is volatile or
/// atomic: the other side may write any byte of it at any time.
#[derive(Debug)]
pub struct ChannelMem {
    map: MmapRegion,
    geo: Geometry,
}

impl ChannelMem {
    /// Maps `file` (shared, read-write) with the geometry `geo`, which the caller knows
    /// on its own (the host) or read and checked with [`ChannelMem::read_geometry`].
    pub fn map(file: File, geo: Geometry) -> Result<ChannelMem, LayoutError> {
        geo.check()?;
        let len = geo.region_len();
        let size = file
            .metadata()
            .map_err(|e| LayoutError::Map(e.to_string()))?
            .len();
        if size < len {
            return Err(LayoutError::Map(format!("{size} bytes, {len} needed")));
        }
        let map = MmapRegion::from_file(FileOffset::new(file, 0), len as usize)
            .map_err(|e| LayoutError::Map(e.to_string()))?;
        Ok(ChannelMem { map, geo })
    }

    /// A channel in a mapping the caller made (at an offset of a larger region, such
    /// as a guest device's); the mapping must be at least the geometry's length.
    pub fn from_map(map: MmapRegion, geo: Geometry) -> Result<ChannelMem, LayoutError> {
        geo.check()?;
        let len = geo.region_len();
        if (map.len() as u64) < len {
            return Err(LayoutError::Map(format!(
                "{} bytes, {len} needed",
                map.len()
            )));
        }
        Ok(ChannelMem { map, geo })
    }

    /// Zeroes the header page (indices and flags from an earlier user included) and
    /// writes a new header: the host, reusing a region for a new peer.
    pub fn reset_header(&self) {
        let s = self.map.as_volatile_slice();
        let page = s
            .subslice(0, CHANNEL_HEADER_LEN as usize)
            .expect("the header page is inside the region");
        page.write_slice(&[0u8; CHANNEL_HEADER_LEN as usize], 0)
            .expect("inside the header");
        self.init_header();
    }

    /// Writes the header of a new channel (the host, before passing it on).
    pub fn init_header(&self) {
        let g = &self.geo;
        let s = self.map.as_volatile_slice();
        let w32 = |at: usize, v: u32| s.write_obj(v.to_le(), at).expect("inside the header");
        let w64 = |at: usize, v: u64| s.write_obj(v.to_le(), at).expect("inside the header");
        w32(off::MAGIC, CHANNEL_MAGIC);
        w32(off::VERSION, CHANNEL_VERSION);
        w64(off::FEATURES, FEATURES);
        w32(off::SQ_ENTRIES, g.sq_entries);
        w32(off::CQ_ENTRIES, g.cq_entries);
        w64(off::SQ_OFF, g.sq_off());
        w64(off::CQ_OFF, g.cq_off());
        w64(off::STAGING_OFF, g.staging_off());
        w64(off::STAGING_LEN, g.staging_len);
        w64(off::REGION_LEN, g.region_len());
    }

    /// Reads and checks the header of a region of `len` bytes mapped by `file` (the
    /// client, before mapping it for good).
    pub fn read_geometry(file: &File) -> Result<Geometry, LayoutError> {
        let mut h = [0u8; 64];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut h, 0)
            .map_err(|e| LayoutError::Map(e.to_string()))?;
        Self::geometry_of(&h)
    }

    /// Checks a header's first 64 bytes (copied out of the region) and returns its
    /// geometry.
    pub fn geometry_of(h: &[u8; 64]) -> Result<Geometry, LayoutError> {
        let h = &h[..];
        if u32_at(h, off::MAGIC) != CHANNEL_MAGIC {
            return Err(LayoutError::Header("bad magic"));
        }
        if u32_at(h, off::VERSION) != CHANNEL_VERSION {
            return Err(LayoutError::Header("unknown version"));
        }
        if u64_at(h, off::FEATURES) & FEATURES != FEATURES {
            return Err(LayoutError::Header("missing features"));
        }
        let geo = Geometry {
            sq_entries: u32_at(h, off::SQ_ENTRIES),
            cq_entries: u32_at(h, off::CQ_ENTRIES),
            staging_len: u64_at(h, off::STAGING_LEN),
        };
        geo.check()?;
        let same = u64_at(h, off::SQ_OFF) == geo.sq_off()
            && u64_at(h, off::CQ_OFF) == geo.cq_off()
            && u64_at(h, off::STAGING_OFF) == geo.staging_off()
            && u64_at(h, off::REGION_LEN) == geo.region_len();
        if !same {
            return Err(LayoutError::Header("offsets do not follow the layout"));
        }
        Ok(geo)
    }

    /// The whole region as volatile memory.
    pub fn volatile(&self) -> VolatileSlice<'_> {
        self.map.as_volatile_slice()
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    fn word(&self, at: usize) -> &AtomicU32 {
        self.map
            .get_atomic_ref::<AtomicU32>(at)
            .expect("header words are aligned and inside the region")
    }

    /// The submission ring's shared tail and head now (a client taking over a ring
    /// that another process used).
    pub fn sq_indices(&self) -> (u32, u32) {
        (
            self.word(off::SQ_TAIL).load(Ordering::Acquire),
            self.word(off::SQ_HEAD).load(Ordering::Acquire),
        )
    }

    /// The completion ring's shared tail now.
    pub fn cq_tail_now(&self) -> u32 {
        self.word(off::CQ_TAIL).load(Ordering::Acquire)
    }

    /// Consumes every completion up to `tail` unread (the same client).
    pub fn skip_completions(&self, tail: u32) {
        self.word(off::CQ_HEAD).store(tail, Ordering::Release);
    }

    /// Host flags word.
    pub fn host_flags(&self) -> &AtomicU32 {
        self.word(off::HOST_FLAGS)
    }

    /// Client flags word.
    pub fn client_flags(&self) -> &AtomicU32 {
        self.word(off::CLIENT_FLAGS)
    }

    /// `len` bytes of staging at `offset`, if inside it.
    pub fn staging(&self, offset: u64, len: u64) -> Option<VolatileSlice<'_>> {
        let end = offset.checked_add(len)?;
        if end > self.geo.staging_len {
            return None;
        }
        self.map
            .get_slice((self.geo.staging_off() + offset) as usize, len as usize)
            .ok()
    }

    /// The submission ring's producer side (the client's).
    pub fn sq_producer(&self) -> Producer<'_, SQE_LEN> {
        Producer::new(
            self,
            off::SQ_TAIL,
            off::SQ_HEAD,
            self.geo.sq_off(),
            self.geo.sq_entries,
        )
    }

    /// The submission ring's consumer side (the host's).
    pub fn sq_consumer(&self) -> Consumer<'_, SQE_LEN> {
        Consumer::new(
            self,
            off::SQ_TAIL,
            off::SQ_HEAD,
            self.geo.sq_off(),
            self.geo.sq_entries,
        )
    }

    /// The completion ring's producer side (the host's).
    pub fn cq_producer(&self) -> Producer<'_, CQE_LEN> {
        Producer::new(
            self,
            off::CQ_TAIL,
            off::CQ_HEAD,
            self.geo.cq_off(),
            self.geo.cq_entries,
        )
    }

    /// The completion ring's consumer side (the client's).
    pub fn cq_consumer(&self) -> Consumer<'_, CQE_LEN> {
        Consumer::new(
            self,
            off::CQ_TAIL,
            off::CQ_HEAD,
            self.geo.cq_off(),
            self.geo.cq_entries,
        )
    }
}

/// The peer broke the ring's rules: an index ran ahead of what the ring can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the peer's ring index is {0} entries away from ours (corrupt channel)")]
pub struct RingCorrupt(pub u32);

/// One side of a ring, with its private index. The index lives in the owner's memory;
/// the shared copy is only ever written from it, never read back.
#[derive(Debug)]
pub struct Producer<'a, const N: usize> {
    mem: &'a ChannelMem,
    tail_at: usize,
    head_at: usize,
    base: u64,
    entries: u32,
    /// Our tail (entries written, some maybe not yet published).
    pub tail: u32,
}

impl<'a, const N: usize> Producer<'a, N> {
    fn new(mem: &'a ChannelMem, tail_at: usize, head_at: usize, base: u64, entries: u32) -> Self {
        Producer {
            mem,
            tail_at,
            head_at,
            base,
            entries,
            tail: 0,
        }
    }

    /// Picks up at `tail` (a side whose state outlives this view).
    pub fn at(mut self, tail: u32) -> Self {
        self.tail = tail;
        self
    }

    /// Entries free now.
    pub fn room(&self) -> Result<u32, RingCorrupt> {
        let head = self.mem.word(self.head_at).load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if used > self.entries {
            return Err(RingCorrupt(used));
        }
        Ok(self.entries - used)
    }

    /// Writes an entry after the last one (the caller checked [`Producer::room`]);
    /// it becomes visible with [`Producer::publish`].
    pub fn push(&mut self, e: &[u8; N]) {
        let at = self.base as usize + (self.tail & (self.entries - 1)) as usize * N;
        self.mem
            .map
            .as_volatile_slice()
            .write_slice(e, at)
            .expect("ring slots are inside the region");
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the written entries visible to the consumer.
    pub fn publish(&self) {
        self.mem
            .word(self.tail_at)
            .store(self.tail, Ordering::Release);
    }
}

/// The consuming side of a ring, with its private index.
#[derive(Debug)]
pub struct Consumer<'a, const N: usize> {
    mem: &'a ChannelMem,
    tail_at: usize,
    head_at: usize,
    base: u64,
    entries: u32,
    /// Our head (entries taken, some maybe not yet released).
    pub head: u32,
}

impl<'a, const N: usize> Consumer<'a, N> {
    fn new(mem: &'a ChannelMem, tail_at: usize, head_at: usize, base: u64, entries: u32) -> Self {
        Consumer {
            mem,
            tail_at,
            head_at,
            base,
            entries,
            head: 0,
        }
    }

    /// Picks up at `head`.
    pub fn at(mut self, head: u32) -> Self {
        self.head = head;
        self
    }

    /// Entries published and not taken yet.
    pub fn ready(&self) -> Result<u32, RingCorrupt> {
        let tail = self.mem.word(self.tail_at).load(Ordering::Acquire);
        let n = tail.wrapping_sub(self.head);
        if n > self.entries {
            return Err(RingCorrupt(n));
        }
        Ok(n)
    }

    /// Copies the next entry into our memory (the caller checked [`Consumer::ready`]).
    pub fn pop(&mut self) -> [u8; N] {
        let at = self.base as usize + (self.head & (self.entries - 1)) as usize * N;
        let mut e = [0u8; N];
        self.mem
            .map
            .as_volatile_slice()
            .read_slice(&mut e, at)
            .expect("ring slots are inside the region");
        self.head = self.head.wrapping_add(1);
        e
    }

    /// Gives the taken entries' slots back to the producer.
    pub fn release(&self) {
        self.mem
            .word(self.head_at)
            .store(self.head, Ordering::Release);
    }
}

/// Sets `flag` in `word` before sleeping; the caller then looks at its ring once more
/// and sleeps only if it is still empty (see the module docs).
pub fn arm(word: &AtomicU32, flag: u32) {
    word.fetch_or(flag, Ordering::SeqCst);
}

/// After publishing: true if the peer asked to be kicked (the flag is cleared, so a
/// batch kicks once).
pub fn wants_kick(word: &AtomicU32, flag: u32) -> bool {
    fence(Ordering::SeqCst);
    if word.load(Ordering::Relaxed) & flag == 0 {
        return false;
    }
    word.fetch_and(!flag, Ordering::SeqCst) & flag != 0
}

#[cfg(test)]
mod tests;
