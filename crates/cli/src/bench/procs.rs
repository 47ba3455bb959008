//! Child processes with their CPU time, CPU time of running processes and threads, and the
//! comparison of two paused VMs' RAM (any backend: found through QEMU itself).
#![allow(unsafe_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use livemig_qmp::Qmp;
use serde_json::{json, Value};

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

/// The guest RAM of a paused QEMU process, readable with `read_exact_at(buf, base + offset)`:
/// whatever backs it (a shared file, a memfd, or plain private `-m` RAM).
#[derive(Debug)]
pub(crate) struct RamView {
    file: File,
    base: u64,
    pub(crate) len: u64,
    /// How it is read, for messages: `file <path>` or `/proc/<pid>/mem`.
    pub(crate) how: String,
}

impl RamView {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, self.base + off)
    }
}

/// Host virtual address of guest physical address 0 (the start of the main RAM block: `pc.ram`
/// or the memory backend), from HMP's `gpa2hva`.
fn ram_hva(q: &mut Qmp) -> anyhow::Result<u64> {
    let out = q.execute("human-monitor-command", Some(json!({"command-line": "gpa2hva 0"})))?;
    let s = out.as_str().unwrap_or("").trim();
    // "Host virtual address for 0x0 (pc.ram) is 0x7f0437e00000"
    let hex = s.rsplit(' ').next().and_then(|w| w.strip_prefix("0x")).with_context(|| format!("unexpected gpa2hva answer {s:?}"))?;
    u64::from_str_radix(hex, 16).with_context(|| format!("unexpected gpa2hva answer {s:?}"))
}

/// The RAM of QEMU process `pid` (QMP `q`): its size from `query-memory-size-summary`, its
/// address from `gpa2hva 0`, then the mapping of /proc/PID/maps that holds it. A file mapping
/// (memory-backend-file, memfd) is read from the file (`/proc/PID/map_files/...`: a read of
/// a hole allocates nothing); private RAM is read through `/proc/PID/mem` (the process must be
/// paused; a never-touched page reads as zero without being allocated).
pub(crate) fn open_ram(q: &mut Qmp, pid: u32) -> anyhow::Result<RamView> {
    let sum = q.execute("query-memory-size-summary", None)?;
    let len = sum.get("base-memory").and_then(Value::as_u64).context("query-memory-size-summary has no base-memory")?;
    let hva = ram_hva(q)?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).with_context(|| format!("cannot read /proc/{pid}/maps"))?;
    for line in maps.lines() {
        // start-end perms offset dev inode [path]
        let f: Vec<&str> = line.splitn(6, ' ').collect();
        let Some((lo, hi)) = f.first().and_then(|r| r.split_once('-')) else { continue };
        let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) else { continue };
        if hva < lo || hva >= hi {
            continue;
        }
        let inode = f.get(4).copied().unwrap_or("0");
        let path = f.get(5).map_or("", |p| p.trim());
        if inode != "0" && hi - hva >= len {
            let off = u64::from_str_radix(f.get(2).copied().unwrap_or("0"), 16).unwrap_or(0);
            let mf = format!("/proc/{pid}/map_files/{lo:x}-{hi:x}");
            let file = File::open(&mf).with_context(|| format!("cannot open {mf} ({path})"))?;
            return Ok(RamView { file, base: off + (hva - lo), len, how: format!("file {path}") });
        }
        let mem = format!("/proc/{pid}/mem");
        let file = File::open(&mem).with_context(|| format!("cannot open {mem}"))?;
        return Ok(RamView { file, base: hva, len, how: mem });
    }
    bail!("QEMU {pid}: no mapping of /proc/{pid}/maps holds its RAM at {hva:#x}")
}

/// Pages that differ between two RAMs: how many, and the first few with the byte range that
/// differs in each (what a reader needs to tell a guest page from a hypervisor-owned one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RamDiff {
    pub(crate) differ: u64,
    pub(crate) pages: u64,
    /// Pages of the source that are not all zero (shows that real guest memory was compared).
    pub(crate) nonzero: u64,
    /// (page, first differing byte, last differing byte), at most 4.
    pub(crate) first: Vec<(u64, usize, usize)>,
}

impl std::fmt::Display for RamDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of {} pages ({} non-zero) differ between paused source and destination", self.differ, self.pages, self.nonzero)?;
        if !self.first.is_empty() {
            let list: Vec<String> = self.first.iter().map(|(p, a, b)| format!("page {p:#x} bytes {a:#x}..={b:#x}")).collect();
            write!(f, " ({}{})", list.join(", "), if self.differ > self.first.len() as u64 { ", ..." } else { "" })?;
        }
        Ok(())
    }
}

impl RamDiff {
    /// On KVM, one page per vCPU differs in its first 12 bytes after every QEMU native migration:
    /// KVM's own steal-time record (`u64 steal; u32 version`), which the host kernel updates
    /// when a vCPU is scheduled, not the guest. A difference is that record's only when it has
    /// at most `vcpus` pages, each differing only within its first 16 bytes.
    pub(crate) fn only_kvm_records(&self, vcpus: u64) -> bool {
        self.differ > 0 && self.differ <= vcpus && self.first.len() as u64 == self.differ && self.first.iter().all(|&(_, _, hi)| hi < 16)
    }
}

/// Compares the guest RAM of two paused QEMU processes page by page.
pub(crate) fn compare_ram(qa: &mut Qmp, pid_a: u32, qb: &mut Qmp, pid_b: u32) -> anyhow::Result<RamDiff> {
    let (a, b) = (open_ram(qa, pid_a)?, open_ram(qb, pid_b)?);
    let (la, lb) = (a.len, b.len);
    if la != lb {
        bail!("RAM sizes differ: {la} and {lb} bytes");
    }
    const CHUNK: usize = 1 << 20;
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut diff = RamDiff { pages: la / 4096, ..RamDiff::default() };
    let mut off = 0u64;
    while off < la {
        let n = usize::try_from((la - off).min(CHUNK as u64))?;
        a.read_at(&mut ba[..n], off).with_context(|| format!("reading source RAM ({}) at {off:#x}", a.how))?;
        b.read_at(&mut bb[..n], off).with_context(|| format!("reading destination RAM ({}) at {off:#x}", b.how))?;
        diff.nonzero += ba[..n].chunks(4096).filter(|p| p.iter().any(|&x| x != 0)).count() as u64;
        if ba[..n] != bb[..n] {
            for (i, (x, y)) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)).enumerate() {
                if x == y {
                    continue;
                }
                diff.differ += 1;
                if diff.first.len() < 4 {
                    let lo = x.iter().zip(y).position(|(p, q)| p != q).unwrap_or(0);
                    let hi = x.iter().zip(y).rposition(|(p, q)| p != q).unwrap_or(0);
                    diff.first.push((off / 4096 + i as u64, lo, hi));
                }
            }
        }
        off += n as u64;
    }
    Ok(diff)
}
