//! The stream engine's `send`: QEMU runs its own pre-copy (its dirty tracking, any RAM) into a
//! socket this process owns; the relay ([`super::source`]) compacts it onto livemig's
//! connection, and this loop steers the switchover over QMP with the same controllers as the
//! shared engine. Phases: setup -> precopy (QEMU iterates; the destination's switchover-ack is
//! held here while the controller says iterate) -> switchover (the ack goes to QEMU, QEMU
//! stops the guest and completes) -> commit (the destination resumes).
//!
//! Levers: the withheld `SWITCHOVER_ACK` (QEMU >= 8.1) keeps QEMU iterating with the guest
//! running; `downtime-limit` is the operator's maximum; `avail-switchover-bandwidth` (QEMU >= 8.2)
//! is set to the rate the relay actually drains QEMU's stream at, so QEMU's own check of the
//! pending pages against the limit uses the link's rate, not the local socket's; throttling is
//! QEMU's CPU throttle (`auto-converge`, its level capped by `max-cpu-throttle` as the
//! controller asks), never `stop`/`cont` of a VM whose migration QEMU may complete at any time.

use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livemig_compact::EncodeOptions;
use livemig_control::{Decision, IterationStats, Limits, Pending};
use livemig_stream::{ReturnPathParser, RpEvent, RpKind};
use livemig_wire::{FrameKind, Holdings, Message, WireError, ENGINE_STREAM, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, STREAM_PROTOCOL_VERSION};
use serde_json::json;

use super::chunk::resend_payload;
use super::source::{relay_source, RelayStats, ResentStats, SourceConfig, Window, DEFAULT_WINDOW};
use crate::error::AgentError;
use super::keep::Keeper;
use crate::holdings::{self, SenderDisks, SenderSnapshot};
use super::conns::Spread;
use crate::link::{self, Links, Out, Writer};
use crate::qemu::QemuVersion;
use crate::report::{IterationRecord, Report, ThrottleReport};
use crate::send::{SendOptions, SourceState};
use crate::{Observer, Progress, SOFTWARE};

/// Connections of the stream engine when `--connections` is not given: one, not the shared
/// engine's [`crate::send::default_connections`] (2 on this project's 2-core machine).
///
/// Measured (BENCHMARKS.md, "The stream engine over several connections"): the relay between
/// a fake source and destination QEMU, both ends on the same 2 cores, TLS,
/// `livemig-dev pipeline --engine stream --compressor lz4 --connections 1,2 --repeat 5`:
/// 0.54 GB/s of guest RAM over one connection against 0.36 over two (one encoder thread; 0.57
/// against 0.43 with two), and more CPU seconds over two. What limits the stream engine here is
/// its serial relay and rebuild, not one connection's TLS; the extra reader, reorder and TLS
/// threads only compete for the same cores. Where a link needs several TCP connections (a long
/// fat network), `--connections N` says so.
pub const DEFAULT_CONNECTIONS: u32 = 1;

/// How often the controller samples QEMU's migration (an iteration is at least this long and
/// ends at a sample after QEMU synced its dirty bitmap again).
const SAMPLE: Duration = Duration::from_millis(250);
/// The shortest iteration the controller is shown (see `steer`).
const MIN_ITERATION: Duration = Duration::from_millis(500);
/// How often a long pass of QEMU's says how much it has left.
const PASS_NOTE: Duration = Duration::from_secs(5);
/// The share of the operator's maximum downtime the controller aims at. QEMU's final pass is
/// the pages left in its pass (`remaining`, which the controller sees) and those dirtied since
/// its last sync (which it does not): with a guest rewriting a 16 MiB working set flat out the
/// final pass was 5-20 % above `remaining` (VM test `stream_hot_guest_...`).
const STREAM_AIM: f64 = 0.85;

/// Re-sent pages needed before their cost is known.
const MIN_RESENT: u64 = 64;
/// A page record of QEMU's stream sent whole: the page and its header (8-byte offset and
/// flags, and the block's name on a block's first page).
const WHOLE_PAGE_RECORD: f64 = 4096.0 + 8.0;

/// What a switchover now would cost beyond QEMU's pending pages, and the rate QEMU's own check
/// gets. The relay's drain rate of QEMU's stream (raw bytes acknowledged per second) counts the
/// first pass's cold pages, which compact far better than the pages a final pass re-sends (a
/// hot working set rewritten flat out: about 1x, where the first pass went at 2x): the link's
/// wire rate and what re-sent pages cost on the wire price the final pass instead.
#[derive(Debug, Clone, Copy)]
struct Costs {
    /// Raw stream bytes the relay holds unacknowledged.
    queued_raw: u64,
    /// Their time to cross the link (they go before the final pass).
    queued_ms: f64,
    /// The estimated device state's time on the link.
    device_ms: f64,
    /// Wire bytes per re-sent page ([`WHOLE_PAGE_RECORD`] until enough were re-sent).
    bytes_per_page: f64,
    /// Raw stream bytes per second of the final pass: the link's rate at the re-sent pages'
    /// raw/wire ratio, at most the relay's drain rate; the drain rate alone before any re-send.
    raw_rate: Option<f64>,
}

impl Costs {
    fn now(window: &Window, link: f64, resent: Option<ResentStats>) -> Costs {
        let drain = window.drain_rate(DRAIN_SPAN);
        let queued_raw = window.fill().0;
        let (queued_ms, device_ms) = if link > 0.0 {
            (window.queued_wire() as f64 / link * 1000.0, livemig_control::DEVICE_STATE_ESTIMATE_BYTES / link * 1000.0)
        } else {
            let at = |b: f64| drain.map_or(0.0, |r| b / r * 1000.0);
            (at(queued_raw as f64), at(livemig_control::DEVICE_STATE_ESTIMATE_BYTES))
        };
        // Before QEMU re-sent enough pages to tell, they are taken at their whole size: the
        // first pass's compaction says nothing of a hot working set's (a switchover decided
        // right after the first pass took 1.47 s where 0.62 was predicted at its ratio).
        let (wire, raw) = resent.map_or((WHOLE_PAGE_RECORD, WHOLE_PAGE_RECORD), |r| (r.wire_bytes as f64 / r.pages as f64, r.raw_bytes as f64 / r.pages as f64));
        let bytes_per_page = wire;
        let raw_rate = if link > 0.0 && wire > 0.0 {
            let rate = link * raw / wire;
            Some(drain.map_or(rate, |d| rate.min(d)))
        } else {
            drain
        };
        Costs { queued_raw, queued_ms, device_ms, bytes_per_page, raw_rate }
    }
}

/// The span of the relay's drain rate (raw stream bytes acknowledged per second) that prices
/// the stream it holds and the device state, and that QEMU gets as its switchover bandwidth.
const DRAIN_SPAN: Duration = Duration::from_secs(2);

/// The capabilities the source QEMU migrates with: what the relay needs on, what it cannot
/// parse off; each only if this QEMU knows it. `bitmaps`: the VM has block dirty bitmaps that
/// live only in QEMU, so `dirty-bitmaps` stays on (nothing of the VM is dropped; the parser
/// passes the stream verbatim from their section on, said in the report).
fn capabilities(known: &[String], version: QemuVersion, throttle: bool, bitmaps: bool) -> Vec<(String, bool)> {
    let mut caps = vec![("return-path", true), ("x-ignore-shared", false), ("auto-converge", throttle), ("dirty-bitmaps", bitmaps)];
    if version >= QemuVersion::NAMED_FILE_ONLY {
        caps.push(("switchover-ack", true));
    }
    for off in ["multifd", "xbzrle", "compress", "postcopy-ram", "postcopy-preempt", "mapped-ram", "block", "dirty-limit", "zero-blocks", "x-colo", "background-snapshot", "rdma-pin-all", "validate-uuid"] {
        caps.push((off, false));
    }
    caps.into_iter().filter(|(c, _)| known.iter().any(|k| k == c)).map(|(c, s)| (c.to_string(), s)).collect()
}

/// The VM's block dirty bitmaps that are not persistent (`node/name`): what `dirty-bitmaps`
/// migrates and nothing else keeps (persistent ones are stored in their qcow2 images, which the
/// destination opens). None if QEMU cannot say.
fn transient_bitmaps(qmp: &mut livemig_qmp::Qmp) -> Vec<String> {
    let Ok(nodes) = qmp.execute("query-named-block-nodes", Some(json!({"flat": true}))) else { return Vec::new() };
    let mut out = Vec::new();
    for n in nodes.as_array().into_iter().flatten() {
        let node = n["node-name"].as_str().unwrap_or("?");
        for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
            if !b["persistent"].as_bool().unwrap_or(false) {
                out.push(format!("{node}/{}", b["name"].as_str().unwrap_or("?")));
            }
        }
    }
    out.truncate(16);
    out
}

/// A non-negative figure rounded to a whole number (QMP's integers); negative and NaN are 0.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn whole(x: f64) -> u64 {
    if x.is_finite() && x > 0.0 {
        x.round().min(u64::MAX as f64) as u64
    } else {
        0
    }
}

/// The stream engine can be used with this QEMU: `Err` says why not.
pub fn usable(version: QemuVersion, kvm: bool) -> Result<(), String> {
    if version < QemuVersion::NAMED_FILE_ONLY {
        return Err(format!("QEMU {version} has no switchover-ack (8.1), which the stream engine holds to steer the switchover"));
    }
    if !kvm && version < (QemuVersion { major: 9, minor: 0, micro: 0 }) {
        return Err(format!("QEMU {version} under TCG loses guest writes in its own dirty tracking (fixed in 9.0)"));
    }
    Ok(())
}

/// The destination's switchover-ack, held until the controller says go, and the source QEMU's
/// end of the return path (written by the dispatcher and by the release).
pub(super) struct Gate {
    inner: Mutex<GateInner>,
}

struct GateInner {
    open: bool,
    held: Option<Vec<u8>>,
    qemu: std::os::unix::net::UnixStream,
}

impl Gate {
    /// A gate on the source QEMU's end of the return path, `open` or holding the ack.
    pub(super) fn new(qemu: std::os::unix::net::UnixStream, open: bool) -> Gate {
        Gate { inner: Mutex::new(GateInner { open, held: None, qemu }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write(g: &mut GateInner, b: &[u8]) -> Result<(), AgentError> {
        use std::io::Write as _;
        g.qemu.write_all(b).map_err(|source| AgentError::Network { what: "cannot write the return path into the source QEMU".into(), source })
    }

    /// A return-path message: the switchover-ack is held while the gate is closed.
    fn pass(&self, raw: &[u8], is_ack: bool) -> Result<bool, AgentError> {
        let mut g = self.lock();
        if is_ack && !g.open {
            g.held = Some(raw.to_vec());
            return Ok(true);
        }
        Self::write(&mut g, raw).map(|()| false)
    }

    /// Opens the gate: the held ack (if it came) goes to QEMU now, a later one at once.
    fn release(&self) -> Result<(), AgentError> {
        let mut g = self.lock();
        g.open = true;
        match g.held.take() {
            Some(a) => Self::write(&mut g, &a),
            None => Ok(()),
        }
    }
}

/// What the dispatcher passes on to the steering loop.
pub(super) type Inbound = Result<Message, AgentError>;

/// Reads every frame from the receiver: applies `stream_ack`s to the window and relays the
/// return path (through the gate) itself, and passes the rest on. On a thread of its own, so a
/// QMP call that waits for QEMU's lock (QEMU holds it while it writes its last pass) never stops
/// the acks that let the relay drain that pass, nor the destination's answer QEMU waits for.
pub(super) fn spawn_dispatcher(
    frames: crossbeam_channel::Receiver<Result<livemig_wire::Frame, WireError>>,
    window: Arc<Window>,
    gate: Arc<Gate>,
    out: crossbeam_channel::Sender<Inbound>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("livemig-dispatch".into()).spawn(move || {
        let mut rp = ReturnPathParser::new();
        for r in frames {
            let item: Option<Inbound> = match r {
                Ok(f) => match f.kind {
                    FrameKind::ReturnPath => {
                        let mut evs = Vec::new();
                        rp.feed(&f.payload, &mut |e| evs.push(e));
                        let mut err = None;
                        for e in evs {
                            let r = match e {
                                RpEvent::Message(m) => gate.pass(m.raw(), m.kind() == RpKind::SwitchoverAck).map(drop),
                                RpEvent::Opaque(b) => gate.pass(&b, false).map(drop),
                                RpEvent::Fallback { .. } => Ok(()),
                            };
                            if let Err(e) = r {
                                err = Some(e);
                                break;
                            }
                        }
                        err.map(Err)
                    }
                    FrameKind::Control => match f.message() {
                        Ok(Message::StreamAck { seq }) => {
                            window.ack(seq);
                            None
                        }
                        Ok(m) => Some(Ok(m)),
                        Err(e) => Some(Err(e.into())),
                    },
                    other => Some(Err(AgentError::Protocol { expected: "control or return-path frames".into(), got: format!("{other:?}") })),
                },
                Err(e) => Some(Err(e.into())),
            };
            if let Some(item) = item {
                let stop = item.is_err();
                if out.send(item).is_err() || stop {
                    break;
                }
            }
        }
    })
}

/// Runs the stream engine on a connected source QMP (`st`).
pub(crate) fn run(opts: &SendOptions, obs: &mut dyn Observer, report: &mut Report, st: &mut SourceState, version: QemuVersion) -> Result<(), AgentError> {
    let throttle = matches!(opts.policy, crate::send::PolicyKind::Adaptive) && opts.on_no_converge == livemig_control::OnNoConverge::Throttle;
    let known: Vec<String> = st
        .qmp()
        .execute("query-migrate-capabilities", None)
        .map_err(AgentError::qmp("cannot list the source QEMU's migration capabilities"))?
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["capability"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let bitmaps = transient_bitmaps(&mut st.qmp());
    if !bitmaps.is_empty() {
        let w = format!(
            "the VM has block dirty bitmaps that live only in QEMU ({}): they are migrated (dirty-bitmaps on), and QEMU's stream passes verbatim (not compacted) from their section on",
            bitmaps.join(", ")
        );
        obs.progress(Progress::Phase(&w));
        report.warnings.push(w);
    }
    let caps = capabilities(&known, version, throttle, !bitmaps.is_empty());
    let ack_gate = caps.iter().any(|(c, s)| c == "switchover-ack" && *s);
    {
        let pairs: Vec<(&str, bool)> = caps.iter().map(|(c, s)| (c.as_str(), *s)).collect();
        st.qmp().migrate_set_capabilities(&pairs).map_err(AgentError::qmp("the source QEMU refused the stream engine's migration capabilities"))?;
    }
    let mut params = json!({
        // QEMU's default cap (128 MiB/s) is below the links livemig is for: the relay's window
        // and the link bound the rate instead.
        "max-bandwidth": opts.bandwidth.map_or(100u64 << 30, |b| b.saturating_mul(4)),
        "downtime-limit": whole(opts.limits.max_downtime_ms).max(1),
    });
    if throttle {
        // QEMU's own throttle, off (1 %) until the controller asks for more.
        params["cpu-throttle-initial"] = json!(1);
        params["cpu-throttle-increment"] = json!(1);
        params["max-cpu-throttle"] = json!(1);
        params["throttle-trigger-threshold"] = json!(1);
    }
    st.qmp().migrate_set_parameters(params).map_err(AgentError::qmp("the source QEMU refused the migration parameters"))?;

    let (vm, store) = crate::send::snapshot_store(opts, st, obs, report)?;
    if !opts.disk_images.is_empty() {
        obs.progress(Progress::Phase("indexing the disk images"));
    }
    let indexes = holdings::load_indexes(&opts.disk_images, &opts.index_cache, opts.disk_align, obs, report)?;
    let (stream, mut reader, mut writer_half, tls_key) = crate::send::connect_receiver(opts, obs, report)?;
    let welcomed = hello_and_welcome(
        &mut reader,
        &mut writer_half,
        (indexes, vm.clone().filter(|_| store.is_some())),
        MIN_PROTOCOL_VERSION,
        ENGINE_STREAM,
        "the stream engine",
        report,
        obs,
        tls_key,
    )?;
    let (disks, key) = (welcomed.disks, welcomed.key);
    let snapshot = match (&store, &vm) {
        (Some(store), Some(vm)) => holdings::choose_snapshot(store, vm, &welcomed.snapshots)?,
        _ => None,
    };
    let plan = snapshot.as_ref().map(|(id, _)| id.clone());
    report.snapshot_used.clone_from(&plan);
    let snapshot: Option<Arc<dyn livemig_compact::SnapshotLookup>> = snapshot.map(|(_, s)| Arc::new(SenderSnapshot(s.lookup_table())) as _);
    // This migration's memory, kept from QEMU's stream as the receiver keeps it.
    let keeper = match (&store, &vm) {
        (Some(store), Some(vm)) => Some(Keeper::spawn(store.clone(), vm.clone())?),
        _ => None,
    };
    let wanted = opts.connections.unwrap_or(DEFAULT_CONNECTIONS);
    let needs = (welcomed.version, livemig_wire::STREAM_CONNECTIONS_PROTOCOL_VERSION, " for the stream engine");
    let connections = crate::send::connections_from(wanted, needs, welcomed.join.as_deref(), obs, report)?;
    livemig_wire::write_message(&mut writer_half, &Message::Plan { snapshot: plan, connections })?;
    // The rate cap is shared out among the connections.
    let each = opts.bandwidth.map(|b| (b / u64::from(connections)).max(1));
    let mut links = Links::new(Writer::spawn(writer_half, each));
    let _data_readers = open_stream_connections(opts, welcomed.join.as_deref(), connections, each, &mut links, obs)?;
    links.send(Out::Message(Message::StreamSetup { capabilities: caps.clone() }))?;
    match livemig_wire::read_message(&mut reader)? {
        Message::StreamReady => {}
        Message::Abort { reason } => return Err(AgentError::PeerAborted { peer: "destination", reason }),
        other => return Err(AgentError::Protocol { expected: "stream-ready".into(), got: other.name().into() }),
    }
    stream.set_read_timeout(None).map_err(|source| AgentError::Network { what: "cannot configure the socket".into(), source })?;
    let frames = link::read_frames(reader, 64);

    // QEMU migrates into a socket of ours.
    let dir = crate::private_dir("send")?;
    let sock = dir.path().join("stream.sock");
    let listener = UnixListener::bind(&sock).map_err(|source| AgentError::Network { what: format!("cannot listen on {}", sock.display()), source })?;
    listener.set_nonblocking(true).map_err(|source| AgentError::Network { what: "cannot configure the stream socket".into(), source })?;
    obs.progress(Progress::Phase("QEMU migrates into the relay"));
    st.migrating = true;
    st.stopped = st.was_running;
    st.qmp().migrate(&format!("unix:{}", sock.display())).map_err(AgentError::qmp("the source QEMU refused to migrate"))?;
    let qemu = crate::send::accept_qemu(&listener, st, opts.timeout, "migration stream")?;
    let net = |source| AgentError::Network { what: "cannot configure QEMU's migration socket".into(), source };
    qemu.set_nonblocking(false).map_err(net)?;
    let qemu_w = qemu.try_clone().map_err(net)?;
    let closer = qemu.try_clone().map_err(net)?;

    let window = Arc::new(Window::new(DEFAULT_WINDOW));
    let gate = Arc::new(Gate::new(qemu_w, !ack_gate));
    let (in_tx, inbound) = crossbeam_channel::bounded::<Inbound>(256);
    let dispatcher = spawn_dispatcher(frames, Arc::clone(&window), Arc::clone(&gate), in_tx)
        .map_err(|source| AgentError::Network { what: "cannot start the dispatch thread".into(), source })?;
    let stats = Arc::new(Mutex::new(RelayStats::default()));
    report.threads = Some(opts.threads.clamp(1, crate::pipeline::MAX_THREADS));
    let cfg = SourceConfig {
        encode: EncodeOptions { compressor: opts.compressor.initial(), ..EncodeOptions::default() },
        compressor: opts.compressor,
        disks,
        key,
        snapshot,
        keep: keeper.as_ref().map(Keeper::feed),
        threads: opts.threads,
    };
    let relay = {
        let (out, window, stats) = (Spread::new(links.senders()), Arc::clone(&window), Arc::clone(&stats));
        std::thread::Builder::new()
            .name("livemig-relay".into())
            .spawn(move || relay_source(qemu, out, window, stats, cfg))
            .map_err(|source| AgentError::Network { what: "cannot start the relay thread".into(), source })?
    };
    let mut switchover = None;
    let r = steer(opts, obs, report, st, &inbound, &mut links, &window, &stats, &gate, throttle, &mut switchover);
    let s = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
    report.set_class_stats(&s.classes);
    report.compressor = s.compressor.clone();
    report.ram_bytes = s.ram_bytes;
    // What follows the RAM in QEMU's stream: the device state (with EOF and the vmdesc).
    report.device_state_bytes = s.checkpoint_bytes.filter(|_| s.ram_done).map_or(0, |c| s.raw_bytes.saturating_sub(c));
    report.stream = Some(super::StreamReport {
        raw_bytes: s.raw_bytes,
        pages: s.pages,
        zero_records: s.zero_records,
        verbatim_pages: s.verbatim_pages,
        ram_sections: s.ram_sections,
        fallback: s.fallback.clone(),
        cache_pages: s.cache_pages,
        switchover_ack_held: ack_gate,
        qemu_downtime_ms: report.qemu_downtime_ms,
        switchover: switchover.map(|mut so| {
            so.final_raw_bytes = s.raw_at_completion.map(|c| s.raw_bytes.saturating_sub(c));
            so
        }),
    });
    if let Some(f) = &s.fallback {
        let w = format!("the stream parser fell back to passing QEMU's stream verbatim (not compacted) from there on: {f}");
        obs.progress(Progress::Phase(&w));
        report.warnings.push(w);
    }
    report.wire_bytes = links.total_bytes();
    if r.is_err() {
        window.close();
        let _ = closer.shutdown(std::net::Shutdown::Both);
    }
    let r = match r {
        Err(AgentError::Wire(_)) => {
            // A broken connection is often the receiver giving up: prefer the reason it sent.
            match inbound.recv_timeout(Duration::from_secs(1)) {
                Ok(Ok(Message::Abort { reason })) => Err(AgentError::PeerAborted { peer: "destination", reason }),
                _ => r,
            }
        }
        r => r,
    };
    if let Err(e) = &r {
        if !matches!(e, AgentError::Wire(_)) {
            let _ = links.send(Out::Message(Message::Abort { reason: e.chain() }));
            let _ = links.control().marker(Duration::from_secs(2));
        }
    }
    drop(inbound);
    if r.is_err() {
        // Nothing more to say: a receiver that stopped reading (a stalled link) must not hold
        // the writer.
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    let _ = links.finish();
    // The receiver is done (or gone): end the reader under the dispatcher (the socket has no
    // read timeout, and a stalled link brings no end).
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = relay.join();
    let _ = dispatcher.join();
    if let (Ok(()), Some(k)) = (&r, keeper) {
        // The destination runs with the memory QEMU's stream carried up to its checkpoint.
        let id = s.checkpoint_digest.filter(|_| s.ram_done).ok_or_else(|| "the stream's RAM was not checked whole".to_string());
        super::keep::publish(k, id, obs, report);
    }
    r
}

/// Opens the data connections 1 to `n - 1` of the stream engine or the tunnel
/// ([`crate::send::open_data_connections`]); a failure is said to the receiver, which waits for
/// them. Returns their reading halves, kept open as long as the migration.
pub(crate) fn open_stream_connections(
    opts: &SendOptions,
    join: Option<&str>,
    n: u32,
    rate: Option<u64>,
    links: &mut Links,
    obs: &mut dyn Observer,
) -> Result<Vec<Box<dyn std::io::Read + Send>>, AgentError> {
    let Some(token) = join.filter(|_| n > 1) else { return Ok(Vec::new()) };
    obs.progress(Progress::Phase(&format!("opening {} more connections to the receiver", n - 1)));
    crate::send::open_data_connections(opts, token, n, rate, links).inspect_err(|e| {
        let _ = links.send(Out::Message(Message::Abort { reason: e.chain() }));
        let _ = links.control().marker(Duration::from_secs(2));
    })
}

/// What the receiver's `welcome` settled, for the stream engine and the tunnel.
pub(crate) struct Welcomed {
    /// The disk images both hold, for references.
    pub(crate) disks: Option<Arc<dyn livemig_compact::DiskLookup>>,
    /// The migration's page key.
    pub(crate) key: livemig_compact::PageKey,
    /// The snapshots of the VM the receiver holds (ids, newest first).
    pub(crate) snapshots: Vec<String>,
    /// The protocol version both speak.
    pub(crate) version: u32,
    /// The secret the data connections present (a receiver of protocol 7 or later).
    pub(crate) join: Option<String>,
}

/// The stream engine's and the tunnel's side of the handshake: `hello` offering the disk images
/// and naming the VM for snapshots (`vm`; the tunnel has none) (`engine`, protocol
/// `min_version`..current), then the receiver's `welcome`, which must speak at least the stream
/// protocol and this build's minimum (`who` names the sender in the refusal). The page key is
/// exported from the TLS session (`tls_key`), or on a plain link the one the welcome carries.
#[allow(clippy::too_many_arguments)]
pub(crate) fn hello_and_welcome(
    reader: &mut dyn std::io::Read,
    writer: &mut dyn std::io::Write,
    (indexes, vm): (Vec<livemig_index::DiskIndex>, Option<String>),
    min_version: u32,
    engine: &str,
    who: &str,
    report: &mut Report,
    obs: &mut dyn Observer,
    tls_key: Option<[u8; livemig_tls::PAGE_KEY_LEN]>,
) -> Result<Welcomed, AgentError> {
    livemig_wire::write_message(
        writer,
        &Message::Hello {
            version: PROTOCOL_VERSION,
            min_version,
            software: SOFTWARE.into(),
            page_size: 4096,
            regions: Vec::new(),
            vm,
            disks: holdings::offers(&indexes)?,
            engine: engine.into(),
        },
    )?;
    let (holds, key, version, join): (Holdings, _, _, _) = match livemig_wire::read_message(reader)? {
        Message::Welcome { version, holds, software, page_key, join } => {
            let needs = STREAM_PROTOCOL_VERSION.max(MIN_PROTOCOL_VERSION);
            if version < needs {
                return Err(AgentError::Incompatible(format!(
                    "the receiver ({software}) speaks protocol {version}, {who} needs {needs}"
                )));
            }
            (holds, crate::transport::sender_page_key(tls_key, page_key.as_deref())?, version, join)
        }
        Message::Abort { reason } => return Err(AgentError::PeerAborted { peer: "destination", reason }),
        other => return Err(AgentError::Protocol { expected: "welcome".into(), got: other.name().into() }),
    };
    report.disk_images_used = holds.disks.len();
    crate::transport::report_page_key(report, obs, &key, tls_key.is_some());
    let disks = SenderDisks::new(indexes, &holds.disks).map(|d| d as Arc<dyn livemig_compact::DiskLookup>);
    Ok(Welcomed { disks, key, snapshots: holds.snapshots, version, join })
}

/// The precopy, switchover and commit phases: relays the return path (holding the
/// switchover-ack), answers acks and resends, samples QEMU, asks the controller and acts.
#[allow(clippy::too_many_arguments)]
fn steer(
    opts: &SendOptions,
    obs: &mut dyn Observer,
    report: &mut Report,
    st: &mut SourceState,
    inbound: &crossbeam_channel::Receiver<Inbound>,
    links: &mut Links,
    window: &Window,
    stats: &Mutex<RelayStats>,
    gate: &Gate,
    throttle: bool,
    switchover: &mut Option<super::SwitchoverReport>,
) -> Result<(), AgentError> {
    let start = Instant::now();
    // QEMU's final pass holds the pages dirtied after its last sync too, which livemig does not
    // see: the controller aims below the operator's maximum (QEMU's own check gets the whole).
    let aimed = Limits { max_downtime_ms: opts.limits.max_downtime_ms * STREAM_AIM, ..opts.limits };
    let mut controller = opts.policy.controller(aimed, opts.on_no_converge);
    let mut history: Vec<IterationStats> = Vec::new();
    let mut gate_open = gate.lock().open;
    let mut said_held = false;
    let mut released_at: Option<Instant> = None;
    let mut source_done = false;
    let mut loaded = false;
    let mut verified = false;
    let mut index = 0u32;
    let mut last_sample = Instant::now();
    let mut last_sync = 0u64;
    let mut last_pass_note = Instant::now();
    let (mut mark_wire, mut mark_pages, mut mark_t) = (0u64, 0u64, Instant::now());
    let mut mark_resent = ResentStats::default();
    let mut peak_remaining = 0u64;
    let mut last_rate = opts.bandwidth.map_or(0.0, |b| b as f64);
    let mut recent_rates: Vec<f64> = Vec::new();
    let mut throttle_max = 0.0f64;
    let mut predicted = None;
    let stats_of = || stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut compressor_shown = 0;
    loop {
        if opts.cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(AgentError::Cancelled);
        }
        let wait = if released_at.is_some() { Duration::from_millis(1) } else { Duration::from_millis(20) };
        if !said_held && gate.lock().held.is_some() {
            said_held = true;
            obs.progress(Progress::Phase(&format!(
                "holding the destination's switchover-ack: QEMU iterates until the controller says go (it aims at {:.0} ms, {:.0} % of the maximum: QEMU's final pass holds pages dirtied after its last sync, which livemig cannot see)",
                aimed.max_downtime_ms,
                STREAM_AIM * 100.0
            )));
        }
        match inbound.recv_timeout(wait) {
            Ok(Ok(m)) => match m {
                Message::StreamResend { seq, item } => {
                    let page = window.page(seq, item).ok_or_else(|| AgentError::Protocol {
                        expected: "a resend of a page still in the window".into(),
                        got: format!("chunk {seq} item {item}"),
                    })?;
                    report.resent_pages += 1;
                    links.send(Out::Frame(FrameKind::Stream, resend_payload(seq, item, &page)))?;
                }
                Message::StreamVerified { bytes } => {
                    verified = true;
                    report.verification.ok = true;
                    obs.progress(Progress::Phase(&format!("the destination verified the stream's digest ({} MiB)", bytes >> 20)));
                }
                Message::Loaded => loaded = true,
                Message::Abort { reason } => return Err(AgentError::PeerAborted { peer: "destination", reason }),
                other => return Err(AgentError::Protocol { expected: "stream acknowledgements".into(), got: other.name().into() }),
            },
            Ok(Err(e)) => return Err(e),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Err(AgentError::Wire(WireError::Closed)),
        }
        if source_done && loaded {
            break;
        }
        // A connection lost (the relay writes on its own thread): the migration fails.
        if let Some(e) = links.failed() {
            return Err(e);
        }
        window.check_progress(opts.timeout)?;
        // In the downtime (QEMU has stopped the guest) every millisecond of polling is downtime.
        let in_downtime = stats.lock().unwrap_or_else(|e| e.into_inner()).completion_started.is_some();
        if last_sample.elapsed() < if in_downtime { Duration::from_millis(1) } else { SAMPLE } {
            continue;
        }
        last_sample = Instant::now();
        let info = st.qmp().query_migrate().map_err(AgentError::qmp("cannot query the source's migration"))?;
        match info.status.as_deref() {
            Some("failed") => {
                return Err(AgentError::DeviceState(info.error_desc.unwrap_or_else(|| "the source QEMU's migration failed".into())))
            }
            Some("cancelled" | "cancelling") => return Err(AgentError::DeviceState("the source QEMU's migration was cancelled".into())),
            Some("completed") if !source_done => {
                source_done = true;
                report.qemu_downtime_ms = info.downtime.map(|d| d as f64);
                obs.progress(Progress::Phase("the source QEMU completed: waiting for the destination"));
            }
            _ => {}
        }
        if let Some(t) = info.raw["cpu-throttle-percentage"].as_f64() {
            throttle_max = throttle_max.max(t / 100.0);
        }
        let s = stats_of();
        crate::autocomp::announce(s.compressor.as_ref(), &mut compressor_shown, obs);
        if s.completion_started.is_some() || source_done {
            if released_at.is_some_and(|t| t.elapsed() > opts.timeout) {
                return Err(AgentError::Timeout { what: "the source QEMU to complete its switchover".into(), secs: opts.timeout.as_secs_f64() });
            }
            continue;
        }
        // The working set: QEMU's largest dirty set in the iteration. `remaining` is largest
        // right after a sync and shrinks as QEMU's pass goes on, while the guest dirties pages
        // again that the pass's final sync will find: a switchover's final pass holds those
        // too (with a guest rewriting 16 MiB flat out: 16.5 MiB, where `remaining` at the
        // decision said 11-14).
        let remaining = info.remaining.unwrap_or(0);
        peak_remaining = peak_remaining.max(remaining);
        // An iteration is QEMU's own: it ends when QEMU synced its dirty bitmap again, at least
        // MIN_ITERATION after the last one. Never a slice of a pass: while QEMU's first pass
        // over RAM crawls through a slow link its `remaining` shrinks as it goes, which is not a
        // working set shrinking (a switchover decided on that in the KVM lane, mid first pass);
        // and QEMU, spinning on syncs while the switchover-ack is held or its own check fails,
        // must not run the iteration cap down in seconds.
        let sync = info.dirty_sync_count.unwrap_or(0);
        if sync == last_sync || (index > 0 && mark_t.elapsed() < MIN_ITERATION) {
            if sync == last_sync && last_pass_note.elapsed() >= PASS_NOTE {
                last_pass_note = Instant::now();
                let left = info.remaining.unwrap_or(0) >> 20;
                obs.progress(Progress::Phase(&format!("QEMU's pass over the dirty pages goes on: {left} MiB left")));
            }
            continue;
        }
        last_sync = sync;
        last_pass_note = Instant::now();
        let wire = links.total_bytes();
        // Pages the relay parsed; after a fallback it parses none: QEMU's own count then.
        let pages = if s.fallback.is_some() {
            ["normal", "duplicate"].iter().filter_map(|k| info.raw["ram"][k].as_u64()).sum()
        } else {
            s.pages + s.zero_records
        };
        let dt = mark_t.elapsed();
        let sent = pages - mark_pages;
        let wire_delta = wire - mark_wire;
        if sent >= 64 {
            // The link's rate, not what QEMU had to send: once little is left, an iteration's
            // bytes per second say how little, so the best of the last few busy ones counts.
            recent_rates.push(wire_delta as f64 / dt.as_secs_f64().max(1e-3));
            if recent_rates.len() > 5 {
                recent_rates.remove(0);
            }
            last_rate = recent_rates.iter().copied().fold(0.0, f64::max);
            // Never above the operator's cap: the best of a few iterations reads a few % over it.
            if let Some(cap) = opts.bandwidth {
                last_rate = last_rate.min(cap as f64);
            }
        }
        let wws = peak_remaining / 4096;
        let stats_it = IterationStats {
            index,
            dirty_pages: wws,
            sent_pages: sent,
            wire_bytes: wire_delta,
            duration_ms: dt.as_secs_f64() * 1000.0,
            scan_ms: 0.0,
            rate_bytes_per_s: if sent >= 64 { last_rate } else { 0.0 },
            throttle: info.raw["cpu-throttle-percentage"].as_f64().unwrap_or(0.0) / 100.0,
        };
        (mark_wire, mark_pages, mark_t) = (wire, pages, Instant::now());
        peak_remaining = remaining;
        history.push(stats_it.clone());
        let resent = {
            let recent = s.resent.since(&mark_resent);
            mark_resent = s.resent;
            [recent, s.resent].into_iter().find(|r| r.pages >= MIN_RESENT)
        };
        let costs = Costs::now(window, livemig_control::link_estimate(&history).1, resent);
        let pending = Pending {
            index: index + 1,
            dirty_pages: wws,
            scan_ms: costs.queued_ms,
            bytes_per_page: Some(costs.bytes_per_page),
        };
        let decision = controller.decide(&history, &pending);
        let record = IterationRecord::new(stats_it, &decision, controller.fit(), false);
        obs.progress(Progress::Iteration(&record));
        report.iterations.push(record);
        index += 1;
        match decision {
            Decision::Switchover { predicted_downtime_ms, .. } if !gate_open => {
                predicted = Some(predicted_downtime_ms);
                gate_open = true;
                released_at = Some(Instant::now());
                // QEMU switches over once its pending pages fit `downtime-limit` at its bandwidth
                // estimate; what goes before them (the stream the relay holds unacknowledged) and
                // after them (device state, the destination's answer, the commit) is left out of
                // its check, so it gets the operator's maximum less those.
                let Costs { queued_ms, device_ms, raw_rate, queued_raw, .. } = costs;
                let budget = (opts.limits.max_downtime_ms - opts.limits.overhead_ms - device_ms - queued_ms).max(opts.limits.max_downtime_ms * 0.25);
                *switchover = Some(super::SwitchoverReport {
                    qemu_remaining_bytes: info.remaining.unwrap_or(0),
                    relay_queued_bytes: queued_raw,
                    raw_bytes_per_s: raw_rate,
                    resent_bytes_per_page: costs.bytes_per_page,
                    queued_ms,
                    device_ms,
                    qemu_downtime_limit_ms: whole(budget).max(1) as f64,
                    final_raw_bytes: None,
                });
                let _ = st.qmp().migrate_set_parameters(json!({"downtime-limit": whole(budget).max(1)}));
                if let Some(rate) = raw_rate {
                    // QEMU >= 8.2: its switchover check uses the rate the relay drains of the pages
                    // it will send, not the rate of the local socket (refused by older QEMU: then
                    // its estimate stays).
                    let _ = st.qmp().migrate_set_parameters(json!({"avail-switchover-bandwidth": whole(rate)}));
                }
                // QEMU stops the guest itself when it completes; a VM paused when the migration
                // began may run by now: on a failure it is resumed if it runs at this point.
                let now = st.qmp().query_status();
                if let Ok(now) = now {
                    st.was_running |= now.running;
                    st.stopped = st.was_running;
                }
                obs.progress(Progress::Phase(&format!(
                    "switchover: releasing the switchover-ack (QEMU's downtime-limit {budget:.0} ms: the maximum less {:.0} ms of overhead, {device_ms:.0} ms of device state and {queued_ms:.0} ms for the {} KiB of stream the relay holds)",
                    opts.limits.overhead_ms,
                    queued_raw >> 10
                )));
                gate.release()?;
            }
            Decision::Throttle { fraction, .. } if throttle => {
                // QEMU raises its throttle at its next trigger (every 2 s or so while the guest
                // dirties faster than it sends) by the increment, up to the maximum: the whole
                // step at once (5 % a trigger took 20 s from 50 to 80 % in the VM test).
                let pct = whole(fraction * 100.0).clamp(1, 99);
                st.qmp()
                    .migrate_set_parameters(json!({"cpu-throttle-initial": pct, "max-cpu-throttle": pct, "cpu-throttle-increment": 99}))
                    .map_err(AgentError::qmp("cannot raise QEMU's CPU throttle"))?;
            }
            Decision::Throttle { ref reason, .. } => {
                return Err(AgentError::NotConverged(format!("{reason}; throttling is off (--on-no-converge fail or --policy fixed)")))
            }
            Decision::Abort { reason, .. } => return Err(AgentError::NotConverged(reason)),
            _ => {}
        }
        if start.elapsed() > Duration::from_secs(24 * 3600) {
            return Err(AgentError::Timeout { what: "the migration".into(), secs: start.elapsed().as_secs_f64() });
        }
    }
    report.predicted_downtime_ms = predicted;
    report.throttle = Some(ThrottleReport { max: throttle_max, stunned_ms: 0.0, slices: 0 }).filter(|t| t.max > 0.011);
    if !verified && stats_of().fallback.is_none() {
        return Err(AgentError::Protocol { expected: "the destination's verification of the stream digest".into(), got: "none before completion".into() });
    }
    let s = stats_of();
    let t_stop = s.completion_started.unwrap_or_else(Instant::now);
    obs.progress(Progress::Phase("switchover: resuming the destination"));
    st.committed = true;
    if let Err(e) = links.send(Out::Message(Message::Commit)).and_then(|()| links.control().marker(opts.timeout).map(drop)) {
        return Err(AgentError::Unconfirmed(e.chain()));
    }
    match inbound.recv_timeout(opts.timeout) {
        Ok(Ok(Message::Resumed)) => {}
        Ok(Ok(Message::Abort { reason })) => {
            st.committed = false;
            return Err(AgentError::PeerAborted { peer: "destination", reason });
        }
        Ok(Ok(other)) => return Err(AgentError::Unconfirmed(format!("it answered `{}`", other.name()))),
        Ok(Err(e)) => return Err(AgentError::Unconfirmed(e.chain())),
        Err(_) => return Err(AgentError::Unconfirmed("no answer to the commit".into())),
    }
    report.downtime_ms = Some(t_stop.elapsed().as_secs_f64() * 1000.0);
    obs.progress(Progress::Phase("completed: the destination VM runs"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The held stream is priced at its wire bytes on the link, the final pass at what re-sent
    /// pages cost (their whole size before any), and QEMU's raw rate is the link's at their
    /// raw/wire ratio, at most the drain rate; with no link rate yet, the drain rate prices the
    /// raw bytes.
    #[test]
    fn a_switchover_is_priced_at_the_link_and_the_resent_pages() {
        let w = Window::new(64 << 20);
        w.insert(0, 4_000_000, 2_000_000, Vec::new());
        w.insert(1, 4_000_000, 2_000_000, Vec::new());
        let resent = ResentStats { pages: 1000, raw_bytes: 4_100_000, wire_bytes: 4_000_000 };
        let c = Costs::now(&w, 1e6, Some(resent));
        assert_eq!(c.queued_raw, 8_000_000);
        assert!((c.queued_ms - 4000.0).abs() < 1e-6, "{c:?}");
        assert!((c.device_ms - livemig_control::DEVICE_STATE_ESTIMATE_BYTES / 1e3).abs() < 1e-6, "{c:?}");
        assert_eq!(c.bytes_per_page, 4000.0);
        let raw = c.raw_rate.unwrap();
        assert!((raw - 1.025e6).abs() < 1.0, "no drain measured: the link at the re-sent ratio: {c:?}");

        // Acknowledged: 4 MB in about 60 ms, a drain far above the link; the link's figure stays.
        w.ack(0);
        std::thread::sleep(Duration::from_millis(60));
        w.ack(1);
        let c = Costs::now(&w, 1e6, Some(resent));
        assert_eq!(c.queued_raw, 0);
        assert!((c.raw_rate.unwrap() - 1.025e6).abs() < 1.0, "{c:?}");
        let drain = w.drain_rate(DRAIN_SPAN).unwrap();
        assert!(drain > 2e6, "{drain}");
        // A drain below the link's figure (the pipeline slower than the link) bounds it.
        let c = Costs::now(&w, 1e9, Some(resent));
        assert!((c.raw_rate.unwrap() - drain).abs() < 1.0, "{c:?}");
        // Nothing re-sent yet: pages at their whole size, so the link's rate is the raw rate.
        let c = Costs::now(&w, 1e6, None);
        assert_eq!(c.bytes_per_page, WHOLE_PAGE_RECORD);
        assert_eq!(c.raw_rate, Some(1e6));
        // No link rate yet: the drain rate prices the device state and is QEMU's rate.
        let c = Costs::now(&w, 0.0, None);
        assert_eq!(c.raw_rate, Some(drain));
        assert!((c.device_ms - livemig_control::DEVICE_STATE_ESTIMATE_BYTES / drain * 1000.0).abs() < 1e-6, "{c:?}");
    }

    #[test]
    fn capabilities_follow_what_qemu_knows() {
        let known: Vec<String> = ["return-path", "switchover-ack", "multifd", "x-ignore-shared", "auto-converge", "xbzrle"].map(String::from).to_vec();
        let v10 = QemuVersion { major: 10, minor: 0, micro: 2 };
        let caps = capabilities(&known, v10, false, false);
        assert!(caps.contains(&("return-path".into(), true)));
        assert!(caps.contains(&("switchover-ack".into(), true)));
        assert!(caps.contains(&("multifd".into(), false)) && caps.contains(&("xbzrle".into(), false)));
        assert!(caps.contains(&("auto-converge".into(), false)));
        assert!(!caps.iter().any(|(c, _)| c == "postcopy-ram"), "unknown to this QEMU: not set");
        assert!(capabilities(&known, v10, true, false).contains(&("auto-converge".into(), true)));
        let with_dirty_bitmaps: Vec<String> = ["dirty-bitmaps".to_string()].to_vec();
        assert!(capabilities(&with_dirty_bitmaps, v10, false, false).contains(&("dirty-bitmaps".into(), false)));
        assert!(capabilities(&with_dirty_bitmaps, v10, false, true).contains(&("dirty-bitmaps".into(), true)), "the VM's own bitmaps go too");
        let v72 = QemuVersion { major: 7, minor: 2, micro: 0 };
        assert!(!capabilities(&known, v72, false, false).iter().any(|(c, _)| c == "switchover-ack"));
    }

    #[test]
    fn usable_needs_switchover_ack_and_correct_tcg_tracking() {
        let v = |major, minor| QemuVersion { major, minor, micro: 0 };
        assert!(usable(v(10, 0), false).is_ok());
        assert!(usable(v(8, 2), true).is_ok());
        assert!(usable(v(8, 2), false).unwrap_err().contains("TCG"));
        assert!(usable(v(7, 2), true).unwrap_err().contains("switchover-ack"));
    }
}
