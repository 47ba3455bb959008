//! The stream engine receiver's memory of pages: it holds no copy of the guest RAM (the
//! destination QEMU does), only a direct-mapped cache of recent page versions that mirrors the
//! sender's encoder cache slot for slot (same size, each page at `page % slots`, filled in the
//! same order), and one bit per page saying its last version was all zeroes (or it was never
//! sent). `dup` and `delta` records resolve against it; whatever does not resolve, or does not
//! match its fingerprint, is a miss and comes again whole.
//!
//! Memory: `slots x 4 KiB` (64 MiB by default) plus `pages / 8` bytes.

use livemig_compact::{DiskRef, PageClass, PAGE_SIZE};

use crate::holdings::ReceiverDisks;

/// Most cache slots a sender may ask for (4 GiB of pages).
pub const MAX_CACHE_PAGES: u64 = 1 << 20;

/// Recent page versions, mirrored with the sender.
#[derive(Debug)]
pub struct PageCache {
    tags: Vec<u64>,
    data: Vec<u8>,
    zero: Vec<u64>,
    total: u64,
}

impl PageCache {
    /// A cache of `slots` pages for a guest of `total` pages; every page starts as zero.
    pub fn new(total: u64, slots: u64) -> PageCache {
        let n = usize::try_from(slots.min(total)).expect("slots capped by the caller");
        let words = usize::try_from(total.div_ceil(64)).expect("page count fits");
        PageCache { tags: vec![u64::MAX; n], data: vec![0; n * PAGE_SIZE], zero: vec![u64::MAX; words], total }
    }

    /// Pages of the guest.
    pub fn total(&self) -> u64 {
        self.total
    }

    fn slot(&self, page: u64) -> Option<usize> {
        let n = self.tags.len() as u64;
        (n > 0).then(|| usize::try_from(page % n).expect("slot below slots"))
    }

    fn is_zero(&self, page: u64) -> bool {
        let (w, b) = (usize::try_from(page / 64).expect("page checked"), page % 64);
        self.zero.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    fn set_zero(&mut self, page: u64, zero: bool) {
        let (w, b) = (usize::try_from(page / 64).expect("page checked"), page % 64);
        if let Some(x) = self.zero.get_mut(w) {
            if zero {
                *x |= 1 << b;
            } else {
                *x &= !(1 << b);
            }
        }
    }

    /// The last version of `page` the receiver wrote, if it still holds it.
    pub fn read(&self, page: u64, out: &mut [u8; PAGE_SIZE]) -> bool {
        if page >= self.total {
            return false;
        }
        if self.is_zero(page) {
            out.fill(0);
            return true;
        }
        match self.slot(page) {
            Some(s) if self.tags[s] == page => {
                out.copy_from_slice(&self.data[s * PAGE_SIZE..(s + 1) * PAGE_SIZE]);
                true
            }
            _ => false,
        }
    }

    /// Records a written page, as the sender's encoder does when it commits it: a zero page
    /// only sets its bit, any other takes its slot.
    pub fn put(&mut self, page: u64, class: PageClass, data: &[u8; PAGE_SIZE]) {
        if page >= self.total {
            return;
        }
        let zero = class == PageClass::Zero;
        self.set_zero(page, zero);
        if !zero {
            if let Some(s) = self.slot(page) {
                self.tags[s] = page;
                self.data[s * PAGE_SIZE..(s + 1) * PAGE_SIZE].copy_from_slice(data);
            }
        }
    }
}

/// The destination as the page decoder sees it in the stream engine: the cache, the disk
/// images, the memory snapshot, and the slot the decoded page goes to.
pub(crate) struct StreamDest<'a> {
    /// Recent pages.
    pub cache: &'a mut PageCache,
    /// Disk images both hosts hold.
    pub disks: &'a ReceiverDisks,
    /// The memory snapshot both hosts hold.
    pub snapshot: Option<&'a livemig_index::snapshot::Snapshot>,
    /// The decoded page and its class, once written.
    pub out: &'a mut [u8; PAGE_SIZE],
    /// Set by `write_page`.
    pub written: Option<(PageClass, usize)>,
}

impl std::fmt::Debug for StreamDest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDest").field("written", &self.written).finish_non_exhaustive()
    }
}

impl livemig_compact::Destination for StreamDest<'_> {
    type Error = livemig_compact::CompactError;

    fn read_page(&mut self, page: u64, out: &mut [u8; PAGE_SIZE]) -> bool {
        self.cache.read(page, out)
    }

    fn read_disk_block(&mut self, r: DiskRef, out: &mut [u8; PAGE_SIZE]) -> bool {
        self.disks.read(r, out)
    }

    fn read_snapshot_page(&mut self, page: u64, out: &mut [u8; PAGE_SIZE]) -> bool {
        self.snapshot.is_some_and(|s| s.read_page(page, out).is_ok())
    }

    fn write_page(&mut self, page: u64, class: PageClass, data: &[u8; PAGE_SIZE], record_len: usize) -> Result<(), Self::Error> {
        self.cache.put(page, class, data);
        self.out.copy_from_slice(data);
        self.written = Some((class, record_len));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig_compact::{decode_batch, EncodeOptions, Encoder, PageKey};
    use proptest::prelude::*;

    /// The encoder and the cache stay in step: every page of a random sequence of writes
    /// (re-dirtied, duplicated, zeroed pages) decodes from the encoder's records, one at a
    /// time as the stream engine sends them, to exactly the page; nothing misses.
    fn roundtrip(writes: &[(u64, u8, u8)], total: u64, cache_pages: usize) -> livemig_compact::ClassStats {
        let opts = EncodeOptions {
            refs_need_cache: true,
            delta_cache_bytes: cache_pages * PAGE_SIZE,
            ..EncodeOptions::for_ram(total * PAGE_SIZE as u64)
        };
        let key = PageKey::from_bytes([0x61; 32]);
        let mut enc = Encoder::new(total, opts, key.clone());
        let mut cache = PageCache::new(total, enc.cache_slots());
        let disks = ReceiverDisks::default();
        for &(page, fill, word) in writes {
            // A page is zero, or a pattern of its own (shared by some pages: dups) with one word
            // that changes (re-sent pages: deltas).
            let page = page % total;
            let mut data = [0u8; PAGE_SIZE];
            if fill != 0 {
                data.fill(u8::try_from(page % 3).expect("small") + 1);
                data[usize::from(word % 8) * 8] = word % 8 + 1;
            }
            enc.push(page, &data);
            let rec = enc.take();
            let mut out = [1u8; PAGE_SIZE];
            let mut dest = StreamDest { cache: &mut cache, disks: &disks, snapshot: None, out: &mut out, written: None };
            let s = decode_batch(&rec, total, &key, &mut dest).unwrap();
            assert!(s.misses.is_empty(), "miss at page {page}: {:?}", s.misses);
            assert!(dest.written.is_some());
            assert_eq!(out, data, "page {page}");
        }
        *enc.stats()
    }

    proptest! {
        #[test]
        fn encoder_and_cache_mirror(writes in proptest::collection::vec((0u64..64, 0u8..6, 0u8..255), 0..400), slots in 0usize..40) {
            roundtrip(&writes, 64, slots);
        }
    }

    #[test]
    fn a_long_sequence_uses_dup_and_delta() {
        let writes: Vec<(u64, u8, u8)> = (0..1000u64).map(|i| ((i * 7) % 97, (i % 5) as u8, (i % 251) as u8)).collect();
        let stats = roundtrip(&writes, 97, 128);
        assert!(stats.get(PageClass::Dup).pages > 0 && stats.get(PageClass::Delta).pages > 0, "{stats:?}");
        // A cache too small to hold a page until it is re-sent: no delta, still no miss.
        let stats = roundtrip(&writes, 97, 16);
        assert_eq!(stats.get(PageClass::Delta).pages, 0, "{stats:?}");
    }

    #[test]
    fn reads_zero_and_evicted_pages() {
        let mut c = PageCache::new(10, 2);
        let mut out = [7u8; PAGE_SIZE];
        assert!(c.read(3, &mut out) && out == [0; PAGE_SIZE], "never written: zero");
        c.put(3, PageClass::Raw, &[5; PAGE_SIZE]);
        assert!(c.read(3, &mut out) && out == [5; PAGE_SIZE]);
        c.put(5, PageClass::Raw, &[6; PAGE_SIZE]);
        assert!(!c.read(3, &mut out), "evicted by page 5 (same slot)");
        c.put(5, PageClass::Zero, &[0; PAGE_SIZE]);
        assert!(c.read(5, &mut out) && out == [0; PAGE_SIZE]);
        assert!(!c.read(10, &mut out), "out of range");
    }
}
