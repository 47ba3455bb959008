//! Files of the index crate read back from disk: a disk index file (`DiskIndex::load` of a real
//! 24-block image with the fuzz input as its index file) and a memory snapshot directory
//! (`SnapshotStore::open` + `get`, `read_page`, `list`, `latest` with meta.json,
//! fingerprints.bin and memory.raw made from the input).
//!
//! Input: `[mode][rest]`. Mode bit 0x80 clear: `rest` is the index file; bits 1, 2, 4, 8 fix
//! its entry count, image stamp and sample hash, index hash and trailer checksum (see
//! `livemig_fuzz_common`), to get past checks the fuzzer cannot forge. Bit 0x80 set: `rest` is a
//! snapshot directory as `SnapshotInput` describes. Contract: never panic; an index that loads
//! answers lookups with 4 KiB windows within the image, on its stride; a snapshot that opens reads its pages or errs.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use livemig_fuzz_common::{
    fix_index_file, index_fixture, scratch_dir, write_snapshot_dir, SnapshotInput, IMAGE_BLOCKS, MODE_SNAPSHOT,
    SNAPSHOT_ID, SNAPSHOT_VM,
};
use livemig_index::{DiskIndex, SnapshotStore, BLOCK_SIZE, SECTOR};

fn store_dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| scratch_dir("snapshots"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & MODE_SNAPSHOT != 0 {
        snapshot(mode, rest);
    } else {
        index(mode, rest);
    }
});

fn index(mode: u8, rest: &[u8]) {
    let fx = index_fixture();
    let mut file = rest.to_vec();
    fix_index_file(mode, &mut file, &fx.real);
    std::fs::write(&fx.file, &file).expect("write the index file");
    let Ok(index) = DiskIndex::load(&fx.image, &fx.file) else { return };
    assert!(index.len() as u64 <= index.windows());
    let id = index.identity();
    assert_eq!(id.size, IMAGE_BLOCKS * BLOCK_SIZE as u64);
    let _ = (index.zero_blocks(), index.image_blocks(), index.memory_bytes(), format!("{index:?}"));
    for (fp, w) in index.iter() {
        let sector = w.sector;
        assert!(sector * SECTOR + BLOCK_SIZE as u64 <= id.size, "sector {sector}: its 4 KiB run past the image");
        assert_eq!(sector % u64::from(index.stride() / 512), 0, "sector {sector} off the stride");
        assert!(w.zero_tail_sectors <= 7 && w.disk_bytes() >= index.stride() as usize, "{w:?}");
        assert_eq!(index.lookup(&fp), Some(w), "an indexed fingerprint does not look up");
    }
    let _ = index.lookup(&livemig_index::Fingerprint(u128::from_le_bytes(*b"not in the index")));
}

fn snapshot(mode: u8, rest: &[u8]) {
    let input = SnapshotInput::parse(mode, rest);
    let dir = store_dir();
    write_snapshot_dir(dir, &input);
    let Ok(store) = SnapshotStore::open(dir, 1 << 30) else { return };
    let _ = store.list();
    let _ = store.latest(SNAPSHOT_VM);
    let Ok(snap) = store.get(SNAPSHOT_VM, SNAPSHOT_ID) else { return };
    assert_eq!(snap.fingerprints().len() as u64, snap.pages());
    let mut buf = [0u8; BLOCK_SIZE];
    for page in 0..=snap.pages().min(16) {
        if snap.read_page(page, &mut buf).is_ok() {
            assert!(page < snap.pages());
            assert_eq!(livemig_index::Fingerprint::of(&buf).0, snap.fingerprints()[page as usize]);
        }
    }
    let table = snap.lookup_table();
    assert!(table.values().all(|&p| p < snap.pages()));
    let _ = (snap.info().age(), snap.id());
}
