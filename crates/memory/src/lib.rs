//! livemig memory: finds and maps the guest RAM of a QEMU process from its QMP socket alone.
//!
//! The guest RAM must be shared memory (`memory-backend-memfd,share=on` or
//! `memory-backend-file,share=on,mem-path=...`). [`GuestMemory::open`] asks QEMU (over QMP) for
//! its memory backends and its pid, finds the backing file of each backend (the file at
//! `mem-path`, or the memfd among the QEMU process's open files) and maps it shared, read-write.
//! Pages are copied in and out with raw-pointer copies only, because the guest may write them
//! at any time.
//!
//! A mapping stays valid only while the backing file keeps its size: if something truncated it,
//! accesses past the new end would raise SIGBUS. QEMU never resizes these files.

mod map;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use livemig_qmp::{Qmp, QmpError};

use map::Mapping;

/// Size of a guest page as livemig handles it.
pub const PAGE_SIZE: usize = 4096;

/// `PAGE_SIZE` as u64 (lossless on every target).
const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;

/// Example QEMU options for shared guest RAM, quoted in error messages.
pub const SHARED_MEMORY_HINT: &str =
    "-object memory-backend-memfd,id=mem0,size=512M,share=on -machine memory-backend=mem0";

/// A page-sized, cache-line aligned buffer.
#[derive(Clone, PartialEq, Eq)]
#[repr(C, align(64))]
pub struct PageBuf(pub [u8; PAGE_SIZE]);

impl PageBuf {
    /// A page of zeros.
    pub fn zeroed() -> PageBuf {
        PageBuf([0; PAGE_SIZE])
    }
}

impl Default for PageBuf {
    fn default() -> Self {
        PageBuf::zeroed()
    }
}

impl fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nonzero = self.0.iter().filter(|&&b| b != 0).count();
        write!(
            f,
            "PageBuf({nonzero} non-zero bytes, starts {:02x?})",
            &self.0[..8]
        )
    }
}

/// Everything that can go wrong finding, mapping or accessing guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A QMP query failed.
    #[error("asking QEMU about its guest memory failed")]
    Qmp(#[source] QmpError),
    /// The guest RAM (or part of it) is not shared memory, or there is no memdev at all.
    #[error("{}", not_shared_message(.id.as_deref()))]
    NotShared {
        /// The memdev with `share=off`, or `None` when the VM has no memdev.
        id: Option<String>,
    },
    /// A memdev of a type livemig cannot reach from outside QEMU.
    #[error("memdev `{id}` is a {backend}; livemig needs memory-backend-memfd or memory-backend-file with share=on, e.g. `{SHARED_MEMORY_HINT}`")]
    UnsupportedBackend {
        /// Memdev id.
        id: String,
        /// Its QOM type.
        backend: String,
    },
    /// QEMU answered something that makes no sense here.
    #[error("QEMU reported something unexpected about its memory: {0}")]
    Unexpected(String),
    /// No memfd of the memdev's size among QEMU's open files.
    #[error(
        "found no memfd of {size} bytes among the open files of QEMU (pid {pid}) for memdev `{id}`"
    )]
    MemfdNotFound {
        /// Memdev id.
        id: String,
        /// Its size.
        size: u64,
        /// QEMU's pid.
        pid: u32,
    },
    /// Several memfds could be the memdev's and nothing tells them apart.
    #[error("cannot tell which memfd belongs to which memdev ({ids}): {candidates} memfds of QEMU have their size of {size} bytes; give memfd memdevs distinct sizes or use memory-backend-file")]
    AmbiguousMemfd {
        /// The memdev id(s) of that size, comma separated.
        ids: String,
        /// The size.
        size: u64,
        /// How many memfds of that size QEMU holds.
        candidates: usize,
    },
    /// The backing file does not have the memdev's size.
    #[error("the file {} of memory region `{id}` has {actual} bytes, expected {expected}", path.display())]
    SizeMismatch {
        /// Region id.
        id: String,
        /// File path.
        path: PathBuf,
        /// The memdev's size.
        expected: u64,
        /// The file's size.
        actual: u64,
    },
    /// The size cannot be mapped as whole pages.
    #[error("memory region `{id}` has {size} bytes, which is not a positive multiple of the {PAGE_SIZE}-byte page")]
    BadSize {
        /// Region id.
        id: String,
        /// Its size.
        size: u64,
    },
    /// A file or /proc operation failed.
    #[error("cannot {what}")]
    Io {
        /// What was attempted, e.g. "open /proc/1234/fd/17".
        what: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A page index past the end.
    #[error("page {index} is out of range: {region} has {pages} pages")]
    OutOfRange {
        /// "region `id`" or "the guest memory".
        region: String,
        /// The index asked for.
        index: u64,
        /// The number of pages there are.
        pages: u64,
    },
}

fn not_shared_message(id: Option<&str>) -> String {
    let what = match id {
        Some(id) => format!("memdev `{id}` of the VM is not shared (share=off, or the default private RAM of a plain `-m`)"),
        None => "the VM has no memory backend (memdev), so its RAM is private to QEMU".to_owned(),
    };
    format!(
        "{what}; livemig needs the guest RAM in shared memory: start QEMU with share=on, e.g. `{SHARED_MEMORY_HINT}` (or memory-backend-file,mem-path=...,share=on)"
    )
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> MemoryError {
    let what = what.into();
    move |source| MemoryError::Io { what, source }
}

/// What backs a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `memory-backend-memfd`, reached through /proc/PID/fd.
    Memfd,
    /// `memory-backend-file` (or a file given to [`GuestMemory::open_file`]): the path as QEMU
    /// names it.
    File(PathBuf),
}

/// One shared RAM region (one memdev), mapped read-write.
#[derive(Debug)]
pub struct Region {
    id: String,
    size: u64,
    backend: Backend,
    map: Mapping,
    /// Device and inode of the backing file (how the QEMU process's mappings of it are found).
    file_id: (u64, u64),
    /// The backing file, for `SEEK_DATA`/`SEEK_HOLE` and punching holes.
    file: File,
    /// The file is on tmpfs (a memfd, /dev/shm): punching a hole in it frees pages that then
    /// read as zero (see [`GuestMemory::zero_pages`]).
    punchable: bool,
}

/// `f_type` of tmpfs (`TMPFS_MAGIC`, linux/magic.h): memfds (but for hugetlb ones, which are
/// on hugetlbfs) and /dev/shm files.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Whether `file` is on tmpfs.
#[allow(clippy::useless_conversion)] // f_type is i64 here, narrower on other architectures
fn on_tmpfs(file: &File) -> bool {
    rustix::fs::fstatfs(file).is_ok_and(|st| i64::from(st.f_type) == TMPFS_MAGIC)
}

/// How [`GuestMemory::zero_pages`] made pages zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Zeroed {
    /// Pages freed by punching a hole (tmpfs: a memfd, /dev/shm).
    pub punched: u64,
    /// Pages written with zeros (any other file: hugetlbfs rounds a 4 KiB punch to nothing, and
    /// other file systems are not relied on).
    pub written: u64,
}

impl Region {
    /// Maps `file` (opened read-write) after checking its size.
    fn map(
        id: &str,
        backend: Backend,
        file: &File,
        shown: &Path,
        size: u64,
    ) -> Result<Region, MemoryError> {
        if size == 0 || size / PAGE_SIZE_U64 * PAGE_SIZE_U64 != size {
            return Err(MemoryError::BadSize {
                id: id.to_owned(),
                size,
            });
        }
        let actual = file
            .metadata()
            .map_err(io_error(format!("stat {}", shown.display())))?
            .len();
        if actual != size {
            return Err(MemoryError::SizeMismatch {
                id: id.to_owned(),
                path: shown.to_owned(),
                expected: size,
                actual,
            });
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize {
            id: id.to_owned(),
            size,
        })?;
        let meta = file.metadata().map_err(io_error(format!("stat {}", shown.display())))?;
        let file_id = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino())
        };
        let map = Mapping::new(file, len).map_err(io_error(format!("map {}", shown.display())))?;
        let file = file.try_clone().map_err(io_error(format!("duplicate the descriptor of {}", shown.display())))?;
        let punchable = on_tmpfs(&file);
        Ok(Region {
            id: id.to_owned(),
            size,
            backend,
            map,
            file_id,
            file,
            punchable,
        })
    }

    /// The memdev id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// What backs it.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Device and inode of the backing file.
    pub fn file_id(&self) -> (u64, u64) {
        self.file_id
    }

    /// The page ranges of the region that may hold data (`SEEK_DATA`/`SEEK_HOLE`); pages outside
    /// them are holes, which read as zero. `None` if the file system cannot say. Reading a hole
    /// of shared memory through the mapping would allocate it: callers that only look for data
    /// skip the holes.
    pub fn data_ranges(&self) -> Option<Vec<std::ops::Range<u64>>> {
        use rustix::fs::{seek, SeekFrom};
        let size = self.size;
        let mut out = Vec::new();
        let mut off: u64 = 0;
        while off < size {
            let data = match seek(&self.file, SeekFrom::Data(off)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => break,
                Err(_) => return None,
            };
            let hole = match seek(&self.file, SeekFrom::Hole(data)) {
                Ok(h) => h.min(size),
                Err(_) => return None,
            };
            if data >= size {
                break;
            }
            out.push(data / PAGE_SIZE_U64..hole.div_ceil(PAGE_SIZE_U64));
            off = hole.max(data + 1);
        }
        Some(out)
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE_U64
    }

    fn out_of_range(&self, index: u64) -> MemoryError {
        MemoryError::OutOfRange {
            region: format!("region `{}`", self.id),
            index,
            pages: self.pages(),
        }
    }

    /// Byte offset of page `index`, checked.
    fn offset(&self, index: u64) -> Result<usize, MemoryError> {
        if index >= self.pages() {
            return Err(self.out_of_range(index));
        }
        index
            .checked_mul(PAGE_SIZE_U64)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|&o| o < self.map.len())
            .ok_or_else(|| self.out_of_range(index))
    }

    /// Copies page `index` into `buf`. The guest may write the page meanwhile; the copy is
    /// then a mix of old and new bytes.
    pub fn read_page(&self, index: u64, buf: &mut PageBuf) -> Result<(), MemoryError> {
        self.read_page_into(index, &mut buf.0)
    }

    /// Copies page `index` into any page-sized buffer (no alignment needed).
    pub fn read_page_into(&self, index: u64, dst: &mut [u8; PAGE_SIZE]) -> Result<(), MemoryError> {
        let off = self.offset(index)?;
        self.map.read(off, dst).ok_or_else(|| self.out_of_range(index))
    }

    /// Writes `data` into page `index`.
    pub fn write_page(&self, index: u64, data: &[u8; PAGE_SIZE]) -> Result<(), MemoryError> {
        let off = self.offset(index)?;
        self.map
            .write(off, data)
            .ok_or_else(|| self.out_of_range(index))
    }

    /// [`GuestMemory::populate_write`] within this region.
    fn populate_write(&self, pages: std::ops::Range<u64>) -> Result<(), MemoryError> {
        let off = self.offset(pages.start)?;
        let len = usize::try_from((pages.end - pages.start) * PAGE_SIZE as u64).map_err(|_| self.out_of_range(pages.end))?;
        match self.map.populate_write(off, len) {
            Some(r) => r.map_err(|source| MemoryError::Io { what: format!("populate pages of memory region `{}` for writing", self.id), source }),
            None => Err(self.out_of_range(pages.end.saturating_sub(1))),
        }
    }

    /// Fills page `index` with zeros.
    pub fn zero_page(&self, index: u64) -> Result<(), MemoryError> {
        let off = self.offset(index)?;
        self.map.zero(off).ok_or_else(|| self.out_of_range(index))
    }

    /// Makes pages `pages` (of this region) zero: a hole punched on tmpfs, zeros written
    /// elsewhere.
    fn zero_pages(&self, pages: std::ops::Range<u64>) -> Result<Zeroed, MemoryError> {
        if pages.is_empty() {
            return Ok(Zeroed::default());
        }
        if pages.end > self.pages() {
            return Err(self.out_of_range(pages.end - 1));
        }
        if !self.punchable {
            for p in pages.clone() {
                self.zero_page(p)?;
            }
            return Ok(Zeroed { punched: 0, written: pages.end - pages.start });
        }
        use rustix::fs::{fallocate, FallocateFlags};
        let (off, len) = (pages.start * PAGE_SIZE_U64, (pages.end - pages.start) * PAGE_SIZE_U64);
        fallocate(&self.file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, off, len).map_err(|e| MemoryError::Io {
            what: format!("punch a hole of {len} bytes at {off} in memory region `{}`", self.id),
            source: e.into(),
        })?;
        Ok(Zeroed { punched: pages.end - pages.start, written: 0 })
    }
}

/// All shared RAM regions of a VM, sorted by id, with one global page numbering across them.
#[derive(Debug)]
pub struct GuestMemory {
    /// The regions, sorted by id.
    pub regions: Vec<Region>,
    /// The QEMU process, when found through its QMP socket.
    pub pid: Option<u32>,
}

/// A memdev livemig will map.
struct Wanted {
    id: String,
    size: u64,
    kind: Kind,
}

enum Kind {
    Memfd,
    File(PathBuf),
}

fn qom_string(qmp: &mut Qmp, id: &str, property: &str) -> Result<String, MemoryError> {
    let v = qmp
        .qom_get(&format!("/objects/{id}"), property)
        .map_err(MemoryError::Qmp)?;
    v.as_str().map(str::to_owned).ok_or_else(|| {
        MemoryError::Unexpected(format!(
            "property `{property}` of /objects/{id} is not a string: {v}"
        ))
    })
}

/// The path under which this process can open `path` as QEMU (pid) sees it.
fn path_in(pid: u32, path: &Path) -> PathBuf {
    if let Ok(rel) = path.strip_prefix("/") {
        let p = Path::new("/proc")
            .join(pid.to_string())
            .join("root")
            .join(rel);
        if p.exists() {
            return p;
        }
    }
    path.to_owned()
}

fn open_rw(path: &Path) -> Result<File, MemoryError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_error(format!("open {} read-write", path.display())))
}

/// An open memfd of QEMU.
struct MemfdCandidate {
    file: File,
    proc_path: PathBuf,
    size: u64,
}

/// Every distinct memfd QEMU (pid) has open, with its size.
fn memfds_of(pid: u32) -> Result<Vec<MemfdCandidate>, MemoryError> {
    let dir = Path::new("/proc").join(pid.to_string()).join("fd");
    let entries = std::fs::read_dir(&dir).map_err(io_error(format!("list {}", dir.display())))?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error(format!("list {}", dir.display())))?;
        let proc_path = entry.path();
        // fds come and go while we look: skip those that vanished.
        let Ok(target) = std::fs::read_link(&proc_path) else {
            continue;
        };
        if !target
            .as_os_str()
            .as_encoded_bytes()
            .starts_with(b"/memfd:")
        {
            continue;
        }
        let file = match OpenOptions::new().read(true).write(true).open(&proc_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(format!("open {}", proc_path.display()))(e)),
        };
        let meta = file
            .metadata()
            .map_err(io_error(format!("stat {}", proc_path.display())))?;
        if seen.insert((meta.dev(), meta.ino())) {
            out.push(MemfdCandidate {
                file,
                proc_path,
                size: meta.len(),
            });
        }
    }
    Ok(out)
}

impl GuestMemory {
    /// Finds and maps the guest RAM of the QEMU at the other end of `qmp`.
    ///
    /// Every memdev must be `share=on` (a VM without memdevs is refused the same way, with
    /// [`MemoryError::NotShared`]). A `memory-backend-file` is opened at its `mem-path` (through
    /// /proc/PID/root when QEMU runs in another mount namespace); a `memory-backend-memfd` is the
    /// memfd among QEMU's open files whose size is the memdev's size.
    pub fn open(qmp: &mut Qmp) -> Result<GuestMemory, MemoryError> {
        let pid = qmp.peer_pid().map_err(MemoryError::Qmp)?;
        let memdevs = qmp.query_memdev().map_err(MemoryError::Qmp)?;
        if memdevs.is_empty() {
            return Err(MemoryError::NotShared { id: None });
        }
        let mut wanted = Vec::new();
        for m in memdevs {
            let id =
                m.id.clone()
                    .ok_or_else(|| MemoryError::Unexpected("a memdev has no id".to_owned()))?;
            if !m.share {
                return Err(MemoryError::NotShared { id: Some(id) });
            }
            let backend = qom_string(qmp, &id, "type")?;
            let kind = match backend.as_str() {
                "memory-backend-memfd" => Kind::Memfd,
                "memory-backend-file" => {
                    Kind::File(PathBuf::from(qom_string(qmp, &id, "mem-path")?))
                }
                _ => return Err(MemoryError::UnsupportedBackend { id, backend }),
            };
            wanted.push(Wanted {
                id,
                size: m.size,
                kind,
            });
        }

        let mut regions = Vec::new();
        let mut memfd_sizes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for w in &wanted {
            match &w.kind {
                Kind::File(path) => {
                    let local = path_in(pid, path);
                    let file = open_rw(&local)?;
                    regions.push(Region::map(
                        &w.id,
                        Backend::File(path.clone()),
                        &file,
                        &local,
                        w.size,
                    )?);
                }
                Kind::Memfd => memfd_sizes.entry(w.size).or_default().push(w.id.clone()),
            }
        }
        if !memfd_sizes.is_empty() {
            let mut memfds = memfds_of(pid)?;
            for (size, mut ids) in memfd_sizes {
                ids.sort();
                let mut fitting: Vec<MemfdCandidate> = Vec::new();
                let mut rest = Vec::new();
                for c in memfds {
                    if c.size == size {
                        fitting.push(c);
                    } else {
                        rest.push(c);
                    }
                }
                memfds = rest;
                match (ids.as_slice(), fitting.as_slice()) {
                    ([id], [c]) => regions.push(Region::map(
                        id,
                        Backend::Memfd,
                        &c.file,
                        &c.proc_path,
                        size,
                    )?),
                    ([id], []) => {
                        return Err(MemoryError::MemfdNotFound {
                            id: id.clone(),
                            size,
                            pid,
                        })
                    }
                    _ => {
                        return Err(MemoryError::AmbiguousMemfd {
                            ids: ids.join(", "),
                            size,
                            candidates: fitting.len(),
                        })
                    }
                }
            }
        }
        regions.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(GuestMemory { regions, pid: Some(pid) })
    }

    /// One region `id` backed by the file at `path`, which must have exactly `size` bytes.
    pub fn open_file(id: &str, path: &Path, size: u64) -> Result<GuestMemory, MemoryError> {
        let file = open_rw(path)?;
        let region = Region::map(id, Backend::File(path.to_owned()), &file, path, size)?;
        Ok(GuestMemory {
            regions: vec![region],
            pid: None,
        })
    }

    /// Pages of all regions together.
    pub fn total_pages(&self) -> u64 {
        self.regions.iter().map(Region::pages).sum()
    }

    /// [`Region::data_ranges`] of every region, in global page numbers; `None` if any region
    /// cannot say.
    pub fn data_ranges(&self) -> Option<Vec<std::ops::Range<u64>>> {
        let mut out = Vec::new();
        let mut base = 0;
        for r in &self.regions {
            out.extend(r.data_ranges()?.into_iter().map(|x| x.start + base..x.end + base));
            base += r.pages();
        }
        Some(out)
    }

    /// The (region index, page index in that region) of global page `global`, numbering the
    /// pages of the regions one after the other in order.
    pub fn locate(&self, global: u64) -> Option<(usize, u64)> {
        let mut rest = global;
        for (i, r) in self.regions.iter().enumerate() {
            let pages = r.pages();
            if rest < pages {
                return Some((i, rest));
            }
            rest -= pages;
        }
        None
    }

    fn region_of(&self, global: u64) -> Result<(&Region, u64), MemoryError> {
        let (r, index) = self.locate(global).ok_or_else(|| MemoryError::OutOfRange {
            region: "the guest memory".to_owned(),
            index: global,
            pages: self.total_pages(),
        })?;
        Ok((&self.regions[r], index))
    }

    /// Copies global page `global` into `buf`.
    pub fn read_page(&self, global: u64, buf: &mut PageBuf) -> Result<(), MemoryError> {
        self.read_page_into(global, &mut buf.0)
    }

    /// Copies global page `global` into any page-sized buffer (no alignment needed).
    pub fn read_page_into(&self, global: u64, dst: &mut [u8; PAGE_SIZE]) -> Result<(), MemoryError> {
        let (r, index) = self.region_of(global)?;
        r.read_page_into(index, dst)
    }

    /// Writes `data` into global page `global`.
    pub fn write_page(&self, global: u64, data: &[u8; PAGE_SIZE]) -> Result<(), MemoryError> {
        let (r, index) = self.region_of(global)?;
        r.write_page(index, data)
    }

    /// Fills global page `global` with zeros.
    pub fn zero_page(&self, global: u64) -> Result<(), MemoryError> {
        let (r, index) = self.region_of(global)?;
        r.zero_page(index)
    }

    /// Allocates and maps global pages `pages` for writing ahead of the writes (one system call
    /// instead of a page fault per page; contents unchanged). An error (a kernel older than
    /// 5.14 refuses) changes nothing: the writes then fault the pages in one by one.
    pub fn populate_write(&self, pages: std::ops::Range<u64>) -> Result<(), MemoryError> {
        if pages.end > self.total_pages() {
            return Err(MemoryError::OutOfRange {
                region: "the guest memory".to_owned(),
                index: pages.end - 1,
                pages: self.total_pages(),
            });
        }
        let mut base = 0u64;
        for r in &self.regions {
            let end = base + r.pages();
            let (from, to) = (pages.start.max(base), pages.end.min(end));
            if from < to {
                r.populate_write(from - base..to - base)?;
            }
            base = end;
        }
        Ok(())
    }

    /// Makes global pages `pages` zero: on tmpfs (a memfd, /dev/shm) by punching a hole, which
    /// frees them (the mapping then reads zeros; nothing is allocated until the guest writes
    /// them), elsewhere by writing zeros. Says how many went each way.
    pub fn zero_pages(&self, pages: std::ops::Range<u64>) -> Result<Zeroed, MemoryError> {
        if pages.end > self.total_pages() {
            return Err(MemoryError::OutOfRange {
                region: "the guest memory".to_owned(),
                index: pages.end - 1,
                pages: self.total_pages(),
            });
        }
        let mut done = Zeroed::default();
        let mut base = 0u64;
        for r in &self.regions {
            let end = base + r.pages();
            let (from, to) = (pages.start.max(base), pages.end.min(end));
            if from < to {
                let z = r.zero_pages(from - base..to - base)?;
                done.punched += z.punched;
                done.written += z.written;
            }
            base = end;
        }
        Ok(done)
    }

    /// (id, size in bytes) of every region, in order: what both sides of a migration compare.
    pub fn layout(&self) -> Vec<(String, u64)> {
        self.regions
            .iter()
            .map(|r| (r.id.clone(), r.size))
            .collect()
    }
}

#[cfg(test)]
mod tests;
