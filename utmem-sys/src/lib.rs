//! The raw fd operations utmem's host and client share: a read into a buffer's spare capacity
//! (so value buffers are never zero-filled before the socket overwrites them)
//! and a vectored write (so headers and shared value buffers go out together
//! without being copied into one buffer), a shared mapping of the value arena,
//! passing descriptors over a Unix socket, and the eventfds that kick a channel's peer.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};

use bytes::{BufMut, BytesMut};

/// Reads at most `max` bytes into the spare capacity of `buf`, reserving it if needed.
/// Returns 0 at end of stream. Retries on EINTR.
pub fn read_spare(fd: BorrowedFd<'_>, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
    buf.reserve(max);
    let spare = buf.chunk_mut();
    let want = spare.len().min(max);
    loop {
        // SAFETY: `spare` points to at least `want` writable bytes owned by `buf`, which
        // stays borrowed mutably for the call; read(2) writes at most `want` bytes there
        // and never reads them, so uninitialised memory is fine.
        let n = unsafe { libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), want) };
        if n >= 0 {
            let n = usize::try_from(n).unwrap_or(0);
            // SAFETY: the kernel initialised exactly `n <= want` bytes at the start of
            // the spare capacity.
            unsafe { buf.advance_mut(n) };
            return Ok(n);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Writes as much of `bufs` as the socket takes in one writev(2). Retries on EINTR.
pub fn writev(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let n = bufs.len().min(1024); // IOV_MAX on Linux
    let cnt = libc::c_int::try_from(n).unwrap_or(1024);
    loop {
        // SAFETY: `IoSlice` is ABI-compatible with `struct iovec` (std guarantees it on
        // Unix); `bufs` is valid for reads of `n` entries and each slice it points to is
        // borrowed for the duration of the call.
        let r = unsafe { libc::writev(fd.as_raw_fd(), bufs.as_ptr().cast(), cnt) };
        if r >= 0 {
            return Ok(usize::try_from(r).unwrap_or(0));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// A shared mapping of a whole file (the host's value arena), unmapped on drop.
#[derive(Debug)]
pub struct Mmap {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; the processes that share
// it synchronise through the arena's stamps, never through Rust references.
unsafe impl Send for Mmap {}
// SAFETY: as above; `&Mmap` only hands out raw pointers.
unsafe impl Sync for Mmap {}

impl Mmap {
    /// Maps `len` bytes of `fd` from offset 0, shared, read-only or read-write.
    pub fn new(fd: BorrowedFd<'_>, len: usize, writable: bool) -> io::Result<Mmap> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping chosen by the kernel (null hint) of a file we were
        // given; nothing else in this process refers to that address range yet.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mmap { ptr, len })
    }

    /// First byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: `new` refuses that).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the range `new` mapped, unmapped only here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Sends `data` on a Unix stream socket with `pass` attached as SCM_RIGHTS. Returns
/// the bytes sent (the descriptors travel with the first of them).
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    pass: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds: Vec<std::os::fd::RawFd> = pass.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives into `buf` from a Unix stream socket; returns the bytes read and the
/// descriptors that came with them (at most four; more are cut off by the kernel).
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => break m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut got = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: SCM_RIGHTS just installed `fd` in this process; nobody else
                // owns it, so wrapping it gives it exactly one owner (closed on drop).
                got.push(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((msg.bytes, got))
}

/// A new non-blocking, close-on-exec eventfd (a channel's doorbell).
pub fn eventfd() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd takes two integers and returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd (a kick); a full counter is as good as a kick.
pub fn eventfd_kick(fd: BorrowedFd<'_>) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to a descriptor the caller holds.
    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
}

/// Resets an eventfd's counter (after it woke us).
pub fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut b = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live buffer from a descriptor the caller holds.
    unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
}
