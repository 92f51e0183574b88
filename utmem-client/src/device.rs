//! The guest device, `/dev/utmem` (the utmem driver over QEMU's `ivshmem-doorbell`):
//! inside a VM, the same channel and mapped reads a local client gets over its Unix
//! socket. The device's BAR is one region per VM identity (`utmem_proto::device`): a
//! header, channel slots and the identity's arena. A client claims a slot (one per
//! open file, given back when the file closes), maps the slot's channel and reader
//! word and the arena, kicks the host with the doorbell ioctl and sleeps in `poll()`
//! on the device file until the host's interrupt.
//!
//! The device carries PUT, FLUSH, COPY and PING (the channel) and reads of values in
//! the arena; everything else (HELLO, pools, STATS, reads of values the arena does not
//! hold) goes over the transport's socket to the same identity (vsock, or the VMM's
//! hybrid vsock). Before using the device the client asks DEVICE on that socket which
//! region serves its identity now: QEMU's ivshmem cannot reconnect to a restarted
//! host, so a device whose header names another instance is left alone.

// Offsets come from a checked header and lie inside the region (a usize-long mapping).
#![allow(clippy::cast_possible_truncation)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use utmem_proto::arena::{ArenaMem, ReaderWordMem, READER_WORD_LEN};
use utmem_proto::channel::ChannelMem;
use utmem_proto::device::{self, ioctl, DeviceHeader, HEADER_FIELDS_LEN};
use vm_memory::{Bytes as _, FileOffset, MmapRegion, VolatileMemory as _};

use crate::channel::{Bell, Channel};
use crate::mapped::Mapped;

/// Why the device is not used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Opening, an ioctl or a mapping failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The device.
        path: PathBuf,
        /// The step.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// No host has set the region up, or it is not ours.
    #[error("{path}: {why}")]
    NotServed {
        /// The device.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// An open `/dev/utmem` with a claimed slot.
#[derive(Debug)]
pub struct Device {
    file: File,
    path: PathBuf,
    header: DeviceHeader,
    /// The header page (for the state word).
    head: MmapRegion,
    slot: u32,
    peer: u32,
}

fn ioctl_ptr<T>(file: &File, req: u32, arg: *mut T) -> io::Result<i32> {
    // SAFETY: `req` is one of the driver's ioctls, whose argument is a `T` (checked
    // against the C header by utmem-proto's tests); `arg` points to a live `T`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::c_ulong::from(req), arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn map(file: &File, off: u64, len: u64, writable: bool) -> io::Result<MmapRegion> {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    MmapRegion::build(
        Some(FileOffset::new(file.try_clone()?, off)),
        len as usize,
        prot,
        libc::MAP_SHARED,
    )
    .map_err(|e| io::Error::other(e.to_string()))
}

impl Device {
    /// Opens the device at `path`, checks the region's header and claims a slot.
    pub fn open(path: &Path) -> Result<Arc<Device>, DeviceError> {
        let io = |what| {
            let path = path.to_owned();
            move |source| DeviceError::Io { path, what, source }
        };
        let not = |why: String| DeviceError::NotServed {
            path: path.to_owned(),
            why,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io("open"))?;
        let mut info = ioctl::Info::default();
        ioctl_ptr(&file, ioctl::INFO, &mut info).map_err(io("INFO"))?;
        if info.version != device::DEVICE_VERSION {
            return Err(not(format!(
                "no utmem region behind the device (layout version {})",
                info.version
            )));
        }
        if info.state != device::STATE_SERVING {
            return Err(not(format!(
                "the host does not serve it (state {})",
                info.state
            )));
        }
        let head = map(&file, 0, device::HEADER_LEN, false).map_err(io("mmap of the header"))?;
        let mut raw = [0u8; HEADER_FIELDS_LEN];
        head.as_volatile_slice()
            .read_slice(&mut raw, 0)
            .map_err(|e| not(e.to_string()))?;
        let header = DeviceHeader::decode(&raw, info.region_len).map_err(|e| not(e.to_string()))?;
        let mut slot = 0u32;
        ioctl_ptr(&file, ioctl::CLAIM, &mut slot).map_err(io("CLAIM (every slot taken?)"))?;
        if slot >= header.slots {
            return Err(not(format!(
                "the driver gave slot {slot} of {}",
                header.slots
            )));
        }
        Ok(Arc::new(Device {
            file,
            path: path.to_owned(),
            header,
            head,
            slot,
            peer: info.peer_id,
        }))
    }

    /// The region's instance (compare with DEVICE's answer).
    pub fn instance(&self) -> u64 {
        self.header.instance
    }

    /// The region's length.
    pub fn region_len(&self) -> u64 {
        self.header.region_len
    }

    /// The claimed slot.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// This VM's ivshmem peer id.
    pub fn peer(&self) -> u32 {
        self.peer
    }

    /// The device's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the host still serves the region.
    pub fn serving(&self) -> bool {
        self.head
            .get_atomic_ref::<AtomicU32>(device::off::STATE)
            .map(|w| w.load(Ordering::Acquire) == device::STATE_SERVING)
            .unwrap_or(false)
    }

    /// Rings the host's doorbell (a host that went away makes it fail; the channel
    /// sees that through [`Device::serving`]).
    pub fn kick(&self) {
        let _ = ioctl_ptr::<u8>(&self.file, ioctl::KICK, std::ptr::null_mut());
    }

    /// Sleeps until the host's next interrupt, or `timeout`; false on timeout or if
    /// the host is gone.
    pub fn wait(&self, seen: &mut u64, timeout: Duration) -> bool {
        let mut w = ioctl::Wait {
            seen: *seen,
            timeout_ms: u32::try_from(timeout.as_millis())
                .unwrap_or(60_000)
                .min(60_000),
            reserved: 0,
        };
        let ok = ioctl_ptr(&self.file, ioctl::WAIT, &mut w).is_ok();
        *seen = w.seen;
        ok
    }

    /// Marks the interrupts so far as seen (the device file polls readable until then).
    pub fn clear(&self) {
        let mut b = [0u8; 8];
        let _ = (&self.file).read(&mut b);
    }

    /// The arena, mapped read-only, with the slot's reader word.
    pub fn mapped(self: &Arc<Self>) -> io::Result<Mapped> {
        let arena = map(&self.file, 0, self.header.region_len, false)?;
        let word = map(
            &self.file,
            self.header.word_at(self.slot),
            READER_WORD_LEN as u64,
            true,
        )?;
        let word = ReaderWordMem::new(word).ok_or_else(|| io::Error::other("short reader word"))?;
        // A process that had the slot before may have died inside a value.
        if word.load() % 2 == 1 {
            word.leave();
        }
        Ok(Mapped::from_parts(
            ArenaMem::new(arena),
            word,
            Arc::clone(self),
        ))
    }

    /// The slot's channel. Another process may have used the slot before: its
    /// requests are let finish (the host answers every descriptor) and its
    /// completions skipped, then the rings are ours where they stand.
    pub fn channel(self: &Arc<Self>) -> io::Result<Channel> {
        let map = map(
            &self.file,
            self.header.chan_at(self.slot),
            self.header.chan_len,
            true,
        )?;
        let mut raw = [0u8; 64];
        map.as_volatile_slice()
            .read_slice(&mut raw, 0)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let geo = ChannelMem::geometry_of(&raw).map_err(io::Error::other)?;
        let mem = ChannelMem::from_map(map, geo).map_err(io::Error::other)?;
        let deadline = Instant::now() + Duration::from_secs(2);
        let (sq_tail, cq_head) = loop {
            let (tail, head) = mem.sq_indices();
            let cq_tail = mem.cq_tail_now();
            mem.skip_completions(cq_tail);
            if tail == head {
                std::thread::sleep(Duration::from_millis(1));
                if mem.cq_tail_now() == cq_tail {
                    break (tail, cq_tail);
                }
                continue;
            }
            if Instant::now() > deadline || !self.serving() {
                return Err(io::Error::other(
                    "the slot's earlier requests are still not answered",
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        Ok(Channel::new(
            mem,
            Bell::Device(Arc::clone(self)),
            sq_tail,
            cq_head,
        ))
    }
}

impl AsFd for Device {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
