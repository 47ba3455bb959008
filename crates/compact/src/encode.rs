//! The sender side: classifies and encodes pages against what the destination holds.
//!
//! Per page: zero check, one keyed xxh3-128 (the fingerprint records carry and the state is
//! keyed by; [`Encoder::prepare_fingerprinted`] takes it from a caller that computed it already,
//! as the sender pipeline does for its ledger), then dup lookup, then (only when a disk index or snapshot is used) one unkeyed
//! xxh3-128 for their lookups, then delta or compression. The work is split so it can run on several threads: [`Encoder::prepare`] is a
//! pure function of (page bytes, the encoder's state, read only) and writes a [`Prepared`] record;
//! [`Encoder::commit`] appends it to the batch and updates the state, in stream order, on one
//! thread. [`Encoder::push_many`] does both for a slice of pages on N threads.
//! `commit` re-checks what `prepare` relied on (a dup source or delta base re-sent by an earlier
//! record of the same parallel run) and encodes the page again if it changed, so the stream is
//! always consistent.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use crate::delta::delta_encode;
use crate::{fingerprint, is_zero, ClassStats, DiskRef, PageClass, PageKey, BATCH_TARGET, MAX_RECORD, PAGE_SIZE, RECORD_HEADER};

/// Finds a disk block with the given fingerprint (both hosts hold the image).
pub trait DiskLookup: Send + Sync {
    /// The block of an image whose content has this unkeyed xxh3-128 fingerprint
    /// ([`crate::fingerprint`]), if any. A candidate only: the record carries the page's keyed
    /// fingerprint, which the receiver checks against the block it reads.
    fn lookup_disk(&self, fp: u128) -> Option<DiskRef>;
}

/// Finds a page of a memory snapshot (both hosts hold it) with the given fingerprint.
pub trait SnapshotLookup: Send + Sync {
    /// The snapshot page whose content has this unkeyed xxh3-128 fingerprint, if any (a
    /// candidate, as for [`DiskLookup::lookup_disk`]).
    fn lookup_snapshot(&self, fp: u128) -> Option<u64>;
}

/// Compressor of whole pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compressor {
    /// Pages go raw.
    None,
    /// LZ4 block (lz4_flex): the default, cheap enough for 10 Gbit/s on 2 cores.
    Lz4,
    /// zstd at a level (1: about 25 % smaller than LZ4 on text/code, about 2x its CPU; higher
    /// levels smaller still and slower). The decoder does not need the level.
    Zstd(i32),
}

impl Compressor {
    /// Its name in reports and logs: `none`, `lz4`, `zstd1`, `zstd3`, ...
    pub fn name(self) -> String {
        match self {
            Compressor::None => "none".into(),
            Compressor::Lz4 => "lz4".into(),
            Compressor::Zstd(l) => format!("zstd{l}"),
        }
    }
}

/// Options of the encoder.
#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    /// Compressor of whole pages.
    pub compressor: Compressor,
    /// Send pages equal to a page already sent as `dup`.
    pub dup: bool,
    /// Send re-sent pages as `delta` when smaller.
    pub delta: bool,
    /// Bytes of previous page versions kept for deltas (rounded down to pages; 0 = only deltas
    /// against pages the destination holds as zero).
    pub delta_cache_bytes: usize,
    /// The destination's RAM is all zeroes before the first page arrives (a new memfd or file):
    /// pages never sent may be sent as a delta against zero.
    pub dest_starts_zeroed: bool,
    /// The destination reads earlier pages only from a cache that mirrors this encoder's delta
    /// cache (the stream engine's receiver, which holds no copy of the guest RAM): `dup` names
    /// only pages that cache still holds.
    pub refs_need_cache: bool,
}

/// Default size of the delta cache.
pub const DEFAULT_DELTA_CACHE: usize = 64 << 20;

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            compressor: Compressor::Lz4,
            dup: true,
            delta: true,
            delta_cache_bytes: DEFAULT_DELTA_CACHE,
            dest_starts_zeroed: true,
            refs_need_cache: false,
        }
    }
}

impl EncodeOptions {
    /// Defaults with a delta cache of min(64 MiB, RAM / 4).
    pub fn for_ram(ram_bytes: u64) -> Self {
        let quarter = usize::try_from(ram_bytes / 4).unwrap_or(usize::MAX);
        EncodeOptions { delta_cache_bytes: quarter.min(DEFAULT_DELTA_CACHE), ..Self::default() }
    }
}

/// One page to encode.
#[derive(Debug, Clone, Copy)]
pub struct PageRef<'a> {
    /// Page index in guest RAM.
    pub page: u64,
    /// Its content now.
    pub data: &'a [u8; PAGE_SIZE],
    /// Send it whole (raw or compressed), never as a reference or delta: for resends.
    pub whole: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dep {
    None,
    Dup { src: u64 },
    Delta { base: u128 },
}

/// A page encoded by [`Encoder::prepare`], to be committed in stream order.
#[derive(Debug, Clone)]
pub struct Prepared {
    page: u64,
    fp: u128,
    class: PageClass,
    dep: Dep,
    data: Vec<u8>,
}

impl Default for Prepared {
    fn default() -> Self {
        Prepared { page: 0, fp: 0, class: PageClass::Invalid, dep: Dep::None, data: Vec::with_capacity(PAGE_SIZE) }
    }
}

impl Prepared {
    /// Class chosen (it may change at commit if what it relied on was re-sent meanwhile).
    pub fn class(&self) -> PageClass {
        self.class
    }
}

/// Per-thread buffers and compressor contexts for [`Encoder::prepare`].
#[derive(Default)]
pub struct Scratch {
    buf: Vec<u8>,
    delta: Vec<u8>,
    /// The zstd context and the level it is set to.
    zstd: Option<(i32, zstd::bulk::Compressor<'static>)>,
}

impl Scratch {
    /// Compresses `data` as the encoder would a whole page with `compressor`: the class it
    /// would send and the bytes of its record's data (4096 for a raw page, when compression
    /// does not pay). For measuring candidates on real pages.
    pub fn compress_page(&mut self, compressor: Compressor, data: &[u8; PAGE_SIZE]) -> (PageClass, usize) {
        match compress(compressor, data, self) {
            (PageClass::Raw, _) => (PageClass::Raw, PAGE_SIZE),
            other => other,
        }
    }
}

impl fmt::Debug for Scratch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scratch").field("zstd", &self.zstd.is_some()).finish_non_exhaustive()
    }
}

/// Largest compressed page worth sending instead of the raw page.
const WHOLE_LIMIT: usize = PAGE_SIZE - PAGE_SIZE / 8;
/// A delta at most this big is taken without trying compression.
const DELTA_DIRECT: usize = 512;
/// Largest delta tried against a cached previous version (a bigger one rarely beats the
/// compressed page, and giving up early bounds the cost of a page rewritten whole).
const DELTA_LIMIT: usize = PAGE_SIZE / 2;
/// Fingerprint meaning "unknown content" in `held`.
const UNKNOWN: u128 = 0;
/// Below this many pages per thread, `push_many` does not spawn.
const MIN_PAGES_PER_THREAD: usize = 32;

/// Compresses into `scratch.buf`: (Lz4 or Zstd, length) when worth it, else (Raw, 0).
fn compress(compressor: Compressor, data: &[u8; PAGE_SIZE], scratch: &mut Scratch) -> (PageClass, usize) {
    match compressor {
        Compressor::None => (PageClass::Raw, 0),
        Compressor::Lz4 => {
            scratch.buf.resize(lz4_flex::block::get_maximum_output_size(PAGE_SIZE), 0);
            match lz4_flex::block::compress_into(data, &mut scratch.buf) {
                Ok(n) if n < WHOLE_LIMIT => (PageClass::Lz4, n),
                _ => (PageClass::Raw, 0),
            }
        }
        Compressor::Zstd(level) => {
            scratch.buf.resize(WHOLE_LIMIT, 0);
            match &mut scratch.zstd {
                Some((l, z)) if *l != level => {
                    if z.set_compression_level(level).is_ok() {
                        *l = level;
                    } else {
                        scratch.zstd = None;
                    }
                }
                Some(_) => {}
                None => scratch.zstd = zstd::bulk::Compressor::new(level).ok().map(|z| (level, z)),
            }
            let Some((_, z)) = scratch.zstd.as_mut() else { return (PageClass::Raw, 0) };
            match z.compress_to_buffer(&data[..], &mut scratch.buf[..WHOLE_LIMIT - 1]) {
                Ok(n) => (PageClass::Zstd, n),
                Err(_) => (PageClass::Raw, 0),
            }
        }
    }
}

/// Hashes a fingerprint key by its own bits (it is already a good hash).
#[derive(Debug, Clone, Copy, Default)]
struct FpBuild;

#[derive(Debug, Default)]
struct FpHasher(u64);

impl BuildHasher for FpBuild {
    type Hasher = FpHasher;
    fn build_hasher(&self) -> FpHasher {
        FpHasher(0)
    }
}

impl Hasher for FpHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    #[allow(clippy::cast_possible_truncation)] // folding 128 bits into 64 on purpose
    fn write_u128(&mut self, v: u128) {
        self.0 = (v as u64) ^ ((v >> 64) as u64);
    }
}

/// Previous versions of pages, direct-mapped by page index (slot = page mod slots): O(1),
/// no allocation after start, a newer page evicts the older one of its slot.
struct DeltaCache {
    tags: Vec<u64>,
    fps: Vec<u128>,
    data: Vec<u8>,
}

impl DeltaCache {
    fn new(bytes: usize) -> Self {
        let n = bytes / PAGE_SIZE;
        let mut data = vec![0u8; n * PAGE_SIZE];
        // Touched now, so the encoding loop takes no page faults on it.
        data.fill(1);
        DeltaCache { tags: vec![u64::MAX; n], fps: vec![UNKNOWN; n], data }
    }

    fn slot(&self, page: u64) -> Option<usize> {
        let n = self.tags.len() as u64;
        (n > 0).then(|| usize::try_from(page % n).expect("slot < slots"))
    }

    fn get(&self, page: u64, fp: u128) -> Option<&[u8; PAGE_SIZE]> {
        let s = self.slot(page)?;
        (self.tags[s] == page && self.fps[s] == fp)
            .then(|| self.data[s * PAGE_SIZE..(s + 1) * PAGE_SIZE].try_into().expect("page"))
    }

    fn put(&mut self, page: u64, fp: u128, data: &[u8; PAGE_SIZE]) {
        if let Some(s) = self.slot(page) {
            self.tags[s] = page;
            self.fps[s] = fp;
            self.data[s * PAGE_SIZE..(s + 1) * PAGE_SIZE].copy_from_slice(data);
        }
    }
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Encoder of a whole migration: what the destination holds (keyed fingerprint per page, a
/// fingerprint -> page map, a cache of previous versions), per-class counts, and the batch
/// being built.
pub struct Encoder {
    opts: EncodeOptions,
    key: PageKey,
    zero_fp: u128,
    /// Fingerprint of what the destination's page holds (the last version sent), or UNKNOWN.
    held: Vec<u128>,
    /// Fingerprint -> a page that held it when sent (checked against `held` at lookup).
    by_fp: HashMap<u128, u64, FpBuild>,
    cache: DeltaCache,
    disk: Option<Arc<dyn DiskLookup>>,
    snapshot: Option<Arc<dyn SnapshotLookup>>,
    stats: ClassStats,
    buf: Vec<u8>,
    spare: Vec<Vec<u8>>,
    batch_pages: u32,
    scratch: Vec<Scratch>,
    prepared: Vec<Prepared>,
    /// One bit per page: sent in the current pass ([`Encoder::begin_pass`]); empty outside one.
    in_pass: Vec<u64>,
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoder")
            .field("opts", &self.opts)
            .field("pages", &self.held.len())
            .field("fingerprints", &self.by_fp.len())
            .field("delta_cache_slots", &self.cache.tags.len())
            .field("disk", &self.disk.is_some())
            .field("snapshot", &self.snapshot.is_some())
            .field("batch_bytes", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl Encoder {
    /// An encoder for a guest of `total_pages` pages, its records' fingerprints keyed with `key`
    /// (the receiver decodes with the same key).
    pub fn new(total_pages: u64, opts: EncodeOptions, key: PageKey) -> Self {
        let zero_fp = key.zero_fingerprint();
        let n = usize::try_from(total_pages).expect("page count fits in memory");
        let cache_bytes = if opts.delta { opts.delta_cache_bytes.min(n.saturating_mul(PAGE_SIZE)) } else { 0 };
        Encoder {
            opts,
            key,
            zero_fp,
            held: vec![if opts.dest_starts_zeroed { zero_fp } else { UNKNOWN }; n],
            by_fp: HashMap::with_hasher(FpBuild),
            cache: DeltaCache::new(cache_bytes),
            disk: None,
            snapshot: None,
            stats: ClassStats::default(),
            buf: Vec::with_capacity(BATCH_TARGET + MAX_RECORD),
            spare: Vec::new(),
            batch_pages: 0,
            scratch: vec![Scratch::default()],
            prepared: Vec::new(),
            in_pass: Vec::new(),
        }
    }

    /// Starts a pass whose records the destination may apply in any order (several connections,
    /// several decoding threads; protocol 6), resolving its `dup` records once the pass is
    /// applied ([`crate::Destination::defer_dup`]): until [`Encoder::end_pass`], a page of
    /// `pages` not committed yet is never named as another page's `dup` source (the source must
    /// hold, at the end of the pass, the content the record names; a page committed earlier in
    /// the pass does, one sent later would not). A delta's base is the page's own version from
    /// an earlier pass: unaffected.
    pub fn begin_pass(&mut self, pages: impl IntoIterator<Item = u64>) {
        let words = self.held.len().div_ceil(64);
        self.in_pass.clear();
        self.in_pass.resize(words, 0);
        for p in pages {
            if let Some(w) = usize::try_from(p / 64).ok().and_then(|i| self.in_pass.get_mut(i)) {
                *w |= 1 << (p % 64);
            }
        }
    }

    /// Ends the pass [`Encoder::begin_pass`] started: its pages are sources again.
    pub fn end_pass(&mut self) {
        self.in_pass.clear();
    }

    /// Page `page` is in the current pass and not committed yet.
    fn sent_in_pass(&self, page: u64) -> bool {
        usize::try_from(page / 64).ok().and_then(|i| self.in_pass.get(i)).is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Uses `lookup` for `disk_ref` pages.
    pub fn set_disk_lookup(&mut self, lookup: Arc<dyn DiskLookup>) {
        self.disk = Some(lookup);
    }

    /// Uses `lookup` for `snapshot_ref` pages.
    pub fn set_snapshot_lookup(&mut self, lookup: Arc<dyn SnapshotLookup>) {
        self.snapshot = Some(lookup);
    }

    /// Forgets what the destination holds at `page` (it reported a miss there): no reference or
    /// delta uses it until it is sent again. Out-of-range pages are ignored.
    pub fn invalidate(&mut self, page: u64) {
        if let Some(h) = usize::try_from(page).ok().and_then(|p| self.held.get_mut(p)) {
            *h = UNKNOWN;
        }
    }

    /// The key its fingerprints are made with.
    pub fn key(&self) -> &PageKey {
        &self.key
    }

    /// Per-class counts of everything committed so far.
    pub fn stats(&self) -> &ClassStats {
        &self.stats
    }

    fn held(&self, page: u64) -> u128 {
        self.held[usize::try_from(page).expect("page index")]
    }

    /// Encodes `item` into `out` against the current state, without changing it. Pure: may run
    /// on several threads at once, each with its own `scratch`.
    ///
    /// # Panics
    /// If `item.page` is not below the encoder's page count.
    pub fn prepare(&self, item: &PageRef<'_>, scratch: &mut Scratch, out: &mut Prepared) {
        self.prepare_with(item, None, scratch, out);
    }

    /// [`Encoder::prepare`] with the page's keyed fingerprint already computed by the caller
    /// (`fp` must be `self.key().fingerprint(item.data)`; the sender pipeline hashes each page
    /// once for its ledger and the record). A wrong `fp` never writes wrong data at the
    /// destination (it checks every reference against the bytes it resolves), but costs resends.
    ///
    /// # Panics
    /// As [`Encoder::prepare`].
    pub fn prepare_fingerprinted(&self, item: &PageRef<'_>, fp: u128, scratch: &mut Scratch, out: &mut Prepared) {
        self.prepare_with(item, Some(fp), scratch, out);
    }

    fn prepare_with(&self, item: &PageRef<'_>, fp: Option<u128>, scratch: &mut Scratch, out: &mut Prepared) {
        assert!(usize::try_from(item.page).is_ok_and(|p| p < self.held.len()), "page {} out of range", item.page);
        out.page = item.page;
        out.dep = Dep::None;
        out.data.clear();
        let data = item.data;
        if is_zero(data) {
            out.class = PageClass::Zero;
            out.fp = self.zero_fp;
            return;
        }
        let fp = fp.unwrap_or_else(|| self.key.fingerprint(data));
        debug_assert_eq!(fp, self.key.fingerprint(data), "prepare_fingerprinted given another page's fingerprint");
        out.fp = fp;
        let mut delta_len = None;
        if !item.whole {
            if let Some(src) = self.dup_source(item.page, fp) {
                out.class = PageClass::Dup;
                out.dep = Dep::Dup { src };
                out.data.extend_from_slice(&src.to_le_bytes());
                out.data.extend_from_slice(&fp.to_le_bytes());
                return;
            }
            // Disk indexes and snapshots are found by the unkeyed fingerprint (they outlive the
            // migration's key); the record carries the keyed one of this page.
            let lookup_fp = (self.disk.is_some() || self.snapshot.is_some()).then(|| fingerprint(data));
            if let Some(r) = self.disk.as_ref().zip(lookup_fp).and_then(|(d, l)| d.lookup_disk(l)) {
                out.class = PageClass::DiskRef;
                out.data.extend_from_slice(&r.image.to_le_bytes());
                out.data.extend_from_slice(&r.to_wire().to_le_bytes());
                out.data.extend_from_slice(&fp.to_le_bytes());
                return;
            }
            if let Some(q) = self.snapshot.as_ref().zip(lookup_fp).and_then(|(s, l)| s.lookup_snapshot(l)) {
                out.class = PageClass::SnapshotRef;
                out.data.extend_from_slice(&q.to_le_bytes());
                out.data.extend_from_slice(&fp.to_le_bytes());
                return;
            }
            let base_fp = self.held(item.page);
            if let Some(base) = self.delta_base(item.page, base_fp) {
                scratch.delta.clear();
                scratch.delta.extend_from_slice(&fp.to_le_bytes());
                // Against zero (a page never sent), only sparse pages are worth a delta.
                let limit = if base_fp == self.zero_fp { DELTA_DIRECT - 16 } else { DELTA_LIMIT };
                if delta_encode(base, data, &mut scratch.delta, limit) {
                    out.dep = Dep::Delta { base: base_fp };
                    if scratch.delta.len() <= DELTA_DIRECT {
                        out.class = PageClass::Delta;
                        out.data.extend_from_slice(&scratch.delta);
                        return;
                    }
                    delta_len = Some(scratch.delta.len());
                }
            }
        }
        let (class, n) = self.compress(data, scratch);
        let whole_len = if class == PageClass::Raw { PAGE_SIZE } else { n };
        if delta_len.is_some_and(|d| d < whole_len) {
            out.class = PageClass::Delta;
            out.data.extend_from_slice(&scratch.delta);
            return;
        }
        out.dep = Dep::None;
        out.class = class;
        // A raw page's data is taken from the page at commit, saving a copy.
        if class != PageClass::Raw {
            out.data.extend_from_slice(&scratch.buf[..n]);
        }
    }

    fn dup_source(&self, page: u64, fp: u128) -> Option<u64> {
        if !self.opts.dup || fp == UNKNOWN {
            return None;
        }
        let usable = |q: u64| self.held(q) == fp && (!self.opts.refs_need_cache || self.cache.get(q, fp).is_some());
        if usable(page) {
            return Some(page);
        }
        let q = *self.by_fp.get(&fp)?;
        (usable(q) && !self.sent_in_pass(q)).then_some(q)
    }

    /// Slots (pages) of the delta cache: a destination mirroring it
    /// ([`EncodeOptions::refs_need_cache`]) keeps as many, each page at `page % slots`.
    pub fn cache_slots(&self) -> u64 {
        self.cache.tags.len() as u64
    }

    fn delta_base(&self, page: u64, base_fp: u128) -> Option<&[u8; PAGE_SIZE]> {
        if !self.opts.delta || base_fp == UNKNOWN {
            None
        } else if base_fp == self.zero_fp {
            Some(&ZERO_PAGE)
        } else {
            self.cache.get(page, base_fp)
        }
    }

    /// Compresses into `scratch.buf`: (Lz4 or Zstd, length) when worth it, else (Raw, 0).
    fn compress(&self, data: &[u8; PAGE_SIZE], scratch: &mut Scratch) -> (PageClass, usize) {
        compress(self.opts.compressor, data, scratch)
    }

    /// Appends a prepared page to the batch and records that the destination will hold it.
    /// `data` must be the bytes it was prepared from. Returns the class sent and the bytes its
    /// record took.
    pub fn commit(&mut self, p: &Prepared, data: &[u8; PAGE_SIZE]) -> (PageClass, usize) {
        let still_valid = match p.dep {
            Dep::None => true,
            Dep::Dup { src } => self.held(src) == p.fp && (!self.opts.refs_need_cache || self.cache.get(src, p.fp).is_some()),
            // With a mirrored cache the base must still be in it: a page committed since the
            // prepare may have taken its slot.
            Dep::Delta { base } => {
                self.held(p.page) == base && (!self.opts.refs_need_cache || base == self.zero_fp || self.cache.get(p.page, base).is_some())
            }
        };
        if still_valid {
            return self.commit_valid(p, data);
        }
        let mut scratch = std::mem::take(&mut self.scratch[0]);
        let mut again = Prepared::default();
        self.prepare(&PageRef { page: p.page, data, whole: false }, &mut scratch, &mut again);
        self.scratch[0] = scratch;
        self.commit_valid(&again, data)
    }

    fn commit_valid(&mut self, p: &Prepared, data: &[u8; PAGE_SIZE]) -> (PageClass, usize) {
        let body: &[u8] = if p.class == PageClass::Raw { data } else { &p.data };
        self.buf.extend_from_slice(&p.page.to_le_bytes());
        self.buf.push(p.class as u8);
        let len = u32::try_from(body.len()).expect("record data is at most a page");
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(body);
        self.batch_pages += 1;
        let record_len = RECORD_HEADER + body.len();
        self.stats.add(p.class, record_len);

        let idx = usize::try_from(p.page).expect("page index");
        if let Some(w) = self.in_pass.get_mut(idx / 64) {
            *w &= !(1 << (idx % 64));
        }
        let old = std::mem::replace(&mut self.held[idx], p.fp);
        if old != p.fp && self.by_fp.get(&old) == Some(&p.page) {
            self.by_fp.remove(&old);
        }
        if p.class != PageClass::Zero {
            if self.opts.dup {
                match self.by_fp.entry(p.fp) {
                    Entry::Occupied(mut e) => {
                        let q = usize::try_from(*e.get()).expect("page index");
                        if self.held[q] != p.fp {
                            e.insert(p.page);
                        }
                    }
                    Entry::Vacant(e) => {
                        e.insert(p.page);
                    }
                }
            }
            if self.opts.delta {
                self.cache.put(p.page, p.fp, data);
            }
        }
        (p.class, record_len)
    }

    /// Encodes one page (prepare + commit).
    pub fn push(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> (PageClass, usize) {
        self.push_ref(&PageRef { page, data, whole: false })
    }

    /// Encodes one page whole (raw or compressed): for resends after a miss.
    pub fn push_whole(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> (PageClass, usize) {
        self.push_ref(&PageRef { page, data, whole: true })
    }

    fn push_ref(&mut self, item: &PageRef<'_>) -> (PageClass, usize) {
        let mut scratch = std::mem::take(&mut self.scratch[0]);
        let mut prepared = std::mem::take(&mut self.prepared);
        if prepared.is_empty() {
            prepared.push(Prepared::default());
        }
        self.prepare(item, &mut scratch, &mut prepared[0]);
        self.scratch[0] = scratch;
        let r = self.commit_valid(&prepared[0], item.data);
        self.prepared = prepared;
        r
    }

    /// Encodes `items` in order, preparing them on up to `threads` threads (the calling one
    /// included) and committing on the calling thread. The batch grows by at most
    /// `items.len() * MAX_RECORD` bytes: check [`Encoder::is_full`] between calls.
    pub fn push_many(&mut self, items: &[PageRef<'_>], threads: usize) {
        let threads = threads.clamp(1, 64).min(items.len() / MIN_PAGES_PER_THREAD).max(1);
        let mut prepared = std::mem::take(&mut self.prepared);
        let mut scratch = std::mem::take(&mut self.scratch);
        if prepared.len() < items.len() {
            prepared.resize_with(items.len(), Prepared::default);
        }
        if scratch.len() < threads {
            scratch.resize_with(threads, Scratch::default);
        }
        let this = &*self;
        let chunk = items.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let mut parts = items.chunks(chunk).zip(prepared.chunks_mut(chunk)).zip(scratch.iter_mut());
            let first = parts.next();
            for ((its, outs), scr) in parts {
                s.spawn(move || {
                    for (it, out) in its.iter().zip(outs.iter_mut()) {
                        this.prepare(it, scr, out);
                    }
                });
            }
            if let Some(((its, outs), scr)) = first {
                for (it, out) in its.iter().zip(outs.iter_mut()) {
                    this.prepare(it, scr, out);
                }
            }
        });
        self.scratch = scratch;
        for (it, p) in items.iter().zip(prepared.iter()) {
            self.commit(p, it.data);
        }
        self.prepared = prepared;
    }

    /// Pages in the batch being built.
    pub fn pages(&self) -> u32 {
        self.batch_pages
    }

    /// Bytes of the batch being built.
    pub fn batch_len(&self) -> usize {
        self.buf.len()
    }

    /// True when the batch should be sent.
    pub fn is_full(&self) -> bool {
        self.buf.len() >= BATCH_TARGET
    }

    /// True when the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.batch_pages == 0
    }

    /// Takes the batch, leaving it empty (the migration state is kept).
    pub fn take(&mut self) -> Vec<u8> {
        self.batch_pages = 0;
        let next = self.spare.pop().unwrap_or_else(|| Vec::with_capacity(BATCH_TARGET + MAX_RECORD));
        std::mem::replace(&mut self.buf, next)
    }

    /// Gives back a batch buffer once sent, so the next batches reuse its memory instead of
    /// allocating (and page-faulting) a new megabyte each.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.spare.len() < 4 && buf.capacity() >= BATCH_TARGET {
            buf.clear();
            self.spare.push(buf);
        }
    }

    /// Changes the compressor of whole pages from the next page on (e.g. off when encoding,
    /// not the link, is the bottleneck). The stream stays decodable: the class byte tells.
    pub fn set_compressor(&mut self, compressor: Compressor) {
        self.opts.compressor = compressor;
    }
}
