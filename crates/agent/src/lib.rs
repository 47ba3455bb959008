//! The `send` and `receive` agents: wire the parts together, own failure handling and reports.

pub mod error;
pub mod link;
pub mod receive;
pub mod report;
pub mod send;

use std::path::{Path, PathBuf};

use livemig_memory::{GuestMemory, PageBuf};
use livemig_track::{PageSource, SourceError, PAGE_SIZE};

pub use error::AgentError;
pub use receive::{receive, ReceiveOptions};
pub use report::{IterationRecord, Report};
pub use send::{send, PolicyKind, SendOptions};

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

/// Guest memory as a page source for the trackers.
pub(crate) struct MemSource<'a>(pub &'a GuestMemory);

impl PageSource for MemSource<'_> {
    fn total_pages(&self) -> u64 {
        self.0.total_pages()
    }
    fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError> {
        let mut b = PageBuf::zeroed();
        self.0.read_page(page, &mut b)?;
        buf.copy_from_slice(&b.0);
        Ok(())
    }
}

/// A private directory for sockets, removed on drop.
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Result<TempDir, AgentError> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!("livemig-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&p)
            .map_err(|source| AgentError::Network { what: format!("cannot create {}", p.display()), source })?;
        Ok(TempDir(p))
    }
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
