//! The source half of the relay, independent of QMP: reads QEMU's migration stream from the
//! socket QEMU writes into, parses it (`livemig-stream`), encodes every PAGE record against what
//! the receiver holds (`livemig-compact`, mirrored cache) and queues Stream frames in order;
//! everything else passes verbatim. A window of unacknowledged chunks bounds what the relay
//! holds (so QEMU sees about the link's rate) and keeps their pages for resends.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use livemig_compact::{ClassStats, DiskLookup, EncodeOptions, Encoder, PageKey, SnapshotLookup, PAGE_SIZE};
use livemig_stream::{BlockName, Event, Parser};
use livemig_wire::{FrameKind, Message};
use xxhash_rust::xxh3::Xxh3;

use super::chunk::ChunkBuilder;
use super::keep::KeepFeed;
use crate::autocomp::StreamAuto;
use crate::error::AgentError;
use crate::link::Out;

/// Raw stream bytes a chunk holds before it is sent.
pub const CHUNK_TARGET: u64 = 512 * 1024;
/// Raw stream bytes the relay lets be unacknowledged by the receiver.
pub const DEFAULT_WINDOW: u64 = 8 << 20;

type Pages = Vec<(u32, Box<[u8; PAGE_SIZE]>)>;

#[derive(Debug, Default)]
struct WinInner {
    chunks: VecDeque<(u64, u64, Pages)>,
    raw: u64,
    acked_raw: u64,
    acked_at: Vec<(Instant, u64)>,
    closed: bool,
    /// Since when the oldest unacknowledged chunk waits for progress (its insertion, or the last
    /// acknowledgement after it); `None` when nothing is unacknowledged.
    waiting_since: Option<Instant>,
}

/// Unacknowledged chunks: their raw size and their pages (for resends).
#[derive(Debug)]
pub struct Window {
    inner: Mutex<WinInner>,
    cv: Condvar,
    limit: u64,
}

impl Window {
    /// A window of `limit` raw bytes.
    pub fn new(limit: u64) -> Window {
        Window { inner: Mutex::new(WinInner::default()), cv: Condvar::new(), limit }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WinInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `raw` more bytes fit (or the window is empty, or closed).
    fn wait_room(&self, raw: u64) {
        let mut g = self.lock();
        while !g.closed && !g.chunks.is_empty() && g.raw + raw > self.limit {
            g = self.cv.wait_timeout(g, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn insert(&self, seq: u64, raw: u64, pages: Pages) {
        let mut g = self.lock();
        g.raw += raw;
        g.chunks.push_back((seq, raw, pages));
        if g.waiting_since.is_none() {
            g.waiting_since = Some(Instant::now());
        }
    }

    /// The receiver wrote every chunk up to `seq` into the destination QEMU.
    pub fn ack(&self, seq: u64) {
        let mut g = self.lock();
        while g.chunks.front().is_some_and(|c| c.0 <= seq) {
            let (_, raw, _) = g.chunks.pop_front().expect("front exists");
            g.raw -= raw;
            g.acked_raw += raw;
        }
        let total = g.acked_raw;
        g.waiting_since = (!g.chunks.is_empty()).then(Instant::now);
        g.acked_at.push((Instant::now(), total));
        if g.acked_at.len() > 4096 {
            g.acked_at.drain(..2048);
        }
        self.cv.notify_all();
    }

    /// The page of item `item` of chunk `seq`, if that chunk is still unacknowledged.
    pub fn page(&self, seq: u64, item: u32) -> Option<Box<[u8; PAGE_SIZE]>> {
        let g = self.lock();
        let c = g.chunks.iter().find(|c| c.0 == seq)?;
        c.2.iter().find(|(i, _)| *i == item).map(|(_, p)| p.clone())
    }

    /// How long unacknowledged chunks have waited with no acknowledgement at all (zero when
    /// none waits).
    pub fn stalled_for(&self) -> Duration {
        self.lock().waiting_since.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// An error once chunks have waited `timeout` with no acknowledgement: the link or the
    /// receiver stalled (a silent link fills no socket buffer the window does not fit in, so
    /// no write ever times out).
    pub fn check_progress(&self, timeout: Duration) -> Result<(), crate::error::AgentError> {
        if self.stalled_for() > timeout {
            return Err(crate::error::AgentError::Wire(livemig_wire::WireError::TimedOut {
                what: "waiting for the receiver to acknowledge QEMU's stream",
            }));
        }
        Ok(())
    }

    /// Raw bytes unacknowledged, and the window's limit.
    pub fn fill(&self) -> (u64, u64) {
        (self.lock().raw, self.limit)
    }

    /// Raw bytes the receiver acknowledged in total.
    pub fn acked_bytes(&self) -> u64 {
        self.lock().acked_raw
    }

    /// Raw stream bytes acknowledged per second over the last `span`: what the whole relay
    /// (compaction, link, receiver, destination QEMU) drains of QEMU's stream.
    pub fn drain_rate(&self, span: Duration) -> Option<f64> {
        let g = self.lock();
        let (t1, b1) = *g.acked_at.last()?;
        let (t0, b0) = *g.acked_at.iter().find(|(t, _)| t1.duration_since(*t) <= span)?;
        let dt = t1.duration_since(t0).as_secs_f64();
        (dt > 0.05).then(|| (b1 - b0) as f64 / dt)
    }

    /// Unblocks the reader for good (the migration failed).
    pub fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }
}

/// What the source relay has seen, for the controller and the report.
#[derive(Debug, Clone, Default)]
pub struct RelayStats {
    /// Bytes read from QEMU.
    pub raw_bytes: u64,
    /// PAGE records encoded.
    pub pages: u64,
    /// ZERO records (passed verbatim: they are already 9-30 bytes).
    pub zero_records: u64,
    /// PAGE records passed verbatim (after a fallback, or not mappable to a block).
    pub verbatim_pages: u64,
    /// `ram` sections ended (START, PART, END).
    pub ram_sections: u64,
    /// The parser gave up here, and why (the rest went verbatim).
    pub fallback: Option<String>,
    /// The RAM was done (the source guest is stopped from the `ram` END on).
    pub ram_done: bool,
    /// When the source QEMU started its completion (END section or SWITCHOVER_START).
    pub completion_started: Option<Instant>,
    /// Per-class counts of the encoded pages.
    pub classes: ClassStats,
    /// Slots of the mirrored cache, once known.
    pub cache_pages: u64,
    /// The stream ended (EOF from QEMU).
    pub ended: bool,
    /// Bytes of the stream up to the checkpoint (the RAM done, or the fallback).
    pub checkpoint_bytes: Option<u64>,
    /// Bytes of guest RAM (the blocks QEMU listed).
    pub ram_bytes: u64,
    /// The stream digest at the checkpoint (what the receiver checked).
    pub checkpoint_digest: Option<u128>,
    /// The compressor of whole pages: what was chosen, when and why.
    pub compressor: Option<crate::autocomp::CompressorReport>,
}

/// The configuration of the source relay.
#[derive(Clone)]
pub struct SourceConfig {
    /// Encoder options (delta cache); `refs_need_cache` is forced on, the compressor is
    /// `compressor`'s.
    pub encode: EncodeOptions,
    /// The compressor of whole pages: chosen by the link, or forced.
    pub compressor: crate::autocomp::CompressorMode,
    /// Disk images both hosts hold.
    pub disks: Option<Arc<dyn DiskLookup>>,
    /// The migration's page key: the records' fingerprints and the stream digest.
    pub key: PageKey,
    /// The memory snapshot both hosts hold, for `snapshot_ref`s.
    pub snapshot: Option<Arc<dyn SnapshotLookup>>,
    /// The snapshot being kept of this migration: fed QEMU's stream up to the checkpoint.
    pub keep: Option<KeepFeed>,
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("encode", &self.encode)
            .field("disks", &self.disks.is_some())
            .field("snapshot", &self.snapshot.is_some())
            .field("keep", &self.keep.is_some())
            .finish()
    }
}

/// Reads QEMU's stream from `qemu` until EOF and queues it on `out`. Returns the stream's
/// length. Stops with an error when `out` is closed (the connection failed).
pub fn relay_source(
    mut qemu: UnixStream,
    out: crossbeam_channel::Sender<Out>,
    window: Arc<Window>,
    stats: Arc<Mutex<RelayStats>>,
    cfg: SourceConfig,
) -> Result<u64, AgentError> {
    // The relay encodes on this one thread.
    let mut auto = StreamAuto::new(cfg.compressor, 1);
    stats.lock().unwrap_or_else(|e| e.into_inner()).compressor = Some(auto.auto.report());
    let mut st = State {
        auto,
        parser: Parser::new(),
        enc: None,
        bases: HashMap::new(),
        chunk: ChunkBuilder::new(0),
        pages: Vec::new(),
        seq: 0,
        hasher: cfg.key.stream_hasher(),
        hashed: 0,
        checkpointed: false,
        out,
        window,
        stats,
        cfg,
        scratch: Vec::with_capacity(PAGE_SIZE + 300),
    };
    let mut buf = vec![0u8; 256 * 1024];
    let mut events = Vec::new();
    let io = |source| AgentError::Network { what: "cannot read the source QEMU's migration stream".into(), source };
    let mut total = 0u64;
    loop {
        let n = match qemu.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        if n == 0 {
            break;
        }
        total += n as u64;
        if let Some(k) = st.cfg.keep.as_ref().filter(|_| !st.checkpointed) {
            k.feed(&buf[..n]);
        }
        st.parser.feed(&buf[..n], &mut |e| events.push(e));
        for e in events.drain(..) {
            st.event(e)?;
        }
        st.stats().raw_bytes = total;
        // Once the RAM is done (or passes verbatim) QEMU waits for the destination's answer on
        // the return path: everything read must go at once, or both sides wait forever. Before,
        // a chunk goes when full, or when QEMU has nothing more for now.
        if st.checkpointed || st.chunk.raw_bytes() >= CHUNK_TARGET || n < buf.len() {
            st.flush()?;
        }
    }
    let finished = st.parser.finish(&mut |e| events.push(e));
    for e in events.drain(..) {
        st.event(e)?;
    }
    st.flush()?;
    if let Err(e) = finished {
        return Err(AgentError::Incompatible(format!("the source QEMU's migration stream ended in the middle: {e}")));
    }
    if let Some(enc) = &st.enc {
        st.stats().classes = *enc.stats();
    }
    st.stats().compressor = Some(st.auto.auto.report());
    st.stats().ended = true;
    st.send(Out::Message(Message::StreamEnd { bytes: total }))?;
    Ok(total)
}

struct State {
    auto: StreamAuto,
    parser: Parser,
    enc: Option<Encoder>,
    bases: HashMap<BlockName, (u64, u64)>,
    chunk: ChunkBuilder,
    pages: Pages,
    seq: u64,
    hasher: Xxh3,
    hashed: u64,
    checkpointed: bool,
    out: crossbeam_channel::Sender<Out>,
    window: Arc<Window>,
    stats: Arc<Mutex<RelayStats>>,
    cfg: SourceConfig,
    scratch: Vec<u8>,
}

impl State {
    fn stats(&self) -> std::sync::MutexGuard<'_, RelayStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, o: Out) -> Result<(), AgentError> {
        self.out.send(o).map_err(|_| AgentError::Wire(livemig_wire::WireError::Closed))
    }

    fn hash(&mut self, b: &[u8]) {
        if !self.checkpointed {
            self.hasher.update(b);
            self.hashed += b.len() as u64;
        }
    }

    fn flush(&mut self) -> Result<(), AgentError> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.chunk, ChunkBuilder::new(self.seq + 1));
        let raw = chunk.raw_bytes();
        self.window.wait_room(raw);
        if let Some(enc) = self.enc.as_mut() {
            let pages = self.pages.iter().map(|(_, p)| &**p);
            let queue = (self.out.len(), self.out.capacity());
            if let Some(r) = self.auto.after_chunk(pages, (raw, chunk.len() as u64), &self.window, queue, self.seq, enc) {
                self.stats.lock().unwrap_or_else(|e| e.into_inner()).compressor = Some(r);
            }
        }
        self.window.insert(self.seq, raw, std::mem::take(&mut self.pages));
        self.seq += 1;
        if let Some(enc) = &self.enc {
            self.stats.lock().unwrap_or_else(|e| e.into_inner()).classes = *enc.stats();
        }
        self.send(Out::Frame(FrameKind::Stream, chunk.finish()))
    }

    /// Builds the encoder once the block list is known and tells the receiver.
    fn encoder(&mut self) -> Result<(), AgentError> {
        if self.enc.is_some() || self.parser.blocks().is_empty() {
            return Ok(());
        }
        let (bases, total) = super::keep::numbering(&self.parser);
        self.bases = bases;
        let blocks: Vec<(String, u64)> = self.parser.blocks().iter().map(|b| (b.name.to_string_lossy(), b.used_length)).collect();
        let compressor = self.auto.auto.current();
        let mut enc = Encoder::new(total, EncodeOptions { refs_need_cache: true, compressor, ..self.cfg.encode }, self.cfg.key.clone());
        if let Some(d) = &self.cfg.disks {
            enc.set_disk_lookup(Arc::clone(d));
        }
        if let Some(s) = &self.cfg.snapshot {
            enc.set_snapshot_lookup(Arc::clone(s));
        }
        let cache_pages = enc.cache_slots();
        self.stats().cache_pages = cache_pages;
        self.stats().ram_bytes = blocks.iter().map(|(_, b)| b).sum();
        self.enc = Some(enc);
        // The blocks reach the receiver before the first page that needs them.
        self.flush()?;
        self.send(Out::Message(Message::StreamBlocks { blocks, cache_pages }))
    }

    fn checkpoint(&mut self, at: String) -> Result<(), AgentError> {
        if self.checkpointed {
            return Ok(());
        }
        self.flush()?;
        let d = self.hasher.digest128();
        let digest = format!("{d:032x}");
        self.checkpointed = true;
        self.cfg.keep = None;
        self.stats().checkpoint_bytes = Some(self.hashed);
        self.stats().checkpoint_digest = Some(d);
        self.send(Out::Message(Message::StreamCheckpoint { bytes: self.hashed, digest, at }))
    }

    fn event(&mut self, e: Event) -> Result<(), AgentError> {
        match e {
            Event::Opaque(b) => {
                self.hash(&b);
                self.chunk.opaque(&b);
            }
            Event::Zero(z) => {
                self.scratch.clear();
                z.write_to(&mut self.scratch);
                let s = std::mem::take(&mut self.scratch);
                self.hash(&s);
                self.chunk.opaque(&s);
                self.scratch = s;
                self.stats().zero_records += 1;
            }
            Event::Page(p) => {
                self.encoder()?;
                self.scratch.clear();
                p.write_to(&mut self.scratch);
                let s = std::mem::take(&mut self.scratch);
                self.hash(&s);
                let global = self
                    .bases
                    .get(p.header.block())
                    .and_then(|&(base, pages)| {
                        let index = p.header.offset() / PAGE_SIZE as u64;
                        (index < pages).then_some(base + index)
                    });
                match (global, self.enc.as_mut()) {
                    (Some(g), Some(enc)) => {
                        enc.push(g, &p.data);
                        let rec = enc.take();
                        let item = self.chunk.page(&s[..s.len() - PAGE_SIZE], &rec);
                        enc.recycle(rec);
                        self.pages.push((item, p.data));
                        self.stats().pages += 1;
                    }
                    _ => {
                        self.chunk.opaque(&s);
                        self.stats().verbatim_pages += 1;
                    }
                }
                self.scratch = s;
            }
            Event::RamSectionStart { kind, .. } => {
                if kind == livemig_stream::SectionKind::End {
                    self.stats().completion_started.get_or_insert_with(Instant::now);
                }
                self.encoder()?;
            }
            Event::RamSectionEnd(_) => {
                self.stats().ram_sections += 1;
                self.encoder()?;
            }
            Event::SwitchoverStart => {
                self.stats().completion_started.get_or_insert_with(Instant::now);
            }
            Event::RamDone => {
                self.stats().ram_done = true;
                self.checkpoint("ram-done".into())?;
            }
            Event::Fallback { reason } => {
                self.stats().fallback = Some(reason.clone());
                self.checkpoint(format!("fallback: {reason}"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_waiting_past_the_timeout_with_no_acknowledgement_is_a_stalled_link() {
        let w = Window::new(1 << 20);
        let t = Duration::from_millis(50);
        assert!(w.check_progress(t).is_ok(), "nothing unacknowledged");
        w.insert(0, 100, Vec::new());
        w.insert(1, 100, Vec::new());
        std::thread::sleep(Duration::from_millis(80));
        let e = w.check_progress(t).expect_err("two chunks waited 80 ms");
        assert!(e.chain().contains("no progress within the timeout"), "{}", e.chain());
        // An acknowledgement is progress: the clock starts again for the chunk still waiting.
        w.ack(0);
        assert!(w.check_progress(t).is_ok());
        w.ack(1);
        std::thread::sleep(Duration::from_millis(80));
        assert!(w.check_progress(t).is_ok(), "nothing unacknowledged, however long");
    }
}
