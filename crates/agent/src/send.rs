//! The `send` role: tracks and sends the source VM's RAM, pauses it at switchover, carries QEMU's
//! device state, and resumes the source on any failure before the destination resumes.

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::collections::BTreeSet;

use livemig_compact::{EncodeOptions, Encoder};
use livemig_index::snapshot::SnapshotStore;
use livemig_control::{
    AdaptivePolicy, Decision, DowntimeController, FixedPolicy, IterationStats, Limits, OnNoConverge, Pending,
};
use livemig_memory::GuestMemory;
use livemig_qmp::Qmp;
use livemig_track::Ledger;
use livemig_wire::{FrameKind, Holdings, Message, RegionInfo, MAX_RESEND_PAGES, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

use crate::autocomp::{CompressorMode, SharedAuto};
use crate::error::AgentError;
use crate::qemu::QemuVersion;
use crate::scanner::{Scanner, TrackerKind};
use crate::transport::{self, Transport};
use crate::holdings::{self, SenderDisks, SenderSnapshot};
use crate::link::{self, Inbox, Links, Out, Writer};
use crate::report::{IterationRecord, Report, ThrottleReport};
use crate::throttle::{self, Throttler};
use crate::{MemSource, Observer, Progress, SOFTWARE};

/// The report's outcome of a migration that completed with a downtime above `--max-downtime`.
pub const OUTCOME_OVER_MAXIMUM: &str = "completed-over-maximum";

/// Which downtime controller drives the iterations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// QEMU's fixed rule.
    Fixed,
    /// WWS regression.
    Adaptive,
}

impl PolicyKind {
    pub(crate) fn controller(self, limits: Limits, on: OnNoConverge) -> Box<dyn DowntimeController> {
        match self {
            PolicyKind::Fixed => Box::new(FixedPolicy { limits }),
            PolicyKind::Adaptive => Box::new(AdaptivePolicy::new(limits).on_no_converge(on)),
        }
    }
}

/// How the RAM travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The stream engine where this QEMU allows it (QEMU >= 8.1 with switchover-ack; under TCG
    /// >= 9.0, whose dirty tracking is correct), else the shared engine.
    Auto,
    /// QEMU's own migration stream, relayed and compacted: any RAM.
    Stream,
    /// livemig reads the VM's shared RAM itself; QEMU moves only the device state.
    Shared,
}

/// What `send` needs.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// QMP socket of the source QEMU.
    pub qmp: PathBuf,
    /// Receiver address, `host:port`.
    pub to: String,
    /// TLS (default) or plain TCP.
    pub transport: Transport,
    /// Name the receiver's certificate must carry (default: the host part of `to`).
    pub server_name: Option<String>,
    /// Downtime policy.
    pub policy: PolicyKind,
    /// Operator's bounds.
    pub limits: Limits,
    /// What the adaptive policy does when the trend does not fit the maximum downtime.
    pub on_no_converge: OnNoConverge,
    /// Wire rate cap in bytes per second.
    pub bandwidth: Option<u64>,
    /// Longest wait for the peer or QEMU at any step.
    pub timeout: Duration,
    /// How long to retry connecting to a receiver that is not listening yet.
    pub connect_timeout: Duration,
    /// Compressor of whole pages: chosen by the link (auto), or forced.
    pub compressor: CompressorMode,
    /// Raw disk images both hosts hold (the guest's disks): pages equal to one of their blocks
    /// go as references.
    pub disk_images: Vec<PathBuf>,
    /// Where disk indexes are cached.
    pub index_cache: PathBuf,
    /// Bytes between indexed 4 KiB windows of the disk images (auto: from their filesystems).
    pub disk_align: livemig_index::Align,
    /// Memory snapshots: used for references when the destination holds one of this VM, and
    /// one kept here after a successful migration.
    pub snapshot_dir: Option<PathBuf>,
    /// Byte budget of the snapshot directory (oldest evicted).
    pub snapshot_max_bytes: u64,
    /// Identity of the VM for snapshots (default: QEMU's `-name`, else its UUID).
    pub vm_id: Option<String>,
    /// Most threads of the shared engine's tracker and of its page encoder (at least 1, at most
    /// [`crate::pipeline::MAX_THREADS`]; default: every core).
    pub threads: usize,
    /// Connections the shared engine's pages, or the stream engine's chunks of QEMU's stream, go
    /// over (1 to [`livemig_wire::MAX_CONNECTIONS`]), each its own TLS session; more than one
    /// needs a receiver speaking protocol 6 (shared engine) or 7 (stream engine); an older one
    /// gets one, said in the report. `None`: [`default_connections`] for the shared engine,
    /// [`crate::stream::send::DEFAULT_CONNECTIONS`] (1) for the stream engine.
    pub connections: Option<u32>,
    /// Dirty-page tracker (shared engine).
    pub tracker: TrackerKind,
    /// Which engine moves the RAM.
    pub engine: Engine,
    /// The most QEMU's device-state stream may carry: more means QEMU is copying guest RAM in the
    /// downtime, and the migration stops with the source running.
    pub max_device_state: u64,
    /// Set by a signal handler to cancel.
    pub cancel: Arc<AtomicBool>,
}

/// Default of [`SendOptions::connections`] on this host: a quarter of its cores, at least 2,
/// at most 4.
///
/// Measured on this project's 2-core machine (BENCHMARKS.md, "Several connections"): a 4 GiB
/// guest with 2.9 GiB written (`livemig-dev bench --scenario large --link unshaped`) took 7.18 s
/// over one connection and 5.85 and 6.62 s over two (the TLS of each connection on threads of
/// its own, both ends on the same cores); each connection costs about 0.8 CPU seconds per GB on
/// its reading end, on one thread, so one carries at most about 1.25 GB/s (10 Gbit/s) however
/// many cores decode. A quarter of the cores leaves the rest to encoding and decoding.
pub fn default_connections() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    u32::try_from(cores / 4).unwrap_or(4).clamp(2, 4)
}

impl SendOptions {
    /// Options with defaults for everything but the endpoints.
    pub fn new(qmp: PathBuf, to: String) -> Self {
        SendOptions {
            qmp,
            to,
            transport: Transport::Insecure,
            server_name: None,
            policy: PolicyKind::Adaptive,
            limits: Limits::default(),
            on_no_converge: OnNoConverge::default(),
            bandwidth: None,
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
            compressor: CompressorMode::Auto,
            connections: None,
            disk_images: Vec::new(),
            index_cache: holdings::default_index_cache(),
            disk_align: livemig_index::Align::Auto,
            snapshot_dir: None,
            snapshot_max_bytes: DEFAULT_SNAPSHOT_BUDGET,
            vm_id: None,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            tracker: TrackerKind::Auto,
            engine: Engine::Auto,
            max_device_state: crate::qemu::DEFAULT_MAX_DEVICE_STATE,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Default byte budget of a snapshot directory.
pub const DEFAULT_SNAPSHOT_BUDGET: u64 = 16 << 30;

/// The VM's identity from QEMU: `-name`, else a non-nil UUID.
pub(crate) fn vm_identity(qmp: &mut Qmp) -> Option<String> {
    let name = qmp.execute("query-name", None).ok().and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_string));
    name.filter(|n| !n.is_empty()).or_else(|| {
        let uuid = qmp.execute("query-uuid", None).ok()?.get("UUID")?.as_str()?.to_string();
        (uuid != "00000000-0000-0000-0000-000000000000").then_some(uuid)
    })
}

/// The VM's identity for snapshots (`--vm-id`, else QEMU's `-name` or UUID) and the snapshot
/// store, if `--snapshot-dir` is given; a VM without an identity keeps no snapshot (said).
pub(crate) fn snapshot_store(
    opts: &SendOptions,
    st: &mut SourceState,
    obs: &mut dyn Observer,
    report: &mut Report,
) -> Result<(Option<String>, Option<SnapshotStore>), AgentError> {
    let vm = opts.vm_id.clone().or_else(|| opts.snapshot_dir.as_ref().and_then(|_| vm_identity(&mut st.qmp())));
    report.vm = vm.clone();
    let store = match &opts.snapshot_dir {
        Some(d) if vm.is_some() => Some(
            SnapshotStore::open(d, opts.snapshot_max_bytes)
                .map_err(|e| AgentError::Holdings(format!("cannot open the snapshot directory {}: {e}", d.display())))?,
        ),
        Some(_) => {
            let w = "no memory snapshot is used or kept: the VM has no -name or UUID; give --vm-id";
            obs.progress(Progress::Phase(w));
            report.warnings.push(w.into());
            None
        }
        None => None,
    };
    Ok((vm, store))
}

/// What has been done to the source VM, so a failure can be undone.
#[derive(Default)]
pub(crate) struct SourceState {
    pub(crate) qmp: Option<Arc<Mutex<Qmp>>>,
    pub(crate) was_running: bool,
    /// The source may be paused by us or by QEMU's switchover: resume it on failure.
    pub(crate) stopped: bool,
    pub(crate) migrating: bool,
    pub(crate) committed: bool,
}

impl SourceState {
    pub(crate) fn qmp(&self) -> MutexGuard<'_, Qmp> {
        throttle::lock(self.qmp.as_ref().expect("QMP connected before use"))
    }

    /// Puts the source back as it was: cancels QEMU's migration, resumes the vCPUs. A source
    /// that was paused when the migration began stays paused; if its QEMU completed (and so
    /// inactivated its disk images, which only a `cont` would re-activate), its images are made
    /// active again (`blockdev-set-active`, QEMU >= 10.0), so it can be resumed, snapshotted or
    /// migrated again as before. Returns a note for the report, if any.
    fn recover(&mut self) -> Result<Option<String>, AgentError> {
        let Some(qmp) = self.qmp.as_ref() else { return Ok(None) };
        let mut qmp = throttle::lock(qmp);
        let mut completed = false;
        if self.migrating {
            let info = qmp.query_migrate().map_err(AgentError::qmp("cannot query the source's migration"))?;
            completed = info.status.as_deref() == Some("completed");
            if !matches!(info.status.as_deref(), Some("completed" | "failed" | "cancelled") | None) {
                qmp.migrate_cancel().map_err(AgentError::qmp("cannot cancel the source's migration"))?;
                let _ = qmp.wait_migration(Duration::from_secs(10));
            }
        }
        if self.stopped && self.was_running {
            let running = qmp.query_status().map_err(AgentError::qmp("cannot query the source VM's state"))?.running;
            if !running {
                qmp.cont().map_err(AgentError::qmp("cannot resume the source VM"))?;
            }
            self.stopped = false;
        } else if completed {
            return Ok(Some(match qmp.execute("blockdev-set-active", Some(serde_json::json!({ "active": true }))) {
                Ok(_) => "the source VM was paused when the migration began and stays paused; its QEMU had completed and inactivated its disk images: they are active again".into(),
                Err(e) => format!(
                    "the source VM was paused when the migration began and stays paused; its QEMU had completed and inactivated its disk images, and could not re-activate them ({e}): they become active at its next `cont`"
                ),
            }));
        }
        Ok(None)
    }
}

fn check_cancel(opts: &SendOptions) -> Result<(), AgentError> {
    if opts.cancel.load(Ordering::Relaxed) {
        Err(AgentError::Cancelled)
    } else {
        Ok(())
    }
}

/// Migrates the VM behind `opts.qmp` to the receiver at `opts.to`. Returns the report in every
/// case; the error says why it did not complete. On any failure before the destination was told
/// to resume, the source VM is left as it was (running if it ran).
pub fn send(opts: &SendOptions, obs: &mut dyn Observer) -> (Report, Result<(), AgentError>) {
    let start = Instant::now();
    let mut report = Report {
        role: "send".into(),
        policy: match opts.policy {
            PolicyKind::Fixed => "fixed".into(),
            PolicyKind::Adaptive => "adaptive".into(),
        },
        tracker: "content".into(),
        tracker_missed_pages: None,
        max_downtime_ms: Some(opts.limits.max_downtime_ms),
        bandwidth_bytes_per_s: opts.bandwidth,
        transport: opts.transport.name().into(),
        max_device_state_bytes: Some(opts.max_device_state),
        ..Report::default()
    };
    let mut st = SourceState::default();
    let mut result = run(opts, obs, &mut report, &mut st);
    report.outcome = match &result {
        Ok(()) => "completed",
        Err(AgentError::Cancelled) => "cancelled",
        Err(AgentError::Unconfirmed(_)) => "unknown",
        Err(_) => "failed",
    }
    .into();
    if let Err(e) = &result {
        let mut msg = e.chain();
        if !st.committed {
            obs.progress(Progress::Phase("migration failed: restoring the source VM"));
            match st.recover() {
                Ok(None) => {}
                Ok(Some(note)) => {
                    obs.progress(Progress::Phase(&note));
                    report.warnings.push(note);
                }
                Err(re) => {
                    msg.push_str(&format!("; AND restoring the source VM failed: {}", re.chain()));
                    result = Err(AgentError::SourceNotRestored(msg.clone()));
                }
            }
        }
        report.error = Some(msg);
    }
    // A downtime above the operator's maximum is not a plain "completed" (the destination runs,
    // but the guest was paused longer than allowed): its own outcome, a warning, exit code 5.
    if let (true, Some(d)) = (result.is_ok(), report.downtime_ms) {
        let max = opts.limits.max_downtime_ms;
        if d > max {
            report.outcome = OUTCOME_OVER_MAXIMUM.into();
            let predicted = report.predicted_downtime_ms.map_or_else(String::new, |p| format!(", predicted {p:.0} ms"));
            report.warnings.push(format!(
                "the downtime was {d:.0} ms, above the maximum of {max:.0} ms{predicted}: the destination VM runs, but \
                 its guest was paused longer than --max-downtime allows"
            ));
        }
    }
    if let Some(qmp) = st.qmp.as_ref() {
        report.source_state = Some(match throttle::lock(qmp).query_status() {
            Ok(s) => s.status,
            Err(e) => format!("unknown ({e})"),
        });
    }
    report.compute_compaction_ratio();
    report.total_time_ms = ms(start.elapsed());
    (report, result)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run(opts: &SendOptions, obs: &mut dyn Observer, report: &mut Report, st: &mut SourceState) -> Result<(), AgentError> {
    obs.progress(Progress::Phase("connecting to the source QEMU"));
    let qmp = Qmp::connect(&opts.qmp, opts.timeout)
        .map_err(AgentError::qmp(format!("cannot reach the source QEMU's QMP socket {}", opts.qmp.display())))?;
    st.qmp = Some(Arc::new(Mutex::new(qmp)));
    let status = st.qmp().query_status().map_err(AgentError::qmp("cannot query the source VM's state"))?;
    if !matches!(status.status.as_str(), "running" | "paused") {
        return Err(AgentError::Incompatible(format!(
            "the source VM is in state `{}`; only a running or paused VM can be migrated",
            status.status
        )));
    }
    st.was_running = status.running;
    let version = QemuVersion::of(&st.qmp())?;
    report.qemu_version = Some(version.to_string());
    let kvm = st.qmp().execute("query-kvm", None).ok().and_then(|v| v["enabled"].as_bool()).unwrap_or(false);
    let stream_ok = crate::stream::send::usable(version, kvm);
    let (use_stream, why) = match (opts.engine, &stream_ok) {
        (Engine::Stream, Ok(())) => (true, "forced (--engine stream)".to_string()),
        (Engine::Stream, Err(no)) => return Err(AgentError::Incompatible(format!("the stream engine cannot be used: {no}"))),
        (Engine::Shared, _) => (false, "forced (--engine shared)".to_string()),
        (Engine::Auto, Ok(())) => (true, format!(
            "QEMU {version} tracks dirty pages itself (O(dirty), any RAM): measured here its downtime stayed 6-10 ms from 1 to 4 GiB touched where the shared engine's grew 66 -> 196 ms (it hashes all RAM in the downtime)"
        )),
        (Engine::Auto, Err(no)) => (false, format!("the stream engine cannot be used ({no})")),
    };
    report.engine = if use_stream { "stream" } else { "shared" }.into();
    report.engine_reason = Some(why.clone());
    obs.progress(Progress::Phase(&format!("engine: {}: {why}", report.engine)));
    if use_stream {
        report.tracker = "qemu".into();
        return crate::stream::send::run(opts, obs, report, st, version);
    }
    let mem = GuestMemory::open(&mut st.qmp())?;
    crate::qemu::check_shared_engine(version, &crate::qemu::memfd_regions(&mem), "source")?;
    let total = mem.total_pages();
    report.ram_bytes = mem.layout().iter().map(|(_, s)| s).sum();
    // The tracker proves itself before anything is sent.
    let threads = opts.threads.clamp(1, crate::pipeline::MAX_THREADS);
    report.threads = Some(threads);
    let (mut tracker, note) = Scanner::new(opts.tracker, &mem, threads)?;
    if let Some(note) = note {
        obs.progress(Progress::Phase(&format!("WARNING: {note}")));
        report.warnings.push(note);
    }
    report.tracker = tracker.name().into();
    st.qmp()
        .migrate_set_capabilities(&[("x-ignore-shared", true)])
        .map_err(AgentError::qmp("cannot enable x-ignore-shared on the source QEMU"))?;

    let (vm, store) = snapshot_store(opts, st, obs, report)?;
    if !opts.disk_images.is_empty() {
        obs.progress(Progress::Phase("indexing the disk images"));
    }
    let indexes = holdings::load_indexes(&opts.disk_images, &opts.index_cache, opts.disk_align, obs, report)?;

    let (stream, mut reader, mut writer_half, tls_key) = connect_receiver(opts, obs, report)?;
    let regions: Vec<RegionInfo> = mem.layout().into_iter().map(|(id, size)| RegionInfo { id, size }).collect();
    livemig_wire::write_message(
        &mut writer_half,
        &Message::Hello {
            version: PROTOCOL_VERSION,
            min_version: MIN_PROTOCOL_VERSION,
            software: SOFTWARE.into(),
            page_size: 4096,
            regions,
            vm: vm.clone().filter(|_| store.is_some()),
            disks: holdings::offers(&indexes)?,
            engine: livemig_wire::ENGINE_SHARED.into(),
        },
    )?;
    let (holds, key, version, join): (Holdings, _, _, _) = match livemig_wire::read_message(&mut reader)? {
        Message::Welcome { version, software, .. } if version < MIN_PROTOCOL_VERSION => {
            return Err(AgentError::Incompatible(format!(
                "the receiver ({software}) speaks protocol {version}, this sender {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}"
            )))
        }
        Message::Welcome { holds, page_key, version, join, .. } => {
            (holds, transport::sender_page_key(tls_key, page_key.as_deref())?, version, join)
        }
        Message::Abort { reason } => return Err(AgentError::PeerAborted { peer: "destination", reason }),
        other => return Err(AgentError::Protocol { expected: "welcome".into(), got: other.name().into() }),
    };
    transport::report_page_key(report, obs, &key, tls_key.is_some());
    let mut encoder =
        Encoder::new(total, EncodeOptions { compressor: opts.compressor.initial(), ..EncodeOptions::for_ram(report.ram_bytes) }, key);
    let mut auto = SharedAuto::new(opts.compressor, threads, obs);
    report.disk_images_used = holds.disks.len();
    if let Some(d) = SenderDisks::new(indexes, &holds.disks) {
        encoder.set_disk_lookup(d);
    }
    // The newest snapshot of the VM both sides hold.
    let mut plan = None;
    if let (Some(store), Some(vm)) = (&store, &vm) {
        if let Some((id, snap)) = holdings::choose_snapshot(store, vm, &holds.snapshots)? {
            encoder.set_snapshot_lookup(Arc::new(SenderSnapshot(snap.lookup_table())));
            report.snapshot_used = Some(id.clone());
            plan = Some(id);
        }
    }
    let connections = connections_for(opts.connections.unwrap_or_else(default_connections), version, join.as_deref(), obs, report)?;
    livemig_wire::write_message(&mut writer_half, &Message::Plan { snapshot: plan, connections })?;
    // The reader thread waits as long as the migration lasts (the receiver is silent while a
    // pass is applied); every wait for an answer is bounded by `Inbox::next`'s own timeout
    // instead. SO_RCVTIMEO is per socket, the writer's SO_SNDTIMEO stays.
    stream
        .set_read_timeout(None)
        .map_err(|source| AgentError::Network { what: "cannot configure the socket".into(), source })?;
    let inbox = Inbox::spawn(reader, "destination");
    // The rate cap is shared out among the connections.
    let each = opts.bandwidth.map(|b| (b / u64::from(connections)).max(1));
    let mut links = Links::new(Writer::spawn(writer_half, each));
    let _data_readers = match join.as_deref().filter(|_| connections > 1) {
        Some(token) => {
            obs.progress(Progress::Phase(&format!("opening {} more connections to the receiver", connections - 1)));
            match open_data_connections(opts, token, connections, each, &mut links) {
                Ok(r) => r,
                Err(e) => {
                    // The receiver waits for them: tell it why they will not come.
                    let _ = links.send(Out::Message(Message::Abort { reason: e.chain() }));
                    let _ = links.control().marker(Duration::from_secs(2));
                    let _ = links.finish();
                    return Err(e);
                }
            }
        }
        None => Vec::new(),
    };
    let mut r = precopy_and_switchover(opts, obs, report, st, &mem, total, &inbox, &mut links, &mut encoder, &mut tracker, &mut auto);
    report.compressor = Some(auto.auto.report());
    report.wire_bytes = links.total_bytes();
    report.set_class_stats(encoder.stats());
    if let Err(AgentError::Wire(_)) = &r {
        // A broken connection is often the receiver giving up: prefer the reason it sent.
        if let Err(e @ AgentError::PeerAborted { .. }) = inbox.next(Duration::from_secs(1), "the receiver's reason") {
            r = Err(e);
        }
    }
    if let Err(e) = &r {
        // Tell the destination why, unless the connection is what failed.
        if !matches!(e, AgentError::Wire(_)) {
            let _ = links.send(Out::Message(Message::Abort { reason: e.chain() }));
            let _ = links.control().marker(Duration::from_secs(2));
        }
    }
    let _ = links.finish();
    if r.is_ok() {
        if let (Some(store), Some(vm), Some(digest)) = (&store, &vm, &report.verification.source_digest) {
            // The source is paused in `postmigrate`: its memory is what the destination holds.
            obs.progress(Progress::Phase("keeping a memory snapshot of the VM"));
            match digest.parse::<livemig_track::Digest>() {
                Ok(d) => match livemig_index::save_from(store, vm, d.0, total, {
                    let data = mem.data_ranges();
                    move |p, buf| {
                        if livemig_track::in_ranges(data.as_deref(), p) {
                            mem.read_page_into(p, buf).map_err(std::io::Error::other)
                        } else {
                            buf.fill(0);
                            Ok(())
                        }
                    }
                }) {
                    Ok(info) => report.snapshot_kept = Some(format!("{:032x}", info.id)),
                    Err(e) => report.warnings.push(format!("the memory snapshot was not kept: {}", crate::with_sources(&e))),
                },
                Err(_) => report.warnings.push("the memory snapshot was not kept: unreadable digest".into()),
            }
        }
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn precopy_and_switchover(
    opts: &SendOptions,
    obs: &mut dyn Observer,
    report: &mut Report,
    st: &mut SourceState,
    mem: &GuestMemory,
    total: u64,
    inbox: &Inbox,
    links: &mut Links,
    encoder: &mut Encoder,
    tracker: &mut Scanner,
    auto: &mut SharedAuto,
) -> Result<(), AgentError> {
    let src = MemSource(mem);
    // Pages the destination could not resolve: sent whole in the next pass.
    let mut forced: BTreeSet<u64> = BTreeSet::new();
    let mut ledger = Ledger::zeroed(total, encoder.key().clone());
    let qmp = Arc::clone(st.qmp.as_ref().expect("QMP connected"));
    let mut controller = opts.policy.controller(opts.limits, opts.on_no_converge);
    let mut history: Vec<IterationStats> = Vec::new();
    let mut index: u32 = 0;
    // Started only for a running guest; stopped (the guest running again) before the switchover
    // and on every early return (drop).
    let mut throttler = st.was_running.then(|| Throttler::start(Arc::clone(st.qmp.as_ref().expect("QMP connected"))));
    let predicted = loop {
        check_cancel(opts)?;
        // The guest RAM stays mapped here after the source QEMU died: ask QEMU itself.
        st.qmp().query_status().map_err(AgentError::qmp("the source QEMU is gone"))?;
        take_resends(inbox, encoder, &mut forced, total, report)?;
        if let Some(t) = throttler.as_mut() {
            t.check()?;
        }
        let throttle_level = throttler.as_ref().map_or(0.0, Throttler::level);
        let (scan, pause) = tracker.scan(&src, &ledger, &qmp, !st.was_running)?;
        let scan_ms = ms(scan.duration);
        let pending = Pending { index, dirty_pages: scan.dirty.len() as u64, scan_ms, bytes_per_page: None };
        // The final scan in downtime costs what this one did, plus the soft-dirty tracker's full
        // content check.
        let final_cost = Pending { scan_ms: scan_ms + tracker.final_check_ms(), ..pending };
        let decision = controller.decide(&history, &final_cost);
        match &decision {
            Decision::Switchover { predicted_downtime_ms, .. } => break *predicted_downtime_ms,
            Decision::Abort { reason, .. } => {
                report.iterations.push(IterationRecord::new(
                    IterationStats {
                        index,
                        dirty_pages: pending.dirty_pages,
                        sent_pages: 0,
                        wire_bytes: 0,
                        duration_ms: scan_ms,
                        scan_ms,
                        rate_bytes_per_s: 0.0,
                        throttle: throttle_level,
                    },
                    &decision,
                    controller.fit(),
                    false,
                ));
                return Err(AgentError::NotConverged(reason.clone()));
            }
            Decision::Throttle { fraction, .. } => {
                // A VM paused when the migration began may have been resumed since: throttle it
                // then (its throttler starts now).
                if throttler.is_none() && st.qmp().query_status().map_err(AgentError::qmp("the source QEMU is gone"))?.running {
                    st.was_running = true;
                    throttler = Some(Throttler::start(Arc::clone(st.qmp.as_ref().expect("QMP connected"))));
                }
                match throttler.as_ref() {
                    Some(t) => t.set(*fraction),
                    None => return Err(AgentError::NotConverged(format!("{}; the VM is paused, so it cannot be throttled", decision.reason()))),
                }
            }
            Decision::Continue { .. } => {}
        }
        let throttle_level = throttler.as_ref().map_or(0.0, Throttler::level);
        let t0 = Instant::now();
        let sent = send_pages(opts, obs, mem, &scan.dirty, &mut forced, &mut ledger, links, encoder, index, auto)?;
        links.fence(index)?;
        links.send(Out::Message(Message::IterationEnd { index, pages: sent, last: false }))?;
        let ack = links.marker(opts.timeout)?;
        // The iteration ends when the destination has applied it: the rate the controller sees
        // is that of the whole pipeline (read, encode, link, decode, write), as in downtime.
        wait_end_ack(opts, inbox, encoder, &mut forced, total, report, index)?;
        let stats = iteration_stats(index, &pending, sent, ack.bytes, t0.elapsed(), scan_ms + ms(t0.elapsed()), throttle_level);
        let mut record = IterationRecord::new(stats.clone(), &decision, controller.fit(), false);
        record.tracker_pause_ms = pause.map(ms);
        obs.progress(Progress::Iteration(&record));
        report.iterations.push(record);
        history.push(stats);
        index += 1;
    };
    report.predicted_downtime_ms = Some(predicted);
    let final_throttle = throttler.as_ref().map_or(0.0, Throttler::level);
    if let Some(t) = throttler.take() {
        let stats = t.finish()?;
        report.throttle = Some(ThrottleReport {
            max: report.iterations.iter().map(|i| i.stats.throttle).fold(0.0, f64::max),
            stunned_ms: ms(stats.stunned),
            slices: stats.slices,
        })
        .filter(|r| r.slices > 0);
        if let Some(t) = &report.throttle {
            // QMP `stop` freezes the guest's clocks too (measured: BENCHMARKS.md, "Throttling").
            let w = format!(
                "the source guest was throttled by stopping its vCPUs ({} stop/cont slices, {:.1} s stopped in all): its clock stands that much behind the host's until its time sync (NTP, chrony) corrects it; QEMU's own CPU throttle, which the stream engine uses, does not stop the clock",
                t.slices,
                t.stunned_ms / 1000.0
            );
            obs.progress(Progress::Phase(&w));
            report.warnings.push(w);
        }
    }

    // Switchover: from here the source is paused until the destination runs or we resume it.
    check_cancel(opts)?;
    obs.progress(Progress::Phase("switchover: pausing the source VM"));
    let t_stop = Instant::now();
    // Always stop: a VM that was paused when the migration began may have been resumed since
    // (by the operator or its management), and a final pass over a running guest would lose
    // its last writes. On a failure it is resumed if it ran just before this stop.
    let now = st.qmp().query_status().map_err(AgentError::qmp("cannot query the source VM's state"))?;
    st.was_running |= now.running;
    st.stopped = true;
    st.qmp().stop().map_err(AgentError::qmp("cannot pause the source VM"))?;
    // From here a RESUME event means someone else ran the guest again (checked before the commit).
    let _ = st.qmp().take_events();
    let (scan, missed) = tracker.final_scan(&src, &ledger)?;
    if let Some(missed) = missed {
        report.tracker_missed_pages = Some(missed.len() as u64);
        if !missed.is_empty() {
            let first: Vec<String> = missed.iter().take(8).map(|p| format!("{p:#x}")).collect();
            let w = format!(
                "the final content check found {} changed pages whose soft-dirty bit was clear (pages {}{}); they were sent in the final pass",
                missed.len(),
                first.join(", "),
                if missed.len() > 8 { ", ..." } else { "" }
            );
            obs.progress(Progress::Phase(&w));
            report.warnings.push(w);
        }
    }
    let scan_ms = ms(scan.duration);
    let pending = Pending { index, dirty_pages: scan.dirty.len() as u64, scan_ms, bytes_per_page: None };
    take_resends(inbox, encoder, &mut forced, total, report)?;
    let mut sent = send_pages(opts, obs, mem, &scan.dirty, &mut forced, &mut ledger, links, encoder, index, auto)?;
    // The destination acknowledges the final pass once applied; pages it could not resolve come
    // before the acknowledgement and are sent whole until none is left.
    let mut end = index;
    for round in 0.. {
        links.fence(end)?;
        links.send(Out::Message(Message::IterationEnd { index: end, pages: sent, last: true }))?;
        wait_end_ack(opts, inbox, encoder, &mut forced, total, report, end)?;
        if forced.is_empty() {
            break;
        }
        if round >= 3 {
            return Err(AgentError::Protocol {
                expected: "pages sent whole to be applied".into(),
                got: format!("{} pages reported unresolved again", forced.len()),
            });
        }
        end += 1;
        sent = send_pages(opts, obs, mem, &[], &mut forced, &mut ledger, links, encoder, end, auto)?;
    }
    let digest = ledger.digest();
    links.send(Out::Message(Message::Switchover { digest: digest.to_string(), pages: total }))?;
    let ack = links.marker(opts.timeout)?;
    let stats = iteration_stats(index, &pending, sent, ack.bytes, t_stop.elapsed(), ms(t_stop.elapsed()), final_throttle);
    let final_decision = Decision::Switchover { predicted_downtime_ms: predicted, reason: "final pass with the source paused".into() };
    let record = IterationRecord::new(stats, &final_decision, controller.fit(), true);
    obs.progress(Progress::Iteration(&record));
    report.iterations.push(record);
    report.verification.source_digest = Some(digest.to_string());

    obs.progress(Progress::Phase("switchover: verifying destination memory"));
    match inbox.next(opts.timeout, "the destination's memory verification")? {
        Message::Verified { ok, digest: theirs } => {
            report.verification.destination_digest = Some(theirs.clone());
            report.verification.ok = ok && theirs == digest.to_string();
            if !report.verification.ok {
                return Err(AgentError::VerifyMismatch { source_digest: digest.to_string(), destination_digest: theirs });
            }
        }
        other => return Err(AgentError::Protocol { expected: "verified".into(), got: other.name().into() }),
    }

    obs.progress(Progress::Phase("switchover: migrating device state"));
    let dir = crate::private_dir("send")?;
    let sock = dir.path().join("device-state.sock");
    let listener = UnixListener::bind(&sock)
        .map_err(|source| AgentError::Network { what: format!("cannot listen on {}", sock.display()), source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| AgentError::Network { what: "cannot configure the device-state socket".into(), source })?;
    st.migrating = true;
    st.qmp()
        .migrate(&format!("unix:{}", sock.display()))
        .map_err(AgentError::qmp("the source QEMU refused to migrate its device state"))?;
    let bytes = relay_device_state(listener, st, opts, links.control())?;
    let info = st.qmp().wait_migration(opts.timeout).map_err(AgentError::qmp("cannot follow the source's migration"))?;
    if info.status.as_deref() != Some("completed") {
        return Err(AgentError::DeviceState(
            info.error_desc.unwrap_or_else(|| format!("status {}", info.status.unwrap_or_default())),
        ));
    }
    report.device_state_bytes = bytes;
    links.send(Out::Message(Message::DeviceStateEnd { bytes }))?;
    links.marker(opts.timeout)?;
    match inbox.next(opts.timeout, "the destination to load the device state")? {
        Message::Loaded => {}
        other => return Err(AgentError::Protocol { expected: "loaded".into(), got: other.name().into() }),
    }
    check_cancel(opts)?;
    // The source must have stayed paused since the final pass: QEMU tells every monitor, so a
    // `cont` from anyone shows as a RESUME event on ours (read with this query's reply).
    st.qmp().query_status().map_err(AgentError::qmp("cannot query the source VM's state"))?;
    if st.qmp().take_events().iter().any(|e| e.name == "RESUME") {
        // It was meant to run: on the way out it runs again.
        st.was_running = true;
        return Err(AgentError::SourceResumedDuringSwitchover);
    }

    obs.progress(Progress::Phase("switchover: resuming the destination"));
    st.committed = true;
    if let Err(e) = links.send(Out::Message(Message::Commit)).and_then(|()| links.marker(opts.timeout).map(drop)) {
        return Err(AgentError::Unconfirmed(e.chain()));
    }
    match inbox.next(opts.timeout, "the destination to confirm it runs") {
        Ok(Message::Resumed) => {}
        Ok(other) => return Err(AgentError::Unconfirmed(format!("it answered `{}`", other.name()))),
        Err(e @ AgentError::PeerAborted { .. }) => {
            // The destination says it did not resume: the source may run again.
            st.committed = false;
            return Err(e);
        }
        Err(e) => return Err(AgentError::Unconfirmed(e.chain())),
    }
    report.downtime_ms = Some(ms(t_stop.elapsed()));
    obs.progress(Progress::Phase("completed: the destination VM runs"));
    Ok(())
}

/// The connection to the receiver: the TCP stream (for its socket options), the channel's halves
/// and the page key exported from the TLS session (`None` on a plain link).
pub(crate) type Connection = (
    std::net::TcpStream,
    Box<dyn std::io::Read + Send>,
    Box<dyn std::io::Write + Send>,
    Option<[u8; livemig_tls::PAGE_KEY_LEN]>,
);

/// Connects to the receiver at `opts.to` (retrying while it does not listen yet), sets up the
/// transport (TLS checks the receiver's name) and sends livemig's magic: the TCP stream and the
/// channel's halves. Both engines start here.
pub(crate) fn connect_receiver(
    opts: &SendOptions,
    obs: &mut dyn Observer,
    report: &mut Report,
) -> Result<Connection, AgentError> {
    obs.progress(Progress::Phase("connecting to the receiver"));
    let stream = link::connect(&opts.to, opts.connect_timeout)?;
    link::tune(&stream, opts.timeout)?;
    let name = opts.server_name.clone().unwrap_or_else(|| transport::host_of(&opts.to).to_string());
    let channel = transport::client(&opts.transport, &stream, &name)?;
    report.peer = Some(channel.peer.clone());
    let mut writer = channel.writer;
    livemig_wire::write_magic(&mut writer)?;
    Ok((stream, channel.reader, writer, channel.tls_key))
}

/// How many connections the pages go over: `wanted`, or 1 where the receiver cannot take more
/// (protocol < 6: said in the log and the report).
fn connections_for(wanted: u32, version: u32, join: Option<&str>, obs: &mut dyn Observer, report: &mut Report) -> Result<u32, AgentError> {
    connections_from(wanted, (version, livemig_wire::CONNECTIONS_PROTOCOL_VERSION, ""), join, obs, report)
}

/// [`connections_for`] of an engine whose several connections need protocol `needs` (`what`
/// after "one connection" in the warning: "" or " for the stream engine").
pub(crate) fn connections_from(
    wanted: u32,
    (version, needs, what): (u32, u32, &str),
    join: Option<&str>,
    obs: &mut dyn Observer,
    report: &mut Report,
) -> Result<u32, AgentError> {
    if wanted == 0 || wanted > livemig_wire::MAX_CONNECTIONS {
        return Err(AgentError::Incompatible(format!("--connections must be 1 to {}, not {wanted}", livemig_wire::MAX_CONNECTIONS)));
    }
    let n = if wanted > 1 && (version < needs || join.is_none()) {
        let w = format!("the receiver speaks protocol {version}, which has one connection{what}: the pages go over one, not {wanted}");
        obs.progress(Progress::Phase(&w));
        report.warnings.push(w);
        1
    } else {
        wanted
    };
    report.connections = Some(n);
    Ok(n)
}

/// Opens the data connections 1 to `n - 1` (protocol 6): each connects, sets up its own TLS
/// session (the receiver's name checked as for the first), sends the magic and a `join` with
/// the welcome's secret, and gets a writer thread of its own, added to `links`. Returns their
/// reading halves, kept open as long as the migration (the receiver sends nothing on them).
pub(crate) fn open_data_connections(
    opts: &SendOptions,
    token: &str,
    n: u32,
    rate: Option<u64>,
    links: &mut Links,
) -> Result<Vec<Box<dyn std::io::Read + Send>>, AgentError> {
    let mut readers = Vec::new();
    for index in 1..n {
        let stream = link::connect(&opts.to, opts.connect_timeout)?;
        link::tune(&stream, opts.timeout)?;
        let name = opts.server_name.clone().unwrap_or_else(|| transport::host_of(&opts.to).to_string());
        let channel = transport::client(&opts.transport, &stream, &name)?;
        let mut w = channel.writer;
        livemig_wire::write_magic(&mut w)?;
        livemig_wire::write_message(&mut w, &Message::Join { token: token.to_string(), index })?;
        links.add(Writer::spawn(w, rate));
        readers.push(channel.reader);
    }
    Ok(readers)
}

/// What the thread that owns QEMU's outgoing connection reports.
enum FromQemu {
    /// QEMU connected (the stream itself, when the caller reads it).
    Connected(Option<UnixStream>),
    /// Bytes read from the connection (device state).
    Data(Vec<u8>),
    /// QEMU closed its end: everything was read.
    End,
    /// Accepting or reading failed.
    Failed(AgentError),
}

/// Accepts the source QEMU's outgoing migration (`what`) on `listener` on a thread of its own and,
/// with `drain`, reads it there to the end, sending what it reads.
///
/// Why a thread: QEMU connects asynchronously after `migrate` returned and may then write while it
/// holds its big lock (the setup sections; the whole device state when the source is paused). A
/// `query-migrate` needs that lock; if the same thread had to both answer for the socket and wait
/// for that reply, QEMU would block on a full socket nobody reads and the query would time out (a
/// CI run saw exactly that). Here the socket is accepted and read independently of QMP.
fn spawn_qemu_acceptor(
    listener: &UnixListener,
    timeout: Duration,
    what: &str,
    drain: bool,
) -> Result<QemuAcceptor, AgentError> {
    let listener = listener
        .try_clone()
        .map_err(|source| AgentError::Network { what: format!("cannot listen for QEMU's {what}"), source })?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let what = what.to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    std::thread::Builder::new()
        .name("livemig-qemu-accept".into())
        .spawn(move || {
            let deadline = Instant::now() + timeout;
            let conn = loop {
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline || stopped.load(Ordering::Relaxed) {
                            // Timed out (the caller says so) or nobody waits any more.
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(source) => {
                        let _ = tx.send(FromQemu::Failed(AgentError::Network { what: format!("cannot accept QEMU's {what}"), source }));
                        return;
                    }
                }
            };
            let io = |source| AgentError::Network { what: format!("cannot read QEMU's {what}"), source };
            // Device state comes in one burst: a read timeout bounds a stalled QEMU. A relayed
            // stream may be quiet for long; its reader decides.
            let read_timeout = drain.then_some(timeout);
            if let Err(e) = conn.set_nonblocking(false).and_then(|()| conn.set_read_timeout(read_timeout)) {
                let _ = tx.send(FromQemu::Failed(io(e)));
                return;
            }
            if !drain {
                let _ = tx.send(FromQemu::Connected(Some(conn)));
                return;
            }
            if tx.send(FromQemu::Connected(None)).is_err() {
                return;
            }
            let mut conn = conn;
            loop {
                let mut buf = vec![0u8; 256 * 1024];
                match conn.read(&mut buf) {
                    Ok(0) => {
                        let _ = tx.send(FromQemu::End);
                        return;
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.send(FromQemu::Data(buf)).is_err() {
                            return; // The caller gave up (e.g. the device state passed its cap).
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.send(FromQemu::Failed(io(e)));
                        return;
                    }
                }
            }
        })
        .map_err(|source| AgentError::Network { what: "cannot start the thread that accepts QEMU's connection".into(), source })?;
    Ok(QemuAcceptor { rx, stop })
}

/// The receiving end of [`spawn_qemu_acceptor`]; dropping it stops a thread still accepting.
struct QemuAcceptor {
    rx: crossbeam_channel::Receiver<FromQemu>,
    stop: Arc<AtomicBool>,
}

impl Drop for QemuAcceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Waits for the next report of the acceptor; until QEMU connected, checks every 50 ms whether
/// QEMU's migration failed (a QMP query is safe then: QEMU writes nothing before it connected,
/// and afterwards the acceptor reads).
fn next_from_qemu(
    rx: &crossbeam_channel::Receiver<FromQemu>,
    st: &SourceState,
    connected: bool,
    deadline: Instant,
    timeout: Duration,
    what: &str,
) -> Result<FromQemu, AgentError> {
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(FromQemu::Failed(e)) => return Err(e),
            Ok(m) => return Ok(m),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return Err(AgentError::Timeout { what: format!("the source QEMU to connect its {what}"), secs: timeout.as_secs_f64() })
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if Instant::now() > deadline {
                    let what = if connected { format!("QEMU's {what}") } else { format!("the source QEMU to connect its {what}") };
                    return Err(AgentError::Timeout { what, secs: timeout.as_secs_f64() });
                }
                if !connected {
                    let info = st.qmp().query_migrate().map_err(AgentError::qmp("cannot query the source's migration"))?;
                    if info.status.as_deref() == Some("failed") {
                        return Err(AgentError::DeviceState(info.error_desc.unwrap_or_else(|| "failed".into())));
                    }
                }
            }
        }
    }
}

/// Waits for the source QEMU to connect its outgoing migration (`what`) to `listener` (non
/// blocking), failing early when QEMU's migration failed. The connection comes back blocking.
pub(crate) fn accept_qemu(listener: &UnixListener, st: &SourceState, timeout: Duration, what: &str) -> Result<UnixStream, AgentError> {
    let acceptor = spawn_qemu_acceptor(listener, timeout, what, false)?;
    match next_from_qemu(&acceptor.rx, st, false, Instant::now() + timeout, timeout, what)? {
        FromQemu::Connected(Some(c)) => Ok(c),
        _ => Err(AgentError::Network { what: format!("QEMU's {what}"), source: std::io::Error::other("unexpected report of the acceptor") }),
    }
}

/// Carries QEMU's device state from its connection on `listener` to the receiver, as it is read;
/// fails past `--max-device-state`. Returns the bytes carried.
fn relay_device_state(listener: UnixListener, st: &SourceState, opts: &SendOptions, writer: &mut Writer) -> Result<u64, AgentError> {
    const WHAT: &str = "device-state stream";
    let acceptor = spawn_qemu_acceptor(&listener, opts.timeout, WHAT, true)?;
    let mut connected = false;
    let mut deadline = Instant::now() + opts.timeout;
    let mut bytes = 0u64;
    loop {
        match next_from_qemu(&acceptor.rx, st, connected, deadline, opts.timeout, WHAT)? {
            FromQemu::Connected(_) => connected = true,
            FromQemu::Data(data) => {
                bytes += data.len() as u64;
                if bytes > opts.max_device_state {
                    return Err(AgentError::DeviceState(format!(
                        "QEMU's device-state stream passed {} KiB, above --max-device-state ({} KiB): QEMU is copying guest \
                         RAM while the source is paused (a RAM block that x-ignore-shared does not skip?)",
                        bytes >> 10,
                        opts.max_device_state >> 10
                    )));
                }
                writer.send(Out::Frame(FrameKind::DeviceState, data))?;
            }
            FromQemu::End => return Ok(bytes),
            FromQemu::Failed(e) => return Err(e),
        }
        // The socket's own read timeout bounds each read; this bounds a stalled relay.
        deadline = Instant::now() + opts.timeout;
    }
}

fn iteration_stats(
    index: u32,
    pending: &Pending,
    sent: u64,
    bytes: u64,
    busy: Duration,
    duration_ms: f64,
    throttle: f64,
) -> IterationStats {
    // A burst too small to fill the socket buffers says nothing about the link.
    let rate = if bytes >= 256 * 1024 && busy > Duration::from_millis(1) { bytes as f64 / busy.as_secs_f64() } else { 0.0 };
    IterationStats {
        index,
        dirty_pages: pending.dirty_pages,
        sent_pages: sent,
        wire_bytes: bytes,
        duration_ms,
        scan_ms: pending.scan_ms,
        rate_bytes_per_s: rate,
        throttle,
    }
}

/// Pages the destination could not resolve, reported so far: forgotten by the encoder and
/// queued to go whole.
fn take_resends(
    inbox: &Inbox,
    encoder: &mut Encoder,
    forced: &mut BTreeSet<u64>,
    total: u64,
    report: &mut Report,
) -> Result<(), AgentError> {
    while let Some(m) = inbox.poll()? {
        match m {
            Message::Resend { pages } => queue_resend(&pages, encoder, forced, total, report)?,
            other => return Err(AgentError::Protocol { expected: "nothing or a resend request".into(), got: other.name().into() }),
        }
    }
    Ok(())
}

fn queue_resend(
    pages: &[u64],
    encoder: &mut Encoder,
    forced: &mut BTreeSet<u64>,
    total: u64,
    report: &mut Report,
) -> Result<(), AgentError> {
    if pages.len() > MAX_RESEND_PAGES {
        return Err(AgentError::Protocol { expected: format!("at most {MAX_RESEND_PAGES} pages in a resend request"), got: pages.len().to_string() });
    }
    for &p in pages {
        if p >= total {
            return Err(AgentError::Protocol { expected: format!("a page below {total}"), got: format!("resend of page {p}") });
        }
        encoder.invalidate(p);
        forced.insert(p);
    }
    report.resent_pages += pages.len() as u64;
    Ok(())
}

/// Waits for the acknowledgement of final pass `index`, queueing the resend requests before it.
fn wait_end_ack(
    opts: &SendOptions,
    inbox: &Inbox,
    encoder: &mut Encoder,
    forced: &mut BTreeSet<u64>,
    total: u64,
    report: &mut Report,
    index: u32,
) -> Result<(), AgentError> {
    loop {
        match inbox.next(opts.timeout, "the destination to apply the final pages")? {
            Message::Resend { pages } => queue_resend(&pages, encoder, forced, total, report)?,
            Message::EndAck { index: i } if i == index => return Ok(()),
            other => return Err(AgentError::Protocol { expected: format!("end-ack of iteration {index}"), got: other.name().into() }),
        }
    }
}

/// Sends the `dirty` pages and the `forced` ones (whole), in page order, through the shared
/// pipeline ([`crate::pipeline::send_pages`]).
#[allow(clippy::too_many_arguments)]
fn send_pages(
    opts: &SendOptions,
    obs: &mut dyn Observer,
    mem: &GuestMemory,
    dirty: &[u64],
    forced: &mut BTreeSet<u64>,
    ledger: &mut Ledger,
    links: &mut Links,
    encoder: &mut Encoder,
    iteration: u32,
    auto: &mut SharedAuto,
) -> Result<u64, AgentError> {
    let whole = std::mem::take(forced);
    let mut list: Vec<(u64, bool)> = dirty.iter().filter(|p| !whole.contains(p)).map(|&p| (p, false)).collect();
    list.extend(whole.iter().map(|&p| (p, true)));
    list.sort_unstable();
    let n = list.len() as u64;
    auto.start_pass();
    let sent = crate::pipeline::send_pages(mem, &list, ledger, encoder, links, opts.threads, |sent, w, enc| {
        obs.progress(Progress::Sending { iteration, sent, dirty: n, wire_bytes: w.total_bytes() });
        auto.after_batch(mem, &list, sent, w, enc, iteration, obs)?;
        check_cancel(opts)
    })?;
    obs.progress(Progress::Sending { iteration, sent, dirty: n, wire_bytes: links.total_bytes() });
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More than one connection needs a receiver of protocol 6 that sent a join secret; an
    /// older one gets one connection, said in the log and the report; out of range is an error.
    #[test]
    fn connections_fall_back_to_one_for_an_older_receiver_and_say_so() {
        let mut report = Report::default();
        assert_eq!(connections_for(4, 6, Some("ab"), &mut crate::Quiet, &mut report).unwrap(), 4);
        assert_eq!(report.connections, Some(4));
        assert!(report.warnings.is_empty());
        assert_eq!(connections_for(1, 5, None, &mut crate::Quiet, &mut report).unwrap(), 1);
        assert!(report.warnings.is_empty(), "one connection asked, none refused");
        assert_eq!(connections_for(4, 5, None, &mut crate::Quiet, &mut report).unwrap(), 1);
        assert_eq!(report.connections, Some(1));
        assert!(report.warnings[0].contains("speaks protocol 5, which has one connection"), "{:?}", report.warnings);
        assert!(connections_for(0, 6, Some("ab"), &mut crate::Quiet, &mut report).is_err());
        assert!(connections_for(17, 6, Some("ab"), &mut crate::Quiet, &mut report).is_err());
    }

    /// The stream engine's several connections need protocol 7: a receiver of 6 (which sends a
    /// join secret for the shared engine only) gets one, said.
    #[test]
    fn the_stream_engine_falls_back_to_one_connection_below_protocol_7_and_says_so() {
        let stream = |v| (v, livemig_wire::STREAM_CONNECTIONS_PROTOCOL_VERSION, " for the stream engine");
        let mut report = Report::default();
        assert_eq!(connections_from(3, stream(7), Some("ab"), &mut crate::Quiet, &mut report).unwrap(), 3);
        assert!(report.warnings.is_empty());
        assert_eq!(connections_from(3, stream(6), Some("ab"), &mut crate::Quiet, &mut report).unwrap(), 1);
        assert_eq!(report.connections, Some(1));
        assert!(report.warnings[0].contains("speaks protocol 6, which has one connection for the stream engine"), "{:?}", report.warnings);
    }
    use std::io::{BufRead, BufReader, Write};

    /// A fake source QEMU like the real one at switchover: on `query-migrate` it connects its
    /// device state and writes all of it (8 MiB, far past a socket buffer) *before* it answers,
    /// as QEMU does while it holds its big lock. The relay must read the socket while it waits
    /// for that reply, or both wait for each other until the QMP timeout.
    #[test]
    fn device_state_is_read_while_qemu_holds_its_lock_before_answering_qmp() {
        const STATE: usize = 8 << 20;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("device-state.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (client, server) = UnixStream::pair().unwrap();
        let fake = std::thread::spawn(move || {
            let mut w = server.try_clone().unwrap();
            let mut r = BufReader::new(server);
            let mut line = String::new();
            let mut recv = |r: &mut BufReader<UnixStream>| -> serde_json::Value {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(n) if n > 0 => serde_json::from_str(&line).unwrap(),
                    _ => serde_json::Value::Null, // livemig hung up
                }
            };
            writeln!(w, r#"{{"QMP": {{"version": {{"qemu": {{"micro": 2, "minor": 0, "major": 10}}, "package": ""}}, "capabilities": []}}}}"#).unwrap();
            let caps = recv(&mut r);
            writeln!(w, "{}", serde_json::json!({ "return": {}, "id": caps["id"] })).unwrap();
            let mut sent = false;
            loop {
                let cmd = recv(&mut r);
                if cmd.is_null() {
                    return;
                }
                assert_eq!(cmd["execute"], "query-migrate", "{cmd}");
                if !sent {
                    let mut conn = UnixStream::connect(&sock).unwrap();
                    conn.write_all(&vec![0x5a; STATE]).unwrap();
                    sent = true;
                }
                writeln!(w, "{}", serde_json::json!({ "return": { "status": "active" }, "id": cmd["id"] })).unwrap();
            }
        });
        let qmp = Qmp::from_stream(client, Duration::from_secs(5)).unwrap();
        let st = SourceState { qmp: Some(Arc::new(Mutex::new(qmp))), ..SourceState::default() };
        let mut opts = SendOptions::new(PathBuf::new(), String::new());
        opts.timeout = Duration::from_secs(5);
        let (pipe_r, pipe_w) = UnixStream::pair().unwrap();
        let drain = std::thread::spawn(move || std::io::copy(&mut { pipe_r }, &mut std::io::sink()).unwrap());
        let mut writer = Writer::spawn(Box::new(pipe_w), None);
        let bytes = relay_device_state(listener, &st, &opts, &mut writer).expect("the device state is relayed");
        assert_eq!(bytes, STATE as u64);
        writer.finish().unwrap();
        assert!(drain.join().unwrap() >= STATE as u64, "every byte reached the receiver's side");
        drop(st);
        fake.join().unwrap();
    }
}
