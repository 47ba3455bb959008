//! Guest RAM backings other than the default /dev/shm file.

use std::path::{Path, PathBuf};
use std::process::Command;

use livemig_lab::RamBackend;

use crate::compaction::{assert_byte_exact, pages};
use crate::harness::{self, Migration, Pair};

const HUGE_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// 2 MiB huge pages for a test: raises the kernel's pool of them if fewer than `pages` are free,
/// mounts a hugetlbfs of that size in a temporary directory, and on drop unmounts it and puts the
/// pool back as it was.
struct HugePages {
    dir: tempfile::TempDir,
    restore: Option<u64>,
}

fn read_u64(p: &str) -> u64 {
    let s = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("cannot read {p}: {e}"));
    s.trim().parse().unwrap_or_else(|e| panic!("{p}: {s:?}: {e}"))
}

impl HugePages {
    fn reserve(pages: u64) -> HugePages {
        let (nr, free) = (format!("{HUGE_2M}/nr_hugepages"), format!("{HUGE_2M}/free_hugepages"));
        let before = read_u64(&nr);
        let have = read_u64(&free);
        let restore = (have < pages).then(|| {
            std::fs::write(&nr, (before + pages - have).to_string()).unwrap_or_else(|e| panic!("cannot write {nr} (the VM tests run as root): {e}"));
            before
        });
        let got = read_u64(&free);
        let dir = tempfile::tempdir().unwrap();
        let me = HugePages { dir, restore };
        assert!(got >= pages, "the kernel gave {got} free 2 MiB huge pages, {pages} needed");
        let out = Command::new("mount").args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"]).arg(me.dir.path()).output().expect("run mount");
        assert!(out.status.success(), "mount -t hugetlbfs failed: {}", String::from_utf8_lossy(&out.stderr));
        me
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
        if let Some(n) = self.restore {
            let _ = std::fs::write(format!("{HUGE_2M}/nr_hugepages"), n.to_string());
        }
    }
}

fn on_hugetlbfs(p: &Path) -> bool {
    let out = Command::new("stat").args(["-f", "-c", "%T"]).arg(p).output().expect("run stat");
    String::from_utf8_lossy(&out.stdout).trim() == "hugetlbfs"
}

/// Guest RAM on 2 MiB huge pages (`memory-backend-file,share=on` on hugetlbfs), as hosts that back
/// their VMs with huge pages give it: the shared engine reads and writes it through the same
/// mappings and moves it byte-exact; nothing is punched there (hugetlbfs frees only whole huge
/// pages: a zero page is written as zeros instead).
#[test]
fn migrates_a_guest_on_huge_pages() {
    let _g = harness::vm_lock();
    // Two 384 MiB guests: 192 huge pages each.
    let huge = HugePages::reserve(384);
    let (src_ram, dst_ram) = (huge.file("source.ram"), huge.file("destination.ram"));
    let pair = Pair::start_with_backend("huge", harness::dirty_guest(48, 10), RamBackend::File(src_ram.clone()), |mut d| {
        d.backend = RamBackend::File(dst_ram.clone());
        d
    });
    assert!(on_hugetlbfs(&src_ram) && on_hugetlbfs(&dst_ram), "both guests' RAM files are on hugetlbfs");
    let m = Migration::run(&pair, &[], &["--verify-reread"]);
    m.assert_completed();
    assert_byte_exact(pair.src.qmp_path(), &m);
    let r = &m.recv_report;
    assert_eq!(r["zero_pages_punched"], 0, "hugetlbfs cannot punch a 4 KiB page: {r:#}");
    assert!(pages(r, "raw") > 0, "{:#}", r["pages"]);
    pair.assert_destination_guest_verifies(2);
    drop(pair);
    for f in [&src_ram, &dst_ram] {
        let _ = std::fs::remove_file(f);
    }
}
