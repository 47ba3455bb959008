//! Soft-dirty tracking of the QEMU process's mapping of guest RAM: `/proc/PID/clear_refs`
//! (writing `4` clears the soft-dirty bit of every page of the process and write-protects them)
//! and bit 55 of `/proc/PID/pagemap` (set again by the next write to the page).
//!
//! * [`SoftDirty::probe`] proves in our own process that the kernel tracks soft-dirty pages
//!   (CONFIG_MEM_SOFT_DIRTY): a kernel without it accepts `clear_refs` silently and never sets
//!   the bit, which would make every page look clean.
//! * [`guest_ram_ranges`] finds where QEMU maps the guest RAM backing file (memfd or mem-path
//!   file) by matching `/proc/PID/maps` entries against the file's device and inode.
//! * [`SoftDirtyTracker`] clears and reads the bits of those ranges and answers guest page
//!   indices.
//!
//! # Fitting the [`crate::Tracker`] interface
//!
//! [`SoftDirtyTracker::scan`] has the semantics of `Tracker::scan`: the first call clears the
//! bits and hashes every page against the ledger (a full [`ContentTracker`] scan: the ledger of
//! the first iteration knows nothing yet); every later call returns the pages written since the
//! previous call and clears the bits. Reading and clearing are not atomic (a page written between
//! the read of its entry and the clear would be lost), so **the caller pauses the guest (QMP
//! `stop`) around every call after the first**; that is the agent's job. The bits are only a
//! superset of the changed pages (a page written with the same content is dirty), which is
//! harmless. Unlike the content tracker, a page is reported once: the caller must send (or
//! remember) every page a scan returns, since the next scan only reports later writes. `TrackError` has no variant for a soft-dirty failure yet, so `scan` returns
//! [`SoftDirtyError`]; an `impl Tracker` is three lines once `TrackError` wraps it.
//!
//! # What counts as dirty
//!
//! A page is dirty if and only if its pagemap entry has bit 55 set, whatever bits 63 (present)
//! and 62 (swapped) say: a page never touched since the clear has no page table entry and a
//! clear bit (not dirty); the kernel keeps the bit in swap entries and through page migration
//! (compaction, NUMA balancing); a whole new mapping reports every page soft-dirty. Known blind
//! spots, which the agent must rule out or cover:
//!
//! * Writes through other mappings of the backing file (another process such as a vhost-user
//!   backend, or livemig's own mapping) do not touch QEMU's page tables and are not seen.
//! * For shared memory the kernel drops a page's entry, and with it the bit, when it reclaims
//!   the page (shmem swap-out): a page written and then reclaimed before the next read would
//!   look clean. Guest RAM must not be reclaimed while tracking (no swap, or QEMU
//!   `-overcommit mem-lock=on`).
//! * `clear_refs` clears the bits of the whole process, not only of the guest RAM ranges.
//!
//! # Testing
//!
//! The unit tests track pages of the test process itself and hold on any kernel: the probe must
//! agree with a direct observation of bit 55, and the tracker must report exactly the written
//! pages where the kernel sets the bit (nothing where it does not). The build machine's kernel
//! lacks CONFIG_MEM_SOFT_DIRTY; to run the positive path, boot the test guest's Debian cloud
//! kernel with a static test binary as its workload:
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=/tmp/sdtarget \
//!     cargo test -p livemig-track --no-run --target x86_64-unknown-linux-gnu
//! # unpack ~/.cache/livemig/guest/initramfs.img, add the binary as /bin/sdtest, make
//! # /bin/workload a script running `/bin/sdtest --test-threads=1 softdirty; poweroff -f`, repack
//! qemu-system-x86_64 -accel tcg -m 512 -nographic -no-reboot -kernel ~/.cache/livemig/guest/vmlinuz \
//!     -initrd initramfs.img -append "console=ttyS0 panic=-1"
//! ```
//!
//! (On 6.12.117+deb12-cloud-amd64: probe Ok, every softdirty test passed.)

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use thiserror::Error;

use crate::{ContentTracker, Ledger, PageSource, ScanResult, TrackError, Tracker, PAGE_SIZE};

/// [`PAGE_SIZE`] as u64.
const PAGE: u64 = PAGE_SIZE as u64;
/// Bit of a pagemap entry: the page was written since the last clear.
pub const PM_SOFT_DIRTY: u64 = 1 << 55;
/// Bit of a pagemap entry: the page is swapped out.
pub const PM_SWAPPED: u64 = 1 << 62;
/// Bit of a pagemap entry: the page is present in RAM.
pub const PM_PRESENT: u64 = 1 << 63;
/// Pagemap entries read per `pread` (512 KiB, 256 MiB of guest RAM).
const CHUNK_ENTRIES: usize = 1 << 16;

/// Errors of soft-dirty tracking.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SoftDirtyError {
    /// The kernel accepts `clear_refs` but never sets the soft-dirty bit.
    #[error("this kernel does not track soft-dirty pages (CONFIG_MEM_SOFT_DIRTY): a page written after clear_refs did not get bit 55 in pagemap")]
    Unsupported,
    /// The soft-dirty bit stayed set after clearing: the bits cannot be trusted.
    #[error("clear_refs did not clear the soft-dirty bit of a test page; soft-dirty tracking cannot be trusted on this kernel")]
    NotCleared,
    /// The host page size is not the guest page size.
    #[error("the host page size is {0} bytes; soft-dirty tracking supports 4096-byte pages only")]
    PageSize(usize),
    /// A file of /proc cannot be opened, read or written.
    #[error("cannot {op} {path}")]
    Proc {
        /// What was attempted: "open", "read", "write".
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The probe cannot map its test page.
    #[error("cannot map a test page for the soft-dirty probe")]
    Map(#[source] io::Error),
    /// A range given to the tracker is not page aligned, empty or overflows.
    #[error("guest RAM range at {host_va:#x} of {len} bytes is not a non-empty, page-aligned range")]
    BadRange {
        /// Host virtual address.
        host_va: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A line of /proc/PID/maps cannot be parsed.
    #[error("cannot parse line {line} of {path}: {text:?}")]
    Maps {
        /// The maps file.
        path: PathBuf,
        /// Line number (1-based).
        line: usize,
        /// The line.
        text: String,
    },
    /// The ranges do not cover the ledger's pages.
    #[error("the tracked ranges cover {covered} guest pages but the ledger has {ledger}")]
    Coverage {
        /// Pages the ranges cover (highest guest page + 1).
        covered: u64,
        /// Pages of the ledger.
        ledger: u64,
    },
    /// The first, full content scan failed.
    #[error("the initial content scan failed")]
    Content(#[source] TrackError),
}

type Result<T, E = SoftDirtyError> = std::result::Result<T, E>;

fn proc_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SoftDirtyError {
    let path = path.to_path_buf();
    move |source| SoftDirtyError::Proc { op, path, source }
}

/// The soft-dirty machinery of the running kernel.
#[derive(Debug, Clone, Copy)]
pub struct SoftDirty;

impl SoftDirty {
    /// Proves that the kernel tracks soft-dirty pages, in our own process: a page written after
    /// `clear_refs` must show bit 55 in pagemap, and a page just cleared must not. Costs one
    /// `clear_refs` of this process (harmless: it only write-protects our pages once).
    pub fn probe() -> Result<()> {
        check_page_size()?;
        let mut page = memmap2::MmapMut::map_anon(PAGE_SIZE).map_err(SoftDirtyError::Map)?;
        page[0] = 1; // present before the clear
        let addr = page.as_ptr() as u64;
        let pagemap = Pagemap::open(Path::new("/proc/self/pagemap"))?;
        let mut clear_refs = open_clear_refs(Path::new("/proc/self/clear_refs"))?;

        clear(&mut clear_refs, Path::new("/proc/self/clear_refs"))?;
        let after_clear = pagemap.entry(addr)?;
        // A write the compiler must perform before reading pagemap: the buffer escapes.
        *std::hint::black_box(&mut page[0]) = 2;
        let after_write = pagemap.entry(addr)?;
        std::hint::black_box(&page[0]);
        if after_write & PM_SOFT_DIRTY == 0 {
            return Err(SoftDirtyError::Unsupported);
        }
        if after_clear & PM_SOFT_DIRTY != 0 {
            return Err(SoftDirtyError::NotCleared);
        }
        Ok(())
    }
}

fn check_page_size() -> Result<()> {
    let size = rustix::param::page_size();
    if size == PAGE_SIZE {
        Ok(())
    } else {
        Err(SoftDirtyError::PageSize(size))
    }
}

fn open_clear_refs(path: &Path) -> Result<File> {
    OpenOptions::new().write(true).open(path).map_err(proc_err("open", path))
}

fn clear(clear_refs: &mut File, path: &Path) -> Result<()> {
    clear_refs.write_all(b"4").map_err(proc_err("write", path))
}

/// An open /proc/PID/pagemap.
#[derive(Debug)]
struct Pagemap {
    file: File,
    path: PathBuf,
}

impl Pagemap {
    fn open(path: &Path) -> Result<Pagemap> {
        let file = File::open(path).map_err(proc_err("open", path))?;
        Ok(Pagemap { file, path: path.to_path_buf() })
    }

    /// The entry of the page at host virtual address `va`.
    fn entry(&self, va: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.file.read_exact_at(&mut b, va / PAGE * 8).map_err(proc_err("read", &self.path))?;
        Ok(u64::from_le_bytes(b))
    }

    /// Calls `f(page index within the range, entry)` for every page of `[va, va + pages * 4 KiB)`,
    /// reading `chunk` entries at a time.
    fn for_each(&self, va: u64, pages: u64, chunk: usize, buf: &mut Vec<u8>, mut f: impl FnMut(u64, u64)) -> Result<()> {
        let mut done = 0u64;
        while done < pages {
            let n = usize::try_from(pages - done).unwrap_or(usize::MAX).min(chunk);
            buf.resize(n * 8, 0);
            self.file.read_exact_at(buf, (va / PAGE + done) * 8).map_err(proc_err("read", &self.path))?;
            for (i, e) in (done..).zip(buf.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(e);
                f(i, u64::from_le_bytes(b));
            }
            done += n as u64;
        }
        Ok(())
    }
}

/// One mapping of guest RAM in the QEMU process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Host virtual address of the first byte (page aligned).
    pub host_va: u64,
    /// Length in bytes (a multiple of the page size).
    pub len: u64,
    /// Guest page index of the first page.
    pub first_guest_page: u64,
}

impl From<(u64, u64, u64)> for RamRange {
    fn from((host_va, len, first_guest_page): (u64, u64, u64)) -> Self {
        RamRange { host_va, len, first_guest_page }
    }
}

/// Finds the shared mappings of a backing file in process `pid`: every `/proc/PID/maps` entry
/// with `s` permissions whose device and inode are `dev` and `ino` (as `stat` reports them for
/// the file, e.g. QEMU's memfd through /proc/PID/fd/N). The guest page of a mapping's first page
/// is `first_guest_page` plus the mapping's file offset in pages, so for one memdev pass the
/// guest page at which that memdev starts. Private mappings of the file are not guest RAM
/// writes and are left out. An empty result means the process does not map the file.
pub fn guest_ram_ranges(pid: u32, dev: u64, ino: u64, first_guest_page: u64) -> Result<Vec<RamRange>> {
    let path = PathBuf::from(format!("/proc/{pid}/maps"));
    let text = std::fs::read_to_string(&path).map_err(proc_err("read", &path))?;
    parse_maps(&text, &path, dev, ino, first_guest_page)
}

/// Major and minor numbers of a `st_dev` (glibc's encoding).
fn major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000);
    let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
    (major, minor)
}

fn parse_maps(text: &str, path: &Path, dev: u64, ino: u64, first_guest_page: u64) -> Result<Vec<RamRange>> {
    let (major, minor) = major_minor(dev);
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || SoftDirtyError::Maps { path: path.to_path_buf(), line: n + 1, text: line.to_owned() };
        let mut f = line.split_ascii_whitespace();
        let (Some(range), Some(perms), Some(offset), Some(device), Some(inode)) = (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            return Err(bad());
        };
        let (start, end) = range.split_once('-').ok_or_else(bad)?;
        let start = u64::from_str_radix(start, 16).map_err(|_| bad())?;
        let end = u64::from_str_radix(end, 16).map_err(|_| bad())?;
        let offset = u64::from_str_radix(offset, 16).map_err(|_| bad())?;
        let (dmaj, dmin) = device.split_once(':').ok_or_else(bad)?;
        let dmaj = u64::from_str_radix(dmaj, 16).map_err(|_| bad())?;
        let dmin = u64::from_str_radix(dmin, 16).map_err(|_| bad())?;
        let inode: u64 = inode.parse().map_err(|_| bad())?;
        if end < start {
            return Err(bad());
        }
        if inode != ino || (dmaj, dmin) != (major, minor) || perms.as_bytes().get(3) != Some(&b's') {
            continue;
        }
        out.push(RamRange { host_va: start, len: end - start, first_guest_page: first_guest_page + offset / PAGE });
    }
    Ok(out)
}

/// Soft-dirty tracker of the guest RAM mapped by process `pid`.
#[derive(Debug)]
pub struct SoftDirtyTracker {
    pid: u32,
    ranges: Vec<RamRange>,
    pagemap: Pagemap,
    clear_refs: File,
    clear_refs_path: PathBuf,
    chunk: usize,
    buf: Vec<u8>,
    /// Whether `scan` has run (and cleared) once.
    started: bool,
}

impl SoftDirtyTracker {
    /// A tracker of `ranges` (host virtual address, length in bytes, first guest page) of
    /// process `pid`. Opens /proc/PID/pagemap and /proc/PID/clear_refs now and keeps them open,
    /// so they stay bound to that process. Does not probe: call [`SoftDirty::probe`] first.
    pub fn new(pid: u32, ranges: Vec<(u64, u64, u64)>) -> Result<SoftDirtyTracker> {
        check_page_size()?;
        let ranges: Vec<RamRange> = ranges.into_iter().map(RamRange::from).collect();
        for r in &ranges {
            let aligned = r.host_va % PAGE == 0 && r.len % PAGE == 0 && r.len > 0;
            let fits = r.host_va.checked_add(r.len).is_some() && r.first_guest_page.checked_add(r.len / PAGE).is_some();
            if !aligned || !fits {
                return Err(SoftDirtyError::BadRange { host_va: r.host_va, len: r.len });
            }
        }
        let pagemap = Pagemap::open(&PathBuf::from(format!("/proc/{pid}/pagemap")))?;
        let clear_refs_path = PathBuf::from(format!("/proc/{pid}/clear_refs"));
        let clear_refs = open_clear_refs(&clear_refs_path)?;
        Ok(SoftDirtyTracker { pid, ranges, pagemap, clear_refs, clear_refs_path, chunk: CHUNK_ENTRIES, buf: Vec::new(), started: false })
    }

    /// The process tracked.
    pub fn started(&self) -> bool {
        self.started
    }

    /// The process tracked.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The ranges tracked.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Guest pages the ranges cover: the highest guest page + 1.
    pub fn covered_pages(&self) -> u64 {
        self.ranges.iter().map(|r| r.first_guest_page + r.len / PAGE).max().unwrap_or(0)
    }

    /// Clears the soft-dirty bits of every page of the process.
    pub fn clear(&mut self) -> Result<()> {
        clear(&mut self.clear_refs, &self.clear_refs_path)
    }

    /// Guest pages whose soft-dirty bit is set (written since the last [`Self::clear`]),
    /// ascending and without duplicates (ranges may alias).
    pub fn dirty_pages(&mut self) -> Result<Vec<u64>> {
        let mut dirty = Vec::new();
        self.for_each_entry(|guest_page, e| {
            if e & PM_SOFT_DIRTY != 0 {
                dirty.push(guest_page);
            }
        })?;
        if self.ranges.len() > 1 {
            dirty.sort_unstable();
            dirty.dedup();
        }
        Ok(dirty)
    }

    /// Calls `f(guest page, pagemap entry)` for every page of every range.
    fn for_each_entry(&mut self, mut f: impl FnMut(u64, u64)) -> Result<()> {
        for r in &self.ranges {
            self.pagemap.for_each(r.host_va, r.len / PAGE, self.chunk, &mut self.buf, |i, e| f(r.first_guest_page + i, e))?;
        }
        Ok(())
    }

    /// `Tracker::scan` semantics (see the module documentation): the first call clears and
    /// hashes every page with `content`; later calls return the pages written since the
    /// previous call and clear. The guest must be paused around calls after the first.
    pub fn scan(&mut self, content: &mut ContentTracker, src: &dyn PageSource, ledger: &Ledger) -> Result<ScanResult> {
        let covered = self.covered_pages();
        if covered != ledger.pages() {
            return Err(SoftDirtyError::Coverage { covered, ledger: ledger.pages() });
        }
        if !self.started {
            self.clear()?;
            self.started = true;
            return content.scan(src, ledger).map_err(SoftDirtyError::Content);
        }
        let start = Instant::now();
        let dirty = self.dirty_pages()?;
        self.clear()?;
        Ok(ScanResult { dirty, duration: start.elapsed() })
    }
}

/// Device and inode of a file, as [`guest_ram_ranges`] wants them.
pub fn file_identity(file: &File) -> io::Result<(u64, u64)> {
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

#[cfg(test)]
#[path = "softdirty_tests.rs"]
mod tests;
