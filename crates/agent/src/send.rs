//! The `send` role: tracks and sends the source VM's RAM, pauses it at switchover, carries QEMU's
//! device state, and resumes the source on any failure before the destination resumes.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use livemig_compact::{BatchEncoder, EncodeOptions};
use livemig_control::{
    AdaptivePolicy, Decision, DowntimeController, FixedPolicy, IterationStats, Limits, OnNoConverge, Pending,
};
use livemig_memory::{GuestMemory, PageBuf};
use livemig_qmp::Qmp;
use livemig_track::{hash_page, ContentTracker, Ledger, Tracker};
use livemig_wire::{FrameKind, Message, RegionInfo, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

use crate::error::AgentError;
use crate::link::{self, Inbox, Out, Writer};
use crate::report::{IterationRecord, Report, ThrottleReport};
use crate::throttle::{self, Throttler};
use crate::{MemSource, Observer, Progress, SOFTWARE};

/// Which downtime controller drives the iterations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// QEMU's fixed rule.
    Fixed,
    /// WWS regression.
    Adaptive,
}

impl PolicyKind {
    fn controller(self, limits: Limits, on: OnNoConverge) -> Box<dyn DowntimeController> {
        match self {
            PolicyKind::Fixed => Box::new(FixedPolicy { limits }),
            PolicyKind::Adaptive => Box::new(AdaptivePolicy::new(limits).on_no_converge(on)),
        }
    }
}

/// What `send` needs.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// QMP socket of the source QEMU.
    pub qmp: PathBuf,
    /// Receiver address, `host:port`.
    pub to: String,
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
    /// Compress pages.
    pub compress: bool,
    /// Scan threads.
    pub threads: usize,
    /// Set by a signal handler to cancel.
    pub cancel: Arc<AtomicBool>,
}

impl SendOptions {
    /// Options with defaults for everything but the endpoints.
    pub fn new(qmp: PathBuf, to: String) -> Self {
        SendOptions {
            qmp,
            to,
            policy: PolicyKind::Adaptive,
            limits: Limits::default(),
            on_no_converge: OnNoConverge::default(),
            bandwidth: None,
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
            compress: true,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// What has been done to the source VM, so a failure can be undone.
#[derive(Default)]
struct SourceState {
    qmp: Option<Arc<Mutex<Qmp>>>,
    was_running: bool,
    stopped: bool,
    migrating: bool,
    committed: bool,
}

impl SourceState {
    fn qmp(&self) -> MutexGuard<'_, Qmp> {
        throttle::lock(self.qmp.as_ref().expect("QMP connected before use"))
    }

    /// Puts the source back as it was: cancels QEMU's migration, resumes the vCPUs.
    fn recover(&mut self) -> Result<(), AgentError> {
        let Some(qmp) = self.qmp.as_ref() else { return Ok(()) };
        let mut qmp = throttle::lock(qmp);
        if self.migrating {
            let info = qmp.query_migrate().map_err(AgentError::qmp("cannot query the source's migration"))?;
            if !matches!(info.status.as_deref(), Some("completed" | "failed" | "cancelled") | None) {
                qmp.migrate_cancel().map_err(AgentError::qmp("cannot cancel the source's migration"))?;
                let _ = qmp.wait_migration(Duration::from_secs(10));
            }
        }
        if self.stopped && self.was_running {
            qmp.cont().map_err(AgentError::qmp("cannot resume the source VM"))?;
            self.stopped = false;
        }
        Ok(())
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
        max_downtime_ms: Some(opts.limits.max_downtime_ms),
        bandwidth_bytes_per_s: opts.bandwidth,
        transport: "tcp-insecure".into(),
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
            if let Err(re) = st.recover() {
                msg.push_str(&format!("; AND restoring the source VM failed: {}", re.chain()));
                result = Err(AgentError::SourceNotRestored(msg.clone()));
            }
        }
        report.error = Some(msg);
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
    let mem = GuestMemory::open(&mut st.qmp())?;
    let total = mem.total_pages();
    report.ram_bytes = mem.layout().iter().map(|(_, s)| s).sum();
    st.qmp()
        .migrate_set_capabilities(&[("x-ignore-shared", true)])
        .map_err(AgentError::qmp("cannot enable x-ignore-shared on the source QEMU"))?;

    obs.progress(Progress::Phase("connecting to the receiver"));
    let mut stream = link::connect(&opts.to, opts.connect_timeout)?;
    link::tune(&stream, opts.timeout)?;
    livemig_wire::write_magic(&mut stream)?;
    let regions: Vec<RegionInfo> = mem.layout().into_iter().map(|(id, size)| RegionInfo { id, size }).collect();
    livemig_wire::write_message(
        &mut stream,
        &Message::Hello {
            version: PROTOCOL_VERSION,
            min_version: MIN_PROTOCOL_VERSION,
            software: SOFTWARE.into(),
            page_size: 4096,
            regions,
        },
    )?;
    match livemig_wire::read_message(&mut stream)? {
        Message::Welcome { .. } => {}
        Message::Abort { reason } => return Err(AgentError::PeerAborted { peer: "destination", reason }),
        other => return Err(AgentError::Protocol { expected: "welcome".into(), got: other.name().into() }),
    }
    let reader = stream
        .try_clone()
        .map_err(|source| AgentError::Network { what: "cannot share the connection".into(), source })?;
    // The reader thread waits as long as the migration lasts (the receiver is silent during
    // pre-copy); every wait for an answer is bounded by `Inbox::next`'s own timeout instead.
    // SO_RCVTIMEO is per socket, the writer's SO_SNDTIMEO stays.
    reader
        .set_read_timeout(None)
        .map_err(|source| AgentError::Network { what: "cannot configure the socket".into(), source })?;
    let inbox = Inbox::spawn(Box::new(reader), "destination");
    let mut writer = Writer::spawn(Box::new(stream), opts.bandwidth);
    let mut r = precopy_and_switchover(opts, obs, report, st, &mem, total, &inbox, &mut writer);
    report.wire_bytes = writer.total_bytes();
    if let Err(AgentError::Wire(_)) = &r {
        // A broken connection is often the receiver giving up: prefer the reason it sent.
        if let Err(e @ AgentError::PeerAborted { .. }) = inbox.next(Duration::from_secs(1), "the receiver's reason") {
            r = Err(e);
        }
    }
    if let Err(e) = &r {
        // Tell the destination why, unless the connection is what failed.
        if !matches!(e, AgentError::Wire(_)) {
            let _ = writer.send(Out::Message(Message::Abort { reason: e.chain() }));
            let _ = writer.marker(Duration::from_secs(2));
        }
    }
    let _ = writer.finish();
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
    writer: &mut Writer,
) -> Result<(), AgentError> {
    let src = MemSource(mem);
    let mut ledger = Ledger::zeroed(total);
    let mut tracker = ContentTracker::new(opts.threads);
    let mut controller = opts.policy.controller(opts.limits, opts.on_no_converge);
    let mut history: Vec<IterationStats> = Vec::new();
    let mut index: u32 = 0;
    // Started only for a running guest; stopped (the guest running again) before the switchover
    // and on every early return (drop).
    let mut throttler = st.was_running.then(|| Throttler::start(Arc::clone(st.qmp.as_ref().expect("QMP connected"))));
    let predicted = loop {
        check_cancel(opts)?;
        inbox.check()?;
        if let Some(t) = throttler.as_mut() {
            t.check()?;
        }
        let throttle_level = throttler.as_ref().map_or(0.0, Throttler::level);
        let scan = tracker.scan(&src, &ledger)?;
        let scan_ms = ms(scan.duration);
        let pending = Pending { index, dirty_pages: scan.dirty.len() as u64, scan_ms };
        let decision = controller.decide(&history, &pending);
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
            Decision::Throttle { fraction, .. } => match throttler.as_ref() {
                Some(t) => t.set(*fraction),
                None => return Err(AgentError::NotConverged(format!("{}; the VM is paused, so it cannot be throttled", decision.reason()))),
            },
            Decision::Continue { .. } => {}
        }
        let throttle_level = throttler.as_ref().map_or(0.0, Throttler::level);
        let t0 = Instant::now();
        let sent = send_pages(opts, obs, report, mem, &scan.dirty, &mut ledger, writer, index)?;
        writer.send(Out::Message(Message::IterationEnd { index, pages: sent, last: false }))?;
        let ack = writer.marker(opts.timeout)?;
        let stats = iteration_stats(index, &pending, sent, ack, scan_ms + ms(t0.elapsed()), throttle_level);
        let record = IterationRecord::new(stats.clone(), &decision, controller.fit(), false);
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
    }

    // Switchover: from here the source is paused until the destination runs or we resume it.
    check_cancel(opts)?;
    obs.progress(Progress::Phase("switchover: pausing the source VM"));
    let t_stop = Instant::now();
    if st.was_running {
        st.stopped = true;
        st.qmp().stop().map_err(AgentError::qmp("cannot pause the source VM"))?;
    }
    let scan = tracker.scan(&src, &ledger)?;
    let scan_ms = ms(scan.duration);
    let pending = Pending { index, dirty_pages: scan.dirty.len() as u64, scan_ms };
    let sent = send_pages(opts, obs, report, mem, &scan.dirty, &mut ledger, writer, index)?;
    writer.send(Out::Message(Message::IterationEnd { index, pages: sent, last: true }))?;
    let digest = ledger.digest();
    writer.send(Out::Message(Message::Switchover { digest: digest.to_string(), pages: total }))?;
    let ack = writer.marker(opts.timeout)?;
    let stats = iteration_stats(index, &pending, sent, ack, ms(t_stop.elapsed()), final_throttle);
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
    let deadline = Instant::now() + opts.timeout;
    let mut conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(AgentError::Timeout { what: "the source QEMU to connect its device-state stream".into(), secs: opts.timeout.as_secs_f64() });
                }
                let info = st.qmp().query_migrate().map_err(AgentError::qmp("cannot query the source's migration"))?;
                if info.status.as_deref() == Some("failed") {
                    return Err(AgentError::DeviceState(info.error_desc.unwrap_or_else(|| "failed".into())));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(source) => return Err(AgentError::Network { what: "cannot accept QEMU's device-state stream".into(), source }),
        }
    };
    let io = |source| AgentError::Network { what: "cannot read QEMU's device-state stream".into(), source };
    conn.set_nonblocking(false).map_err(io)?;
    conn.set_read_timeout(Some(opts.timeout)).map_err(io)?;
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = conn.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        writer.send(Out::Frame(FrameKind::DeviceState, buf[..n].to_vec()))?;
    }
    let info = st.qmp().wait_migration(opts.timeout).map_err(AgentError::qmp("cannot follow the source's migration"))?;
    if info.status.as_deref() != Some("completed") {
        return Err(AgentError::DeviceState(
            info.error_desc.unwrap_or_else(|| format!("status {}", info.status.unwrap_or_default())),
        ));
    }
    report.device_state_bytes = bytes;
    writer.send(Out::Message(Message::DeviceStateEnd { bytes }))?;
    writer.marker(opts.timeout)?;
    match inbox.next(opts.timeout, "the destination to load the device state")? {
        Message::Loaded => {}
        other => return Err(AgentError::Protocol { expected: "loaded".into(), got: other.name().into() }),
    }
    check_cancel(opts)?;

    obs.progress(Progress::Phase("switchover: resuming the destination"));
    st.committed = true;
    if let Err(e) = writer.send(Out::Message(Message::Commit)).and_then(|()| writer.marker(opts.timeout).map(drop)) {
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

fn iteration_stats(
    index: u32,
    pending: &Pending,
    sent: u64,
    ack: link::MarkerAck,
    duration_ms: f64,
    throttle: f64,
) -> IterationStats {
    // A burst too small to fill the socket buffers says nothing about the link.
    let rate = if ack.bytes >= 256 * 1024 && ack.active > Duration::from_millis(1) {
        ack.bytes as f64 / ack.active.as_secs_f64()
    } else {
        0.0
    };
    IterationStats {
        index,
        dirty_pages: pending.dirty_pages,
        sent_pages: sent,
        wire_bytes: ack.bytes,
        duration_ms,
        scan_ms: pending.scan_ms,
        rate_bytes_per_s: rate,
        throttle,
    }
}

#[allow(clippy::too_many_arguments)]
fn send_pages(
    opts: &SendOptions,
    obs: &mut dyn Observer,
    report: &mut Report,
    mem: &GuestMemory,
    dirty: &[u64],
    ledger: &mut Ledger,
    writer: &mut Writer,
    iteration: u32,
) -> Result<u64, AgentError> {
    let mut enc = BatchEncoder::new(EncodeOptions { compress: opts.compress });
    let mut buf = Box::new(PageBuf::zeroed());
    let mut sent = 0u64;
    for &page in dirty {
        mem.read_page(page, &mut buf)?;
        // The hash recorded is of exactly the bytes sent: a write racing with the copy shows up
        // as a changed page in the next scan.
        let hash = hash_page(&buf.0);
        let (class, bytes) = enc.push(page, &buf.0);
        ledger.record(page, hash);
        report.count_page(class.name(), bytes);
        sent += 1;
        if enc.is_full() {
            writer.send(Out::Frame(FrameKind::Pages, enc.take()))?;
            obs.progress(Progress::Sending { iteration, sent, dirty: dirty.len() as u64, wire_bytes: writer.total_bytes() });
            check_cancel(opts)?;
        }
    }
    if !enc.is_empty() {
        writer.send(Out::Frame(FrameKind::Pages, enc.take()))?;
    }
    obs.progress(Progress::Sending { iteration, sent, dirty: dirty.len() as u64, wire_bytes: writer.total_bytes() });
    Ok(sent)
}
