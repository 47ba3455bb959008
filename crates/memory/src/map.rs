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

    /// Fills the page at byte `offset` with zeros. `None` when out of bounds.
    pub(crate) fn zero(&self, offset: usize) -> Option<()> {
        let dst = self.page_ptr(offset)?;
        // SAFETY: as in `write`: PAGE_SIZE writable bytes inside the live mapping, bounds
        // checked by `page_ptr`, covered by no Rust reference.
        unsafe { std::ptr::write_bytes(dst, 0, PAGE_SIZE) };
        Some(())
    }
}
