//! The `send` and `receive` agents: wire the parts together, own failure handling and reports.

pub mod apply;
pub mod arrival;
pub mod autocomp;
pub mod error;
pub mod holdings;
pub mod link;
pub mod pipeline;
pub mod qemu;
pub mod receive;
pub mod report;
pub mod scanner;
pub mod send;
pub mod stream;
pub mod throttle;
pub mod transport;

use livemig_memory::GuestMemory;
use livemig_track::{PageSource, SourceError, PAGE_SIZE};

pub use error::AgentError;
pub use receive::{receive, ReceiveOptions};
pub use report::{IterationRecord, Report};
pub use scanner::TrackerKind;
pub use send::{send, Engine, PolicyKind, SendOptions, OUTCOME_OVER_MAXIMUM};
pub use transport::Transport;

/// Name and version sent in the handshake.
pub const SOFTWARE: &str = concat!("livemig ", env!("CARGO_PKG_VERSION"));

/// Progress of an agent, for live display.
#[derive(Debug)]
pub enum Progress<'a> {
    /// A phase begins.
    Phase(&'a str),
    /// The receiver listens on this address.
    Listening(std::net::SocketAddr),
    /// Pages are being sent in an iteration.
    Sending {
        /// Iteration.
        iteration: u32,
        /// Pages sent so far in it.
        sent: u64,
        /// Pages to send in it.
        dirty: u64,
        /// Bytes on the wire so far in the migration.
        wire_bytes: u64,
    },
    /// An iteration ended.
    Iteration(&'a IterationRecord),
}

/// Receives progress.
pub trait Observer {
    /// Called at every step worth showing.
    fn progress(&mut self, p: Progress<'_>);
}

/// An observer that ignores everything.
#[derive(Debug, Default)]
pub struct Quiet;

impl Observer for Quiet {
    fn progress(&mut self, _: Progress<'_>) {}
}

/// Guest memory as a page source for the trackers (holes are not read).
#[derive(Debug)]
pub struct MemSource<'a>(pub &'a GuestMemory);

impl PageSource for MemSource<'_> {
    fn total_pages(&self) -> u64 {
        self.0.total_pages()
    }
    fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError> {
        Ok(self.0.read_page_into(page, buf)?)
    }
    fn data_ranges(&self) -> Option<Vec<std::ops::Range<u64>>> {
        self.0.data_ranges()
    }
}

/// An error with its sources, one sentence after the other.
pub(crate) fn with_sources(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A private directory for sockets, removed on drop.
pub(crate) fn private_dir(tag: &str) -> Result<tempfile::TempDir, AgentError> {
    tempfile::Builder::new()
        .prefix(&format!("livemig-{tag}-"))
        .tempdir()
        .map_err(|source| AgentError::Network { what: "cannot create a private directory for sockets".into(), source })
}
