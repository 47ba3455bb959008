//! `livemig`: live migration of QEMU VMs with memory compaction and adaptive downtime control.

mod certs_cmd;
mod index_cmd;
mod progress;
mod signal;
mod sim_cmd;
mod snapshot_cmd;
mod trace_cmd;
mod tunnel_cmd;
mod units;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use livemig_agent::{AgentError, PolicyKind, ReceiveOptions, Report, SendOptions, Transport};
use livemig_control::Limits;

pub mod exit;

#[derive(Parser, Debug)]
#[command(name = "livemig", version, args_override_self = true, about = "Live-migrate running QEMU VMs: pre-copy with memory compaction and adaptive downtime control")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Migrate the VM behind a QMP socket to a `livemig receive` (source side).
    Send(SendArgs),
    /// Accept a migration into a QEMU started with `-incoming defer` (destination side).
    Receive(ReceiveArgs),
    /// Make TLS material for send/receive: a CA, a certificate and key per host, and a PSK file.
    Certs(certs_cmd::CertsArgs),
    /// Build (or confirm up to date) the fingerprint index of a raw disk image.
    Index(index_cmd::IndexArgs),
    /// Replay WWS traces through the downtime policies over a modelled link and compare them.
    Simulate(sim_cmd::SimulateArgs),
    /// Plot the writable working set per iteration of a send report as SVG.
    Plot(sim_cmd::PlotArgs),
    /// List or remove the memory snapshots kept after migrations.
    Snapshot {
        #[command(subcommand)]
        command: snapshot_cmd::SnapshotCommand,
    },
    /// Write a WWS trace for `simulate`: from a migration report, or by observing a running VM.
    Trace(trace_cmd::TraceArgs),
    /// Relay a migration that libvirt (or another owner of QEMU's monitor) drives over unix
    /// sockets, compacted over livemig's connection: no QMP on either side.
    Tunnel {
        #[command(subcommand)]
        command: tunnel_cmd::TunnelCommand,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Policy {
    /// QEMU's rule: switch over when the rest fits --max-downtime, else iterate up to the cap and fail.
    Fixed,
    /// Fit the writable-working-set trend and switch over at the best downtime within --max-downtime.
    Adaptive,
}

#[derive(Args, Debug, Clone)]
struct TransportArgs {
    /// This host's certificate (PEM, signed by --tls-ca; `livemig certs` makes them). TLS 1.3 with
    /// mutual authentication is the default transport.
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA that signs both hosts' certificates (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// TLS 1.3 authenticated by a pre-shared key instead of certificates: the file `livemig certs
    /// DIR` writes (DIR/psk, a random key: `livemig-psk-v1:` and 64 hex digits), the same on both
    /// hosts. Passphrases and other files are refused: they could be guessed offline.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    psk_file: Option<PathBuf>,
    /// Plain, unauthenticated TCP instead of TLS: only on a network you trust with the guest's
    /// memory.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca", "psk_file"])]
    insecure: bool,
}

impl TransportArgs {
    fn transport(&self) -> anyhow::Result<Transport> {
        let auth = match (&self.tls_cert, &self.tls_key, &self.tls_ca, &self.psk_file) {
            (Some(cert), Some(key), Some(ca), None) => livemig_tls::Auth::Certs { cert: cert.clone(), key: key.clone(), ca: ca.clone() },
            (None, None, None, Some(file)) => livemig_tls::Auth::Psk { file: file.clone() },
            _ if self.insecure => {
                eprintln!("warning: --insecure: the migration stream (the whole guest memory) is neither encrypted nor authenticated");
                return Ok(Transport::Insecure);
            }
            _ => bail!(
                "the migration stream carries the whole guest memory and is sent over TLS: give --tls-cert, --tls-key and --tls-ca (or --psk-file; `livemig certs DIR` makes both), or --insecure for plain TCP on a trusted network"
            ),
        };
        let setup = livemig_tls::TlsSetup::load(&auth).context("cannot set up TLS")?;
        Ok(Transport::Tls(std::sync::Arc::new(setup)))
    }
}

#[derive(Args, Debug, Clone)]
pub(crate) struct SendArgs {
    /// QMP socket of the running source QEMU.
    #[arg(long)]
    qmp: PathBuf,
    /// Address of the receiver, HOST:PORT.
    #[arg(long)]
    to: String,
    /// Name the receiver's certificate must carry (default: the host part of --to).
    #[arg(long)]
    tls_server_name: Option<String>,
    #[command(flatten)]
    transport: TransportArgs,
    /// Downtime policy.
    #[arg(long, value_enum, default_value_t = Policy::Adaptive)]
    policy: Policy,
    /// Longest acceptable downtime (e.g. 300ms, 2s).
    #[arg(long, default_value = "300ms", value_parser = units::parse_duration_ms)]
    max_downtime: f64,
    /// Most pre-copy iterations before the policy must switch over or give up.
    #[arg(long, default_value_t = 30)]
    max_iterations: u32,
    /// When even the best downtime the WWS trend allows exceeds --max-downtime (adaptive policy):
    /// `throttle` stuns the guest's vCPUs in short slices, step by step, until it fits; `fail`
    /// leaves the guest untouched and gives up at the iteration cap.
    #[arg(long, value_enum, default_value_t = sim_cmd::NoConverge::Throttle)]
    on_no_converge: sim_cmd::NoConverge,
    /// Cap the wire rate (e.g. 100mbit, 1gbit, 50MiB/s).
    #[arg(long, value_parser = units::parse_rate)]
    bandwidth: Option<u64>,
    /// Longest wait for the peer or QEMU at any step.
    #[arg(long, default_value = "60s", value_parser = units::parse_duration_ms)]
    timeout: f64,
    /// How long to retry connecting while the receiver is not listening yet.
    #[arg(long, default_value = "30s", value_parser = units::parse_duration_ms)]
    connect_timeout: f64,
    /// Compressor of whole pages: auto (chosen from the measured link rate and each
    /// candidate's cost on the guest's pages: none, lz4 or zstd; the report says what and
    /// why), or forced: lz4 (fast), zstd (level 1: smaller, about 2x the CPU) or none.
    #[arg(long, value_enum, default_value_t = CompressorArg::Auto)]
    compressor: CompressorArg,
    /// Send whole pages uncompressed (same as --compressor none).
    #[arg(long)]
    no_compress: bool,
    /// How the RAM travels. `stream`: QEMU migrates the VM with its own pre-copy and dirty
    /// tracking (any RAM: plain -m, memfd, file) into livemig, which compacts its page records,
    /// carries them over its own connection and rebuilds QEMU's exact stream for the destination
    /// QEMU; needs QEMU >= 8.1 (>= 9.0 under TCG). `shared`: livemig reads the VM's shared RAM
    /// (a named file, or memfd on QEMU < 8.1) with its own tracker and QEMU moves only the device
    /// state. `auto`: stream where this QEMU allows it, else shared; the report says which and why.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    engine: EngineArg,
    /// Dirty-page tracker of the shared engine: `content` hashes every page; `soft-dirty` reads
    /// the QEMU process's soft-dirty bits (Linux with CONFIG_MEM_SOFT_DIRTY; a self-test refuses
    /// it elsewhere), experimental: on KVM in the lane its destination guest hung after 2 of 11
    /// switchovers, cause unknown; `auto` is content.
    #[arg(long, value_enum, default_value_t = TrackerArg::Auto)]
    tracker: TrackerArg,
    /// Most threads the shared engine's tracker and page encoder, or the stream engine's page encoder, use (1-64; default: every
    /// core), so that a migration leaves cores to the host's other VMs.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: Option<u16>,
    /// Connections the pages (shared engine) or QEMU's compacted stream (stream engine) go over
    /// (1-16; default: shared engine a quarter of this host's cores, 2 to 4; stream engine 1,
    /// measured faster on 2 cores), each its own TLS session with its own encryption thread; the
    /// receiver reads all of them at once (the stream engine's puts the chunks back in order).
    /// One carries at most about 10 Gbit/s (measured: its TLS reading end takes a core for
    /// that). More than one needs a receiver of protocol 6 (shared engine) or 7 (stream engine);
    /// an older one gets one, said in the log and the report.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=16))]
    connections: Option<u32>,
    /// Identity of the VM for memory snapshots (default: QEMU's -name, else its UUID).
    #[arg(long)]
    vm_id: Option<String>,
    /// The most QEMU's device-state stream may carry. More means QEMU is copying guest RAM while
    /// the source is paused: the migration stops and the source VM resumes.
    #[arg(long, default_value = "64MiB", value_parser = units::parse_size)]
    max_device_state: u64,
    #[command(flatten)]
    holdings: HoldingsArgs,
    /// Write the JSON report here, and a plot of the WWS per iteration next to it (same name, .svg).
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct ReceiveArgs {
    /// Address to listen on, HOST:PORT.
    #[arg(long)]
    listen: String,
    /// QMP socket of the destination QEMU (started with `-incoming defer`).
    #[arg(long)]
    qmp: PathBuf,
    #[command(flatten)]
    transport: TransportArgs,
    /// Longest wait for the peer or QEMU at any step once connected.
    #[arg(long, default_value = "60s", value_parser = units::parse_duration_ms)]
    timeout: f64,
    /// Longest wait for the sender to connect.
    #[arg(long, default_value = "10m", value_parser = units::parse_duration_ms)]
    accept_timeout: f64,
    /// Before the destination resumes, re-read its whole memory and check it against the
    /// source's digest (instead of the hashes of the pages as they were written). Costs downtime.
    #[arg(long)]
    verify_reread: bool,
    /// Threads that decode and write the pages (shared engine; 1-64; default: every core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: Option<u16>,
    #[command(flatten)]
    holdings: HoldingsArgs,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EngineArg {
    Auto,
    Stream,
    Shared,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TrackerArg {
    Auto,
    Content,
    SoftDirty,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CompressorArg {
    Auto,
    Lz4,
    Zstd,
    None,
}

impl CompressorArg {
    /// The mode; `--no-compress` forces none whatever `--compressor` says.
    fn mode(self, no_compress: bool) -> livemig_agent::autocomp::CompressorMode {
        use livemig_agent::autocomp::CompressorMode::{Auto, Forced};
        use livemig_compact::Compressor;
        match (no_compress, self) {
            (true, _) | (_, CompressorArg::None) => Forced(Compressor::None),
            (_, CompressorArg::Auto) => Auto,
            (_, CompressorArg::Lz4) => Forced(Compressor::Lz4),
            (_, CompressorArg::Zstd) => Forced(Compressor::Zstd(1)),
        }
    }
}

/// What a host holds besides the guest RAM: disk images and memory snapshots.
#[derive(Args, Debug, Clone)]
struct HoldingsArgs {
    /// A raw disk image of the guest that both hosts hold (shared storage or a copy); pages equal
    /// to 4 KiB of it starting at a filesystem block (any sector where no ext2/3/4 or XFS is
    /// found) go as references. Repeat for several.
    #[arg(long = "disk-image", value_name = "PATH")]
    disk_images: Vec<PathBuf>,
    /// Where disk-image indexes are cached (default ~/.cache/livemig/index, as `livemig index`);
    /// created mode 0700, refused if another user owns it or others can use it.
    #[arg(long, value_name = "DIR")]
    index_cache: Option<PathBuf>,
    /// Bytes between the starts of the indexed 4 KiB windows of each --disk-image: auto (from
    /// its partitions and ext2/3/4 or XFS block sizes; 512 where none is found), 512, 1024,
    /// 2048 or 4096. References may start at any sector whatever the destination's setting.
    #[arg(long, value_name = "BYTES", default_value = "auto")]
    disk_align: livemig_index::Align,
    /// Keep a memory snapshot of the VM here after a successful migration, and use one (if both
    /// hosts hold it) for references in a later migration of the same VM. Snapshots are copies of
    /// guest memory: the directory is created mode 0700 (files 0600) and refused if another user
    /// owns it or group or others have any permission on it (`chmod 700 DIR`).
    #[arg(long, value_name = "DIR")]
    snapshot_dir: Option<PathBuf>,
    /// Byte budget of --snapshot-dir; the oldest snapshots are evicted.
    #[arg(long, default_value = "16GiB", value_parser = units::parse_size)]
    snapshot_max_size: u64,
}

fn dur(ms: f64) -> Duration {
    Duration::from_secs_f64(ms / 1000.0)
}

fn write_report(path: Option<&PathBuf>, report: &Report) -> anyhow::Result<()> {
    if let Some(p) = path {
        let json = serde_json::to_string_pretty(report)?;
        std::fs::write(p, json).with_context(|| format!("cannot write the report to {}", p.display()))?;
        if report.role == "send" && !report.iterations.is_empty() {
            let svg = p.with_extension("svg");
            livemig_sim::plot_report_svg(&serde_json::to_value(report)?, &svg)
                .with_context(|| format!("cannot plot the report to {}", svg.display()))?;
        }
    }
    Ok(())
}

fn finish(role: &str, report: &Report, result: Result<(), AgentError>, path: Option<&PathBuf>) -> u8 {
    eprint!("{}", report.summary());
    if let Err(e) = write_report(path, report) {
        eprintln!("livemig {role}: {e:#}");
    }
    match result {
        Ok(()) if report.outcome == livemig_agent::OUTCOME_OVER_MAXIMUM => {
            for w in report.warnings.iter().filter(|w| w.starts_with("the downtime was")) {
                eprintln!("livemig {role}: WARNING: {w}");
            }
            exit::OVER_MAXIMUM
        }
        Ok(()) => exit::OK,
        Err(e) => {
            let code = match e {
                AgentError::Cancelled => exit::CANCELLED,
                AgentError::Unconfirmed(_) | AgentError::DestinationStateUnknown(_) => exit::UNKNOWN,
                _ => exit::FAILED,
            };
            // Say what the source VM is now, as QEMU reported it at the end, not what it should be.
            let after = match (role, code, report.source_state.as_deref()) {
                ("send", exit::UNKNOWN, _) => "the source VM stays paused".to_string(),
                ("send", _, Some("running")) => "the source VM keeps running".to_string(),
                ("send", _, Some("paused")) => "the source VM stays paused, as it was".to_string(),
                ("send", _, Some("postmigrate")) => {
                    "the source VM stays paused, as it was (in `postmigrate`: its QEMU completed its side)".to_string()
                }
                ("send", _, None) => "the source VM was not touched".to_string(),
                ("send", _, Some(s)) if s.starts_with("unknown") => {
                    "the source QEMU no longer answers: check the source VM".to_string()
                }
                ("send", _, Some(s)) => format!("the source VM is in state `{s}`: check it"),
                ("receive", exit::UNKNOWN, _) => "the destination VM may run: check it before resuming either VM".to_string(),
                _ => "the destination VM was not resumed".to_string(),
            };
            eprintln!("livemig {role}: {} ({after})", report.error.as_deref().unwrap_or("failed"));
            code
        }
    }
}

fn run_send(a: &SendArgs) -> anyhow::Result<u8> {
    let mut o = SendOptions::new(a.qmp.clone(), a.to.clone());
    o.transport = a.transport.transport()?;
    o.server_name = a.tls_server_name.clone();
    o.policy = match a.policy {
        Policy::Fixed => PolicyKind::Fixed,
        Policy::Adaptive => PolicyKind::Adaptive,
    };
    o.limits = Limits { max_downtime_ms: a.max_downtime, max_iterations: a.max_iterations, ..Limits::default() };
    o.on_no_converge = a.on_no_converge.into();
    o.bandwidth = a.bandwidth;
    o.timeout = dur(a.timeout);
    o.connect_timeout = dur(a.connect_timeout);
    o.compressor = a.compressor.mode(a.no_compress);
    if let Some(t) = a.threads {
        o.threads = usize::from(t);
    }
    o.connections = a.connections;
    o.vm_id = a.vm_id.clone();
    o.max_device_state = a.max_device_state;
    o.engine = match a.engine {
        EngineArg::Auto => livemig_agent::Engine::Auto,
        EngineArg::Stream => livemig_agent::Engine::Stream,
        EngineArg::Shared => livemig_agent::Engine::Shared,
    };
    o.tracker = match a.tracker {
        TrackerArg::Auto => livemig_agent::TrackerKind::Auto,
        TrackerArg::Content => livemig_agent::TrackerKind::Content,
        TrackerArg::SoftDirty => livemig_agent::TrackerKind::SoftDirty,
    };
    o.disk_images = a.holdings.disk_images.clone();
    o.disk_align = a.holdings.disk_align;
    if let Some(c) = &a.holdings.index_cache {
        o.index_cache = c.clone();
    }
    o.snapshot_dir = a.holdings.snapshot_dir.clone();
    o.snapshot_max_bytes = a.holdings.snapshot_max_size;
    o.cancel = signal::cancel_flag();
    let mut obs = progress::LiveLine::new("send");
    let (report, result) = livemig_agent::send(&o, &mut obs);
    Ok(finish("send", &report, result, a.report.as_ref()))
}

fn run_receive(a: &ReceiveArgs) -> anyhow::Result<u8> {
    let mut o = ReceiveOptions::new(a.listen.clone(), a.qmp.clone());
    o.transport = a.transport.transport()?;
    o.timeout = dur(a.timeout);
    o.accept_timeout = dur(a.accept_timeout);
    o.verify_reread = a.verify_reread;
    if let Some(t) = a.threads {
        o.threads = usize::from(t);
    }
    o.disk_images = a.holdings.disk_images.clone();
    o.disk_align = a.holdings.disk_align;
    if let Some(c) = &a.holdings.index_cache {
        o.index_cache = c.clone();
    }
    o.snapshot_dir = a.holdings.snapshot_dir.clone();
    o.snapshot_max_bytes = a.holdings.snapshot_max_size;
    o.cancel = signal::cancel_flag();
    let mut obs = progress::LiveLine::new("receive");
    let (report, result) = livemig_agent::receive(&o, &mut obs);
    Ok(finish("receive", &report, result, a.report.as_ref()))
}

fn main() -> ExitCode {
    let cli: Cli = match exit::parse() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let r = match &cli.command {
        Command::Send(a) => run_send(a),
        Command::Receive(a) => run_receive(a),
        Command::Certs(a) => certs_cmd::run(a),
        Command::Index(a) => index_cmd::run(a),
        Command::Simulate(a) => sim_cmd::run_simulate(a),
        Command::Plot(a) => sim_cmd::run_plot(a),
        Command::Trace(a) => trace_cmd::run(a),
        Command::Snapshot { command } => snapshot_cmd::run(command),
        Command::Tunnel { command } => tunnel_cmd::run(command),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("livemig: {e:#}");
            ExitCode::from(exit::FAILED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_args(extra: &[&str]) -> Result<SendArgs, clap::Error> {
        let mut argv = vec!["livemig", "send", "--qmp", "/q", "--to", "h:1"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Send(a) => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn threads_is_capped_between_1_and_64() {
        assert_eq!(send_args(&[]).unwrap().threads, None);
        assert_eq!(send_args(&["--threads", "3"]).unwrap().threads, Some(3));
        assert_eq!(send_args(&["--threads", "64"]).unwrap().threads, Some(64));
        assert_eq!(send_args(&[]).unwrap().connections, None);
        assert_eq!(send_args(&["--connections", "4"]).unwrap().connections, Some(4));
        assert!((2..=4).contains(&livemig_agent::send::default_connections()));
        for bad in ["0", "17", "-1", "x"] {
            assert!(send_args(&["--connections", bad]).is_err(), "--connections {bad} accepted");
        }
        for bad in ["0", "65", "-1", "many"] {
            assert!(send_args(&["--threads", bad]).is_err(), "--threads {bad} accepted");
        }
    }
}
