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

/// The whole machine's CPU time so far, all cores (the first line of /proc/stat).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct MachineCpu {
    /// user + nice + system + irq + softirq (guest time is inside user).
    pub busy_ms: f64,
    /// Time the hypervisor ran something else while a vCPU of this machine wanted to run.
    pub steal_ms: f64,
}

impl MachineCpu {
    pub fn now() -> Option<MachineCpu> {
        MachineCpu::parse(&std::fs::read_to_string("/proc/stat").ok()?, clk_tck())
    }

    fn parse(stat: &str, hz: f64) -> Option<MachineCpu> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let f: Vec<f64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0.0)).collect();
        let at = |i: usize| f.get(i).copied().unwrap_or(0.0);
        let ms = 1000.0 / hz;
        Some(MachineCpu { busy_ms: (at(0) + at(1) + at(2) + at(5) + at(6)) * ms, steal_ms: at(7) * ms })
    }
}

/// What else the machine did while a leg migrated: a benchmark's times mean something only on an
/// otherwise idle machine, so every run records this and a busy one is flagged.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Noise {
    /// CPU time of processes that are not the leg's (not the bench, its QEMUs or its migrator).
    pub other_cpu_ms: f64,
    /// CPU time the hypervisor stole from this machine.
    pub steal_ms: f64,
    /// The leg's wall time and the machine's cores: the CPU time there was.
    pub window_ms: f64,
    pub cores: u32,
    /// MB/s at which the machine handed out fresh memory just before the leg ([`fresh_memory`]).
    #[serde(default)]
    pub fresh_mb_per_s: Option<f64>,
}

impl Noise {
    /// Other work above 10 % of the machine's CPU time, or steal above 5 %.
    pub fn busy(&self) -> bool {
        let there = self.window_ms * f64::from(self.cores.max(1));
        there > 0.0 && (self.other_cpu_ms > 0.10 * there || self.steal_ms > 0.05 * there)
    }
}

/// MB/s at which this machine hands out `mib` MiB of memory no process had (allocated, every byte
/// written, freed). A migration's destination takes all its memory fresh, so this bounds it: on a
/// VM whose host takes freed pages back (free page reporting, as on this machine), the host must
/// find and clear each page again, and that cost varies with the host's state by 10x and more.
pub(crate) fn fresh_memory(mib: usize) -> Option<f64> {
    let t = Instant::now();
    let v = std::hint::black_box(vec![1u8; mib << 20]);
    drop(v);
    let s = t.elapsed().as_secs_f64();
    (s > 0.0).then(|| (mib << 20) as f64 / s / 1e6)
}

/// Starts at a leg's beginning: the machine's CPU and that of the leg's own processes.
#[derive(Debug)]
pub(crate) struct NoiseProbe {
    machine: Option<MachineCpu>,
    ours: f64,
    pids: Vec<u32>,
    fresh: Option<f64>,
    t0: Instant,
}

impl NoiseProbe {
    /// `pids`: the leg's long-lived processes (both QEMUs); the bench itself is added.
    pub fn start(pids: &[u32]) -> NoiseProbe {
        let mut pids = pids.to_vec();
        pids.push(std::process::id());
        let fresh = fresh_memory(256);
        let ours = pids.iter().filter_map(|p| process_cpu_ms(*p)).sum();
        NoiseProbe { machine: MachineCpu::now(), ours, pids, fresh, t0: Instant::now() }
    }

    /// `children_ms`: CPU of the leg's processes that started and ended inside it (`send`,
    /// `receive`, from wait4).
    pub fn finish(&self, children_ms: f64) -> Option<Noise> {
        let m0 = self.machine?;
        let m1 = MachineCpu::now()?;
        let ours: f64 = self.pids.iter().filter_map(|p| process_cpu_ms(*p)).sum::<f64>() - self.ours + children_ms;
        let cores = std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
        Some(Noise {
            other_cpu_ms: (m1.busy_ms - m0.busy_ms - ours).max(0.0),
            steal_ms: (m1.steal_ms - m0.steal_ms).max(0.0),
            window_ms: self.t0.elapsed().as_secs_f64() * 1000.0,
            cores,
            fresh_mb_per_s: self.fresh,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_cpu_reads_busy_and_steal_from_proc_stat() {
        let s = "cpu  100 5 50 1000 7 3 2 40 0 0\ncpu0 50 2 25 500 3 1 1 20 0 0\nintr 1\n";
        let m = MachineCpu::parse(s, 100.0).expect("parsed");
        assert_eq!(m, MachineCpu { busy_ms: 1600.0, steal_ms: 400.0 });
        assert_eq!(MachineCpu::parse("intr 1\n", 100.0), None);
    }

    #[test]
    fn a_run_is_busy_above_a_tenth_of_other_work_or_a_twentieth_of_steal() {
        let quiet = Noise { other_cpu_ms: 1900.0, steal_ms: 900.0, window_ms: 10_000.0, cores: 2, fresh_mb_per_s: None };
        assert!(!quiet.busy());
        assert!(Noise { other_cpu_ms: 2100.0, ..quiet }.busy());
        assert!(Noise { steal_ms: 1100.0, ..quiet }.busy());
    }
}
