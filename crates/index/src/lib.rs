//! 128-bit fingerprints of 4 KiB windows of disk images, their persisted index, the compact
//! identity both agents exchange, and verified window reads on the receiving side.
//!
//! Memory compaction: a guest's page cache holds copies of 4 KiB of its root disk. When the
//! destination holds the same image, a page equal to 4 KiB of the disk goes as a reference (the
//! sector it starts at + [`Fingerprint`]); the receiver reads those bytes from its own copy (a
//! [`BlockReader`] checks the fingerprint), so a window changed since (the guest writes its
//! disk) is detected and the page can be requested again.
//!
//! - [`DiskIndex::build`] scans a raw image with several threads: the fingerprint of every
//!   non-zero 4 KiB window starting at a multiple of the index's stride (512, 1024, 2048 or
//!   4096 bytes, [`Align`]: detected from the image's filesystems, or given) maps to its first
//!   window. Zero windows are not indexed (zero pages are compacted elsewhere).
//! - [`DiskIndex::load_or_build`] keeps the index in a cache directory and rebuilds it when the
//!   image changed (size, mtime, ctime, inode, device or a content sample differ) or the index
//!   file is unreadable, truncated or corrupted. The cache directory is created mode 0700 and
//!   index files 0600; a cache directory of another user or that others can use is refused
//!   ([`IndexError::Insecure`]), as is such a snapshot directory ([`snapshot`]).
//! - [`DiskIndex::identity`] is the [`ImageIdentity`] both sides compare in the handshake.

mod align;
mod build;
mod error;
mod file;
mod private;
mod reader;
mod source;
pub mod snapshot;

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use xxhash_rust::xxh3::xxh3_128;

pub use align::{detect as detect_stride, Align, Stride, SECTOR, STRIDES};
pub use build::BuildProgress;
pub use error::IndexError;
pub use file::{cache_file_name, Origin};
pub use private::InsecureDir;
pub use reader::BlockReader;
pub use source::{NbdExport, Source};
pub use snapshot::{save_from, Snapshot, SnapshotError, SnapshotInfo, SnapshotStore, SnapshotWriter};

/// Size of a page of guest memory and of an indexed disk window.
pub const BLOCK_SIZE: usize = 4096;
/// [`BLOCK_SIZE`] as u64, for offsets.
pub const BLOCK_SIZE_U64: u64 = 4096;
/// Most windows an index addresses (window numbers are stored in 32 bits): 16 TiB of image at a
/// 4096-byte stride, 2 TiB at 512.
pub const MAX_WINDOWS: u64 = u32::MAX as u64;

static ZERO_BLOCK: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

/// Whether a block (or page) holds only zero bytes.
pub fn is_zero(block: &[u8]) -> bool {
    block.chunks(BLOCK_SIZE).all(|c| c == &ZERO_BLOCK[..c.len()])
}

/// xxh3-128 of a 4 KiB page or block.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub u128);

impl Fingerprint {
    /// The fingerprint of a 4 KiB block.
    pub fn of(block: &[u8; BLOCK_SIZE]) -> Self {
        Fingerprint(xxh3_128(block))
    }

    /// The fingerprint of a page given as a slice; `None` unless it is exactly 4 KiB.
    pub fn of_slice(page: &[u8]) -> Option<Self> {
        <&[u8; BLOCK_SIZE]>::try_from(page).ok().map(Self::of)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({:032x})", self.0)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        hex128::serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        hex128::deserialize(d).map(Fingerprint)
    }
}

/// What both agents exchange in the handshake to know they hold the same image: its size, a
/// hash of a sample of its blocks, and the hash of its whole index (every fingerprint with the
/// first block that holds it). Equal identities mean every reference the sender can make
/// resolves on the receiver (as of the time both indexed their copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageIdentity {
    /// Image size in bytes.
    pub size: u64,
    /// xxh3-128 of the size and of a few blocks spread over the image.
    #[serde(with = "hex128")]
    pub sample_hash: u128,
    /// xxh3-128 of the index body (sorted fingerprints and block numbers).
    #[serde(with = "hex128")]
    pub index_hash: u128,
}

/// Fingerprint -> first window of every non-zero 4 KiB window of a raw disk image that starts
/// at a multiple of its stride.
///
/// Held as sorted fingerprints with a parallel array of window numbers (window `w` starts at
/// byte `w * stride`), and a directory on the
/// top bits of the fingerprint (about two entries per bucket), so a lookup reads one directory
/// slot and searches a handful of keys.
pub struct DiskIndex {
    keys: Vec<u128>,
    blocks: Vec<u32>,
    /// Per entry: 512-byte sectors at the end of the page that are zero instead of the disk's
    /// (0: the whole window; see [`Window`]).
    tails: Vec<u8>,
    dir: Vec<u32>,
    shift: u32,
    meta: Meta,
}

/// What an index knows of the image it was built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) stamp: file::Stamp,
    pub(crate) sample_hash: u128,
    pub(crate) index_hash: u128,
    pub(crate) zero_blocks: u64,
    /// Bytes between window starts: one of [`STRIDES`].
    pub(crate) stride: u32,
}

impl fmt::Debug for DiskIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskIndex")
            .field("image_size", &self.meta.stamp.size)
            .field("fingerprints", &self.keys.len())
            .field("zero_blocks", &self.meta.zero_blocks)
            .field("index_hash", &format_args!("{:032x}", self.meta.index_hash))
            .finish_non_exhaustive()
    }
}

impl DiskIndex {
    /// From sorted, unique keys with their blocks.
    pub(crate) fn from_sorted(keys: Vec<u128>, blocks: Vec<u32>, tails: Vec<u8>, meta: Meta) -> Self {
        debug_assert_eq!(keys.len(), blocks.len());
        debug_assert_eq!(keys.len(), tails.len());
        // About two entries per bucket; at most 2^26 buckets (256 MiB of directory would be silly).
        let bits = keys.len().checked_ilog2().unwrap_or(0).saturating_sub(1).min(26);
        let shift = 128 - bits;
        let buckets = 1usize << bits;
        let mut dir = vec![0u32; buckets + 1];
        for &k in &keys {
            if let Some(slot) = dir.get_mut(bucket(k, shift) + 1) {
                *slot += 1;
            }
        }
        for i in 1..dir.len() {
            dir[i] += dir[i - 1];
        }
        DiskIndex { keys, blocks, tails, dir, shift, meta }
    }

    /// The first window holding a page with this fingerprint, if any.
    #[inline]
    pub fn lookup(&self, fp: &Fingerprint) -> Option<Window> {
        let b = bucket(fp.0, self.shift);
        let lo = *self.dir.get(b)? as usize;
        let hi = *self.dir.get(b + 1)? as usize;
        let i = self.keys.get(lo..hi)?.binary_search(&fp.0).ok()?;
        Some(self.window(*self.blocks.get(lo + i)?, *self.tails.get(lo + i)?))
    }

    #[inline]
    fn window(&self, n: u32, tail: u8) -> Window {
        Window { sector: self.sector_of(n), zero_tail_sectors: tail }
    }

    #[inline]
    fn sector_of(&self, window: u32) -> u64 {
        u64::from(window) * (u64::from(self.meta.stride) / SECTOR)
    }

    /// Bytes between the starts of indexed windows (512, 1024, 2048 or 4096).
    pub fn stride(&self) -> u32 {
        self.meta.stride
    }

    /// Number of 4 KiB windows of the image at its stride (zero ones included).
    pub fn windows(&self) -> u64 {
        windows(self.meta.stamp.size, self.meta.stride)
    }

    /// Number of distinct non-zero fingerprints indexed.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the image had no non-zero block.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Size of the image in bytes.
    pub fn image_size(&self) -> u64 {
        self.meta.stamp.size
    }

    /// Number of whole 4 KiB blocks of the image (a trailing partial block is not counted).
    pub fn image_blocks(&self) -> u64 {
        self.meta.stamp.size / BLOCK_SIZE_U64
    }

    /// Number of all-zero windows of the image at its stride.
    pub fn zero_blocks(&self) -> u64 {
        self.meta.zero_blocks
    }

    /// The summary to exchange in the handshake.
    pub fn identity(&self) -> ImageIdentity {
        ImageIdentity { size: self.meta.stamp.size, sample_hash: self.meta.sample_hash, index_hash: self.meta.index_hash }
    }

    /// Bytes of memory held by the index.
    pub fn memory_bytes(&self) -> usize {
        self.keys.capacity() * 16 + self.blocks.capacity() * 4 + self.tails.capacity() + self.dir.capacity() * 4
    }

    /// Iterates over (fingerprint, its first window) in fingerprint order.
    pub fn iter(&self) -> impl Iterator<Item = (Fingerprint, Window)> + '_ {
        self.keys.iter().zip(&self.blocks).zip(&self.tails).map(|((&k, &b), &t)| (Fingerprint(k), self.window(b, t)))
    }
}

/// Where a page's content is on the disk: the 4 KiB at `sector`, or, when `zero_tail_sectors`
/// is not 0, the first `4096 - 512 * zero_tail_sectors` bytes there followed by zeros. The
/// second form is the last page of a file on a filesystem with blocks under 4 KiB: its data
/// ends within the page (zeros after the end of the file) while the disk goes on with other
/// blocks. Indexes of a stride under 4096 hold both forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    /// The sector (512-byte units) the content starts at.
    pub sector: u64,
    /// Sectors at the end of the page that are zero (0..=7).
    pub zero_tail_sectors: u8,
}

impl Window {
    /// A whole 4 KiB window.
    pub fn whole(sector: u64) -> Window {
        Window { sector, zero_tail_sectors: 0 }
    }

    /// Bytes read from the disk (the rest of the page is zero).
    pub fn disk_bytes(&self) -> usize {
        BLOCK_SIZE - 512 * usize::from(self.zero_tail_sectors.min(7))
    }
}

/// Number of whole 4 KiB windows of an image of `size` bytes starting every `stride` bytes.
pub(crate) fn windows(size: u64, stride: u32) -> u64 {
    match size.checked_sub(BLOCK_SIZE_U64) {
        Some(rest) if stride > 0 => rest / u64::from(stride) + 1,
        _ => 0,
    }
}

#[inline]
fn bucket(key: u128, shift: u32) -> usize {
    // shift is 128 - bits with bits <= 26: the result fits any usize; 128 means one bucket.
    key.checked_shr(shift).and_then(|b| usize::try_from(b).ok()).unwrap_or(0)
}

/// Serde of a u128 as 32 lowercase hex digits (JSON numbers lose precision beyond 2^53 in
/// many readers).
mod hex128 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:032x}"))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s.len() != 32 {
            return Err(D::Error::custom(format!("expected 32 hex digits, got {} characters", s.len())));
        }
        u128::from_str_radix(&s, 16).map_err(|e| D::Error::custom(format!("expected 32 hex digits: {e}")))
    }
}

#[cfg(test)]
mod tests;
