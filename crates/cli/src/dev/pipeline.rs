//! The pipeline benchmark: a synthetic guest memory ([`crate::synth`]) in a file on /dev/shm
//! goes through the shared engine's sender pipeline ([`livemig_agent::pipeline::send_pages`]:
//! read, ledger hash, encoder), the agent's writer thread, TLS 1.3 (certificates, as `livemig
//! certs` makes them) over one or more loopback TCP connections (`--connections`, each its own TLS
//! session, as `send --connections`), and the receiver's own decoding threads
//! ([`livemig_agent::apply`]: the agent's frame reader on the first connection, a reader per data
//! connection, `--receive-threads` decoders) into a destination memory file, written and
//! recorded in the destination's ledger as the receiver does (zero pages punched as holes).
//!
//! Two passes: the first sends every page (as QEMU's first pass does, which the stream engine
//! compacts; zero pages included), the second the pages the synthetic guest wrote again. Then
//! the destination must equal the source page by page and the two ledgers' digests must agree,
//! or the run fails. Both ends run in this one process, so the CPU time is both ends' together.

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use crossbeam_channel::Sender;
use livemig_agent::apply::{DataConnections, Pool, Target};
use livemig_agent::autocomp::{CompressorMode, CompressorReport, SharedAuto};
use livemig_agent::link::{self, Links, Out, Writer};
use livemig_agent::Quiet;
use livemig_compact::{Compressor, EncodeOptions, Encoder, PageClass, PageKey, PAGE_SIZE};
use livemig_memory::{GuestMemory, PageBuf};
use livemig_tls::{Auth, TlsSetup, CA_FILE};
use livemig_track::{ContentTracker, Ledger, Tracker};
use livemig_wire::{FrameKind, Message, WireError};
use serde::Serialize;

use crate::synth;

/// Options of `livemig-dev pipeline`.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Which engine: `shared` (the shared engine's page pipeline, below) or `stream` (the stream
    /// engine's relay on a synthetic QEMU migration stream, through `livemig tunnel send` and
    /// `receive`, with 1 thread and with --threads: see `stream_bench.rs`).
    #[arg(long, value_enum, default_value_t = Engine::Shared)]
    engine: Engine,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 1024)]
    pub(crate) ram_mib: u64,
    /// Compressors to measure, one run each.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Comp::None, Comp::Lz4, Comp::Zstd])]
    pub(crate) compressor: Vec<Comp>,
    /// Cap of the sender's writers, Mbit/s, shared out among the connections (as `send
    /// --bandwidth`; default: none).
    #[arg(long)]
    bandwidth_mbit: Option<u64>,
    /// Encoder threads (default: the available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Connections, one run each (e.g. `1,2,4`; both engines).
    #[arg(long, value_delimiter = ',', default_values_t = [1u32])]
    pub(crate) connections: Vec<u32>,
    /// The receiver's decoding threads (default: the available cores).
    #[arg(long)]
    receive_threads: Option<usize>,
    /// Transport: TLS 1.3 with certificates, or plain TCP.
    #[arg(long, value_enum, default_value_t = Link::Tls)]
    pub(crate) transport: Link,
    /// Seed of the synthetic memory.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Directory of the two memory files (tmpfs, like a memfd).
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Runs per compressor; the one with the median GB/s (both passes) is reported, with every
    /// run's GB/s (`tries_gb_per_s`): on a shared machine a single run is noisy.
    #[arg(long, default_value_t = 1)]
    pub(crate) repeat: usize,
    /// Print the results as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Engine {
    Shared,
    Stream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Comp {
    None,
    Lz4,
    Zstd,
    /// Chosen by the link, as `send --compressor auto`.
    Auto,
}

impl Comp {
    pub(crate) fn compressor(self) -> Compressor {
        match self {
            Comp::None => Compressor::None,
            Comp::Lz4 => Compressor::Lz4,
            Comp::Zstd => Compressor::Zstd(1),
            Comp::Auto => CompressorMode::Auto.initial(),
        }
    }
    pub(crate) fn mode(self) -> CompressorMode {
        match self {
            Comp::Auto => CompressorMode::Auto,
            c => CompressorMode::Forced(c.compressor()),
        }
    }
    pub(crate) fn name(self) -> &'static str {
        match self {
            Comp::None => "none",
            Comp::Lz4 => "lz4",
            Comp::Zstd => "zstd",
            Comp::Auto => "auto",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Link {
    Tls,
    Plain,
}

/// One pass of one run.
#[derive(Debug, Serialize)]
struct PassResult {
    pass: u32,
    pages: u64,
    /// Guest RAM bytes through the pipeline (pages x 4096).
    ram_bytes: u64,
    /// Bytes on the connection (frames, before TLS).
    wire_bytes: u64,
    seconds: f64,
    /// CPU seconds of the process (both ends, every thread).
    cpu_seconds: f64,
    /// Of which the receiving end's threads (decoders, frame readers; TLS decryption included).
    receiver_cpu_seconds: f64,
    /// Guest RAM GB (10^9 bytes) per second of wall time.
    gb_per_s: f64,
    /// Guest RAM GB per CPU second: what one core does (both ends together).
    gb_per_cpu_s: f64,
}

/// One run: one compressor.
#[derive(Debug, Serialize)]
struct RunResult {
    compressor: Comp,
    transport: Link,
    connections: u32,
    threads: usize,
    receive_threads: usize,
    ram_mib: u64,
    passes: Vec<PassResult>,
    /// Both passes together.
    total: PassResult,
    /// Pages per class (precise names) the encoder sent.
    classes: Vec<(String, u64)>,
    /// The content tracker's scan of the whole memory before the second pass.
    scan_gb_per_s: f64,
    scan_gb_per_cpu_s: f64,
    /// Verification after the run: destination equals source, ledgers agree.
    verified: bool,
    /// GB/s (both passes) of every run of this compressor (`--repeat`), ascending.
    tries_gb_per_s: Vec<f64>,
    /// What the compressor choice did (as `send`'s report).
    compressor_choice: CompressorReport,
}

#[derive(Debug, Serialize)]
struct Output {
    command: String,
    cores: usize,
    runs: Vec<RunResult>,
}

/// CPU seconds (user + system) of a /proc stat file (a process's or a thread's).
pub(crate) fn stat_cpu_seconds(path: &Path) -> Result<f64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    // Fields after the command (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    let ticks: u64 = f.get(11).zip(f.get(12)).and_then(|(u, s)| Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?)).context("malformed /proc stat")?;
    Ok(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// CPU seconds of this process so far (every thread, ended ones included).
pub(crate) fn cpu_seconds() -> Result<f64> {
    stat_cpu_seconds(Path::new("/proc/self/stat"))
}

/// Names (prefixes) of the receiving end's threads: the benchmark's receiver, the agent's frame
/// reader, the data connections' readers and the decoding threads (they live for the whole run;
/// the sender's encoder threads end with each pass, so the sender's share is the process's total
/// minus these).
const RECEIVER_THREADS: [&str; 4] = ["bench-receive", "livemig-reader", "livemig-data-", "livemig-apply-"];

/// CPU seconds of the receiving end's threads so far.
fn receiver_cpu_seconds() -> Result<f64> {
    let mut sum = 0.0;
    for t in std::fs::read_dir("/proc/self/task").context("cannot list /proc/self/task")? {
        let dir = t?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if RECEIVER_THREADS.iter().any(|t| comm.trim_end().starts_with(t)) {
            // A thread may end between the listing and the read: it then counts for nothing.
            sum += stat_cpu_seconds(&dir.join("stat")).unwrap_or(0.0);
        }
    }
    Ok(sum)
}

fn memory_file(dir: &Path, tag: &str, bytes: u64) -> Result<(tempfile::NamedTempFile, GuestMemory)> {
    let f = tempfile::Builder::new()
        .prefix(&format!("livemig-dev-{tag}-"))
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a memory file in {}", dir.display()))?;
    f.as_file().set_len(bytes).context("cannot size the memory file")?;
    let mem = GuestMemory::open_file(tag, f.path(), bytes).context("cannot map the memory file")?;
    Ok((f, mem))
}

/// Writes the first pass of the synthetic memory.
fn fill(mem: &GuestMemory, seed: u64) -> Result<()> {
    let mut buf = PageBuf::zeroed();
    for p in 0..mem.total_pages() {
        synth::first(seed, p, &mut buf.0, |q, out| mem.read_page_into(q, out).expect("an earlier page"));
        if !livemig_compact::is_zero(&buf.0) {
            mem.write_page(p, &buf.0)?;
        }
    }
    Ok(())
}

/// Applies the second pass; returns the pages written (ascending).
fn second_pass(mem: &GuestMemory, seed: u64) -> Result<Vec<u64>> {
    let mut buf = PageBuf::zeroed();
    let mut dirty = Vec::new();
    for p in 0..mem.total_pages() {
        if let Some(c) = synth::change(seed, p) {
            mem.read_page(p, &mut buf)?;
            synth::apply(seed, p, c, &mut buf.0);
            mem.write_page(p, &buf.0)?;
            dirty.push(p);
        }
    }
    Ok(dirty)
}

/// The receiving end, as the shared engine's receiver: the first connection's frames read by
/// the agent's frame reader, every data connection's by its own reader, every batch decoded by
/// the receiver's decoding threads ([`livemig_agent::apply`]); at each pass end, once every
/// connection reached it and every batch is applied, reports its arrival. Returns the ledger's
/// digest and the misses.
fn receive(
    first: Box<dyn std::io::Read + Send>,
    data: Vec<(u32, TcpStream, Box<dyn std::io::Read + Send>)>,
    (mem, key, threads): (&GuestMemory, &PageKey, usize),
    (ends, measured): (&Sender<(u32, Instant)>, &crossbeam_channel::Receiver<()>),
) -> Result<(livemig_track::Digest, u64)> {
    let total = mem.total_pages();
    let sources = livemig_agent::apply::NoSources;
    let target = Target::new(mem, total, key, &sources, Ledger::zeroed(total, key.clone()));
    let pool = Pool::new(threads);
    let mut misses = 0u64;
    std::thread::scope(|s| -> Result<()> {
        let feeder = pool.start(s, &target)?;
        let mut data = DataConnections::start(s, data, &feeder)?;
        let frames = link::read_frames(first, 8);
        loop {
            let frame = loop {
                crossbeam_channel::select! {
                    recv(frames) -> f => break f.unwrap_or(Err(WireError::Closed)),
                    recv(data.events()) -> e => if let Ok(e) = e { data.take(e)? },
                }
            };
            let frame = match frame {
                Ok(f) => f,
                Err(WireError::Closed) => return Ok(()),
                Err(e) => return Err(e).context("receiving"),
            };
            match frame.kind {
                FrameKind::Pages => feeder.apply(frame.payload)?,
                FrameKind::Control => match frame.message()? {
                    Message::IterationEnd { index, last, .. } => {
                        data.wait_fences(index, Duration::from_secs(600))?;
                        misses += feeder.wait_idle(&target)?.len() as u64;
                        let _ = ends.send((index, Instant::now()));
                        if last {
                            // The receiving threads' CPU time is read after this pass: they
                            // must not end before. The sender closes every connection next,
                            // in no set order.
                            let _ = measured.recv();
                            return Ok(());
                        }
                    }
                    m => bail!("unexpected message {}", m.name()),
                },
                k => bail!("unexpected frame {k:?}"),
            }
        }
    })?;
    let digest = target.ledger().digest();
    Ok((digest, misses))
}

/// The sender's writing half, the receiver's socket and reading half, and the page key of one
/// connection.
type Connection = (Box<dyn std::io::Write + Send>, TcpStream, Box<dyn std::io::Read + Send>, PageKey);

/// A connection over loopback, TLS when `tls` is given.
fn connect(link: Link, tls: Option<&TlsSetup>) -> Result<Connection> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot listen on loopback")?;
    let addr = listener.local_addr()?;
    let setup = tls.cloned();
    let server = std::thread::spawn(move || -> Result<_> {
        let (s, _) = listener.accept()?;
        link::tune(&s, Duration::from_secs(60))?;
        let socket = s.try_clone()?;
        // The decoders wait for nothing: the reading side has no timeout, as the receiver's.
        s.set_read_timeout(None)?;
        Ok(match setup {
            Some(setup) => {
                let session = livemig_tls::accept(&setup, s)?;
                let key = session.page_key_material();
                (socket, session.split().0, Some(key))
            }
            None => (socket, Box::new(s) as Box<dyn std::io::Read + Send>, None),
        })
    });
    let c = TcpStream::connect(addr)?;
    link::tune(&c, Duration::from_secs(60))?;
    let (writer, key): (Box<dyn std::io::Write + Send>, _) = match (link, tls) {
        (Link::Tls, Some(setup)) => {
            let session = livemig_tls::connect(setup, c, "localhost")?;
            let key = session.page_key_material();
            (session.split().1, Some(key))
        }
        _ => (Box::new(c), None),
    };
    let (socket, reader, server_key) = server.join().map_err(|_| anyhow::anyhow!("accept thread panicked"))??;
    ensure!(key == server_key, "the two ends exported different page keys");
    Ok((writer, socket, reader, PageKey::from_bytes(key.unwrap_or([0x5a; 32]))))
}

fn pass_result(pass: u32, pages: u64, wire_bytes: u64, seconds: f64, (cpu, rx_cpu): (f64, f64)) -> PassResult {
    let ram_bytes = pages * PAGE_SIZE as u64;
    let gb = ram_bytes as f64 / 1e9;
    PassResult {
        pass,
        pages,
        ram_bytes,
        wire_bytes,
        seconds,
        cpu_seconds: cpu,
        receiver_cpu_seconds: rx_cpu,
        gb_per_s: gb / seconds,
        gb_per_cpu_s: gb / cpu.max(0.01),
    }
}

fn run_one(a: &Args, (comp, connections): (Comp, u32), (threads, rx_threads): (usize, usize), tls: Option<&TlsSetup>) -> Result<RunResult> {
    let bytes = a.ram_mib << 20;
    let (_src_file, src) = memory_file(&a.dir, "src", bytes)?;
    let (_dst_file, dst) = memory_file(&a.dir, "dst", bytes)?;
    fill(&src, a.seed)?;
    let total = src.total_pages();

    // Each connection its own TLS session; the first one's key is the migration's.
    let (w, _, r, key) = connect(a.transport, tls)?;
    let rate = a.bandwidth_mbit.map(|m| (m * 1_000_000 / 8 / u64::from(connections)).max(1));
    let mut links = Links::new(Writer::spawn(w, rate));
    let mut data = Vec::new();
    for index in 1..connections {
        let (w, socket, r, _) = connect(a.transport, tls)?;
        links.add(Writer::spawn(w, rate));
        data.push((index, socket, r));
    }
    let (ends_tx, ends_rx) = crossbeam_channel::unbounded();
    let (measured_tx, measured_rx) = crossbeam_channel::bounded::<()>(1);
    let dst = Arc::new(dst);
    let rx_mem = Arc::clone(&dst);
    let rx_key = key.clone();
    let receiver = std::thread::Builder::new()
        .name("bench-receive".into())
        .spawn(move || receive(r, data, (&rx_mem, &rx_key, rx_threads), (&ends_tx, &measured_rx)))?;

    let mut auto = SharedAuto::new(comp.mode(), threads, &mut Quiet);
    let mut ledger = Ledger::zeroed(total, key.clone());
    let opts = EncodeOptions { compressor: comp.compressor(), ..EncodeOptions::for_ram(bytes) };
    let mut encoder = Encoder::new(total, opts, key.clone());

    let mut passes = Vec::new();
    let mut scan = (0.0, 0.0);
    for pass in 1..=2u32 {
        let list: Vec<(u64, bool)> = if pass == 1 {
            (0..total).map(|p| (p, false)).collect()
        } else {
            let dirty = second_pass(&src, a.seed)?;
            // The content tracker's view of the same change (its cost is one hash of all RAM).
            let (c0, t0) = (cpu_seconds()?, Instant::now());
            let found = ContentTracker::new(threads).scan(&livemig_agent::MemSource(&src), &ledger)?;
            let secs = t0.elapsed().as_secs_f64();
            let gb = bytes as f64 / 1e9;
            scan = (gb / secs, gb / (cpu_seconds()? - c0).max(0.01));
            ensure!(found.dirty.iter().all(|p| dirty.binary_search(p).is_ok()), "the tracker found pages the second pass did not write");
            dirty.into_iter().map(|p| (p, false)).collect()
        };
        let (c0, r0, t0, w0) = (cpu_seconds()?, receiver_cpu_seconds()?, Instant::now(), links.total_bytes());
        auto.start_pass();
        let sent = livemig_agent::pipeline::send_pages(&src, &list, &mut ledger, &mut encoder, &mut links, threads, |sent, w, enc| {
            auto.after_batch(&src, &list, sent, w, enc, pass, &mut Quiet)
        })?;
        links.fence(pass)?;
        links.send(Out::Message(Message::IterationEnd { index: pass, pages: sent, last: pass == 2 }))?;
        let (index, at) = ends_rx.recv_timeout(Duration::from_secs(600)).context("the receiver did not finish the pass")?;
        ensure!(index == pass, "pass {index} ended, expected {pass}");
        let secs = at.duration_since(t0).as_secs_f64();
        let cpu = (cpu_seconds()? - c0, receiver_cpu_seconds()? - r0);
        passes.push(pass_result(pass, sent, links.total_bytes() - w0, secs, cpu));
    }
    let _ = measured_tx.send(());
    links.finish()?;
    let (rx_digest, misses) = receiver.join().map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;

    // Verification, outside the timings.
    ensure!(misses == 0, "{misses} pages missed at the destination");
    ensure!(rx_digest == ledger.digest(), "the ledgers disagree: source {} destination {rx_digest}", ledger.digest());
    let (mut x, mut y) = (PageBuf::zeroed(), PageBuf::zeroed());
    for p in 0..total {
        src.read_page(p, &mut x)?;
        dst.read_page(p, &mut y)?;
        ensure!(x.0 == y.0, "page {p} differs at the destination");
    }

    let sum = |f: fn(&PassResult) -> f64| passes.iter().map(f).sum::<f64>();
    let totals = pass_result(
        0,
        passes.iter().map(|p| p.pages).sum(),
        passes.iter().map(|p| p.wire_bytes).sum(),
        sum(|p| p.seconds),
        (sum(|p| p.cpu_seconds), sum(|p| p.receiver_cpu_seconds)),
    );
    let st = encoder.stats();
    let classes = PageClass::ALL.iter().map(|c| (c.name().to_string(), st.get(*c).pages)).filter(|(_, n)| *n > 0).collect();
    Ok(RunResult {
        compressor: comp,
        transport: a.transport,
        connections,
        threads,
        receive_threads: rx_threads,
        ram_mib: a.ram_mib,
        passes,
        total: totals,
        classes,
        scan_gb_per_s: scan.0,
        scan_gb_per_cpu_s: scan.1,
        verified: true,
        tries_gb_per_s: Vec::new(),
        compressor_choice: auto.auto.report(),
    })
}

/// Runs the benchmark.
pub fn run(a: &Args) -> Result<()> {
    ensure!(a.ram_mib >= 1, "--ram-mib must be at least 1");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = a.threads.unwrap_or(cores);
    ensure!(threads >= 1, "--threads must be at least 1");
    let rx_threads = a.receive_threads.unwrap_or(cores);
    ensure!(rx_threads >= 1, "--receive-threads must be at least 1");
    ensure!(a.connections.iter().all(|&c| (1..=livemig_wire::MAX_CONNECTIONS).contains(&c)), "--connections must be 1 to {}", livemig_wire::MAX_CONNECTIONS);
    let certs = tempfile::tempdir().context("cannot create a directory for certificates")?;
    let tls = match a.transport {
        Link::Tls => {
            livemig_tls::make_certs(certs.path(), &["localhost".to_string()])?;
            let d = certs.path();
            Some(TlsSetup::load(&Auth::Certs { cert: d.join("localhost.pem"), key: d.join("localhost-key.pem"), ca: d.join(CA_FILE) })?)
        }
        Link::Plain => None,
    };
    if a.engine == Engine::Stream {
        ensure!(a.repeat >= 1, "--repeat must be at least 1");
        return crate::stream_bench::run(a, threads, tls.as_ref());
    }
    let mut runs = Vec::new();
    ensure!(a.repeat >= 1, "--repeat must be at least 1");
    for (&c, &n) in a.compressor.iter().flat_map(|c| a.connections.iter().map(move |n| (c, n))) {
        let mut tries = Vec::with_capacity(a.repeat);
        for _ in 0..a.repeat {
            tries.push(
                run_one(a, (c, n), (threads, rx_threads), tls.as_ref())
                    .with_context(|| format!("run with compressor {} over {n} connection(s)", c.name()))?,
            );
        }
        tries.sort_by(|x, y| x.total.gb_per_s.total_cmp(&y.total.gb_per_s));
        let all: Vec<f64> = tries.iter().map(|t| t.total.gb_per_s).collect();
        let mut median = tries.swap_remove(all.len() / 2);
        median.tries_gb_per_s = all;
        runs.push(median);
    }
    let out = Output { command: std::env::args().collect::<Vec<_>>().join(" "), cores, runs };
    let mut stdout = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut stdout, &out)?;
        writeln!(stdout)?;
        return Ok(());
    }
    writeln!(
        stdout,
        "pipeline: {} MiB synthetic guest, {} cores, {} encoder threads, {} decoding threads, {:?}, median of {} run(s)",
        a.ram_mib, cores, threads, rx_threads, a.transport, a.repeat
    )?;
    writeln!(stdout, "| compressor | connections | pass | pages | wire MB | s | GB/s | CPU s (receiver) | GB per CPU s | scan GB/s |")?;
    writeln!(stdout, "|---|---|---|---|---|---|---|---|---|---|")?;
    for r in &out.runs {
        for p in r.passes.iter().chain(std::iter::once(&r.total)) {
            let pass = if p.pass == 0 { "both".to_string() } else { p.pass.to_string() };
            let scan = if p.pass == 0 { format!("{:.2}", r.scan_gb_per_s) } else { String::new() };
            writeln!(
                stdout,
                "| {} | {} | {pass} | {} | {:.1} | {:.2} | {:.2} | {:.2} ({:.2}) | {:.2} | {scan} |",
                r.compressor.name(),
                r.connections,
                p.pages,
                p.wire_bytes as f64 / 1e6,
                p.seconds,
                p.gb_per_s,
                p.cpu_seconds,
                p.receiver_cpu_seconds,
                p.gb_per_cpu_s
            )?;
        }
        let classes: Vec<String> = r.classes.iter().map(|(n, c)| format!("{n} {c}")).collect();
        writeln!(stdout, "|   | | classes: {} | | | | | | | |", classes.join(", "))?;
        let c = &r.compressor_choice;
        let changes: Vec<String> = c
            .changes
            .iter()
            .map(|ch| match (&ch.from, ch.iteration) {
                (Some(f), Some(i)) => format!("{f} -> {} in pass {i} at {:.1} MB", ch.to, ch.wire_bytes as f64 / 1e6),
                _ => format!("{} first", ch.to),
            })
            .collect();
        writeln!(
            stdout,
            "|   | compressor {} ({}): {}; {} pages sampled in {:.1} ms | | | | | | | |",
            c.chosen,
            c.mode,
            changes.join(", "),
            c.sampled_pages,
            c.sampling_ms
        )?;
    }
    Ok(())
}
