//! `livemig tunnel send|receive`: the stream engine's relay between two QEMU unix sockets, for a
//! migration that libvirt (or another owner of QEMU's monitor) drives itself. No QMP.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use livemig_agent::stream::tunnel::{self, TunnelReceiveOptions, TunnelSendOptions};
use livemig_agent::{AgentError, Report};

use crate::{dur, exit, progress, signal, units, write_report, CompressorArg, TransportArgs};

#[derive(Subcommand, Debug)]
pub(crate) enum TunnelCommand {
    /// Source host: listen on a unix socket for the source QEMU's outgoing migration (`migrate
    /// unix:PATH`; libvirt: `virsh migrate --migrateuri unix://PATH`) and relay it, compacted, to
    /// a `livemig tunnel receive`.
    Send(TunnelSendArgs),
    /// Destination host: accept one `livemig tunnel send`, connect to the destination QEMU's
    /// incoming unix socket (`-incoming unix:PATH` or `migrate-incoming`), write QEMU's stream
    /// rebuilt byte for byte into it and carry its return path back.
    Receive(TunnelReceiveArgs),
}

/// Disk images both hosts hold (references to their blocks).
#[derive(Args, Debug, Clone)]
struct DiskArgs {
    /// A raw disk image of the guest that both hosts hold; pages equal to 4 KiB of it (see
    /// --disk-align) go as references. Repeat for several.
    #[arg(long = "disk-image", value_name = "PATH")]
    disk_images: Vec<PathBuf>,
    /// Where disk-image indexes are cached (default ~/.cache/livemig/index, as `livemig index`).
    #[arg(long, value_name = "DIR")]
    index_cache: Option<PathBuf>,
    /// Bytes between the starts of the indexed 4 KiB windows of each --disk-image: auto (from
    /// its partitions and ext2/3/4 or XFS block sizes; 512 where none is found), 512, 1024,
    /// 2048 or 4096. References may start at any sector whatever the destination's setting.
    #[arg(long, value_name = "BYTES", default_value = "auto")]
    disk_align: livemig_index::Align,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct TunnelSendArgs {
    /// The unix socket the source QEMU migrates into. Created mode 0600 (QEMU must run as this
    /// user), removed at the end; a stale socket of an earlier run is replaced, anything else at
    /// the path refused. One connection: QEMU's multifd or postcopy-preempt channels are refused.
    #[arg(long, value_name = "PATH")]
    listen_unix: PathBuf,
    /// Address of the `livemig tunnel receive`, HOST:PORT.
    #[arg(long)]
    to: String,
    /// Name the receiver's certificate must carry (default: the host part of --to).
    #[arg(long)]
    tls_server_name: Option<String>,
    #[command(flatten)]
    transport: TransportArgs,
    /// Cap the wire rate (e.g. 100mbit, 1gbit, 50MiB/s).
    #[arg(long, value_parser = units::parse_rate)]
    bandwidth: Option<u64>,
    /// Longest wait for the peer or QEMU at any step once QEMU migrates.
    #[arg(long, default_value = "60s", value_parser = units::parse_duration_ms)]
    timeout: f64,
    /// How long to retry connecting while the receiver is not listening yet.
    #[arg(long, default_value = "30s", value_parser = units::parse_duration_ms)]
    connect_timeout: f64,
    /// Longest wait for the source QEMU to connect.
    #[arg(long, default_value = "10m", value_parser = units::parse_duration_ms)]
    accept_timeout: f64,
    /// Compressor of whole pages: auto (chosen from the measured link rate and each
    /// candidate's cost on the guest's pages: none, lz4 or zstd; the report says what and
    /// why), or forced: lz4 (fast), zstd (level 1: smaller, about 2x the CPU) or none.
    #[arg(long, value_enum, default_value_t = CompressorArg::Auto)]
    compressor: CompressorArg,
    /// Send whole pages uncompressed (same as --compressor none).
    #[arg(long)]
    no_compress: bool,
    /// Most threads that encode QEMU's page records (1-64; default: every core), so that a
    /// migration leaves cores to the host's other VMs.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: Option<u16>,
    /// Connections QEMU's compacted stream goes over (1-16), each its own TLS session; the
    /// receiver puts the chunks back in order. More than one needs a tunnel receiver of
    /// protocol 7 (an older one gets one, said in the log and the report).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    connections: u32,
    #[command(flatten)]
    disks: DiskArgs,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct TunnelReceiveArgs {
    /// Address to listen on for the `livemig tunnel send`, HOST:PORT.
    #[arg(long)]
    listen: String,
    /// The destination QEMU's incoming migration socket (it listens there: `-incoming
    /// unix:PATH`, or `migrate-incoming unix:PATH`), connected to once the source QEMU migrates.
    #[arg(long, value_name = "PATH")]
    connect_unix: PathBuf,
    #[command(flatten)]
    transport: TransportArgs,
    /// Longest wait for the peer or QEMU at any step once QEMU migrates.
    #[arg(long, default_value = "60s", value_parser = units::parse_duration_ms)]
    timeout: f64,
    /// Longest wait for the sender to connect, and then for its source QEMU to migrate.
    #[arg(long, default_value = "10m", value_parser = units::parse_duration_ms)]
    accept_timeout: f64,
    #[command(flatten)]
    disks: DiskArgs,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
}

pub(crate) fn run(c: &TunnelCommand) -> anyhow::Result<u8> {
    match c {
        TunnelCommand::Send(a) => run_send(a),
        TunnelCommand::Receive(a) => run_receive(a),
    }
}

fn run_send(a: &TunnelSendArgs) -> anyhow::Result<u8> {
    let mut o = TunnelSendOptions::new(a.listen_unix.clone(), a.to.clone());
    o.transport = a.transport.transport()?;
    o.server_name = a.tls_server_name.clone();
    o.bandwidth = a.bandwidth;
    o.timeout = dur(a.timeout);
    o.connect_timeout = dur(a.connect_timeout);
    o.accept_timeout = dur(a.accept_timeout);
    o.compressor = a.compressor.mode(a.no_compress);
    if let Some(t) = a.threads {
        o.threads = usize::from(t);
    }
    o.connections = a.connections;
    o.disk_images = a.disks.disk_images.clone();
    o.disk_align = a.disks.disk_align;
    if let Some(c) = &a.disks.index_cache {
        o.index_cache = c.clone();
    }
    o.cancel = signal::cancel_flag();
    let mut obs = progress::LiveLine::new("tunnel send");
    let (report, result) = tunnel::tunnel_send(&o, &mut obs);
    Ok(finish("tunnel send", &report, result, a.report.as_ref()))
}

fn run_receive(a: &TunnelReceiveArgs) -> anyhow::Result<u8> {
    let mut o = TunnelReceiveOptions::new(a.listen.clone(), a.connect_unix.clone());
    o.transport = a.transport.transport()?;
    o.timeout = dur(a.timeout);
    o.accept_timeout = dur(a.accept_timeout);
    o.disk_images = a.disks.disk_images.clone();
    o.disk_align = a.disks.disk_align;
    if let Some(c) = &a.disks.index_cache {
        o.index_cache = c.clone();
    }
    o.cancel = signal::cancel_flag();
    let mut obs = progress::LiveLine::new("tunnel receive");
    let (report, result) = tunnel::tunnel_receive(&o, &mut obs);
    Ok(finish("tunnel receive", &report, result, a.report.as_ref()))
}

/// What the operator learns at the end: the summary, the report file, one line on failure
/// saying what became of the QEMU this end serves; the exit code (0, 1, or 3 when cancelled).
fn finish(name: &str, report: &Report, result: Result<(), AgentError>, path: Option<&PathBuf>) -> u8 {
    eprint!("{}", report.summary());
    if let Some(s) = &report.stream {
        let mib = s.raw_bytes as f64 / f64::from(1u32 << 20);
        if report.role == tunnel::ROLE_SEND {
            eprintln!(
                "stream:       {mib:.1} MiB of QEMU's migration stream: {} page records compacted, {} ZERO records, {} `ram` sections",
                s.pages, s.zero_records, s.ram_sections
            );
        } else {
            eprintln!("stream:       {mib:.1} MiB of QEMU's migration stream rebuilt into the destination QEMU");
        }
    }
    if let Err(e) = write_report(path, report) {
        eprintln!("livemig {name}: {e:#}");
    }
    let Err(e) = result else { return exit::OK };
    // `stream` is in the report once this end's QEMU was connected.
    let after = match (report.role.as_str(), report.stream.is_some()) {
        (tunnel::ROLE_SEND, true) => {
            "the tunnel closed the source QEMU's migration socket: QEMU fails its migration and keeps the source VM \
             running (QEMU's own behaviour; the tunnel has no monitor to check it)"
        }
        (tunnel::ROLE_SEND, false) => "no source QEMU had connected: nothing was migrated",
        (_, true) => {
            "the tunnel closed the destination QEMU's migration socket: its incoming migration fails, the destination \
             VM was not resumed"
        }
        (_, false) => "no destination QEMU was connected: nothing was written into it",
    };
    eprintln!("livemig {name}: {} ({after})", report.error.as_deref().unwrap_or("failed"));
    if matches!(e, AgentError::Cancelled) {
        exit::CANCELLED
    } else {
        exit::FAILED
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::{Cli, Command};

    use super::TunnelCommand;

    fn parse(args: &[&str]) -> Result<TunnelCommand, clap::Error> {
        let mut all = vec!["livemig", "tunnel"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all)?.command {
            Command::Tunnel { command } => Ok(command),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tunnel_send_takes_the_transport_and_relay_options() {
        let c = parse(&[
            "send", "--listen-unix", "/run/src.sock", "--to", "dst:4444", "--psk-file", "/etc/livemig/psk", "--bandwidth", "1gbit",
            "--timeout", "30s", "--disk-image", "/img/a.raw", "--disk-image", "/img/b.raw", "--compressor", "zstd", "--report", "r.json",
        ])
        .unwrap();
        let TunnelCommand::Send(a) = c else { panic!("{c:?}") };
        assert_eq!(a.listen_unix.to_str(), Some("/run/src.sock"));
        assert_eq!(a.to, "dst:4444");
        assert_eq!(a.bandwidth, Some(125_000_000));
        assert!((a.timeout - 30_000.0).abs() < 1e-9);
        assert_eq!(a.disks.disk_images.len(), 2);
        assert!(a.transport.psk_file.is_some());
    }

    #[test]
    fn tunnel_receive_takes_its_socket_and_listen_address() {
        let c = parse(&["receive", "--listen", "0.0.0.0:4444", "--connect-unix", "/run/dst.sock", "--insecure"]).unwrap();
        let TunnelCommand::Receive(a) = c else { panic!("{c:?}") };
        assert_eq!(a.listen, "0.0.0.0:4444");
        assert_eq!(a.connect_unix.to_str(), Some("/run/dst.sock"));
        assert!(a.transport.insecure);
    }

    #[test]
    fn tunnel_commands_refuse_what_they_do_not_do() {
        // The endpoints are required; there is no QMP, policy or snapshot on a tunnel.
        assert!(parse(&["send", "--to", "dst:4444", "--insecure"]).is_err());
        assert!(parse(&["receive", "--listen", "0.0.0.0:4444", "--insecure"]).is_err());
        for extra in [["--qmp", "/run/q.sock"], ["--max-downtime", "1s"], ["--snapshot-dir", "/var/s"], ["--engine", "stream"]] {
            let mut args = vec!["send", "--listen-unix", "/run/s.sock", "--to", "d:1", "--insecure"];
            args.extend_from_slice(&extra);
            assert!(parse(&args).is_err(), "{extra:?} accepted");
        }
        // TLS options conflict as for send/receive.
        assert!(parse(&["receive", "--listen", "h:1", "--connect-unix", "/d", "--insecure", "--psk-file", "/p"]).is_err());
    }
}
