//! The raw fd operations utmem's host and client share: a read into a buffer's spare capacity
//! (so value buffers are never zero-filled before the socket overwrites them)
//! and a vectored write (so headers and shared value buffers go out together
//! without being copied into one buffer).

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
