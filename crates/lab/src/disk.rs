//! A writable data disk on "shared storage": one image file that the source and the destination
//! QEMU both open (on this one host QEMU's image locking then behaves as between two hosts on
//! shared storage). The host formats it (ext4, no partition table); the guest's `--mode disk`
//! workload finds it by its serial, mounts it read-write and writes numbered files; after the VMs
//! are gone [`DataDisk::check`] checks the file system and every file from the host.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{io_err, LabError};

/// The virtio serial the guest looks the data disk up by (the workload's `disk::SERIAL`).
pub const DATA_DISK_SERIAL: &str = "livemig-data";

/// The image format of a data disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A writable data disk image, attached read-write with serial [`DATA_DISK_SERIAL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDisk {
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// What [`DataDisk::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCheck {
    /// Files `f00000000`.. found, all with the right contents, numbered without gaps.
    pub files: u64,
    /// The file after those, cut short (a prefix of its contents, maybe empty): the one being
    /// written when the VM was killed, never confirmed durable by the guest.
    pub partial_last: bool,
}

/// The contents of file `n` as the guest writes it (`guest/workload/src/disk.rs`).
pub fn file_contents(n: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(256 * 32);
    for i in 0..256 {
        v.extend_from_slice(format!("livemig file {n:08} line {i:04}\n").as_bytes());
    }
    v
}

fn run(cmd: &mut Command, what: &str) -> Result<std::process::Output, LabError> {
    let out = cmd.output().map_err(io_err(format!("cannot run {what}")))?;
    Ok(out)
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<(), LabError> {
    let out = run(cmd, what)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Config(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

impl DataDisk {
    /// Creates a `mib` MiB image at `path` holding an empty ext4 file system (mkfs.ext4; for
    /// qcow2 converted with qemu-img).
    pub fn create(path: impl Into<PathBuf>, format: DiskFormat, mib: u64) -> Result<DataDisk, LabError> {
        let path = path.into();
        let s = path.to_str().unwrap_or_default();
        if s.is_empty() || s.contains(',') {
            return Err(LabError::Config(format!("data disk path must be UTF-8 without ',': {}", path.display())));
        }
        let raw = match format {
            DiskFormat::Raw => path.clone(),
            DiskFormat::Qcow2 => path.with_extension("mkfs.raw"),
        };
        let f = fs::File::create(&raw).map_err(io_err(format!("cannot create {}", raw.display())))?;
        f.set_len(mib << 20).map_err(io_err(format!("cannot size {}", raw.display())))?;
        drop(f);
        run_ok(
            Command::new("mkfs.ext4").args(["-q", "-F", "-L", "livemig-data", "-b", "4096"]).arg(&raw),
            "mkfs.ext4 on the data disk",
        )?;
        if format == DiskFormat::Qcow2 {
            run_ok(
                Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&path),
                "qemu-img convert (install qemu-utils)",
            )?;
            let _ = fs::remove_file(&raw);
        }
        Ok(DataDisk { path, format })
    }

    /// QEMU's arguments: the image read-write, serial [`DATA_DISK_SERIAL`], in PCI slot 0x10 so
    /// that the guest finds the root disk (`if=virtio`, an earlier slot) first, as `/dev/vda`.
    pub(crate) fn qemu_args(&self) -> Vec<String> {
        vec![
            "-drive".into(),
            format!("file={},format={},if=none,id=data0", self.path.display(), self.format.name()),
            "-device".into(),
            format!("virtio-blk-pci,drive=data0,serial={DATA_DISK_SERIAL},addr=0x10"),
        ]
    }

    /// From the host, once no QEMU has the image open: copies it to a raw file in `work`
    /// (qemu-img convert), replays the ext4 journal on the copy (the guest never unmounted),
    /// then `e2fsck -fn` must find nothing, and every file under `/files` is dumped with debugfs
    /// and compared with [`file_contents`]. An error says what is wrong.
    pub fn check(&self, work: &Path) -> Result<DiskCheck, LabError> {
        fs::create_dir_all(work).map_err(io_err(format!("cannot create {}", work.display())))?;
        let copy = work.join("check.raw");
        let _ = fs::remove_file(&copy);
        run_ok(
            Command::new("qemu-img").args(["convert", "-f", self.format.name(), "-O", "raw"]).arg(&self.path).arg(&copy),
            "qemu-img convert of the data disk",
        )?;
        // Exit 0 or 1 (the journal replayed): anything else is an error.
        let out = run(Command::new("e2fsck").args(["-fy", "-E", "journal_only"]).arg(&copy), "e2fsck -E journal_only")?;
        if !matches!(out.status.code(), Some(0 | 1)) {
            return Err(LabError::Config(format!(
                "e2fsck -E journal_only on the data disk: {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        run_ok(Command::new("e2fsck").arg("-fn").arg(&copy), "e2fsck -fn on the data disk (after the journal replay)")?;
        let dump = work.join("dump");
        let _ = fs::remove_dir_all(&dump);
        fs::create_dir_all(&dump).map_err(io_err(format!("cannot create {}", dump.display())))?;
        run_ok(
            Command::new("debugfs").arg("-R").arg(format!("rdump /files {}", dump.display())).arg(&copy),
            "debugfs rdump of the data disk",
        )?;
        let dir = dump.join("files");
        let mut names: Vec<String> = fs::read_dir(&dir)
            .map_err(io_err(format!("cannot read {}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        names.sort();
        let mut partial_last = false;
        for (i, name) in names.iter().enumerate() {
            let n = i as u64;
            if *name != format!("f{n:08}") {
                return Err(LabError::Config(format!("data disk: file {n} missing (found {name} at its place)")));
            }
            let got = fs::read(dir.join(name)).map_err(io_err(format!("cannot read the dumped {name}")))?;
            let want = file_contents(n);
            if got != want {
                if i + 1 == names.len() && want.starts_with(&got) {
                    partial_last = true;
                } else {
                    return Err(LabError::Config(format!("data disk: {name} has wrong contents ({} bytes)", got.len())));
                }
            }
        }
        let _ = fs::remove_file(&copy);
        let _ = fs::remove_dir_all(&dump);
        Ok(DiskCheck { files: names.len() as u64 - u64::from(partial_last), partial_last })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_contents_match_the_guest_format() {
        let c = file_contents(7);
        assert_eq!(c.len(), 256 * 32);
        assert!(c.starts_with(b"livemig file 00000007 line 0000\n"));
    }

    #[test]
    fn a_fresh_disk_checks_clean_with_no_files_dir() {
        // Without mkfs.ext4 and qemu-img there is nothing to test.
        if Command::new("mkfs.ext4").arg("-V").output().is_err() || Command::new("qemu-img").arg("--version").output().is_err() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("livemig-lab-disk-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        for format in [DiskFormat::Raw, DiskFormat::Qcow2] {
            let d = DataDisk::create(dir.join(format!("d.{}", format.name())), format, 16).unwrap();
            // A fresh file system has no /files: debugfs's rdump fails, so the check does.
            let e = d.check(&dir.join("work")).unwrap_err().to_string();
            assert!(e.contains("files"), "{e}");
            assert!(d.qemu_args()[1].contains(&format!("format={}", format.name())));
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
