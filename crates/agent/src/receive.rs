//! The `receive` role: writes the pages into the destination VM's RAM, checks that the memory
//! equals the source's (keyed digests, see `livemig_track`), feeds QEMU the device state and
//! resumes the destination only when the source commits. On any failure the destination is
//! never resumed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use livemig_compact::{is_zero, PageKey};
use livemig_index::snapshot::{Snapshot, SnapshotStore, SnapshotWriter};
use livemig_control::IterationStats;
use livemig_memory::{GuestMemory, PageBuf};
use livemig_qmp::Qmp;
use livemig_track::{Digest, Ledger};
use livemig_wire::{
    negotiate, FrameKind, Message, WireError, RegionInfo, CONNECTIONS_PROTOCOL_VERSION, ENGINE_SHARED, ENGINE_STREAM, MAX_CONNECTIONS,
    MAX_RESEND_PAGES, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use crate::error::AgentError;
use crate::apply::DataConnections;
use crate::arrival::{self, Counting};
use crate::transport::Transport;
use crate::holdings::{self, ReceiverDisks};
use crate::link;
use crate::report::{IterationRecord, Report};
use crate::{Observer, Progress, SOFTWARE};

/// What `receive` needs.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// Address to listen on, `host:port` (port 0 picks one; it is reported).
    pub listen: String,
    /// QMP socket of the destination QEMU (started with `-incoming defer`).
    pub qmp: PathBuf,
    /// Longest wait for the peer or QEMU at any step once connected.
    pub timeout: Duration,
    /// Longest wait for the sender to connect.
    pub accept_timeout: Duration,
    /// Set by a signal handler to cancel.
    pub cancel: Arc<AtomicBool>,
    /// TLS (default) or plain TCP.
    pub transport: Transport,
    /// At switchover, re-read the whole destination memory for the digest instead of using the
    /// hashes of the pages as written (costs downtime: one read and hash of the RAM).
    pub verify_reread: bool,
    /// Raw disk images this host holds (the guest's disks) that references may name.
    pub disk_images: Vec<PathBuf>,
    /// Where disk indexes are cached.
    pub index_cache: PathBuf,
    /// Bytes between indexed 4 KiB windows of the disk images (auto: from their filesystems).
    pub disk_align: livemig_index::Align,
    /// Memory snapshots: offered to the sender, and one kept after a successful migration.
    pub snapshot_dir: Option<PathBuf>,
    /// Byte budget of the snapshot directory (oldest evicted).
    pub snapshot_max_bytes: u64,
    /// Threads that decode and write the pages (shared engine; 1 to
    /// [`crate::apply::MAX_THREADS`]; default: every core).
    pub threads: usize,
}

impl ReceiveOptions {
    /// Options with defaults for everything but the endpoints.
    pub fn new(listen: String, qmp: PathBuf) -> Self {
        ReceiveOptions {
            listen,
            qmp,
            timeout: Duration::from_secs(60),
            accept_timeout: Duration::from_secs(600),
            cancel: Arc::new(AtomicBool::new(false)),
            transport: Transport::Insecure,
            verify_reread: false,
            disk_images: Vec::new(),
            index_cache: holdings::default_index_cache(),
            disk_align: livemig_index::Align::Auto,
            snapshot_dir: None,
            snapshot_max_bytes: crate::send::DEFAULT_SNAPSHOT_BUDGET,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Migrates in. Returns the report in every case; the destination VM runs only on `Ok`.
pub fn receive(opts: &ReceiveOptions, obs: &mut dyn Observer) -> (Report, Result<(), AgentError>) {
    let start = Instant::now();
    let mut report = Report { role: "receive".into(), transport: opts.transport.name().into(), tracker: "content".into(), ..Report::default() };
    let mut qmp: Option<Qmp> = None;
    let mut conn: Option<Box<dyn Write + Send>> = None;
    let mut fed = Fed::default();
    let result = run(opts, obs, &mut report, &mut qmp, &mut conn, &mut fed);
    report.outcome = match &result {
        Ok(()) => "completed",
        Err(AgentError::Cancelled) => "cancelled",
        Err(AgentError::DestinationStateUnknown(_)) => "unknown",
        Err(_) => "failed",
    }
    .into();
    if let Err(e) = &result {
        report.error = Some(e.chain());
        // Before the sender is told (and resumes the source): the destination QEMU goes.
        if let Some(q) = qmp.as_mut() {
            fed.quit_on_failure(q, e);
        }
        if let Some(c) = conn.as_mut() {
            // A frame that arrived corrupted or malformed leaves the connection up: say why.
            let connection_lost = matches!(
                e,
                AgentError::Wire(WireError::Closed | WireError::Io { .. } | WireError::TimedOut { .. })
            );
            // After a commit whose outcome is unknown, an abort would make the sender resume
            // the source while the destination may run: say nothing, the sender stays unsure.
            let unknown = matches!(e, AgentError::DestinationStateUnknown(_));
            if !matches!(e, AgentError::PeerAborted { .. }) && !connection_lost && !unknown {
                let _ = livemig_wire::write_message(c, &Message::Abort { reason: format!("destination: {}", e.chain()) });
            }
        }
    }
    if let Some(state) = fed.quit.take() {
        report.destination_state = Some(state);
    } else if let Some(q) = qmp.as_mut() {
        report.destination_state = Some(match q.query_status() {
            Ok(s) => s.status,
            Err(e) => format!("unknown ({e})"),
        });
    }
    report.compute_compaction_ratio();
    report.total_time_ms = start.elapsed().as_secs_f64() * 1000.0;
    (report, result)
}

/// After the commit: `cont` on the destination. When `cont` errs or times out QEMU may still have
/// run it, so the destination's real state decides, never the error: `query-status` on the same
/// connection, else on a fresh one to `qmp_path`. Running: `Ok` with a warning saying what
/// happened. Certainly not running: an error (the sender is told and may resume the source).
/// Unknown: [`AgentError::DestinationStateUnknown`] (the sender is told nothing and keeps the
/// source paused).
pub(crate) fn resume_after_commit(qmp: &mut Qmp, qmp_path: &std::path::Path) -> Result<Option<String>, AgentError> {
    // Which process QEMU is, before anything can go wrong (SO_PEERCRED; 0 if not visible here).
    let qemu = qmp.peer_pid().ok().filter(|&p| p > 0).map(|pid| (pid, process_start(pid)));
    let cont_err = match qmp.cont() {
        Ok(()) => return Ok(None),
        Err(e) => e,
    };
    let status = qmp.query_status().or_else(|first| {
        // The old connection may be out of step (a reply that never came): a new one.
        qmp.reconnect(qmp_path).map_err(|e| format!("{first}; a new QMP connection: {e}"))?;
        qmp.query_status().map_err(|e| format!("{first}; on a new QMP connection: {e}"))
    });
    match status {
        Ok(s) if s.running => Ok(Some(format!(
            "`cont` failed ({cont_err}) but the destination VM runs (query-status: {}): the migration completed",
            s.status
        ))),
        Ok(s) => Err(AgentError::Qmp {
            what: format!("cannot resume the destination VM (it is `{}`)", s.status),
            source: cont_err,
        }),
        // A QEMU that is gone (exited, killed: no such process, a zombie, or the pid reused)
        // certainly does not run the guest: the sender may resume the source.
        Err(why) if qemu.is_some_and(|(pid, start)| process_gone(pid, start)) => Err(AgentError::Qmp {
            what: format!("cannot resume the destination VM: its QEMU (pid {}) is gone ({why})", qemu.map_or(0, |q| q.0)),
            source: cont_err,
        }),
        Err(why) => Err(AgentError::DestinationStateUnknown(format!("`cont` failed: {cont_err}; its state cannot be read: {why}"))),
    }
}

/// The capability that keeps the destination's disk images inactive (no write locks taken, no
/// metadata cached) after QEMU loaded the device state, until the commit's `cont` activates them.
/// Without it QEMU before 10.0 activates them as the load ends, before the commit: an abort after
/// that leaves the source unable to take its images back (its `cont` fails on the write lock)
/// while the destination, which must not run, holds them. QEMU 10.0 always delays activation of
/// a destination started with `-S` and still accepts the capability.
pub(crate) const LATE_BLOCK_ACTIVATE: &str = "late-block-activate";

/// Sets [`LATE_BLOCK_ACTIVATE`] on the destination QEMU (before `migrate-incoming`): a QEMU that
/// refuses it is an error, never a silent fallback to early activation.
pub(crate) fn set_late_block_activate(qmp: &mut Qmp) -> Result<(), AgentError> {
    qmp.migrate_set_capabilities(&[(LATE_BLOCK_ACTIVATE, true)]).map_err(AgentError::qmp(
        "the destination QEMU refused the late-block-activate capability (needed so that it does not take the disks' \
         write locks before the commit)",
    ))
}

/// Whether the destination QEMU has been given any of the migration stream, and whether the
/// receiver quit it after a failure.
///
/// Once QEMU loads (or has loaded) a stream, a failure before the commit ends it: `quit`. A
/// QEMU whose load fails exits by itself anyway (its `-incoming` is consumed, it can take no
/// other), and one that loaded the whole state but was not committed holds a copy of a guest
/// that now runs on at the source: left paused, anyone's later `cont` would activate its disk
/// images (where locking is off or absent, e.g. some shared file systems, without a refusal) and
/// run that stale copy against the disks the source has written since. A destination that was
/// never fed (refused in the handshake, say) is left as it is.
#[derive(Default)]
pub(crate) struct Fed {
    pub(crate) fed: bool,
    /// The destination's state as reported once quit.
    pub(crate) quit: Option<String>,
}

impl Fed {
    /// On a failure before the destination may run (not when its state is unknown after a
    /// commit): quits a fed destination QEMU.
    pub(crate) fn quit_on_failure(&mut self, qmp: &mut Qmp, e: &AgentError) {
        if !self.fed || self.quit.is_some() || matches!(e, AgentError::DestinationStateUnknown(_)) {
            return;
        }
        // A QEMU that does not answer (most often: it exited as its load failed) is left to the
        // report's own query.
        let Ok(s) = qmp.query_status() else { return };
        if s.running {
            return;
        }
        self.quit = Some(match qmp.execute("quit", None) {
            Ok(_) => format!("quit by the receiver (it was `{}`, never resumed)", s.status),
            Err(e) => format!("{} (the receiver's quit failed: {e})", s.status),
        });
    }
}

/// The fields of /proc/PID/stat after the command name: (state, start time in clock ticks).
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = text.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Field 3 is the state, field 22 the start time (man 5 proc): indexes 0 and 19 here.
    Some((f.first()?.chars().next()?, f.get(19)?.parse().ok()?))
}

fn process_start(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, start)| start)
}

/// Whether process `pid` (started at `start`) no longer exists as a living process.
fn process_gone(pid: u32, start: Option<u64>) -> bool {
    match proc_stat(pid) {
        None => true,
        Some((state, now)) => matches!(state, 'Z' | 'X' | 'x') || start.is_some_and(|s| s != now),
    }
}

fn run(
    opts: &ReceiveOptions,
    obs: &mut dyn Observer,
    report: &mut Report,
    qmp_slot: &mut Option<Qmp>,
    conn_slot: &mut Option<Box<dyn Write + Send>>,
    fed: &mut Fed,
) -> Result<(), AgentError> {
    let listener = TcpListener::bind(&opts.listen)
        .map_err(|source| AgentError::Network { what: format!("cannot listen on {}", opts.listen), source })?;
    let local = listener
        .local_addr()
        .map_err(|source| AgentError::Network { what: "cannot read the listening address".into(), source })?;
    obs.progress(Progress::Listening(local));

    let qmp = qmp_slot.insert(
        Qmp::connect(&opts.qmp, opts.timeout)
            .map_err(AgentError::qmp(format!("cannot reach the destination QEMU's QMP socket {}", opts.qmp.display())))?,
    );
    let status = qmp.query_status().map_err(AgentError::qmp("cannot query the destination VM's state"))?;
    if status.status != "inmigrate" {
        return Err(AgentError::Incompatible(format!(
            "the destination QEMU is in state `{}`; start it with `-incoming defer` (it must not have run)",
            status.status
        )));
    }
    let version = crate::qemu::QemuVersion::of(qmp)?;
    report.qemu_version = Some(version.to_string());
    if !opts.disk_images.is_empty() {
        obs.progress(Progress::Phase("indexing the disk images"));
    }
    let indexes = holdings::load_indexes(&opts.disk_images, &opts.index_cache, opts.disk_align, obs, report)?;
    let store = match &opts.snapshot_dir {
        Some(d) => Some(
            SnapshotStore::open(d, opts.snapshot_max_bytes)
                .map_err(|e| AgentError::Holdings(format!("cannot open the snapshot directory {}: {e}", d.display())))?,
        ),
        None => None,
    };
    let dir = crate::private_dir("receive")?;
    let incoming = dir.path().join("incoming.sock");

    obs.progress(Progress::Phase("waiting for the sender"));
    let wait = arrival::Wait::new(&opts.transport, (opts.timeout, opts.accept_timeout), &opts.cancel, "the sender");
    let arrival::Arrived { stream, mut reader, writer, hello, key, welcome_key } = arrival::receive_sender(&listener, &wait, obs, report)?;
    // Kept by the caller, so a failure can still tell the sender why.
    let writer = conn_slot.insert(writer);
    let count = Arc::clone(&reader.count);
    // A tunnel sender, or an engine this build does not know, is refused before QEMU is touched.
    if let Some(reason) = crate::stream::tunnel::receive_refuses(&hello) {
        return Err(refuse(writer, reason));
    }
    if matches!(&hello, Message::Hello { engine, .. } if engine == ENGINE_STREAM) {
        report.engine = ENGINE_STREAM.into();
        report.tracker = "qemu".into();
        return receive_stream(
            opts,
            obs,
            report,
            qmp,
            hello,
            (reader, conn_slot, &stream),
            (listener, &wait),
            &incoming,
            (&indexes, store.as_ref()),
            (&key, welcome_key),
            fed,
        );
    }
    report.engine = ENGINE_SHARED.into();
    let mem = GuestMemory::open(qmp)?;
    crate::qemu::check_shared_engine(version, &crate::qemu::memfd_regions(&mem), "destination")
        .inspect_err(|e| refuse_with(writer, e))?;
    let total = mem.total_pages();
    report.ram_bytes = mem.layout().iter().map(|(_, s)| s).sum();
    obs.progress(Progress::Phase("preparing destination memory"));
    let cleared = clear_memory(&mem)?;
    if cleared > 0 {
        obs.progress(Progress::Phase("destination memory held data: cleared it"));
    }
    let ledger = Ledger::zeroed(total, key.clone());
    qmp.migrate_set_capabilities(&[("x-ignore-shared", true)])
        .map_err(AgentError::qmp("cannot enable x-ignore-shared on the destination QEMU"))?;
    set_late_block_activate(qmp)?;
    qmp.migrate_incoming(&format!("unix:{}", incoming.display()))
        .map_err(AgentError::qmp("the destination QEMU refused migrate-incoming"))?;
    let peer = handshake(hello, writer, &mem, &opts.disk_images, &indexes, store.as_ref(), welcome_key)?;
    report.vm = peer.vm.clone();
    report.disk_images_used = peer.disks_held;
    let (snapshot, _, joined) = plan_and_joins(
        (&mut reader, writer, &stream),
        (listener, &wait),
        (peer.join.as_deref(), "from protocol 6"),
        (store.as_ref(), peer.vm.as_ref()),
        obs,
        report,
    )?;
    // The received memory, kept as a snapshot of the VM once it runs here.
    let keep: Option<SnapshotWriter<'_>> = match (&store, &peer.vm) {
        (Some(store), Some(vm)) => match store.writer(vm, total) {
            Ok(w) => Some(w),
            Err(e) => {
                report.warnings.push(format!("no memory snapshot will be kept: {}", crate::with_sources(&e)));
                None
            }
        },
        _ => None,
    };
    let held = crate::apply::Held { disks: &peer.disks, snapshot: snapshot.as_ref() };
    let mut target = crate::apply::Target::new(&mem, total, &key, &held, ledger);
    target.keep = std::sync::Mutex::new(keep);
    let pool = crate::apply::Pool::new(opts.threads);
    report.threads = Some(pool.threads());
    let counts = arrival::WireCounts::new(&count, &joined);
    let wire_bytes = || counts.total();
    std::thread::scope(|s| {
        let feeder = pool.start(s, &target)?;
        // Dropped when this closure returns: the data connections are shut, so their readers end
        // before the scope waits for them.
        let data = DataConnections::start(s, joined.into_iter().map(|j| (j.index, j.stream, j.reader)).collect(), &feeder)?;
        apply_loop(opts, obs, report, qmp, writer, fed, &incoming, (reader, &feeder, data), &target, &wire_bytes)
    })
}

/// The shared engine's receiving loop: the first connection's frames (control, device state,
/// its share of the pages), the data connections' fences, until the commit.
#[allow(clippy::too_many_arguments)]
fn apply_loop(
    opts: &ReceiveOptions,
    obs: &mut dyn Observer,
    report: &mut Report,
    qmp: &mut Qmp,
    writer: &mut Box<dyn Write + Send>,
    fed: &mut Fed,
    incoming: &std::path::Path,
    (reader, feeder, mut data): (Counting<Box<dyn Read + Send>>, &crate::apply::Feeder<'_>, DataConnections),
    target: &crate::apply::Target<'_, '_>,
    wire_bytes: &dyn Fn() -> u64,
) -> Result<(), AgentError> {
    let (mem, key, total) = (target.mem, target.key, target.total);
    let mut dev: Option<UnixStream> = None;
    let mut dev_bytes = 0u64;
    let mut loaded = false;
    let mut iter_start = Instant::now();
    let mut iter_bytes_mark = wire_bytes();
    let mut keep_warned = false;
    // Frames are read by a thread, so the socket is drained while pages are decoded.
    let frames = link::read_frames(reader, 8);
    loop {
        if opts.cancel.load(Ordering::Relaxed) {
            return Err(AgentError::Cancelled);
        }
        let frame = loop {
            crossbeam_channel::select! {
                recv(frames) -> f => break f.unwrap_or(Err(WireError::Closed))?,
                recv(data.events()) -> e => {
                    if let Ok(e) = e {
                        data.take(e)?;
                    }
                }
            }
        };
        report.wire_bytes = wire_bytes();
        match frame.kind {
            FrameKind::Pages => feeder.apply(frame.payload)?,
            FrameKind::DeviceState => {
                if dev.is_none() {
                    fed.fed = true;
                    obs.progress(Progress::Phase("loading device state into the destination QEMU"));
                    dev = Some(UnixStream::connect(incoming).map_err(|source| AgentError::Network {
                        what: "cannot connect to the destination QEMU's incoming migration socket".into(),
                        source,
                    })?);
                }
                let d = dev.as_mut().expect("just connected");
                d.write_all(&frame.payload).map_err(|source| AgentError::Network {
                    what: "the destination QEMU stopped reading the device state".into(),
                    source,
                })?;
                dev_bytes += frame.payload.len() as u64;
            }
            FrameKind::Invalid | FrameKind::Stream | FrameKind::ReturnPath => {
                return Err(AgentError::Protocol { expected: "a shared-engine frame".into(), got: format!("{:?}", frame.kind) })
            }
            FrameKind::Control => match frame.message()? {
                Message::IterationEnd { index, pages, last } => {
                    // Every batch of the iteration, from every connection, applied.
                    data.wait_fences(index, opts.timeout)?;
                    let misses = feeder.wait_idle(target)?;
                    let (_, zeroed) = feeder.totals();
                    report.zero_pages_punched = Some(zeroed.punched);
                    report.zero_pages_written = Some(zeroed.written);
                    if !keep_warned {
                        if let Some(e) = target.keep_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone() {
                            report.warnings.push(format!("no memory snapshot will be kept: {e}"));
                            keep_warned = true;
                        }
                    }
                    if !misses.is_empty() {
                        report.resent_pages += misses.len() as u64;
                        for chunk in misses.chunks(MAX_RESEND_PAGES) {
                            livemig_wire::write_message(writer, &Message::Resend { pages: chunk.to_vec() })?;
                        }
                    }
                    // The destination QEMU must still be there to take the device state.
                    qmp.query_status().map_err(AgentError::qmp("the destination QEMU is gone"))?;
                    let now = wire_bytes();
                    let dur = iter_start.elapsed();
                    let stats = IterationStats {
                        index,
                        dirty_pages: pages,
                        sent_pages: pages,
                        wire_bytes: now - iter_bytes_mark,
                        duration_ms: dur.as_secs_f64() * 1000.0,
                        scan_ms: 0.0,
                        rate_bytes_per_s: (now - iter_bytes_mark) as f64 / dur.as_secs_f64().max(1e-6),
                        throttle: 0.0,
                    };
                    let rec = IterationRecord {
                        stats,
                        decision: if last { "final" } else { "received" }.into(),
                        reason: String::new(),
                        predicted_downtime_ms: None,
                        fit: None,
                        last,
                        tracker_pause_ms: None,
                    };
                    obs.progress(Progress::Iteration(&rec));
                    report.iterations.push(rec);
                    iter_start = Instant::now();
                    iter_bytes_mark = now;
                    // Applied: the sender measures its iterations up to here.
                    livemig_wire::write_message(writer, &Message::EndAck { index })?;
                }
                Message::Switchover { digest, pages } => {
                    feeder.wait_idle(target)?;
                    let ours = if opts.verify_reread {
                        // Prove the memory itself, not the record of what was written.
                        obs.progress(Progress::Phase("re-reading the destination memory"));
                        let t = Instant::now();
                        let d = reread_digest(mem, key)?;
                        report.verification.reread_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
                        d
                    } else {
                        target.ledger().digest()
                    };
                    let theirs: Option<Digest> = digest.parse().ok();
                    let ok = theirs == Some(ours) && pages == total;
                    report.verification.source_digest = Some(digest.clone());
                    report.verification.destination_digest = Some(ours.to_string());
                    report.verification.ok = ok;
                    livemig_wire::write_message(writer, &Message::Verified { ok, digest: ours.to_string() })?;
                    if !ok {
                        return Err(AgentError::VerifyMismatch { source_digest: digest, destination_digest: ours.to_string() });
                    }
                    obs.progress(Progress::Phase("memory verified: keyed digests equal"));
                }
                Message::DeviceStateEnd { bytes } => {
                    if bytes != dev_bytes || !report.verification.ok {
                        return Err(AgentError::Protocol {
                            expected: format!("{bytes} bytes of device state after verified memory"),
                            got: format!("{dev_bytes} bytes"),
                        });
                    }
                    drop(dev.take());
                    report.device_state_bytes = dev_bytes;
                    let info = qmp.wait_migration(opts.timeout).map_err(AgentError::qmp("cannot follow the destination's migration"))?;
                    if info.status.as_deref() != Some("completed") {
                        return Err(AgentError::DeviceState(info.error_desc.unwrap_or_else(|| {
                            format!("the destination's migration ended in status {}", info.status.unwrap_or_default())
                        })));
                    }
                    let s = qmp.query_status().map_err(AgentError::qmp("cannot query the destination VM's state"))?;
                    if s.running {
                        return Err(AgentError::Incompatible("the destination VM started running before the commit".into()));
                    }
                    loaded = true;
                    livemig_wire::write_message(writer, &Message::Loaded)?;
                }
                Message::Commit => {
                    if !loaded {
                        return Err(AgentError::Protocol { expected: "device state before commit".into(), got: "commit".into() });
                    }
                    if let Some(w) = resume_after_commit(qmp, &opts.qmp)? {
                        obs.progress(Progress::Phase(&w));
                        report.warnings.push(w);
                    }
                    let _ = livemig_wire::write_message(writer, &Message::Resumed);
                    obs.progress(Progress::Phase("completed: the destination VM runs"));
                    report.wire_bytes = wire_bytes();
                    let (stats, _) = feeder.totals();
                    report.set_class_stats(&stats);
                    let keep = target.keep.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
                    if let Some(w) = keep {
                        obs.progress(Progress::Phase("keeping a memory snapshot of the VM"));
                        match w.finish(target.ledger().digest().0) {
                            Ok(info) => report.snapshot_kept = Some(format!("{:032x}", info.id)),
                            Err(e) => report.warnings.push(format!("the memory snapshot was not kept: {}", crate::with_sources(&e))),
                        }
                    }
                    return Ok(());
                }
                Message::Abort { reason } => return Err(AgentError::PeerAborted { peer: "source", reason }),
                other => {
                    return Err(AgentError::Protocol { expected: "pages or a switchover message".into(), got: other.name().into() })
                }
            },
        }
    }
}

/// Reads the sender's plan (a snapshot of the VM this host holds, or none; its number of
/// connections, within [`MAX_CONNECTIONS`] and more than 1 only if this host offered a `join`
/// secret; `protocol` says from which protocol in the refusal) and accepts its data connections
/// on `listener`, which is then closed: every later connection is refused by the kernel.
fn plan_and_joins(
    (reader, writer, socket): (&mut Counting<Box<dyn Read + Send>>, &mut Box<dyn Write + Send>, &TcpStream),
    (listener, wait): (TcpListener, &arrival::Wait<'_>),
    (join, protocol): (Option<&str>, &str),
    (store, vm): (Option<&SnapshotStore>, Option<&String>),
    obs: &mut dyn Observer,
    report: &mut Report,
) -> Result<(Option<Snapshot>, u32, Vec<arrival::Joined>), AgentError> {
    let (snapshot, connections): (Option<Snapshot>, u32) = match livemig_wire::read_message(reader)? {
        Message::Plan { connections, .. } if connections == 0 || connections > MAX_CONNECTIONS || (connections > 1 && join.is_none()) => {
            return Err(refuse(writer, format!("the source plans {connections} connections; this destination takes 1 to {MAX_CONNECTIONS} (more than 1 {protocol})")))
        }
        Message::Plan { snapshot: None, connections } => (None, connections),
        Message::Plan { snapshot: Some(id), connections } => {
            let (Some(store), Some(vm)) = (store, vm) else {
                return Err(AgentError::Protocol { expected: "no snapshot (none was offered)".into(), got: format!("snapshot {id}") });
            };
            report.snapshot_used = Some(id.clone());
            (Some(holdings::open_snapshot(store, vm, holdings::parse_id(&id)?)?), connections)
        }
        Message::Abort { reason } => return Err(AgentError::PeerAborted { peer: "source", reason }),
        other => return Err(AgentError::Protocol { expected: "plan".into(), got: other.name().into() }),
    };
    report.connections = Some(connections);
    let joined = match join.filter(|_| connections > 1) {
        Some(token) => {
            obs.progress(Progress::Phase(&format!("waiting for the sender's {} data connections", connections - 1)));
            arrival::accept_joins_watching(&listener, wait, (token, connections), (reader, socket), obs, report).inspect_err(|e| refuse_with(writer, e))?
        }
        None => Vec::new(),
    };
    drop(listener);
    Ok((snapshot, connections, joined))
}

/// The sender's first connection: its reading half, the slot of its writing half (kept by the
/// caller, so a failure can still tell the sender why), its socket.
type FirstConnection<'a> = (Counting<Box<dyn Read + Send>>, &'a mut Option<Box<dyn Write + Send>>, &'a TcpStream);

/// The stream engine's side of the handshake and set-up, then [`crate::stream::receive::run`].
#[allow(clippy::too_many_arguments)]
fn receive_stream(
    opts: &ReceiveOptions,
    obs: &mut dyn Observer,
    report: &mut Report,
    qmp: &mut Qmp,
    hello: Message,
    (mut reader, conn_slot, stream): FirstConnection<'_>,
    (listener, wait): (TcpListener, &arrival::Wait<'_>),
    incoming: &std::path::Path,
    (indexes, store): (&[livemig_index::DiskIndex], Option<&SnapshotStore>),
    (key, welcome_key): (&PageKey, Option<String>),
    fed: &mut Fed,
) -> Result<(), AgentError> {
    let writer = conn_slot.as_mut().expect("connected");
    let who = crate::stream::receive::Parties { sender: "the source", with: " with the stream engine", me: "this destination" };
    // The VM's snapshots this host holds, offered; one is kept of this migration.
    let vm = match &hello {
        Message::Hello { vm, .. } => holdings::peer_vm(vm.clone()),
        _ => None,
    };
    report.vm.clone_from(&vm);
    let snapshots = match (store, &vm) {
        (Some(store), Some(vm)) => holdings::snapshot_ids(store, vm)?,
        _ => Vec::new(),
    };
    let (rdisks, join) = crate::stream::receive::welcome_sender(writer, hello, (&opts.disk_images, indexes), (welcome_key, snapshots), report, &who)?;
    let (snapshot, connections, joined) =
        plan_and_joins((&mut reader, writer, stream), (listener, wait), (join.as_deref(), "with the stream engine from protocol 7"), (store, vm.as_ref()), obs, report)?;
    let keeper = match (store, &vm) {
        (Some(store), Some(vm)) => Some(crate::stream::keep::Keeper::spawn(store.clone(), vm.clone())?),
        _ => None,
    };
    let caps = match livemig_wire::read_message(&mut reader)? {
        Message::StreamSetup { capabilities } => capabilities,
        Message::Abort { reason } => return Err(AgentError::PeerAborted { peer: "source", reason }),
        other => return Err(AgentError::Protocol { expected: "stream-setup".into(), got: other.name().into() }),
    };
    if caps.len() > 64 {
        return Err(refuse(writer, format!("{} migration capabilities", caps.len())));
    }
    let pairs: Vec<(&str, bool)> = caps.iter().map(|(c, s)| (c.as_str(), *s)).collect();
    if let Err(e) = qmp.migrate_set_capabilities(&pairs) {
        return Err(refuse(writer, format!("the destination QEMU refused the source's migration capabilities: {e}")));
    }
    // After the source's list, which cannot turn it off.
    if let Err(e) = set_late_block_activate(qmp) {
        return Err(refuse(writer, e.chain()));
    }
    qmp.migrate_incoming(&format!("unix:{}", incoming.display())).map_err(AgentError::qmp("the destination QEMU refused migrate-incoming"))?;
    let qemu_sock = crate::stream::receive::connect_incoming(incoming, opts.timeout)?;
    fed.fed = true;
    livemig_wire::write_message(writer, &Message::StreamReady)?;
    stream.set_read_timeout(None).map_err(|source| AgentError::Network { what: "cannot configure the socket".into(), source })?;
    let counts = arrival::WireCounts::new(&reader.count, &joined);
    let frames = crate::stream::conns::Ordered::start_joined(link::read_frames(reader, 64), joined, connections, opts.timeout)?;
    let w = conn_slot.take().expect("connected");
    let mut writer = link::Writer::spawn(w, None);
    obs.progress(Progress::Phase("rebuilding QEMU's stream into the destination QEMU"));
    let held = crate::stream::receive::Held { disks: &rdisks, snapshot: snapshot.as_ref(), keep: keeper.as_ref().map(crate::stream::keep::Keeper::feed) };
    let r = crate::stream::receive::run(opts, obs, report, qmp, qemu_sock, frames.frames(), &mut writer, held, key);
    report.wire_bytes = counts.total();
    if let (Ok(()), Some(k)) = (&r, keeper) {
        // The destination runs with the memory the stream carried up to its checked digest.
        let id = report.verification.source_digest.as_deref().and_then(|d| u128::from_str_radix(d, 16).ok());
        crate::stream::keep::publish(k, id.ok_or_else(|| "the stream's RAM was not checked".to_string()), obs, report);
    }
    if let Err(e) = &r {
        // Before the sender is told (and resumes the source): the destination QEMU goes.
        fed.quit_on_failure(qmp, e);
        let connection_lost = matches!(e, AgentError::Wire(WireError::Closed | WireError::Io { .. } | WireError::TimedOut { .. }));
        if !matches!(e, AgentError::PeerAborted { .. }) && !connection_lost {
            let _ = writer.send(link::Out::Message(Message::Abort { reason: format!("destination: {}", e.chain()) }));
            let _ = writer.marker(Duration::from_secs(2));
        }
    }
    drop(frames);
    let _ = writer.finish();
    r
}

/// The digest of the destination memory as it is now, read back page by page, its page hashes
/// keyed with the migration's `key`. Holes read as zero and are not read (reading one would
/// allocate it).
fn reread_digest(mem: &GuestMemory, key: &PageKey) -> Result<Digest, AgentError> {
    let mut buf = Box::new(PageBuf::zeroed());
    let mut d = Digest(0);
    let data = mem.data_ranges();
    let zero = key.zero_hash();
    for p in 0..mem.total_pages() {
        let hash = if livemig_track::in_ranges(data.as_deref(), p) {
            mem.read_page(p, &mut buf)?;
            key.hash_page(&buf.0)
        } else {
            zero
        };
        d.add(p, hash);
    }
    Ok(d)
}


/// What the handshake settled with the sender.
struct Peer {
    vm: Option<String>,
    disks: ReceiverDisks,
    disks_held: usize,
    /// The secret data connections present (protocol 6).
    join: Option<String>,
}

/// Refuses the sender: `abort` with `reason` (best effort), and the error that ends the receiver.
pub(crate) fn refuse(writer: &mut dyn Write, reason: String) -> AgentError {
    let _ = livemig_wire::write_message(writer, &Message::Abort { reason: reason.clone() });
    AgentError::Incompatible(reason)
}

/// Tells the sender why this destination refuses, before the error ends the receiver.
fn refuse_with(writer: &mut dyn Write, e: &AgentError) {
    let _ = livemig_wire::write_message(writer, &Message::Abort { reason: e.chain() });
}

fn handshake(
    hello: Message,
    writer: &mut impl Write,
    mem: &GuestMemory,
    images: &[PathBuf],
    indexes: &[livemig_index::DiskIndex],
    store: Option<&SnapshotStore>,
    page_key: Option<String>,
) -> Result<Peer, AgentError> {
    let Message::Hello { version, min_version, software, page_size, regions, vm, disks, engine: _ } = hello else {
        return Err(AgentError::Protocol { expected: "hello".into(), got: hello.name().into() });
    };
    let Some(v) = negotiate(min_version, version) else {
        return Err(refuse(
            writer,
            format!(
                "protocol version mismatch: the source ({software}) speaks {min_version}..{version}, this destination {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}"
            ),
        ));
    };
    if page_size != 4096 {
        return Err(refuse(writer, format!("the source uses {page_size}-byte pages; this destination 4096")));
    }
    let ours: Vec<RegionInfo> = mem.layout().into_iter().map(|(id, size)| RegionInfo { id, size }).collect();
    if ours != regions {
        let show = |r: &[RegionInfo]| {
            r.iter().map(|x| format!("{} {} MiB", x.id, x.size >> 20)).collect::<Vec<_>>().join(", ")
        };
        return Err(refuse(
            writer,
            format!("RAM layout differs: source has {}, destination has {}", show(&regions), show(&ours)),
        ));
    }
    let (rdisks, held) = match ReceiverDisks::answer(&disks, images, indexes) {
        Ok(x) => x,
        Err(e) => return Err(refuse(writer, e.chain())),
    };
    let vm = holdings::peer_vm(vm);
    let snapshots = match (store, &vm) {
        (Some(store), Some(vm)) => holdings::snapshot_ids(store, vm)?,
        _ => Vec::new(),
    };
    let disks_held = held.len();
    // Data connections present this secret (protocol 6; an older sender would refuse the field).
    let join = if v >= CONNECTIONS_PROTOCOL_VERSION { Some(join_secret()?) } else { None };
    livemig_wire::write_message(
        writer,
        &Message::Welcome { version: v, software: SOFTWARE.into(), holds: holdings::holdings(held, snapshots), page_key, join: join.clone() },
    )?;
    Ok(Peer { vm, disks: rdisks, disks_held, join })
}

/// A random secret for the data connections' `join` (32 hex digits).
pub(crate) fn join_secret() -> Result<String, AgentError> {
    let k = livemig_tls::random_key().map_err(|e| AgentError::Tls { what: "cannot make the join secret".into(), source: Box::new(e) })?;
    Ok(k[..16].iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Zeroes every page of the destination that is not zero, so the destination starts from the
/// state the source assumes. Returns the pages cleared.
fn clear_memory(mem: &GuestMemory) -> Result<u64, AgentError> {
    let mut buf = Box::new(PageBuf::zeroed());
    let zero = Box::new(PageBuf::zeroed());
    let mut cleared = 0;
    // Only pages that hold data: reading a hole would allocate it for nothing.
    let ranges: Vec<std::ops::Range<u64>> = mem.data_ranges().unwrap_or_else(|| std::iter::once(0..mem.total_pages()).collect());
    for p in ranges.into_iter().flatten() {
        mem.read_page(p, &mut buf)?;
        if !is_zero(&buf.0) {
            mem.write_page(p, &zero.0)?;
            cleared += 1;
        }
    }
    Ok(cleared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::io::{BufRead, BufReader};

    /// A fake destination QEMU on a socket pair: answers every command after the greeting with
    /// `answer(command)`; the thread returns the commands it got (`qmp_capabilities` left out).
    fn fake_qemu(answer: impl Fn(&Value) -> Value + Send + 'static) -> (Qmp, std::thread::JoinHandle<Vec<Value>>) {
        let (client, server) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut w = server.try_clone().unwrap();
            let mut r = BufReader::new(server);
            writeln!(w, r#"{{"QMP": {{"version": {{"qemu": {{"micro": 2, "minor": 2, "major": 7}}, "package": ""}}, "capabilities": []}}}}"#).unwrap();
            let mut seen = Vec::new();
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(n) if n > 0 => {}
                    _ => return seen,
                }
                let cmd: Value = serde_json::from_str(&line).unwrap();
                let mut reply = if cmd["execute"] == "qmp_capabilities" { json!({ "return": {} }) } else { answer(&cmd) };
                reply["id"] = cmd["id"].clone();
                writeln!(w, "{reply}").unwrap();
                if cmd["execute"] != "qmp_capabilities" {
                    seen.push(cmd);
                }
            }
        });
        (Qmp::from_stream(client, Duration::from_secs(5)).unwrap(), t)
    }

    #[test]
    fn late_block_activate_is_set_and_a_refusal_is_a_clear_error() {
        let (mut qmp, t) = fake_qemu(|_| json!({ "return": {} }));
        set_late_block_activate(&mut qmp).unwrap();
        drop(qmp);
        let seen = t.join().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0]["execute"], "migrate-set-capabilities");
        assert_eq!(seen[0]["arguments"], json!({ "capabilities": [{ "capability": "late-block-activate", "state": true }] }));

        let (mut qmp, t) = fake_qemu(|_| json!({ "error": { "class": "GenericError", "desc": "Capability 'late-block-activate' is unknown" } }));
        let e = set_late_block_activate(&mut qmp).unwrap_err().chain();
        assert!(e.contains("refused the late-block-activate capability") && e.contains("is unknown"), "{e}");
        drop(qmp);
        t.join().unwrap();
    }

    fn status(s: &str, running: bool) -> Value {
        json!({ "return": { "status": s, "running": running, "singlestep": false } })
    }

    #[test]
    fn a_fed_destination_is_quit_on_a_failure_before_the_commit() {
        let answer = |cmd: &Value| if cmd["execute"] == "query-status" { status("paused", false) } else { json!({ "return": {} }) };
        let (mut qmp, t) = fake_qemu(answer);
        let mut fed = Fed { fed: true, quit: None };
        fed.quit_on_failure(&mut qmp, &AgentError::Cancelled);
        // Once only.
        fed.quit_on_failure(&mut qmp, &AgentError::Cancelled);
        drop(qmp);
        let seen: Vec<Value> = t.join().unwrap().into_iter().map(|c| c["execute"].clone()).collect();
        assert_eq!(seen, [json!("query-status"), json!("quit")]);
        assert_eq!(fed.quit.as_deref(), Some("quit by the receiver (it was `paused`, never resumed)"));
    }

    #[test]
    fn an_unfed_running_or_unknown_destination_is_not_quit() {
        // Never fed (refused in the handshake): untouched.
        let (mut qmp, t) = fake_qemu(move |_| status("inmigrate", false));
        let mut fed = Fed::default();
        fed.quit_on_failure(&mut qmp, &AgentError::Cancelled);
        // Its state unknown after a commit: it may run, so nothing is done.
        fed.fed = true;
        fed.quit_on_failure(&mut qmp, &AgentError::DestinationStateUnknown("test".into()));
        drop(qmp);
        assert!(t.join().unwrap().is_empty());
        assert!(fed.quit.is_none());
        // Running: not quit.
        let (mut qmp, t) = fake_qemu(move |_| status("running", true));
        fed.quit_on_failure(&mut qmp, &AgentError::Cancelled);
        drop(qmp);
        let seen: Vec<Value> = t.join().unwrap().into_iter().map(|c| c["execute"].clone()).collect();
        assert_eq!(seen, [json!("query-status")]);
        assert!(fed.quit.is_none());
    }
}
