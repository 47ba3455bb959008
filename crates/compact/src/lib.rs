//! Page encodings and the batch format that carries them.
//!
//! A batch is a sequence of records: `page: u64 LE`, `class: u8`, `len: u32 LE`, then `len`
//! bytes of encoded data. Every field read from a peer is checked before use: a page beyond the
//! guest's RAM, an unknown class, a length beyond a page, or data that does not decode to exactly
//! one page is an error, never a panic or a wrongly written page.

use thiserror::Error;

/// Bytes in a guest page.
pub const PAGE_SIZE: usize = 4096;
/// Bytes of a record header.
pub const RECORD_HEADER: usize = 13;
/// A batch is closed when it reaches this size.
pub const BATCH_TARGET: usize = 1024 * 1024;

/// How a page travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageClass {
    /// Reserved.
    Invalid = 0,
    /// An all-zero page: no data.
    Zero = 1,
    /// The page as it is.
    Raw = 2,
    /// LZ4 block compressed.
    Lz4 = 3,
}

impl PageClass {
    /// Every class that travels, for reports.
    pub const ALL: [PageClass; 3] = [PageClass::Zero, PageClass::Raw, PageClass::Lz4];

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Zero),
            2 => Some(Self::Raw),
            3 => Some(Self::Lz4),
            _ => None,
        }
    }

    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            PageClass::Invalid => "invalid",
            PageClass::Zero => "zero",
            PageClass::Raw => "raw",
            PageClass::Lz4 => "lz4",
        }
    }
}

/// Errors decoding a batch from the peer.
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
}

/// Whether a page is all zeroes.
pub fn is_zero(page: &[u8; PAGE_SIZE]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16-byte chunk")) == 0)
}

/// Options of the encoder.
#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    /// Try LZ4 on pages that are not zero.
    pub compress: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions { compress: true }
    }
}

/// Builds one batch.
#[derive(Debug)]
pub struct BatchEncoder {
    buf: Vec<u8>,
    scratch: Vec<u8>,
    pages: u32,
    opts: EncodeOptions,
}

impl BatchEncoder {
    /// A new, empty batch.
    pub fn new(opts: EncodeOptions) -> Self {
        BatchEncoder {
            buf: Vec::with_capacity(BATCH_TARGET + PAGE_SIZE + RECORD_HEADER),
            scratch: vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)],
            pages: 0,
            opts,
        }
    }

    fn record(&mut self, page: u64, class: PageClass, data: &[u8]) {
        self.buf.extend_from_slice(&page.to_le_bytes());
        self.buf.push(class as u8);
        let len = u32::try_from(data.len()).expect("page data is at most a page");
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(data);
        self.pages += 1;
    }

    /// Encodes `data` as page `page`; returns the class chosen and the bytes the record takes.
    pub fn push(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> (PageClass, usize) {
        let before = self.buf.len();
        let class = if is_zero(data) {
            self.record(page, PageClass::Zero, &[]);
            PageClass::Zero
        } else if self.opts.compress {
            match lz4_flex::block::compress_into(data, &mut self.scratch) {
                Ok(n) if n < PAGE_SIZE - PAGE_SIZE / 8 => {
                    let scratch = std::mem::take(&mut self.scratch);
                    self.record(page, PageClass::Lz4, &scratch[..n]);
                    self.scratch = scratch;
                    PageClass::Lz4
                }
                _ => {
                    self.record(page, PageClass::Raw, data);
                    PageClass::Raw
                }
            }
        } else {
            self.record(page, PageClass::Raw, data);
            PageClass::Raw
        };
        (class, self.buf.len() - before)
    }

    /// Pages in the batch.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// True when the batch should be sent.
    pub fn is_full(&self) -> bool {
        self.buf.len() >= BATCH_TARGET
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Takes the encoded batch, leaving the encoder empty.
    pub fn take(&mut self) -> Vec<u8> {
        self.pages = 0;
        std::mem::replace(&mut self.buf, Vec::with_capacity(BATCH_TARGET + PAGE_SIZE + RECORD_HEADER))
    }
}

/// Decodes a batch received from the peer, calling `sink(page, class, bytes, record_len)` for
/// every page in order, where `record_len` is the bytes its record took in the batch (as the
/// encoder's `push` reports it). Stops at the first invalid record; pages before it have been
/// delivered.
pub fn decode_batch<E: From<CompactError>>(
    payload: &[u8],
    total_pages: u64,
    mut sink: impl FnMut(u64, PageClass, &[u8; PAGE_SIZE], usize) -> Result<(), E>,
) -> Result<u64, E> {
    let zero = [0u8; PAGE_SIZE];
    let mut out = [0u8; PAGE_SIZE];
    let mut pos = 0usize;
    let mut count = 0u64;
    while pos < payload.len() {
        let head = payload.get(pos..pos + RECORD_HEADER).ok_or(CompactError::Truncated(pos))?;
        let page = u64::from_le_bytes(head[0..8].try_into().expect("8 bytes"));
        let class_raw = head[8];
        let len = u32::from_le_bytes(head[9..13].try_into().expect("4 bytes"));
        if page >= total_pages {
            return Err(CompactError::PageOutOfRange { page, pages: total_pages }.into());
        }
        let class = PageClass::from_u8(class_raw).ok_or(CompactError::UnknownClass(class_raw))?;
        let ulen = len as usize;
        if ulen > PAGE_SIZE {
            return Err(CompactError::BadLength { class: class.name(), len }.into());
        }
        let start = pos + RECORD_HEADER;
        let data = payload.get(start..start + ulen).ok_or(CompactError::Truncated(pos))?;
        pos = start + ulen;
        let decoded: &[u8; PAGE_SIZE] = match class {
            PageClass::Zero if ulen == 0 => &zero,
            PageClass::Raw => {
                data.try_into().map_err(|_| CompactError::BadLength { class: class.name(), len })?
            }
            PageClass::Lz4 => match lz4_flex::block::decompress_into(data, &mut out) {
                Ok(PAGE_SIZE) => &out,
                _ => return Err(CompactError::BadCompressed(page).into()),
            },
            PageClass::Zero => return Err(CompactError::BadLength { class: class.name(), len }.into()),
            PageClass::Invalid => return Err(CompactError::UnknownClass(0).into()),
        };
        sink(page, class, decoded, RECORD_HEADER + ulen)?;
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page_from(seed: u8, compressible: bool) -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        let mut x = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for (i, b) in p.iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = if compressible { u8::try_from(i % 7).unwrap() ^ seed } else { x.to_le_bytes()[0] };
        }
        p
    }

    fn decode_all(payload: &[u8], total: u64) -> Result<Vec<(u64, PageClass, Vec<u8>)>, CompactError> {
        let mut v = Vec::new();
        decode_batch::<CompactError>(payload, total, |p, c, d, _| {
            v.push((p, c, d.to_vec()));
            Ok(())
        })?;
        Ok(v)
    }

    #[test]
    fn classes_roundtrip() {
        let mut e = BatchEncoder::new(EncodeOptions::default());
        let zero = [0u8; PAGE_SIZE];
        let text = page_from(3, true);
        let random = page_from(5, false);
        let pushed = [e.push(10, &zero), e.push(11, &text), e.push(12, &random)];
        let classes: Vec<PageClass> = pushed.iter().map(|p| p.0).collect();
        assert_eq!(classes, [PageClass::Zero, PageClass::Lz4, PageClass::Raw]);
        let batch = e.take();
        // The decoder reports the same record sizes as the encoder, so both sides count alike.
        let mut lens = Vec::new();
        decode_batch::<CompactError>(&batch, 100, |_, _, _, n| {
            lens.push(n);
            Ok(())
        })
        .unwrap();
        assert_eq!(lens, pushed.iter().map(|p| p.1).collect::<Vec<_>>());
        assert_eq!(lens.iter().sum::<usize>(), batch.len());
        let got = decode_all(&batch, 100).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (10, PageClass::Zero, zero.to_vec()));
        assert_eq!(got[1], (11, PageClass::Lz4, text.to_vec()));
        assert_eq!(got[2], (12, PageClass::Raw, random.to_vec()));
        assert!(e.is_empty());
    }

    #[test]
    fn out_of_range_and_bad_class() {
        let mut e = BatchEncoder::new(EncodeOptions::default());
        e.push(99, &page_from(1, false));
        let batch = e.take();
        assert_eq!(decode_all(&batch, 99), Err(CompactError::PageOutOfRange { page: 99, pages: 99 }));
        let mut bad = batch.clone();
        bad[8] = 9;
        assert_eq!(decode_all(&bad, 100), Err(CompactError::UnknownClass(9)));
        let mut bad = batch.clone();
        bad[9..13].copy_from_slice(&5000u32.to_le_bytes());
        assert!(matches!(decode_all(&bad, 100), Err(CompactError::BadLength { .. })));
        let mut bad = batch;
        bad[9..13].copy_from_slice(&100u32.to_le_bytes());
        assert!(matches!(decode_all(&bad, 100), Err(CompactError::BadLength { .. }) | Err(CompactError::Truncated(_))));
    }

    #[test]
    fn corrupt_lz4_is_error() {
        let mut e = BatchEncoder::new(EncodeOptions::default());
        e.push(1, &page_from(3, true));
        let mut batch = e.take();
        let n = batch.len();
        batch.truncate(n - 3);
        let len = u32::try_from(n - 3 - RECORD_HEADER).unwrap();
        batch[9..13].copy_from_slice(&len.to_le_bytes());
        assert!(decode_all(&batch, 10).is_err());
    }

    proptest! {
        #[test]
        fn roundtrip_any_pages(pages in proptest::collection::vec((0u64..1000, any::<u8>(), any::<bool>(), any::<bool>()), 0..20)) {
            let mut e = BatchEncoder::new(EncodeOptions::default());
            let mut want = Vec::new();
            for (idx, seed, comp, zero) in pages {
                let p = if zero { [0u8; PAGE_SIZE] } else { page_from(seed, comp) };
                e.push(idx, &p);
                want.push((idx, p.to_vec()));
            }
            let got = decode_all(&e.take(), 1000).unwrap();
            prop_assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want.iter()) {
                prop_assert_eq!(g.0, w.0);
                prop_assert_eq!(&g.2, &w.1);
            }
        }

        #[test]
        fn arbitrary_batches_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_all(&bytes, 1 << 20);
        }
    }
}
