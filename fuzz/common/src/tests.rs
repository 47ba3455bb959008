//! The fixtures and the committed seeds reach what they are meant to reach: a fuzz target whose
//! seeds stop at a checksum fuzzes little.

use std::io::Cursor;
use std::path::PathBuf;

use super::*;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../corpus").join(target);
    let mut v: Vec<_> = fs::read_dir(&dir)
        .expect("seed directory")
        .map(|e| {
            let e = e.expect("entry");
            (e.file_name().to_string_lossy().into_owned(), fs::read(e.path()).expect("seed"))
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no seeds in {}", dir.display());
    v
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    seeds(target).into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("seed {target}/{name}")).1
}

#[test]
fn wire_seeds_are_valid_streams() {
    for (name, s) in seeds("wire_frame") {
        let mut r = Cursor::new(&s[1..]);
        if s[0] & WIRE_MAGIC != 0 {
            livemig_wire::read_magic(&mut r).expect("magic");
        }
        let mut frames = 0;
        loop {
            match livemig_wire::read_frame(&mut r) {
                Ok(_) => frames += 1,
                Err(livemig_wire::WireError::Closed) => break,
                Err(e) => panic!("{name}: {e}"),
            }
        }
        assert!(frames >= 5, "{name}: {frames} frames");
    }
    for (name, s) in seeds("wire_message") {
        livemig_wire::from_json::<livemig_wire::Message>(&s).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn frame_checksums_are_fixed() {
    let mut s = Vec::new();
    livemig_wire::write_frame(&mut s, livemig_wire::FrameKind::Pages, b"abc").expect("frame");
    livemig_wire::write_frame(&mut s, livemig_wire::FrameKind::Control, b"{}").expect("frame");
    let good = s.clone();
    s[10] ^= 1;
    s[16 + 3 + 12] ^= 0xff;
    fix_frame_checksums(&mut s);
    assert_eq!(s, good);
}

#[test]
fn compact_seeds_decode_with_every_class_and_no_miss() {
    let mut classes = std::collections::HashSet::new();
    for (name, s) in seeds("compact_decode") {
        let mut batch = s[1..].to_vec();
        if s[0] & COMPACT_FIX_FINGERPRINTS != 0 {
            fix_fingerprints(&mut batch);
        }
        assert_eq!(batch, s[1..], "{name}: the encoder's fingerprints are those the fix-up computes");
        let mut dest = FakeDest::default();
        let sum = livemig_compact::decode_batch(&batch, RAM_PAGES, page_key(), &mut dest).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(sum.misses.is_empty(), "{name}: {:?}", sum.misses);
        classes.extend(dest.writes.iter().map(|w| w.1));
    }
    for c in PageClass::ALL {
        assert!(classes.contains(&c), "no seed has a {c:?} page");
    }
}

#[test]
fn fixed_fingerprints_resolve() {
    // a disk reference and a snapshot reference with wrong fingerprints, and a delta
    let mut b = Vec::new();
    let mut rec = |page: u64, class: PageClass, data: &[u8]| {
        b.extend_from_slice(&page.to_le_bytes());
        b.push(class as u8);
        b.extend_from_slice(&u32::try_from(data.len()).expect("len").to_le_bytes());
        b.extend_from_slice(data);
    };
    let mut disk = vec![0u8, 0];
    disk.extend_from_slice(&7u64.to_le_bytes());
    disk.extend_from_slice(&[0xee; 16]);
    rec(1, PageClass::DiskRef, &disk);
    let mut snap = 5u64.to_le_bytes().to_vec();
    snap.extend_from_slice(&[0xee; 16]);
    rec(2, PageClass::SnapshotRef, &snap);
    let mut delta = vec![0xee; 16];
    delta.extend_from_slice(&[3, 0, 1, 0]);
    delta.extend_from_slice(b"8 bytes!");
    rec(40, PageClass::Delta, &delta);
    let mut dup = 40u64.to_le_bytes().to_vec();
    dup.extend_from_slice(&[0xee; 16]);
    rec(3, PageClass::Dup, &dup);
    let mut dest = FakeDest::default();
    let sum = livemig_compact::decode_batch(&b, RAM_PAGES, page_key(), &mut dest).expect("decode");
    assert_eq!(sum.misses.len(), 4);
    fix_fingerprints(&mut b);
    let mut dest = FakeDest::default();
    let sum = livemig_compact::decode_batch(&b, RAM_PAGES, page_key(), &mut dest).expect("decode");
    assert!(sum.misses.is_empty(), "{:?}", sum.misses);
    assert_eq!(dest.ram[3], dest.ram[40]);
    assert_eq!(&dest.ram[40][24..32], b"8 bytes!");
}

#[test]
fn index_seeds_load_and_fix_ups_reach_the_entry_checks() {
    let fx = index_fixture();
    let s = seed("index_file", "index-fixed");
    let mut file = s[1..].to_vec();
    fix_index_file(s[0], &mut file, &fx.real);
    fs::write(&fx.file, &file).expect("write");
    let index = livemig_index::DiskIndex::load(&fx.image, &fx.file).expect("the fixed seed loads");
    assert!(index.len() > 5);

    // an entry out of order, with every fix-up: rejected for that reason, not a checksum
    let mut bad = fx.real.clone();
    bad[INDEX_HEADER] ^= 0xff;
    bad[INDEX_HEADER + 15] ^= 0xff;
    fix_index_file(0x0f, &mut bad, &fx.real);
    fs::write(&fx.file, &bad).expect("write");
    let e = livemig_index::DiskIndex::load(&fx.image, &fx.file).expect_err("out of order");
    assert!(e.to_string().contains("order") || format!("{e:?}").contains("order"), "{e:?}");
}

#[test]
fn snapshot_seeds_open() {
    let store_dir = scratch_dir("test-snapshots");
    let store = livemig_index::SnapshotStore::open(&store_dir, 1 << 30).expect("store");
    let mut buf = [0u8; PAGE_SIZE];

    let s = seed("index_file", "snapshot");
    write_snapshot_dir(&store_dir, &SnapshotInput::parse(s[0], &s[1..]));
    let snap = store.get(SNAPSHOT_VM, SNAPSHOT_ID).expect("the snapshot seed opens");
    assert_eq!(snap.pages(), 3);
    for p in 0..3 {
        snap.read_page(p, &mut buf).expect("page reads");
    }

    let s = seed("index_file", "snapshot-damaged");
    write_snapshot_dir(&store_dir, &SnapshotInput::parse(s[0], &s[1..]));
    let snap = store.get(SNAPSHOT_VM, SNAPSHOT_ID).expect("the damaged seed opens");
    snap.read_page(0, &mut buf).expect("page 0 reads");
    snap.read_page(2, &mut buf).expect_err("page 2 is damaged");

    let s = seed("index_file", "snapshot-fps");
    write_snapshot_dir(&store_dir, &SnapshotInput::parse(s[0], &s[1..]));
    let snap = store.get(SNAPSHOT_VM, SNAPSHOT_ID).expect("the fingerprints seed opens");
    snap.read_page(0, &mut buf).expect_err("memory is zero, the fingerprint is not");
    let _ = fs::remove_dir_all(&store_dir);
}

#[test]
fn qemu_stream_seeds_parse_as_meant() {
    for (name, s) in seeds("qemu_stream") {
        let (&mode, stream) = s.split_first().expect("mode byte");
        let mut p = livemig_stream::Parser::new();
        let mut events = Vec::new();
        for chunk in stream.chunks(stream_chunk(mode, stream.len())) {
            p.feed(chunk, &mut |e| events.push(e));
        }
        p.finish(&mut |e| events.push(e)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(livemig_stream::rebuild(&events), stream, "{name}");
        let fell_back = events.iter().any(|e| matches!(e, livemig_stream::Event::Fallback { .. }));
        assert_eq!(fell_back, name.starts_with("xbzrle"), "{name}: {:?}", p.fallback_reason());
        if !fell_back {
            assert!(events.contains(&livemig_stream::Event::RamDone), "{name}");
            assert!(p.stats().pages >= 2 && p.stats().zeros >= 6, "{name}: {:?}", p.stats());
        }
    }
}

#[test]
fn stream_chunk_seeds_parse_as_meant() {
    use livemig_stream::chunk::{parse, Item, Payload};
    let all = seeds("stream_chunk");
    assert_eq!(all.len(), 3);
    for (name, s) in all {
        match (name.as_str(), parse(&s).unwrap_or_else(|e| panic!("{name}: {e}"))) {
            ("chunk", Payload::Chunk { seq: 3, items }) => {
                assert_eq!(items.len(), 4);
                assert!(matches!(items[1], Item::Page { header, .. } if header.len() == 15));
            }
            ("empty", Payload::Chunk { seq: 0, items }) => assert!(items.is_empty()),
            ("resend", Payload::Resend { seq: 9, item: 2, data }) => assert_eq!(data, &crate::ram_page(5)),
            (n, p) => panic!("{n}: {p:?}"),
        }
    }
}
