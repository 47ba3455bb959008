//! The stream engine's frame payload (livemig-wire's `FrameKind::Stream`): a chunk of QEMU's
//! migration stream in order, its opaque spans verbatim and each PAGE record as the record's
//! header bytes (exactly as QEMU wrote them) plus one `livemig-compact` record of its data; or
//! one page sent whole again after a miss.
//!
//! ```text
//! chunk:  u8 1, u64 seq, u32 items, then per item:
//!           u8 1 (opaque), u32 len (>= 1), len bytes
//!           u8 2 (page),   u16 header len (8..=264), header bytes, u32 record len, record bytes
//! resend: u8 2, u64 seq, u32 item, 4096 bytes
//! ```
//! All integers little-endian. Lengths are checked against what is left of the payload before
//! anything is allocated; unknown kinds and tags are rejected (0 is reserved).

use crate::PAGE_SIZE;

/// Longest PAGE record header: be64 word, u8 length, a 255-byte block name.
pub const MAX_HEADER: usize = 8 + 1 + 255;

const KIND_CHUNK: u8 = 1;
const KIND_RESEND: u8 = 2;
const TAG_OPAQUE: u8 = 1;
const TAG_PAGE: u8 = 2;

/// One item of a chunk, borrowed from the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item<'a> {
    /// Bytes to pass through verbatim.
    Opaque(&'a [u8]),
    /// A PAGE record: its header bytes and the compact record of its data.
    Page {
        /// The record header as QEMU wrote it.
        header: &'a [u8],
        /// One `livemig-compact` record (page index, class, data).
        record: &'a [u8],
    },
}

/// A decoded Stream frame payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload<'a> {
    /// A chunk of the stream.
    Chunk {
        /// Sequence number (0, 1, ...).
        seq: u64,
        /// Items in stream order.
        items: Vec<Item<'a>>,
    },
    /// A page of chunk `seq`, item `item`, sent whole after a miss.
    Resend {
        /// Chunk.
        seq: u64,
        /// Item index.
        item: u32,
        /// The page.
        data: &'a [u8; PAGE_SIZE],
    },
}

/// A malformed Stream frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed stream frame: {0}")]
pub struct ChunkError(pub String);

/// Builds a chunk payload.
#[derive(Debug, Default)]
pub struct ChunkBuilder {
    buf: Vec<u8>,
    items: u32,
    /// Raw stream bytes the chunk stands for.
    raw: u64,
}

impl ChunkBuilder {
    /// An empty chunk numbered `seq`.
    pub fn new(seq: u64) -> Self {
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.push(KIND_CHUNK);
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        ChunkBuilder { buf, items: 0, raw: 0 }
    }

    /// Appends opaque bytes as an item of their own; none adds no item (the parser refuses an
    /// empty span, so every payload has one encoding).
    pub fn opaque(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.raw += bytes.len() as u64;
        self.items += 1;
        self.buf.push(TAG_OPAQUE);
        self.buf.extend_from_slice(&u32::try_from(bytes.len()).expect("opaque span below 4 GiB").to_le_bytes());
        self.buf.extend_from_slice(bytes);
    }

    /// Appends a page record; returns its item index.
    ///
    /// # Panics
    /// If `header` is longer than [`MAX_HEADER`] or shorter than 8 bytes.
    pub fn page(&mut self, header: &[u8], record: &[u8]) -> u32 {
        assert!((8..=MAX_HEADER).contains(&header.len()), "record header of {} bytes", header.len());
        self.raw += (header.len() + PAGE_SIZE) as u64;
        let index = self.items;
        self.items += 1;
        self.buf.push(TAG_PAGE);
        self.buf.extend_from_slice(&u16::try_from(header.len()).expect("checked above").to_le_bytes());
        self.buf.extend_from_slice(header);
        self.buf.extend_from_slice(&u32::try_from(record.len()).expect("record below 4 GiB").to_le_bytes());
        self.buf.extend_from_slice(record);
        index
    }

    /// Items so far.
    pub fn items(&self) -> u32 {
        self.items
    }

    /// Bytes of QEMU's stream the chunk stands for so far.
    pub fn raw_bytes(&self) -> u64 {
        self.raw
    }

    /// Bytes of the payload so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when the chunk has no item.
    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    /// The payload.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf[9..13].copy_from_slice(&self.items.to_le_bytes());
        self.buf
    }
}

/// The payload of a resend.
pub fn resend_payload(seq: u64, item: u32, data: &[u8; PAGE_SIZE]) -> Vec<u8> {
    let mut v = Vec::with_capacity(13 + PAGE_SIZE);
    v.push(KIND_RESEND);
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&item.to_le_bytes());
    v.extend_from_slice(data);
    v
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ChunkError> {
        if self.b.len() - self.at < n {
            return Err(ChunkError(format!("{what} of {n} bytes at byte {} runs past the end ({} bytes)", self.at, self.b.len())));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, ChunkError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, ChunkError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self, what: &str) -> Result<u32, ChunkError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64, ChunkError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
}

/// The sequence number of a chunk payload, read from its first 9 bytes without parsing its
/// items (for a receiver that puts chunks from several connections back in order; [`parse`]
/// checks the rest later). `None` for a resend, or a payload that is no chunk.
pub fn chunk_seq(payload: &[u8]) -> Option<u64> {
    match payload {
        [KIND_CHUNK, rest @ ..] => rest.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))),
        _ => None,
    }
}

/// Parses a Stream frame payload.
pub fn parse(payload: &[u8]) -> Result<Payload<'_>, ChunkError> {
    let mut c = Cursor { b: payload, at: 0 };
    match c.u8("kind")? {
        KIND_CHUNK => {
            let seq = c.u64("sequence number")?;
            let n = c.u32("item count")?;
            // Every item takes at least 5 bytes: cap before allocating.
            let left = payload.len() - c.at;
            if n as usize > left / 5 {
                return Err(ChunkError(format!("{n} items cannot fit in {left} bytes")));
            }
            let mut items = Vec::with_capacity(n as usize);
            for _ in 0..n {
                match c.u8("item tag")? {
                    TAG_OPAQUE => {
                        let len = c.u32("opaque length")? as usize;
                        if len == 0 {
                            return Err(ChunkError("an empty opaque span".into()));
                        }
                        items.push(Item::Opaque(c.take(len, "opaque span")?));
                    }
                    TAG_PAGE => {
                        let hlen = usize::from(c.u16("header length")?);
                        if !(8..=MAX_HEADER).contains(&hlen) {
                            return Err(ChunkError(format!("page record header of {hlen} bytes")));
                        }
                        let header = c.take(hlen, "page record header")?;
                        let rlen = c.u32("compact record length")? as usize;
                        let record = c.take(rlen, "compact record")?;
                        items.push(Item::Page { header, record });
                    }
                    t => return Err(ChunkError(format!("unknown item tag {t}"))),
                }
            }
            if c.at != payload.len() {
                return Err(ChunkError(format!("{} bytes after the last item", payload.len() - c.at)));
            }
            Ok(Payload::Chunk { seq, items })
        }
        KIND_RESEND => {
            let seq = c.u64("sequence number")?;
            let item = c.u32("item index")?;
            let data: &[u8; PAGE_SIZE] = c.take(PAGE_SIZE, "page")?.try_into().expect("a page");
            if c.at != payload.len() {
                return Err(ChunkError("bytes after the resent page".into()));
            }
            Ok(Payload::Resend { seq, item, data })
        }
        k => Err(ChunkError(format!("unknown kind {k}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Model {
        Opaque(Vec<u8>),
        Page(Vec<u8>, Vec<u8>),
    }

    fn model() -> impl Strategy<Value = Model> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 1..300).prop_map(Model::Opaque),
            (proptest::collection::vec(any::<u8>(), 8..=MAX_HEADER), proptest::collection::vec(any::<u8>(), 0..200))
                .prop_map(|(h, r)| Model::Page(h, r)),
        ]
    }

    proptest! {
        #[test]
        fn chunks_roundtrip(seq in any::<u64>(), items in proptest::collection::vec(model(), 0..40)) {
            let mut b = ChunkBuilder::new(seq);
            for it in &items {
                match it {
                    Model::Opaque(o) => b.opaque(o),
                    Model::Page(h, r) => { b.page(h, r); }
                }
            }
            let payload = b.finish();
            let Payload::Chunk { seq: s, items: got } = parse(&payload).unwrap() else { panic!("not a chunk") };
            prop_assert_eq!(s, seq);
            prop_assert_eq!(chunk_seq(&payload), Some(seq));
            prop_assert_eq!(got.len(), items.len());
            for (g, m) in got.iter().zip(&items) {
                match (g, m) {
                    (Item::Opaque(a), Model::Opaque(b)) => prop_assert_eq!(*a, &b[..]),
                    (Item::Page { header, record }, Model::Page(h, r)) => {
                        prop_assert_eq!(*header, &h[..]);
                        prop_assert_eq!(*record, &r[..]);
                    }
                    _ => prop_assert!(false, "item kind differs"),
                }
            }
            // Every truncation is an error, never a panic.
            for cut in 0..payload.len() {
                prop_assert!(parse(&payload[..cut]).is_err());
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&bytes);
        }
    }

    #[test]
    fn resend_roundtrip_and_rejections() {
        let page = [9u8; PAGE_SIZE];
        let p = resend_payload(5, 7, &page);
        assert_eq!(chunk_seq(&p), None, "a resend has no place in the order");
        assert_eq!(chunk_seq(&[KIND_CHUNK, 1, 2]), None, "too short to be a chunk");
        assert_eq!(parse(&p).unwrap(), Payload::Resend { seq: 5, item: 7, data: &page });
        assert!(parse(&p[..p.len() - 1]).is_err());
        assert!(parse(&[0]).is_err(), "kind 0 is reserved");
        assert!(parse(&[3]).is_err());
        // An item count the payload cannot hold is refused before allocating.
        let mut huge = vec![KIND_CHUNK];
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&huge).unwrap_err().0.contains("cannot fit"));
        // An empty opaque span: the builder never writes one (found by the stream_chunk fuzzer).
        let mut empty = vec![KIND_CHUNK];
        empty.extend_from_slice(&0u64.to_le_bytes());
        empty.extend_from_slice(&1u32.to_le_bytes());
        empty.extend_from_slice(&[TAG_OPAQUE, 0, 0, 0, 0]);
        assert!(parse(&empty).unwrap_err().0.contains("empty opaque span"));
    }
}
