//! The few OS calls the workload needs that std does not offer: an anonymous
//! mapping for the dirty buffer and the guest's monotonic clock (uptime).
#![allow(unsafe_code)]

use std::io;

/// An anonymous, private, read-write memory mapping, unmapped on drop.
#[derive(Debug)]
pub struct AnonMap {
    ptr: *mut u8,
    len: usize,
}

impl AnonMap {
    /// Maps `len` bytes of anonymous memory (zero-filled, not yet touched).
    pub fn new(len: usize) -> io::Result<AnonMap> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing does not
        // alias any memory owned by Rust; the arguments are valid for mmap(2).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(AnonMap { ptr: p.cast::<u8>(), len })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr/len describe a live mapping owned by self (readable, writable,
        // initialised to zero by the kernel); the borrow of self keeps it alive and
        // prevents a concurrent &mut.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice; &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: ptr/len come from a successful mmap and no borrow outlives self.
        unsafe {
            libc::munmap(self.ptr.cast::<libc::c_void>(), self.len);
        }
    }
}

/// Milliseconds of CLOCK_BOOTTIME (guest uptime, including time while stopped by the host
/// only as far as the guest clock advances).
pub fn uptime_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid, writable timespec; clock_gettime only writes into it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1000 + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000
}
