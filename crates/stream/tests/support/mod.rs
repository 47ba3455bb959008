//! Test support: a writer of QEMU migration streams (independent of the crate's writer) and
//! helpers to feed a parser in chunks.
#![allow(dead_code)]

use livemig_stream::{Event, Parser, ReturnPathParser, RpEvent, PAGE_SIZE};

/// Writes the bytes of a migration stream item by item, as QEMU's `savevm.c` / `ram.c` do.
#[derive(Debug, Default, Clone)]
pub struct W(pub Vec<u8>);

impl W {
    pub fn new() -> Self {
        Self(Vec::new())
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn be16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn be32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn be64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// u8 length + bytes.
    pub fn name(&mut self, b: &[u8]) -> &mut Self {
        self.u8(u8::try_from(b.len()).expect("short name")).raw(b)
    }
    pub fn header(&mut self) -> &mut Self {
        self.be32(0x5145_564d).be32(3)
    }
    pub fn config(&mut self, machine: &[u8]) -> &mut Self {
        self.u8(0x07).be32(u32::try_from(machine.len()).expect("len")).raw(machine)
    }
    pub fn sub_page_bits(&mut self, bits: u32) -> &mut Self {
        self.u8(0x05).name(b"configuration/target-page-bits").be32(1).be32(bits)
    }
    pub fn sub_caps(&mut self, caps: &[&str]) -> &mut Self {
        self.u8(0x05).name(b"configuration/capabilities").be32(1);
        self.be32(u32::try_from(caps.len()).expect("count"));
        for c in caps {
            self.name(c.as_bytes());
        }
        self
    }
    pub fn sub_uuid(&mut self, uuid: [u8; 16]) -> &mut Self {
        self.u8(0x05).name(b"configuration/uuid").be32(1).raw(&uuid)
    }
    pub fn cmd(&mut self, cmd: u16, payload: &[u8]) -> &mut Self {
        self.u8(0x08).be16(cmd).be16(u16::try_from(payload.len()).expect("len")).raw(payload)
    }
    pub fn open_return_path(&mut self) -> &mut Self {
        self.cmd(1, &[])
    }
    pub fn ping(&mut self, v: u32) -> &mut Self {
        self.cmd(2, &v.to_be_bytes())
    }
    pub fn switchover_start(&mut self) -> &mut Self {
        self.cmd(11, &[])
    }
    /// START (1) or FULL (4) header.
    pub fn section_full_header(&mut self, ty: u8, id: u32, idstr: &[u8], instance: u32, version: u32) -> &mut Self {
        self.u8(ty).be32(id).name(idstr).be32(instance).be32(version)
    }
    pub fn ram_start(&mut self, id: u32) -> &mut Self {
        self.section_full_header(0x01, id, b"ram", 0, 4)
    }
    pub fn part(&mut self, id: u32) -> &mut Self {
        self.u8(0x02).be32(id)
    }
    pub fn end(&mut self, id: u32) -> &mut Self {
        self.u8(0x03).be32(id)
    }
    pub fn footer(&mut self, id: u32) -> &mut Self {
        self.u8(0x7e).be32(id)
    }
    pub fn eos(&mut self) -> &mut Self {
        self.be64(0x10)
    }
    /// MEM_SIZE record and its block list: (name, used_length, addr written with x-ignore-shared).
    pub fn mem_size(&mut self, blocks: &[(&[u8], u64, Option<u64>)]) -> &mut Self {
        let total: u64 = blocks.iter().map(|b| b.1).sum();
        self.be64(total | 0x04);
        for (name, len, addr) in blocks {
            self.name(name).be64(*len);
            if let Some(a) = addr {
                self.be64(*a);
            }
        }
        self
    }
    /// A record header: the name is written unless `block` is None (CONTINUE).
    pub fn rec(&mut self, offset: u64, flag: u64, block: Option<&[u8]>) -> &mut Self {
        let cont = if block.is_none() { 0x20 } else { 0 };
        self.be64(offset | flag | cont);
        if let Some(b) = block {
            self.name(b);
        }
        self
    }
    pub fn page(&mut self, offset: u64, block: Option<&[u8]>, data: &[u8; PAGE_SIZE]) -> &mut Self {
        self.rec(offset, 0x08, block).raw(data)
    }
    pub fn zero(&mut self, offset: u64, block: Option<&[u8]>, fill: u8) -> &mut Self {
        self.rec(offset, 0x02, block).u8(fill)
    }
    pub fn eof(&mut self) -> &mut Self {
        self.u8(0x00)
    }
    pub fn vmdesc(&mut self, json: &[u8]) -> &mut Self {
        self.u8(0x06).be32(u32::try_from(json.len()).expect("len")).raw(json)
    }
    pub fn bytes(&self) -> Vec<u8> {
        self.0.clone()
    }
}

/// A page of deterministic content.
pub fn page_data(seed: u64) -> Box<[u8; PAGE_SIZE]> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in p.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    p
}

/// Feeds `data` in chunks of the given sizes (cycled; 0 is read as 1). Returns the events
/// before `finish`, the events of `finish`, and its result.
pub fn feed_chunked(
    p: &mut Parser,
    data: &[u8],
    sizes: &[usize],
) -> (Vec<Event>, Vec<Event>, Result<(), livemig_stream::StreamError>) {
    let mut ev = Vec::new();
    let mut i = 0;
    let mut k = 0;
    while i < data.len() {
        let n = sizes.get(k % sizes.len().max(1)).copied().unwrap_or(1).max(1).min(data.len() - i);
        p.feed(&data[i..i + n], &mut |e| ev.push(e));
        i += n;
        k += 1;
    }
    let mut fin = Vec::new();
    let r = p.finish(&mut |e| fin.push(e));
    (ev, fin, r)
}

/// Parses all of `data` in one feed.
pub fn parse_all(data: &[u8]) -> (Parser, Vec<Event>, Result<(), livemig_stream::StreamError>) {
    let mut p = Parser::new();
    let mut ev = p.feed_vec(data);
    let r = p.finish(&mut |e| ev.push(e));
    (p, ev, r)
}

/// Adjacent opaque events merged, so event lists of different chunkings compare equal.
pub fn normalize(events: &[Event]) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::new();
    for e in events {
        if let Event::Opaque(b) = e {
            if b.is_empty() {
                continue;
            }
            if let Some(Event::Opaque(prev)) = out.last_mut() {
                prev.extend_from_slice(b);
                continue;
            }
        }
        out.push(e.clone());
    }
    out
}

pub fn fallbacks(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Fallback { reason } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

pub fn rp_feed_chunked(p: &mut ReturnPathParser, data: &[u8], sizes: &[usize]) -> Vec<RpEvent> {
    let mut ev = Vec::new();
    let mut i = 0;
    let mut k = 0;
    while i < data.len() {
        let n = sizes.get(k % sizes.len().max(1)).copied().unwrap_or(1).max(1).min(data.len() - i);
        p.feed(&data[i..i + n], &mut |e| ev.push(e));
        i += n;
        k += 1;
    }
    ev
}

pub fn rp_rebuild(events: &[RpEvent]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        e.write_to(&mut out);
    }
    out
}
