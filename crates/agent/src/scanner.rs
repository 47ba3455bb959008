//! Which tracker finds the dirty pages: `content` (hash every page; any kernel) or `soft-dirty`
//! (the QEMU process's page-table bits; needs CONFIG_MEM_SOFT_DIRTY, proven by a self-test).

use std::time::{Duration, Instant};

use livemig_memory::GuestMemory;
use livemig_track::softdirty::{guest_ram_ranges, SoftDirty, SoftDirtyError, SoftDirtyTracker};
use livemig_track::{ContentTracker, Ledger, PageSource, ScanResult, Tracker};

use crate::error::AgentError;
use crate::throttle;

/// The tracker an operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackerKind {
    /// Soft-dirty where the kernel proves it tracks, else content.
    Auto,
    /// Hash every page every iteration.
    Content,
    /// Soft-dirty bits of the QEMU process; refused where the kernel does not track them.
    SoftDirty,
}

/// The tracker in use.
pub(crate) enum Scanner {
    Content(ContentTracker),
    SoftDirty { sd: Box<SoftDirtyTracker>, content: ContentTracker },
}

fn soft_dirty_for(mem: &GuestMemory) -> Result<SoftDirtyTracker, SoftDirtyError> {
    SoftDirty::probe()?;
    let pid = mem.pid.ok_or(SoftDirtyError::Coverage { covered: 0, ledger: mem.total_pages() })?;
    let mut ranges = Vec::new();
    let mut first = 0;
    for r in &mem.regions {
        let (dev, ino) = r.file_id();
        ranges.extend(guest_ram_ranges(pid, dev, ino, first)?.into_iter().map(|x| (x.host_va, x.len, x.first_guest_page)));
        first += r.pages();
    }
    let t = SoftDirtyTracker::new(pid, ranges)?;
    if t.covered_pages() != mem.total_pages() {
        return Err(SoftDirtyError::Coverage { covered: t.covered_pages(), ledger: mem.total_pages() });
    }
    Ok(t)
}

impl Scanner {
    /// The tracker for `kind`; with `Auto`, a refused soft-dirty falls back to content and the
    /// reason is returned for the log.
    pub(crate) fn new(kind: TrackerKind, mem: &GuestMemory, threads: usize) -> Result<(Scanner, Option<String>), AgentError> {
        let content = ContentTracker::new(threads);
        match kind {
            TrackerKind::Content => Ok((Scanner::Content(content), None)),
            TrackerKind::SoftDirty => match soft_dirty_for(mem) {
                Ok(sd) => Ok((Scanner::SoftDirty { sd: Box::new(sd), content }, None)),
                Err(e) => Err(AgentError::SoftDirty(e)),
            },
            TrackerKind::Auto => match soft_dirty_for(mem) {
                Ok(sd) => Ok((Scanner::SoftDirty { sd: Box::new(sd), content }, None)),
                Err(e) => Ok((Scanner::Content(content), Some(format!("soft-dirty tracker not usable ({e}): using the content tracker")))),
            },
        }
    }

    /// Name for reports.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Scanner::Content(_) => "content",
            Scanner::SoftDirty { .. } => "soft-dirty",
        }
    }

    /// The pages dirty since the previous scan. Soft-dirty bits are read and cleared with the
    /// guest paused (unless `paused` already): the pause is returned. The QMP lock is held
    /// throughout, so the throttler cannot resume the guest in between.
    pub(crate) fn scan(
        &mut self,
        src: &dyn PageSource,
        ledger: &Ledger,
        qmp: &std::sync::Mutex<livemig_qmp::Qmp>,
        paused: bool,
    ) -> Result<(ScanResult, Option<Duration>), AgentError> {
        match self {
            Scanner::Content(c) => Ok((c.scan(src, ledger)?, None)),
            Scanner::SoftDirty { sd, content } => {
                let first = !sd.started();
                if first || paused {
                    return Ok((sd.scan(content, src, ledger).map_err(AgentError::SoftDirty)?, None));
                }
                let mut q = throttle::lock(qmp);
                let t = Instant::now();
                q.stop().map_err(AgentError::qmp("cannot pause the source VM to read its dirty bits"))?;
                let r = sd.scan(content, src, ledger);
                let resumed = q.cont();
                let pause = t.elapsed();
                resumed.map_err(AgentError::qmp("cannot resume the source VM after reading its dirty bits"))?;
                Ok((r.map_err(AgentError::SoftDirty)?, Some(pause)))
            }
        }
    }
}
