//! The ivshmem server behind `--listen ivshmem:PATH=NAME`: QEMU's `ivshmem-doorbell`
//! device connects to PATH and gets the region of identity NAME, which the guest
//! driver (`/dev/utmem`) exposes as BAR2. The region is that identity's arena with a
//! header and [`SLOTS`] channel slots before it (`utmem_proto::device`): a process in
//! the guest claims a slot and runs the same channel and mapped-read code as a local
//! client. The vsock (or hybrid-vsock) listener with the same NAME reaches the same
//! pools, quota and arena; clients use it for everything a channel does not carry.
//!
//! QEMU's protocol, one `sendmsg` per 8-byte little-endian message: `0` (version), the
//! VM's peer id, `-1` with the region's memfd, `0` with the host's eventfd (the guest's
//! doorbell to peer 0 lands there), the VM's peer id with the guest's eventfd (writing
//! it raises the guest's interrupt). QEMU never writes to the socket; its end is the
//! VM's end. One VMM per NAME at a time: a second connection is refused and logged.
//!
//! Everything in the region is hostile input, as for any channel: the host keeps its
//! own geometry and indices, and its reader words are honoured only as long as the
//! VM is connected. The guest can write every byte of the region, the arena
//! included: it can change or break only its own identity's values (the host copies
//! them out, never interprets them), and the module's CRCs catch that on read.
//!
//! QEMU's ivshmem cannot reconnect to a server: after the daemon restarts, a running
//! guest's device keeps the old (now unserved) region. Clients find out by asking
//! DEVICE over their socket (the instance differs) and use the socket instead.

use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use utmem_proto::channel::{ChannelMem, Geometry};
use utmem_proto::device::{self, DeviceHeader};
use utmem_proto::DeviceReply;
use vm_memory::{Bytes as _, FileOffset, MmapRegion, VolatileMemory as _};

use utmem_sys as sys;

use super::channel::{ChannelHandle, Service};
use super::listener::{bind_unix, ListenError};
use crate::store::{Arena, Identity, ReaderWord, Store};

/// Channel slots of a region: processes in one guest that can use the device at once
/// (more fall back to the socket).
pub const SLOTS: u32 = 8;
/// The VM's ivshmem peer id (the host is 0).
const VM_PEER: i64 = 1;

/// The geometry of a device slot's channel: smaller staging than a local channel's
/// (eight of them per VM).
pub const GEOMETRY: Geometry = Geometry {
    sq_entries: 1024,
    cq_entries: 1024,
    staging_len: 4 << 20,
};

/// Regions being served, so that a daemon that stops can say so to their guests.
static SERVED: Mutex<Vec<Arc<Region>>> = Mutex::new(Vec::new());

/// A bound `ivshmem:PATH=NAME` listener.
#[derive(Debug)]
pub struct DeviceListener {
    sock: UnixListener,
    path: PathBuf,
    name: String,
}

impl DeviceListener {
    /// Binds PATH (before QEMU starts: QEMU does not retry).
    pub fn bind(path: &Path, name: &str) -> Result<Self, ListenError> {
        Ok(DeviceListener {
            sock: bind_unix(path)?,
            path: path.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// For logs.
    pub fn describe(&self) -> String {
        format!("ivshmem:{}={}", self.path.display(), self.name)
    }
}

/// An identity's region and its geometry (without an instance: that is per VM).
#[derive(Debug)]
struct Region {
    name: String,
    ident: Arc<Identity>,
    arena: Arc<Arena>,
    plan: DeviceHeader,
    header: MmapRegion,
}

impl Region {
    fn state(&self) -> &AtomicU32 {
        self.header
            .get_atomic_ref::<AtomicU32>(device::off::STATE)
            .expect("the state word is aligned and inside the header page")
    }
}

/// Makes NAME's region and serves the listener on a thread of its own.
pub fn spawn(l: DeviceListener, store: Arc<Store>, service: Arc<Service>) -> io::Result<()> {
    let ident = store.identity(&l.name);
    let arena = store.device_arena(&ident, |arena_len| {
        let h = DeviceHeader::plan(SLOTS, GEOMETRY, arena_len, 0);
        (h.region_len, h.arena_off)
    })?;
    let plan = DeviceHeader::plan(
        SLOTS,
        GEOMETRY,
        arena.len() - DeviceHeader::plan(SLOTS, GEOMETRY, 0, 0).arena_off,
        0,
    );
    if plan.region_len != arena.len() {
        return Err(io::Error::other(
            "device region geometry does not match its arena",
        ));
    }
    let header = map(&arena, 0, device::HEADER_LEN)?;
    let region = Arc::new(Region {
        name: l.name.clone(),
        ident,
        arena,
        plan,
        header,
    });
    region.state().store(device::STATE_NONE, Ordering::SeqCst);
    let busy = Arc::new(AtomicBool::new(false));
    thread::Builder::new()
        .name(format!("utmem-ivshmem-{}", l.name))
        .spawn(move || {
            for conn in l.sock.incoming() {
                let conn = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(path = %l.path.display(), "ivshmem accept failed: {e}");
                        thread::sleep(std::time::Duration::from_millis(100));
                        continue;
                    }
                };
                if busy.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        identity = %region.name,
                        path = %l.path.display(),
                        "refused a second VMM on a live ivshmem socket (one VM per region)"
                    );
                    continue;
                }
                let (region, store, service, busy) = (
                    Arc::clone(&region),
                    Arc::clone(&store),
                    Arc::clone(&service),
                    Arc::clone(&busy),
                );
                let spawned = thread::Builder::new()
                    .name(format!("utmem-vm-{}", region.name))
                    .spawn(move || {
                        if let Err(e) = serve_vm(&region, &store, &service, conn) {
                            tracing::warn!(identity = %region.name, "ivshmem peer: {e}");
                        }
                        busy.store(false, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    tracing::error!("cannot start an ivshmem peer thread: {e}");
                }
            }
        })?;
    Ok(())
}

/// Tells every served guest that the host is going away (a daemon that stops).
pub fn shutdown() {
    for r in SERVED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        r.state().store(device::STATE_GONE, Ordering::SeqCst);
    }
}

fn map(arena: &Arena, off: u64, len: u64) -> io::Result<MmapRegion> {
    MmapRegion::build(
        Some(FileOffset::from_arc(Arc::clone(arena.region_file()), off)),
        usize::try_from(len).map_err(io::Error::other)?,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .map_err(|e| io::Error::other(e.to_string()))
}

/// What a connected VM holds; dropping it ends its channels and readers.
struct Vm {
    _channels: Vec<ChannelHandle>,
    readers: Vec<Arc<ReaderWord>>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        for r in &self.readers {
            r.close();
        }
    }
}

/// One VMM connection: set the region up for a new VM, hand it over, serve it until
/// the VMM goes, then let go of the VM's channel state.
fn serve_vm(
    region: &Arc<Region>,
    store: &Arc<Store>,
    service: &Arc<Service>,
    mut conn: UnixStream,
) -> io::Result<()> {
    let instance = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        | 1;
    let h = DeviceHeader {
        instance,
        ..region.plan
    };
    region.state().store(device::STATE_NONE, Ordering::SeqCst);
    region
        .header
        .as_volatile_slice()
        .write_slice(&h.encode(), 0)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let doorbell = sys::eventfd()?;
    let irq = sys::eventfd()?;
    let mut vm = Vm {
        _channels: Vec::new(),
        readers: Vec::new(),
    };
    for i in 0..h.slots {
        vm.readers.push(region.arena.reader_at(h.word_at(i))?);
        let mem = ChannelMem::from_map(map(&region.arena, h.chan_at(i), h.chan_len)?, GEOMETRY)
            .map_err(io::Error::other)?;
        mem.reset_header();
        vm._channels.push(service.serve(
            store,
            &region.ident,
            Some(Arc::clone(&region.arena)),
            mem,
            doorbell.try_clone()?,
            irq.try_clone()?,
        )?);
    }
    region
        .state()
        .store(device::STATE_SERVING, Ordering::SeqCst);
    let mut served = SERVED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    served.retain(|r| !Arc::ptr_eq(r, region));
    served.push(Arc::clone(region));
    drop(served);
    store.set_device(
        &region.name,
        Some(DeviceReply {
            instance,
            len: h.region_len,
        }),
    );
    let region_fd: OwnedFd = region.arena.region_file().as_fd().try_clone_to_owned()?;
    let sent = send_setup(&conn, &region_fd, &doorbell, &irq);
    if sent.is_ok() {
        tracing::info!(identity = %region.name, instance, len = h.region_len, "ivshmem VM connected");
        // QEMU sends nothing: the read ends when it does.
        let mut b = [0u8; 64];
        while matches!(conn.read(&mut b), Ok(n) if n > 0) {}
    }
    region.state().store(device::STATE_GONE, Ordering::SeqCst);
    store.set_device(&region.name, None);
    sys::eventfd_kick(irq.as_fd());
    drop(vm);
    SERVED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|r| !Arc::ptr_eq(r, region));
    tracing::info!(identity = %region.name, "ivshmem VM disconnected: its channels are closed");
    sent
}

fn send_setup(
    conn: &UnixStream,
    region: &OwnedFd,
    doorbell: &OwnedFd,
    irq: &OwnedFd,
) -> io::Result<()> {
    let msg = |v: i64, fd: Option<&OwnedFd>| -> io::Result<()> {
        let b = v.to_le_bytes();
        let n = match fd {
            Some(f) => sys::send_with_fds(conn.as_fd(), &b, &[f.as_fd()])?,
            None => (&mut &*conn).write(&b)?,
        };
        if n != b.len() {
            return Err(io::Error::other("short write to the VMM"));
        }
        Ok(())
    };
    msg(0, None)?;
    msg(VM_PEER, None)?;
    msg(-1, Some(region))?;
    msg(0, Some(doorbell))?;
    msg(VM_PEER, Some(irq))
}
