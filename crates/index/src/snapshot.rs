//! Memory snapshots: the last memory image of a VM kept after a migration, keyed by VM identity,
//! so that a later migration of that VM to a host holding the same snapshot sends references
//! (snapshot page + [`Fingerprint`]) for pages unchanged since.
//!
//! Both sides of a successful migration store byte-identical snapshots under the same id (the
//! migration's final 128-bit memory digest). Layout of a store directory:
//!
//! ```text
//! DIR/<escaped vm id>/<id as 32 hex digits>/memory.raw        pages * 4 KiB, sparse: zero pages are holes
//!                                          /fingerprints.bin  16 bytes (xxh3-128, little endian) per page
//!                                          /meta.json         vm, id, pages, created, bytes, format, checksum
//! DIR/.tmp-*                                                  snapshots being written (never listed)
//! ```
//!
//! A snapshot is written into a temporary directory and renamed into place by
//! [`SnapshotWriter::finish`]; a writer dropped without finishing removes its directory. After
//! publishing, the oldest snapshots (of every VM) are evicted until the store fits its byte
//! budget (allocated bytes on disk, so holes do not count).
//!
//! A snapshot is a copy of guest memory, keys and passwords included: the store directory is
//! created mode 0700 and every directory and file in it 0700 / 0600, and [`SnapshotStore::open`]
//! refuses a directory of another user or one that group or others have any permission on
//! ([`SnapshotError::Insecure`], which says how to fix it).
//!
//! Nothing is fsynced: a snapshot is a cache. Opening checks the meta, the file sizes and the
//! checksum of the fingerprints, and [`Snapshot::read_page`] checks every page it reads against
//! its fingerprint, so a snapshot torn by a crash (or damaged since) yields errors, never wrong
//! pages.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use crate::private::{self, DirError, InsecureDir};
use crate::{Fingerprint, BLOCK_SIZE, BLOCK_SIZE_U64};

/// Version of the on-disk snapshot format (in meta.json).
pub const SNAPSHOT_FORMAT: u32 = 1;

const MEMORY_FILE: &str = "memory.raw";
const FINGERPRINTS_FILE: &str = "fingerprints.bin";
const META_FILE: &str = "meta.json";
const TMP_PREFIX: &str = ".tmp-";
/// Longest escaped VM directory name kept as is; longer ones are shortened and hashed.
const MAX_VM_DIR_NAME: usize = 128;
/// Largest meta.json read (a valid one is a few hundred bytes plus the VM id).
const MAX_META_BYTES: u64 = 1 << 20;

/// Everything that can go wrong with a snapshot store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The store directory cannot be created or read.
    #[error("cannot use the snapshot directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The store directory belongs to another user, or group or others can use it.
    #[error(transparent)]
    Insecure(InsecureDir),
    /// A snapshot file or directory cannot be written (disk full, read-only, removed...).
    #[error("cannot write the snapshot file {path}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A snapshot file cannot be read.
    #[error("cannot read the snapshot file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A snapshot file is truncated, corrupted or of another format.
    #[error("the snapshot file {path} is invalid: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A page read from the snapshot does not have its recorded fingerprint.
    #[error("page {page} of the snapshot file {path} does not match its fingerprint: the snapshot is damaged")]
    PageMismatch {
        /// memory.raw of the snapshot.
        path: PathBuf,
        /// The page.
        page: u64,
    },
    /// A page index beyond the end of the snapshot.
    #[error("page {page} is beyond the end of the snapshot ({pages} pages)")]
    PageOutOfRange {
        /// The page asked for.
        page: u64,
        /// Pages the snapshot has.
        pages: u64,
    },
    /// The VM id cannot name a snapshot.
    #[error("a snapshot needs a non-empty VM id")]
    EmptyVmId,
    /// More pages than a file or this machine's memory can address.
    #[error("a snapshot of {pages} pages is too large")]
    TooManyPages {
        /// The pages asked for.
        pages: u64,
    },
    /// The snapshot just written alone exceeds the store's budget; it was removed.
    #[error("the snapshot of VM {vm:?} takes {bytes} bytes on disk, more than the snapshot store's limit of {max_bytes} bytes; it was not kept")]
    OverBudget {
        /// The VM.
        vm: String,
        /// Bytes it took on disk.
        bytes: u64,
        /// The store's budget.
        max_bytes: u64,
    },
    /// No such snapshot in the store.
    #[error("no snapshot {id:032x} of VM {vm:?} in the store")]
    NotFound {
        /// The VM.
        vm: String,
        /// The snapshot id.
        id: u128,
    },
    /// The page source of [`save_from`] failed.
    #[error("cannot read page {page} of the memory to snapshot")]
    Source {
        /// The page.
        page: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
}

type Result<T, E = SnapshotError> = std::result::Result<T, E>;

/// What the store knows of one published snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// The VM's identity (as given to [`SnapshotStore::writer`]).
    pub vm: String,
    /// The snapshot id (the migration's final memory digest).
    #[serde(with = "crate::hex128")]
    pub id: u128,
    /// Pages of 4 KiB.
    pub pages: u64,
    /// When it was published, in nanoseconds since the Unix epoch.
    pub created_unix_nanos: u64,
    /// Bytes allocated on disk by its files now (holes do not count).
    pub bytes: u64,
    /// Its directory.
    pub path: PathBuf,
}

impl SnapshotInfo {
    /// When it was published.
    pub fn created(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.created_unix_nanos)
    }

    /// Time since it was published (zero if the clock went back).
    pub fn age(&self) -> Duration {
        SystemTime::now().duration_since(self.created()).unwrap_or_default()
    }
}

/// meta.json.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    format: u32,
    vm: String,
    #[serde(with = "crate::hex128")]
    id: u128,
    pages: u64,
    created_unix_nanos: u64,
    /// Bytes allocated by memory.raw and fingerprints.bin when published.
    bytes: u64,
    /// xxh3-128 of fingerprints.bin.
    #[serde(with = "crate::hex128")]
    fingerprints_hash: u128,
}

/// A directory of memory snapshots with a byte budget.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
    max_bytes: u64,
}

/// Distinguishes the temporary directories of writers of one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn zero_fingerprint() -> u128 {
    static ZERO: OnceLock<u128> = OnceLock::new();
    *ZERO.get_or_init(|| Fingerprint::of(&[0u8; BLOCK_SIZE]).0)
}

/// The directory name of a VM id: bytes other than ASCII letters, digits, `_`, `-` and a `.`
/// that is not the first character are escaped as `%XX`, so no id can name `.`, `..`, a path or
/// a temporary directory. Names longer than 128 bytes are cut and followed by `~` and a hash of
/// the whole id (`~` never appears in an escaped name). The id itself is kept in meta.json.
pub fn vm_dir_name(vm: &str) -> Result<String> {
    if vm.is_empty() {
        return Err(SnapshotError::EmptyVmId);
    }
    let mut s = String::with_capacity(vm.len());
    for (i, &b) in vm.as_bytes().iter().enumerate() {
        let keep = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0);
        if keep {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    if s.len() > MAX_VM_DIR_NAME {
        s.truncate(64);
        s.push_str(&format!("~{:032x}", xxh3_128(vm.as_bytes())));
    }
    Ok(s)
}

fn now_unix_nanos() -> u64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn memory_len(pages: u64) -> Result<u64> {
    pages.checked_mul(BLOCK_SIZE_U64).ok_or(SnapshotError::TooManyPages { pages })
}

/// Bytes allocated on disk by a file (0 if it is gone).
fn allocated(path: &Path) -> u64 {
    fs::symlink_metadata(path).map_or(0, |m| m.blocks().saturating_mul(512))
}

fn is_id_name(name: &str) -> Option<u128> {
    if name.len() == 32 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        u128::from_str_radix(name, 16).ok()
    } else {
        None
    }
}

/// Removes a directory tree; one already gone is fine.
fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

impl SnapshotStore {
    /// Opens (creating it mode 0700 if needed) a store in `dir` that keeps at most `max_bytes`
    /// allocated on disk. A directory of another user, or one that group or others have any
    /// permission on, is refused ([`SnapshotError::Insecure`]). Temporary directories left by
    /// writers of processes that no longer run are removed.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<SnapshotStore> {
        let dir = dir.into();
        let derr = |source| SnapshotError::Dir { path: dir.clone(), source };
        private::private_dir(&dir, "snapshot directory", "copies of guest memory (with the guest's keys and passwords)")
            .map_err(|e| match e {
                DirError::Io(source) => derr(source),
                DirError::Insecure(i) => SnapshotError::Insecure(i),
            })?;
        for entry in fs::read_dir(&dir).map_err(derr)? {
            let entry = entry.map_err(derr)?;
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TMP_PREFIX)) else { continue };
            let pid = rest.split('-').next().unwrap_or("");
            let alive = pid.parse::<u32>().is_ok_and(|p| Path::new("/proc").join(p.to_string()).exists());
            if !alive {
                // Best effort: another process may be cleaning it too.
                let _ = remove_tree(&entry.path());
            }
        }
        Ok(SnapshotStore { dir, max_bytes })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The byte budget.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn snapshot_dir(&self, vm: &str, id: u128) -> Result<PathBuf> {
        Ok(self.dir.join(vm_dir_name(vm)?).join(format!("{id:032x}")))
    }

    /// Starts writing a snapshot of `pages` pages (all zero until written) of VM `vm`.
    pub fn writer(&self, vm: &str, pages: u64) -> Result<SnapshotWriter<'_>> {
        vm_dir_name(vm)?;
        let len = memory_len(pages)?;
        let fps_len = usize::try_from(pages).map_err(|_| SnapshotError::TooManyPages { pages })?;
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!("{TMP_PREFIX}{}-{n}-{}", std::process::id(), now_unix_nanos()));
        private::create_dir(&tmp).map_err(|source| SnapshotError::Write { path: tmp.clone(), source })?;
        let memory_path = tmp.join(MEMORY_FILE);
        // From here on the writer's drop removes the directory on any error.
        let mut w = SnapshotWriter {
            store: self,
            vm: vm.to_owned(),
            pages,
            memory_path: memory_path.clone(),
            tmp,
            memory: None,
            fingerprints: Vec::new(),
            finished: false,
        };
        let werr = |source| SnapshotError::Write { path: memory_path.clone(), source };
        let f = private::create_new_file(&memory_path).map_err(werr)?;
        f.set_len(len).map_err(werr)?;
        w.memory = Some(f);
        w.fingerprints = vec![zero_fingerprint(); fps_len];
        Ok(w)
    }

    /// Every published snapshot whose meta.json is readable and valid, oldest first (ties by VM
    /// and id). Entries that are not valid snapshots are skipped.
    pub fn list(&self) -> Result<Vec<SnapshotInfo>> {
        let derr = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SnapshotError::Dir { path, source }
        };
        let mut out = Vec::new();
        for vm_entry in fs::read_dir(&self.dir).map_err(derr(&self.dir))? {
            let vm_entry = vm_entry.map_err(derr(&self.dir))?;
            let vm_name = vm_entry.file_name();
            let Some(vm_name) = vm_name.to_str() else { continue };
            if vm_name.starts_with('.') || !vm_entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let vm_dir = vm_entry.path();
            let entries = match fs::read_dir(&vm_dir) {
                Ok(e) => e,
                // Removed meanwhile (by a concurrent remove or eviction).
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(derr(&vm_dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(derr(&vm_dir))?;
                let name = entry.file_name();
                let Some(id) = name.to_str().and_then(is_id_name) else { continue };
                let path = entry.path();
                let Ok(meta) = read_meta(&path.join(META_FILE)) else { continue };
                if meta.id != id || vm_dir_name(&meta.vm).ok().as_deref() != Some(vm_name) {
                    continue;
                }
                out.push(info_of(meta, path));
            }
        }
        out.sort_by(|a, b| (a.created_unix_nanos, &a.vm, a.id).cmp(&(b.created_unix_nanos, &b.vm, b.id)));
        Ok(out)
    }

    /// Opens snapshot `id` of `vm`, checking its files.
    pub fn get(&self, vm: &str, id: u128) -> Result<Snapshot> {
        let path = self.snapshot_dir(vm, id)?;
        if !path.join(META_FILE).exists() {
            return Err(SnapshotError::NotFound { vm: vm.to_owned(), id });
        }
        Snapshot::open(&path, vm, id)
    }

    /// The newest snapshot of `vm`, if any (an error if the newest one is damaged).
    pub fn latest(&self, vm: &str) -> Result<Option<Snapshot>> {
        let newest = self.list()?.into_iter().rfind(|i| i.vm == vm);
        newest.map(|i| Snapshot::open(&i.path, vm, i.id)).transpose()
    }

    /// Removes snapshot `id` of `vm`.
    pub fn remove(&self, vm: &str, id: u128) -> Result<()> {
        let path = self.snapshot_dir(vm, id)?;
        if !path.exists() {
            return Err(SnapshotError::NotFound { vm: vm.to_owned(), id });
        }
        self.remove_dir(&path)
    }

    /// Removes every snapshot of `vm`; returns how many there were.
    pub fn remove_vm(&self, vm: &str) -> Result<usize> {
        let mut n = 0;
        for info in self.list()?.into_iter().filter(|i| i.vm == vm) {
            self.remove_dir(&info.path)?;
            n += 1;
        }
        Ok(n)
    }

    /// Removes a snapshot directory, and its VM directory if that is left empty.
    fn remove_dir(&self, path: &Path) -> Result<()> {
        remove_tree(path).map_err(|source| SnapshotError::Write { path: path.to_path_buf(), source })?;
        if let Some(parent) = path.parent() {
            // Fails harmlessly when other snapshots of the VM remain.
            let _ = fs::remove_dir(parent);
        }
        Ok(())
    }

    /// Evicts the oldest snapshots other than `keep` until the store fits its budget.
    fn evict(&self, keep: &SnapshotInfo) -> Result<()> {
        let all = self.list()?;
        let mut total: u64 = all.iter().map(|i| i.bytes).sum();
        for info in &all {
            if total <= self.max_bytes {
                break;
            }
            if info.path == keep.path {
                continue;
            }
            self.remove_dir(&info.path)?;
            total = total.saturating_sub(info.bytes);
        }
        Ok(())
    }
}

fn info_of(meta: Meta, path: PathBuf) -> SnapshotInfo {
    let bytes = [MEMORY_FILE, FINGERPRINTS_FILE, META_FILE].iter().map(|f| allocated(&path.join(f))).sum();
    SnapshotInfo { vm: meta.vm, id: meta.id, pages: meta.pages, created_unix_nanos: meta.created_unix_nanos, bytes, path }
}

fn read_meta(path: &Path) -> Result<Meta> {
    let rerr = |source| SnapshotError::Read { path: path.to_path_buf(), source };
    let invalid = |reason: String| SnapshotError::Invalid { path: path.to_path_buf(), reason };
    let mut text = Vec::new();
    File::open(path).map_err(rerr)?.take(MAX_META_BYTES).read_to_end(&mut text).map_err(rerr)?;
    let meta: Meta = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
    if meta.format != SNAPSHOT_FORMAT {
        return Err(invalid(format!("format {} (this build reads format {SNAPSHOT_FORMAT})", meta.format)));
    }
    Ok(meta)
}

/// A snapshot being written. Dropped without [`SnapshotWriter::finish`], it leaves nothing.
#[derive(Debug)]
pub struct SnapshotWriter<'a> {
    store: &'a SnapshotStore,
    vm: String,
    pages: u64,
    tmp: PathBuf,
    memory_path: PathBuf,
    memory: Option<File>,
    /// Fingerprint of the last version written of every page.
    fingerprints: Vec<u128>,
    finished: bool,
}

impl SnapshotWriter<'_> {
    /// Pages of the snapshot.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Writes page `page` (any order; the last write of a page wins). A zero page becomes a
    /// hole (punched if the page held data before).
    pub fn write_page(&mut self, page: u64, data: &[u8; BLOCK_SIZE]) -> Result<()> {
        let slot = usize::try_from(page)
            .ok()
            .and_then(|i| self.fingerprints.get_mut(i))
            .ok_or(SnapshotError::PageOutOfRange { page, pages: self.pages })?;
        let Some(file) = &self.memory else {
            return Err(SnapshotError::Write {
                path: self.memory_path.clone(),
                source: io::Error::other("the snapshot writer failed before"),
            });
        };
        let werr = |source| SnapshotError::Write { path: self.memory_path.clone(), source };
        let offset = page * BLOCK_SIZE_U64;
        let fp = Fingerprint::of(data).0;
        let zero = zero_fingerprint();
        if crate::is_zero(data) {
            if *slot != zero {
                punch(file, offset).map_err(werr)?;
            }
        } else {
            file.write_all_at(data, offset).map_err(werr)?;
        }
        *slot = fp;
        Ok(())
    }

    /// Publishes the snapshot under `id` (replacing one with the same VM and id), then evicts
    /// the oldest snapshots until the store fits its budget. If this snapshot alone exceeds the
    /// budget it is removed and [`SnapshotError::OverBudget`] returned.
    pub fn finish(mut self, id: u128) -> Result<SnapshotInfo> {
        let store = self.store;
        let target = store.snapshot_dir(&self.vm, id)?;
        self.memory = None;

        let fps_path = self.tmp.join(FINGERPRINTS_FILE);
        let fingerprints_hash = write_fingerprints(&fps_path, &self.fingerprints)
            .map_err(|source| SnapshotError::Write { path: fps_path.clone(), source })?;
        let bytes = allocated(&self.memory_path) + allocated(&fps_path);
        let meta = Meta {
            format: SNAPSHOT_FORMAT,
            vm: self.vm.clone(),
            id,
            pages: self.pages,
            created_unix_nanos: now_unix_nanos(),
            bytes,
            fingerprints_hash,
        };
        let meta_path = self.tmp.join(META_FILE);
        let text = serde_json::to_vec_pretty(&meta).map_err(|e| SnapshotError::Write {
            path: meta_path.clone(),
            source: io::Error::other(e),
        })?;
        private::create_file(&meta_path)
            .and_then(|mut f| f.write_all(&text))
            .map_err(|source| SnapshotError::Write { path: meta_path.clone(), source })?;

        publish(&self.tmp, &target, &store.dir)?;
        self.finished = true;

        let info = info_of(meta, target);
        if info.bytes > store.max_bytes {
            store.remove_dir(&info.path)?;
            return Err(SnapshotError::OverBudget { vm: info.vm, bytes: info.bytes, max_bytes: store.max_bytes });
        }
        store.evict(&info)?;
        Ok(info)
    }
}

impl Drop for SnapshotWriter<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.memory = None;
            let _ = remove_tree(&self.tmp);
        }
    }
}

/// Makes 4 KiB at `offset` a hole; writes zeros where the file system cannot punch holes.
fn punch(file: &File, offset: u64) -> io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    match fallocate(file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, BLOCK_SIZE_U64) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
            file.write_all_at(&[0u8; BLOCK_SIZE], offset)
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes the fingerprints file; returns its xxh3-128.
fn write_fingerprints(path: &Path, fps: &[u128]) -> io::Result<u128> {
    let mut w = BufWriter::with_capacity(1 << 20, private::create_file(path)?);
    let mut h = Xxh3::new();
    for fp in fps {
        let b = fp.to_le_bytes();
        h.update(&b);
        w.write_all(&b)?;
    }
    w.into_inner().map_err(|e| e.into_error())?;
    Ok(h.digest128())
}

/// Renames the finished temporary directory `tmp` to `target`, replacing a snapshot already there.
fn publish(tmp: &Path, target: &Path, store_dir: &Path) -> Result<()> {
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SnapshotError::Write { path, source }
    };
    if let Some(vm_dir) = target.parent() {
        private::create_dir_all(vm_dir).map_err(werr(vm_dir))?;
    }
    match fs::rename(tmp, target) {
        Ok(()) => Ok(()),
        Err(e)
            if [rustix::io::Errno::NOTEMPTY, rustix::io::Errno::EXIST]
                .iter()
                .any(|n| e.raw_os_error() == Some(n.raw_os_error())) =>
        {
            // A snapshot with this VM and id exists: move it aside, publish, remove it.
            let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let old = store_dir.join(format!("{TMP_PREFIX}{}-{n}-old", std::process::id()));
            fs::rename(target, &old).map_err(werr(target))?;
            let r = fs::rename(tmp, target).map_err(werr(target));
            let _ = remove_tree(&old);
            r
        }
        Err(e) => Err(werr(target)(e)),
    }
}

/// Writes a snapshot of `pages` pages of `vm` under `id`, asking `fill` for every page in order.
pub fn save_from(
    store: &SnapshotStore,
    vm: &str,
    id: u128,
    pages: u64,
    mut fill: impl FnMut(u64, &mut [u8; BLOCK_SIZE]) -> io::Result<()>,
) -> Result<SnapshotInfo> {
    let mut w = store.writer(vm, pages)?;
    let mut buf = Box::new([0u8; BLOCK_SIZE]);
    for page in 0..pages {
        fill(page, &mut buf).map_err(|source| SnapshotError::Source { page, source })?;
        w.write_page(page, &buf)?;
    }
    w.finish(id)
}

/// A published snapshot, open for reading.
#[derive(Debug)]
pub struct Snapshot {
    info: SnapshotInfo,
    memory: File,
    memory_path: PathBuf,
    fingerprints: Vec<u128>,
}

impl Snapshot {
    /// Opens the snapshot in `path`, expected to be snapshot `id` of `vm`.
    fn open(path: &Path, vm: &str, id: u128) -> Result<Snapshot> {
        let meta_path = path.join(META_FILE);
        let meta = read_meta(&meta_path)?;
        let invalid = |p: &Path, reason: String| SnapshotError::Invalid { path: p.to_path_buf(), reason };
        if meta.vm != vm || meta.id != id {
            return Err(invalid(
                &meta_path,
                format!("describes snapshot {:032x} of VM {:?}, expected {id:032x} of {vm:?}", meta.id, meta.vm),
            ));
        }
        let mem_len = memory_len(meta.pages).map_err(|_| invalid(&meta_path, format!("{} pages", meta.pages)))?;
        let fps_len = meta.pages.checked_mul(16).ok_or_else(|| invalid(&meta_path, format!("{} pages", meta.pages)))?;

        let memory_path = path.join(MEMORY_FILE);
        let rerr = |p: &Path| {
            let p = p.to_path_buf();
            move |source| SnapshotError::Read { path: p, source }
        };
        let memory = File::open(&memory_path).map_err(rerr(&memory_path))?;
        let len = memory.metadata().map_err(rerr(&memory_path))?.len();
        if len != mem_len {
            return Err(invalid(&memory_path, format!("{len} bytes, expected {mem_len} ({} pages)", meta.pages)));
        }

        let fps_path = path.join(FINGERPRINTS_FILE);
        let f = File::open(&fps_path).map_err(rerr(&fps_path))?;
        let len = f.metadata().map_err(rerr(&fps_path))?.len();
        if len != fps_len {
            return Err(invalid(&fps_path, format!("{len} bytes, expected {fps_len} ({} pages)", meta.pages)));
        }
        let n = usize::try_from(meta.pages).map_err(|_| SnapshotError::TooManyPages { pages: meta.pages })?;
        let mut fingerprints = Vec::with_capacity(n);
        let mut h = Xxh3::new();
        let mut r = io::BufReader::with_capacity(1 << 20, f);
        let mut b = [0u8; 16];
        for _ in 0..n {
            r.read_exact(&mut b).map_err(rerr(&fps_path))?;
            h.update(&b);
            fingerprints.push(u128::from_le_bytes(b));
        }
        if h.digest128() != meta.fingerprints_hash {
            return Err(invalid(&fps_path, "its checksum does not match meta.json".to_owned()));
        }
        let info = info_of(meta, path.to_path_buf());
        Ok(Snapshot { info, memory, memory_path, fingerprints })
    }

    /// What the store knows of it.
    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    /// Its id.
    pub fn id(&self) -> u128 {
        self.info.id
    }

    /// Its pages.
    pub fn pages(&self) -> u64 {
        self.info.pages
    }

    /// Reads page `page`, checking it against its fingerprint.
    pub fn read_page(&self, page: u64, buf: &mut [u8; BLOCK_SIZE]) -> Result<()> {
        let expected = usize::try_from(page)
            .ok()
            .and_then(|i| self.fingerprints.get(i))
            .ok_or(SnapshotError::PageOutOfRange { page, pages: self.info.pages })?;
        self.memory
            .read_exact_at(buf, page * BLOCK_SIZE_U64)
            .map_err(|source| SnapshotError::Read { path: self.memory_path.clone(), source })?;
        if Fingerprint::of(buf).0 != *expected {
            return Err(SnapshotError::PageMismatch { path: self.memory_path.clone(), page });
        }
        Ok(())
    }

    /// The fingerprint of every page (the zero page's for zero pages).
    pub fn fingerprints(&self) -> &[u128] {
        &self.fingerprints
    }

    /// Fingerprint -> the first page holding it, zero pages excluded: what a sender looks up to
    /// send a page as a reference into this snapshot.
    pub fn lookup_table(&self) -> HashMap<u128, u64> {
        let zero = zero_fingerprint();
        let mut t = HashMap::with_capacity(self.fingerprints.len());
        for (page, &fp) in (0u64..).zip(&self.fingerprints) {
            if fp != zero {
                t.entry(fp).or_insert(page);
            }
        }
        t
    }
}

#[cfg(test)]
#[path = "snapshot_tests.rs"]
mod tests;
