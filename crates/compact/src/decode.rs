//! The receiver side: decodes a batch, resolves references and deltas against what the
//! destination holds, and writes a page only once its content is whole or verified.

use crate::delta::delta_apply;
use crate::{CompactError, DiskRef, PageClass, PageKey, PAGE_SIZE, RECORD_HEADER};

/// What the decoder reads and writes on the destination.
pub trait Destination {
    /// Error of `write_page`; decoding errors convert into it.
    type Error: From<CompactError>;

    /// Reads the destination's current content of guest page `page` (below the page count).
    /// False if it cannot be read.
    fn read_page(&mut self, page: u64, out: &mut [u8; PAGE_SIZE]) -> bool;

    /// Reads the content `r` names ([`DiskRef::disk_bytes`] at sector `r.sector`, zeros after).
    /// False if there is no such image or they run past its end, or it
    /// cannot be read. The default holds no image.
    fn read_disk_block(&mut self, r: DiskRef, out: &mut [u8; PAGE_SIZE]) -> bool {
        let _ = (r, out);
        false
    }

    /// Reads page `page` of the memory snapshot. False if there is none or it cannot be read.
    /// The default holds no snapshot.
    fn read_snapshot_page(&mut self, page: u64, out: &mut [u8; PAGE_SIZE]) -> bool {
        let _ = (page, out);
        false
    }

    /// Writes guest page `page`: whole data received, or a reference or delta whose content
    /// matched its fingerprint. `record_len` is the bytes its record took in the batch.
    fn write_page(
        &mut self,
        page: u64,
        class: PageClass,
        data: &[u8; PAGE_SIZE],
        record_len: usize,
    ) -> Result<(), Self::Error>;

    /// A `dup` of page `page` from page `src` (below the page count) with keyed fingerprint
    /// `fp`: true if the destination resolves it later (a destination that applies the batches
    /// of a pass in any order resolves them once the pass is applied, since the source may be
    /// written by another batch of the same pass), false to resolve it now. The default: now.
    fn defer_dup(&mut self, page: u64, src: u64, fp: u128, record_len: usize) -> bool {
        let _ = (page, src, fp, record_len);
        false
    }
}

/// Why a reference or delta was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissReason {
    /// The source could not be read (no such image or snapshot, out of range, read error).
    Unresolved,
    /// The source was read but the result does not match the (keyed) fingerprint.
    Mismatch,
}

/// A page not written: the sender must send it again whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Miss {
    /// Guest page.
    pub page: u64,
    /// Class it came as.
    pub class: PageClass,
    /// Why.
    pub reason: MissReason,
    /// Bytes its record took.
    pub record_len: usize,
}

/// Result of a decoded batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecodeSummary {
    /// Pages written.
    pub pages_written: u64,
    /// Pages not written, in batch order.
    pub misses: Vec<Miss>,
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

fn le_u128(b: &[u8]) -> u128 {
    u128::from_le_bytes(b[..16].try_into().expect("16 bytes"))
}

fn valid_len(class: PageClass, len: usize) -> bool {
    match class {
        PageClass::Zero => len == 0,
        PageClass::Raw => len == PAGE_SIZE,
        PageClass::Lz4 | PageClass::Zstd => (1..=PAGE_SIZE).contains(&len),
        PageClass::Dup | PageClass::SnapshotRef => len == 24,
        PageClass::DiskRef => len == 26,
        PageClass::Delta => (16..=PAGE_SIZE).contains(&len),
        PageClass::Invalid => false,
    }
}

/// Decodes a batch received from the peer for a guest of `total_pages` pages, in order.
///
/// Whole pages (zero, raw, compressed) are written when they decode to exactly one page.
/// The runs of consecutive guest pages a batch writes with data (every class but `zero`), in
/// record order, as page ranges: what a destination may map for writing ahead of
/// [`decode_batch`]. Stops quietly at a malformed record (the decoder reports it).
pub fn data_runs(payload: &[u8]) -> Vec<std::ops::Range<u64>> {
    let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
    let mut pos = 0usize;
    while let Some(head) = payload.get(pos..pos + RECORD_HEADER) {
        let page = le_u64(head);
        let len = u32::from_le_bytes(head[9..13].try_into().expect("4 bytes"));
        let Some(next) = usize::try_from(len).ok().and_then(|l| (pos + RECORD_HEADER).checked_add(l)) else { break };
        pos = next;
        if head[8] == PageClass::Zero as u8 {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.end == page => r.end += 1,
            _ => runs.push(page..page.saturating_add(1)),
        }
    }
    runs
}

/// References and deltas are resolved through `dest` and written only when the content's
/// fingerprint keyed with `key` (the migration's key, as the sender's encoder used) equals the
/// fingerprint they carry; otherwise they are returned as misses and nothing is written.
/// A malformed record (truncated, unknown class, bad length, page out of range, bad compressed
/// data, malformed delta) stops decoding with an error; records before it have been applied.
pub fn decode_batch<D: Destination>(
    payload: &[u8],
    total_pages: u64,
    key: &PageKey,
    dest: &mut D,
) -> Result<DecodeSummary, D::Error> {
    let mut out = [0u8; PAGE_SIZE];
    let mut summary = DecodeSummary::default();
    let mut zstd: Option<zstd::bulk::Decompressor<'static>> = None;
    let mut pos = 0usize;
    while pos < payload.len() {
        let head = payload.get(pos..pos + RECORD_HEADER).ok_or(CompactError::Truncated(pos))?;
        let page = le_u64(head);
        let class_raw = head[8];
        let len = u32::from_le_bytes(head[9..13].try_into().expect("4 bytes"));
        if page >= total_pages {
            return Err(CompactError::PageOutOfRange { page, pages: total_pages }.into());
        }
        let class = PageClass::from_u8(class_raw).ok_or(CompactError::UnknownClass(class_raw))?;
        let ulen = usize::try_from(len).unwrap_or(usize::MAX);
        if !valid_len(class, ulen) {
            return Err(CompactError::BadLength { class: class.name(), len }.into());
        }
        let start = pos + RECORD_HEADER;
        let data = payload.get(start..start + ulen).ok_or(CompactError::Truncated(pos))?;
        pos = start + ulen;
        let record_len = RECORD_HEADER + ulen;

        // Some(fingerprint) for classes that must be verified; `ok` false when unresolved.
        let (expect, ok) = match class {
            PageClass::Zero => {
                out = [0u8; PAGE_SIZE];
                (None, true)
            }
            PageClass::Raw => {
                // Written straight from the batch: one copy of the page fewer.
                let raw: &[u8; PAGE_SIZE] = data.try_into().map_err(|_| CompactError::BadLength { class: class.name(), len })?;
                dest.write_page(page, class, raw, record_len)?;
                summary.pages_written += 1;
                continue;
            }
            PageClass::Lz4 => match lz4_flex::block::decompress_into(data, &mut out) {
                Ok(PAGE_SIZE) => (None, true),
                _ => return Err(CompactError::BadCompressed(page).into()),
            },
            PageClass::Zstd => {
                if zstd.is_none() {
                    let mut d = zstd::bulk::Decompressor::new().map_err(|_| CompactError::BadCompressed(page))?;
                    d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(16))
                        .map_err(|_| CompactError::BadCompressed(page))?;
                    zstd = Some(d);
                }
                let d = zstd.as_mut().expect("created above");
                match d.decompress_to_buffer(data, &mut out[..]) {
                    Ok(PAGE_SIZE) => (None, true),
                    _ => return Err(CompactError::BadCompressed(page).into()),
                }
            }
            PageClass::Dup => {
                let src = le_u64(data);
                let fp = le_u128(&data[8..]);
                if src < total_pages && dest.defer_dup(page, src, fp, record_len) {
                    continue;
                }
                let ok = src < total_pages && dest.read_page(src, &mut out);
                (Some(fp), ok)
            }
            PageClass::DiskRef => {
                let r = DiskRef::from_wire(u16::from_le_bytes([data[0], data[1]]), le_u64(&data[2..]));
                (Some(le_u128(&data[10..])), dest.read_disk_block(r, &mut out))
            }
            PageClass::SnapshotRef => {
                let q = le_u64(data);
                (Some(le_u128(&data[8..])), dest.read_snapshot_page(q, &mut out))
            }
            PageClass::Delta => {
                let ok = dest.read_page(page, &mut out);
                if !ok {
                    out = [0u8; PAGE_SIZE];
                }
                // Malformed runs are an error whether or not the base could be read.
                if !delta_apply(&mut out, &data[16..]) {
                    return Err(CompactError::BadDelta(page).into());
                }
                (Some(le_u128(data)), ok)
            }
            PageClass::Invalid => return Err(CompactError::UnknownClass(0).into()),
        };
        let reason = match expect {
            Some(_) if !ok => Some(MissReason::Unresolved),
            Some(fp) if key.fingerprint(&out) != fp => Some(MissReason::Mismatch),
            _ => None,
        };
        match reason {
            Some(reason) => summary.misses.push(Miss { page, class, reason, record_len }),
            None => {
                dest.write_page(page, class, &out, record_len)?;
                summary.pages_written += 1;
            }
        }
    }
    Ok(summary)
}
