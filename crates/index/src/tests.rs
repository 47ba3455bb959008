use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use proptest::prelude::*;

use super::*;

/// A non-zero block whose content depends on `seed`.
fn block(seed: u64) -> [u8; BLOCK_SIZE] {
    let mut b = [0u8; BLOCK_SIZE];
    for (j, c) in b.chunks_exact_mut(8).enumerate() {
        let v = (seed + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (j as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        c.copy_from_slice(&v.to_le_bytes());
    }
    b
}

/// Writes an image whose block i is `block(seeds[i])`, or zero where `seeds[i]` is None.
fn image(dir: &Path, seeds: &[Option<u64>]) -> PathBuf {
    let p = dir.join("disk.raw");
    let mut f = fs::File::create(&p).unwrap();
    for s in seeds {
        f.write_all(&s.map_or([0u8; BLOCK_SIZE], block)).unwrap();
    }
    p
}

fn fp(seed: u64) -> Fingerprint {
    Fingerprint::of(&block(seed))
}

/// Lookups of whole windows, by sector.
trait LookupSector {
    fn lookup_sector(&self, fp: &Fingerprint) -> Option<u64>;
}

impl LookupSector for DiskIndex {
    fn lookup_sector(&self, fp: &Fingerprint) -> Option<u64> {
        self.lookup(fp).map(|w| {
            assert_eq!(w.zero_tail_sectors, 0, "{w:?}");
            w.sector
        })
    }
}

fn quiet() -> impl FnMut(BuildProgress) {
    |_| {}
}

#[test]
fn build_and_lookup_round_trip_over_several_segments() {
    let dir = tempfile::tempdir().unwrap();
    let n = 9000u64; // three 16 MiB segments
    let img = image(dir.path(), &(0..n).map(Some).collect::<Vec<_>>());
    let mut calls = Vec::new();
    let idx = DiskIndex::build_with_threads(&img, Align::Bytes(4096), 3, &mut |p| calls.push(p)).unwrap();
    assert_eq!(idx.len(), 9000);
    assert_eq!(idx.image_blocks(), n);
    assert_eq!(idx.zero_blocks(), 0);
    for i in 0..n {
        assert_eq!(idx.lookup_sector(&fp(i)), Some(i * 8), "block {i}");
    }
    assert_eq!(idx.lookup_sector(&fp(n + 1)), None);
    assert_eq!(calls.first().unwrap().done_bytes, 0);
    assert!(calls.windows(2).all(|w| w[0].done_bytes <= w[1].done_bytes));
    let last = calls.last().unwrap();
    assert_eq!(last.done_bytes, last.total_bytes);
    assert_eq!(last.total_bytes, n * BLOCK_SIZE_U64);
}

#[test]
fn duplicates_map_to_first_block_and_zero_blocks_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut seeds: Vec<Option<u64>> = (0..9000).map(|i| Some(1000 + i)).collect();
    // seed 7 at 8500, 4200 and 300: first is 300, in the first segment, found by whichever thread.
    seeds[8500] = Some(7);
    seeds[4200] = Some(7);
    seeds[300] = Some(7);
    seeds[5] = None;
    seeds[8999] = None;
    let img = image(dir.path(), &seeds);
    let mut hashes = Vec::new();
    for threads in [1, 2, 4] {
        let idx = DiskIndex::build_with_threads(&img, Align::Bytes(4096), threads, &mut quiet()).unwrap();
        assert_eq!(idx.lookup_sector(&fp(7)), Some(300 * 8));
        assert_eq!(idx.lookup_sector(&Fingerprint::of(&[0u8; BLOCK_SIZE])), None);
        assert_eq!(idx.zero_blocks(), 2);
        assert_eq!(idx.len(), 9000 - 2 - 2);
        assert_eq!(idx.lookup_sector(&fp(1000 + 6)), Some(6 * 8));
        hashes.push(idx.identity());
    }
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "identity independent of threads: {hashes:?}");
}

#[test]
fn empty_and_partial_images() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.raw");
    fs::write(&p, b"").unwrap();
    let idx = DiskIndex::build(&p, &mut quiet()).unwrap();
    assert!(idx.is_empty());
    assert_eq!(idx.image_blocks(), 0);

    let p = dir.path().join("partial.raw");
    let mut data = Vec::new();
    data.extend_from_slice(&block(1));
    data.extend_from_slice(&block(2));
    data.extend_from_slice(&block(3)[..100]);
    fs::write(&p, &data).unwrap();
    let cache = dir.path().join("cache");
    let (idx, o) = DiskIndex::load_or_build(&p, &cache, &mut quiet()).unwrap();
    assert!(o.built());
    // No filesystem: a window at every sector, the last one whole within the image.
    assert_eq!(idx.stride(), 512);
    assert_eq!(idx.windows(), (2 * 4096 + 100 - 4096) / 512 + 1);
    // Each window whole, and as its first 1..7 sectors then zeros where those end in a zero
    // byte (the last page of a file).
    let ends_in_zero = |w: usize| (1..8).filter(|k| data[w * 512 + k * 512 - 1] == 0).count();
    assert_eq!(idx.len(), (0..9).map(|w| 1 + ends_in_zero(w)).sum::<usize>());
    assert_eq!(idx.image_size(), 2 * 4096 + 100);
    let (again, o) = DiskIndex::load_or_build(&p, &cache, &mut quiet()).unwrap();
    assert!(!o.built(), "{o:?}");
    assert_eq!(again.identity(), idx.identity());
}

/// The index cache holds fingerprints of the image: directory 0700, index files 0600, and a cache
/// directory others can use is refused with the fix.
#[test]
fn the_index_cache_is_private() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), &seeds(50));
    let cache = dir.path().join("cache");
    let (_, o) = DiskIndex::load_or_build(&img, &cache, &mut quiet()).unwrap();
    assert_eq!(fs::metadata(&cache).unwrap().mode() & 0o777, 0o700);
    assert_eq!(fs::metadata(o.file()).unwrap().mode() & 0o777, 0o600);
    assert_eq!(fs::read_dir(&cache).unwrap().count(), 1, "no temporary file left");

    fs::set_permissions(&cache, fs::Permissions::from_mode(0o755)).unwrap();
    let e = DiskIndex::load_or_build(&img, &cache, &mut quiet()).unwrap_err();
    let IndexError::Insecure(i) = &e else { panic!("{e:?}") };
    assert_eq!(i.mode, 0o755);
    let text = e.to_string();
    assert!(
        text.contains(&format!("the index cache directory {} has mode 0755", cache.display()))
            && text.contains(&format!("run `chmod 700 {}`", cache.display())),
        "{text}"
    );
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o700)).unwrap();
    let (_, o) = DiskIndex::load_or_build(&img, &cache, &mut quiet()).unwrap();
    assert!(!o.built(), "after chmod 700 the cached index is used again: {o:?}");
}

#[test]
fn a_directory_is_not_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let e = DiskIndex::build(dir.path(), &mut quiet()).unwrap_err();
    assert!(matches!(e, IndexError::NotAFile { .. }), "{e}");
}

fn seeds(n: u64) -> Vec<Option<u64>> {
    (0..n).map(|i| if i % 10 == 3 { None } else { Some(i % 700) }).collect()
}

#[test]
fn persisted_index_reloads_without_rebuilding() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), &seeds(2000));
    let cache = dir.path().join("c/index");
    let (a, o) = DiskIndex::load_or_build(&img, &cache, &mut quiet()).unwrap();
    assert!(matches!(o, Origin::Built { previous: None, .. }), "{o:?}");
    assert!(o.file().exists());
    let mut progress_calls = 0;
    let (b, o) = DiskIndex::load_or_build(&img, &cache, &mut |_| progress_calls += 1).unwrap();
    assert!(matches!(o, Origin::Loaded { .. }), "{o:?}");
    assert_eq!(progress_calls, 0, "loading does not scan the image");
    assert_eq!(a.identity(), b.identity());
    assert_eq!(a.zero_blocks(), b.zero_blocks());
    assert_eq!(a.iter().collect::<Vec<_>>(), b.iter().collect::<Vec<_>>());
    for s in 0..700 {
        assert_eq!(a.lookup_sector(&fp(s)), if s % 10 == 3 { None } else { Some(s * 8) });
        assert_eq!(b.lookup_sector(&fp(s)), a.lookup_sector(&fp(s)));
    }
    // The file is named after the canonical path: another spelling of the path finds it.
    let other = dir.path().join("c/../disk.raw");
    let (_, o) = DiskIndex::load_or_build(&other, &cache, &mut quiet()).unwrap();
    assert!(!o.built(), "{o:?}");
}

#[test]
fn a_modified_block_triggers_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), &seeds(2000));
    let cache = dir.path().join("cache");
    let (a, _) = DiskIndex::load_or_build(&img, &cache, &mut quiet()).unwrap();
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&block(99_999), 1500 * BLOCK_SIZE_U64).unwrap();
    drop(f);
    let (b, o) = DiskIndex::load_or_build(&img, &cache, &mut quiet()).unwrap();
    assert!(matches!(o, Origin::Built { previous: Some(IndexError::Stale { .. }), .. }), "{o:?}");
    assert_eq!(b.lookup_sector(&fp(99_999)), Some(1500 * 8));
    assert_ne!(a.identity().index_hash, b.identity().index_hash);
    let (_, o) = DiskIndex::load_or_build(&img, &cache, &mut quiet()).unwrap();
    assert!(!o.built());
}

#[test]
fn a_touched_image_triggers_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), &seeds(100));
    let cache = dir.path().join("cache");
    DiskIndex::load_or_build(&img, &cache, &mut quiet()).unwrap();
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(3600)).unwrap();
    drop(f);
    let (_, o) = DiskIndex::load_or_build(&img, &cache, &mut quiet()).unwrap();
    match o {
        Origin::Built { previous: Some(IndexError::Stale { what, .. }), .. } => assert!(what == "mtime" || what == "ctime"),
        o => panic!("expected a rebuild, got {o:?}"),
    }
}

#[test]
fn a_replaced_image_triggers_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), &seeds(100));
    let cache = dir.path().join("cache");
    DiskIndex::load_or_build(&img, &cache, &mut quiet()).unwrap();
    let copy = dir.path().join("copy.raw");
    fs::copy(&img, &copy).unwrap();
    fs::rename(&copy, &img).unwrap();
    let (_, o) = DiskIndex::load_or_build(&img, &cache, &mut quiet()).unwrap();
    assert!(o.built(), "{o:?}");
}

fn built_then_file(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let img = image(dir, &seeds(3000));
    let cache = dir.join("cache");
    let (_, o) = DiskIndex::load_or_build(&img, &cache, &mut quiet()).unwrap();
    (img, cache, o.file().to_path_buf())
}

#[test]
fn truncated_index_files_trigger_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let (img, cache, file) = built_then_file(dir.path());
    let good = fs::read(&file).unwrap();
    for len in [0, 7, 8, 100, 119, 120, 135, 136, 137, 1000, good.len() - 17, good.len() - 16, good.len() - 1] {
        fs::write(&file, &good[..len]).unwrap();
        assert!(DiskIndex::load(&img, &file).is_err(), "truncated to {len}");
        let (_, o) = DiskIndex::load_or_build(&img, &cache, &mut quiet()).unwrap();
        assert!(matches!(o, Origin::Built { previous: Some(IndexError::Invalid { .. }), .. }), "len {len}: {o:?}");
        assert_eq!(fs::read(&file).unwrap(), good);
    }
    // Longer than announced.
    let mut long = good.clone();
    long.extend_from_slice(&[0; 20]);
    fs::write(&file, &long).unwrap();
    assert!(matches!(DiskIndex::load(&img, &file), Err(IndexError::Invalid { .. })));
}

#[test]
fn corrupted_index_files_trigger_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let (img, cache, file) = built_then_file(dir.path());
    let good = fs::read(&file).unwrap();
    // A huge entry count must be refused before any allocation.
    let mut bad = good.clone();
    bad[112..120].copy_from_slice(&u64::MAX.to_le_bytes());
    fs::write(&file, &bad).unwrap();
    let e = DiskIndex::load(&img, &file).unwrap_err();
    assert!(matches!(e, IndexError::Invalid { .. }), "{e}");
    // A flipped bit in the body.
    let mut bad = good.clone();
    bad[120 + 20 * 50 + 3] ^= 0x10;
    fs::write(&file, &bad).unwrap();
    let e = DiskIndex::load(&img, &file).unwrap_err();
    assert!(e.to_string().contains("invalid"), "{e}");
    let (_, o) = DiskIndex::load_or_build(&img, &cache, &mut quiet()).unwrap();
    assert!(o.built());
    // Garbage of the right length.
    fs::write(&file, vec![0xa5; good.len()]).unwrap();
    let (_, o) = DiskIndex::load_or_build(&img, &cache, &mut quiet()).unwrap();
    assert!(o.built());
    assert_eq!(fs::read(&file).unwrap(), good);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_corruption_is_an_error_not_a_panic(pos in 0usize..1_000_000, xor in 1u8..=255, cut in proptest::option::of(0usize..1_000_000)) {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), &seeds(60));
        let file = dir.path().join("i.idx");
        DiskIndex::build(&img, &mut quiet()).unwrap().save(&file).unwrap();
        let mut bytes = fs::read(&file).unwrap();
        let p = pos % bytes.len();
        bytes[p] ^= xor;
        if let Some(c) = cut {
            bytes.truncate(c % bytes.len());
        }
        fs::write(&file, &bytes).unwrap();
        prop_assert!(DiskIndex::load(&img, &file).is_err());
    }

    #[test]
    fn lookup_finds_exactly_the_keys(keys in proptest::collection::btree_set(any::<u128>(), 0..3000), probes in proptest::collection::vec(any::<u128>(), 0..200)) {
        let map: BTreeMap<u128, u32> = keys.iter().enumerate().map(|(i, &k)| (k, u32::try_from(i).unwrap())).collect();
        let (k, b): (Vec<u128>, Vec<u32>) = map.iter().map(|(&k, &b)| (k, b)).unzip();
        let meta = Meta { stamp: file::Stamp { size: 0, mtime: (0, 0), ctime: (0, 0), ino: 0, dev: 0 }, sample_hash: 0, index_hash: 0, zero_blocks: 0, stride: 4096 };
        let n = k.len();
        let idx = DiskIndex::from_sorted(k, b, vec![0; n], meta);
        for (&k, &b) in &map {
            prop_assert_eq!(idx.lookup_sector(&Fingerprint(k)), Some(u64::from(b) * 8));
        }
        for p in probes {
            prop_assert_eq!(idx.lookup_sector(&Fingerprint(p)), map.get(&p).map(|&b| u64::from(b) * 8));
        }
    }
}

#[test]
fn block_reader_verifies_fingerprints() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), &seeds(50));
    let idx = DiskIndex::build(&img, &mut quiet()).unwrap();
    let r = BlockReader::open(&img).unwrap();
    assert_eq!(r.size().unwrap(), 50 * BLOCK_SIZE_U64);
    let mut buf = [0u8; BLOCK_SIZE];
    let by_block: HashMap<u64, Fingerprint> = idx.iter().filter(|(_, w)| w.zero_tail_sectors == 0).map(|(f, w)| (w.sector, f)).collect();
    for (&b, &f) in &by_block {
        r.read_window(Window::whole(b), f, &mut buf).unwrap();
        assert_eq!(Fingerprint::of(&buf), f);
    }
    // The image changes under the receiver: block 20 gets new content.
    let expected = by_block[&(20 * 8)];
    OpenOptions::new().write(true).open(&img).unwrap().write_all_at(&block(4242), 20 * BLOCK_SIZE_U64).unwrap();
    let e = r.read_window(Window::whole(20 * 8), expected, &mut buf).unwrap_err();
    assert!(e.needs_resend());
    match e {
        IndexError::BlockMismatch { sector, expected: x, found, .. } => {
            assert_eq!((sector, x, found), (160, expected, fp(4242)));
        }
        e => panic!("expected a mismatch, got {e}"),
    }
    // The last sector whose 4 KiB the image holds is 49 * 8; one more runs past the end.
    let e = r.read_window(Window::whole(49 * 8 + 1), expected, &mut buf).unwrap_err();
    assert!(matches!(e, IndexError::BlockOutOfRange { sector: 393, size: 204_800, .. }), "{e}");
    let e = r.read_window(Window::whole(u64::MAX), expected, &mut buf).unwrap_err();
    assert!(matches!(e, IndexError::BlockOutOfRange { .. }), "{e}");
}

#[test]
fn identity_serialises_compactly() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), &seeds(10));
    let id = DiskIndex::build(&img, &mut quiet()).unwrap().identity();
    let json = serde_json::to_string(&id).unwrap();
    assert!(json.len() < 120, "{json}");
    assert_eq!(serde_json::from_str::<ImageIdentity>(&json).unwrap(), id);
    assert!(serde_json::from_str::<ImageIdentity>(r#"{"size":1,"sample_hash":"12","index_hash":"zz"}"#).is_err());
    let f = fp(3);
    assert_eq!(serde_json::from_str::<Fingerprint>(&serde_json::to_string(&f).unwrap()).unwrap(), f);
}

#[test]
fn fingerprints_and_zero() {
    assert!(is_zero(&[0u8; BLOCK_SIZE]));
    assert!(!is_zero(&block(0)));
    let mut b = [0u8; BLOCK_SIZE];
    b[4095] = 1;
    assert!(!is_zero(&b));
    assert_eq!(Fingerprint::of_slice(&block(5)), Some(fp(5)));
    assert_eq!(Fingerprint::of_slice(&[1u8; 100]), None);
}

/// An ext2/3/4 superblock (magic and block size only) for a filesystem starting at `start`.
fn ext_superblock(img: &mut Vec<u8>, start: usize, block_size: u32) {
    let sb = start + 1024;
    if img.len() < sb + 1024 {
        img.resize(sb + 1024, 0);
    }
    img[sb + 24..sb + 28].copy_from_slice(&(block_size / 1024).trailing_zeros().to_le_bytes());
    img[sb + 56..sb + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
    img[sb + 96..sb + 100].copy_from_slice(&0x40u32.to_le_bytes()); // extents: ext4
}

/// An MBR with partitions of type 0x83 (or 0xEE) at these sectors.
fn mbr(img: &mut Vec<u8>, starts: &[(u8, u32)]) {
    if img.len() < 512 {
        img.resize(512, 0);
    }
    for (i, &(t, lba)) in starts.iter().enumerate() {
        let e = 446 + 16 * i;
        img[e + 4] = t;
        img[e + 8..e + 12].copy_from_slice(&lba.to_le_bytes());
        img[e + 12..e + 16].copy_from_slice(&1000u32.to_le_bytes());
    }
    img[510] = 0x55;
    img[511] = 0xAA;
}

fn stride_of(dir: &Path, img: &[u8]) -> Stride {
    let p = dir.join("probe.raw");
    fs::write(&p, img).unwrap();
    detect_stride(&Source::open(&fs::File::open(&p).unwrap(), &p).unwrap(), &p).unwrap()
}

#[test]
fn the_stride_follows_the_filesystems_block_size_and_partition_offset() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut img = Vec::new();
    ext_superblock(&mut img, 0, 1024);
    let s = stride_of(d, &img);
    assert_eq!(s.bytes, 1024, "{s:?}");
    assert!(s.reason.contains("ext4 with 1024-byte blocks at byte 0"), "{s:?}");

    let mut img = Vec::new();
    ext_superblock(&mut img, 0, 4096);
    assert_eq!(stride_of(d, &img).bytes, 4096);

    let mut img = Vec::new();
    ext_superblock(&mut img, 0, 2048);
    assert_eq!(stride_of(d, &img).bytes, 2048);

    // 4 KiB blocks in a partition at sector 2048 (1 MiB): still 4 KiB-aligned on the disk.
    let mut img = Vec::new();
    mbr(&mut img, &[(0x83, 2048)]);
    ext_superblock(&mut img, 2048 * 512, 4096);
    assert_eq!(stride_of(d, &img).bytes, 4096);

    // ... at sector 63 (old DOS alignment): blocks start on odd sectors.
    let mut img = Vec::new();
    mbr(&mut img, &[(0x83, 63)]);
    ext_superblock(&mut img, 63 * 512, 4096);
    assert_eq!(stride_of(d, &img).bytes, 512);

    // Two partitions: the finer one decides.
    let mut img = Vec::new();
    mbr(&mut img, &[(0x83, 2048), (0x83, 4096)]);
    ext_superblock(&mut img, 2048 * 512, 4096);
    ext_superblock(&mut img, 4096 * 512, 1024);
    let s = stride_of(d, &img);
    assert_eq!(s.bytes, 1024, "{s:?}");

    // GPT: protective MBR, header at LBA 1, entries at LBA 2; one partition at sector 34.
    let mut img = Vec::new();
    mbr(&mut img, &[(0xEE, 1)]);
    img.resize(3 * 512, 0);
    img[512..520].copy_from_slice(b"EFI PART");
    img[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
    img[512 + 80..512 + 84].copy_from_slice(&1u32.to_le_bytes());
    img[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
    img.resize(2 * 512 + 128, 0);
    img[1024..1040].copy_from_slice(&[1; 16]);
    img[1024 + 32..1024 + 40].copy_from_slice(&34u64.to_le_bytes());
    ext_superblock(&mut img, 34 * 512, 4096);
    let s = stride_of(d, &img);
    assert_eq!(s.bytes, 1024, "34 sectors = 17 KiB: {s:?}");

    // XFS with 4 KiB blocks.
    let mut img = vec![0u8; 8192];
    img[..4].copy_from_slice(b"XFSB");
    img[4..8].copy_from_slice(&4096u32.to_be_bytes());
    assert_eq!(stride_of(d, &img).bytes, 4096);

    // Nothing known: every sector, and it says so.
    let s = stride_of(d, &vec![7u8; 8192]);
    assert_eq!(s.bytes, 512);
    assert!(s.reason.contains("no ext2/3/4 or XFS filesystem at byte 0"), "{s:?}");
    let s = stride_of(d, &[]);
    assert_eq!(s.bytes, 512);
}

#[test]
fn windows_at_sector_offsets_are_found_when_the_stride_allows() {
    let dir = tempfile::tempdir().unwrap();
    // Blocks of "filesystem" content placed 1 KiB off the 4 KiB grid, as files on an ext4 with
    // 1 KiB blocks are; a window at 3 sectors in, as a 512-byte stride finds.
    let mut img = vec![0u8; 1024];
    for s in 0..40 {
        let mut b = block(s);
        if s == 7 {
            // A file's last block: zeros after its end.
            b[2000..2048].fill(0);
        }
        img.extend_from_slice(&b);
    }
    img.extend_from_slice(&[0u8; 3072]);
    let at_1536 = Fingerprint::of(img[1536..1536 + 4096].try_into().unwrap());
    let p = dir.path().join("odd.raw");
    fs::write(&p, &img).unwrap();
    for (stride, found, odd) in [(4096, None, None), (2048, None, None), (1024, Some(2 + 8 * 7), None), (512, Some(2 + 8 * 7), Some(3))] {
        let idx = DiskIndex::build_with_threads(&p, Align::Bytes(stride), 2, &mut quiet()).unwrap();
        assert_eq!(idx.stride(), stride);
        assert_eq!(idx.lookup_sector(&Fingerprint::of(img[1024 + 7 * 4096..][..4096].try_into().unwrap())), found, "stride {stride}");
        assert_eq!(idx.lookup_sector(&at_1536), odd, "stride {stride}");
        // The last page of a file: 2 KiB of it, then zeros (the disk goes on with other data).
        let mut tail = block(7);
        tail[2000..].fill(0);
        // (at 1 KiB + 7 x 4 KiB: on the 1024 and 512 strides only)
        let want = (stride <= 1024).then_some(Window { sector: 2 + 8 * 7, zero_tail_sectors: 4 });
        assert_eq!(idx.lookup(&Fingerprint::of(&tail)), want, "stride {stride}");
        // Every indexed window reads back with its fingerprint at the sector the index says.
        let r = BlockReader::open(&p).unwrap();
        let mut buf = [0u8; BLOCK_SIZE];
        for (f, w) in idx.iter() {
            assert_eq!(w.sector % u64::from(stride / 512), 0);
            r.read_window(w, f, &mut buf).unwrap();
        }
        // Reloaded from its file, the same index.
        let file = dir.path().join(format!("{stride}.idx"));
        idx.save(&file).unwrap();
        let again = DiskIndex::load(&p, &file).unwrap();
        assert_eq!(again.identity(), idx.identity());
        assert_eq!(again.stride(), stride);
    }
    // Index hashes differ between strides even over the same windows' fingerprints.
    let a = DiskIndex::build_with_threads(&p, Align::Bytes(4096), 1, &mut quiet()).unwrap();
    let b = DiskIndex::build_with_threads(&p, Align::Bytes(2048), 1, &mut quiet()).unwrap();
    assert_ne!(a.identity().index_hash, b.identity().index_hash);
    assert!(matches!(DiskIndex::build_with_threads(&p, Align::Bytes(3000), 1, &mut quiet()), Err(IndexError::BadAlign { value: 3000 })));
    assert_eq!("1024".parse::<Align>(), Ok(Align::Bytes(1024)));
    assert_eq!("auto".parse::<Align>(), Ok(Align::Auto));
    assert!("4097".parse::<Align>().is_err());
}

#[test]
fn an_index_file_of_another_stride_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), &seeds(100));
    let cache = dir.path().join("cache");
    let (a, o, s) = DiskIndex::load_or_build_aligned(&img, &cache, Align::Bytes(4096), &mut quiet()).unwrap();
    assert!(o.built());
    assert_eq!((a.stride(), s.bytes, s.reason.as_str()), (4096, 4096, "configured"));
    let (b, o, _) = DiskIndex::load_or_build_aligned(&img, &cache, Align::Bytes(1024), &mut quiet()).unwrap();
    assert!(matches!(o, Origin::Built { previous: Some(IndexError::Stale { what: "stride", .. }), .. }), "{o:?}");
    assert_eq!(b.stride(), 1024);
    let (_, o, _) = DiskIndex::load_or_build_aligned(&img, &cache, Align::Bytes(1024), &mut quiet()).unwrap();
    assert!(!o.built(), "{o:?}");
}

fn qemu_img(args: &[&str]) {
    let out = std::process::Command::new("qemu-img").args(args).output().expect("qemu-img (qemu-utils) is installed");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A qcow2 image with a backing file is indexed by its guest-visible content (read through
/// qemu-nbd): the same index as the raw image it was made from, though half of its clusters are
/// in the backing file and the rest in the overlay; a window reads back verified.
#[test]
fn a_qcow2_chain_is_indexed_and_read_as_the_guest_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let raw = image(dir.path(), &seeds(600));
    // The backing file: the raw image with its first and third MiB overwritten.
    let older = dir.path().join("older.raw");
    fs::copy(&raw, &older).unwrap();
    let f = OpenOptions::new().write(true).open(&older).unwrap();
    for mib in [0u64, 2] {
        for b in 0..256.min(600 - mib * 256) {
            f.write_all_at(&block(50_000 + mib * 256 + b), (mib * 256 + b) * BLOCK_SIZE_U64).unwrap();
        }
    }
    drop(f);
    let base = dir.path().join("base, with a comma.qcow2");
    let top = dir.path().join("top, too.qcow2");
    let (older_s, base_s, top_s, raw_s) = (older.to_str().unwrap(), base.to_str().unwrap(), top.to_str().unwrap(), raw.to_str().unwrap());
    // An overlay of the raw image's content, rebased onto the older content: the rebase writes
    // into the overlay only the clusters where the two differ.
    let real = dir.path().join("real.qcow2");
    let real_s = real.to_str().unwrap();
    qemu_img(&["convert", "-q", "-f", "raw", "-O", "qcow2", older_s, base_s]);
    qemu_img(&["convert", "-q", "-f", "raw", "-O", "qcow2", raw_s, real_s]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", real_s, "-F", "qcow2", top_s]);
    qemu_img(&["rebase", "-q", "-f", "qcow2", "-b", base_s, "-F", "qcow2", top_s]);
    fs::remove_file(&real).unwrap();
    // The second MiB is only in the backing file (depth 1), the rest in the overlay (depth 0).
    let map = std::process::Command::new("qemu-img").args(["map", "--output=json", top_s]).output().unwrap();
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let depth_of = |off: u64| {
        map.as_array().unwrap().iter().find(|e| e["start"].as_u64().unwrap() <= off && off < e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap()).map(|e| e["depth"].as_u64().unwrap())
    };
    assert_eq!((depth_of(0), depth_of(1 << 20), depth_of(2 << 20)), (Some(0), Some(1), Some(0)), "{map}");

    let want = DiskIndex::build_with_threads(&raw, Align::Bytes(1024), 2, &mut quiet()).unwrap();
    let got = DiskIndex::build_with_threads(&top, Align::Bytes(1024), 2, &mut quiet()).unwrap();
    assert_eq!(got.image_size(), 600 * BLOCK_SIZE_U64, "the guest-visible size, not the file's");
    assert_eq!(got.identity().index_hash, want.identity().index_hash);
    assert_eq!(got.lookup_sector(&fp(7)), Some(7 * 8));
    // Auto: no filesystem in the guest-visible content of this image either.
    let (_, o, s) = DiskIndex::load_or_build_aligned(&top, &dir.path().join("cache"), Align::Auto, &mut quiet()).unwrap();
    assert!(o.built());
    assert_eq!(s.bytes, 512);
    let (again, o, _) = DiskIndex::load_or_build_aligned(&top, &dir.path().join("cache"), Align::Auto, &mut quiet()).unwrap();
    assert!(!o.built(), "{o:?}");
    assert_eq!(again.image_size(), 600 * BLOCK_SIZE_U64);

    let r = BlockReader::open(&top).unwrap();
    assert_eq!(r.size().unwrap(), 600 * BLOCK_SIZE_U64);
    let mut buf = [0u8; BLOCK_SIZE];
    // Block 100 is in the overlay, block 300 only in the backing file (the second MiB).
    for b in [100u64, 300, 599] {
        r.read_window(Window::whole(b * 8), Fingerprint::of(&block(b % 700)), &mut buf).unwrap();
    }
    // More readers at once than qemu-nbd serves (16): they wait for a free connection.
    std::thread::scope(|sc| {
        for t in 0..24u64 {
            let r = &r;
            sc.spawn(move || {
                let mut buf = [0u8; BLOCK_SIZE];
                for i in 0..20 {
                    let b = (t * 20 + i) % 600;
                    // seeds(): every tenth block from the fourth is zero.
                    let want = if b % 10 == 3 { [0u8; BLOCK_SIZE] } else { block(b % 700) };
                    r.read_window(Window::whole(b * 8), Fingerprint::of(&want), &mut buf).unwrap();
                }
            });
        }
    });
    let e = r.read_window(Window::whole(599 * 8 + 1), fp(1), &mut buf).unwrap_err();
    assert!(matches!(e, IndexError::BlockOutOfRange { .. }), "{e}");
}

/// Every other format QEMU reads and finds by its magic goes through qemu-nbd too: each
/// conversion of the same raw image gives the raw image's index; raw bytes stay raw.
#[test]
fn other_image_formats_are_indexed_by_their_guest_visible_content() {
    let dir = tempfile::tempdir().unwrap();
    let raw = image(dir.path(), &seeds(300));
    let want = DiskIndex::build_with_threads(&raw, Align::Bytes(4096), 2, &mut quiet()).unwrap();
    assert_eq!(crate::source::format_of(&fs::read(&raw).unwrap()[..0x44]), None, "raw");
    for (format, opts) in [("qcow", ""), ("qed", ""), ("vmdk", ""), ("vhdx", ""), ("vpc", "force_size=on"), ("vdi", "")] {
        let p = dir.path().join(format!("img.{format}"));
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", format];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([raw.to_str().unwrap(), p.to_str().unwrap()]);
        qemu_img(&args);
        let head = fs::read(&p).unwrap();
        assert_eq!(crate::source::format_of(&head[..0x44]), Some(format), "{format} found by its magic");
        let got = DiskIndex::build_with_threads(&p, Align::Bytes(4096), 2, &mut quiet()).unwrap();
        assert_eq!(got.identity().index_hash, want.identity().index_hash, "{format}");
        assert_eq!(got.lookup_sector(&fp(7)), Some(7 * 8), "{format}");
    }
}

#[test]
fn an_unreadable_qcow2_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.qcow2");
    let mut bytes = b"QFI\xfb".to_vec();
    bytes.resize(4096, 0xff);
    fs::write(&p, &bytes).unwrap();
    let e = DiskIndex::build(&p, &mut quiet()).unwrap_err();
    assert!(matches!(e, IndexError::Nbd { .. }), "{e}");
    assert!(e.to_string().contains("qemu-nbd"), "{e}");
}
