//! `livemig-dev pipeline --engine stream`: the stream engine's relay on a synthetic QEMU
//! migration stream. A fake source QEMU writes the stream into the real `livemig tunnel send`
//! ([`livemig_agent::stream::tunnel::tunnel_send`]: the source relay parses it and encodes its
//! PAGE records on `--threads` threads), which carries it over TLS 1.3 (certificates, as
//! `livemig certs` makes them) on loopback to the real `livemig tunnel receive` (rebuild against
//! the mirrored cache, stream digest checked), which writes it into a fake destination QEMU that
//! checks every byte against the original stream and then answers on the return path (PONG,
//! SHUT 0) as QEMU does. Both tunnel ends must report a completed, verified migration, or the
//! run fails.
//!
//! The stream, built once per run: QEMU's header, the `ram` section's block list (one block,
//! `pc.ram`, of `--ram-mib`), a first pass over every page of the synthetic guest
//! ([`crate::synth`]: zero pages as QEMU's ZERO records, text, code, random, sparse and
//! duplicate pages as PAGE records), a second pass re-sending the pages the guest wrote again
//! (previously-sent pages: a few words changed, rewritten, or unchanged), the completion (END
//! section after SWITCHOVER_START), a device section, EOF and the vmdesc; `ram` sections of 1024
//! records, as QEMU's iterations cut them.
//!
//! The stream goes over `--connections` connections (each list entry a run: `1,2,4`; each its
//! own TLS session; the tunnel receiver puts the chunks back in order, as `receive` does).
//!
//! Each compressor runs with 1 thread and with `--threads` (default: every core), one after the
//! other in the same invocation, so both see the same load of a shared machine. Everything runs
//! in this process: the CPU seconds are both ends' (and the fake QEMUs') together.

use std::io::{Read, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use livemig_agent::stream::tunnel::{tunnel_receive, tunnel_send, TunnelReceiveOptions, TunnelSendOptions};
use livemig_agent::{Observer, Progress, Report, Transport};
use livemig_compact::PAGE_SIZE;
use livemig_tls::TlsSetup;
use serde::Serialize;

use crate::pipeline::{cpu_seconds, stat_cpu_seconds, Args, Comp, Link};
use crate::synth;

/// Longest wait for any step.
const T: Duration = Duration::from_secs(600);

/// Records per `ram` section.
const SECTION_RECORDS: u64 = 1024;

/// The `ram` section's id.
const RAM: u32 = 2;

/// Writes a QEMU migration stream as `savevm.c` / `ram.c` do.
#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn be16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn be32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn be64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn name(&mut self, b: &[u8]) -> &mut Self {
        self.u8(u8::try_from(b.len()).expect("a short name")).raw(b)
    }
    fn cmd(&mut self, cmd: u16, payload: &[u8]) -> &mut Self {
        self.u8(0x08).be16(cmd).be16(u16::try_from(payload.len()).expect("a short command")).raw(payload)
    }
    fn section(&mut self, ty: u8) -> &mut Self {
        self.u8(ty).be32(RAM)
    }
    fn end_section(&mut self) -> &mut Self {
        self.be64(0x10).u8(0x7e).be32(RAM)
    }
    /// A record header of page `index` with `flag` (the block name on a section's first).
    fn rec(&mut self, index: u64, flag: u64, first: bool) -> &mut Self {
        self.be64((index * PAGE_SIZE as u64) | flag | if first { 0 } else { 0x20 });
        if first {
            self.name(b"pc.ram");
        }
        self
    }
    /// A page as QEMU sends it: a ZERO record for a zero page, else a PAGE record.
    fn page(&mut self, index: u64, first: bool, data: &[u8; PAGE_SIZE]) -> &mut Self {
        if livemig_compact::is_zero(data) {
            self.rec(index, 0x02, first).u8(0)
        } else {
            self.rec(index, 0x08, first).raw(data)
        }
    }
}

/// A synthetic stream and what it carries.
pub struct Synthetic {
    pub data: Arc<Vec<u8>>,
    /// Page records (PAGE and ZERO) per pass.
    pub pages: [u64; 2],
}

/// Builds the stream of a `ram_mib` guest (see the module).
pub fn build(ram_mib: u64, seed: u64) -> Result<Synthetic> {
    let bytes = ram_mib << 20;
    let total = bytes / PAGE_SIZE as u64;
    let mut mem = vec![0u8; usize::try_from(bytes).context("RAM too large")?];
    let at = |p: u64| usize::try_from(p).expect("page index") * PAGE_SIZE;
    let mut buf = [0u8; PAGE_SIZE];
    for p in 0..total {
        synth::first(seed, p, &mut buf, |q, out| out.copy_from_slice(&mem[at(q)..at(q) + PAGE_SIZE]));
        mem[at(p)..at(p) + PAGE_SIZE].copy_from_slice(&buf);
    }
    let mut w = W(Vec::with_capacity(usize::try_from(bytes + bytes / 3).unwrap_or(0)));
    w.be32(0x5145_564d).be32(3);
    w.u8(0x07).be32(11).raw(b"pc-q35-10.0");
    w.cmd(1, &[]).cmd(2, &1u32.to_be_bytes());
    w.u8(0x01).be32(RAM).name(b"ram").be32(0).be32(4);
    w.be64(bytes | 0x04).name(b"pc.ram").be64(bytes);
    w.end_section();
    let mut pages = [0u64; 2];
    let pass = |w: &mut W, list: &mut dyn Iterator<Item = u64>, mem: &[u8]| -> u64 {
        let mut n = 0u64;
        for p in list {
            if n.is_multiple_of(SECTION_RECORDS) {
                if n > 0 {
                    w.end_section();
                }
                w.section(0x02);
            }
            let page: &[u8; PAGE_SIZE] = mem[at(p)..at(p) + PAGE_SIZE].try_into().expect("a page");
            w.page(p, n.is_multiple_of(SECTION_RECORDS), page);
            n += 1;
        }
        if n > 0 {
            w.end_section();
        }
        n
    };
    pages[0] = pass(&mut w, &mut (0..total), &mem);
    let mut dirty = Vec::new();
    for p in 0..total {
        if let Some(c) = synth::change(seed, p) {
            let page: &mut [u8; PAGE_SIZE] = (&mut mem[at(p)..at(p) + PAGE_SIZE]).try_into().expect("a page");
            synth::apply(seed, p, c, page);
            dirty.push(p);
        }
    }
    pages[1] = pass(&mut w, &mut dirty.into_iter(), &mem);
    // The completion: nothing left to send but two pages, then the device state.
    w.cmd(11, &[]);
    w.section(0x03);
    let last: &[u8; PAGE_SIZE] = mem[at(total - 1)..].try_into().expect("a page");
    w.page(total - 1, true, last);
    w.end_section();
    pages[1] += 1;
    w.u8(0x04).be32(3).name(b"timer").be32(0).be32(2).raw(&[1, 2, 3, 4, 5, 6, 7, 8]).u8(0x7e).be32(3);
    w.u8(0x00);
    let vmdesc = br#"{"page_size": 4096, "devices": []}"#;
    w.u8(0x06).be32(u32::try_from(vmdesc.len()).expect("short")).raw(vmdesc);
    Ok(Synthetic { data: Arc::new(w.0), pages })
}

fn rp_msg(ty: u16, value: u32) -> Vec<u8> {
    let mut v = ty.to_be_bytes().to_vec();
    v.extend_from_slice(&4u16.to_be_bytes());
    v.extend_from_slice(&value.to_be_bytes());
    v
}

/// The source QEMU: connects to the tunnel, writes the stream, reads its return path until
/// the SHUT. Returns when it started writing.
fn fake_source(path: &Path, data: &[u8]) -> Result<Instant> {
    let deadline = Instant::now() + T;
    let mut s = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => bail!("the tunnel never listened at {}: {e}", path.display()),
        }
    };
    s.set_read_timeout(Some(T))?;
    let t0 = Instant::now();
    s.write_all(data).context("the source QEMU cannot write its stream")?;
    let mut back = Vec::new();
    let mut buf = [0u8; 64];
    let shut = rp_msg(1, 0);
    while !back.ends_with(&shut[..]) {
        match s.read(&mut buf) {
            Ok(0) => bail!("the return path closed before the SHUT: {back:?}"),
            Err(e) => bail!("the return path failed before the SHUT: {e}"),
            Ok(n) => back.extend_from_slice(&buf[..n]),
        }
    }
    Ok(t0)
}

/// The destination QEMU: reads the stream, checking every byte against `data`, answers PONG 1
/// and SHUT 0. Returns when its last byte arrived.
fn fake_destination(l: &UnixListener, data: &[u8]) -> Result<Instant> {
    let (mut c, _) = l.accept()?;
    c.set_read_timeout(Some(T))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0usize;
    while at < data.len() {
        let want = (data.len() - at).min(buf.len());
        let n = c.read(&mut buf[..want]).context("the destination QEMU cannot read")?;
        ensure!(n > 0, "the stream ended after {at} of {} bytes", data.len());
        if buf[..n] != data[at..at + n] {
            let i = buf[..n].iter().zip(&data[at..at + n]).position(|(a, b)| a != b).unwrap_or(0);
            bail!("the destination QEMU read another byte at offset {} than the source QEMU wrote", at + i);
        }
        at += n;
    }
    let t1 = Instant::now();
    let mut rp = rp_msg(2, 1);
    rp.extend(rp_msg(1, 0));
    c.write_all(&rp)?;
    Ok(t1)
}

/// Hands the receiver's listening address over.
struct Catch(Option<crossbeam_channel::Sender<std::net::SocketAddr>>);

impl Observer for Catch {
    fn progress(&mut self, p: Progress<'_>) {
        if let (Progress::Listening(a), Some(tx)) = (p, self.0.take()) {
            let _ = tx.send(a);
        }
    }
}

/// CPU seconds of the source relay's threads (`livemig-relay`: parsing, hashing, committing,
/// building chunks; `livemig-relay-enc-N`: preparing pages), sampled every 10 ms until `stop`
/// (the threads end with the relay: at most the last 10 ms of each is missed): all of them, and
/// `livemig-relay` alone (the part that stays on one thread).
fn relay_cpu(stop: &std::sync::atomic::AtomicBool) -> (f64, f64) {
    let mut seen: std::collections::HashMap<String, f64> = std::collections::HashMap::new();
    loop {
        let last = stop.load(std::sync::atomic::Ordering::Relaxed);
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for t in tasks.flatten() {
                let dir = t.path();
                let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
                if comm.starts_with("livemig-relay") {
                    if let Ok(c) = stat_cpu_seconds(&dir.join("stat")) {
                        let e = seen.entry(format!("{} {}", dir.display(), comm.trim_end())).or_insert(0.0);
                        *e = e.max(c);
                    }
                }
            }
        }
        if last {
            let main = seen.iter().filter(|(k, _)| k.ends_with(" livemig-relay")).map(|(_, v)| v).sum();
            return (seen.values().sum(), main);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One run: one compressor, one thread count.
#[derive(Debug, Serialize)]
pub struct StreamRun {
    compressor: Comp,
    /// Connections the stream went over (`--connections`).
    connections: u32,
    threads: usize,
    /// Guest RAM bytes the stream's page records carry (PAGE and ZERO records x 4096).
    ram_bytes: u64,
    /// Bytes of QEMU's stream.
    stream_bytes: u64,
    /// Bytes on livemig's connection (frames, before TLS).
    wire_bytes: u64,
    /// From the source QEMU's first byte to the destination QEMU's last.
    seconds: f64,
    /// CPU seconds of the process meanwhile (both ends, every thread).
    cpu_seconds: f64,
    /// Of which the source relay's threads (parsing, encoding, chunks): what `--threads` splits.
    relay_cpu_seconds: f64,
    /// Of which the relay's own thread (`livemig-relay`: reading, parsing, the stream digest,
    /// committing, building chunks, and its share of the preparing): with several threads, the
    /// part that did not move to the workers.
    relay_main_cpu_seconds: f64,
    /// Guest RAM GB (10^9 bytes) per second.
    gb_per_s: f64,
    /// Guest RAM GB per CPU second.
    gb_per_cpu_s: f64,
    /// QEMU's stream GB per second.
    stream_gb_per_s: f64,
    /// Pages per class (report names) the relay sent.
    classes: Vec<(String, u64)>,
    /// Both ends reported a completed migration, the digest verified, and the destination read
    /// exactly the source's bytes.
    verified: bool,
    /// GB/s of every run of this compressor and thread count (`--repeat`), ascending.
    tries_gb_per_s: Vec<f64>,
}

fn check(who: &str, r: &Report, res: Result<(), livemig_agent::AgentError>) -> Result<()> {
    if let Err(e) = res {
        bail!("{who}: {}", e.chain());
    }
    ensure!(r.outcome == "completed" && r.verification.ok, "{who}: {} (verified {})", r.outcome, r.verification.ok);
    Ok(())
}

fn run_one(s: &Synthetic, (comp, connections): (Comp, u32), threads: usize, transport: &Transport) -> Result<StreamRun> {
    let dir = tempfile::Builder::new().prefix("livemig-dev-stream-").tempdir().context("cannot create a socket directory")?;
    let (src, dst): (PathBuf, PathBuf) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    let listener = UnixListener::bind(&dst).context("cannot listen as the destination QEMU")?;
    let data = Arc::clone(&s.data);
    let destination = std::thread::Builder::new().name("bench-dst-qemu".into()).spawn(move || fake_destination(&listener, &data))?;

    let mut ro = TunnelReceiveOptions::new("127.0.0.1:0".into(), dst);
    ro.transport = transport.clone();
    ro.timeout = T;
    ro.accept_timeout = T;
    let (tx, rx) = crossbeam_channel::bounded(1);
    let receiver = std::thread::spawn(move || tunnel_receive(&ro, &mut Catch(Some(tx))));
    let addr = rx.recv_timeout(T).context("the tunnel receiver does not listen")?;

    let mut so = TunnelSendOptions::new(src.clone(), addr.to_string());
    so.transport = transport.clone();
    so.server_name = Some("localhost".into());
    so.compressor = comp.mode();
    so.threads = threads;
    so.connections = connections;
    so.timeout = T;
    so.connect_timeout = T;
    so.accept_timeout = T;
    let sender = std::thread::spawn(move || tunnel_send(&so, &mut livemig_agent::Quiet));

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || relay_cpu(&stop))
    };
    let c0 = cpu_seconds()?;
    let t0 = fake_source(&src, &s.data)?;
    let t1 = destination.join().map_err(|_| anyhow::anyhow!("the destination QEMU panicked"))??;
    let cpu = cpu_seconds()? - c0;
    let (sr, sres) = sender.join().map_err(|_| anyhow::anyhow!("tunnel send panicked"))?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (relay_cpu_seconds, relay_main_cpu_seconds) = sampler.join().map_err(|_| anyhow::anyhow!("the CPU sampler panicked"))?;
    let (rr, rres) = receiver.join().map_err(|_| anyhow::anyhow!("tunnel receive panicked"))?;
    check("tunnel send", &sr, sres)?;
    check("tunnel receive", &rr, rres)?;
    let stream_bytes = sr.stream.as_ref().map_or(0, |x| x.raw_bytes);
    ensure!(stream_bytes == s.data.len() as u64, "the relay read {stream_bytes} bytes of {}", s.data.len());
    ensure!(sr.threads == Some(threads.clamp(1, livemig_agent::pipeline::MAX_THREADS)), "the relay used {:?} threads", sr.threads);
    ensure!(
        sr.connections == Some(connections) && rr.connections == Some(connections),
        "{connections} connections asked, the ends used {:?} and {:?}",
        sr.connections,
        rr.connections
    );

    let seconds = t1.duration_since(t0).as_secs_f64();
    let ram_bytes = (s.pages[0] + s.pages[1]) * PAGE_SIZE as u64;
    let gb = ram_bytes as f64 / 1e9;
    let mut classes: Vec<(String, u64)> = sr.pages.iter().map(|(k, v)| (k.clone(), *v)).filter(|(_, n)| *n > 0).collect();
    classes.sort();
    Ok(StreamRun {
        compressor: comp,
        connections,
        threads,
        ram_bytes,
        stream_bytes,
        wire_bytes: sr.wire_bytes,
        seconds,
        cpu_seconds: cpu,
        relay_cpu_seconds,
        relay_main_cpu_seconds,
        gb_per_s: gb / seconds,
        gb_per_cpu_s: gb / cpu.max(0.01),
        stream_gb_per_s: stream_bytes as f64 / 1e9 / seconds,
        classes,
        verified: true,
        tries_gb_per_s: Vec::new(),
    })
}

#[derive(Debug, Serialize)]
struct Output {
    command: String,
    engine: &'static str,
    cores: usize,
    transport: Link,
    ram_mib: u64,
    runs: Vec<StreamRun>,
}

/// Runs the stream engine's benchmark.
pub fn run(a: &Args, threads: usize, tls: Option<&TlsSetup>) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let transport = match tls {
        Some(t) => Transport::Tls(Arc::new(t.clone())),
        None => Transport::Insecure,
    };
    let s = build(a.ram_mib, a.seed)?;
    let mut counts = vec![1];
    if threads != 1 {
        counts.push(threads);
    }
    let mut runs = Vec::new();
    for (&c, &conns) in a.compressor.iter().flat_map(|c| a.connections.iter().map(move |n| (c, n))) {
        for &n in &counts {
            let mut tries = Vec::with_capacity(a.repeat);
            for _ in 0..a.repeat {
                tries.push(
                    run_one(&s, (c, conns), n, &transport)
                        .with_context(|| format!("run with compressor {} over {conns} connection(s) on {n} thread(s)", c.name()))?,
                );
            }
            tries.sort_by(|x, y| x.gb_per_s.total_cmp(&y.gb_per_s));
            let all: Vec<f64> = tries.iter().map(|t| t.gb_per_s).collect();
            let mut median = tries.swap_remove(all.len() / 2);
            median.tries_gb_per_s = all;
            runs.push(median);
        }
    }
    let out = Output { command: std::env::args().collect::<Vec<_>>().join(" "), engine: "stream", cores, transport: a.transport, ram_mib: a.ram_mib, runs };
    let mut stdout = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut stdout, &out)?;
        writeln!(stdout)?;
        return Ok(());
    }
    writeln!(
        stdout,
        "pipeline --engine stream: {} MiB synthetic guest, stream {:.1} MB ({} + {} page records), {} cores, {:?}, median of {} run(s)",
        a.ram_mib,
        s.data.len() as f64 / 1e6,
        s.pages[0],
        s.pages[1],
        cores,
        a.transport,
        a.repeat
    )?;
    writeln!(stdout, "| compressor | connections | threads | wire MB | s | GB/s RAM | GB/s stream | CPU s | relay CPU s (its own thread) | GB per CPU s |")?;
    writeln!(stdout, "|---|---|---|---|---|---|---|---|---|---|")?;
    for r in &out.runs {
        writeln!(
            stdout,
            "| {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} ({:.2}) | {:.2} |",
            r.compressor.name(),
            r.connections,
            r.threads,
            r.wire_bytes as f64 / 1e6,
            r.seconds,
            r.gb_per_s,
            r.stream_gb_per_s,
            r.cpu_seconds,
            r.relay_cpu_seconds,
            r.relay_main_cpu_seconds,
            r.gb_per_cpu_s
        )?;
    }
    for r in &out.runs {
        let classes: Vec<String> = r.classes.iter().map(|(n, c)| format!("{n} {c}")).collect();
        writeln!(stdout, "classes ({}, {} connection(s), {} threads): {}", r.compressor.name(), r.connections, r.threads, classes.join(", "))?;
    }
    Ok(())
}
