//! Unit tests on temporary files.

use super::*;
use std::io::{Read, Seek, SeekFrom, Write};

fn page(fill: u8) -> [u8; PAGE_SIZE] {
    let mut p = [fill; PAGE_SIZE];
    p[0] = fill.wrapping_add(1);
    p[PAGE_SIZE - 1] = fill.wrapping_add(2);
    p
}

fn temp(size: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(size).unwrap();
    f
}

#[test]
fn page_buf_is_aligned() {
    assert_eq!(std::mem::align_of::<PageBuf>(), 64);
    assert_eq!(std::mem::size_of::<PageBuf>(), PAGE_SIZE);
    assert!(PageBuf::zeroed().0.iter().all(|&b| b == 0));
}

#[test]
fn types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Region>();
    check::<GuestMemory>();
}

#[test]
fn open_file_round_trip() {
    let f = temp(16 * 4096);
    let mem = GuestMemory::open_file("ram", f.path(), 16 * 4096).unwrap();
    assert_eq!(mem.total_pages(), 16);
    assert_eq!(mem.layout(), vec![("ram".to_owned(), 16 * 4096)]);
    let r = &mem.regions[0];
    assert_eq!(r.id(), "ram");
    assert_eq!(r.size(), 16 * 4096);
    assert_eq!(r.backend(), &Backend::File(f.path().to_owned()));

    mem.write_page(3, &page(0xab)).unwrap();
    let mut buf = PageBuf::zeroed();
    mem.read_page(3, &mut buf).unwrap();
    assert_eq!(buf.0, page(0xab));
    mem.read_page(2, &mut buf).unwrap();
    assert_eq!(buf, PageBuf::zeroed());

    // Visible in the file itself (MAP_SHARED).
    let mut file = std::fs::File::open(f.path()).unwrap();
    file.seek(SeekFrom::Start(3 * 4096)).unwrap();
    let mut on_disk = vec![0u8; PAGE_SIZE];
    file.read_exact(&mut on_disk).unwrap();
    assert_eq!(on_disk, page(0xab));

    // And a write to the file is visible through the mapping.
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .open(f.path())
        .unwrap();
    w.seek(SeekFrom::Start(15 * 4096)).unwrap();
    w.write_all(&page(7)).unwrap();
    mem.read_page(15, &mut buf).unwrap();
    assert_eq!(buf.0, page(7));

    mem.zero_page(3).unwrap();
    mem.read_page(3, &mut buf).unwrap();
    assert_eq!(buf, PageBuf::zeroed());
}

#[test]
fn out_of_range_is_an_error() {
    let f = temp(4 * 4096);
    let mem = GuestMemory::open_file("ram", f.path(), 4 * 4096).unwrap();
    let mut buf = PageBuf::zeroed();
    for idx in [4, 5, u64::MAX / 4096, u64::MAX] {
        let e = mem.read_page(idx, &mut buf).unwrap_err();
        assert!(
            matches!(e, MemoryError::OutOfRange { index, pages: 4, .. } if index == idx),
            "{e}"
        );
        assert!(mem.write_page(idx, &page(1)).is_err());
        assert!(mem.zero_page(idx).is_err());
        let r = &mem.regions[0];
        assert!(matches!(
            r.read_page(idx, &mut buf),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            r.write_page(idx, &page(1)),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            r.zero_page(idx),
            Err(MemoryError::OutOfRange { .. })
        ));
    }
    let e = mem.read_page(4, &mut buf).unwrap_err();
    assert_eq!(
        e.to_string(),
        "page 4 is out of range: the guest memory has 4 pages"
    );
}

#[test]
fn locate_across_regions() {
    let a = temp(2 * 4096);
    let b = temp(3 * 4096);
    let ra = GuestMemory::open_file("a", a.path(), 2 * 4096)
        .unwrap()
        .regions
        .pop()
        .unwrap();
    let rb = GuestMemory::open_file("b", b.path(), 3 * 4096)
        .unwrap()
        .regions
        .pop()
        .unwrap();
    let mem = GuestMemory {
        regions: vec![ra, rb],
        pid: None,
    };
    assert_eq!(mem.total_pages(), 5);
    assert_eq!(mem.locate(0), Some((0, 0)));
    assert_eq!(mem.locate(1), Some((0, 1)));
    assert_eq!(mem.locate(2), Some((1, 0)));
    assert_eq!(mem.locate(4), Some((1, 2)));
    assert_eq!(mem.locate(5), None);
    mem.write_page(2, &page(9)).unwrap();
    let mut buf = PageBuf::zeroed();
    mem.regions[1].read_page(0, &mut buf).unwrap();
    assert_eq!(buf.0, page(9));
    assert_eq!(
        mem.layout(),
        vec![("a".to_owned(), 8192), ("b".to_owned(), 12288)]
    );
}

#[test]
fn size_mismatch_and_bad_size() {
    let f = temp(8 * 4096);
    let e = GuestMemory::open_file("ram", f.path(), 4 * 4096).unwrap_err();
    assert!(
        matches!(
            e,
            MemoryError::SizeMismatch {
                expected: 16384,
                actual: 32768,
                ..
            }
        ),
        "{e}"
    );
    let e = GuestMemory::open_file("ram", f.path(), 8 * 4096 + 1).unwrap_err();
    assert!(matches!(e, MemoryError::BadSize { .. }), "{e}");
    let e = GuestMemory::open_file("ram", f.path(), 0).unwrap_err();
    assert!(matches!(e, MemoryError::BadSize { .. }), "{e}");
}

#[test]
fn missing_file_names_the_path() {
    let e = GuestMemory::open_file("ram", Path::new("/nonexistent/livemig.ram"), 4096).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/livemig.ram"), "{e}");
    assert!(std::error::Error::source(&e).is_some());
}

#[test]
fn threads_write_distinct_pages() {
    let f = temp(64 * 4096);
    let mem = GuestMemory::open_file("ram", f.path(), 64 * 4096).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let mem = &mem;
            s.spawn(move || {
                for p in (u64::from(t)..64).step_by(4) {
                    mem.write_page(p, &page(t)).unwrap();
                }
            });
        }
    });
    let mut buf = PageBuf::zeroed();
    for p in 0..64u64 {
        mem.read_page(p, &mut buf).unwrap();
        assert_eq!(buf.0, page(u8::try_from(p % 4).unwrap()));
    }
}

#[test]
fn not_shared_message_tells_how_to_start_qemu() {
    let m = MemoryError::NotShared { id: None }.to_string();
    assert!(
        m.contains("share=on") && m.contains("memory-backend-memfd"),
        "{m}"
    );
    let m = MemoryError::NotShared {
        id: Some("mem0".into()),
    }
    .to_string();
    assert!(m.contains("`mem0`") && m.contains("share=on"), "{m}");
}

#[test]
fn data_ranges_follow_the_holes_of_a_memfd() {
    // A memfd (shmem, like QEMU's memory-backend-memfd) of 64 pages with data in 3 and 40..42.
    let fd = rustix::fs::memfd_create("livemig-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let f = std::fs::File::from(fd);
    f.set_len(64 * 4096).unwrap();
    let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f)));
    let mem = GuestMemory::open_file("m", &path, 64 * 4096).unwrap();
    assert_eq!(mem.data_ranges(), Some(vec![]), "a new memfd is all holes");
    mem.write_page(3, &page(1)).unwrap();
    mem.write_page(40, &page(2)).unwrap();
    mem.write_page(41, &page(3)).unwrap();
    let r = mem.data_ranges().unwrap();
    assert_eq!(r, vec![3..4, 40..42]);
    // a zero page written is data too (allocated), and reads of holes are not needed to know it
    mem.write_page(63, &[0; PAGE_SIZE]).unwrap();
    assert_eq!(mem.data_ranges().unwrap().last(), Some(&(63..64)));
}

/// Pages 0..8 of a new memory in `dir` written non-zero.
fn written(dir: &Path, pages: u64) -> (tempfile::NamedTempFile, GuestMemory) {
    let f = tempfile::NamedTempFile::new_in(dir).unwrap();
    f.as_file().set_len(pages * 4096).unwrap();
    let mem = GuestMemory::open_file("ram", f.path(), pages * 4096).unwrap();
    for p in 0..pages {
        mem.write_page(p, &page(u8::try_from(p).unwrap() + 1)).unwrap();
    }
    (f, mem)
}

fn assert_zero_only(mem: &GuestMemory, zero: std::ops::Range<u64>) {
    let mut buf = PageBuf::zeroed();
    for p in 0..mem.total_pages() {
        mem.read_page(p, &mut buf).unwrap();
        let want = if zero.contains(&p) { [0u8; PAGE_SIZE] } else { page(u8::try_from(p).unwrap() + 1) };
        assert!(buf.0 == want, "page {p}");
    }
}

#[test]
fn zero_pages_punch_holes_on_tmpfs() {
    let (_f, mem) = written(Path::new("/dev/shm"), 8);
    assert_eq!(mem.data_ranges(), Some(std::iter::once(0..8).collect()));
    assert_eq!(mem.zero_pages(2..5).unwrap(), Zeroed { punched: 3, written: 0 });
    // Freed: the file has a hole there, and the pages read as zero.
    assert_eq!(mem.data_ranges(), Some(vec![0..2, 5..8]));
    assert_zero_only(&mem, 2..5);
    // A page written again after the punch holds the new data.
    mem.write_page(3, &page(9)).unwrap();
    let mut buf = PageBuf::zeroed();
    mem.read_page(3, &mut buf).unwrap();
    assert_eq!(buf.0, page(9));
    assert_eq!(mem.zero_pages(3..3).unwrap(), Zeroed::default());
}

#[test]
fn zero_pages_write_zeros_elsewhere() {
    // Not tmpfs (the build directory's file system; ext4 here): zeros are written.
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let (_f, mem) = written(dir.path(), 8);
    if on_tmpfs(&mem.regions[0].file) {
        return; // a checkout on tmpfs: the other test covers it
    }
    assert_eq!(mem.zero_pages(6..8).unwrap(), Zeroed { punched: 0, written: 2 });
    assert_zero_only(&mem, 6..8);
}

#[test]
fn zero_pages_out_of_range_is_an_error_and_changes_nothing() {
    let (_f, mem) = written(Path::new("/dev/shm"), 8);
    assert!(matches!(mem.zero_pages(6..9), Err(MemoryError::OutOfRange { index: 8, pages: 8, .. })));
    assert_zero_only(&mem, 0..0);
}

/// Populating pages for writing leaves their contents as they were (data and holes), allocates
/// them on tmpfs, and a range past the end is an error.
#[test]
fn populate_write_keeps_contents_and_checks_the_range() {
    let f = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
    f.as_file().set_len(16 * 4096).unwrap();
    let mem = GuestMemory::open_file("ram", f.path(), 16 * 4096).unwrap();
    mem.write_page(3, &page(7)).unwrap();
    let before = f.as_file().metadata().unwrap().blocks();
    mem.populate_write(2..10).unwrap();
    let after = f.as_file().metadata().unwrap().blocks();
    assert!(after > before, "the pages are allocated ({before} -> {after} blocks)");
    let mut buf = PageBuf::zeroed();
    for p in 0..16 {
        mem.read_page(p, &mut buf).unwrap();
        assert!(buf.0 == if p == 3 { page(7) } else { [0u8; PAGE_SIZE] }, "page {p}");
    }
    assert!(mem.populate_write(10..17).is_err());
}
