//! QEMU's migration stream (the main channel, and the return path) as a byte codec.
//!
//! A relay sits between a source QEMU that migrates into a socket and a destination QEMU
//! (`-incoming defer`). On the source side [`Parser`] cuts the main channel into RAM page records
//! ([`Event::Page`], [`Event::Zero`]) and opaque byte spans ([`Event::Opaque`]); on the destination
//! side every event is written back with [`Event::write_to`], and the concatenation is the
//! original byte stream, exactly. The format is QEMU's (`migration/savevm.c`, `migration/ram.c`)
//! as written by QEMU 7.2 and 10.0 for x86_64 (4096-byte target pages), non-multifd precopy.
//!
//! The parser understands the file header, the configuration section and its subsections,
//! commands, and the records of the `ram` section until that section's END. Anything it does not
//! understand before then (another iterable section, an early FULL section, XBZRLE, compressed
//! or RDMA records, multifd, postcopy, a missing footer, garbage) makes it emit
//! [`Event::Fallback`] once and pass every later byte through as opaque: it never fails on
//! content and never produces a page it is not sure of. After the RAM END everything is opaque
//! too ([`Event::RamDone`]). Every length read from the input is capped before anything is
//! allocated; an incomplete item is held back (at most [`MAX_HELD`] bytes) until its end arrives.
//!
//! The return path (destination to source, the same socket in reverse) is cut into messages by
//! [`ReturnPathParser`], so a relay can forward them or withhold one (`SWITCHOVER_ACK`).
//!
//! [`chunk`] is the frame payload a relay carries those events in between its two halves: opaque
//! spans verbatim, each page record as its header plus an opaque record of its data.
//!
//! This crate knows nothing of sockets, QMP or compaction.

use std::fmt;
use std::sync::Arc;

use thiserror::Error;

pub mod chunk;
mod parser;
mod return_path;

pub use parser::{Parser, Phase, RamBlockInfo, Stats, StreamConfig};
pub use return_path::{ReturnPathParser, RpEvent, RpKind, RpMessage, RpStats, RP_MAX_LEN};

/// QEMU's target page size on x86_64 (`TARGET_PAGE_SIZE`): the size of a PAGE record's data.
pub const PAGE_SIZE: usize = 4096;
/// `TARGET_PAGE_BITS` for [`PAGE_SIZE`].
pub const PAGE_BITS: u32 = 12;
/// `QEMU_VM_FILE_MAGIC`, the first be32 of a stream ("QEVM").
pub const FILE_MAGIC: u32 = 0x5145_564d;
/// `QEMU_VM_FILE_VERSION`, the second be32 of a stream.
pub const FILE_VERSION: u32 = 3;
/// Longest machine-type name accepted in the configuration section (QEMU's are ~20 bytes).
pub const MAX_MACHINE_NAME: u32 = 256;
/// Most capabilities accepted in the `configuration/capabilities` subsection (QEMU validates 2).
pub const MAX_CAPABILITIES: u32 = 16;
/// Most RAM blocks accepted in the MEM_SIZE block list (a q35 guest has about 10).
pub const MAX_BLOCKS: usize = 1024;
/// Most bytes the parser holds back while an item (a record, a header) is incomplete. Every
/// item it parses is shorter: the largest is a PAGE record with a block name, 4360 bytes.
pub const MAX_HELD: usize = 8192;

/// RAM record flags: the low 12 bits of a record's be64 word (`RAM_SAVE_FLAG_*`).
pub mod flags {
    /// Obsolete full-page flag (QEMU < 0.13); never parsed.
    pub const FULL: u64 = 0x01;
    /// A page filled with one byte (written as 0).
    pub const ZERO: u64 = 0x02;
    /// The RAM block list of the START section.
    pub const MEM_SIZE: u64 = 0x04;
    /// A raw page of [`crate::PAGE_SIZE`] bytes.
    pub const PAGE: u64 = 0x08;
    /// End of the section's records.
    pub const EOS: u64 = 0x10;
    /// Same block as the previous record: no block name follows.
    pub const CONTINUE: u64 = 0x20;
    /// An XBZRLE delta (falls back).
    pub const XBZRLE: u64 = 0x40;
    /// An RDMA hook (falls back).
    pub const HOOK: u64 = 0x80;
    /// A zlib-compressed page of QEMU < 9.1 (falls back).
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// A multifd sync point (falls back: the pages are on other channels).
    pub const MULTIFD_FLUSH: u64 = 0x200;
    /// The bits that hold flags.
    pub const MASK: u64 = 0xfff;
}

/// Errors of this crate: the stream ended inside an item, or a record built by the caller is
/// not writable. Content the parser does not understand is never an error (it falls back).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// The input ended inside an item or a section.
    #[error("the stream ended inside {state} ({held} bytes of an incomplete item)")]
    Truncated {
        /// Where the parser was.
        state: &'static str,
        /// Bytes of the incomplete item (passed on as opaque by `finish`).
        held: usize,
    },
    /// A page offset with bits below the page size set.
    #[error("RAM offset {0:#x} is not a multiple of the page size")]
    Unaligned(u64),
    /// A block name longer than QEMU's u8 length prefix allows.
    #[error("a RAM block name of {0} bytes is longer than 255")]
    NameTooLong(usize),
}

/// A RAM block's id string (`RAMBlock::idstr`, e.g. `pc.ram`): 0 to 255 bytes, cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockName(Arc<[u8]>);

impl BlockName {
    /// A block name; at most 255 bytes.
    pub fn new(bytes: &[u8]) -> Result<Self, StreamError> {
        if bytes.len() > 255 {
            return Err(StreamError::NameTooLong(bytes.len()));
        }
        Ok(Self(Arc::from(bytes)))
    }

    /// The name's bytes as they are in the stream.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The name as text (QEMU's names are ASCII; other bytes are replaced).
    pub fn to_string_lossy(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    fn write_to(&self, out: &mut Vec<u8>) {
        // The constructor caps the length at 255.
        out.push(u8::try_from(self.0.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(&self.0);
    }
}

impl fmt::Debug for BlockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string_lossy())
    }
}

impl fmt::Display for BlockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string_lossy())
    }
}

/// The header every PAGE and ZERO record starts with: be64 (offset | flags), then, unless the
/// CONTINUE flag is set, u8 length + the block name (`save_page_header`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordHeader {
    block: BlockName,
    offset: u64,
    continued: bool,
}

impl RecordHeader {
    /// A header for a page at `offset` (a multiple of [`PAGE_SIZE`]) of `block`; `continued`
    /// sets the CONTINUE flag, which leaves the block name out of the bytes (the receiver uses
    /// the block of the previous record).
    pub fn new(block: BlockName, offset: u64, continued: bool) -> Result<Self, StreamError> {
        if offset & flags::MASK != 0 {
            return Err(StreamError::Unaligned(offset));
        }
        Ok(Self { block, offset, continued })
    }

    /// The block the record belongs to (for a CONTINUE record, the block of the record before).
    pub fn block(&self) -> &BlockName {
        &self.block
    }

    /// The page's offset within its block, in bytes.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether the CONTINUE flag is set (no block name in the bytes).
    pub fn continued(&self) -> bool {
        self.continued
    }

    /// Whether the block name is written in the bytes (no CONTINUE flag).
    pub fn name_written(&self) -> bool {
        !self.continued
    }

    /// The be64 word of the record with the given kind flag.
    fn word(&self, kind: u64) -> u64 {
        self.offset | kind | if self.continued { flags::CONTINUE } else { 0 }
    }

    fn write_to(&self, kind: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.word(kind).to_be_bytes());
        if !self.continued {
            self.block.write_to(out);
        }
    }

    fn encoded_len(&self) -> usize {
        8 + if self.continued { 0 } else { 1 + self.block.as_bytes().len() }
    }
}

/// A RAM PAGE record: header and [`PAGE_SIZE`] bytes of page data.
#[derive(Clone, PartialEq, Eq)]
pub struct PageRecord {
    /// Block, offset and CONTINUE flag.
    pub header: RecordHeader,
    /// The page's content.
    pub data: Box<[u8; PAGE_SIZE]>,
}

impl PageRecord {
    /// The record's be64 word (offset | PAGE | CONTINUE?).
    pub fn word(&self) -> u64 {
        self.header.word(flags::PAGE)
    }

    /// Appends the record's bytes, exactly as QEMU wrote them.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        self.header.write_to(flags::PAGE, out);
        out.extend_from_slice(&self.data[..]);
    }

    /// Length of the record's bytes.
    pub fn encoded_len(&self) -> usize {
        self.header.encoded_len() + PAGE_SIZE
    }
}

impl fmt::Debug for PageRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nonzero = self.data.iter().filter(|&&b| b != 0).count();
        f.debug_struct("PageRecord")
            .field("header", &self.header)
            .field("data_head", &&self.data[..8])
            .field("nonzero_bytes", &nonzero)
            .finish()
    }
}

/// A RAM ZERO record: header and the fill byte (QEMU writes 0; 7.2 accepts any value).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ZeroRecord {
    /// Block, offset and CONTINUE flag.
    pub header: RecordHeader,
    /// The byte the page is filled with.
    pub fill: u8,
}

impl ZeroRecord {
    /// The record's be64 word (offset | ZERO | CONTINUE?).
    pub fn word(&self) -> u64 {
        self.header.word(flags::ZERO)
    }

    /// Appends the record's bytes, exactly as QEMU wrote them.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        self.header.write_to(flags::ZERO, out);
        out.push(self.fill);
    }

    /// Length of the record's bytes.
    pub fn encoded_len(&self) -> usize {
        self.header.encoded_len() + 1
    }
}

/// Kind of a section (`QEMU_VM_SECTION_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SectionKind {
    /// `SECTION_START` (0x01): setup of an iterable.
    Start,
    /// `SECTION_PART` (0x02): one iteration's data.
    Part,
    /// `SECTION_END` (0x03): the last data, with the guest stopped.
    End,
    /// `SECTION_FULL` (0x04): a whole device state.
    Full,
}

impl SectionKind {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0x01 => Some(Self::Start),
            0x02 => Some(Self::Part),
            0x03 => Some(Self::End),
            0x04 => Some(Self::Full),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Start => "START",
            Self::Part => "PART",
            Self::End => "END",
            Self::Full => "FULL",
        }
    }
}

/// What a `ram` section held, reported when its EOS and footer have been parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RamSectionSummary {
    /// START, PART or END.
    pub kind: SectionKind,
    /// The ram section's id.
    pub section_id: u32,
    /// PAGE records in this section.
    pub pages: u64,
    /// ZERO records in this section.
    pub zeros: u64,
}

/// One piece of the main channel. Writing every event in order ([`Event::write_to`]) gives the
/// input bytes back exactly; events without bytes only mark a point in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Bytes to pass through verbatim.
    Opaque(Vec<u8>),
    /// A PAGE record.
    Page(PageRecord),
    /// A ZERO record.
    Zero(ZeroRecord),
    /// The header of a `ram` section was parsed (no bytes: they were in the `Opaque` before).
    /// A `ram` END section starts when QEMU has stopped the guest.
    RamSectionStart {
        /// START, PART or END.
        kind: SectionKind,
        /// The ram section's id.
        section_id: u32,
    },
    /// A `ram` section ended with its EOS and footer (no bytes).
    RamSectionEnd(RamSectionSummary),
    /// QEMU 10's `MIG_CMD_SWITCHOVER_START` passed: the source guest is stopped (no bytes).
    SwitchoverStart,
    /// The `ram` section's END was parsed: no more RAM records in precopy; every later byte is
    /// opaque (no bytes).
    RamDone,
    /// The parser gave up understanding the stream here; every later byte is opaque (no bytes).
    /// Emitted at most once, never after [`Event::RamDone`].
    Fallback {
        /// Why.
        reason: String,
    },
}

impl Event {
    /// Appends the event's bytes (nothing for the marker events).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            Event::Opaque(b) => out.extend_from_slice(b),
            Event::Page(p) => p.write_to(out),
            Event::Zero(z) => z.write_to(out),
            Event::RamSectionStart { .. }
            | Event::RamSectionEnd(_)
            | Event::SwitchoverStart
            | Event::RamDone
            | Event::Fallback { .. } => {}
        }
    }

    /// Length of the event's bytes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Event::Opaque(b) => b.len(),
            Event::Page(p) => p.encoded_len(),
            Event::Zero(z) => z.encoded_len(),
            _ => 0,
        }
    }
}

/// The bytes of a sequence of events, in order: the rebuild of the stream they were parsed from.
pub fn rebuild<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        e.write_to(&mut out);
    }
    out
}
