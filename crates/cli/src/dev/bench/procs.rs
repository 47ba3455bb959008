//! Child processes with their CPU time, CPU time of running processes and threads, and the
//! comparison of two paused VMs' RAM (through `livemig_lab::ram`).
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use livemig_lab::ram::{RamDiff, RamView};
use livemig_qmp::Qmp;

/// Clock ticks per second of /proc/PID/stat.
fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions and touches no memory of ours.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime in ms of `/proc/<pid>/stat` or `/proc/<pid>/task/<tid>/stat` (a whole process's
/// figures include its threads that already exited).
pub(crate) fn stat_cpu_ms(path: &Path) -> Option<f64> {
    let s = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) * 1000.0 / clk_tck())
}

/// CPU ms of process `pid`.
pub(crate) fn process_cpu_ms(pid: u32) -> Option<f64> {
    stat_cpu_ms(&PathBuf::from(format!("/proc/{pid}/stat")))
}

/// CPU ms of thread `tid` of process `pid`.
pub(crate) fn thread_cpu_ms(pid: u32, tid: u64) -> Option<f64> {
    stat_cpu_ms(&PathBuf::from(format!("/proc/{pid}/task/{tid}/stat")))
}

/// A child process reaped with `wait4`, so its CPU time (utime + stime, rusage) is known.
/// Dropping it before it exited kills it (SIGKILL) and reaps it.
#[derive(Debug)]
pub(crate) struct Proc {
    pid: libc::pid_t,
    done: Option<(i32, f64)>,
    _child: Child,
}

impl Proc {
    pub fn new(child: Child) -> Proc {
        let pid = libc::pid_t::try_from(child.id()).unwrap_or(0);
        Proc { pid, done: None, _child: child }
    }

    /// Polls once: `Some((exit code, cpu ms))` once it exited (code -signal if killed).
    pub fn try_wait(&mut self) -> Option<(i32, f64)> {
        if self.done.is_some() {
            return self.done;
        }
        self.wait4(libc::WNOHANG)
    }

    fn wait4(&mut self, flags: libc::c_int) -> Option<(i32, f64)> {
        let mut status: libc::c_int = 0;
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: status and ru point to writable memory of the right types; pid is our child,
        // reaped only here (std's Child is never waited on).
        let r = unsafe { libc::wait4(self.pid, &mut status, flags, ru.as_mut_ptr()) };
        if r != self.pid {
            return None;
        }
        // SAFETY: wait4 returned the pid, so it filled `ru` (and it was zeroed before).
        let ru = unsafe { ru.assume_init() };
        let tv = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
        let cpu = tv(ru.ru_utime) + tv(ru.ru_stime);
        let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -libc::WTERMSIG(status) };
        self.done = Some((code, cpu));
        self.done
    }

    /// Sends `sig` if it still runs.
    pub fn signal(&self, sig: libc::c_int) {
        if self.done.is_none() && self.pid > 0 {
            // SAFETY: kill has no memory effects; the pid is our unreaped child.
            unsafe {
                libc::kill(self.pid, sig);
            }
        }
    }

    /// Waits up to `limit` (or until `cancel`); `None` if it still runs.
    pub fn wait_for(&mut self, limit: Duration, cancel: &AtomicBool) -> Option<(i32, f64)> {
        let t0 = Instant::now();
        loop {
            if let Some(r) = self.try_wait() {
                return Some(r);
            }
            if t0.elapsed() > limit || cancel.load(Ordering::SeqCst) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, a grace period, then SIGKILL; returns the exit and CPU time.
    pub fn stop(&mut self, grace: Duration) -> (i32, f64) {
        if let Some(r) = self.done {
            return r;
        }
        self.signal(libc::SIGTERM);
        let never = AtomicBool::new(false);
        if let Some(r) = self.wait_for(grace, &never) {
            return r;
        }
        self.signal(libc::SIGKILL);
        self.wait4(0).unwrap_or((-9, 0.0))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.done.is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.wait4(0);
        }
    }
}

/// Compares the guest RAM of two paused QEMU processes page by page.
pub(crate) fn compare_ram(qa: &mut Qmp, pid_a: u32, qb: &mut Qmp, pid_b: u32) -> anyhow::Result<RamDiff> {
    let open = |q: &mut Qmp, pid: u32| -> anyhow::Result<RamView> {
        let (hva, len) = q.ram_location()?;
        RamView::open(pid, hva, len).with_context(|| format!("cannot open the RAM of QEMU {pid}"))
    };
    let (a, b) = (open(qa, pid_a)?, open(qb, pid_b)?);
    Ok(livemig_lab::ram::compare(&a, &b)?)
}
