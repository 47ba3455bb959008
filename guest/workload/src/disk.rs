//! `--mode disk`: writes numbered files on the writable data disk (the virtio disk whose serial
//! is `livemig-data`, ext4, formatted by the host) while the dirty-memory workload runs, each
//! file durable (fsync of the file and of its directory) before its `LIVEMIG-DISKWRITE` line,
//! and verifies every file from the disk itself (page cache dropped first) every
//! `--verify-secs`: `LIVEMIG-DISKVERIFY`. The files already there (written by this guest before a
//! migration, or by an earlier boot) are verified too and numbering goes on after them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::emit;

/// The disk's serial (`-device virtio-blk-pci,serial=...`).
pub const SERIAL: &str = "livemig-data";
/// Where the data disk is mounted.
const MOUNT: &str = "/mnt/data";

/// The contents of file `n`: 256 lines `livemig file <n> line <i>` (the host checks the same).
pub fn contents(n: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(256 * 32);
    for i in 0..256 {
        v.extend_from_slice(format!("livemig file {n:08} line {i:04}\n").as_bytes());
    }
    v
}

fn name(n: u64) -> String {
    format!("f{n:08}")
}

/// The block device of the disk with serial [`SERIAL`], waiting up to 10 s for it.
fn find_device() -> Option<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(rd) = std::fs::read_dir("/sys/block") {
            for e in rd.flatten() {
                let serial = std::fs::read_to_string(e.path().join("serial")).unwrap_or_default();
                if serial.trim() == SERIAL {
                    return Some(Path::new("/dev").join(e.file_name()));
                }
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

struct Disk {
    dir: PathBuf,
    /// Files 0..next exist (or must).
    next: u64,
    pass: u64,
}

impl Disk {
    fn write_next(&mut self) -> std::io::Result<()> {
        let n = self.next;
        let path = self.dir.join(name(n));
        let t0 = Instant::now();
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&contents(n))?;
        f.sync_all()?;
        sync_dir(&self.dir)?;
        // The write's latency as the guest sees it (create, write, fsync, directory fsync).
        let us = t0.elapsed().as_micros();
        self.next += 1;
        emit(&format!("LIVEMIG-DISKWRITE n={n} files={} us={us}", self.next));
        Ok(())
    }

    /// Reads every file back from the disk (clean page cache dropped first).
    fn verify(&mut self) {
        self.pass += 1;
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
        let mut bad = 0u64;
        for n in 0..self.next {
            let ok = std::fs::read(self.dir.join(name(n))).map(|b| b == contents(n));
            match ok {
                Ok(true) => {}
                Ok(false) => {
                    bad += 1;
                    emit(&format!("LIVEMIG-DISKBAD file={n} reason=content"));
                }
                Err(e) => {
                    bad += 1;
                    emit(&format!("LIVEMIG-DISKBAD file={n} reason=read:{}", e.kind()));
                }
            }
        }
        emit(&format!("LIVEMIG-DISKVERIFY pass={} files={} bad={bad}", self.pass, self.next));
    }
}

/// Mounts the data disk read-write and writes a file every `every`, verifying all every
/// `verify_every`, until an error (then `LIVEMIG-DISKERROR` and the thread ends).
pub fn run(every: Duration, verify_every: Duration) {
    let Some(dev) = find_device() else {
        emit(&format!("LIVEMIG-DISKERROR no virtio disk with serial {SERIAL}"));
        return;
    };
    let _ = std::fs::create_dir_all(MOUNT);
    match std::process::Command::new("mount").args(["-t", "ext4", "-o", "rw"]).arg(&dev).arg(MOUNT).status() {
        Ok(s) if s.success() => {}
        other => {
            emit(&format!("LIVEMIG-DISKERROR mount {} failed: {other:?}", dev.display()));
            return;
        }
    }
    let dir = Path::new(MOUNT).join("files");
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| sync_dir(Path::new(MOUNT))) {
        emit(&format!("LIVEMIG-DISKERROR cannot create {}: {e}", dir.display()));
        return;
    }
    // Files from before: numbered 0..n without gaps.
    let mut next = 0;
    while dir.join(name(next)).exists() {
        next += 1;
    }
    let mut d = Disk { dir, next, pass: 0 };
    emit(&format!("LIVEMIG-DISKREADY dev={} files={}", dev.display(), d.next));
    d.verify();
    let mut last_verify = Instant::now();
    loop {
        if let Err(e) = d.write_next() {
            emit(&format!("LIVEMIG-DISKERROR writing file {}: {e}", d.next));
            return;
        }
        if last_verify.elapsed() >= verify_every {
            d.verify();
            last_verify = Instant::now();
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn contents_are_numbered_lines() {
        let c = super::contents(7);
        assert_eq!(c.len(), 256 * 32);
        assert!(c.starts_with(b"livemig file 00000007 line 0000\n"));
        assert!(c.ends_with(b"livemig file 00000007 line 0255\n"));
    }
}
