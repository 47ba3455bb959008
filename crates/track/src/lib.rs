//! Dirty-page tracking and the memory ledger.
//!
//! * [`Ledger`]: per page, the 64-bit xxh3 of the version the destination holds, keyed with the
//!   migration's [`PageKey`], and a [`Digest`] over all of them kept up to date incrementally.
//!   The source keeps one for what it sent, the destination one for what it wrote (or, with
//!   `--verify-reread`, what it reads back); equal digests at switchover mean the two sides agree
//!   on every page's keyed hash (and position), without a full scan during downtime. That is
//!   evidence of equal memory, not proof: two different memories agree with probability about
//!   2^-64 per differing page for contents chosen without knowing the key, and a guest, which
//!   never sees the key, cannot choose contents that collide (with unkeyed xxh3 it could:
//!   [`livemig_compact::unkeyed_collision`]). Keyed xxh3 is not a cryptographic MAC; integrity
//!   against the network is TLS's job.
//! * [`Tracker`]: finds the pages that may differ from the ledger. [`ContentTracker`] hashes every
//!   page (several threads); a soft-dirty tracker fits the same interface.

pub mod softdirty;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use thiserror::Error;
use xxhash_rust::xxh3::xxh3_128_with_seed;

pub use livemig_compact::PageKey;

/// Bytes in a page.
pub const PAGE_SIZE: usize = 4096;

/// Where pages are read from: the mapped guest RAM, or a test buffer.
pub trait PageSource: Sync {
    /// Number of pages.
    fn total_pages(&self) -> u64;
    /// Copies page `page` into `buf`.
    fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError>;
    /// Ranges of pages that may hold data, in order; pages outside them read as zero and are not
    /// read (reading a hole of shared memory would allocate it). `None`: every page may.
    fn data_ranges(&self) -> Option<Vec<std::ops::Range<u64>>> {
        None
    }
}

/// Whether `page` lies in one of the sorted, disjoint `ranges` (as [`PageSource::data_ranges`]
/// gives them; `None`: every page does).
pub fn in_ranges(ranges: Option<&[std::ops::Range<u64>]>, page: u64) -> bool {
    ranges.is_none_or(|d| {
        let i = d.partition_point(|r| r.end <= page);
        d.get(i).is_some_and(|r| r.start <= page)
    })
}

/// Error of a [`PageSource`].
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of tracking.
#[derive(Debug, Error)]
pub enum TrackError {
    /// Reading guest memory failed.
    #[error("reading guest page {page} failed")]
    Read {
        /// The page.
        page: u64,
        /// Why.
        #[source]
        source: SourceError,
    },
    /// Ledger and memory disagree on size.
    #[error("the ledger covers {ledger} pages but the memory has {memory}")]
    SizeMismatch {
        /// Pages in the ledger.
        ledger: u64,
        /// Pages in memory.
        memory: u64,
    },
}

/// A digest of a whole memory: the wrapping sum over pages of a 128-bit mix of
/// (page index, page hash), the page hashes keyed ([`PageKey::hash_page`]). Updating one page is
/// O(1).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Digest(pub u128);

impl Digest {
    fn term(page: u64, hash: u64) -> u128 {
        xxh3_128_with_seed(&hash.to_le_bytes(), page)
    }
    /// Adds page `page` with hash `hash` (each page must be added once).
    pub fn add(&mut self, page: u64, hash: u64) {
        self.0 = self.0.wrapping_add(Self::term(page, hash));
    }
    fn remove(&mut self, page: u64, hash: u64) {
        self.0 = self.0.wrapping_sub(Self::term(page, hash));
    }
    /// Digest of a memory given every page's hash.
    pub fn of_hashes(hashes: &[u64]) -> Digest {
        let mut d = Digest(0);
        for (i, &h) in (0u64..).zip(hashes) {
            d.add(i, h);
        }
        d
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u128::from_str_radix(s, 16).map(Digest)
    }
}

/// Per page, the keyed hash of the version the destination holds, plus the running digest.
#[derive(Debug, Clone)]
pub struct Ledger {
    key: PageKey,
    hashes: Vec<u64>,
    digest: Digest,
}

impl Ledger {
    /// A ledger for a memory of `pages` zero pages, hashing with the migration's `key`.
    pub fn zeroed(pages: u64, key: PageKey) -> Ledger {
        let z = key.zero_hash();
        let hashes = vec![z; usize::try_from(pages).expect("page count fits in memory")];
        let digest = Digest::of_hashes(&hashes);
        Ledger { key, hashes, digest }
    }

    /// The key its hashes are made with.
    pub fn key(&self) -> &PageKey {
        &self.key
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// The recorded hash of a page.
    pub fn hash(&self, page: u64) -> u64 {
        self.hashes[usize::try_from(page).expect("page index fits")]
    }

    /// Records that the destination now holds `data` at `page`.
    pub fn record_page(&mut self, page: u64, data: &[u8; PAGE_SIZE]) {
        let hash = self.key.hash_page(data);
        self.record(page, hash);
    }

    /// Records that the destination now holds a page whose content hashes (with this ledger's
    /// key, [`PageKey::hash_page`]) to `hash`: for a caller that hashed the page already.
    pub fn record_hash(&mut self, page: u64, hash: u64) {
        self.record(page, hash);
    }

    /// Records that the destination now holds a page whose content hashes (with this ledger's
    /// key) to `hash`.
    fn record(&mut self, page: u64, hash: u64) {
        let slot = &mut self.hashes[usize::try_from(page).expect("page index fits")];
        let old = std::mem::replace(slot, hash);
        if old != hash {
            self.digest.remove(page, old);
            self.digest.add(page, hash);
        }
    }

    /// Digest of the memory the ledger describes.
    pub fn digest(&self) -> Digest {
        self.digest
    }
}

/// What a scan found.
#[derive(Debug, Clone, Default)]
pub struct ScanResult {
    /// Pages that may differ from the ledger, ascending.
    pub dirty: Vec<u64>,
    /// Time the scan took.
    pub duration: Duration,
}

/// Finds pages changed since the version the ledger records.
pub trait Tracker: Send {
    /// Name for reports (`content`, `soft-dirty`).
    fn name(&self) -> &'static str;
    /// Scans the memory.
    fn scan(&mut self, src: &dyn PageSource, ledger: &Ledger) -> Result<ScanResult, TrackError>;
}

/// Hashes every page and compares with the ledger. Works everywhere; costs one read of RAM.
#[derive(Debug, Clone)]
pub struct ContentTracker {
    threads: usize,
}

impl ContentTracker {
    /// A tracker using `threads` threads (at least one).
    pub fn new(threads: usize) -> Self {
        ContentTracker { threads: threads.max(1) }
    }

    /// A tracker using every available core.
    pub fn with_available_parallelism() -> Self {
        Self::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// Dirty pages found in each chunk a scanning thread handled, by chunk number.
type ChunkResults = Result<Vec<(u64, Vec<u64>)>, TrackError>;

/// Pages per work unit handed to a scanning thread.
const CHUNK_PAGES: u64 = 4096;

impl Tracker for ContentTracker {
    fn name(&self) -> &'static str {
        "content"
    }

    fn scan(&mut self, src: &dyn PageSource, ledger: &Ledger) -> Result<ScanResult, TrackError> {
        let start = Instant::now();
        let total = src.total_pages();
        if total != ledger.pages() {
            return Err(TrackError::SizeMismatch { ledger: ledger.pages(), memory: total });
        }
        let chunks = total.div_ceil(CHUNK_PAGES);
        let next = std::sync::atomic::AtomicU64::new(0);
        // Holes read as zero: a page in one is dirty only if the version sent was not zero.
        let data = src.data_ranges();
        let key = ledger.key();
        let zero = key.zero_hash();
        let in_data = |page: u64| in_ranges(data.as_deref(), page);
        let results: Vec<ChunkResults> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..self.threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        let mut buf = Box::new([0u8; PAGE_SIZE]);
                        loop {
                            let c = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if c >= chunks {
                                break;
                            }
                            let mut dirty = Vec::new();
                            for page in c * CHUNK_PAGES..((c + 1) * CHUNK_PAGES).min(total) {
                                let hash = if in_data(page) {
                                    src.read_page(page, &mut buf)
                                        .map_err(|source| TrackError::Read { page, source })?;
                                    key.hash_page(&buf)
                                } else {
                                    zero
                                };
                                if hash != ledger.hash(page) {
                                    dirty.push(page);
                                }
                            }
                            out.push((c, dirty));
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("scan thread panicked")).collect()
        });
        let mut parts = Vec::new();
        for r in results {
            parts.extend(r?);
        }
        parts.sort_unstable_by_key(|(c, _)| *c);
        let dirty = parts.into_iter().flat_map(|(_, d)| d).collect();
        Ok(ScanResult { dirty, duration: start.elapsed() })
    }
}

/// A page source over a plain buffer, for tests and tools.
#[derive(Debug)]
pub struct VecSource(pub std::sync::RwLock<Vec<[u8; PAGE_SIZE]>>);

impl VecSource {
    /// `pages` zero pages.
    pub fn zeroed(pages: usize) -> Self {
        VecSource(std::sync::RwLock::new(vec![[0u8; PAGE_SIZE]; pages]))
    }
    /// Sets a page.
    pub fn set(&self, page: usize, data: [u8; PAGE_SIZE]) {
        self.0.write().expect("lock")[page] = data;
    }
}

impl PageSource for VecSource {
    fn total_pages(&self) -> u64 {
        self.0.read().expect("lock").len() as u64
    }
    fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError> {
        let v = self.0.read().expect("lock");
        let p = usize::try_from(page).ok().and_then(|i| v.get(i)).ok_or("page out of range")?;
        buf.copy_from_slice(p);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> PageKey {
        PageKey::from_bytes([0x17; 32])
    }

    fn page(v: u8) -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        p[usize::from(v) * 7 % PAGE_SIZE] = v;
        p[4095] = v.wrapping_add(1);
        p
    }

    /// A source that says which pages hold data and refuses to read the others.
    struct Holey {
        inner: VecSource,
        data: Vec<std::ops::Range<u64>>,
    }

    impl PageSource for Holey {
        fn total_pages(&self) -> u64 {
            self.inner.total_pages()
        }
        fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError> {
            if !self.data.iter().any(|r| r.contains(&page)) {
                return Err("read of a hole".into());
            }
            self.inner.read_page(page, buf)
        }
        fn data_ranges(&self) -> Option<Vec<std::ops::Range<u64>>> {
            Some(self.data.clone())
        }
    }

    #[test]
    fn scan_skips_holes_and_still_finds_every_change() {
        let src = Holey { inner: VecSource::zeroed(64), data: vec![2..4, 30..31] };
        src.inner.set(2, page(1));
        src.inner.set(30, page(2));
        let mut ledger = Ledger::zeroed(64, key());
        let mut t = ContentTracker::new(2);
        let scan = t.scan(&src, &ledger).unwrap();
        assert_eq!(scan.dirty, vec![2, 30]);
        for p in [2, 30] {
            let mut b = [0u8; PAGE_SIZE];
            src.read_page(p, &mut b).unwrap();
            ledger.record_page(p, &b);
        }
        // page 30 becomes a hole again (punched): dirty, as a page now zero
        let src = Holey { inner: src.inner, data: std::iter::once(2..4).collect() };
        assert_eq!(t.scan(&src, &ledger).unwrap().dirty, vec![30]);
    }

    /// Sends every dirty page: what an agent does after a scan.
    fn send_all(src: &VecSource, ledger: &mut Ledger, dirty: &[u64]) {
        let mut buf = [0u8; PAGE_SIZE];
        for &p in dirty {
            src.read_page(p, &mut buf).unwrap();
            ledger.record_page(p, &buf);
        }
    }

    #[test]
    fn zero_memory_has_no_dirty_pages() {
        let src = VecSource::zeroed(10_000);
        let ledger = Ledger::zeroed(10_000, key());
        let r = ContentTracker::new(3).scan(&src, &ledger).unwrap();
        assert!(r.dirty.is_empty());
    }

    #[test]
    fn size_mismatch_is_an_error() {
        let src = VecSource::zeroed(10);
        let ledger = Ledger::zeroed(11, key());
        assert!(matches!(ContentTracker::new(1).scan(&src, &ledger), Err(TrackError::SizeMismatch { .. })));
    }

    #[test]
    fn digest_roundtrips_as_text() {
        let d = Ledger::zeroed(5, key()).digest();
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn digest_depends_on_position() {
        // the same content at another page is another memory
        let mut a = Ledger::zeroed(4, key());
        let mut b = Ledger::zeroed(4, key());
        a.record_page(1, &page(9));
        b.record_page(2, &page(9));
        assert_ne!(a.digest(), b.digest());
    }

    /// A guest rewrites a page with content of the same unkeyed xxh3: the keyed tracker still
    /// finds it, and the keyed digests of the two memories differ. (With unkeyed hashes the
    /// write would have been invisible to the tracker and to the digests.)
    #[test]
    fn a_write_colliding_under_unkeyed_xxh3_is_found() {
        let (a, b) = livemig_compact::unkeyed_collision();
        assert_eq!(xxhash_rust::xxh3::xxh3_64(&a), xxhash_rust::xxh3::xxh3_64(&b));
        let src = VecSource::zeroed(4);
        src.set(1, a);
        let mut ledger = Ledger::zeroed(4, key());
        let mut t = ContentTracker::new(1);
        assert_eq!(t.scan(&src, &ledger).unwrap().dirty, vec![1]);
        ledger.record_page(1, &a);
        assert!(t.scan(&src, &ledger).unwrap().dirty.is_empty());
        src.set(1, b);
        assert_eq!(t.scan(&src, &ledger).unwrap().dirty, vec![1], "the colliding write is seen");
        let mut other = ledger.clone();
        other.record_page(1, &b);
        assert_ne!(other.digest(), ledger.digest());
    }

    /// The same memory under two keys: different hashes, so different digests (a digest says
    /// nothing outside its migration).
    #[test]
    fn digests_depend_on_the_key() {
        let mut a = Ledger::zeroed(4, key());
        let mut b = Ledger::zeroed(4, PageKey::from_bytes([0x18; 32]));
        a.record_page(1, &page(9));
        b.record_page(1, &page(9));
        assert_ne!(a.hash(1), b.hash(1));
        assert_ne!(a.digest(), b.digest());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The tracker finds exactly the pages written since the last send, whatever the threads;
        /// after sending them the incremental digest equals a digest computed from scratch, and
        /// two ledgers that received the same pages in any order agree.
        #[test]
        fn tracker_finds_exactly_the_written_pages(
            pages in 1usize..6000,
            rounds in proptest::collection::vec(proptest::collection::vec((any::<u16>(), any::<u8>()), 0..60), 1..4),
            threads in 1usize..5,
        ) {
            let src = VecSource::zeroed(pages);
            let mut ledger = Ledger::zeroed(pages as u64, key());
            let mut tracker = ContentTracker::new(threads);
            let mut truth = vec![[0u8; PAGE_SIZE]; pages];
            for writes in rounds {
                let mut expected = std::collections::BTreeSet::new();
                let before = truth.clone();
                for (p, v) in writes {
                    let p = usize::from(p) % pages;
                    src.set(p, page(v));
                    truth[p] = page(v);
                }
                for p in 0..pages {
                    if truth[p] != before[p] {
                        expected.insert(p as u64);
                    }
                }
                let r = tracker.scan(&src, &ledger).unwrap();
                prop_assert_eq!(r.dirty.iter().copied().collect::<std::collections::BTreeSet<_>>(), expected);
                send_all(&src, &mut ledger, &r.dirty);
                let scratch: Vec<u64> = truth.iter().map(|p| key().hash_page(p)).collect();
                prop_assert_eq!(ledger.digest(), Digest::of_hashes(&scratch));
                prop_assert!(tracker.scan(&src, &ledger).unwrap().dirty.is_empty());
            }
        }

        #[test]
        fn digest_detects_a_single_differing_page(pages in 1u64..2000, p in any::<u64>(), v in 1u8..255) {
            let mut a = Ledger::zeroed(pages, key());
            let b = Ledger::zeroed(pages, key());
            a.record_page(p % pages, &page(v));
            prop_assert_ne!(a.digest(), b.digest());
        }
    }
}
