//! Where 4 KiB windows of a disk image are indexed: every `stride` bytes, from byte 0.
//!
//! A guest's page-cache page of a file holds 4 KiB of the file: on a filesystem with 4 KiB
//! blocks that is one block, 4 KiB-aligned on the disk when the filesystem starts on a 4 KiB
//! boundary; on a filesystem with 1 KiB blocks (what `mke2fs` makes under 512 MiB) it is four
//! consecutive 1 KiB blocks, a window that starts on any 1 KiB boundary. [`Align::Auto`] reads
//! the partition table (MBR or GPT, or none) and the superblocks of ext2/3/4 and XFS, and takes
//! the coarsest stride that still starts a window at every filesystem block: the gcd of every
//! filesystem's start offset and block size (at most 4096). Where it finds no filesystem it
//! knows, it takes 512 (every sector): correct for any content, and 8x the index of 4096.

use std::path::Path;

use crate::{IndexError, Source, BLOCK_SIZE_U64};

/// Bytes of a disk sector: the finest stride, and the unit of a reference's offset.
pub const SECTOR: u64 = 512;
/// The strides an index can have, in bytes.
pub const STRIDES: [u32; 4] = [512, 1024, 2048, 4096];

/// How to choose the stride of an index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Align {
    /// From the image's partitions and filesystems (see the module docs).
    #[default]
    Auto,
    /// This stride in bytes: one of [`STRIDES`].
    Bytes(u32),
}

impl std::str::FromStr for Align {
    type Err = String;

    fn from_str(s: &str) -> Result<Align, String> {
        if s == "auto" {
            return Ok(Align::Auto);
        }
        match s.parse::<u32>() {
            Ok(n) if STRIDES.contains(&n) => Ok(Align::Bytes(n)),
            _ => Err(format!("disk alignment {s:?}: expected auto, 512, 1024, 2048 or 4096")),
        }
    }
}

/// The stride chosen for an image, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stride {
    /// Bytes between indexed window starts: one of [`STRIDES`].
    pub bytes: u32,
    /// What it was chosen from, for logs (e.g. "ext4 with 1024-byte blocks at byte 0").
    pub reason: String,
}

/// Most GPT partition entries read.
const MAX_GPT_ENTRIES: u64 = 128;

impl Align {
    /// The stride for `image` (its content `f`): the given one, or detected.
    pub fn resolve(self, f: &Source, image: &Path) -> Result<Stride, IndexError> {
        match self {
            Align::Bytes(n) if STRIDES.contains(&n) => Ok(Stride { bytes: n, reason: "configured".into() }),
            Align::Bytes(n) => Err(IndexError::BadAlign { value: n }),
            Align::Auto => detect(f, image),
        }
    }
}

fn read_at(f: &Source, image: &Path, buf: &mut [u8], offset: u64) -> Result<bool, IndexError> {
    match f.read_exact_at(buf, offset) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(source) => Err(IndexError::Read { path: image.to_path_buf(), offset, source }),
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2).map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).and_then(|s| <[u8; 8]>::try_from(s).ok()).map_or(0, u64::from_le_bytes)
}

/// The filesystem starting at `start`, if it is one we know: (name, block size).
fn filesystem(f: &Source, image: &Path, start: u64) -> Result<Option<(&'static str, u64)>, IndexError> {
    let mut sb = [0u8; 1024];
    // ext2/3/4: superblock at 1024, magic 0xEF53 at 56, log2(block size) - 10 at 24.
    if let Some(at) = start.checked_add(1024) {
        if read_at(f, image, &mut sb, at)? && le16(&sb, 56) == 0xEF53 {
            let log = le32(&sb, 24);
            if log <= 6 {
                let name = if le32(&sb, 96) & 0x40 != 0 { "ext4" } else { "ext2/3" };
                return Ok(Some((name, 1024u64 << log)));
            }
        }
    }
    // XFS: "XFSB" at 0, block size (big-endian u32) at 4.
    if read_at(f, image, &mut sb[..8], start)? && &sb[..4] == b"XFSB" {
        let bs = u64::from(u32::from_be_bytes([sb[4], sb[5], sb[6], sb[7]]));
        if bs.is_power_of_two() && (512..=65536).contains(&bs) {
            return Ok(Some(("xfs", bs)));
        }
    }
    Ok(None)
}

/// Start offsets (bytes) of the partitions of an MBR or GPT table; `None` without a table.
fn partitions(f: &Source, image: &Path) -> Result<Option<Vec<u64>>, IndexError> {
    let mut mbr = [0u8; 512];
    if !read_at(f, image, &mut mbr, 0)? || mbr[510..512] != [0x55, 0xAA] {
        return Ok(None);
    }
    let entries: Vec<(u8, u64)> = (0..4)
        .map(|i| {
            let e = &mbr[446 + 16 * i..462 + 16 * i];
            (e[4], u64::from(le32(e, 8)))
        })
        .filter(|&(t, lba)| t != 0 && lba != 0)
        .collect();
    if entries.is_empty() {
        // A boot sector signature without partitions: a filesystem's own boot sector (FAT, NTFS).
        return Ok(None);
    }
    if !entries.iter().any(|&(t, _)| t == 0xEE) {
        return Ok(Some(entries.into_iter().map(|(_, lba)| lba * SECTOR).collect()));
    }
    // Protective MBR: the GPT header at LBA 1.
    let mut hdr = [0u8; 512];
    if !read_at(f, image, &mut hdr, SECTOR)? || &hdr[..8] != b"EFI PART" {
        return Ok(Some(Vec::new()));
    }
    let table = le64(&hdr, 72).saturating_mul(SECTOR);
    let count = u64::from(le32(&hdr, 80)).min(MAX_GPT_ENTRIES);
    let size = u64::from(le32(&hdr, 84));
    if !(128..=4096).contains(&size) {
        return Ok(Some(Vec::new()));
    }
    let mut starts = Vec::new();
    let mut e = vec![0u8; usize::try_from(size).unwrap_or(128)];
    for i in 0..count {
        let Some(at) = i.checked_mul(size).and_then(|o| o.checked_add(table)) else { break };
        if !read_at(f, image, &mut e, at)? {
            break;
        }
        let used = e[..16].iter().any(|&b| b != 0);
        if used {
            starts.push(le64(&e, 32).saturating_mul(SECTOR));
        }
    }
    Ok(Some(starts))
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Detects the stride of `image` (see the module docs).
pub fn detect(f: &Source, image: &Path) -> Result<Stride, IndexError> {
    let starts = match partitions(f, image)? {
        Some(p) => p,
        None => vec![0],
    };
    let mut stride = BLOCK_SIZE_U64;
    let mut found = Vec::new();
    let mut unknown = Vec::new();
    for &start in &starts {
        match filesystem(f, image, start)? {
            Some((name, bs)) => {
                // A window starts at every filesystem block: at start + k * bs.
                stride = gcd(stride, gcd(start % BLOCK_SIZE_U64, bs.min(BLOCK_SIZE_U64)).max(SECTOR));
                found.push(format!("{name} with {bs}-byte blocks at byte {start}"));
            }
            None => unknown.push(start),
        }
    }
    if starts.is_empty() || !unknown.is_empty() {
        stride = SECTOR;
        let what = if starts.is_empty() {
            "a partition table without readable partitions".to_string()
        } else {
            let list: Vec<String> = unknown.iter().map(|s| format!("byte {s}")).collect();
            format!("no ext2/3/4 or XFS filesystem at {}", list.join(", "))
        };
        found.push(what);
    }
    // gcd of powers of two >= 512 and 4096 is one of STRIDES.
    let bytes = u32::try_from(stride).unwrap_or(512);
    Ok(Stride { bytes, reason: found.join("; ") })
}
