//! The source half of the relay, independent of QMP: reads QEMU's migration stream from the
//! socket QEMU writes into, parses it (`livemig-stream`), encodes every PAGE record against what
//! the receiver holds (`livemig-compact`, mirrored cache) and queues Stream frames in order;
//! everything else passes verbatim. A window of unacknowledged chunks bounds what the relay
//! holds (so QEMU sees about the link's rate) and keeps their pages for resends.
//!
//! Encoding on several threads ([`SourceConfig::threads`]): a chunk's items are gathered as they
//! are parsed (opaque spans and record headers copied, page data kept in its box) and encoded
//! when the chunk is sent off. Its pages are split into batches of [`BATCH`] pages queued on a
//! bounded channel; `threads - 1` workers started once per migration, and this thread when it
//! comes to the chunk, take batches from it and prepare them against the encoder's state
//! ([`Encoder::prepare`], read only); then this thread commits every page in stream order
//! ([`Encoder::commit`], which re-encodes a page whose dup source or delta base an earlier page
//! of the chunk changed) and builds the chunk. A full chunk while QEMU keeps writing stays in
//! flight (the workers prepare it while this thread reads and parses the next one) until the
//! next one is sent off; a pause of QEMU's sends it. The stream, the mirrored cache and the
//! resends stay exact; what a chunk's parallel encoding cannot see is a duplicate of a page
//! earlier in the same chunk (it goes compressed instead of as a `dup`). Prepared records, page
//! boxes and batch vectors are reused. With one thread (or a chunk too small to split) pages
//! are encoded one after the other as before.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use livemig_compact::{
    ClassStats, DiskLookup, EncodeOptions, Encoder, PageKey, PageRef, Prepared, Scratch, SnapshotLookup, PAGE_SIZE,
};
use livemig_stream::{BlockName, Event, Parser};
use livemig_wire::Message;
use xxhash_rust::xxh3::Xxh3;

use super::chunk::ChunkBuilder;
use super::conns::Spread;
use super::keep::KeepFeed;
use crate::autocomp::StreamAuto;
use crate::error::AgentError;

/// Raw stream bytes a chunk holds before it is sent.
pub const CHUNK_TARGET: u64 = 512 * 1024;
/// After a short read, how long the relay waits for more of QEMU's stream before it sends the
/// chunk it has.
const TOP_UP: Duration = Duration::from_micros(500);
/// The longest a chunk waits for more of QEMU's stream once a read was short.
const TOP_UP_MAX: Duration = Duration::from_millis(5);
/// Raw stream bytes the relay lets be unacknowledged by the receiver.
pub const DEFAULT_WINDOW: u64 = 8 << 20;

type Pages = Vec<(u32, Box<[u8; PAGE_SIZE]>)>;

#[derive(Debug, Default)]
struct WinInner {
    /// Sequence number, raw bytes, wire bytes, pages.
    chunks: VecDeque<(u64, u64, u64, Pages)>,
    raw: u64,
    wire: u64,
    acked_raw: u64,
    acked_at: Vec<(Instant, u64)>,
    closed: bool,
    /// Since when the oldest unacknowledged chunk waits for progress (its insertion, or the last
    /// acknowledgement after it); `None` when nothing is unacknowledged.
    waiting_since: Option<Instant>,
}

/// Unacknowledged chunks: their raw and wire sizes and their pages (for resends).
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

    pub(crate) fn insert(&self, seq: u64, raw: u64, wire: u64, pages: Pages) {
        let mut g = self.lock();
        g.raw += raw;
        g.wire += wire;
        g.chunks.push_back((seq, raw, wire, pages));
        if g.waiting_since.is_none() {
            g.waiting_since = Some(Instant::now());
        }
    }

    /// The receiver wrote every chunk up to `seq` into the destination QEMU.
    pub fn ack(&self, seq: u64) {
        let mut g = self.lock();
        while g.chunks.front().is_some_and(|c| c.0 <= seq) {
            let (_, raw, wire, _) = g.chunks.pop_front().expect("front exists");
            g.raw -= raw;
            g.wire -= wire;
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
        c.3.iter().find(|(i, _)| *i == item).map(|(_, p)| p.clone())
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

    /// Wire bytes (chunk payloads) unacknowledged.
    pub fn queued_wire(&self) -> u64 {
        self.lock().wire
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
    /// Bytes of the stream read before the completion started (within one read): what follows
    /// is the final pass and the device state.
    pub raw_at_completion: Option<u64>,
    /// The pages QEMU sent again (dirtied after they were sent): a switchover's final pass is
    /// such pages, and they compress unlike the first pass's.
    pub resent: ResentStats,
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
    /// Chunks whose pages were encoded on several threads (the others had too few pages to
    /// split, or one thread was asked for).
    pub parallel_chunks: u64,
    /// The compressor of whole pages: what was chosen, when and why.
    pub compressor: Option<crate::autocomp::CompressorReport>,
}

/// Pages sent again and what they took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ResentStats {
    /// Page records.
    pub pages: u64,
    /// Their bytes in QEMU's stream (header and page).
    pub raw_bytes: u64,
    /// Their bytes in the chunks (the compacted record).
    pub wire_bytes: u64,
}

impl ResentStats {
    /// What was added since `earlier`.
    pub fn since(&self, earlier: &ResentStats) -> ResentStats {
        ResentStats {
            pages: self.pages - earlier.pages,
            raw_bytes: self.raw_bytes - earlier.raw_bytes,
            wire_bytes: self.wire_bytes - earlier.wire_bytes,
        }
    }
}

impl RelayStats {
    /// The source QEMU started its completion (the first END section or SWITCHOVER_START).
    fn completion(&mut self) {
        if self.completion_started.is_none() {
            self.completion_started = Some(Instant::now());
            self.raw_at_completion = Some(self.raw_bytes);
        }
    }
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
    /// Threads that encode page records, this one included (clamped to
    /// 1..=[`crate::pipeline::MAX_THREADS`]).
    pub threads: usize,
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("encode", &self.encode)
            .field("disks", &self.disks.is_some())
            .field("snapshot", &self.snapshot.is_some())
            .field("keep", &self.keep.is_some())
            .field("threads", &self.threads)
            .finish()
    }
}

/// Reads QEMU's stream from `qemu` until EOF and queues it on `out` (one connection or several).
/// Returns the stream's length. Stops with an error when a connection of `out` is closed (it
/// failed).
pub fn relay_source(
    mut qemu: UnixStream,
    out: Spread,
    window: Arc<Window>,
    stats: Arc<Mutex<RelayStats>>,
    cfg: SourceConfig,
) -> Result<u64, AgentError> {
    let pool = Pool::start(cfg.threads)?;
    // The policy's CPU term: the relay encodes on this many threads.
    let mut auto = StreamAuto::new(cfg.compressor, cfg.threads.clamp(1, crate::pipeline::MAX_THREADS));
    stats.lock().unwrap_or_else(|e| e.into_inner()).compressor = Some(auto.auto.report());
    let mut st = State {
        auto,
        parser: Parser::new(),
        enc: None,
        bases: HashMap::new(),
        pend: Pending::default(),
        inflight: Pending::default(),
        queued: None,
        pool,
        pages: Vec::new(),
        sent: Vec::new(),
        resent: ResentStats::default(),
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
    // Whether the reads wait at most TOP_UP (the chunk is not full and the last read was short):
    // since when.
    let mut topping_up: Option<Instant> = None;
    loop {
        let n = match qemu.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if topping_up.is_some() && matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                // QEMU has nothing more for now: the chunk goes.
                topping_up = None;
                qemu.set_read_timeout(None).map_err(io)?;
                st.flush()?;
                continue;
            }
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
        // a chunk goes when full, or when QEMU has nothing more for now: after a short read,
        // reads wait at most TOP_UP for more (a read returns as soon as QEMU wrote anything,
        // often a few pages, and a chunk of a few pages cannot be encoded on several threads),
        // and a chunk waits at most TOP_UP_MAX in all.
        let waited_enough = topping_up.is_some_and(|t| t.elapsed() >= TOP_UP_MAX);
        if st.checkpointed || st.pend.raw >= CHUNK_TARGET || waited_enough {
            // A full chunk while QEMU keeps writing is prepared while the next one is read; a
            // pause of QEMU's must not keep it: reads then wait at most TOP_UP.
            st.next_chunk(!st.checkpointed && !waited_enough)?;
            if !st.inflight.items.is_empty() {
                if topping_up.is_none() {
                    qemu.set_read_timeout(Some(TOP_UP)).map_err(io)?;
                }
                topping_up = Some(Instant::now());
            } else if topping_up.take().is_some() {
                qemu.set_read_timeout(None).map_err(io)?;
            }
        } else if n < buf.len() && topping_up.is_none() && !st.pend.items.is_empty() {
            qemu.set_read_timeout(Some(TOP_UP)).map_err(io)?;
            topping_up = Some(Instant::now());
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
        let classes = *read(enc).stats();
        st.stats().classes = classes;
    }
    st.stats().compressor = Some(st.auto.auto.report());
    st.stats().ended = true;
    st.control(Message::StreamEnd { bytes: total })?;
    Ok(total)
}

struct State {
    auto: StreamAuto,
    parser: Parser,
    enc: Option<Arc<RwLock<Encoder>>>,
    bases: HashMap<BlockName, (u64, u64)>,
    pend: Pending,
    /// The chunk whose pages the pool prepares while this thread gathers the next one.
    inflight: Pending,
    /// Batches of it queued in the pool, if it went to the pool.
    queued: Option<usize>,
    pool: Pool,
    pages: Pages,
    /// A bit per guest page: sent before (what is sent again counts in [`RelayStats::resent`]).
    sent: Vec<u64>,
    resent: ResentStats,
    seq: u64,
    hasher: Xxh3,
    hashed: u64,
    checkpointed: bool,
    out: Spread,
    window: Arc<Window>,
    stats: Arc<Mutex<RelayStats>>,
    cfg: SourceConfig,
    scratch: Vec<u8>,
}

impl State {
    fn stats(&self) -> std::sync::MutexGuard<'_, RelayStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A control message, after every chunk sent so far (over several connections it takes a
    /// number of the chunks' sequence).
    fn control(&mut self, m: Message) -> Result<(), AgentError> {
        self.out.control(m, &mut self.seq)
    }

    fn hash(&mut self, b: &[u8]) {
        if !self.checkpointed {
            self.hasher.update(b);
            self.hashed += b.len() as u64;
        }
    }

    /// Sends everything gathered: the chunk in flight, then the one being gathered.
    fn flush(&mut self) -> Result<(), AgentError> {
        self.next_chunk(false)
    }

    /// Finishes the chunk in flight and sends off the one gathered; with `overlap` (a full chunk
    /// while QEMU keeps writing) its pages may stay in flight, prepared by the workers while this
    /// thread reads and parses the next one, and go at the next call.
    fn next_chunk(&mut self, overlap: bool) -> Result<(), AgentError> {
        self.finish_inflight()?;
        if self.pend.items.is_empty() {
            return Ok(());
        }
        std::mem::swap(&mut self.pend, &mut self.inflight);
        self.queued = match &self.enc {
            Some(enc) if !self.inflight.slots.is_empty() => self.pool.queue(enc, &mut self.inflight.slots)?,
            _ => None,
        };
        if !overlap || self.queued.is_none() {
            self.finish_inflight()?;
        }
        Ok(())
    }

    /// Commits the chunk in flight, if any, and sends it.
    fn finish_inflight(&mut self) -> Result<(), AgentError> {
        if self.inflight.items.is_empty() {
            return Ok(());
        }
        let chunk = self.encode_chunk()?;
        let raw = chunk.raw_bytes();
        self.window.wait_room(raw);
        if let Some(enc) = self.enc.as_mut() {
            let pages = self.pages.iter().map(|(_, p)| &**p);
            let queue = self.out.fill();
            // No batch is with the pool here (the chunk in flight was taken back, the next one
            // is queued after this): the write lock is free.
            let mut enc = enc.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(r) = self.auto.after_chunk(pages, (raw, chunk.len() as u64), &self.window, queue, self.seq, &mut enc) {
                self.stats.lock().unwrap_or_else(|e| e.into_inner()).compressor = Some(r);
            }
        }
        self.window.insert(self.seq, raw, chunk.len() as u64, std::mem::take(&mut self.pages));
        self.seq += 1;
        if let Some(enc) = &self.enc {
            let classes = *read(enc).stats();
            let mut st = self.stats();
            st.classes = classes;
            st.resent = self.resent;
        }
        self.out.chunk(chunk.finish())
    }

    /// Encodes the chunk in flight into chunk `self.seq` (its pages into `self.pages`, for
    /// resends) and empties it: commits the pages the pool prepared (after taking back every
    /// batch), or encodes them one after the other.
    fn encode_chunk(&mut self) -> Result<ChunkBuilder, AgentError> {
        let mut chunk = ChunkBuilder::new(self.seq);
        let mut slots = std::mem::take(&mut self.inflight.slots);
        let parallel = match (self.queued.take(), &self.enc) {
            (Some(q), Some(enc)) => {
                self.pool.collect(enc, &mut slots, q)?;
                true
            }
            _ => false,
        };
        if parallel {
            self.stats().parallel_chunks += 1;
        }
        let mut enc = self.enc.as_ref().map(|e| e.write().unwrap_or_else(std::sync::PoisonError::into_inner));
        let mut slot_iter = slots.drain(..);
        let fl = &mut self.inflight;
        for it in fl.items.drain(..) {
            match it {
                Item::Opaque(r) => chunk.opaque(&fl.bytes[r]),
                Item::Page(h) => {
                    let slot = slot_iter.next().expect("a slot per page item");
                    let enc = enc.as_mut().expect("pages are gathered only once the encoder exists");
                    if parallel {
                        enc.commit(&slot.prepared, &slot.data);
                    } else {
                        enc.push(slot.page, &slot.data);
                    }
                    let rec = enc.take();
                    let (header, before) = (fl.bytes[h.clone()].len() as u64, chunk.len() as u64);
                    let item = chunk.page(&fl.bytes[h], &rec);
                    enc.recycle(rec);
                    if let Some(w) = self.sent.get_mut((slot.page / 64) as usize) {
                        let bit = 1u64 << (slot.page % 64);
                        if *w & bit != 0 {
                            self.resent.pages += 1;
                            self.resent.raw_bytes += header + PAGE_SIZE as u64;
                            self.resent.wire_bytes += chunk.len() as u64 - before;
                        }
                        *w |= bit;
                    }
                    self.pages.push((item, slot.data));
                    fl.prepared.push(slot.prepared);
                }
            }
        }
        drop(slot_iter);
        fl.slots = slots;
        fl.bytes.clear();
        fl.raw = 0;
        Ok(chunk)
    }

    /// Builds the encoder once the block list is known and tells the receiver.
    fn encoder(&mut self) -> Result<(), AgentError> {
        if self.enc.is_some() || self.parser.blocks().is_empty() {
            return Ok(());
        }
        let (bases, total) = super::keep::numbering(&self.parser);
        self.bases = bases;
        self.sent = vec![0; usize::try_from(total.div_ceil(64)).unwrap_or(0)];
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
        self.enc = Some(Arc::new(RwLock::new(enc)));
        // The blocks reach the receiver before the first page that needs them.
        self.flush()?;
        self.control(Message::StreamBlocks { blocks, cache_pages })
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
        self.control(Message::StreamCheckpoint { bytes: self.hashed, digest, at })
    }

    fn event(&mut self, e: Event) -> Result<(), AgentError> {
        match e {
            Event::Opaque(b) => {
                self.hash(&b);
                self.pend.opaque(&b);
            }
            Event::Zero(z) => {
                self.scratch.clear();
                z.write_to(&mut self.scratch);
                let s = std::mem::take(&mut self.scratch);
                self.hash(&s);
                self.pend.opaque(&s);
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
                match (global, self.enc.is_some()) {
                    (Some(g), true) => {
                        self.pend.page(&s[..s.len() - PAGE_SIZE], g, p.data);
                        self.stats().pages += 1;
                    }
                    _ => {
                        self.pend.opaque(&s);
                        self.stats().verbatim_pages += 1;
                    }
                }
                self.scratch = s;
            }
            Event::RamSectionStart { kind, .. } => {
                if kind == livemig_stream::SectionKind::End {
                    self.stats().completion();
                }
                self.encoder()?;
            }
            Event::RamSectionEnd(_) => {
                self.stats().ram_sections += 1;
                self.encoder()?;
            }
            Event::SwitchoverStart => self.stats().completion(),
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

/// Reads the encoder (its lock is never held across a panic that matters: a poisoned lock is
/// taken as it is).
fn read(enc: &RwLock<Encoder>) -> std::sync::RwLockReadGuard<'_, Encoder> {
    enc.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One page of a chunk: its index in the guest's RAM, its data, its prepared record.
struct Slot {
    page: u64,
    data: Box<[u8; PAGE_SIZE]>,
    prepared: Prepared,
}

/// An item of the chunk being gathered: an opaque span or a record header, in `Pending::bytes`.
enum Item {
    Opaque(Range<usize>),
    Page(Range<usize>),
}

/// The chunk being gathered, not encoded yet.
#[derive(Default)]
struct Pending {
    items: Vec<Item>,
    /// Opaque spans and record headers.
    bytes: Vec<u8>,
    /// The pages, in stream order.
    slots: Vec<Slot>,
    /// Raw stream bytes gathered.
    raw: u64,
    /// Prepared records to reuse.
    prepared: Vec<Prepared>,
}

impl Pending {
    fn push_bytes(&mut self, b: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(b);
        start..self.bytes.len()
    }

    /// Opaque bytes as an item of their own (none: no item, as [`ChunkBuilder::opaque`]).
    fn opaque(&mut self, b: &[u8]) {
        if b.is_empty() {
            return;
        }
        self.raw += b.len() as u64;
        let r = self.push_bytes(b);
        self.items.push(Item::Opaque(r));
    }

    /// A PAGE record: its header bytes, the page's index in the guest's RAM, its data.
    fn page(&mut self, header: &[u8], page: u64, data: Box<[u8; PAGE_SIZE]>) {
        self.raw += (header.len() + PAGE_SIZE) as u64;
        let h = self.push_bytes(header);
        self.items.push(Item::Page(h));
        let prepared = self.prepared.pop().unwrap_or_default();
        self.slots.push(Slot { page, data, prepared });
    }
}

/// Pages of a batch: the unit of work the relay thread and the workers take from a chunk.
const BATCH: usize = 8;

/// A batch of a chunk's pages (moved to whoever prepares it, and back).
struct Batch {
    enc: Arc<RwLock<Encoder>>,
    index: usize,
    slots: Vec<Slot>,
}

/// A prepared batch, or `None` for a worker that panicked in it.
type Done = (usize, Option<Vec<Slot>>);

/// The encoding workers of one migration: `threads - 1`, started once. A chunk's pages go in
/// batches of [`BATCH`] into one queue that the workers and the relay thread all take from, so a
/// worker the host does not schedule in time delays its chunk by one batch at most.
struct Pool {
    workers: usize,
    work: Sender<Batch>,
    /// The relay thread's end of the same queue.
    take: Receiver<Batch>,
    done: Receiver<Done>,
    scratch: Scratch,
    /// Batch vectors to reuse.
    spare: Vec<Vec<Slot>>,
    /// Batches prepared, by index.
    back: Vec<Option<Vec<Slot>>>,
}

fn prepare_slots(enc: &Encoder, slots: &mut [Slot], scratch: &mut Scratch) {
    for s in slots {
        enc.prepare(&PageRef { page: s.page, data: &s.data, whole: false }, scratch, &mut s.prepared);
    }
}

fn pool_worker(work: &Receiver<Batch>, done: &Sender<Done>) {
    let mut scratch = Scratch::default();
    for Batch { enc, index, mut slots } in work {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| prepare_slots(&read(&enc), &mut slots, &mut scratch)));
        drop(enc);
        if done.send((index, r.ok().map(|()| slots))).is_err() {
            return;
        }
    }
}

/// Most batches queued at once (a chunk has at most about (CHUNK_TARGET + one read) / 4 KiB
/// pages; more are prepared by the relay thread as they are split).
const QUEUE: usize = 64;

impl Pool {
    fn start(threads: usize) -> Result<Pool, AgentError> {
        let threads = threads.clamp(1, crate::pipeline::MAX_THREADS);
        let (work, take) = bounded::<Batch>(QUEUE);
        let (done_tx, done) = bounded::<Done>(QUEUE);
        for i in 1..threads {
            let (take, done_tx) = (take.clone(), done_tx.clone());
            std::thread::Builder::new()
                .name(format!("livemig-relay-enc-{i}"))
                .spawn(move || pool_worker(&take, &done_tx))
                .map_err(|e| AgentError::Internal(format!("cannot start an encoder thread: {e}")))?;
        }
        Ok(Pool { workers: threads - 1, work, take, done, scratch: Scratch::default(), spare: Vec::new(), back: Vec::new() })
    }

    /// Queues `slots` for the workers in batches when they are enough to split (the slots then
    /// are in the pool until [`Pool::collect`]); returns how many batches are queued, or `None`
    /// (nothing queued or prepared: the caller encodes one page after the other).
    fn queue(&mut self, enc: &Arc<RwLock<Encoder>>, slots: &mut Vec<Slot>) -> Result<Option<usize>, AgentError> {
        if self.workers == 0 || slots.len() < 2 * BATCH {
            return Ok(None);
        }
        let batches = slots.len().div_ceil(BATCH);
        self.back.clear();
        self.back.resize_with(batches, || None);
        // Queued in stream order; a batch the queue has no room for is prepared here at once.
        let mut rest = slots.drain(..);
        let mut queued = 0;
        for index in 0..batches {
            let mut v = self.spare.pop().unwrap_or_default();
            v.extend(rest.by_ref().take(BATCH));
            match self.work.try_send(Batch { enc: Arc::clone(enc), index, slots: v }) {
                Ok(()) => queued += 1,
                Err(e) => {
                    let Batch { mut slots, .. } = e.into_inner();
                    prepare_slots(&read(enc), &mut slots, &mut self.scratch);
                    self.back[index] = Some(slots);
                }
            }
        }
        Ok(Some(queued))
    }

    /// Takes back the `queued` batches of the last [`Pool::queue`] into `slots`, in order,
    /// preparing here those no worker has taken yet.
    fn collect(&mut self, enc: &Arc<RwLock<Encoder>>, slots: &mut Vec<Slot>, mut queued: usize) -> Result<(), AgentError> {
        let mut failed = false;
        while let Ok(Batch { index, mut slots, .. }) = self.take.try_recv() {
            prepare_slots(&read(enc), &mut slots, &mut self.scratch);
            self.back[index] = Some(slots);
            queued -= 1;
        }
        for _ in 0..queued {
            let (index, v) = self.done.recv().map_err(|_| AgentError::Internal("an encoder thread ended".into()))?;
            match v {
                Some(v) => self.back[index] = Some(v),
                None => failed = true,
            }
        }
        if failed {
            return Err(AgentError::Internal("an encoder thread panicked".into()));
        }
        for v in &mut self.back {
            let mut v = v.take().expect("every batch came back");
            slots.append(&mut v);
            self.spare.push(v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::Out;
    use livemig_wire::FrameKind;

    use crate::holdings::ReceiverDisks;
    use crate::stream::cache::{PageCache, StreamDest};
    use crate::stream::chunk::{self, Payload};
    use crate::stream::tunnel::tests::stream;
    use std::io::Write;

    /// Runs `data` through the relay with `threads` threads: what it queued, its window (never
    /// acknowledged, so it holds every chunk's pages) and its stats.
    fn relay(data: &[u8], threads: usize, key: &PageKey) -> (Vec<Out>, Arc<Window>, RelayStats) {
        let (qemu, mut feed) = UnixStream::pair().unwrap();
        let owned = data.to_vec();
        let writer = std::thread::spawn(move || feed.write_all(&owned).unwrap());
        let (out, rx) = crossbeam_channel::unbounded();
        let window = Arc::new(Window::new(u64::MAX / 2));
        let stats = Arc::new(Mutex::new(RelayStats::default()));
        let compressor = crate::autocomp::CompressorMode::Forced(EncodeOptions::default().compressor);
        let cfg = SourceConfig { encode: EncodeOptions::default(), compressor, disks: None, key: key.clone(), snapshot: None, keep: None, threads };
        let n = relay_source(qemu, Spread::one(out), Arc::clone(&window), Arc::clone(&stats), cfg).unwrap_or_else(|e| panic!("{}", e.chain()));
        writer.join().unwrap();
        assert_eq!(n, data.len() as u64);
        let s = stats.lock().unwrap().clone();
        (rx.try_iter().collect(), window, s)
    }

    /// Rebuilds QEMU's stream from the relay's output as the receiver does (mirrored cache, no
    /// misses allowed), checking that every page item's resend (the window's copy) is the page.
    fn rebuild(outs: &[Out], window: &Window, key: &PageKey) -> (Vec<u8>, ClassStats) {
        let (mut got, mut stats, mut cache, mut page) = (Vec::new(), ClassStats::default(), None, Box::new([0u8; PAGE_SIZE]));
        let disks = ReceiverDisks::default();
        for o in outs {
            match o {
                Out::Message(Message::StreamBlocks { blocks, cache_pages }) => {
                    let total = blocks.iter().map(|(_, b)| b.div_ceil(PAGE_SIZE as u64)).sum();
                    cache = Some(PageCache::new(total, *cache_pages));
                }
                Out::Frame(FrameKind::Stream, payload) => {
                    let Payload::Chunk { seq, items } = chunk::parse(payload).unwrap() else { panic!("a resend unasked") };
                    for (i, item) in items.iter().enumerate() {
                        match item {
                            chunk::Item::Opaque(b) => got.extend_from_slice(b),
                            chunk::Item::Page { header, record } => {
                                let cache = cache.as_mut().expect("blocks before pages");
                                let total = cache.total();
                                let mut dest = StreamDest { cache, disks: &disks, snapshot: None, out: &mut page, written: None };
                                let s = livemig_compact::decode_batch(record, total, key, &mut dest).unwrap();
                                let (class, len) = dest.written.expect("the page decoded");
                                assert!(s.misses.is_empty() && s.pages_written == 1, "chunk {seq} item {i}: {s:?}");
                                stats.add(class, len);
                                let kept = window.page(seq, u32::try_from(i).unwrap()).expect("the window keeps the page for a resend");
                                assert!(kept[..] == page[..], "chunk {seq} item {i}: the resend would carry another page");
                                got.extend_from_slice(header);
                                got.extend_from_slice(&page[..]);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        (got, stats)
    }

    /// Raw stream bytes a chunk payload stands for.
    fn raw_of(payload: &[u8]) -> usize {
        match chunk::parse(payload).unwrap() {
            Payload::Chunk { items, .. } => items
                .iter()
                .map(|i| match i {
                    chunk::Item::Opaque(b) => b.len(),
                    chunk::Item::Page { header, .. } => header.len() + PAGE_SIZE,
                })
                .sum(),
            Payload::Resend { .. } => 0,
        }
    }

    /// QEMU pauses with a chunk far from full, or one in flight: what it wrote goes (the relay
    /// does not wait for more, or a QEMU waiting for an answer would wait forever), and the
    /// stream stays exact.
    #[test]
    fn what_qemu_wrote_goes_when_it_pauses_before_a_chunk_is_full() {
        // Before the first chunk is full, and after a few (one may be in flight then).
        for first in [100_000, 1_500_000] {
            relay_with_a_pause(first);
        }
    }

    fn relay_with_a_pause(first: usize) {
        let data = stream();
        let key = PageKey::from_bytes([9; 32]);
        let (qemu, mut feed) = UnixStream::pair().unwrap();
        let (out, rx) = crossbeam_channel::unbounded();
        let window = Arc::new(Window::new(u64::MAX / 2));
        let stats = Arc::new(Mutex::new(RelayStats::default()));
        let compressor = crate::autocomp::CompressorMode::Forced(EncodeOptions::default().compressor);
        let cfg = SourceConfig { encode: EncodeOptions::default(), compressor, disks: None, key: key.clone(), snapshot: None, keep: None, threads: 2 };
        let relay = {
            let window = Arc::clone(&window);
            std::thread::spawn(move || relay_source(qemu, Spread::one(out), window, stats, cfg))
        };
        feed.write_all(&data[..first]).unwrap();
        // All of it but a record the parser holds incomplete at the cut.
        let mut outs = Vec::new();
        let mut relayed = 0;
        while relayed + PAGE_SIZE + chunk::MAX_HEADER < first {
            let o = rx.recv_timeout(Duration::from_secs(20)).expect("what QEMU wrote before its pause is relayed");
            if let Out::Frame(FrameKind::Stream, p) = &o {
                relayed += raw_of(p);
            }
            outs.push(o);
        }
        feed.write_all(&data[first..]).unwrap();
        drop(feed);
        let n = relay.join().unwrap().unwrap_or_else(|e| panic!("{}", e.chain()));
        assert_eq!(n, data.len() as u64);
        outs.extend(rx.try_iter());
        let (got, _) = rebuild(&outs, &window, &key);
        assert!(got == data, "the rebuilt stream differs from QEMU's");
    }

    /// The relay on 1 thread and on several rebuilds the same exact stream, every page decoded
    /// from the mirrored cache without a miss, and each chunk's pages kept for resends; with
    /// several threads chunks were in fact encoded on several.
    #[test]
    fn the_relay_on_one_thread_and_on_several_rebuilds_the_same_exact_stream() {
        let data = stream();
        let key = PageKey::from_bytes([7; 32]);
        for threads in [1, 2, 3, 4, 8] {
            let (outs, window, st) = relay(&data, threads, &key);
            let (got, classes) = rebuild(&outs, &window, &key);
            assert!(got == data, "{threads} threads: the rebuilt stream differs from QEMU's");
            assert_eq!(classes, st.classes, "{threads} threads: the receiver decoded what the relay encoded");
            assert_eq!(st.pages, 1024 - 128 + 128 + 2);
            assert_eq!(st.classes.pages(), st.pages);
            // Sent again: the second pass's 128 changed pages, and pages 1 and 3 in the final one
            // (what prices a switchover's final pass).
            assert_eq!(st.resent.pages, 128 + 2, "{threads} threads");
            assert!(st.resent.raw_bytes > 130 * PAGE_SIZE as u64, "{:?}", st.resent);
            assert!(st.resent.wire_bytes > 0 && st.resent.wire_bytes < st.resent.raw_bytes / 4, "deltas: {:?}", st.resent);
            if threads == 1 {
                assert_eq!(st.parallel_chunks, 0);
            } else {
                assert!(st.parallel_chunks > 0, "{threads} threads: no chunk was encoded on several: {st:?}");
            }
        }
    }

    #[test]
    fn a_window_waiting_past_the_timeout_with_no_acknowledgement_is_a_stalled_link() {
        let w = Window::new(1 << 20);
        let t = Duration::from_millis(50);
        assert!(w.check_progress(t).is_ok(), "nothing unacknowledged");
        w.insert(0, 100, 50, Vec::new());
        w.insert(1, 100, 50, Vec::new());
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
