//! The live progress line on a terminal, and plain lines elsewhere.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use livemig_agent::{Observer, Progress};

/// Prints progress to stderr: a line rewritten in place on a terminal, one line per iteration
/// and phase everywhere.
#[derive(Debug)]
pub struct LiveLine {
    tty: bool,
    start: Instant,
    last_draw: Option<Instant>,
    role: &'static str,
    dirty_line: bool,
}

impl LiveLine {
    /// For the given role (`send` / `receive`).
    pub fn new(role: &'static str) -> Self {
        LiveLine { tty: std::io::stderr().is_terminal(), start: Instant::now(), last_draw: None, role, dirty_line: false }
    }

    fn line(&mut self, s: &str) {
        let mut e = std::io::stderr().lock();
        if self.dirty_line {
            let _ = write!(e, "\r\x1b[2K");
            self.dirty_line = false;
        }
        let _ = writeln!(e, "[{} {:>6.1}s] {s}", self.role, self.start.elapsed().as_secs_f64());
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl Observer for LiveLine {
    fn progress(&mut self, p: Progress<'_>) {
        match p {
            Progress::Phase(s) => self.line(s),
            Progress::Listening(a) => self.line(&format!("listening on {a}")),
            Progress::Sending { iteration, sent, dirty, wire_bytes } => {
                if !self.tty {
                    return;
                }
                let now = Instant::now();
                if self.last_draw.is_some_and(|t| now.duration_since(t).as_millis() < 100) && sent < dirty {
                    return;
                }
                self.last_draw = Some(now);
                let secs = self.start.elapsed().as_secs_f64().max(1e-3);
                let mut e = std::io::stderr().lock();
                let _ = write!(
                    e,
                    "\r\x1b[2K[{} {:>6.1}s] iteration {iteration}: {sent}/{dirty} pages, remaining {}, wire {:.1} MiB, avg {:.1} MiB/s",
                    self.role,
                    secs,
                    dirty - sent.min(dirty),
                    mib(wire_bytes),
                    mib(wire_bytes) / secs
                );
                let _ = e.flush();
                self.dirty_line = true;
            }
            Progress::Iteration(r) => {
                let s = &r.stats;
                let pred = r.predicted_downtime_ms.map(|p| format!(", predicted downtime {p:.0} ms")).unwrap_or_default();
                let msg = format!(
                    "iteration {}{}: {} dirty, {} sent, {:.2} MiB in {:.0} ms ({:.1} MiB/s) -> {}{pred}",
                    s.index,
                    if r.last { " (final, source paused)" } else { "" },
                    s.dirty_pages,
                    s.sent_pages,
                    mib(s.wire_bytes),
                    s.duration_ms,
                    s.rate_bytes_per_s / (1024.0 * 1024.0),
                    r.decision
                );
                self.line(&msg);
            }
        }
    }
}
