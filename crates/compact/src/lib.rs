//! The page codec of memory compaction: encodes a guest page against what the destination
//! already holds, and decodes it there only after checking it.
//!
//! Classes (the class byte versions the record format; 0 is reserved, unknown values are
//! rejected):
//!
//! | byte | class | data | report name |
//! |---|---|---|---|
//! | 1 | [`PageClass::Zero`] | none (the page is all zeroes) | `zero` |
//! | 2 | [`PageClass::Raw`] | the 4096 bytes | `raw` |
//! | 3 | [`PageClass::Lz4`] | LZ4 block of the page | `raw` |
//! | 4 | [`PageClass::Zstd`] | zstd frame of the page | `raw` |
//! | 5 | [`PageClass::Dup`] | source page `u64`, fingerprint `u128` | `dup` |
//! | 6 | [`PageClass::DiskRef`] | image `u16`, where `u64` ([`DiskRef::to_wire`]: bits 0-60 the sector the content starts at, bits 61-63 sectors of zeros that end the page), fingerprint `u128` | `disk_ref` |
//! | 7 | [`PageClass::SnapshotRef`] | snapshot page `u64`, fingerprint `u128` | `snapshot_ref` |
//! | 8 | [`PageClass::Delta`] | fingerprint `u128`, then runs of changed 8-byte words | `delta` |
//!
//! A batch is a sequence of records: `page: u64 LE`, `class: u8`, `len: u32 LE`, then `len` bytes
//! of data. All integers are little-endian. A delta run is `first word: u16`, `words: u16`, then
//! `8 x words` bytes that replace those words of the destination's current page.
//!
//! The fingerprint a record carries is the **keyed** xxh3-128 of the 4 KiB page
//! ([`PageKey::fingerprint`], a secret agreed per migration): the sender computes it over its
//! own page, the receiver over the page the reference resolves to, and writes only when they are
//! equal. A guest that does not know the key cannot craft a page whose fingerprint equals that
//! of different content (unkeyed xxh3 it can: see `crate::key`). Candidates are *found* with the
//! unkeyed [`fingerprint`], the same function as `livemig_index::Fingerprint::of`, so a disk
//! index or snapshot store (cached across migrations) answers [`DiskLookup`] directly; a
//! candidate that is not the page fails the keyed check and the page is resent whole.
//!
//! Encoding: [`Encoder`] (sender state for a whole migration + the batch being built).
//! Decoding: [`decode_batch`] against a [`Destination`] (reads/writes guest pages, reads disk
//! blocks and snapshot pages). References and deltas whose content cannot be read or does not
//! match their fingerprint are not written but returned as [`Miss`]es, for a resend.

//! # Use
//!
//! Sender, one [`Encoder`] for the whole migration:
//! ```
//! use livemig_compact::{decode_batch, EncodeOptions, Encoder, PageKey, PageRef, PAGE_SIZE};
//! let total_pages = 16;
//! let key = PageKey::from_bytes([7; 32]); // agreed in the handshake, the same on both sides
//! let mut enc = Encoder::new(total_pages, EncodeOptions::for_ram(total_pages * 4096), key.clone());
//! // enc.set_disk_lookup(Arc<dyn DiskLookup>); enc.set_snapshot_lookup(...);
//! let page = [7u8; PAGE_SIZE];
//! enc.push(3, &page); // or push_many(&[PageRef], 2) for 2 threads
//! enc.push_whole(4, &page); // a resend after a miss (call enc.invalidate(4) when the miss arrives)
//! let batch = enc.take(); // send it, then enc.recycle(batch)
//! # let mut dest = Ram(vec![[0u8; PAGE_SIZE]; 16]);
//! let summary = decode_batch(&batch, total_pages, &key, &mut dest).unwrap();
//! assert!(summary.misses.is_empty());
//! assert_eq!(dest.0[4], page);
//! # struct Ram(Vec<[u8; PAGE_SIZE]>);
//! # impl livemig_compact::Destination for Ram {
//! #     type Error = livemig_compact::CompactError;
//! #     fn read_page(&mut self, p: u64, out: &mut [u8; PAGE_SIZE]) -> bool { out.copy_from_slice(&self.0[p as usize]); true }
//! #     fn write_page(&mut self, p: u64, _: livemig_compact::PageClass, d: &[u8; PAGE_SIZE], _: usize) -> Result<(), Self::Error> { self.0[p as usize] = *d; Ok(()) }
//! # }
//! ```
//! Receiver: [`decode_batch`] with the same key and a [`Destination`]; every [`Miss`] goes back to the sender,
//! which calls [`Encoder::invalidate`] then [`Encoder::push_whole`] with the page's current
//! content. [`Encoder::stats`] gives pages and wire bytes per class
//! ([`ClassStats::by_report_name`]) and [`ClassStats::whole_page_bytes`].

mod decode;
mod delta;
mod encode;
mod key;

pub use decode::{data_runs, decode_batch, DecodeSummary, Destination, Miss, MissReason};
pub use delta::{delta_apply, delta_encode};
pub use encode::{
    Compressor, DiskLookup, EncodeOptions, Encoder, PageRef, Prepared, Scratch, SnapshotLookup,
};
pub use key::{unkeyed_collision, PageKey, PAGE_KEY_LEN};

use thiserror::Error;

/// Bytes in a guest page.
pub const PAGE_SIZE: usize = 4096;
/// Bytes of a record header.
pub const RECORD_HEADER: usize = 13;
/// Most bytes a record takes (header + data): no class carries more data than a page.
pub const MAX_RECORD: usize = RECORD_HEADER + PAGE_SIZE;
/// A batch is full when it reaches this size.
pub const BATCH_TARGET: usize = 1024 * 1024;

/// The lookup fingerprint of a page: unkeyed xxh3-128, as `livemig_index::Fingerprint::of`.
/// Only for finding candidates in a disk index or snapshot store (cached across migrations);
/// never what a receiver checks a reference against ([`PageKey::fingerprint`] is).
#[inline]
pub fn fingerprint(page: &[u8; PAGE_SIZE]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(page)
}

/// 4 KiB of a disk image that both hosts hold, starting at any sector; or their first
/// `4096 - 512 * zero_tail_sectors` bytes followed by zeros (the last page of a file on a
/// filesystem with blocks under 4 KiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DiskRef {
    /// Image id, as agreed by the agents.
    pub image: u16,
    /// Where the content starts in the image, in 512-byte sectors (protocol 5; before, 4 KiB
    /// blocks). At most [`DiskRef::MAX_SECTOR`].
    pub sector: u64,
    /// Sectors at the end of the page that are zero rather than read (0..=7).
    pub zero_tail_sectors: u8,
}

impl DiskRef {
    /// The largest sector a reference addresses (61 bits: 1 ZiB of image).
    pub const MAX_SECTOR: u64 = (1 << 61) - 1;

    /// The record's `u64`: the sector in bits 0-60, the zero tail in bits 61-63 (a sector
    /// beyond [`DiskRef::MAX_SECTOR`] is cut to its low bits: the receiver reads other bytes,
    /// its fingerprint check fails and the page is resent).
    pub fn to_wire(&self) -> u64 {
        (self.sector & Self::MAX_SECTOR) | (u64::from(self.zero_tail_sectors.min(7)) << 61)
    }

    /// From a record's `u64`; every value is a reference (which the receiver checks).
    pub fn from_wire(image: u16, v: u64) -> DiskRef {
        // v >> 61 <= 7.
        DiskRef { image, sector: v & Self::MAX_SECTOR, zero_tail_sectors: u8::try_from(v >> 61).unwrap_or(7) }
    }

    /// Bytes read from the disk (the rest of the page is zero).
    pub fn disk_bytes(&self) -> usize {
        PAGE_SIZE - 512 * usize::from(self.zero_tail_sectors.min(7))
    }
}

/// How a page travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageClass {
    /// Reserved, never on the wire.
    Invalid = 0,
    /// An all-zero page: no data.
    Zero = 1,
    /// The page as it is.
    Raw = 2,
    /// LZ4 block compressed page.
    Lz4 = 3,
    /// zstd compressed page (any level).
    Zstd = 4,
    /// Equal to the destination's current content of another (or the same) page.
    Dup = 5,
    /// Equal to a block of a disk image both hosts hold.
    DiskRef = 6,
    /// Equal to a page of a memory snapshot both hosts hold.
    SnapshotRef = 7,
    /// Changed words against the destination's current content of the same page.
    Delta = 8,
}

/// Number of class values (including `Invalid`), for per-class arrays.
pub const CLASS_COUNT: usize = 9;

impl PageClass {
    /// Every class that travels.
    pub const ALL: [PageClass; 8] = [
        PageClass::Zero,
        PageClass::Raw,
        PageClass::Lz4,
        PageClass::Zstd,
        PageClass::Dup,
        PageClass::DiskRef,
        PageClass::SnapshotRef,
        PageClass::Delta,
    ];

    /// The names used in reports, in this order (compressed pages count as `raw`).
    pub const REPORT_NAMES: [&'static str; 6] = ["zero", "dup", "disk_ref", "snapshot_ref", "delta", "raw"];

    /// The class of a byte from the wire; `None` for 0 and unknown values.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Zero,
            2 => Self::Raw,
            3 => Self::Lz4,
            4 => Self::Zstd,
            5 => Self::Dup,
            6 => Self::DiskRef,
            7 => Self::SnapshotRef,
            8 => Self::Delta,
            _ => return None,
        })
    }

    /// Precise name of the class.
    pub fn name(self) -> &'static str {
        match self {
            PageClass::Invalid => "invalid",
            PageClass::Zero => "zero",
            PageClass::Raw => "raw",
            PageClass::Lz4 => "lz4",
            PageClass::Zstd => "zstd",
            PageClass::Dup => "dup",
            PageClass::DiskRef => "disk_ref",
            PageClass::SnapshotRef => "snapshot_ref",
            PageClass::Delta => "delta",
        }
    }

    /// Name in reports: one of [`PageClass::REPORT_NAMES`]; `raw`, `lz4` and `zstd` are `raw`.
    pub fn report_name(self) -> &'static str {
        match self {
            PageClass::Raw | PageClass::Lz4 | PageClass::Zstd | PageClass::Invalid => "raw",
            c => c.name(),
        }
    }

    /// True for the classes that carry the whole page (raw or compressed).
    pub fn is_whole(self) -> bool {
        matches!(self, PageClass::Raw | PageClass::Lz4 | PageClass::Zstd)
    }
}

/// Pages and wire bytes (record headers included) of one class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassCount {
    /// Pages.
    pub pages: u64,
    /// Bytes their records took in batches.
    pub wire_bytes: u64,
}

/// Per-class counts, kept by the encoder; the receiver can keep one with [`ClassStats::add`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassStats {
    counts: [ClassCount; CLASS_COUNT],
}

impl ClassStats {
    /// Counts one record.
    pub fn add(&mut self, class: PageClass, record_len: usize) {
        let c = &mut self.counts[class as usize];
        c.pages += 1;
        c.wire_bytes += record_len as u64;
    }

    /// Counts of one precise class.
    pub fn get(&self, class: PageClass) -> ClassCount {
        self.counts[class as usize]
    }

    /// Counts by report name, in the order of [`PageClass::REPORT_NAMES`].
    pub fn by_report_name(&self) -> [(&'static str, ClassCount); 6] {
        let mut out = PageClass::REPORT_NAMES.map(|n| (n, ClassCount::default()));
        for class in PageClass::ALL {
            let c = self.get(class);
            let slot = out.iter_mut().find(|(n, _)| *n == class.report_name()).expect("report name listed");
            slot.1.pages += c.pages;
            slot.1.wire_bytes += c.wire_bytes;
        }
        out
    }

    /// All pages.
    pub fn pages(&self) -> u64 {
        self.counts.iter().map(|c| c.pages).sum()
    }

    /// All wire bytes.
    pub fn wire_bytes(&self) -> u64 {
        self.counts.iter().map(|c| c.wire_bytes).sum()
    }

    /// Bytes of the dirty pages as whole pages: 4096 x non-zero pages.
    pub fn whole_page_bytes(&self) -> u64 {
        (self.pages() - self.get(PageClass::Zero).pages) * PAGE_SIZE as u64
    }

    /// Adds another set of counts.
    pub fn merge(&mut self, other: &ClassStats) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            a.pages += b.pages;
            a.wire_bytes += b.wire_bytes;
        }
    }
}

/// Errors decoding a batch from the peer (malformed data; a reference that does not resolve is a
/// [`Miss`], not an error).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CompactError {
    /// The batch ends inside a record.
    #[error("page batch truncated at byte {0}")]
    Truncated(usize),
    /// Page index beyond the guest RAM.
    #[error("page batch names page {page}, beyond the {pages} pages of guest RAM")]
    PageOutOfRange {
        /// Page index received.
        page: u64,
        /// Pages of the RAM.
        pages: u64,
    },
    /// Unknown class byte.
    #[error("page batch has a record of unknown class {0}")]
    UnknownClass(u8),
    /// Data length not valid for the class.
    #[error("page batch record of class {class} has invalid length {len}")]
    BadLength {
        /// Class name.
        class: &'static str,
        /// Length received.
        len: u32,
    },
    /// Compressed data that does not decode to a page.
    #[error("page {0} does not decompress to exactly one page")]
    BadCompressed(u64),
    /// Delta runs out of the page or malformed.
    #[error("page {0} has a malformed delta")]
    BadDelta(u64),
}

/// Whether a page is all zeroes.
#[inline]
pub fn is_zero(page: &[u8; PAGE_SIZE]) -> bool {
    static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    page == &ZERO
}

/// Unkeyed xxh3-128 of the zero page (the lookup fingerprint, see [`fingerprint`]).
pub fn zero_fingerprint() -> u128 {
    static FP: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    *FP.get_or_init(|| fingerprint(&[0u8; PAGE_SIZE]))
}

#[cfg(test)]
mod tests;
