//! Tests of the snapshot store.
#![allow(clippy::cast_possible_truncation)] // page numbers of small test snapshots

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};

use proptest::prelude::*;

use super::*;

/// A non-zero page whose content depends on `seed`.
fn page(seed: u64) -> [u8; BLOCK_SIZE] {
    let mut b = [0u8; BLOCK_SIZE];
    for (j, c) in b.chunks_exact_mut(8).enumerate() {
        let v = (seed + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (j as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        c.copy_from_slice(&v.to_le_bytes());
    }
    b
}

const ZERO: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

fn store(dir: &tempfile::TempDir, max: u64) -> SnapshotStore {
    SnapshotStore::open(dir.path().join("snapshots"), max).unwrap()
}

/// Number of entries of the store directory (temporary ones included).
fn entries(s: &SnapshotStore) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(s.dir()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

fn read_all(snap: &Snapshot) -> Vec<[u8; BLOCK_SIZE]> {
    (0..snap.pages())
        .map(|q| {
            let mut b = [0u8; BLOCK_SIZE];
            snap.read_page(q, &mut b).unwrap();
            b
        })
        .collect()
}

#[test]
fn round_trip() {
    let d = tempfile::tempdir().unwrap();
    let s = store(&d, u64::MAX);
    let pages: Vec<[u8; BLOCK_SIZE]> = (0..20).map(|i| if i % 3 == 0 { ZERO } else { page(i) }).collect();
    let mut w = s.writer("vm-a", 20).unwrap();
    // any order
    for i in (0..20u64).rev() {
        w.write_page(i, &pages[i as usize]).unwrap();
    }
    let info = w.finish(0xabc).unwrap();
    assert_eq!((info.vm.as_str(), info.id, info.pages), ("vm-a", 0xabc, 20));
    assert!(info.age() < Duration::from_secs(60));

    let snap = s.get("vm-a", 0xabc).unwrap();
    assert_eq!(read_all(&snap), pages);
    let fps: Vec<u128> = pages.iter().map(|p| Fingerprint::of(p).0).collect();
    assert_eq!(snap.fingerprints(), &fps[..]);
    assert_eq!(snap.info(), &info);
    assert_eq!(s.latest("vm-a").unwrap().unwrap().id(), 0xabc);
    assert!(s.latest("vm-b").unwrap().is_none());
    assert_eq!(s.list().unwrap(), vec![info.clone()]);
    // the files are where the layout says
    let dir = d.path().join("snapshots/vm-a/00000000000000000000000000000abc");
    assert_eq!(info.path, dir);
    assert_eq!(fs::metadata(dir.join("memory.raw")).unwrap().len(), 20 * 4096);
    assert_eq!(fs::metadata(dir.join("fingerprints.bin")).unwrap().len(), 20 * 16);
    let meta: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["vm"], "vm-a");
    assert_eq!(meta["id"], "00000000000000000000000000000abc");
    assert_eq!(meta["pages"], 20);
    assert_eq!(meta["format"], SNAPSHOT_FORMAT);
    // no temporary directory left
    assert_eq!(entries(&s), vec!["vm-a".to_owned()]);

    let mut b = [0u8; BLOCK_SIZE];
    assert!(matches!(snap.read_page(20, &mut b), Err(SnapshotError::PageOutOfRange { page: 20, pages: 20 })));

    s.remove("vm-a", 0xabc).unwrap();
    assert!(s.list().unwrap().is_empty());
    assert!(matches!(s.get("vm-a", 0xabc), Err(SnapshotError::NotFound { .. })));
    assert!(matches!(s.remove("vm-a", 0xabc), Err(SnapshotError::NotFound { .. })));
    // the empty VM directory went too
    assert!(entries(&s).is_empty());
}

#[test]
fn save_from_and_replace_same_id() {
    let d = tempfile::tempdir().unwrap();
    let s = store(&d, u64::MAX);
    save_from(&s, "vm", 7, 5, |q, b| {
        *b = page(q);
        Ok(())
    })
    .unwrap();
    // the same VM and id again: replaced, not duplicated
    save_from(&s, "vm", 7, 3, |q, b| {
        *b = page(q + 100);
        Ok(())
    })
    .unwrap();
    let list = s.list().unwrap();
    assert_eq!(list.len(), 1);
    let snap = s.get("vm", 7).unwrap();
    assert_eq!(read_all(&snap), vec![page(100), page(101), page(102)]);
    // a failing source leaves nothing
    let e = save_from(&s, "vm", 8, 5, |q, b| {
        if q == 3 {
            return Err(io::Error::other("boom"));
        }
        *b = page(q);
        Ok(())
    })
    .unwrap_err();
    assert!(matches!(e, SnapshotError::Source { page: 3, .. }), "{e}");
    assert_eq!(entries(&s), vec!["vm".to_owned()]);
    assert_eq!(s.remove_vm("vm").unwrap(), 1);
    assert!(entries(&s).is_empty());
}

#[test]
fn memory_file_is_sparse() {
    let d = tempfile::tempdir().unwrap();
    let s = store(&d, u64::MAX);
    let pages = 4096u64; // 16 MiB of address space
    let mut w = s.writer("sparse", pages).unwrap();
    for q in [0u64, 1000, 4095] {
        w.write_page(q, &page(q)).unwrap();
    }
    for q in 2000..2100 {
        w.write_page(q, &ZERO).unwrap();
    }
    let info = w.finish(1).unwrap();
    let m = fs::metadata(info.path.join("memory.raw")).unwrap();
    assert_eq!(m.len(), pages * 4096);
    let allocated = m.blocks() * 512;
    // three data pages (file systems may allocate a little more around them)
    assert!(allocated <= 64 * 4096, "memory.raw allocates {allocated} bytes for 3 pages");
    assert!(info.bytes < 1 << 20, "{}", info.bytes);
}

#[test]
fn rewrite_and_zero_semantics() {
    let d = tempfile::tempdir().unwrap();
    let s = store(&d, u64::MAX);
    let mut w = s.writer("vm", 4).unwrap();
    w.write_page(0, &page(1)).unwrap();
    w.write_page(0, &page(2)).unwrap(); // last write wins
    w.write_page(1, &page(3)).unwrap();
    w.write_page(1, &ZERO).unwrap(); // non-zero then zero: zero
    w.write_page(2, &ZERO).unwrap();
    w.write_page(2, &page(4)).unwrap(); // zero then non-zero
    assert!(matches!(w.write_page(4, &page(5)), Err(SnapshotError::PageOutOfRange { page: 4, pages: 4 })));
    let info = w.finish(9).unwrap();
    let snap = s.get("vm", 9).unwrap();
    assert_eq!(read_all(&snap), vec![page(2), ZERO, page(4), ZERO]);
    let zero_fp = Fingerprint::of(&ZERO).0;
    assert_eq!(snap.fingerprints()[1], zero_fp);
    assert_eq!(snap.fingerprints()[3], zero_fp);
    // the punched page takes no space: two data pages
    let allocated = fs::metadata(info.path.join("memory.raw")).unwrap().blocks() * 512;
    assert!(allocated <= 3 * 4096, "{allocated}");
}

#[test]
fn lookup_table_excludes_zero_pages_and_maps_to_first_page() {
    let d = tempfile::tempdir().unwrap();
    let s = store(&d, u64::MAX);
    let content = [page(1), ZERO, page(2), page(1), ZERO, page(3), page(2)];
    save_from(&s, "vm", 1, content.len() as u64, |q, b| {
        *b = content[q as usize];
        Ok(())
    })
    .unwrap();
    let t = s.get("vm", 1).unwrap().lookup_table();
    assert_eq!(t.len(), 3);
    assert_eq!(t[&Fingerprint::of(&page(1)).0], 0);
    assert_eq!(t[&Fingerprint::of(&page(2)).0], 2);
    assert_eq!(t[&Fingerprint::of(&page(3)).0], 5);
    assert!(!t.contains_key(&Fingerprint::of(&ZERO).0));
}

#[test]
fn eviction_removes_oldest_first_within_budget() {
    let d = tempfile::tempdir().unwrap();
    // measure one snapshot of 8 data pages, then allow about two and a half of them
    let probe = store(&d, u64::MAX);
    let one = save_from(&probe, "probe", 1, 8, |q, b| {
        *b = page(q);
        Ok(())
    })
    .unwrap()
    .bytes;
    probe.remove("probe", 1).unwrap();
    let s = store(&d, one * 5 / 2);
    let mut made = Vec::new();
    for (i, vm) in ["a", "b", "a", "c", "b"].iter().enumerate() {
        let id = i as u128 + 1;
        save_from(&s, vm, id, 8, |q, b| {
            *b = page(q + 10 * i as u64);
            Ok(())
        })
        .unwrap();
        made.push((vm.to_string(), id));
        let list = s.list().unwrap();
        let total: u64 = list.iter().map(|i| i.bytes).sum();
        assert!(total <= s.max_bytes(), "{total} > {}", s.max_bytes());
        // the newest ones survive, across VMs, oldest first out
        let have: Vec<(String, u128)> = list.iter().map(|i| (i.vm.clone(), i.id)).collect();
        let want = made[made.len().saturating_sub(2)..].to_vec();
        assert_eq!(have, want);
    }
    assert_eq!(s.latest("a").unwrap().map(|x| x.id()), None);
    assert_eq!(s.latest("b").unwrap().map(|x| x.id()), Some(5));
    // list is oldest first
    let list = s.list().unwrap();
    assert!(list.windows(2).all(|w| w[0].created_unix_nanos <= w[1].created_unix_nanos));
}

#[test]
fn a_snapshot_over_the_budget_is_refused_and_removed() {
    let d = tempfile::tempdir().unwrap();
    let s = store(&d, u64::MAX);
    let small = save_from(&s, "small", 1, 1, |_, b| {
        *b = ZERO;
        Ok(())
    })
    .unwrap();
    // room for two of these: 16 data pages do not fit
    let s = store(&d, small.bytes * 2);
    let e = save_from(&s, "big", 2, 16, |q, b| {
        *b = page(q);
        Ok(())
    })
    .unwrap_err();
    assert!(matches!(e, SnapshotError::OverBudget { .. }), "{e}");
    assert!(e.to_string().contains("more than the snapshot store's limit"), "{e}");
    // the other snapshot was not evicted for it
    let list = s.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].vm, "small");
    assert!(matches!(s.get("big", 2), Err(SnapshotError::NotFound { .. })));
}

#[test]
fn abandoned_writer_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let s = store(&d, u64::MAX);
    {
        let mut w = s.writer("vm", 100).unwrap();
        w.write_page(5, &page(5)).unwrap();
        assert_eq!(entries(&s).len(), 1, "the temporary directory exists while writing");
        assert!(s.list().unwrap().is_empty(), "a snapshot being written is not listed");
    }
    assert!(entries(&s).is_empty());
}

/// Snapshots are copies of guest memory: the store and everything in it is the user's alone.
#[test]
fn snapshots_are_written_0700_and_0600() {
    let d = tempfile::tempdir().unwrap();
    let s = store(&d, u64::MAX);
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(s.dir()), 0o700);
    let mut w = s.writer("vm-a", 4).unwrap();
    w.write_page(1, &page(1)).unwrap();
    let info = w.finish(7).unwrap();
    assert_eq!(mode(&info.path), 0o700, "the snapshot directory");
    assert_eq!(mode(info.path.parent().unwrap()), 0o700, "the VM directory");
    for f in [MEMORY_FILE, FINGERPRINTS_FILE, META_FILE] {
        assert_eq!(mode(&info.path.join(f)), 0o600, "{f}");
    }
    // A snapshot written over an existing one (same VM and id) too.
    let info = save_from(&s, "vm-a", 7, 2, |_, b| {
        b.fill(3);
        Ok(())
    })
    .unwrap();
    for f in [MEMORY_FILE, FINGERPRINTS_FILE, META_FILE] {
        assert_eq!(mode(&info.path.join(f)), 0o600, "{f}");
    }
}

#[test]
fn a_store_others_can_enter_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("snapshots");
    fs::create_dir(&dir).unwrap();
    for m in [0o755, 0o711, 0o770, 0o1777] {
        fs::set_permissions(&dir, fs::Permissions::from_mode(m)).unwrap();
        let e = SnapshotStore::open(&dir, 1 << 30).unwrap_err();
        let SnapshotError::Insecure(i) = &e else { panic!("{e:?}") };
        assert_eq!((i.mode, i.path.as_path()), (m, dir.as_path()));
        let text = e.to_string();
        let want = format!("the snapshot directory {} has mode {m:04o}: group or others can read, write or enter it", dir.display());
        assert!(text.starts_with(&want), "{text}");
        assert!(text.contains("guest memory") && text.ends_with(&format!("run `chmod 700 {}`", dir.display())), "{text}");
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    SnapshotStore::open(&dir, 1 << 30).expect("accepted after chmod 700");
}

#[test]
fn stale_temporary_directories_of_dead_processes_are_removed_on_open() {
    let d = tempfile::tempdir().unwrap();
    let s = store(&d, u64::MAX);
    // pid 0 is never a running process's; our own pid's directory stays
    fs::create_dir(s.dir().join(".tmp-0-1-2")).unwrap();
    fs::create_dir(s.dir().join(format!(".tmp-{}-99-1", std::process::id()))).unwrap();
    let s = store(&d, u64::MAX);
    assert_eq!(entries(&s), vec![format!(".tmp-{}-99-1", std::process::id())]);
}

#[test]
fn unusable_directories_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("file");
    fs::write(&file, b"x").unwrap();
    let e = SnapshotStore::open(file.join("snapshots"), 1 << 30).unwrap_err();
    assert!(matches!(e, SnapshotError::Dir { .. }), "{e}");
    assert!(e.to_string().contains("cannot use the snapshot directory"), "{e}");

    // the store directory vanishes after opening: writing is an error naming the path
    let s = store(&d, u64::MAX);
    fs::remove_dir_all(s.dir()).unwrap();
    let e = s.writer("vm", 1).unwrap_err();
    assert!(matches!(e, SnapshotError::Write { .. }), "{e}");
    assert!(std::error::Error::source(&e).is_some());
}

#[test]
fn vm_ids_never_escape_the_store() {
    assert_eq!(vm_dir_name("debian-12_a.b").unwrap(), "debian-12_a.b");
    assert_eq!(vm_dir_name("..").unwrap(), "%2E.");
    assert_eq!(vm_dir_name(".").unwrap(), "%2E");
    assert_eq!(vm_dir_name("a/../../b").unwrap(), "a%2F..%2F..%2Fb");
    assert_eq!(vm_dir_name(".tmp-1").unwrap(), "%2Etmp-1");
    assert!(matches!(vm_dir_name(""), Err(SnapshotError::EmptyVmId)));
    let long = "x".repeat(1000);
    let n = vm_dir_name(&long).unwrap();
    assert!(n.len() <= 128 && n.contains('~'), "{n}");
    assert_ne!(n, vm_dir_name(&"x".repeat(999)).unwrap());

    let d = tempfile::tempdir().unwrap();
    let s = store(&d, u64::MAX);
    for vm in ["../evil", "/etc/passwd", "ünïcode vm", ".", "..", &long] {
        save_from(&s, vm, 3, 1, |_, b| {
            *b = page(1);
            Ok(())
        })
        .unwrap();
        assert_eq!(s.latest(vm).unwrap().unwrap().info().vm, vm);
    }
    assert_eq!(s.list().unwrap().len(), 6);
    // nothing was created outside the store
    assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
}

/// Writes one snapshot and returns its directory.
fn one_snapshot(s: &SnapshotStore) -> PathBuf {
    save_from(s, "vm", 1, 4, |q, b| {
        *b = page(q);
        Ok(())
    })
    .unwrap()
    .path
}

fn invalid_file(e: SnapshotError) -> String {
    match e {
        SnapshotError::Invalid { path, .. } => path.file_name().unwrap().to_string_lossy().into_owned(),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn truncated_files_are_errors_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let s = store(&d, u64::MAX);
    let p = one_snapshot(&s);
    fs::OpenOptions::new().write(true).open(p.join("memory.raw")).unwrap().set_len(3 * 4096 + 1).unwrap();
    assert_eq!(invalid_file(s.get("vm", 1).unwrap_err()), "memory.raw");
    assert_eq!(invalid_file(s.latest("vm").unwrap_err()), "memory.raw");

    let p = one_snapshot(&s);
    fs::OpenOptions::new().write(true).open(p.join("fingerprints.bin")).unwrap().set_len(63).unwrap();
    assert_eq!(invalid_file(s.get("vm", 1).unwrap_err()), "fingerprints.bin");

    let p = one_snapshot(&s);
    fs::remove_file(p.join("fingerprints.bin")).unwrap();
    let e = s.get("vm", 1).unwrap_err();
    assert!(matches!(&e, SnapshotError::Read { path, .. } if path.ends_with("fingerprints.bin")), "{e:?}");
}

#[test]
fn corrupt_files_are_errors() {
    let d = tempfile::tempdir().unwrap();
    let s = store(&d, u64::MAX);

    // a flipped byte in the fingerprints: checksum
    let p = one_snapshot(&s);
    let f = fs::OpenOptions::new().write(true).open(p.join("fingerprints.bin")).unwrap();
    f.write_all_at(&[0xff], 17).unwrap();
    assert_eq!(invalid_file(s.get("vm", 1).unwrap_err()), "fingerprints.bin");

    // a flipped byte in memory: that page fails its check, the others read
    let p = one_snapshot(&s);
    let f = fs::OpenOptions::new().write(true).open(p.join("memory.raw")).unwrap();
    f.write_all_at(&[0xff, 0xfe], 2 * 4096 + 100).unwrap();
    let snap = s.get("vm", 1).unwrap();
    let mut b = [0u8; BLOCK_SIZE];
    snap.read_page(1, &mut b).unwrap();
    assert!(matches!(snap.read_page(2, &mut b), Err(SnapshotError::PageMismatch { page: 2, .. })));

    // garbage, another format, or another snapshot's meta
    for (text, listed) in [
        (b"{ not json".to_vec(), false),
        (fs::read(p.join("meta.json")).unwrap().iter().map(|&c| if c == b'1' { b'2' } else { c }).collect(), false),
    ] {
        let p = one_snapshot(&s);
        fs::write(p.join("meta.json"), text).unwrap();
        assert_eq!(invalid_file(s.get("vm", 1).unwrap_err()), "meta.json");
        assert_eq!(!s.list().unwrap().is_empty(), listed, "invalid snapshots are not listed");
    }
    let p = one_snapshot(&s);
    let meta = String::from_utf8(fs::read(p.join("meta.json")).unwrap()).unwrap();
    fs::write(p.join("meta.json"), meta.replace("\"format\": 1", "\"format\": 99")).unwrap();
    let e = s.get("vm", 1).unwrap_err();
    assert!(e.to_string().contains("format 99"), "{e}");
    // an empty meta.json
    fs::write(p.join("meta.json"), b"").unwrap();
    assert_eq!(invalid_file(s.get("vm", 1).unwrap_err()), "meta.json");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// Random writes (rewrites, zeros, any order) give a snapshot equal to an in-memory model,
    /// with the model's fingerprints and lookup table.
    #[test]
    fn random_writes_match_a_model(
        pages in 1u64..64,
        writes in proptest::collection::vec((any::<u16>(), proptest::option::of(0u64..6)), 0..120),
    ) {
        let d = tempfile::tempdir().unwrap();
        let s = store(&d, u64::MAX);
        let mut model = vec![ZERO; pages as usize];
        let mut w = s.writer("vm", pages).unwrap();
        for (q, v) in writes {
            let q = u64::from(q) % pages;
            let data = v.map_or(ZERO, page);
            w.write_page(q, &data).unwrap();
            model[q as usize] = data;
        }
        w.finish(42).unwrap();
        let snap = s.get("vm", 42).unwrap();
        prop_assert_eq!(read_all(&snap), model.clone());
        let fps: Vec<u128> = model.iter().map(|p| Fingerprint::of(p).0).collect();
        prop_assert_eq!(snap.fingerprints(), &fps[..]);
        let mut first: BTreeMap<u128, u64> = BTreeMap::new();
        for (q, p) in model.iter().enumerate() {
            if *p != ZERO {
                first.entry(Fingerprint::of(p).0).or_insert(q as u64);
            }
        }
        let table: BTreeMap<u128, u64> = snap.lookup_table().into_iter().collect();
        prop_assert_eq!(table, first);
        prop_assert_eq!(entries(&s), vec!["vm".to_owned()]);
    }
}
