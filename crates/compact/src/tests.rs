use super::*;
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

type Page = [u8; PAGE_SIZE];

fn page_from(seed: u8, compressible: bool) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    let mut x = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for (i, b) in p.iter_mut().enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = if compressible { u8::try_from(i % 7).unwrap() ^ seed ^ u8::try_from(i / 700).unwrap() } else { x.to_le_bytes()[0] };
    }
    p
}

fn mutate(p: &Page, seed: u8, words: usize) -> Page {
    let mut q = *p;
    for k in 0..words {
        let w = (usize::from(seed) * 37 + k * 97) % (PAGE_SIZE / 8);
        q[w * 8] ^= 0x5A ^ seed;
        q[w * 8 + 3] = q[w * 8 + 3].wrapping_add(1);
    }
    q
}

/// Destination holding guest RAM, disk images and a snapshot; can be made to lie.
#[derive(Default)]
struct MemDest {
    ram: Vec<Page>,
    disk: HashMap<(u16, u64), Page>,
    snapshot: Vec<Page>,
    writes: Vec<(u64, PageClass, Page, usize)>,
}

impl MemDest {
    fn new(pages: usize) -> Self {
        MemDest { ram: vec![[0u8; PAGE_SIZE]; pages], ..Default::default() }
    }
}

impl Destination for MemDest {
    type Error = CompactError;
    fn read_page(&mut self, page: u64, out: &mut Page) -> bool {
        out.copy_from_slice(&self.ram[usize::try_from(page).unwrap()]);
        true
    }
    fn read_disk_block(&mut self, r: DiskRef, out: &mut Page) -> bool {
        let found = self.disk.get(&(r.image, r.sector)).map(|b| out.copy_from_slice(b)).is_some();
        out[r.disk_bytes()..].fill(0);
        found
    }
    fn read_snapshot_page(&mut self, page: u64, out: &mut Page) -> bool {
        usize::try_from(page).ok().and_then(|q| self.snapshot.get(q)).map(|b| out.copy_from_slice(b)).is_some()
    }
    fn write_page(&mut self, page: u64, class: PageClass, data: &Page, len: usize) -> Result<(), CompactError> {
        self.ram[usize::try_from(page).unwrap()] = *data;
        self.writes.push((page, class, *data, len));
        Ok(())
    }
}

/// Lookups built from the source's copy of the disk and snapshot.
struct Refs(HashMap<u128, DiskRef>, HashMap<u128, u64>);
impl DiskLookup for Refs {
    fn lookup_disk(&self, fp: u128) -> Option<DiskRef> {
        self.0.get(&fp).copied()
    }
}
impl SnapshotLookup for Refs {
    fn lookup_snapshot(&self, fp: u128) -> Option<u64> {
        self.1.get(&fp).copied()
    }
}

fn disk_block(i: u64) -> Page {
    let mut p = page_from(200u8.wrapping_add(u8::try_from(i % 50).unwrap()), true);
    p[..8].copy_from_slice(&i.to_le_bytes());
    p[100] = 0xD1;
    p
}

fn snap_page(i: u64) -> Page {
    let mut p = page_from(100u8.wrapping_add(u8::try_from(i % 50).unwrap()), false);
    p[..8].copy_from_slice(&i.to_le_bytes());
    p
}

const DISK_BLOCKS: u64 = 8;
const SNAP_PAGES: u64 = 8;

fn setup(pages: usize, opts: EncodeOptions) -> (Encoder, MemDest) {
    let mut e = Encoder::new(pages as u64, opts, key());
    let mut d = MemDest::new(pages);
    let mut disk = HashMap::new();
    let mut snap = HashMap::new();
    for i in 0..DISK_BLOCKS {
        let b = disk_block(i);
        disk.insert(fingerprint(&b), DiskRef { image: 3, sector: i, zero_tail_sectors: 0 });
        d.disk.insert((3, i), b);
    }
    for i in 0..SNAP_PAGES {
        let p = snap_page(i);
        snap.insert(fingerprint(&p), i);
        d.snapshot.push(p);
    }
    let refs = Arc::new(Refs(disk, snap));
    e.set_disk_lookup(refs.clone());
    e.set_snapshot_lookup(refs);
    (e, d)
}

/// The migration's key in these tests (both sides).
fn key() -> PageKey {
    PageKey::from_bytes([0x42; PAGE_KEY_LEN])
}

/// A disk block and a guest page that collide under unkeyed xxh3-128 (so the disk index, which
/// is unkeyed, offers the block for the page): the reference goes out with the page's keyed
/// fingerprint, the receiver finds the block's differs, writes nothing and the page is resent.
/// Before keys, the record carried the unkeyed fingerprint, equal to the block's: the block
/// would have been written in place of the page.
#[test]
fn a_colliding_disk_block_is_a_miss_and_never_written() {
    let (block, page) = unkeyed_collision();
    assert_eq!(fingerprint(&block), fingerprint(&page), "what an unkeyed check compared");
    let mut e = Encoder::new(4, EncodeOptions::default(), key());
    let mut d = MemDest::new(4);
    d.disk.insert((3, 100), block);
    let index: HashMap<u128, DiskRef> = [(fingerprint(&block), DiskRef { image: 3, sector: 100, zero_tail_sectors: 0 })].into();
    e.set_disk_lookup(Arc::new(Refs(index, HashMap::new())));
    assert_eq!(e.push(2, &page).0, PageClass::DiskRef, "the unkeyed index offers the colliding block");
    let sum = decode_batch(&e.take(), 4, &key(), &mut d).unwrap();
    let misses: Vec<(u64, PageClass, MissReason)> = sum.misses.iter().map(|m| (m.page, m.class, m.reason)).collect();
    assert_eq!(misses, vec![(2, PageClass::DiskRef, MissReason::Mismatch)]);
    assert!(d.writes.is_empty() && d.ram[2] == [0u8; PAGE_SIZE], "nothing written");
    e.invalidate(2);
    e.push_whole(2, &page);
    assert!(decode_batch(&e.take(), 4, &key(), &mut d).unwrap().misses.is_empty());
    assert_eq!(d.ram[2], page);
}

/// A record whose fingerprint matches its source under the unkeyed function (as a record made
/// for a colliding page would), or under another key, is a miss; only the fingerprint keyed
/// with the receiver's key is accepted.
#[test]
fn only_the_keyed_fingerprint_resolves_a_reference() {
    let block = disk_block(4);
    let record = |fp: u128| {
        let mut r = Vec::new();
        r.extend_from_slice(&1u64.to_le_bytes());
        r.push(PageClass::DiskRef as u8);
        r.extend_from_slice(&26u32.to_le_bytes());
        r.extend_from_slice(&3u16.to_le_bytes());
        r.extend_from_slice(&4u64.to_le_bytes());
        r.extend_from_slice(&fp.to_le_bytes());
        r
    };
    let other = PageKey::from_bytes([0x43; PAGE_KEY_LEN]);
    for (fp, written) in [(fingerprint(&block), false), (other.fingerprint(&block), false), (key().fingerprint(&block), true)] {
        let mut d = MemDest::new(4);
        d.disk.insert((3, 4), block);
        let sum = decode_batch(&record(fp), 4, &key(), &mut d).unwrap();
        assert_eq!(sum.pages_written == 1, written, "fingerprint {fp:032x}");
        assert_eq!(d.ram[1] == block, written);
        if !written {
            assert_eq!(sum.misses[0].reason, MissReason::Mismatch);
        }
    }
}

/// Two guest pages colliding under unkeyed xxh3: the second is no `dup` of the first (the
/// encoder's state is keyed), and arrives as itself.
#[test]
fn colliding_guest_pages_are_not_dups() {
    let (a, b) = unkeyed_collision();
    let mut e = Encoder::new(4, EncodeOptions::default(), key());
    let mut d = MemDest::new(4);
    e.push(0, &a);
    assert_ne!(e.push(1, &b).0, PageClass::Dup);
    assert!(decode_batch(&e.take(), 4, &key(), &mut d).unwrap().misses.is_empty());
    assert_eq!((d.ram[0], d.ram[1]), (a, b));
}

#[test]
fn fingerprint_is_the_index_fingerprint() {
    for p in [page_from(1, true), page_from(2, false), [0u8; PAGE_SIZE]] {
        assert_eq!(fingerprint(&p), livemig_index::Fingerprint::of(&p).0);
    }
    assert_eq!(zero_fingerprint(), fingerprint(&[0u8; PAGE_SIZE]));
}

#[test]
fn delta_runs_roundtrip() {
    let a = page_from(9, false);
    for words in [0, 1, 2, 16, 100, 512] {
        let b = mutate(&a, 3, words);
        let mut runs = Vec::new();
        assert!(delta_encode(&a, &b, &mut runs, PAGE_SIZE * 2));
        let mut c = a;
        assert!(delta_apply(&mut c, &runs));
        assert_eq!(c, b);
    }
    let b = mutate(&a, 3, 16);
    let mut runs = Vec::new();
    assert!(!delta_encode(&a, &b, &mut runs, 40));
    let mut c = a;
    assert!(!delta_apply(&mut c, &[0, 2, 1, 0]), "run past the page");
    assert!(!delta_apply(&mut c, &[0, 0, 0, 0]), "empty run");
    assert!(!delta_apply(&mut c, &[0, 0, 1, 0, 1, 2]), "cut short");
}

#[test]
fn every_class_roundtrips() {
    for compressor in [Compressor::Lz4, Compressor::Zstd(1), Compressor::None] {
        let (mut e, mut d) = setup(32, EncodeOptions { compressor, ..EncodeOptions::default() });
        let text = page_from(3, true);
        let random = page_from(5, false);
        let mut src: Vec<Page> = vec![[0u8; PAGE_SIZE]; 32];
        let plan: Vec<(u64, Page, PageClass)> = vec![
            (0, [0u8; PAGE_SIZE], PageClass::Zero),
            (
                1,
                text,
                match compressor {
                    Compressor::Lz4 => PageClass::Lz4,
                    Compressor::Zstd(_) => PageClass::Zstd,
                    Compressor::None => PageClass::Raw,
                },
            ),
            (2, random, PageClass::Raw),
            (3, random, PageClass::Dup),
            (4, disk_block(5), PageClass::DiskRef),
            (5, snap_page(6), PageClass::SnapshotRef),
            (2, mutate(&random, 1, 16), PageClass::Delta),
            (1, text, PageClass::Dup), // unchanged page marked dirty: dup of itself
            (6, {
                let mut p = [0u8; PAGE_SIZE];
                p[4000] = 1;
                p
            }, PageClass::Delta), // sparse page against the zeroed destination
        ];
        let mut lens = Vec::new();
        for (page, data, want) in &plan {
            let (class, len) = e.push(*page, data);
            assert_eq!(class, *want, "page {page} with {compressor:?}");
            lens.push(len);
            src[usize::try_from(*page).unwrap()] = *data;
        }
        let batch = e.take();
        assert_eq!(lens.iter().sum::<usize>(), batch.len());
        let sum = decode_batch(&batch, 32, &key(), &mut d).unwrap();
        assert_eq!(sum.misses, vec![]);
        assert_eq!(sum.pages_written, plan.len() as u64);
        assert_eq!(d.ram, src);
        let got: Vec<(PageClass, usize)> = d.writes.iter().map(|w| (w.1, w.3)).collect();
        let want: Vec<(PageClass, usize)> = plan.iter().map(|p| p.2).zip(lens.iter().copied()).collect();
        assert_eq!(got, want);
        let s = e.stats();
        assert_eq!(s.pages(), plan.len() as u64);
        assert_eq!(s.wire_bytes(), batch.len() as u64);
        assert_eq!(s.whole_page_bytes(), 8 * PAGE_SIZE as u64);
        let by: HashMap<&str, ClassCount> = s.by_report_name().into_iter().collect();
        assert_eq!(by["zero"].pages, 1);
        assert_eq!(by["raw"].pages, 2);
        assert_eq!(by["dup"].pages, 2);
        assert_eq!(by["disk_ref"].pages, 1);
        assert_eq!(by["snapshot_ref"].pages, 1);
        assert_eq!(by["delta"].pages, 2);
        assert_eq!(by["dup"].wire_bytes, 2 * (RECORD_HEADER as u64 + 24));
        assert!(by["delta"].wire_bytes < 400, "{:?}", by["delta"]);
    }
}

#[test]
fn forced_whole_and_disabled_classes() {
    let (mut e, _) = setup(8, EncodeOptions { dup: false, delta: false, ..EncodeOptions::default() });
    let r = page_from(7, false);
    assert_eq!(e.push(0, &r).0, PageClass::Raw);
    assert_eq!(e.push(1, &r).0, PageClass::Raw, "dup disabled");
    assert_eq!(e.push(0, &mutate(&r, 1, 2)).0, PageClass::Raw, "delta disabled");
    assert_eq!(e.push(2, &disk_block(1)).0, PageClass::DiskRef);
    assert_eq!(e.push_whole(3, &disk_block(1)).0, PageClass::Lz4);
    let (mut e, _) = setup(8, EncodeOptions::default());
    e.push(0, &r);
    assert_eq!(e.push_whole(1, &r).0, PageClass::Raw);
    assert_eq!(e.push_whole(0, &mutate(&r, 1, 2)).0, PageClass::Raw);
    assert_eq!(e.push_whole(4, &[0u8; PAGE_SIZE]).0, PageClass::Zero);
}

#[test]
fn delta_cache_eviction_falls_back_to_whole() {
    // A cache of 2 pages: pages 0 and 2 share a slot.
    let (mut e, mut d) = setup(8, EncodeOptions { delta_cache_bytes: 2 * PAGE_SIZE, ..EncodeOptions::default() });
    let a = page_from(1, false);
    let b = page_from(2, false);
    e.push(0, &a);
    e.push(2, &b);
    assert_eq!(e.push(0, &mutate(&a, 1, 4)).0, PageClass::Raw, "evicted");
    assert_eq!(e.push(2, &mutate(&b, 1, 4)).0, PageClass::Raw, "evicted by the new 0");
    assert_eq!(e.push(2, &mutate(&mutate(&b, 1, 4), 2, 4)).0, PageClass::Delta);
    let sum = decode_batch(&e.take(), 8, &key(), &mut d).unwrap();
    assert!(sum.misses.is_empty());
    assert_eq!(d.ram[2], mutate(&mutate(&b, 1, 4), 2, 4));
}

#[test]
fn lying_destination_gives_misses_and_writes_nothing_wrong() {
    let (mut e, mut d) = setup(16, EncodeOptions::default());
    let a = page_from(11, false);
    let b = page_from(12, false);
    e.push(0, &a);
    e.push(1, &b);
    decode_batch(&e.take(), 16, &key(), &mut d).unwrap();
    // The destination's copies change behind the encoder's back.
    d.disk.insert((3, 2), page_from(99, true)); // a changed disk image
    d.snapshot.truncate(3); // missing snapshot pages
    d.ram[0][17] ^= 1; // a stale dup source
    d.ram[1][33] ^= 1; // a stale delta base
    let before = d.ram.clone();
    e.push(5, &disk_block(2));
    e.push(6, &snap_page(5));
    e.push(7, &a);
    e.push(1, &mutate(&b, 4, 3));
    e.push(8, &disk_block(1)); // still right
    let sum = decode_batch(&e.take(), 16, &key(), &mut d).unwrap();
    let misses: Vec<(u64, PageClass, MissReason)> = sum.misses.iter().map(|m| (m.page, m.class, m.reason)).collect();
    assert_eq!(
        misses,
        vec![
            (5, PageClass::DiskRef, MissReason::Mismatch),
            (6, PageClass::SnapshotRef, MissReason::Unresolved),
            (7, PageClass::Dup, MissReason::Mismatch),
            (1, PageClass::Delta, MissReason::Mismatch),
        ]
    );
    assert_eq!(sum.pages_written, 1);
    for p in [5, 6, 7, 1] {
        assert_eq!(d.ram[p], before[p], "page {p} written");
    }
    assert_eq!(d.ram[8], disk_block(1));
    // The agent resends the misses whole; then everything matches.
    for m in &sum.misses {
        e.invalidate(m.page);
    }
    e.push_whole(5, &disk_block(2));
    e.push_whole(6, &snap_page(5));
    e.push_whole(7, &a);
    e.push_whole(1, &mutate(&b, 4, 3));
    let sum = decode_batch(&e.take(), 16, &key(), &mut d).unwrap();
    assert!(sum.misses.is_empty());
    assert_eq!(d.ram[7], a);
    assert_eq!(d.ram[1], mutate(&b, 4, 3));
    // After an invalidation, no reference uses the page until it is sent again.
    assert_eq!(e.push(9, &a), (PageClass::Dup, RECORD_HEADER + 24));
    e.invalidate(0);
    e.invalidate(7);
    e.invalidate(9);
    assert_eq!(e.push(10, &a).0, PageClass::Raw);
}

#[test]
fn dup_source_out_of_range_is_a_miss() {
    let mut e = Encoder::new(100, EncodeOptions::default(), key());
    let a = page_from(1, false);
    e.push(90, &a);
    e.push(3, &a);
    let batch = e.take();
    let mut d = MemDest::new(100);
    // Decoded for a smaller guest the first record is out of range (an error); rewrite the
    // second record to reference page 90 of a 50-page guest.
    let second = &batch[RECORD_HEADER + PAGE_SIZE..];
    assert_eq!(second[8], PageClass::Dup as u8);
    let sum = decode_batch(second, 50, &key(), &mut d).unwrap();
    assert_eq!(sum.misses[0].reason, MissReason::Unresolved);
    assert!(d.writes.is_empty());
}

#[test]
fn parallel_commit_revalidates() {
    let n = 300usize;
    let (mut e, mut d) = setup(n, EncodeOptions::default());
    let pages: Vec<Page> = (0..n).map(|i| page_from(u8::try_from(i % 251).unwrap(), i % 3 == 0)).collect();
    let refs: Vec<PageRef<'_>> = (0..n).map(|i| PageRef { page: i as u64, data: &pages[i], whole: false }).collect();
    e.push_many(&refs, 2);
    // Next round: page 3 gets new content first, then page 250 takes page 3's old content
    // (prepared in parallel as a dup of page 3, which is stale by commit time) and page 200 is
    // re-dirtied twice in the same round (its second delta base is the first new version).
    let new3 = page_from(77, false);
    let old3 = pages[3];
    let p200a = mutate(&pages[200], 1, 4);
    let p200b = mutate(&p200a, 2, 4);
    let mut round: Vec<(u64, Page)> = vec![(3, new3)];
    round.extend((10..140).map(|i| (i, mutate(&pages[usize::try_from(i).unwrap()], 5, 2))));
    round.push((200, p200a));
    round.push((250, old3));
    round.push((200, p200b));
    let refs: Vec<PageRef<'_>> = round.iter().map(|(p, data)| PageRef { page: *p, data, whole: false }).collect();
    e.push_many(&refs, 2);
    let sum = decode_batch(&e.take(), n as u64, &key(), &mut d).unwrap();
    assert!(sum.misses.is_empty(), "{:?}", sum.misses);
    let mut want = pages.clone();
    for (p, data) in &round {
        want[usize::try_from(*p).unwrap()] = *data;
    }
    assert_eq!(d.ram, want);
    assert_eq!(e.stats().get(PageClass::Delta).pages, 132);
}

#[test]
fn malformed_batches_are_errors() {
    let mut e = Encoder::new(100, EncodeOptions::default(), key());
    e.push(99, &page_from(1, false));
    let batch = e.take();
    let mut d = MemDest::new(100);
    assert_eq!(decode_batch(&batch, 99, &key(), &mut d), Err(CompactError::PageOutOfRange { page: 99, pages: 99 }));
    for (class, err) in [(9u8, CompactError::UnknownClass(9)), (0u8, CompactError::UnknownClass(0))] {
        let mut bad = batch.clone();
        bad[8] = class;
        assert_eq!(decode_batch(&bad, 100, &key(), &mut d), Err(err));
    }
    let mut bad = batch.clone();
    bad[9..13].copy_from_slice(&5000u32.to_le_bytes());
    assert!(matches!(decode_batch(&bad, 100, &key(), &mut d), Err(CompactError::BadLength { .. })));
    let mut bad = batch.clone();
    bad[9..13].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(decode_batch(&bad, 100, &key(), &mut d), Err(CompactError::BadLength { .. })));
    assert_eq!(decode_batch(&batch[..batch.len() - 1], 100, &key(), &mut d), Err(CompactError::Truncated(0)));
    assert_eq!(decode_batch(&batch[..5], 100, &key(), &mut d), Err(CompactError::Truncated(0)));
    // Zero with data, dup of the wrong length.
    let mut bad = batch.clone();
    bad[8] = PageClass::Zero as u8;
    assert!(matches!(decode_batch(&bad, 100, &key(), &mut d), Err(CompactError::BadLength { .. })));
    bad[8] = PageClass::Dup as u8;
    assert!(matches!(decode_batch(&bad, 100, &key(), &mut d), Err(CompactError::BadLength { .. })));
    assert!(d.writes.is_empty());
}

#[test]
fn corrupt_compressed_and_delta_are_errors() {
    for compressor in [Compressor::Lz4, Compressor::Zstd(1)] {
        let mut e = Encoder::new(10, EncodeOptions { compressor, ..EncodeOptions::default() }, key());
        e.push(1, &page_from(3, true));
        let mut batch = e.take();
        let n = batch.len();
        batch.truncate(n - 3);
        let len = u32::try_from(n - 3 - RECORD_HEADER).unwrap();
        batch[9..13].copy_from_slice(&len.to_le_bytes());
        let mut d = MemDest::new(10);
        assert_eq!(decode_batch(&batch, 10, &key(), &mut d), Err(CompactError::BadCompressed(1)));
        // Compressed data of more than a page.
        let big = [7u8; 2 * PAGE_SIZE];
        let data = match compressor {
            Compressor::Lz4 => lz4_flex::block::compress(&big),
            _ => zstd::bulk::compress(&big, 1).unwrap(),
        };
        let mut rec = 1u64.to_le_bytes().to_vec();
        rec.push(if compressor == Compressor::Lz4 { 3 } else { 4 });
        rec.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
        rec.extend_from_slice(&data);
        assert_eq!(decode_batch(&rec, 10, &key(), &mut d), Err(CompactError::BadCompressed(1)));
        assert!(d.writes.is_empty());
    }
    let mut rec = 1u64.to_le_bytes().to_vec();
    rec.push(PageClass::Delta as u8);
    rec.extend_from_slice(&20u32.to_le_bytes());
    rec.extend_from_slice(&[0u8; 16]);
    rec.extend_from_slice(&[0xFF, 0x01, 0x01, 0x00]);
    let mut d = MemDest::new(10);
    assert_eq!(decode_batch(&rec, 10, &key(), &mut d), Err(CompactError::BadDelta(1)));
}

/// One step of the model: how a page's new content is made.
#[derive(Debug, Clone)]
enum Op {
    Zero(u8),
    Random(u8, u8),
    Text(u8, u8),
    CopyOf(u8, u8),
    Mutate(u8, u8, u8),
    Disk(u8, u8),
    Snap(u8, u8),
    Resend(u8),
}

const GUEST: usize = 24;

fn op_strategy() -> impl Strategy<Value = Op> {
    let p = 0u8..u8::try_from(GUEST).unwrap();
    prop_oneof![
        p.clone().prop_map(Op::Zero),
        (p.clone(), any::<u8>()).prop_map(|(a, b)| Op::Random(a, b)),
        (p.clone(), any::<u8>()).prop_map(|(a, b)| Op::Text(a, b)),
        (p.clone(), p.clone()).prop_map(|(a, b)| Op::CopyOf(a, b)),
        (p.clone(), any::<u8>(), 1u8..40).prop_map(|(a, b, c)| Op::Mutate(a, b, c)),
        (p.clone(), 0u8..10).prop_map(|(a, b)| Op::Disk(a, b)),
        (p.clone(), 0u8..10).prop_map(|(a, b)| Op::Snap(a, b)),
        p.prop_map(Op::Resend),
    ]
}

fn apply(op: &Op, src: &mut [Page]) -> (u64, bool) {
    let (page, data, whole) = match *op {
        Op::Zero(p) => (p, [0u8; PAGE_SIZE], false),
        Op::Random(p, s) => (p, page_from(s, false), false),
        Op::Text(p, s) => (p, page_from(s, true), false),
        Op::CopyOf(p, q) => (p, src[usize::from(q)], false),
        Op::Mutate(p, s, w) => (p, mutate(&src[usize::from(p)], s, usize::from(w)), false),
        Op::Disk(p, b) => (p, disk_block(u64::from(b)), false),
        Op::Snap(p, q) => (p, snap_page(u64::from(q)), false),
        Op::Resend(p) => (p, src[usize::from(p)], true),
    };
    src[usize::from(page)] = data;
    (u64::from(page), whole)
}

fn compressor_of(i: u8) -> Compressor {
    [Compressor::Lz4, Compressor::Zstd(1), Compressor::None][usize::from(i % 3)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Random rounds of page changes, encoded one by one or on 2 threads, decode to the source.
    #[test]
    fn model_roundtrip(
        rounds in proptest::collection::vec(proptest::collection::vec(op_strategy(), 1..60), 1..6),
        comp in 0u8..3,
        cache_pages in 0usize..8,
        parallel in any::<bool>(),
    ) {
        let opts = EncodeOptions {
            compressor: compressor_of(comp),
            delta_cache_bytes: cache_pages * PAGE_SIZE,
            ..EncodeOptions::default()
        };
        let (mut e, mut d) = setup(GUEST, opts);
        let mut src = vec![[0u8; PAGE_SIZE]; GUEST];
        for round in rounds {
            let mut items = Vec::new();
            for op in &round {
                let (page, whole) = apply(op, &mut src);
                items.push((page, src[usize::try_from(page).unwrap()], whole));
            }
            if parallel {
                let refs: Vec<PageRef<'_>> = items.iter().map(|(page, data, whole)| PageRef { page: *page, data, whole: *whole }).collect();
                e.push_many(&refs, 2);
            } else {
                for (page, data, whole) in &items {
                    let (class, _) = if *whole { e.push_whole(*page, data) } else { e.push(*page, data) };
                    prop_assert!(!*whole || class.is_whole() || class == PageClass::Zero);
                }
            }
            let batch = e.take();
            let sum = decode_batch(&batch, GUEST as u64, &key(), &mut d).unwrap();
            prop_assert!(sum.misses.is_empty(), "{:?}", sum.misses);
            prop_assert_eq!(&d.ram, &src);
        }
        let s = e.stats();
        prop_assert_eq!(s.pages(), d.writes.len() as u64);
        prop_assert_eq!(s.wire_bytes(), d.writes.iter().map(|w| w.3 as u64).sum::<u64>());
    }

    /// The destination's disk, snapshot and RAM are corrupted between batches: every page the
    /// decoder writes is the content the sender sent for it, every other record is a miss, and
    /// resending the misses whole repairs the destination.
    #[test]
    fn lying_destination_never_gets_wrong_pages(
        rounds in proptest::collection::vec(
            (proptest::collection::vec(op_strategy(), 1..40), proptest::collection::vec((0u8..3, any::<u8>()), 0..6)),
            1..5),
        comp in 0u8..3,
    ) {
        let (mut e, mut d) = setup(GUEST, EncodeOptions { compressor: compressor_of(comp), ..EncodeOptions::default() });
        let mut src = vec![[0u8; PAGE_SIZE]; GUEST];
        for (round, lies) in rounds {
            for (kind, x) in lies {
                match kind {
                    0 => { d.disk.insert((3, u64::from(x % 10)), page_from(x, true)); }
                    1 => { d.snapshot.truncate(usize::from(x % 10)); }
                    _ => { d.ram[usize::from(x) % GUEST][usize::from(x) * 13 % PAGE_SIZE] ^= 0x80; }
                }
            }
            let mut sent = Vec::new();
            for op in &round {
                let (page, whole) = apply(op, &mut src);
                let data = src[usize::try_from(page).unwrap()];
                let (class, _) = if whole { e.push_whole(page, &data) } else { e.push(page, &data) };
                sent.push((page, class, data));
            }
            d.writes.clear();
            let sum = decode_batch(&e.take(), GUEST as u64, &key(), &mut d).unwrap();
            prop_assert_eq!(d.writes.len() + sum.misses.len(), sent.len());
            let mut writes = d.writes.iter();
            let mut misses = sum.misses.iter();
            for (page, class, data) in &sent {
                // Records are decoded in order: each is either the next write or the next miss.
                match writes.as_slice().first() {
                    Some(w) if w.0 == *page && w.1 == *class && w.2 == *data => { writes.next(); }
                    _ => {
                        let m = misses.next();
                        prop_assert!(m.is_some_and(|m| m.page == *page && m.class == *class), "page {} neither written right nor missed", page);
                    }
                }
            }
            // The agent's resend: invalidate the missed pages, then send their current content whole.
            let missed: Vec<u64> = sum.misses.iter().map(|m| m.page).collect();
            for &p in &missed { e.invalidate(p); }
            for &p in &missed { e.push_whole(p, &src[usize::try_from(p).unwrap()]); }
            let sum = decode_batch(&e.take(), GUEST as u64, &key(), &mut d).unwrap();
            prop_assert!(sum.misses.is_empty());
            for &p in &missed {
                prop_assert_eq!(d.ram[usize::try_from(p).unwrap()], src[usize::try_from(p).unwrap()]);
            }
        }
    }

    /// A valid batch of every class with one byte changed: never a panic.
    #[test]
    fn corrupted_batches_never_panic(at in any::<prop::sample::Index>(), xor in 1u8..=255, comp in 0u8..3) {
        let (mut e, mut d) = setup(GUEST, EncodeOptions { compressor: compressor_of(comp), ..EncodeOptions::default() });
        let a = page_from(1, false);
        e.push(0, &a);
        e.push(1, &page_from(2, true));
        decode_batch(&e.take(), GUEST as u64, &key(), &mut d).unwrap();
        e.push(2, &a);
        e.push(3, &disk_block(1));
        e.push(4, &snap_page(2));
        e.push(0, &mutate(&a, 1, 5));
        e.push(5, &[0u8; PAGE_SIZE]);
        e.push(6, &page_from(9, true));
        e.push(7, &page_from(9, false));
        let mut batch = e.take();
        let i = at.index(batch.len());
        batch[i] ^= xor;
        let _ = decode_batch(&batch, GUEST as u64, &key(), &mut d);
    }

    #[test]
    fn arbitrary_batches_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
        let mut d = MemDest::new(64);
        d.snapshot.push(page_from(1, false));
        let _ = decode_batch(&bytes, 64, &key(), &mut d);
    }

    /// Valid records with arbitrary class bytes and data: never a panic, and a reference or
    /// delta is written only with content matching its fingerprint.
    #[test]
    fn arbitrary_records_never_panic(
        recs in proptest::collection::vec((0u64..8, 0u8..10, proptest::collection::vec(any::<u8>(), 0..64)), 1..8),
    ) {
        let mut batch = Vec::new();
        for (page, class, data) in &recs {
            batch.extend_from_slice(&page.to_le_bytes());
            batch.push(*class);
            batch.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
            batch.extend_from_slice(data);
        }
        let mut d = MemDest::new(8);
        d.disk.insert((0, 0), page_from(1, true));
        d.snapshot.push(page_from(2, true));
        let _ = decode_batch(&batch, 8, &key(), &mut d);
        for w in &d.writes {
            prop_assert!(!matches!(w.1, PageClass::Dup | PageClass::DiskRef | PageClass::SnapshotRef | PageClass::Delta));
        }
    }
}

#[test]
fn recycled_buffers_and_compressor_switch() {
    let mut e = Encoder::new(600, EncodeOptions::default(), key());
    let mut d = MemDest::new(600);
    let text = page_from(3, true);
    assert_eq!(e.push(0, &text).0, PageClass::Lz4);
    e.set_compressor(Compressor::None);
    assert_eq!(e.push(1, &mutate(&text, 1, 300)).0, PageClass::Raw);
    e.set_compressor(Compressor::Zstd(1));
    assert_eq!(e.push(2, &mutate(&text, 2, 300)).0, PageClass::Zstd);
    // Another level on the same context: the decoder does not need to know it.
    e.set_compressor(Compressor::Zstd(9));
    assert_eq!(e.push(3, &mutate(&text, 3, 300)).0, PageClass::Zstd);
    e.set_compressor(Compressor::Zstd(1));
    let mut batches = 0;
    let unique = |i: u64| {
        let mut p = page_from(u8::try_from(i % 251).unwrap(), false);
        p[..8].copy_from_slice(&i.to_le_bytes());
        p
    };
    for i in 4..600u64 {
        e.push(i, &unique(i));
        if e.is_full() {
            let b = e.take();
            assert!(decode_batch(&b, 600, &key(), &mut d).unwrap().misses.is_empty());
            e.recycle(b);
            batches += 1;
        }
    }
    assert!(batches >= 2);
    let b = e.take();
    assert!(decode_batch(&b, 600, &key(), &mut d).unwrap().misses.is_empty());
    assert_eq!(d.ram[2], mutate(&text, 2, 300));
    assert_eq!(d.ram[3], mutate(&text, 3, 300));
    assert_eq!(d.ram[599], unique(599));
}

/// `Scratch::compress_page` says what the encoder would send: the same class and data length.
#[test]
fn compress_page_measures_what_the_encoder_sends() {
    let mut scratch = Scratch::default();
    let text = page_from(5, true);
    let noise = page_from(6, false);
    for c in [Compressor::None, Compressor::Lz4, Compressor::Zstd(1), Compressor::Zstd(3), Compressor::Zstd(1)] {
        for (i, page) in [text, noise].iter().enumerate() {
            let mut e = Encoder::new(4, EncodeOptions { compressor: c, ..EncodeOptions::default() }, key());
            let (class, record) = e.push_whole(u64::try_from(i).unwrap(), page);
            assert_eq!(scratch.compress_page(c, page), (class, record - RECORD_HEADER), "{c:?} page {i}");
        }
    }
    assert_eq!(scratch.compress_page(Compressor::None, &text), (PageClass::Raw, PAGE_SIZE));
    assert_eq!(scratch.compress_page(Compressor::Lz4, &noise), (PageClass::Raw, PAGE_SIZE), "noise does not compress");
    let (class, n) = scratch.compress_page(Compressor::Zstd(1), &text);
    assert!(class == PageClass::Zstd && n < PAGE_SIZE / 2, "text compresses: {n}");
}

#[test]
fn disk_refs_pack_their_sector_and_zero_tail_into_one_word() {
    for (sector, tail) in [(0u64, 0u8), (7, 1), (DiskRef::MAX_SECTOR, 7), (123_456_789, 6)] {
        let r = DiskRef { image: 9, sector, zero_tail_sectors: tail };
        assert_eq!(DiskRef::from_wire(9, r.to_wire()), r);
        assert_eq!(r.disk_bytes(), 4096 - 512 * usize::from(tail));
    }
    assert_eq!(DiskRef::from_wire(1, u64::MAX), DiskRef { image: 1, sector: DiskRef::MAX_SECTOR, zero_tail_sectors: 7 });
}

/// The last page of a file on a filesystem with 1 KiB blocks: its data, then zeros where the
/// disk goes on with other blocks. The reference names the data's sector and the zero tail; the
/// receiver reads only the data and checks the whole page.
#[test]
fn a_disk_ref_with_a_zero_tail_decodes_to_the_data_then_zeros() {
    let mut disk_content = disk_block(5);
    let mut page = disk_content;
    page[2048..].fill(0);
    disk_content[2048..].fill(0xEE); // the disk's next blocks: other data
    let index: HashMap<u128, DiskRef> = [(fingerprint(&page), DiskRef { image: 2, sector: 40, zero_tail_sectors: 4 })].into();
    let mut e = Encoder::new(8, EncodeOptions::default(), key());
    e.set_disk_lookup(Arc::new(Refs(index, HashMap::new())));
    assert_eq!(e.push(1, &page).0, PageClass::DiskRef);
    let batch = e.take();
    let mut d = MemDest::new(8);
    d.disk.insert((2, 40), disk_content);
    let s = decode_batch(&batch, 8, &key(), &mut d).unwrap();
    assert!(s.misses.is_empty(), "{:?}", s.misses);
    assert_eq!(d.ram[1], page);
}

/// In a pass whose records may be applied in any order (and whose dups are resolved once the
/// pass is applied), a page of the pass not committed yet is never another page's `dup` source:
/// at the end of the pass it will hold other content. A page committed earlier in the pass, or
/// sent before it, is a source.
#[test]
fn a_page_the_pass_sends_later_is_no_dup_source() {
    let a = page_from(11, true);
    let b = page_from(12, false);
    let c = page_from(13, true);
    let mut e = Encoder::new(16, EncodeOptions::default(), key());
    e.push(0, &a);
    e.push(5, &c);
    e.take();
    e.begin_pass([1, 2, 3, 5]);
    assert_ne!(e.push(1, &b).0, PageClass::Dup);
    assert_eq!(e.push(2, &b).0, PageClass::Dup, "page 1 was committed earlier in the pass");
    // Page 5 holds c from before the pass but is sent later in it: no source.
    assert_ne!(e.push(3, &c).0, PageClass::Dup, "a source the pass rewrites later");
    e.push(5, &page_from(14, false));
    e.end_pass();
    e.take();
    assert_eq!(e.push(4, &a).0, PageClass::Dup, "sent before the pass");
}

/// `data_runs` lists the consecutive pages a batch writes with data, zero records excluded.
#[test]
fn data_runs_are_the_consecutive_data_pages_of_a_batch() {
    let mut e = Encoder::new(64, EncodeOptions { dest_starts_zeroed: false, ..EncodeOptions::default() }, key());
    for p in [3u64, 4, 5, 9, 10, 20] {
        e.push(p, &page_from(u8::try_from(p).unwrap(), true));
    }
    e.push(11, &[0u8; PAGE_SIZE]);
    e.push(12, &page_from(12, false));
    let b = e.take();
    assert_eq!(data_runs(&b), vec![3..6, 9..11, 20..21, 12..13]);
    assert!(data_runs(&b[..b.len() - 5]).len() <= 4, "a cut batch stops quietly");
    assert!(data_runs(&[]).is_empty());
}
