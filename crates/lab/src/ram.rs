//! The guest RAM of a paused QEMU process read from outside, whatever backs it (a shared file, a
//! memfd, plain private `-m` RAM), and the page-by-page comparison of two such RAMs: how tests
//! and the benchmark prove that a destination holds exactly the source's memory.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The guest RAM of a paused QEMU process, readable with [`RamView::read_at`].
#[derive(Debug)]
pub struct RamView {
    file: File,
    base: u64,
    /// Bytes of guest RAM.
    pub len: u64,
    /// How it is read, for messages: `file <path>` or `/proc/<pid>/mem`.
    pub how: String,
}

impl RamView {
    /// The RAM of QEMU process `pid` that starts at host virtual address `hva` (QEMU's answer to
    /// `gpa2hva 0`) and is `len` bytes long (`base-memory`): the mapping of /proc/PID/maps that
    /// holds it. A file mapping (memory-backend-file, memfd) is read from the file
    /// (`/proc/PID/map_files/...`: a read of a hole allocates nothing); private RAM through
    /// `/proc/PID/mem` (the process must be paused; a never-touched page reads as zero without
    /// being allocated).
    pub fn open(pid: u32, hva: u64, len: u64) -> io::Result<RamView> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
        for line in maps.lines() {
            // start-end perms offset dev inode [path]
            let f: Vec<&str> = line.splitn(6, ' ').collect();
            let Some((lo, hi)) = f.first().and_then(|r| r.split_once('-')) else { continue };
            let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) else { continue };
            if hva < lo || hva >= hi {
                continue;
            }
            let inode = f.get(4).copied().unwrap_or("0");
            let path = f.get(5).map_or("", |p| p.trim());
            if inode != "0" && hi - hva >= len {
                let off = u64::from_str_radix(f.get(2).copied().unwrap_or("0"), 16).unwrap_or(0);
                let file = File::open(format!("/proc/{pid}/map_files/{lo:x}-{hi:x}"))?;
                return Ok(RamView { file, base: off + (hva - lo), len, how: format!("file {path}") });
            }
            let mem = format!("/proc/{pid}/mem");
            let file = File::open(&mem)?;
            return Ok(RamView { file, base: hva, len, how: mem });
        }
        Err(io::Error::new(io::ErrorKind::NotFound, format!("QEMU {pid}: no mapping of /proc/{pid}/maps holds its RAM at {hva:#x}")))
    }

    /// Reads `buf.len()` bytes at guest-physical offset `off`.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, self.base + off)
    }
}

/// Pages that differ between two RAMs: how many, and the first few with the byte range that
/// differs in each (what a reader needs to tell a guest page from a hypervisor-owned one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RamDiff {
    pub differ: u64,
    pub pages: u64,
    /// Pages of the source that are not all zero (shows that real guest memory was compared).
    pub nonzero: u64,
    /// (page, first differing byte, last differing byte), at most 4.
    pub first: Vec<(u64, usize, usize)>,
}

impl std::fmt::Display for RamDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of {} pages ({} non-zero) differ between paused source and destination", self.differ, self.pages, self.nonzero)?;
        if !self.first.is_empty() {
            let list: Vec<String> = self.first.iter().map(|(p, a, b)| format!("page {p:#x} bytes {a:#x}..={b:#x}")).collect();
            write!(f, " ({}{})", list.join(", "), if self.differ > self.first.len() as u64 { ", ..." } else { "" })?;
        }
        Ok(())
    }
}

impl RamDiff {
    /// On KVM, one page per vCPU differs in its first 12 bytes after every QEMU native migration:
    /// KVM's own steal-time record (`u64 steal; u32 version`), which the host kernel updates
    /// when a vCPU is scheduled, not the guest. A difference is that record's only when it has
    /// at most `vcpus` pages, each differing only within its first 16 bytes.
    pub fn only_kvm_records(&self, vcpus: u64) -> bool {
        self.differ > 0 && self.differ <= vcpus && self.first.len() as u64 == self.differ && self.first.iter().all(|&(_, _, hi)| hi < 16)
    }
}

/// Compares two RAMs (source `a`, destination `b`) page by page.
pub fn compare(a: &RamView, b: &RamView) -> io::Result<RamDiff> {
    if a.len != b.len {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("RAM sizes differ: {} and {} bytes", a.len, b.len)));
    }
    const CHUNK: usize = 1 << 20;
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut diff = RamDiff { pages: a.len / 4096, ..RamDiff::default() };
    let mut off = 0u64;
    let at = |e: io::Error, which: &str, how: &str, off: u64| io::Error::new(e.kind(), format!("reading {which} RAM ({how}) at {off:#x}: {e}"));
    while off < a.len {
        let n = usize::try_from((a.len - off).min(CHUNK as u64)).unwrap_or(CHUNK);
        a.read_at(&mut ba[..n], off).map_err(|e| at(e, "source", &a.how, off))?;
        b.read_at(&mut bb[..n], off).map_err(|e| at(e, "destination", &b.how, off))?;
        diff.nonzero += ba[..n].chunks(4096).filter(|p| p.iter().any(|&x| x != 0)).count() as u64;
        if ba[..n] != bb[..n] {
            for (i, (x, y)) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)).enumerate() {
                if x == y {
                    continue;
                }
                diff.differ += 1;
                if diff.first.len() < 4 {
                    let lo = x.iter().zip(y).position(|(p, q)| p != q).unwrap_or(0);
                    let hi = x.iter().zip(y).rposition(|(p, q)| p != q).unwrap_or(0);
                    diff.first.push((off / 4096 + i as u64, lo, hi));
                }
            }
        }
        off += n as u64;
    }
    Ok(diff)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our own memory stands in for a paused QEMU's: a private mapping read through /proc/self/mem.
    #[test]
    fn compares_private_memory_through_proc_mem_and_finds_a_changed_byte() {
        let a = vec![7u8; 64 * 4096];
        let mut b = a.clone();
        b[5 * 4096 + 100] = 8;
        let pid = std::process::id();
        let va = RamView::open(pid, a.as_ptr() as u64, a.len() as u64).unwrap();
        let vb = RamView::open(pid, b.as_ptr() as u64, b.len() as u64).unwrap();
        assert_eq!(va.how, format!("/proc/{pid}/mem"));
        let d = compare(&va, &vb).unwrap();
        assert_eq!((d.differ, d.pages, d.nonzero), (1, 64, 64));
        assert_eq!(d.first, vec![(5, 100, 100)]);
        assert_eq!(compare(&va, &va).unwrap().differ, 0);
        let short = RamView::open(pid, a.as_ptr() as u64, 4096).unwrap();
        assert!(compare(&va, &short).is_err(), "sizes differ");
    }
}
