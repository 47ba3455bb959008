//! `livemig-dev`: the test lab's commands, built apart from the `livemig` binary (which runs as
//! root on hypervisors and carries no test lab, guest builder or benchmark). They drive the
//! `livemig` binary beside this one (same directory: `cargo build -p livemig` builds both).
//!
//! - `livemig-dev demo`: a real VM migrated on this machine through `livemig send/receive`;
//! - `livemig-dev bench`: livemig against QEMU's own migration on a shaped link;
//! - `livemig-dev guest build`: the test guest;
//! - `livemig-dev pipeline`: the page pipeline's throughput (no VM, no `livemig` binary);
//!   `--engine stream`: the stream engine's relay on a synthetic QEMU stream.

mod bench;
mod demo;
mod pipeline;
mod stream_bench;
mod synth;
// Shared with `livemig` (not all of each is used here).
#[allow(dead_code)]
#[path = "../exit.rs"]
mod exit;
#[path = "../signal.rs"]
mod signal;
#[allow(dead_code)]
#[path = "../units.rs"]
mod units;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "livemig-dev", version, about = "livemig's test lab: the demo, the benchmarks, the test guest (not shipped)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a test VM on this machine, migrate it through livemig send/receive, check the guest, report.
    Demo(demo::DemoArgs),
    /// Benchmark livemig against QEMU's own migration on a shaped link (root; network namespaces).
    Bench(bench::BenchArgs),
    /// Pushes a synthetic guest memory through the real sender pipeline, TLS over loopback and
    /// the real decoder into a destination memory; reports GB/s of guest RAM and per core.
    /// `--engine stream`: a synthetic QEMU stream through the real tunnel send and receive.
    Pipeline(pipeline::Args),
    /// The test guest.
    Guest {
        #[command(subcommand)]
        command: GuestCommand,
    },
}

#[derive(Subcommand, Debug)]
enum GuestCommand {
    /// Build (or confirm up to date) the test guest: kernel, initramfs, root disk, workload.
    Build,
}

/// The `livemig` binary these commands run: beside this one.
fn livemig_exe() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find the livemig-dev binary")?;
    let exe = me.with_file_name("livemig");
    anyhow::ensure!(
        exe.is_file(),
        "no livemig binary beside {} (build both: `cargo build --release -p livemig`)",
        me.display()
    );
    Ok(exe)
}

fn main() -> ExitCode {
    let cli: Cli = match exit::parse() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let r = match &cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Bench(a) => bench::run(a).map(|c| u8::try_from(c).unwrap_or(exit::FAILED)),
        Command::Pipeline(a) => pipeline::run(a).map(|()| exit::OK),
        Command::Guest { command: GuestCommand::Build } => livemig_lab::GuestImage::build()
            .map(|g| {
                println!("guest ready: kernel {}, initramfs {}, disk {}", g.kernel.display(), g.initrd.display(), g.disk.display());
                exit::OK
            })
            .map_err(anyhow::Error::from),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("livemig-dev: {e:#}");
            ExitCode::from(exit::FAILED)
        }
    }
}
