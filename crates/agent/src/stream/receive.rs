//! The stream engine's `receive`: rebuilds QEMU's migration stream byte for byte from the
//! sender's chunks (opaque spans verbatim, pages decoded against the mirrored cache, disk
//! images), writes it into the destination QEMU's incoming socket, relays the destination's
//! return path back, checks the stream digest before one byte past the RAM reaches QEMU, and
//! resumes the destination only on the sender's commit.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use livemig_compact::{decode_batch, ClassStats, PageClass, PageKey, PAGE_SIZE};
use livemig_qmp::Qmp;
use livemig_wire::{Frame, FrameKind, Message, WireError};
use xxhash_rust::xxh3::Xxh3;

use super::cache::{PageCache, StreamDest, MAX_CACHE_PAGES};
use super::chunk::{self, Item, Payload};
use crate::error::AgentError;
use crate::receive::refuse;
use super::keep::KeepFeed;
use crate::holdings::ReceiverDisks;
use livemig_index::snapshot::Snapshot;
use crate::link::{Out, Writer};
use crate::receive::ReceiveOptions;
use crate::report::Report;
use crate::{Observer, Progress};

/// Most pages a stream may declare (16 TiB of RAM).
const MAX_PAGES: u64 = 1 << 32;

/// The destination QEMU's incoming socket: connected after `migrate-incoming`.
pub(crate) fn connect_incoming(path: &std::path::Path, timeout: Duration) -> Result<UnixStream, AgentError> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline && matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => return Err(AgentError::Network { what: "cannot connect to the destination QEMU's incoming migration socket".into(), source }),
        }
    }
}

/// Copies the destination QEMU's return path onto the connection, verbatim.
pub(crate) fn spawn_return_path(mut qemu: UnixStream, out: crossbeam_channel::Sender<Out>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("livemig-return-path".into())
        .spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                match qemu.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out.send(Out::Frame(FrameKind::ReturnPath, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
        })
        .expect("spawn return-path thread")
}

/// What the destination holds besides QEMU: the disk images and the memory snapshot both hosts
/// hold, and the snapshot being kept of this migration (fed the stream up to its checkpoint).
#[allow(missing_debug_implementations)]
pub(crate) struct Held<'a> {
    /// Disk images both hold.
    pub(crate) disks: &'a ReceiverDisks,
    /// The snapshot the sender's plan named.
    pub(crate) snapshot: Option<&'a Snapshot>,
    /// The snapshot being kept.
    pub(crate) keep: Option<KeepFeed>,
}

/// Bytes of QEMU's stream gathered before they are written into the destination QEMU.
const OUT_BUFFER: usize = 256 * 1024;

/// State of the rebuild.
struct Rebuild<'a> {
    qemu: UnixStream,
    out: Vec<u8>,
    cache: Option<PageCache>,
    held: Held<'a>,
    hasher: Xxh3,
    written: u64,
    checked: bool,
    stats: ClassStats,
    resent: u64,
}

impl Rebuild<'_> {
    fn write(&mut self, b: &[u8]) -> Result<(), AgentError> {
        if !self.checked {
            self.hasher.update(b);
        }
        self.written += b.len() as u64;
        // Gathered and written a chunk at a time: a write per record (two per page) costs more
        // in system calls and wake-ups than the rest of the rebuild.
        self.out.extend_from_slice(b);
        if self.out.len() >= OUT_BUFFER {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes what was gathered into the destination QEMU, and into the snapshot being kept
    /// (until the checkpoint, which drops the keeper).
    fn flush(&mut self) -> Result<(), AgentError> {
        if self.out.is_empty() {
            return Ok(());
        }
        if let Some(k) = &self.held.keep {
            k.feed(&self.out);
        }
        let r = self.qemu.write_all(&self.out);
        self.out.clear();
        r.map_err(|source| AgentError::Network { what: "the destination QEMU stopped reading the migration stream".into(), source })
    }
}

/// Runs after the handshake and `StreamSetup`: the destination QEMU's incoming migration is
/// started and `qemu_sock` connected to it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    opts: &ReceiveOptions,
    obs: &mut dyn Observer,
    report: &mut Report,
    qmp: &mut Qmp,
    qemu_sock: UnixStream,
    frames: &crossbeam_channel::Receiver<Result<Frame, AgentError>>,
    writer: &mut Writer,
    held: Held<'_>,
    key: &PageKey,
) -> Result<(), AgentError> {
    let sock = |source| AgentError::Network { what: "cannot use the incoming socket".into(), source };
    let rp_read = qemu_sock.try_clone().map_err(sock)?;
    let closer = qemu_sock.try_clone().map_err(sock)?;
    let _rp = spawn_return_path(rp_read, writer.sender());
    let r = rebuild(opts, obs, report, &mut QmpIncoming { qmp, path: &opts.qmp }, qemu_sock, frames, writer, held, key);
    // Ends the return-path thread (it holds a producer of the connection's frames).
    let _ = closer.shutdown(std::net::Shutdown::Both);
    r
}

/// What the rebuild asks of the destination QEMU beyond its incoming socket: the stream engine
/// answers over QMP; `livemig tunnel receive` (no QMP) from the return path.
pub(super) trait Incoming {
    /// The whole stream is in QEMU (polled every millisecond from then on): whether QEMU loaded
    /// it. An error when QEMU says it failed.
    fn poll_loaded(&mut self) -> Result<bool, AgentError>;
    /// Whether the rebuild then waits for the sender's commit and resumes the destination
    /// ([`Incoming::resume`]); if not, it ends once QEMU loaded the stream.
    fn awaits_commit(&self) -> bool {
        true
    }
    /// Resumes the destination VM (the sender committed); a warning to report, if any.
    fn resume(&mut self) -> Result<Option<String>, AgentError>;
}

/// The stream engine's destination: QEMU's migration status and `cont` over QMP.
struct QmpIncoming<'a> {
    qmp: &'a mut Qmp,
    path: &'a std::path::Path,
}

impl Incoming for QmpIncoming<'_> {
    fn poll_loaded(&mut self) -> Result<bool, AgentError> {
        let qmp = &mut *self.qmp;
        let info = qmp.query_migrate().map_err(AgentError::qmp("cannot follow the destination's migration"))?;
        match info.status.as_deref() {
            Some("completed") => {
                let s = qmp.query_status().map_err(AgentError::qmp("cannot query the destination VM's state"))?;
                if s.running {
                    return Err(AgentError::Incompatible("the destination VM started running before the commit (start it with -S)".into()));
                }
                Ok(true)
            }
            Some("failed") => Err(AgentError::DeviceState(info.error_desc.unwrap_or_else(|| "the destination's migration failed".into()))),
            _ => Ok(false),
        }
    }

    fn resume(&mut self) -> Result<Option<String>, AgentError> {
        crate::receive::resume_after_commit(self.qmp, self.path)
    }
}

/// Who the parties of [`welcome_sender`] are, in its refusals.
pub(crate) struct Parties<'a> {
    /// The sender: "the source", "the tunnel's sender".
    pub(crate) sender: &'a str,
    /// What it migrates with, after its versions: " with the stream engine", or "".
    pub(crate) with: &'a str,
    /// This side: "this destination", "this receiver".
    pub(crate) me: &'a str,
}

/// The stream protocol's answer to a sender's `hello`, for the stream engine's and the tunnel's
/// receivers: negotiates the version (at least the stream protocol's), checks the page size,
/// answers the disk offers and sends `welcome` (with the page key on a plain link, and the ids of
/// the VM's `snapshots` this host holds). A refusal is
/// sent as `abort` and returned as [`AgentError::Incompatible`]. Returns the disks both hold,
/// and the secret the sender's data connections present (protocol 7: the stream engine over
/// several connections), sent in the welcome.
pub(crate) fn welcome_sender(
    writer: &mut dyn std::io::Write,
    hello: Message,
    (images, indexes): (&[std::path::PathBuf], &[livemig_index::DiskIndex]),
    (welcome_key, snapshots): (Option<String>, Vec<String>),
    report: &mut Report,
    who: &Parties<'_>,
) -> Result<(ReceiverDisks, Option<String>), AgentError> {
    let Message::Hello { version, min_version, software, page_size, disks, .. } = hello else {
        return Err(refuse(writer, format!("{} began with `{}`, not hello", who.sender, hello.name())));
    };
    let Parties { sender, with, me } = who;
    let v = match livemig_wire::negotiate(min_version, version) {
        Some(v) if v >= livemig_wire::STREAM_PROTOCOL_VERSION => v,
        _ => {
            let (min, max) = (livemig_wire::STREAM_PROTOCOL_VERSION.max(livemig_wire::MIN_PROTOCOL_VERSION), livemig_wire::PROTOCOL_VERSION);
            return Err(refuse(
                writer,
                format!("protocol version mismatch: {sender} ({software}) speaks {min_version}..{version}{with}, {me} {min}..{max}"),
            ));
        }
    };
    if page_size != 4096 {
        return Err(refuse(writer, format!("{sender} uses {page_size}-byte pages; {me} 4096")));
    }
    let (rdisks, held) = ReceiverDisks::answer(&disks, images, indexes).map_err(|e| refuse(writer, e.chain()))?;
    report.disk_images_used = held.len();
    let join = if v >= livemig_wire::STREAM_CONNECTIONS_PROTOCOL_VERSION { Some(crate::receive::join_secret()?) } else { None };
    livemig_wire::write_message(
        writer,
        &Message::Welcome {
            version: v,
            software: crate::SOFTWARE.into(),
            holds: crate::holdings::holdings(held, snapshots),
            page_key: welcome_key,
            join: join.clone(),
        },
    )?;
    Ok((rdisks, join))
}

/// Rebuilds QEMU's stream from the sender's frames into `qemu_sock` until the destination
/// (`dest`) loaded it, and, if it awaits one, until the sender's commit resumed it. `key` is the
/// migration's page key (record fingerprints, the stream digest).
#[allow(clippy::too_many_arguments)]
pub(super) fn rebuild(
    opts: &ReceiveOptions,
    obs: &mut dyn Observer,
    report: &mut Report,
    dest: &mut dyn Incoming,
    qemu_sock: UnixStream,
    frames: &crossbeam_channel::Receiver<Result<Frame, AgentError>>,
    writer: &mut Writer,
    held: Held<'_>,
    key: &PageKey,
) -> Result<(), AgentError> {
    let mut rb = Rebuild {
        qemu: qemu_sock,
        out: Vec::with_capacity(OUT_BUFFER + PAGE_SIZE),
        cache: None,
        held,
        hasher: key.stream_hasher(),
        written: 0,
        checked: false,
        stats: ClassStats::default(),
        resent: 0,
    };
    // Frames that arrived while a chunk waited for a resend.
    let mut later: VecDeque<Frame> = VecDeque::new();
    let mut ended = None;
    let mut checkpoint_at: Option<u64> = None;
    let mut loaded = false;
    let mut page = Box::new([0u8; PAGE_SIZE]);
    // The last frame from the sender: a link silent for `--timeout` while a frame is due is a
    // stalled link or sender (the socket has no read timeout: its reader is a thread).
    let mut last_frame = Instant::now();
    loop {
        if opts.cancel.load(Ordering::Relaxed) {
            return Err(AgentError::Cancelled);
        }
        let frame = match later.pop_front() {
            Some(f) => f,
            // Once the whole stream is in QEMU, its load is polled closely: that wait is downtime.
            None => match frames.recv_timeout(if ended.is_some() { Duration::from_millis(1) } else { Duration::from_millis(200) }) {
                Ok(f) => {
                    last_frame = Instant::now();
                    f?
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    // While the destination QEMU loads what it got, the sender has nothing to say.
                    let loading = ended.is_some() && !loaded;
                    if !loading && last_frame.elapsed() > opts.timeout {
                        return Err(AgentError::Wire(WireError::TimedOut { what: "waiting for the sender's next frame" }));
                    }
                    // The whole stream is in QEMU: wait for it to load.
                    if ended.is_some() && !loaded && dest.poll_loaded()? {
                        loaded = true;
                        writer.send(Out::Message(Message::Loaded))?;
                        if !dest.awaits_commit() {
                            obs.progress(Progress::Phase("the destination QEMU loaded the stream"));
                            report.set_class_stats(&rb.stats);
                            report.resent_pages = rb.resent;
                            let _ = writer.marker(Duration::from_secs(5));
                            return Ok(());
                        }
                        obs.progress(Progress::Phase("the destination QEMU loaded the stream; waiting for the commit"));
                    }
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Err(AgentError::Wire(WireError::Closed)),
            },
        };
        report.wire_bytes += (frame.payload.len() + livemig_wire::HEADER_LEN) as u64;
        match frame.kind {
            FrameKind::Stream => match chunk::parse(&frame.payload).map_err(|e| AgentError::Protocol { expected: "a stream chunk".into(), got: e.0 })? {
                Payload::Chunk { seq, items } => {
                    for (i, item) in items.iter().enumerate() {
                        match item {
                            Item::Opaque(b) => rb.write(b)?,
                            Item::Page { header, record } => {
                                let cache = rb.cache.as_mut().ok_or_else(|| AgentError::Protocol {
                                    expected: "stream-blocks before the first page".into(),
                                    got: "a page".into(),
                                })?;
                                let total = cache.total();
                                let mut dest = StreamDest { cache, disks: rb.held.disks, snapshot: rb.held.snapshot, out: &mut page, written: None };
                                let summary = decode_batch(record, total, key, &mut dest)
                                    .map_err(|e| AgentError::Protocol { expected: "a valid page record".into(), got: e.to_string() })?;
                                let written = dest.written;
                                if summary.pages_written + summary.misses.len() as u64 != 1 {
                                    return Err(AgentError::Protocol { expected: "one page per page item".into(), got: format!("{} pages", summary.pages_written) });
                                }
                                match (written, summary.misses.first()) {
                                    (Some((class, len)), None) => rb.stats.add(class, len),
                                    (_, Some(miss)) => {
                                        // Ask for it whole; the stream waits here, QEMU
                                        // holding all before it.
                                        rb.flush()?;
                                        let item = u32::try_from(i).expect("items fit u32");
                                        writer.send(Out::Message(Message::StreamResend { seq, item }))?;
                                        rb.resent += 1;
                                        let data = wait_resend(frames, &mut later, seq, item, opts.timeout)?;
                                        let cache = rb.cache.as_mut().expect("checked above");
                                        cache.put(miss.page, PageClass::Raw, &data);
                                        page.copy_from_slice(&data[..]);
                                        rb.stats.add(PageClass::Raw, miss.record_len);
                                    }
                                    (None, None) => unreachable!("one page written or missed"),
                                }
                                rb.write(header)?;
                                let p = std::mem::replace(&mut page, Box::new([0u8; PAGE_SIZE]));
                                rb.write(&p[..])?;
                                page = p;
                            }
                        }
                    }
                    rb.flush()?;
                    writer.send(Out::Message(Message::StreamAck { seq }))?;
                }
                Payload::Resend { seq, item, .. } => {
                    return Err(AgentError::Protocol { expected: "a chunk".into(), got: format!("an unasked resend of chunk {seq} item {item}") })
                }
            },
            FrameKind::Control => match frame.message()? {
                Message::StreamBlocks { blocks, cache_pages } => {
                    let total: u64 = blocks.iter().map(|(_, b)| b.div_ceil(PAGE_SIZE as u64)).sum();
                    if total > MAX_PAGES || cache_pages > MAX_CACHE_PAGES || rb.cache.is_some() {
                        return Err(AgentError::Protocol {
                            expected: format!("one block list of at most {MAX_PAGES} pages and a cache of at most {MAX_CACHE_PAGES} pages"),
                            got: format!("{total} pages, cache {cache_pages}"),
                        });
                    }
                    report.ram_bytes = blocks.iter().map(|(_, b)| b).sum();
                    rb.cache = Some(PageCache::new(total, cache_pages));
                }
                Message::StreamCheckpoint { bytes, digest, at } => {
                    let ours = format!("{:032x}", rb.hasher.digest128());
                    // Everything before the checkpoint reaches the keeper, nothing after.
                    rb.flush()?;
                    rb.checked = true;
                    rb.held.keep = None;
                    report.verification.source_digest = Some(digest.clone());
                    report.verification.destination_digest = Some(ours.clone());
                    if bytes != rb.written || digest != ours {
                        return Err(AgentError::VerifyMismatch {
                            source_digest: format!("{digest} over {bytes} bytes"),
                            destination_digest: format!("{ours} over {} bytes", rb.written),
                        });
                    }
                    report.verification.ok = true;
                    checkpoint_at = Some(bytes);
                    writer.send(Out::Message(Message::StreamVerified { bytes }))?;
                    obs.progress(Progress::Phase(&format!("stream digest verified ({at}, {} MiB): the rest may reach QEMU", bytes >> 20)));
                }
                Message::StreamEnd { bytes } => {
                    if bytes != rb.written {
                        return Err(AgentError::Protocol { expected: format!("{bytes} bytes of stream"), got: format!("{} written", rb.written) });
                    }
                    ended = Some(bytes);
                    report.device_state_bytes = checkpoint_at.map_or(0, |c| bytes.saturating_sub(c));
                }
                Message::Commit => {
                    if !loaded {
                        return Err(AgentError::Protocol { expected: "the stream loaded before the commit".into(), got: "commit".into() });
                    }
                    if let Some(w) = dest.resume()? {
                        obs.progress(Progress::Phase(&w));
                        report.warnings.push(w);
                    }
                    writer.send(Out::Message(Message::Resumed))?;
                    let _ = writer.marker(Duration::from_secs(5));
                    obs.progress(Progress::Phase("completed: the destination VM runs"));
                    report.set_class_stats(&rb.stats);
                    report.resent_pages = rb.resent;
                    return Ok(());
                }
                Message::Abort { reason } => return Err(AgentError::PeerAborted { peer: "source", reason }),
                other => return Err(AgentError::Protocol { expected: "stream chunks or control".into(), got: other.name().into() }),
            },
            other => return Err(AgentError::Protocol { expected: "stream frames".into(), got: format!("{other:?}") }),
        }
    }
}

/// Waits for the resend of (`seq`, `item`), keeping other frames for later.
fn wait_resend(
    frames: &crossbeam_channel::Receiver<Result<Frame, AgentError>>,
    later: &mut VecDeque<Frame>,
    seq: u64,
    item: u32,
    timeout: Duration,
) -> Result<Box<[u8; PAGE_SIZE]>, AgentError> {
    let deadline = Instant::now() + timeout;
    loop {
        let f = match frames.recv_deadline(deadline) {
            Ok(f) => f?,
            Err(_) => return Err(AgentError::Timeout { what: format!("the resend of chunk {seq} item {item}"), secs: timeout.as_secs_f64() }),
        };
        if f.kind == FrameKind::Stream {
            if let Ok(Payload::Resend { seq: s, item: i, data }) = chunk::parse(&f.payload) {
                if (s, i) == (seq, item) {
                    return Ok(Box::new(*data));
                }
                return Err(AgentError::Protocol { expected: format!("the resend of chunk {seq} item {item}"), got: format!("chunk {s} item {i}") });
            }
        }
        if f.kind == FrameKind::Control {
            if let Ok(Message::Abort { reason }) = f.message() {
                return Err(AgentError::PeerAborted { peer: "source", reason });
            }
        }
        later.push_back(f);
        if later.len() > 4096 {
            return Err(AgentError::Protocol { expected: "a resend".into(), got: "4096 frames without it".into() });
        }
    }
}
