//! Shared mapping of a guest RAM file: the only `unsafe` code of this crate.
//!
//! Guest memory is shared with QEMU, whose vCPUs may write it at any time. No Rust reference
//! (`&[u8]`, `&mut [u8]`) to the mapped bytes is ever created; pages are copied in and out with
//! raw-pointer copies, bounds-checked here against the mapping's length.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use memmap2::{MmapOptions, MmapRaw};

use crate::PAGE_SIZE;

/// A `MAP_SHARED`, read-write mapping of `len` bytes of a file.
#[derive(Debug)]
pub(crate) struct Mapping {
    raw: MmapRaw,
}

impl Mapping {
    /// Maps the first `len` bytes of `file` (opened read-write) shared.
    pub(crate) fn new(file: &File, len: usize) -> io::Result<Mapping> {
        let raw = MmapOptions::new().len(len).map_raw(file)?;
        Ok(Mapping { raw })
    }

    /// Mapped length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.raw.len()
    }

    /// Start of the page at byte `offset`, if the whole page lies inside the mapping.
    fn page_ptr(&self, offset: usize) -> Option<*mut u8> {
        let end = offset.checked_add(PAGE_SIZE)?;
        if end > self.raw.len() {
            return None;
        }
        // `wrapping_add` is safe to call; the bounds check above keeps the result inside the
        // mapping, so it is a valid pointer to `PAGE_SIZE` mapped bytes.
        Some(self.raw.as_mut_ptr().wrapping_add(offset))
    }

    /// Copies the page at byte `offset` into `dst`. `None` when out of bounds.
    pub(crate) fn read(&self, offset: usize, dst: &mut [u8; PAGE_SIZE]) -> Option<()> {
        let src = self.page_ptr(offset)?;
        // SAFETY: `src` points to PAGE_SIZE bytes inside the live mapping (checked by
        // `page_ptr`; the mapping lives as long as `self`), readable because it is mapped
        // PROT_READ|PROT_WRITE. `dst` is a distinct, exclusively borrowed Rust buffer of
        // PAGE_SIZE bytes, so the ranges do not overlap. The guest may write the source
        // concurrently; no reference to it is formed, the copy may then see a torn page, which
        // callers handle (dirty tracking re-sends written pages).
        unsafe { std::ptr::copy_nonoverlapping(src.cast_const(), dst.as_mut_ptr(), PAGE_SIZE) };
        Some(())
    }

    /// Copies `src` into the page at byte `offset`. `None` when out of bounds.
    pub(crate) fn write(&self, offset: usize, src: &[u8; PAGE_SIZE]) -> Option<()> {
        let dst = self.page_ptr(offset)?;
        // SAFETY: `dst` points to PAGE_SIZE writable bytes inside the live MAP_SHARED
        // read-write mapping (bounds checked by `page_ptr`). `src` is a Rust buffer that cannot
        // lie inside the mapping (we never hand out references into it), so no overlap. Other
        // writers (guest, other threads on other pages) only race on raw memory that no Rust
        // reference covers.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, PAGE_SIZE) };
        Some(())
    }

    /// Asks the kernel to allocate and map, writable, the pages of bytes `offset..offset + len`
    /// ahead of writes (`MADV_POPULATE_WRITE`, Linux >= 5.14): one call instead of a page fault
    /// per page. Contents are unchanged. `None` when out of bounds; the kernel's refusal (an
    /// older kernel) as an error, which callers may ignore.
    pub(crate) fn populate_write(&self, offset: usize, len: usize) -> Option<io::Result<()>> {
        let end = offset.checked_add(len)?;
        if end > self.raw.len() || offset % PAGE_SIZE != 0 {
            return None;
        }
        let start = self.raw.as_mut_ptr().wrapping_add(offset);
        // SAFETY: `start..start + len` lies inside the live mapping (checked above) and starts
        // on a page boundary (the mapping is page aligned and `offset` a multiple of the page
        // size). MADV_POPULATE_WRITE only faults the pages in as a write would, without changing
        // their contents, so it creates no reference and races with no one's data.
        let r = unsafe { rustix::mm::madvise(start.cast(), len, rustix::mm::Advice::LinuxPopulateWrite) };
        Some(r.map_err(io::Error::from))
    }

    /// Fills the page at byte `offset` with zeros. `None` when out of bounds.
    pub(crate) fn zero(&self, offset: usize) -> Option<()> {
        let dst = self.page_ptr(offset)?;
        // SAFETY: as in `write`: PAGE_SIZE writable bytes inside the live mapping, bounds
        // checked by `page_ptr`, covered by no Rust reference.
        unsafe { std::ptr::write_bytes(dst, 0, PAGE_SIZE) };
        Some(())
    }
}
