//! The one piece of `unsafe` in this crate: reading `SO_PEERCRED` of the QMP socket.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// PID of the process at the other end of `stream`, as the kernel recorded it at connect time.
pub(crate) fn peer_pid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>())
        .map_err(|_| io::Error::other("struct ucred does not fit socklen_t"))?;
    // SAFETY: the fd is a live socket owned by `stream` for the duration of the call; `cred` is a
    // properly aligned, writable `ucred` and `len` holds its exact size, so the kernel writes at
    // most `len` bytes into it and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(cred.pid)
        .ok()
        .filter(|&pid| pid != 0)
        .ok_or_else(|| io::Error::other("the kernel reported no peer process for the QMP socket"))
}
