//! The guest device's region and ioctl ABI (`/dev/utmem`, an ivshmem-doorbell BAR2):
//! one region per VM identity holding a header, a few channel slots and the
//! identity's arena, so that a process in the guest runs the same channel and
//! mapped-read code as a local client. `include/utmem_device.h` is the same in C;
//! `tests/c_header.rs` checks the two agree.
//!
//! ```text
//! [0, 4096)                   header (host-written): magic, version, geometry, instance, state
//! slot i at slot_off + i*slot_stride:
//!   [word_off, +4096)         the slot's reader word (see `arena`)
//!   [chan_off, +chan_len)     a channel (see `channel`)
//! [arena_off, region_len)     the arena; placements are offsets in the region
//! ```
//!
//! The host keeps its own copy of this geometry and never reads it back; a guest
//! reads the header once and checks it ([`DeviceHeader::decode`]).

use crate::channel::Geometry;

/// `UTDV` little-endian.
pub const DEVICE_MAGIC: u32 = 0x5644_5455;
/// Layout version.
pub const DEVICE_VERSION: u32 = 1;
/// The header page.
pub const HEADER_LEN: u64 = 4096;
/// Most slots a region may have (the driver's bound too).
pub const MAX_SLOTS: u32 = 64;

/// State word values.
pub const STATE_NONE: u32 = 0;
/// A host serves the channels.
pub const STATE_SERVING: u32 = 1;
/// The host let go of this VM (it disconnected, or the daemon stopped).
pub const STATE_GONE: u32 = 2;

/// PCI vendor and device of QEMU's ivshmem.
pub const PCI_VENDOR: u16 = 0x1af4;
/// See [`PCI_VENDOR`].
pub const PCI_DEVICE: u16 = 0x1110;
/// BAR0 registers.
pub const REG_INTR_MASK: u32 = 0;
/// See [`REG_INTR_MASK`].
pub const REG_INTR_STATUS: u32 = 4;
/// See [`REG_INTR_MASK`].
pub const REG_IV_POSITION: u32 = 8;
/// See [`REG_INTR_MASK`].
pub const REG_DOORBELL: u32 = 12;
/// The host's ivshmem peer id.
pub const HOST_PEER: u32 = 0;

/// Header field offsets.
pub mod off {
    /// `u32`
    pub const MAGIC: usize = 0;
    /// `u32`
    pub const VERSION: usize = 4;
    /// `u64`
    pub const REGION_LEN: usize = 8;
    /// `u32`
    pub const SLOTS: usize = 16;
    /// `u64`
    pub const SLOT_OFF: usize = 24;
    /// `u64`
    pub const SLOT_STRIDE: usize = 32;
    /// `u64`
    pub const WORD_OFF: usize = 40;
    /// `u64`
    pub const CHAN_OFF: usize = 48;
    /// `u64`
    pub const CHAN_LEN: usize = 56;
    /// `u64`
    pub const ARENA_OFF: usize = 64;
    /// `u64`
    pub const INSTANCE: usize = 72;
    /// `u32`, in its own 64-byte line.
    pub const STATE: usize = 128;
}

/// Bytes of the header that [`DeviceHeader::encode`] writes (the state word is apart).
pub const HEADER_FIELDS_LEN: usize = 80;

/// The geometry of a device region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceHeader {
    /// Power of two.
    pub region_len: u64,
    /// Channel slots.
    pub slots: u32,
    /// Offset of slot 0.
    pub slot_off: u64,
    /// Distance between slots.
    pub slot_stride: u64,
    /// The reader word's page within a slot.
    pub word_off: u64,
    /// The channel within a slot.
    pub chan_off: u64,
    /// Its length (the channel geometry's region length).
    pub chan_len: u64,
    /// First byte of the arena.
    pub arena_off: u64,
    /// Random per region: tells a guest whether the host it talks to over a socket
    /// is the one serving this region.
    pub instance: u64,
}

/// Why a header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Not a utmem region, or not this version.
    #[error("no utmem device header (magic {0:#x}, version {1})")]
    NotOurs(u32, u32),
    /// Fields that do not fit together or in the region.
    #[error("device header does not add up: {0}")]
    Geometry(&'static str),
}

const fn align_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

impl DeviceHeader {
    /// The layout for `slots` channels of geometry `geo` and an arena of at least
    /// `arena_len` bytes, rounded up to a power of two (a PCI BAR's rule).
    pub fn plan(slots: u32, geo: Geometry, arena_len: u64, instance: u64) -> DeviceHeader {
        let chan_len = geo.region_len();
        let slot_stride = align_up(4096 + chan_len, 64 << 10);
        let slot_off = HEADER_LEN;
        let arena_off = align_up(slot_off + u64::from(slots) * slot_stride, 2 << 20);
        DeviceHeader {
            region_len: (arena_off + arena_len).next_power_of_two(),
            slots,
            slot_off,
            slot_stride,
            word_off: 0,
            chan_off: 4096,
            chan_len,
            arena_off,
            instance,
        }
    }

    /// Slot `i`'s reader word offset.
    pub fn word_at(&self, i: u32) -> u64 {
        self.slot_off + u64::from(i) * self.slot_stride + self.word_off
    }

    /// Slot `i`'s channel offset.
    pub fn chan_at(&self, i: u32) -> u64 {
        self.slot_off + u64::from(i) * self.slot_stride + self.chan_off
    }

    /// The header fields (the state word is written apart, atomically).
    pub fn encode(&self) -> [u8; HEADER_FIELDS_LEN] {
        let mut b = [0u8; HEADER_FIELDS_LEN];
        let mut w32 = |at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        w32(off::MAGIC, DEVICE_MAGIC);
        w32(off::VERSION, DEVICE_VERSION);
        w32(off::SLOTS, self.slots);
        let mut w64 = |at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        w64(off::REGION_LEN, self.region_len);
        w64(off::SLOT_OFF, self.slot_off);
        w64(off::SLOT_STRIDE, self.slot_stride);
        w64(off::WORD_OFF, self.word_off);
        w64(off::CHAN_OFF, self.chan_off);
        w64(off::CHAN_LEN, self.chan_len);
        w64(off::ARENA_OFF, self.arena_off);
        w64(off::INSTANCE, self.instance);
        b
    }

    /// Reads and checks a header copied out of a region of `region_len` bytes.
    pub fn decode(
        b: &[u8; HEADER_FIELDS_LEN],
        region_len: u64,
    ) -> Result<DeviceHeader, DeviceError> {
        let r32 = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let r64 = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let (magic, version) = (r32(off::MAGIC), r32(off::VERSION));
        if magic != DEVICE_MAGIC || version != DEVICE_VERSION {
            return Err(DeviceError::NotOurs(magic, version));
        }
        let h = DeviceHeader {
            region_len: r64(off::REGION_LEN),
            slots: r32(off::SLOTS),
            slot_off: r64(off::SLOT_OFF),
            slot_stride: r64(off::SLOT_STRIDE),
            word_off: r64(off::WORD_OFF),
            chan_off: r64(off::CHAN_OFF),
            chan_len: r64(off::CHAN_LEN),
            arena_off: r64(off::ARENA_OFF),
            instance: r64(off::INSTANCE),
        };
        let page = |x: u64| x.is_multiple_of(4096);
        if h.region_len != region_len || !region_len.is_power_of_two() {
            return Err(DeviceError::Geometry("region length"));
        }
        if h.slots == 0 || h.slots > MAX_SLOTS {
            return Err(DeviceError::Geometry("slot count"));
        }
        if ![
            h.slot_off,
            h.slot_stride,
            h.word_off,
            h.chan_off,
            h.chan_len,
            h.arena_off,
        ]
        .into_iter()
        .all(page)
            || h.slot_off < HEADER_LEN
        {
            return Err(DeviceError::Geometry("offsets not page-aligned"));
        }
        let word_end = h.word_off.checked_add(4096);
        let chan_end = h.chan_off.checked_add(h.chan_len);
        let (Some(word_end), Some(chan_end)) = (word_end, chan_end) else {
            return Err(DeviceError::Geometry("slot contents overflow"));
        };
        let overlap = h.word_off < chan_end && h.chan_off < word_end;
        if overlap || word_end > h.slot_stride || chan_end > h.slot_stride {
            return Err(DeviceError::Geometry("slot contents do not fit a slot"));
        }
        let slots_end = h
            .slot_stride
            .checked_mul(u64::from(h.slots))
            .and_then(|x| x.checked_add(h.slot_off));
        match slots_end {
            Some(end) if end <= h.arena_off && h.arena_off < h.region_len => Ok(h),
            _ => Err(DeviceError::Geometry("slots or arena outside the region")),
        }
    }
}

/// The driver's ioctl ABI (`struct utmem_dev_info`, `struct utmem_dev_wait`).
pub mod ioctl {
    /// `UTMEM_IOC_MAGIC`.
    pub const MAGIC: u32 = 0xB5;
    /// `sizeof(struct utmem_dev_info)`.
    pub const INFO_LEN: u32 = 32;
    /// `sizeof(struct utmem_dev_wait)`.
    pub const WAIT_LEN: u32 = 16;

    const NONE: u32 = 0;
    const WRITE: u32 = 1;
    const READ: u32 = 2;

    const fn ioc(dir: u32, nr: u32, size: u32) -> u32 {
        (dir << 30) | (size << 16) | (MAGIC << 8) | nr
    }

    /// `_IOR(0xB5, 0, struct utmem_dev_info)`.
    pub const INFO: u32 = ioc(READ, 0, INFO_LEN);
    /// `_IO(0xB5, 1)`: ring the host's doorbell.
    pub const KICK: u32 = ioc(NONE, 1, 0);
    /// `_IOWR(0xB5, 2, struct utmem_dev_wait)`.
    pub const WAIT: u32 = ioc(READ | WRITE, 2, WAIT_LEN);
    /// `_IOR(0xB5, 3, __u32)`: claim a slot for this open file.
    pub const CLAIM: u32 = ioc(READ, 3, 4);

    /// `struct utmem_dev_info`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
    pub struct Info {
        /// BAR2 length.
        pub region_len: u64,
        /// Interrupts from the host so far.
        pub events: u64,
        /// The header's layout version (0: no valid header).
        pub version: u32,
        /// This VM's ivshmem peer id.
        pub peer_id: u32,
        /// Slots the driver hands out.
        pub slots: u32,
        /// The header's state word.
        pub state: u32,
    }

    /// `struct utmem_dev_wait`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
    pub struct Wait {
        /// In: the interrupt count last seen; out: the count now.
        pub seen: u64,
        /// 0: do not sleep.
        pub timeout_ms: u32,
        /// Must be 0.
        pub reserved: u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEO: Geometry = Geometry {
        sq_entries: 1024,
        cq_entries: 1024,
        staging_len: 4 << 20,
    };

    #[test]
    fn a_plan_decodes_to_itself_and_fits_its_region() {
        let h = DeviceHeader::plan(8, GEO, 128 << 20, 42);
        assert!(h.region_len.is_power_of_two());
        assert!(h.arena_off + (128 << 20) <= h.region_len);
        assert!(h.chan_at(7) + h.chan_len <= h.arena_off);
        assert_eq!(DeviceHeader::decode(&h.encode(), h.region_len), Ok(h));
    }

    #[test]
    fn every_bad_geometry_is_refused() {
        let h = DeviceHeader::plan(8, GEO, 1 << 20, 1);
        let bad = [
            DeviceHeader { slots: 0, ..h },
            DeviceHeader {
                slots: MAX_SLOTS + 1,
                ..h
            },
            DeviceHeader {
                slots: 1 << 30,
                ..h
            },
            DeviceHeader {
                slot_stride: 4096,
                ..h
            },
            DeviceHeader { chan_off: 0, ..h },
            DeviceHeader {
                chan_len: u64::MAX - 4095,
                ..h
            },
            DeviceHeader {
                arena_off: h.region_len,
                ..h
            },
            DeviceHeader { word_off: 12, ..h },
            DeviceHeader { slot_off: 0, ..h },
        ];
        for b in bad {
            assert!(
                DeviceHeader::decode(&b.encode(), h.region_len).is_err(),
                "{b:?}"
            );
        }
        assert!(DeviceHeader::decode(&h.encode(), h.region_len / 2).is_err());
        let mut raw = h.encode();
        raw[0] ^= 1;
        assert!(matches!(
            DeviceHeader::decode(&raw, h.region_len),
            Err(DeviceError::NotOurs(..))
        ));
    }

    #[test]
    fn random_headers_never_panic() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut raw = DeviceHeader::plan(8, GEO, 1 << 20, 1).encode();
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = 8 + usize::try_from(x % (HEADER_FIELDS_LEN as u64 - 8)).unwrap();
            raw[at] = x.to_le_bytes()[4];
            let _ = DeviceHeader::decode(&raw, 1 << 24);
        }
    }
}
