//! Tests of the soft-dirty tracker. They run in the test process itself, whose pages it tracks.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;

use super::*;

/// Reads our own pagemap entry of `va` with plain file operations (independent of the module).
fn raw_entry(va: u64) -> u64 {
    let f = File::open("/proc/self/pagemap").unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, va / 4096 * 8).unwrap();
    u64::from_le_bytes(b)
}

fn raw_clear_refs() {
    OpenOptions::new().write(true).open("/proc/self/clear_refs").unwrap().write_all(b"4").unwrap();
}

/// Whether this kernel sets bit 55 on a page written after clear_refs, observed directly.
fn kernel_sets_soft_dirty() -> bool {
    let mut m = memmap2::MmapMut::map_anon(4096 * 4).unwrap();
    m[4096] = 1;
    raw_clear_refs();
    *std::hint::black_box(&mut m[4096]) = 7;
    let e = raw_entry(m.as_ptr() as u64 + 4096);
    std::hint::black_box(&m[4096]);
    e & (1 << 55) != 0
}

#[test]
fn probe_agrees_with_an_independent_observation() {
    let observed = kernel_sets_soft_dirty();
    let probe = SoftDirty::probe();
    eprintln!("kernel sets soft-dirty: {observed}; probe: {probe:?}");
    match probe {
        Ok(()) => assert!(observed, "the probe accepted a kernel on which a written page has no soft-dirty bit"),
        Err(e) => {
            assert!(!observed, "the probe refused a kernel that sets the soft-dirty bit: {e}");
            assert!(matches!(e, SoftDirtyError::Unsupported), "{e:?}");
            assert!(e.to_string().contains("CONFIG_MEM_SOFT_DIRTY"), "{e}");
        }
    }
}

/// A tracker of the pages of an anonymous mapping of ours, as guest pages starting at `base`.
fn tracker_of(m: &memmap2::MmapMut, base: u64) -> SoftDirtyTracker {
    SoftDirtyTracker::new(std::process::id(), vec![(m.as_ptr() as u64, m.len() as u64, base)]).unwrap()
}

#[test]
fn pagemap_entries_are_read_at_the_right_offsets_in_chunks() {
    // 300 pages (less than a 2 MiB huge page, so untouched pages stay absent), read 7 entries
    // at a time: the present bit must be set exactly on the touched pages.
    let mut m = memmap2::MmapMut::map_anon(300 * 4096).unwrap();
    let touched = [0usize, 6, 7, 8, 150, 299];
    for &p in &touched {
        m[p * 4096 + 5] = 1;
    }
    let mut t = tracker_of(&m, 1000);
    t.chunk = 7;
    let mut present = Vec::new();
    let mut seen = 0;
    t.for_each_entry(|g, e| {
        seen += 1;
        if e & PM_PRESENT != 0 {
            present.push(g);
        }
    })
    .unwrap();
    std::hint::black_box(&m[0]);
    assert_eq!(seen, 300);
    assert_eq!(present, touched.iter().map(|&p| 1000 + p as u64).collect::<Vec<_>>());
}

#[test]
fn tracker_reports_exactly_the_written_pages_where_the_kernel_tracks_them() {
    let supported = SoftDirty::probe().is_ok();
    let mut m = memmap2::MmapMut::map_anon(64 * 4096).unwrap();
    m.fill(1);
    let mut t = tracker_of(&m, 10);
    assert_eq!(t.covered_pages(), 74);
    t.clear().unwrap();
    // Nothing written since the clear: nothing dirty, on any kernel.
    assert_eq!(t.dirty_pages().unwrap(), Vec::<u64>::new());
    for p in [3usize, 40, 63] {
        *std::hint::black_box(&mut m[p * 4096 + 9]) = 2;
    }
    let dirty = t.dirty_pages().unwrap();
    std::hint::black_box(&m[0]);
    if supported {
        assert_eq!(dirty, vec![13, 50, 73]);
        t.clear().unwrap();
        assert_eq!(t.dirty_pages().unwrap(), Vec::<u64>::new());
    } else {
        // Without CONFIG_MEM_SOFT_DIRTY the bit never appears: why the probe must refuse.
        assert_eq!(dirty, Vec::<u64>::new());
    }
}

#[test]
fn scan_starts_with_a_full_content_scan_and_checks_coverage() {
    use crate::{PageKey, VecSource};
    let m = memmap2::MmapMut::map_anon(8 * 4096).unwrap();
    let mut t = tracker_of(&m, 0);
    let src = VecSource::zeroed(8);
    src.set(5, [9u8; PAGE_SIZE]);
    let key = PageKey::from_bytes([3; 32]);
    let mut ledger = Ledger::zeroed(8, key.clone());
    let mut content = ContentTracker::new(1);
    let first = t.scan(&mut content, &src, &ledger).unwrap();
    assert_eq!(first.dirty, vec![5]);
    ledger.record_page(5, &[9u8; PAGE_SIZE]);
    // later scans read the bits (nothing written to our mapping since the clear)
    let second = t.scan(&mut content, &src, &ledger).unwrap();
    assert_eq!(second.dirty, Vec::<u64>::new());
    let e = t.scan(&mut content, &src, &Ledger::zeroed(9, key)).unwrap_err();
    assert!(matches!(e, SoftDirtyError::Coverage { covered: 8, ledger: 9 }), "{e}");
}

#[test]
fn bad_ranges_and_processes_are_errors() {
    let pid = std::process::id();
    for r in [(4097, 4096, 0), (4096, 100, 0), (4096, 0, 0), (u64::MAX - 4095, 8192, 0), (4096, 4096, u64::MAX)] {
        let e = SoftDirtyTracker::new(pid, vec![r]).unwrap_err();
        assert!(matches!(e, SoftDirtyError::BadRange { .. }), "{r:?}: {e}");
    }
    // pid 0 has no /proc entry
    let e = SoftDirtyTracker::new(0, vec![(4096, 4096, 0)]).unwrap_err();
    assert!(matches!(&e, SoftDirtyError::Proc { op: "open", path, .. } if path.ends_with("pagemap")), "{e}");
}

#[test]
fn maps_parsing_matches_device_inode_and_shared_mappings() {
    let text = "\
55d0c0000000-55d0c0001000 r--p 00000000 fd:01 1234 /usr/bin/qemu-system-x86_64
7f0000000000-7f0020000000 rw-s 00000000 00:01 4321 /memfd:mem0 (deleted)
7f0040000000-7f0040200000 rw-s 00100000 00:01 4321 /memfd:mem0 (deleted)
7f0060000000-7f0060001000 rw-p 00000000 00:01 4321 /memfd:mem0 (deleted)
7f0070000000-7f0070001000 rw-s 00000000 00:01 4322 /memfd:other (deleted)
7f0080000000-7f0080001000 rw-s 00000000 00:02 4321 /memfd:other-dev (deleted)
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
";
    // st_dev 1 is major 0, minor 1
    let r = parse_maps(text, Path::new("maps"), 1, 4321, 100).unwrap();
    assert_eq!(
        r,
        vec![
            RamRange { host_va: 0x7f00_0000_0000, len: 0x2000_0000, first_guest_page: 100 },
            RamRange { host_va: 0x7f00_4000_0000, len: 0x20_0000, first_guest_page: 100 + 0x100 },
        ]
    );
    assert_eq!(major_minor(0xfd01), (0xfd, 0x01));
    assert_eq!(major_minor((0x123 << 8) | (0x4_5600 << 12) | 0x78 | (0x1000 << 32)), (0x1123, 0x45678));
    let e = parse_maps("garbage line\n", Path::new("maps"), 1, 1, 0).unwrap_err();
    assert!(matches!(e, SoftDirtyError::Maps { line: 1, .. }), "{e}");
    let e = parse_maps("1000-zz rw-s 0 00:01 5 x\n", Path::new("maps"), 1, 5, 0).unwrap_err();
    assert!(matches!(e, SoftDirtyError::Maps { .. }), "{e}");
}

#[test]
fn guest_ram_ranges_reads_a_real_maps_file() {
    // our own executable is mapped privately: found by device and inode, but not shared
    let exe = File::open("/proc/self/exe").unwrap();
    let (dev, ino) = file_identity(&exe).unwrap();
    let text = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(!parse_maps(&text.replace(" r-xp ", " r-xs "), Path::new("maps"), dev, ino, 0).unwrap().is_empty());
    assert_eq!(guest_ram_ranges(std::process::id(), dev, ino, 0).unwrap(), Vec::new());
    assert!(matches!(guest_ram_ranges(0, dev, ino, 0), Err(SoftDirtyError::Proc { .. })));
}

/// The union of the guest pages the ranges cover, as sorted disjoint intervals.
fn covered(ranges: &[RamRange]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges.iter().map(|r| (r.first_guest_page, r.first_guest_page + r.len / 4096)).collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// A real QEMU (paused, no guest code) with a 64 MiB memfd and a 32 MiB file memdev: the ranges
/// found in its /proc/PID/maps cover exactly each memdev's pages, and a tracker reads them.
#[test]
fn guest_ram_ranges_of_a_real_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let ram_file = dir.path().join("b.ram");
    let file_obj = format!("memory-backend-file,id=b,size=32M,mem-path={},share=on", ram_file.display());
    let args = [
        "-m",
        "64",
        "-machine",
        "q35,memory-backend=mem0",
        "-object",
        "memory-backend-memfd,id=mem0,size=64M,share=on",
        "-object",
        &file_obj,
    ];
    let vm = livemig_lab::Vm::start_paused("softdirty", &args).expect("QEMU starts");
    let pid = vm.pid();

    // QEMU opens its QMP socket before it creates the memory backends: wait for the memfd.
    let mut memfd = None;
    let t0 = std::time::Instant::now();
    while memfd.is_none() && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
        for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
            let p = e.unwrap().path();
            let is_memfd = std::fs::read_link(&p).is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:"));
            if let (true, Ok(m)) = (is_memfd, std::fs::metadata(&p)) {
                if m.len() == 64 << 20 {
                    memfd = Some(file_identity(&File::open(&p).unwrap()).unwrap());
                }
            }
        }
    }
    let (dev, ino) = memfd.expect("QEMU holds a 64 MiB memfd");
    // and for the file backend to be created and mapped
    let t0 = std::time::Instant::now();
    let ranges = || {
        let mem0 = guest_ram_ranges(pid, dev, ino, 0).unwrap();
        let b = File::open(&ram_file)
            .ok()
            .map(|f| file_identity(&f).unwrap())
            .map_or_else(Vec::new, |(fdev, fino)| guest_ram_ranges(pid, fdev, fino, 16384).unwrap());
        (mem0, b)
    };
    let (mut mem0, mut b) = ranges();
    while (mem0.is_empty() || b.is_empty()) && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
        (mem0, b) = ranges();
    }
    assert_eq!(covered(&mem0), vec![(0, 16384)], "{mem0:?}");
    assert_eq!(covered(&b), vec![(16384, 16384 + 8192)], "{b:?}");

    let all: Vec<(u64, u64, u64)> = mem0.iter().chain(&b).map(|r| (r.host_va, r.len, r.first_guest_page)).collect();
    let mut t = SoftDirtyTracker::new(pid, all).unwrap();
    assert_eq!(t.covered_pages(), 16384 + 8192);
    t.clear().unwrap();
    let dirty = t.dirty_pages().unwrap();
    assert!(dirty.iter().all(|&p| p < t.covered_pages()));
    assert!(dirty.windows(2).all(|w| w[0] < w[1]));
}
