//! `livemig tunnel`: the stream engine's relay on its own, between two QEMU unix sockets, for a
//! migration that another owner of QEMU's monitor drives (libvirt >= 6.8 over its UNIX-socket
//! transport: `virsh migrate --migrateuri unix://...`). No QMP on either side.
//!
//! ```text
//! source QEMU --unix SRC.sock--> tunnel send ==livemig's connection (TLS)==> tunnel receive --unix DST.sock--> destination QEMU
//!             <--------------------------------- return path (verbatim) ----------------------------------
//! ```
//!
//! The same pipeline as `send`/`receive --engine stream`: [`super::source::relay_source`] parses
//! QEMU's stream and compacts its page records, the window bounds what is unacknowledged and
//! keeps pages for resends, the stream digest is checked before the device state reaches the
//! destination QEMU, and [`super::receive::rebuild`] rebuilds the exact bytes against the
//! mirrored cache. What a tunnel cannot do without a monitor: set capabilities (the operator or
//! libvirt does), steer the switchover (no controller, no throttle; the switchover-ack passes
//! through as it comes), resume or cancel either VM. On any failure it closes both QEMU
//! sockets: the source QEMU's migration fails and QEMU keeps its VM running; the destination
//! QEMU's incoming migration fails.
//!
//! Disks on shared storage: the destination's images must stay inactive (no write locks) until
//! the VM is resumed there, or an abort cannot give the source its disks back. QEMU 10.0 and
//! later delay activation for a destination started with `-S` by themselves; before 10.0 the
//! owner of the destination's monitor sets `late-block-activate` (libvirt does) before
//! `migrate-incoming`. The tunnel cannot, and cannot quit a destination QEMU that loaded the
//! state but was never resumed: that is its owner's job too.
//!
//! Protocol between the two ends (livemig's wire protocol, version 3): `hello` (engine
//! `tunnel`) -> `welcome`; over several connections (`connections`, version 7) a `plan` and
//! the data connections' `join`s, as `send --engine stream` (see [`super::conns`]); the source
//! QEMU connects -> `stream_setup` (no capabilities) -> the
//! receiver connects to the destination QEMU -> `stream_ready`; then the stream engine's chunks,
//! acks, resends, checkpoint, `stream_end`; the destination QEMU's result (its return path's
//! SHUT) -> `loaded`. A `livemig receive` refuses a tunnel sender, and a tunnel receiver any
//! other sender, with an `abort` that names the command to run instead.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livemig_compact::EncodeOptions;
use livemig_stream::{ReturnPathParser, RpEvent, RpKind};
use livemig_wire::{
    Frame, FrameKind, Message, WireError, ENGINE_SHARED, ENGINE_STREAM, ENGINE_TUNNEL, MIN_PROTOCOL_VERSION,
    STREAM_PROTOCOL_VERSION,
};

use super::chunk::resend_payload;
use super::receive::{connect_incoming, rebuild, Incoming};
use super::send::{hello_and_welcome, spawn_dispatcher, Gate, Inbound};
use super::source::{relay_source, RelayStats, SourceConfig, Window, DEFAULT_WINDOW};
use super::StreamReport;
use crate::error::AgentError;
use crate::receive::refuse;
use crate::holdings;
use super::conns::{Ordered, Spread};
use crate::link::{self, Links, Out, Writer};
use crate::receive::ReceiveOptions;
use crate::report::Report;
use crate::send::SendOptions;
use crate::transport::Transport;
use crate::{Observer, Progress, SOFTWARE};

/// The report's `role` of `livemig tunnel send`.
pub const ROLE_SEND: &str = "tunnel-send";
/// The report's `role` of `livemig tunnel receive`.
pub const ROLE_RECEIVE: &str = "tunnel-receive";

/// How often a tunnel says how far the relay got.
const NOTE_EVERY: Duration = Duration::from_secs(5);

/// What `livemig tunnel send` needs.
#[derive(Debug, Clone)]
pub struct TunnelSendOptions {
    /// The unix socket the source QEMU migrates into (`migrate unix:PATH`): created mode 0600,
    /// removed at the end.
    pub listen_unix: PathBuf,
    /// The tunnel receiver, `host:port`.
    pub to: String,
    /// TLS (default) or plain TCP.
    pub transport: Transport,
    /// Name the receiver's certificate must carry (default: the host part of `to`).
    pub server_name: Option<String>,
    /// Wire rate cap in bytes per second.
    pub bandwidth: Option<u64>,
    /// Longest wait for the peer or QEMU at any step once the migration runs.
    pub timeout: Duration,
    /// How long to retry connecting to a receiver that is not listening yet.
    pub connect_timeout: Duration,
    /// Longest wait for the source QEMU to connect.
    pub accept_timeout: Duration,
    /// Compressor of whole pages.
    pub compressor: crate::autocomp::CompressorMode,
    /// Most threads that encode page records (at least 1, at most
    /// [`crate::pipeline::MAX_THREADS`]; default: every core), as `SendOptions::threads`.
    pub threads: usize,
    /// Raw disk images both hosts hold: pages equal to one of their blocks go as references.
    pub disk_images: Vec<PathBuf>,
    /// Where disk indexes are cached.
    pub index_cache: PathBuf,
    /// Bytes between indexed 4 KiB windows of the disk images (auto: from their filesystems).
    pub disk_align: livemig_index::Align,
    /// Connections QEMU's stream goes over (1 to [`livemig_wire::MAX_CONNECTIONS`]), each its
    /// own TLS session; more than one needs a tunnel receiver of protocol 7 (an older one gets
    /// one, said in the report).
    pub connections: u32,
    /// Set by a signal handler to cancel.
    pub cancel: Arc<AtomicBool>,
}

impl TunnelSendOptions {
    /// Options with defaults for everything but the endpoints.
    pub fn new(listen_unix: PathBuf, to: String) -> Self {
        TunnelSendOptions {
            listen_unix,
            to,
            transport: Transport::Insecure,
            server_name: None,
            bandwidth: None,
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
            accept_timeout: Duration::from_secs(600),
            compressor: crate::autocomp::CompressorMode::Auto,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            disk_images: Vec::new(),
            index_cache: holdings::default_index_cache(),
            disk_align: livemig_index::Align::Auto,
            connections: 1,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The connection part, as `send` takes it.
    fn connection(&self) -> SendOptions {
        let mut o = SendOptions::new(PathBuf::new(), self.to.clone());
        o.transport = self.transport.clone();
        o.server_name = self.server_name.clone();
        o.timeout = self.timeout;
        o.connect_timeout = self.connect_timeout;
        o.cancel = Arc::clone(&self.cancel);
        o
    }
}

/// What `livemig tunnel receive` needs.
#[derive(Debug, Clone)]
pub struct TunnelReceiveOptions {
    /// Address to listen on, `host:port` (port 0 picks one; it is reported).
    pub listen: String,
    /// The destination QEMU's incoming unix socket (`-incoming unix:PATH` or `migrate-incoming`).
    pub connect_unix: PathBuf,
    /// TLS (default) or plain TCP.
    pub transport: Transport,
    /// Longest wait for the peer or QEMU at any step once the migration runs.
    pub timeout: Duration,
    /// Longest wait for the sender to connect, and then for its source QEMU to start.
    pub accept_timeout: Duration,
    /// Raw disk images this host holds that references may name.
    pub disk_images: Vec<PathBuf>,
    /// Where disk indexes are cached.
    pub index_cache: PathBuf,
    /// Bytes between indexed 4 KiB windows of the disk images (auto: from their filesystems).
    pub disk_align: livemig_index::Align,
    /// Set by a signal handler to cancel.
    pub cancel: Arc<AtomicBool>,
}

impl TunnelReceiveOptions {
    /// Options with defaults for everything but the endpoints.
    pub fn new(listen: String, connect_unix: PathBuf) -> Self {
        TunnelReceiveOptions {
            listen,
            connect_unix,
            transport: Transport::Insecure,
            timeout: Duration::from_secs(60),
            accept_timeout: Duration::from_secs(600),
            disk_images: Vec::new(),
            index_cache: holdings::default_index_cache(),
            disk_align: livemig_index::Align::Auto,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The parts the stream engine's rebuild reads (timeout, cancel).
    fn rebuild(&self) -> ReceiveOptions {
        let mut o = ReceiveOptions::new(self.listen.clone(), PathBuf::new());
        o.timeout = self.timeout;
        o.accept_timeout = self.accept_timeout;
        o.cancel = Arc::clone(&self.cancel);
        o
    }
}

// ---- Who talks to whom ----

fn unknown_engine(engine: &str, software: &str) -> String {
    format!(
        "the sender ({software}) uses engine `{engine}`, which this receiver ({SOFTWARE}) does not know (it knows \
         `{ENGINE_SHARED}`, `{ENGINE_STREAM}` and `{ENGINE_TUNNEL}`): use the same livemig on both hosts"
    )
}

/// `livemig receive`'s answer to a `hello`: `None` for the engines it serves (shared, stream),
/// else why it refuses the sender (a tunnel sender, an unknown engine).
pub(crate) fn receive_refuses(hello: &Message) -> Option<String> {
    let Message::Hello { engine, software, .. } = hello else { return None };
    match engine.as_str() {
        ENGINE_SHARED | ENGINE_STREAM => None,
        ENGINE_TUNNEL => Some(format!(
            "the sender ({software}) is `livemig tunnel send`, which relays a migration another owner of QEMU's \
             monitor (libvirt) drives between two unix sockets; this is `livemig receive`, which drives its \
             destination QEMU over QMP: run `livemig tunnel receive --connect-unix DST.sock` here for a tunnel"
        )),
        other => Some(unknown_engine(other, software)),
    }
}

/// `livemig tunnel receive`'s answer to a `hello`: `None` for a tunnel sender, else why it
/// refuses.
pub(crate) fn tunnel_refuses(hello: &Message) -> Option<String> {
    let Message::Hello { engine, software, .. } = hello else {
        return Some(format!("expected the sender's hello, received `{}`", hello.name()));
    };
    match engine.as_str() {
        ENGINE_TUNNEL => None,
        ENGINE_SHARED | ENGINE_STREAM => Some(format!(
            "the sender ({software}) is `livemig send` (engine `{engine}`), which drives its source QEMU over QMP; \
             this is `livemig tunnel receive`, which only feeds a QEMU unix socket and steers nothing: run \
             `livemig receive --qmp DST.qmp` here for `livemig send`"
        )),
        other => Some(unknown_engine(other, software)),
    }
}

// ---- The source QEMU's socket ----

/// The unix socket the source QEMU migrates into. It is never reachable by others: bound in a
/// private (0700) directory next to its path, made 0600 and renamed into place. Removed on drop
/// (unless something else has taken its path since).
#[derive(Debug)]
struct SourceSocket {
    listener: UnixListener,
    path: PathBuf,
    inode: (u64, u64),
}

impl SourceSocket {
    fn bind(path: &Path) -> Result<SourceSocket, AgentError> {
        let net = |what: String| move |source| AgentError::Network { what, source };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(AgentError::Incompatible(format!(
                        "{} is in use: another process listens on it (another tunnel?)",
                        path.display()
                    )));
                }
                // A stale socket of an earlier run (nobody listens): replaced below.
            }
            Ok(_) => {
                return Err(AgentError::Incompatible(format!(
                    "{} exists and is not a socket: give --listen-unix a path of its own",
                    path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(net(format!("cannot look at {}", path.display()))(e)),
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let dir = tempfile::Builder::new()
            .prefix(".livemig-tunnel-")
            .tempdir_in(parent)
            .map_err(net(format!("cannot create a private directory in {}", parent.display())))?;
        let tmp = dir.path().join("s");
        let listener = UnixListener::bind(&tmp).map_err(net(format!("cannot listen on a unix socket in {}", parent.display())))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(net(format!("cannot make {} private", tmp.display())))?;
        std::fs::rename(&tmp, path).map_err(net(format!("cannot put the socket at {}", path.display())))?;
        let m = std::fs::symlink_metadata(path).map_err(net(format!("cannot look at {}", path.display())))?;
        listener.set_nonblocking(true).map_err(net("cannot configure the unix socket".into()))?;
        Ok(SourceSocket { listener, path: path.to_path_buf(), inode: (m.dev(), m.ino()) })
    }

    /// Waits for the source QEMU to connect (up to `timeout`, or until cancelled).
    fn accept(&self, timeout: Duration, cancel: &AtomicBool) -> Result<UnixStream, AgentError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.listener.accept() {
                Ok((c, _)) => {
                    c.set_nonblocking(false)
                        .map_err(|source| AgentError::Network { what: "cannot configure QEMU's migration socket".into(), source })?;
                    return Ok(c);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(AgentError::Cancelled);
                    }
                    if Instant::now() > deadline {
                        return Err(AgentError::Timeout {
                            what: format!("the source QEMU to migrate to unix:{}", self.path.display()),
                            secs: timeout.as_secs_f64(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => return Err(AgentError::Network { what: format!("cannot accept on {}", self.path.display()), source }),
            }
        }
    }

    /// A second connection (QEMU's multifd or postcopy-preempt channels), refused: the tunnel
    /// carries one channel.
    fn second_connection(&self) -> Result<(), AgentError> {
        match self.listener.accept() {
            Ok((c, _)) => {
                drop(c);
                Err(AgentError::Incompatible(format!(
                    "the source QEMU opened a second connection to {}: multifd or postcopy-preempt is on, and the \
                     tunnel carries one migration channel (turn them off)",
                    self.path.display()
                )))
            }
            Err(_) => Ok(()),
        }
    }
}

impl Drop for SourceSocket {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

// ---- tunnel send ----

/// Relays one migration from the source QEMU (which connects to `opts.listen_unix`) to a
/// `livemig tunnel receive`. Returns the report in every case; on failure the source QEMU's
/// socket is closed (its migration fails; QEMU keeps its VM running).
pub fn tunnel_send(opts: &TunnelSendOptions, obs: &mut dyn Observer) -> (Report, Result<(), AgentError>) {
    let start = Instant::now();
    let mut report = Report {
        role: ROLE_SEND.into(),
        engine: ENGINE_TUNNEL.into(),
        tracker: "qemu".into(),
        transport: opts.transport.name().into(),
        bandwidth_bytes_per_s: opts.bandwidth,
        ..Report::default()
    };
    let result = send_run(opts, obs, &mut report);
    report.outcome = outcome(&result).into();
    if let Err(e) = &result {
        report.error = Some(e.chain());
    }
    report.compute_compaction_ratio();
    report.total_time_ms = start.elapsed().as_secs_f64() * 1000.0;
    (report, result)
}

fn outcome(r: &Result<(), AgentError>) -> &'static str {
    match r {
        Ok(()) => "completed",
        Err(AgentError::Cancelled) => "cancelled",
        Err(_) => "failed",
    }
}

fn send_run(opts: &TunnelSendOptions, obs: &mut dyn Observer, report: &mut Report) -> Result<(), AgentError> {
    let sock = SourceSocket::bind(&opts.listen_unix)?;
    obs.progress(Progress::Phase(&format!("listening on unix:{} (mode 0600) for the source QEMU", sock.path.display())));
    if !opts.disk_images.is_empty() {
        obs.progress(Progress::Phase("indexing the disk images"));
    }
    let indexes = holdings::load_indexes(&opts.disk_images, &opts.index_cache, opts.disk_align, obs, report)?;
    let (stream, mut reader, mut writer_half, tls_key) = crate::send::connect_receiver(&opts.connection(), obs, report)?;
    let super::send::Welcomed { disks, key, version, join, .. } = hello_and_welcome(
        &mut reader,
        &mut writer_half,
        (indexes, None),
        STREAM_PROTOCOL_VERSION.max(MIN_PROTOCOL_VERSION),
        ENGINE_TUNNEL,
        "a tunnel",
        report,
        obs,
        tls_key,
    )?;
    let needs = (version, livemig_wire::STREAM_CONNECTIONS_PROTOCOL_VERSION, " for a tunnel");
    let connections = crate::send::connections_from(opts.connections, needs, join.as_deref(), obs, report)?;
    if connections > 1 {
        // Only then: a receiver of protocol 7 expects a plan before the stream's setup, an
        // older one none.
        livemig_wire::write_message(&mut writer_half, &Message::Plan { snapshot: None, connections })?;
    }
    let each = opts.bandwidth.map(|b| (b / u64::from(connections)).max(1));
    let mut links = Links::new(Writer::spawn(writer_half, each));
    let data_readers = super::send::open_stream_connections(&opts.connection(), join.as_deref(), connections, each, &mut links, obs)?;
    obs.progress(Progress::Phase(&format!(
        "the tunnel receiver accepted: waiting for the source QEMU to migrate to unix:{}",
        sock.path.display()
    )));
    let qemu = sock.accept(opts.accept_timeout, &opts.cancel)?;
    report.stream = Some(StreamReport::default());
    obs.progress(Progress::Phase("the source QEMU connected: the destination QEMU is next"));
    let net = |source| AgentError::Network { what: "cannot configure QEMU's migration socket".into(), source };
    let qemu_w = qemu.try_clone().map_err(net)?;
    let closer = qemu.try_clone().map_err(net)?;
    let r = relay(opts, obs, report, &sock, qemu, qemu_w, &stream, reader, links, disks, key);
    drop(data_readers);
    if r.is_err() {
        // The source QEMU sees its migration fail; QEMU keeps (or puts) its VM running.
        let _ = closer.shutdown(std::net::Shutdown::Both);
    }
    r
}

/// The relay proper, once the source QEMU connected: the receiver connects the destination
/// QEMU, then QEMU's stream goes through the stream engine's relay until the destination QEMU
/// reported its result.
#[allow(clippy::too_many_arguments)]
fn relay(
    opts: &TunnelSendOptions,
    obs: &mut dyn Observer,
    report: &mut Report,
    sock: &SourceSocket,
    qemu: UnixStream,
    qemu_w: UnixStream,
    stream: &TcpStream,
    mut reader: Box<dyn Read + Send>,
    mut links: Links,
    disks: Option<Arc<dyn livemig_compact::DiskLookup>>,
    key: livemig_compact::PageKey,
) -> Result<(), AgentError> {
    links.send(Out::Message(Message::StreamSetup { capabilities: Vec::new() }))?;
    match livemig_wire::read_message(&mut reader)? {
        Message::StreamReady => {}
        Message::Abort { reason } => return Err(AgentError::PeerAborted { peer: "destination", reason }),
        other => return Err(AgentError::Protocol { expected: "stream-ready".into(), got: other.name().into() }),
    }
    stream.set_read_timeout(None).map_err(|source| AgentError::Network { what: "cannot configure the socket".into(), source })?;
    obs.progress(Progress::Phase("the destination QEMU is connected: relaying the migration"));
    let frames = link::read_frames(reader, 64);
    let window = Arc::new(Window::new(DEFAULT_WINDOW));
    // Open: the tunnel steers nothing, the switchover-ack goes to QEMU as it comes.
    let gate = Arc::new(Gate::new(qemu_w, true));
    let (in_tx, inbound) = crossbeam_channel::bounded::<Inbound>(256);
    let dispatcher = spawn_dispatcher(frames, Arc::clone(&window), gate, in_tx)
        .map_err(|source| AgentError::Network { what: "cannot start the dispatch thread".into(), source })?;
    let stats = Arc::new(Mutex::new(RelayStats::default()));
    report.threads = Some(opts.threads.clamp(1, crate::pipeline::MAX_THREADS));
    let cfg = SourceConfig {
        encode: EncodeOptions { compressor: opts.compressor.initial(), ..EncodeOptions::default() },
        compressor: opts.compressor,
        disks,
        key,
        snapshot: None,
        keep: None,
        threads: opts.threads,
    };
    let closer = qemu.try_clone().map_err(|source| AgentError::Network { what: "cannot configure QEMU's migration socket".into(), source })?;
    let (done_tx, done) = crossbeam_channel::bounded(1);
    let relay = {
        let (out, window, stats) = (Spread::new(links.senders()), Arc::clone(&window), Arc::clone(&stats));
        std::thread::Builder::new()
            .name("livemig-relay".into())
            .spawn(move || {
                let _ = done_tx.send(relay_source(qemu, out, window, stats, cfg));
            })
            .map_err(|source| AgentError::Network { what: "cannot start the relay thread".into(), source })?
    };
    let r = watch(opts, obs, report, sock, &inbound, &mut links, &window, &stats, &done);
    let s = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
    report.set_class_stats(&s.classes);
    report.compressor = s.compressor.clone();
    report.ram_bytes = s.ram_bytes;
    report.device_state_bytes = s.checkpoint_bytes.filter(|_| s.ram_done).map_or(0, |c| s.raw_bytes.saturating_sub(c));
    report.stream = Some(StreamReport {
        raw_bytes: s.raw_bytes,
        pages: s.pages,
        zero_records: s.zero_records,
        verbatim_pages: s.verbatim_pages,
        ram_sections: s.ram_sections,
        fallback: s.fallback.clone(),
        cache_pages: s.cache_pages,
        switchover_ack_held: false,
        qemu_downtime_ms: None,
        switchover: None,
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
        // A broken connection is often the receiver giving up: prefer the reason it sent.
        Err(AgentError::Wire(_)) => match inbound.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(Message::Abort { reason })) => Err(AgentError::PeerAborted { peer: "destination", reason }),
            _ => r,
        },
        r => r,
    };
    if let Err(e) = &r {
        if !matches!(e, AgentError::Wire(_) | AgentError::PeerAborted { .. }) {
            let _ = links.send(Out::Message(Message::Abort { reason: e.chain() }));
            let _ = links.control().marker(Duration::from_secs(2));
        }
    }
    drop(inbound);
    if r.is_err() {
        // Nothing more to say: a receiver that stopped reading must not hold the writer.
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    let _ = links.finish();
    // The receiver is done (or gone): end the reader under the dispatcher.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = relay.join();
    let _ = dispatcher.join();
    r
}

/// Follows the relay: answers resends, notes the receiver's verification, says how far it got,
/// and ends when QEMU's stream ended and the destination QEMU reported that it loaded it.
#[allow(clippy::too_many_arguments)]
fn watch(
    opts: &TunnelSendOptions,
    obs: &mut dyn Observer,
    report: &mut Report,
    sock: &SourceSocket,
    inbound: &crossbeam_channel::Receiver<Inbound>,
    links: &mut Links,
    window: &Window,
    stats: &Mutex<RelayStats>,
    done: &crossbeam_channel::Receiver<Result<u64, AgentError>>,
) -> Result<(), AgentError> {
    fn ended_at(bytes: u64, obs: &mut dyn Observer) -> Option<Instant> {
        obs.progress(Progress::Phase(&format!(
            "the source QEMU's stream ended ({} MiB): waiting for the destination QEMU's result",
            bytes >> 20
        )));
        Some(Instant::now())
    }
    let stats_of = || stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut compressor_shown = 0;
    let mut verified = false;
    let mut loaded = false;
    let mut ended: Option<Instant> = None;
    let mut said_completion = false;
    let mut last_note = Instant::now();
    let (mut last_raw, mut last_raw_at) = (0u64, Instant::now());
    loop {
        if opts.cancel.load(Ordering::Relaxed) {
            return Err(AgentError::Cancelled);
        }
        if loaded && ended.is_none() {
            // The receiver sends `loaded` after the whole stream, so the relay is ending; the
            // receiver is done and may close the connection now: only the relay is awaited.
            match done.recv_timeout(opts.timeout) {
                Ok(Ok(bytes)) => ended = ended_at(bytes, obs),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(AgentError::Timeout { what: "the end of the source QEMU's stream".into(), secs: opts.timeout.as_secs_f64() }),
            }
        }
        if ended.is_some() && loaded {
            break;
        }
        match inbound.recv_timeout(Duration::from_millis(20)) {
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
                    obs.progress(Progress::Phase(&format!(
                        "the destination verified the stream's digest ({} MiB): QEMU's device state follows",
                        bytes >> 20
                    )));
                }
                Message::Loaded => loaded = true,
                Message::Abort { reason } => return Err(AgentError::PeerAborted { peer: "destination", reason }),
                other => return Err(AgentError::Protocol { expected: "stream acknowledgements".into(), got: other.name().into() }),
            },
            Ok(Err(e)) => return Err(e),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Err(AgentError::Wire(WireError::Closed)),
        }
        // A connection lost (the relay writes on its own thread): the migration fails.
        if let Some(e) = links.failed() {
            return Err(e);
        }
        window.check_progress(opts.timeout)?;
        if ended.is_none() {
            match done.try_recv() {
                Ok(Ok(bytes)) => ended = ended_at(bytes, obs),
                Ok(Err(e)) => return Err(e),
                Err(_) => {}
            }
        }
        if ended.is_some_and(|t| t.elapsed() > opts.timeout) {
            return Err(AgentError::Timeout { what: "the destination QEMU's result".into(), secs: opts.timeout.as_secs_f64() });
        }
        sock.second_connection()?;
        let s = stats_of();
        crate::autocomp::announce(s.compressor.as_ref(), &mut compressor_shown, obs);
        if !said_completion && s.completion_started.is_some() {
            said_completion = true;
            obs.progress(Progress::Phase("the source QEMU began its completion (its guest is stopped): its last pages and the device state follow"));
        }
        if s.raw_bytes != last_raw {
            (last_raw, last_raw_at) = (s.raw_bytes, Instant::now());
        } else if ended.is_none() && s.completion_started.is_some() && last_raw_at.elapsed() > opts.timeout {
            // In its completion QEMU writes without pause (its guest is stopped).
            return Err(AgentError::Timeout { what: "the source QEMU's completion to go on".into(), secs: opts.timeout.as_secs_f64() });
        }
        if last_note.elapsed() >= NOTE_EVERY {
            last_note = Instant::now();
            let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
            obs.progress(Progress::Phase(&format!(
                "relayed {:.1} MiB of QEMU's stream as {:.1} MiB on the wire: {} pages compacted, {} zero records, {} `ram` sections",
                mib(s.raw_bytes),
                mib(links.total_bytes()),
                s.pages,
                s.zero_records,
                s.ram_sections
            )));
        }
    }
    if !verified && stats_of().fallback.is_none() {
        return Err(AgentError::Protocol { expected: "the destination's verification of the stream digest".into(), got: "none before the end".into() });
    }
    obs.progress(Progress::Phase("completed: the destination QEMU loaded the whole stream (its owner resumes it)"));
    Ok(())
}

// ---- tunnel receive ----

/// What the destination QEMU said on its return path, and whether it closed its socket.
#[derive(Debug, Default)]
struct RpState {
    bytes: u64,
    shut: Option<u32>,
    closed: bool,
}

/// Copies the destination QEMU's return path onto the connection verbatim, and notes its SHUT
/// (after the frame that carries it was queued) and its end.
fn spawn_return_path(mut qemu: UnixStream, out: crossbeam_channel::Sender<Out>, state: Arc<Mutex<RpState>>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("livemig-return-path".into()).spawn(move || {
        let mut parser = ReturnPathParser::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match qemu.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut shut = None;
            parser.feed(&buf[..n], &mut |e| {
                if let RpEvent::Message(m) = e {
                    if m.kind() == RpKind::Shut {
                        shut = m.value();
                    }
                }
            });
            let sent = out.send(Out::Frame(FrameKind::ReturnPath, buf[..n].to_vec())).is_ok();
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            s.bytes += n as u64;
            if shut.is_some() {
                s.shut = shut;
            }
            if !sent {
                break;
            }
        }
        state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
    })
}

/// The destination as the tunnel knows it: what its return path said.
struct ReturnPathResult {
    state: Arc<Mutex<RpState>>,
    /// Loaded without a return path: the tunnel cannot know whether QEMU's load succeeded.
    unconfirmed: bool,
}

impl Incoming for ReturnPathResult {
    fn poll_loaded(&mut self) -> Result<bool, AgentError> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.shut {
            Some(0) => Ok(true),
            Some(e) => Err(shut_failed(e)),
            None if !s.closed => Ok(false),
            None if s.bytes == 0 => {
                self.unconfirmed = true;
                Ok(true)
            }
            None => Err(AgentError::Incompatible(
                "the destination QEMU closed its migration socket without a result (no SHUT on its return path): its \
                 load failed or it died"
                    .into(),
            )),
        }
    }

    fn awaits_commit(&self) -> bool {
        false
    }

    fn resume(&mut self) -> Result<Option<String>, AgentError> {
        Err(AgentError::Protocol { expected: "no commit (a tunnel leaves the destination VM to its owner)".into(), got: "commit".into() })
    }
}

fn shut_failed(status: u32) -> AgentError {
    AgentError::Incompatible(format!(
        "the destination QEMU failed to load the migration: it answered SHUT {status} on its return path (its log says why)"
    ))
}

/// What the receiver learnt of QEMU's stream from the sender's control messages.
#[derive(Debug, Default, Clone)]
struct Seen {
    raw_bytes: Option<u64>,
    fallback: Option<String>,
    cache_pages: u64,
}

/// Reads frames on a thread, as [`link::read_frames`], noting what the sender says of the
/// stream (its length, a fallback, the cache) on the way.
fn read_frames_noting(mut reader: impl Read + Send + 'static, seen: Arc<Mutex<Seen>>) -> crossbeam_channel::Receiver<Result<Frame, WireError>> {
    let (tx, rx) = crossbeam_channel::bounded(64);
    std::thread::Builder::new()
        .name("livemig-reader".into())
        .spawn(move || loop {
            let r = livemig_wire::read_frame(&mut reader);
            if let Ok(f) = &r {
                if f.kind == FrameKind::Control {
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    match f.message() {
                        Ok(Message::StreamEnd { bytes }) => s.raw_bytes = Some(bytes),
                        Ok(Message::StreamCheckpoint { at, .. }) if at != "ram-done" => {
                            s.fallback = Some(at.strip_prefix("fallback: ").unwrap_or(&at).to_string());
                        }
                        Ok(Message::StreamBlocks { cache_pages, .. }) => s.cache_pages = cache_pages,
                        _ => {}
                    }
                }
            }
            let stop = r.is_err();
            if tx.send(r).is_err() || stop {
                break;
            }
        })
        .expect("spawn reader thread");
    rx
}

/// Accepts one `livemig tunnel send`, connects to the destination QEMU's incoming socket
/// (`opts.connect_unix`) once the source QEMU migrates, and writes the rebuilt stream into it.
/// Returns the report in every case; on failure the destination QEMU's socket is closed (its
/// incoming migration fails) and the sender is told why.
pub fn tunnel_receive(opts: &TunnelReceiveOptions, obs: &mut dyn Observer) -> (Report, Result<(), AgentError>) {
    let start = Instant::now();
    let mut report = Report {
        role: ROLE_RECEIVE.into(),
        engine: ENGINE_TUNNEL.into(),
        tracker: "qemu".into(),
        transport: opts.transport.name().into(),
        ..Report::default()
    };
    let mut conn: Option<Box<dyn Write + Send>> = None;
    let result = receive_run(opts, obs, &mut report, &mut conn);
    report.outcome = outcome(&result).into();
    if let Err(e) = &result {
        report.error = Some(e.chain());
        if let Some(c) = conn.as_mut() {
            let connection_lost = matches!(e, AgentError::Wire(WireError::Closed | WireError::Io { .. } | WireError::TimedOut { .. }));
            if !matches!(e, AgentError::PeerAborted { .. } | AgentError::Incompatible(_)) && !connection_lost {
                let _ = livemig_wire::write_message(c, &Message::Abort { reason: format!("destination: {}", e.chain()) });
            }
        }
    }
    report.compute_compaction_ratio();
    report.total_time_ms = start.elapsed().as_secs_f64() * 1000.0;
    (report, result)
}

fn receive_run(
    opts: &TunnelReceiveOptions,
    obs: &mut dyn Observer,
    report: &mut Report,
    conn_slot: &mut Option<Box<dyn Write + Send>>,
) -> Result<(), AgentError> {
    let listener = TcpListener::bind(&opts.listen).map_err(|source| AgentError::Network { what: format!("cannot listen on {}", opts.listen), source })?;
    let local = listener.local_addr().map_err(|source| AgentError::Network { what: "cannot read the listening address".into(), source })?;
    obs.progress(Progress::Listening(local));
    if !opts.disk_images.is_empty() {
        obs.progress(Progress::Phase("indexing the disk images"));
    }
    let indexes = holdings::load_indexes(&opts.disk_images, &opts.index_cache, opts.disk_align, obs, report)?;
    let ropts = opts.rebuild();
    obs.progress(Progress::Phase("waiting for the tunnel's sender"));
    let wait = crate::arrival::Wait::new(&opts.transport, (opts.timeout, opts.accept_timeout), &ropts.cancel, "the tunnel's sender");
    let crate::arrival::Arrived { stream, mut reader, writer, hello, key, welcome_key } =
        crate::arrival::receive_sender(&listener, &wait, obs, report)?;
    let writer = conn_slot.insert(writer);
    let count = Arc::clone(&reader.count);
    if let Some(reason) = tunnel_refuses(&hello) {
        return Err(refuse(writer, reason));
    }
    let who = super::receive::Parties { sender: "the tunnel's sender", with: "", me: "this receiver" };
    let (rdisks, join) = super::receive::welcome_sender(writer, hello, (&opts.disk_images, &indexes), (welcome_key, Vec::new()), report, &who)?;
    obs.progress(Progress::Phase("the tunnel's sender is connected: waiting for its source QEMU to migrate"));
    let net = |source| AgentError::Network { what: "cannot configure the socket".into(), source };
    stream.set_read_timeout(Some(opts.accept_timeout)).map_err(net)?;
    // Over several connections (protocol 7) a plan comes first, and its data connections.
    let mut connections = 1;
    let mut joined = Vec::new();
    loop {
        match livemig_wire::read_message(&mut reader)? {
            Message::StreamSetup { .. } => break,
            Message::Plan { connections: n, .. } if connections == 1 && joined.is_empty() => {
                let Some(token) = join.as_deref().filter(|_| (2..=livemig_wire::MAX_CONNECTIONS).contains(&n)) else {
                    return Err(refuse(
                        writer,
                        format!("the tunnel's sender plans {n} connections; this receiver takes 2 to {} in a plan (protocol 7)", livemig_wire::MAX_CONNECTIONS),
                    ));
                };
                obs.progress(Progress::Phase(&format!("waiting for the tunnel sender's {} data connections", n - 1)));
                joined = crate::arrival::accept_joins_watching(&listener, &wait, (token, n), (&mut reader, &stream), obs, report).inspect_err(|e| {
                    let _ = livemig_wire::write_message(writer, &Message::Abort { reason: format!("destination: {}", e.chain()) });
                })?;
                connections = n;
            }
            Message::Abort { reason } => return Err(AgentError::PeerAborted { peer: "source", reason }),
            other => return Err(AgentError::Protocol { expected: "stream-setup".into(), got: other.name().into() }),
        }
    }
    // Every later connection is refused by the kernel.
    drop(listener);
    report.connections = Some(connections);
    stream.set_read_timeout(Some(opts.timeout)).map_err(net)?;
    obs.progress(Progress::Phase(&format!(
        "the source QEMU migrates: connecting to the destination QEMU at unix:{}",
        opts.connect_unix.display()
    )));
    let qemu_sock = connect_incoming(&opts.connect_unix, opts.timeout)?;
    report.stream = Some(StreamReport::default());
    let sock = |source| AgentError::Network { what: "cannot use the destination QEMU's socket".into(), source };
    let rp_read = qemu_sock.try_clone().map_err(sock)?;
    let closer = qemu_sock.try_clone().map_err(sock)?;
    livemig_wire::write_message(writer, &Message::StreamReady)?;
    stream.set_read_timeout(None).map_err(net)?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let counts = crate::arrival::WireCounts::new(&count, &joined);
    let frames = Ordered::start_joined(read_frames_noting(reader, Arc::clone(&seen)), joined, connections, opts.timeout)?;
    let mut writer = Writer::spawn(conn_slot.take().expect("connected"), None);
    let rp_state = Arc::new(Mutex::new(RpState::default()));
    let rp = spawn_return_path(rp_read, writer.sender(), Arc::clone(&rp_state))
        .map_err(|source| AgentError::Network { what: "cannot start the return-path thread".into(), source })?;
    obs.progress(Progress::Phase("rebuilding QEMU's stream into the destination QEMU"));
    let mut dest = ReturnPathResult { state: Arc::clone(&rp_state), unconfirmed: false };
    let held = super::receive::Held { disks: &rdisks, snapshot: None, keep: None };
    let r = rebuild(&ropts, obs, report, &mut dest, qemu_sock, frames.frames(), &mut writer, held, &key);
    // Success: QEMU closed it already. Failure: QEMU sees its incoming migration fail.
    let _ = closer.shutdown(std::net::Shutdown::Both);
    let _ = rp.join();
    // A failed write into QEMU often follows QEMU's own failure: prefer what it said.
    let r = match (r, rp_state.lock().unwrap_or_else(|e| e.into_inner()).shut) {
        (Err(AgentError::Network { .. }), Some(status)) if status != 0 => Err(shut_failed(status)),
        (r, _) => r,
    };
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    report.stream = Some(StreamReport {
        raw_bytes: seen.raw_bytes.unwrap_or(0),
        pages: report.pages.values().sum(),
        fallback: seen.fallback.clone(),
        cache_pages: seen.cache_pages,
        ..StreamReport::default()
    });
    if let Some(f) = &seen.fallback {
        report.warnings.push(format!("the sender's parser fell back to passing QEMU's stream verbatim (not compacted) from there on: {f}"));
    }
    report.wire_bytes = counts.total();
    report.destination_state = Some(match (&r, dest.unconfirmed) {
        (Ok(()), false) => "loaded (SHUT 0 on its return path): its owner resumes it".into(),
        (Ok(()), true) => "read the whole stream and closed it; without a return path its load result is unknown".into(),
        (Err(_), _) => "its incoming migration failed: the tunnel closed its socket".into(),
    });
    if r.is_ok() && dest.unconfirmed {
        let w = "the destination QEMU sent no return path (capability return-path off): the tunnel cannot confirm that it loaded the stream; turn return-path on for a confirmed result".to_string();
        obs.progress(Progress::Phase(&w));
        report.warnings.push(w);
    }
    if let Err(e) = &r {
        let connection_lost = matches!(e, AgentError::Wire(WireError::Closed | WireError::Io { .. } | WireError::TimedOut { .. }));
        if !matches!(e, AgentError::PeerAborted { .. }) && !connection_lost {
            let _ = writer.send(Out::Message(Message::Abort { reason: format!("destination: {}", e.chain()) }));
            let _ = writer.marker(Duration::from_secs(2));
        }
    }
    drop(frames);
    if r.is_err() {
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    let _ = writer.finish();
    let _ = stream.shutdown(std::net::Shutdown::Both);
    if r.is_ok() {
        obs.progress(Progress::Phase("completed: the destination QEMU loaded the whole stream (its owner resumes it)"));
    }
    r
}

#[cfg(test)]
pub(crate) mod tests;
