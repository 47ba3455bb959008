//! Exit codes of `livemig` (and of `livemig-dev`'s commands that migrate), documented in the README.

/// The migration completed: the destination runs.
pub const OK: u8 = 0;
/// It failed; the source VM runs (or was left as it was), the destination was not resumed.
pub const FAILED: u8 = 1;
/// Bad command line.
pub const USAGE: u8 = 2;
/// Cancelled by the operator (Ctrl-C / SIGTERM); the source VM runs.
pub const CANCELLED: u8 = 3;
/// The destination was told to resume but did not confirm: the source stays paused.
pub const UNKNOWN: u8 = 4;
/// The migration completed (the destination runs) but its downtime was above
/// `--max-downtime`: the operator's limit was broken, said loudly.
pub const OVER_MAXIMUM: u8 = 5;

/// The command line, or the exit code for a bad one (`--help` and `--version` print and exit 0).
pub fn parse<C: clap::Parser>() -> Result<C, std::process::ExitCode> {
    C::try_parse().map_err(|e| {
        let _ = e.print();
        std::process::ExitCode::from(if e.use_stderr() { USAGE } else { OK })
    })
}
