//! Replays recorded writable-working-set (WWS) traces through the same downtime controllers the
//! engine uses (`livemig-control`), over a modelled link, so policies can be compared offline.
//!
//! - [`Trace`]: the trace file format (JSON), loading with checks, conversion from a send report.
//! - [`simulate`]: the replay, fed to any [`DowntimeController`](livemig_control::DowntimeController).
//! - [`plot_wws_svg`]: an SVG of the WWS per iteration, the regression line and the switchover.

mod plot;
mod simulate;
mod trace;

pub use plot::{plot_report_svg, plot_wws_svg};
pub use simulate::{simulate, LinkModel, Outcome, SimIteration, SimResult, DEFAULT_BYTES_PER_PAGE, DEFAULT_SCAN_MS};
pub use trace::{Trace, TraceIteration, TRACE_VERSION};

use std::path::PathBuf;

/// What can go wrong in the simulator crate.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A file could not be read or written.
    #[error("cannot access {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid JSON of the expected shape.
    #[error("{what} is not valid JSON of the expected shape")]
    Json {
        /// The file or value.
        what: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A trace of a version this build does not read.
    #[error("the trace has version {found}, but this build reads only version {expected}")]
    Version {
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        expected: u32,
    },
    /// A trace whose values make no sense.
    #[error("the trace is invalid: {0}")]
    Invalid(String),
    /// A send report that cannot be turned into a trace or plot.
    #[error("the report cannot be used: {0}")]
    Report(String),
    /// A link model whose values make no sense.
    #[error("the link model is invalid: {0}")]
    Link(String),
    /// Drawing the plot failed.
    #[error("cannot draw the plot: {0}")]
    Plot(String),
}
