//! `livemig-dev`: developer tools, built apart from the `livemig` binary (which runs as root on
//! hypervisors and carries no test or benchmark code).
//!
//! `livemig-dev pipeline`: the page pipeline's throughput, see [`pipeline`].

mod pipeline;
mod synth;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "livemig-dev", about = "livemig developer tools (not shipped)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Pushes a synthetic guest memory through the real sender pipeline, TLS over loopback and
    /// the real decoder into a destination memory; reports GB/s of guest RAM and per core.
    Pipeline(pipeline::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Pipeline(a) => pipeline::run(&a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("livemig-dev: {e:#}");
            ExitCode::FAILURE
        }
    }
}
