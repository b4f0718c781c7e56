//! The two system calls the standby needs that no safe crate wraps (rustix has `pidfd_open` but not
//! `process_madvise`; nix has neither): `pidfd_open(2)` and `process_madvise(2)`. They are the only unsafe
//! code in the healer, kept here so the rest of the crate stays under the workspace's `unsafe_code` deny.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A pidfd for `pid`: it keeps naming the same process even if the number is reused after the process exits.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and a flags word by value and returns a new descriptor or -1; it reads
    // and writes none of our memory.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just created this descriptor for us; nothing else owns or closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Applies `advice` to the `(start, len)` ranges of the process behind `pidfd`, which are addresses in
/// *that* process. Returns the bytes advised, which can be fewer than asked when a range fails part way.
/// At most `UIO_MAXIOV` (1024) ranges per call.
pub(crate) fn process_madvise(
    pidfd: &OwnedFd,
    ranges: &[(u64, u64)],
    advice: libc::c_int,
) -> io::Result<usize> {
    let iov: Vec<libc::iovec> = ranges
        .iter()
        .map(|&(start, len)| libc::iovec {
            iov_base: std::ptr::without_provenance_mut(start as usize),
            iov_len: len as usize,
        })
        .collect();
    // SAFETY: the kernel only reads `iov.len()` iovec structs from `iov`, which is alive and initialized for
    // the whole call. The addresses inside are interpreted in the target process's address space and never
    // dereferenced in ours, so no memory of this process is read or written through them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_process_madvise,
            pidfd.as_raw_fd(),
            iov.as_ptr(),
            iov.len(),
            advice,
            0 as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}
