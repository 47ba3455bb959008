//! `livemig-dev bench`: livemig against QEMU's own migration, same guest, same shaped link.
//!
//! Two network namespaces ("hosts") joined by a veth pair shaped with `tc` (tbf; netem for a delay); the source
//! QEMU and `livemig send` run in one, the destination QEMU and `livemig receive` in the other.
//! Every run checks the guest afterwards and is marked `ok`, `corrupt`, `timeout` or `failed`.
//! Writes `BENCHMARKS.md`, `bench/results.json` and SVG plots.

mod legs;
mod net;
mod procs;
mod report;
mod tls;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use livemig_lab::{GuestImage, RamBackend, Vm, VmConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{signal, units};
use legs::{Leg, LegCtx, LegEnd, WriteRate};
use net::Hosts;
use tls::TlsFiles;

/// What the guest does.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Scenario {
    /// Only a heartbeat.
    Idle,
    /// Rewrites a working set (--hot-mib) flat out, self-checking pages.
    Hot,
    /// Reads --cache-mib of its root disk (page cache), then rewrites 8 MiB at 1 MiB/s.
    Cache,
    /// The cache guest migrated A->B, run --return-after, migrated back B->A (figures of the way back).
    Return,
    /// A --large-mib guest (4 GiB; a list runs one per size) that writes 70 % of its RAM once,
    /// then keeps rewriting it slowly (--large-rate).
    Large,
}

/// Who migrates.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Migrator {
    /// QEMU's migration, defaults but downtime-limit = --max-downtime and max-bandwidth (and
    /// avail-switchover-bandwidth, QEMU >= 8.2) = the link rate.
    QemuDefault,
    /// qemu-default plus multifd (zstd), auto-converge and xbzrle, where QEMU accepts them together.
    QemuTuned,
    /// livemig send/receive, shared engine, --policy fixed --max-downtime (= QEMU's rule).
    LivemigFixed,
    /// livemig send/receive, shared engine, --policy adaptive --max-downtime.
    LivemigAdaptive,
    /// livemig send/receive, stream engine (QEMU's own pre-copy relayed), --policy adaptive
    /// --max-downtime.
    LivemigStream,
    /// qemu-default with a 2 s downtime-limit (the pair of livemig-adaptive-2s).
    #[value(name = "qemu-default-2s")]
    #[serde(rename = "qemu-default-2s")]
    QemuDefault2s,
    /// livemig send/receive, shared engine, --policy adaptive --max-downtime 2s.
    #[value(name = "livemig-adaptive-2s")]
    #[serde(rename = "livemig-adaptive-2s")]
    LivemigAdaptive2s,
    /// livemig send/receive, stream engine, --policy adaptive --max-downtime 2s.
    #[value(name = "livemig-stream-2s")]
    #[serde(rename = "livemig-stream-2s")]
    LivemigStream2s,
}

impl Migrator {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Migrator::QemuDefault => "qemu-default",
            Migrator::QemuTuned => "qemu-tuned",
            Migrator::LivemigFixed => "livemig-fixed",
            Migrator::LivemigAdaptive => "livemig-adaptive",
            Migrator::LivemigStream => "livemig-stream",
            Migrator::QemuDefault2s => "qemu-default-2s",
            Migrator::LivemigAdaptive2s => "livemig-adaptive-2s",
            Migrator::LivemigStream2s => "livemig-stream-2s",
        }
    }
    /// The livemig engine it runs (`--engine`), for livemig migrators.
    pub(crate) fn engine(self) -> &'static str {
        match self {
            Migrator::LivemigStream | Migrator::LivemigStream2s => "stream",
            _ => "shared",
        }
    }
    pub(crate) fn is_qemu(self) -> bool {
        matches!(self, Migrator::QemuDefault | Migrator::QemuTuned | Migrator::QemuDefault2s)
    }
    /// Its maximum downtime: --max-downtime, or 2 s for the `-2s` pair.
    pub(crate) fn max_downtime(self, a: &BenchArgs) -> &str {
        match self {
            Migrator::QemuDefault2s | Migrator::LivemigAdaptive2s | Migrator::LivemigStream2s => LONG_DOWNTIME,
            _ => &a.max_downtime,
        }
    }
}

/// The maximum downtime of qemu-default-2s and livemig-adaptive-2s.
const LONG_DOWNTIME: &str = "2s";

/// The migrators of the default plan on every scenario and link.
const MAIN_MIGRATORS: [Migrator; 5] =
    [Migrator::QemuDefault, Migrator::QemuTuned, Migrator::LivemigFixed, Migrator::LivemigAdaptive, Migrator::LivemigStream];

/// Below this link rate (bytes/s) the default plan adds the `-2s` pair to the hot scenario.
const SLOW_LINK: u64 = 60_000_000;

impl Scenario {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Hot => "hot",
            Scenario::Cache => "cache",
            Scenario::Return => "return",
            Scenario::Large => "large",
        }
    }
    fn writes(self) -> bool {
        self != Scenario::Idle
    }
}

#[derive(Args, Debug, Clone)]
pub(crate) struct BenchArgs {
    /// Scenario(s) to run (repeat). Default: the default plan (see --help of --link).
    #[arg(long = "scenario", value_enum)]
    scenarios: Vec<Scenario>,
    /// Link rate(s) as tc reads them (repeat), e.g. 1gbit, 100mbit, or `unshaped` (no qdisc:
    /// the veth pair as fast as the CPUs move it; QEMU's max-bandwidth 10 GB/s and no
    /// avail-switchover-bandwidth, so QEMU estimates the rate as it does by default). Without
    /// --scenario and --link the default plan runs every scenario at 1gbit and `hot` at 100mbit
    /// (see --dry-run for its duration); with only one of them given, the other defaults to all
    /// scenarios / both links.
    #[arg(long = "link")]
    links: Vec<String>,
    /// Connections of the shared engine's migrators (`livemig send --connections`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    connections: u32,
    /// One-way delay added on each side of the link (e.g. 5ms; default none).
    #[arg(long, value_parser = units::parse_duration_ms)]
    delay: Option<f64>,
    /// Migrator(s) (repeat). Default: qemu-default, qemu-tuned, livemig-fixed and
    /// livemig-adaptive everywhere, plus qemu-default-2s and livemig-adaptive-2s on `hot` at
    /// links under 480 Mbit/s (where 300 ms does not converge).
    #[arg(long = "migrator", value_enum)]
    migrators: Vec<Migrator>,
    /// Runs of each scenario x link x migrator.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    mem_mib: u64,
    /// Working set of the hot guest, MiB.
    #[arg(long, default_value_t = 16)]
    hot_mib: u64,
    /// How much of its root disk the cache guest reads, MiB.
    #[arg(long, default_value_t = 256)]
    cache_mib: u64,
    /// RAM of the `large` guest, MiB (it writes 70 % of it once). A comma-separated list (e.g.
    /// 1024,2048,4096) runs `large` once per size in the same bench, smallest first; its
    /// timeout (--large-timeout) and time estimates, given for 4096, scale linearly with the size.
    #[arg(long, value_delimiter = ',', default_value = "4096", value_parser = parse_large_mib)]
    large_mib: Vec<u64>,
    /// How fast the `large` guest keeps rewriting its working set afterwards, MiB/s.
    #[arg(long, default_value_t = 2)]
    large_rate: u64,
    /// The maximum downtime of every migrator but the `-2s` pair: QEMU's downtime-limit,
    /// livemig's --max-downtime (fixed and adaptive).
    #[arg(long, default_value = "300ms")]
    max_downtime: String,
    /// TLS on both sides (the default): livemig with `livemig certs` certificates, QEMU with
    /// tls-creds-x509 objects.
    #[arg(long, overrides_with = "no_tls")]
    tls: bool,
    /// Plain TCP for every migrator (livemig --insecure, QEMU without tls-creds).
    #[arg(long, overrides_with = "tls")]
    no_tls: bool,
    /// A migration not finished after this is stopped and marked `timeout`.
    #[arg(long, default_value = "60s", value_parser = units::parse_duration_ms)]
    timeout: f64,
    /// The same for the `large` scenario, for a 4096 MiB guest: other --large-mib sizes get it
    /// scaled linearly (2048: half), but never less than --timeout (or this, if it is less).
    #[arg(long, default_value = "240s", value_parser = units::parse_duration_ms)]
    large_timeout: f64,
    /// `return`: how long the guest runs on B before it goes back.
    #[arg(long, default_value = "5s", value_parser = units::parse_duration_ms)]
    return_after: f64,
    /// Verifier passes the destination guest must report after a migration of a writing guest.
    #[arg(long, default_value_t = 2)]
    passes: usize,
    /// Where BENCHMARKS.md goes; results.json and plots go to <out>/bench/.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Scratch directory for consoles, logs, reports (default /tmp/livemig-bench-<pid>).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Print the plan and its estimated duration, run nothing.
    #[arg(long)]
    dry_run: bool,
    /// Run nothing: regenerate BENCHMARKS.md and the plots from this results.json (the header
    /// then shows this invocation's options).
    #[arg(long)]
    from_json: Option<PathBuf>,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mark {
    Ok,
    Corrupt,
    Timeout,
    Failed,
}

impl Mark {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mark::Ok => "ok",
            Mark::Corrupt => "corrupt",
            Mark::Timeout => "timeout",
            Mark::Failed => "failed",
        }
    }
}

/// One run, as written to results.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RunResult {
    pub scenario: Scenario,
    pub link: String,
    pub migrator: Migrator,
    pub run: usize,
    /// The guest's RAM, MiB (`--mem-mib`, or this run's `--large-mib` size). 0 in results.json
    /// files written before it was recorded: [`fill_mem`] gives those their run's options.
    #[serde(default)]
    pub mem_mib: u64,
    pub mark: Mark,
    pub detail: String,
    pub total_ms: Option<f64>,
    pub downtime_ms: Option<f64>,
    pub wire_bytes: Option<u64>,
    pub wire_back_bytes: Option<u64>,
    pub cpu_ms: Option<f64>,
    pub differing_pages: Option<u64>,
    pub verify_passes: Option<usize>,
    pub bad_pages: Option<u64>,
    /// Guest writes/s on the source before the migration and during it (verifier lines).
    pub guest_rate_before: Option<f64>,
    pub guest_rate_during: Option<f64>,
    /// Other work and steal on the machine during the migration (absent in older files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise: Option<procs::Noise>,
    pub settings: Vec<String>,
    pub wall_s: f64,
    pub workdir: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_report: Option<Value>,
}

impl RunResult {
    /// A run marked `failed` with nothing measured yet.
    fn failed(c: &Case, migrator: Migrator, run: usize, detail: String, workdir: PathBuf) -> RunResult {
        RunResult {
            scenario: c.s,
            link: c.link.clone(),
            migrator,
            run,
            mem_mib: c.mib,
            mark: Mark::Failed,
            detail,
            total_ms: None,
            downtime_ms: None,
            wire_bytes: None,
            wire_back_bytes: None,
            cpu_ms: None,
            differing_pages: None,
            verify_passes: None,
            bad_pages: None,
            guest_rate_before: None,
            guest_rate_during: None,
            noise: None,
            settings: Vec::new(),
            wall_s: 0.0,
            workdir,
            send_report: None,
        }
    }
}

impl BenchArgs {
    /// TLS on both sides (`--no-tls`: neither).
    pub(crate) fn tls_on(&self) -> bool {
        !self.no_tls
    }
    /// The migration timeout of scenario `s` with a `mib` guest, ms: `large`: --large-timeout
    /// (meant for [`LARGE_REF_MIB`]) scaled linearly with the size, at least --timeout (or
    /// --large-timeout itself if that is shorter, so 4096 MiB gets exactly --large-timeout).
    pub(crate) fn timeout_for(&self, s: Scenario, mib: u64) -> f64 {
        if s == Scenario::Large {
            (self.large_timeout * large_scale(mib)).max(self.timeout.min(self.large_timeout))
        } else {
            self.timeout
        }
    }
    /// The `large` guest sizes, MiB: --large-mib ascending, each once.
    pub(crate) fn large_sizes(&self) -> Vec<u64> {
        let mut v = self.large_mib.clone();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// The `large` guest's buffer: 70 % of its RAM (`mib`).
pub(crate) fn large_touch_mib(mib: u64) -> u64 {
    mib.saturating_mul(7) / 10
}

/// The `large` guest size the `large` figures were measured at (LARGE_* constants,
/// --large-timeout's meaning, the wait for its first verifier passes), MiB.
const LARGE_REF_MIB: u64 = 4096;

/// A `mib` guest against [`LARGE_REF_MIB`]: the factor the `large` figures are scaled by
/// (linearly: filling, copying and migrating RAM all go by its size).
fn large_scale(mib: u64) -> f64 {
    mib as f64 / LARGE_REF_MIB as f64
}

/// One --large-mib value: whole MiB above 0.
fn parse_large_mib(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("a guest needs RAM: give MiB above 0, e.g. 4096 or a list 1024,2048,4096".into()),
        Ok(v) => Ok(v),
        Err(_) => Err(format!("`{s}` is not a whole number of MiB: give e.g. 4096 or a list 1024,2048,4096")),
    }
}

/// One scenario at one link, with its guest's RAM: `large` is one case per --large-mib size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Case {
    pub s: Scenario,
    /// Guest RAM, MiB.
    pub mib: u64,
    pub link: String,
}

impl Case {
    fn label(&self) -> String {
        case_label(self.s, self.mib)
    }
    fn tag(&self) -> String {
        case_tag(self.s, self.mib)
    }
}

/// A size for people: `4 GiB`, `768 MiB`.
pub(crate) fn size_label(mib: u64) -> String {
    if mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// The scenario as the tables show it: `large` with its size (`large 1 GiB`), the others by name.
pub(crate) fn case_label(s: Scenario, mib: u64) -> String {
    if s == Scenario::Large {
        format!("large {}", size_label(mib))
    } else {
        s.name().to_string()
    }
}

/// The same for file and directory names: `large-1024`, `idle`.
pub(crate) fn case_tag(s: Scenario, mib: u64) -> String {
    if s == Scenario::Large {
        format!("large-{mib}")
    } else {
        s.name().to_string()
    }
}

/// Fills in `mem_mib` of runs from a results.json written before it was recorded, from that
/// run's command line: `large` its single --large-mib (else 4096), the others its --mem-mib
/// (else 512).
pub(crate) fn fill_mem(runs: &mut [RunResult], command: &str) {
    let words: Vec<&str> = command.split_whitespace().collect();
    let opt = |name: &str| -> Option<String> {
        let eq = format!("{name}=");
        words.iter().enumerate().find_map(|(i, w)| {
            if *w == name {
                words.get(i + 1).map(|v| (*v).to_string())
            } else {
                w.strip_prefix(&eq).map(str::to_string)
            }
        })
    };
    let large = opt("--large-mib").and_then(|v| v.parse::<u64>().ok()).filter(|v| *v > 0).unwrap_or(LARGE_REF_MIB);
    let mem = opt("--mem-mib").and_then(|v| v.parse::<u64>().ok()).filter(|v| *v > 0).unwrap_or(512);
    for r in runs.iter_mut().filter(|r| r.mem_mib == 0) {
        r.mem_mib = if r.scenario == Scenario::Large { large } else { mem };
    }
}

fn is_slow(link: &str) -> bool {
    link_rate(link).is_ok_and(|b| b < SLOW_LINK)
}

/// `--link unshaped`: no qdisc.
pub(crate) const UNSHAPED: &str = "unshaped";

/// QEMU's max-bandwidth on an unshaped link (the 10 GB/s).
const UNSHAPED_RATE: u64 = 10_000_000_000;

/// A `--link` in bytes per second ([`UNSHAPED`]: 10 GB/s).
pub(crate) fn link_rate(link: &str) -> Result<u64, String> {
    if link == UNSHAPED {
        Ok(UNSHAPED_RATE)
    } else {
        units::parse_rate(link)
    }
}

/// The migrators of one scenario and link: --migrator, else [`MAIN_MIGRATORS`] plus the `-2s`
/// pair on `hot` at a slow link.
fn migrators_for(a: &BenchArgs, s: Scenario, link: &str) -> Vec<Migrator> {
    if !a.migrators.is_empty() {
        return a.migrators.clone();
    }
    let mut v = MAIN_MIGRATORS.to_vec();
    if s == Scenario::Hot && is_slow(link) {
        v.extend([Migrator::QemuDefault2s, Migrator::LivemigAdaptive2s, Migrator::LivemigStream2s]);
    }
    v
}

/// Estimated wall seconds of one run, boots and checks included: measured on this machine
/// (2 cores, TCG; QEMU 7.2 2026-11-24, QEMU 10 2026-11-30, see bench/README.md); slower links
/// scaled from one 100mbit run. `large`: linear in its size `mib`: a fixed part
/// ([`LARGE_FIXED_S`]) and the fill and the migration, measured with 4096 MiB and scaled.
fn estimate_s(s: Scenario, mib: u64, link: &str, m: Migrator, timeout_s: f64) -> f64 {
    let slow = is_slow(link);
    let k = large_scale(mib);
    match (s, slow) {
        (Scenario::Idle, false) => 9.0,
        (Scenario::Idle, true) => 10.0,
        (Scenario::Hot, false) => 13.0,
        // At 100mbit the hot guest's working set does not fit 300 ms: qemu-default runs to the
        // timeout, qemu-tuned converges by auto-converge (QEMU 10: 30 s), livemig fixed and
        // adaptive give up at 30 iterations; with 2 s both QEMU and livemig switch over.
        (Scenario::Hot, true) => match m {
            Migrator::QemuDefault => timeout_s + 16.0,
            Migrator::QemuTuned => 48.0,
            Migrator::LivemigFixed => 58.0,
            Migrator::LivemigAdaptive | Migrator::LivemigStream => 47.0,
            Migrator::QemuDefault2s => 31.0,
            Migrator::LivemigAdaptive2s | Migrator::LivemigStream2s => 25.0,
        },
        (Scenario::Cache, false) => 21.0,
        (Scenario::Cache, true) => 45.0,
        (Scenario::Return, false) => 35.0,
        (Scenario::Return, true) => 75.0,
        // Boot and checks (any size), the fill and the migration (scaled from 4 GiB).
        (Scenario::Large, false) => LARGE_FIXED_S + (LARGE_FILL_S + if m.is_qemu() { LARGE_MIGRATE_QEMU_S } else { LARGE_MIGRATE_LIVEMIG_S }) * k,
        (Scenario::Large, true) => LARGE_FIXED_S + LARGE_FILL_S * k + timeout_s.min(300.0) + 20.0,
    }
}

/// The part of a `large` run that does not grow with its size, s: the guest kernel's boot, the
/// wait for its first verifier passes (LARGE_VERIFY_SECS apart), the destination's start and
/// the checks after the migration (--passes verifier passes). Fitted to the wall times of
/// 512 MiB and 768 MiB runs (52-58 s, 2026-11-30) and of 4096 MiB runs (102-125 s): 45 s.
const LARGE_FIXED_S: f64 = 45.0;
/// Writing 70 % of a 4096 MiB guest once under TCG, s; other sizes: scaled linearly
/// (boot and fill together measured 71-92 s at 4096 MiB, 31 s at 512, 36 s at 768).
const LARGE_FILL_S: f64 = 55.0;
/// The migration of a 4096 MiB `large` guest at 1gbit with its teardown, s: QEMU's (27-31 s
/// measured), livemig's; other sizes: scaled linearly (7 s at 512 and 768 MiB).
const LARGE_MIGRATE_QEMU_S: f64 = 40.0;
const LARGE_MIGRATE_LIVEMIG_S: f64 = 30.0;

/// The cases to run, in order: `large` once per --large-mib size, smallest first.
fn plan(a: &BenchArgs) -> Vec<Case> {
    let all = [Scenario::Idle, Scenario::Hot, Scenario::Cache, Scenario::Return, Scenario::Large];
    let pairs: Vec<(Scenario, String)> = if a.scenarios.is_empty() && a.links.is_empty() {
        let mut p: Vec<(Scenario, String)> = all.iter().map(|s| (*s, "1gbit".to_string())).collect();
        p.push((Scenario::Hot, "100mbit".into()));
        p
    } else {
        let scen: Vec<Scenario> = if a.scenarios.is_empty() { all.to_vec() } else { a.scenarios.clone() };
        let links: Vec<String> = if a.links.is_empty() { vec!["1gbit".into(), "100mbit".into()] } else { a.links.clone() };
        links.iter().flat_map(|l| scen.iter().map(move |s| (*s, l.clone()))).collect()
    };
    let mut p = Vec::new();
    for (s, link) in pairs {
        if s == Scenario::Large {
            p.extend(a.large_sizes().into_iter().map(|mib| Case { s, mib, link: link.clone() }));
        } else {
            p.push(Case { s, mib: a.mem_mib, link });
        }
    }
    p
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// The live status line.
#[derive(Debug)]
struct Status {
    tty: bool,
    start: Instant,
    dirty: bool,
}

impl Status {
    fn new() -> Status {
        Status { tty: std::io::stderr().is_terminal(), start: Instant::now(), dirty: false }
    }
    /// Rewritten in place on a terminal (a plain line elsewhere).
    fn live(&mut self, s: &str) {
        let mut e = std::io::stderr().lock();
        let el = self.start.elapsed().as_secs();
        if self.tty {
            let _ = write!(e, "\r\x1b[2K[bench {:>2}:{:02}] {s}", el / 60, el % 60);
            let _ = e.flush();
            self.dirty = true;
        } else {
            let _ = writeln!(e, "[bench {:>2}:{:02}] {s}", el / 60, el % 60);
        }
    }
    /// A line that stays.
    fn line(&mut self, s: &str) {
        let mut e = std::io::stderr().lock();
        if self.dirty {
            let _ = write!(e, "\r\x1b[2K");
            self.dirty = false;
        }
        let el = self.start.elapsed().as_secs();
        let _ = writeln!(e, "[bench {:>2}:{:02}] {s}", el / 60, el % 60);
    }
}

/// Everything fixed for the whole bench.
#[derive(Debug)]
struct Env<'a> {
    a: &'a BenchArgs,
    image: GuestImage,
    exe: PathBuf,
    hosts: Hosts,
    cancel: std::sync::Arc<AtomicBool>,
    work: PathBuf,
    send_help: String,
    recv_help: String,
    port: std::cell::Cell<u16>,
    /// `None` with --no-tls.
    tls: Option<TlsFiles>,
    /// QEMU's QMP greeting (`version`), from the first VM started.
    greeting: std::cell::RefCell<Option<Value>>,
}

fn help_of(exe: &Path, sub: &str) -> String {
    std::process::Command::new(exe).args([sub, "--help"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

/// Waits until `f` gives a value; error on timeout or cancel.
fn wait_until<T>(cancel: &AtomicBool, limit: Duration, what: &str, mut f: impl FnMut() -> anyhow::Result<Option<T>>) -> anyhow::Result<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if cancel.load(Ordering::SeqCst) {
            bail!("cancelled");
        }
        if t0.elapsed() > limit {
            bail!("timeout after {} s waiting for {what}", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The guest of scenario `s` for migrator `m`. QEMU's own migration and livemig's stream engine
/// get plain private RAM (`-m`, what most VMs have; both migrate any RAM), livemig's shared
/// engine the lab's shared RAM backend.
fn vm_cfg(env: &Env<'_>, s: Scenario, mib: u64, m: Migrator, name: &str, dir: &Path) -> VmConfig {
    let mut c = VmConfig::new(name, dir);
    c.mem_mib = mib;
    if m.is_qemu() || m.engine() == "stream" {
        c.backend = RamBackend::Anonymous;
    }
    match s {
        Scenario::Idle => c.param("mode", "heartbeat"),
        Scenario::Hot => c.param("mode", "dirty").param("mib", env.a.hot_mib).param("rate", 0).param("pattern", "uniform").param("verify-secs", 2),
        Scenario::Cache | Scenario::Return => c
            .param("mode", "cache")
            .param("mib", env.a.cache_mib)
            .param("then-dirty-mib", 8)
            .param("rate", 1)
            .param("pattern", "uniform")
            .param("verify-secs", 2),
        Scenario::Large => c
            .param("mode", "dirty")
            .param("mib", large_touch_mib(mib))
            .param("rate", env.a.large_rate)
            .param("pattern", "uniform")
            .param("verify-secs", LARGE_VERIFY_SECS),
    }
}

/// Seconds between the `large` guest's verifier passes (a pass over its buffer takes seconds
/// under TCG, and the guest writes nothing meanwhile).
const LARGE_VERIFY_SECS: u64 = 10;

/// How the guest RAM is backed, for results.json (`settings`) and BENCHMARKS.md.
fn backend_name(b: &RamBackend) -> String {
    match b {
        RamBackend::Anonymous => "RAM: plain -m (private)".into(),
        RamBackend::Memfd => "RAM: memory-backend-memfd share=on".into(),
        RamBackend::File(p) => format!("RAM: memory-backend-file share=on ({})", p.display()),
        RamBackend::ShmFile => "RAM: memory-backend-file share=on, a file on /dev/shm".into(),
    }
}

fn console_has(vm: &Vm, pat: &str) -> bool {
    vm.console().lines().any(|l| l.contains(pat))
}

/// Waits until the guest is in its steady state; returns its write rate then (writes/s).
fn wait_ready(env: &Env<'_>, s: Scenario, mib: u64, vm: &mut Vm, rate: &mut WriteRate) -> anyhow::Result<Option<f64>> {
    let c = &env.cancel;
    let check = |vm: &mut Vm| -> anyhow::Result<()> {
        if !vm.is_alive() {
            bail!("QEMU {} exited: {}", vm.name(), vm.qemu_log().trim());
        }
        Ok(())
    };
    if !s.writes() {
        wait_until(c, Duration::from_secs(120), "the guest's heartbeat", || {
            check(vm)?;
            Ok(console_has(vm, "LIVEMIG-HEARTBEAT").then_some(()))
        })?;
        return Ok(None);
    }
    let t0 = Instant::now();
    // The large guest writes GiBs once under TCG before its first verifier pass: 900 s for
    // 4096 MiB, scaled linearly with its size (not below the others' 240 s).
    let (limit, n) = if s == Scenario::Large { ((900.0 * large_scale(mib)).max(240.0), 2) } else { (240.0, 3) };
    wait_until(c, Duration::from_secs_f64(limit), "verifier passes of the guest", || {
        check(vm)?;
        rate.poll(vm);
        Ok((rate.samples.len() >= n).then_some(()))
    })?;
    Ok(rate.rate(t0, Instant::now()))
}

/// Checks the destination guest after a completed leg: a heartbeat (idle) or `passes` verifier
/// passes with no bad page, and no kernel oops. (mark, passes, bad pages, detail)
fn check_guest(env: &Env<'_>, s: Scenario, mib: u64, vm: &mut Vm) -> anyhow::Result<(Mark, Option<usize>, Option<u64>, String)> {
    let oops = |vm: &Vm| {
        let c = vm.console();
        ["Oops", "Kernel panic", "BUG:", "general protection", "LIVEMIG-ERROR"].iter().find(|p| c.contains(**p)).map(|p| p.to_string())
    };
    let t0 = Instant::now();
    // A large guest's pass over its buffer takes seconds (~3.4 s at 4 GiB) besides the
    // LARGE_VERIFY_SECS between passes: larger than 4 GiB scales it up, smaller keeps it.
    let per_pass = if s == Scenario::Large { (10 + 3 * LARGE_VERIFY_SECS) as f64 * large_scale(mib).max(1.0) } else { 10.0 };
    let limit = Duration::from_secs_f64(60.0 + per_pass * env.a.passes as f64);
    loop {
        if let Some(p) = oops(vm) {
            return Ok((Mark::Corrupt, None, None, format!("destination console shows `{p}`")));
        }
        let lines = vm.verify_lines();
        let bad: u64 = lines.iter().map(|l| l.bad).sum();
        if bad > 0 {
            return Ok((Mark::Corrupt, Some(lines.len()), Some(bad), format!("guest verifier: {bad} bad pages {:?}", vm.bad_lines().first())));
        }
        if s.writes() && lines.len() >= env.a.passes {
            return Ok((Mark::Ok, Some(lines.len()), Some(0), String::new()));
        }
        if !s.writes() && console_has(vm, "LIVEMIG-HEARTBEAT") {
            return Ok((Mark::Ok, None, None, String::new()));
        }
        if !vm.is_alive() {
            return Ok((Mark::Corrupt, Some(lines.len()), None, "destination QEMU exited after the migration".into()));
        }
        if env.cancel.load(Ordering::SeqCst) {
            bail!("cancelled");
        }
        if t0.elapsed() > limit {
            return Ok((Mark::Corrupt, Some(lines.len()), None, format!("destination guest silent: {} verifier passes in {} s", lines.len(), limit.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn next_port(env: &Env<'_>) -> u16 {
    let p = env.port.get();
    env.port.set(p + 1);
    p
}

fn start_vm(env: &Env<'_>, cfg: &VmConfig, ns: &str) -> anyhow::Result<Vm> {
    Vm::start_wrapped(&env.image, cfg, &Hosts::prefix(ns)).with_context(|| format!("cannot start QEMU {}", cfg.name))
}

struct RunSpec<'a> {
    s: Scenario,
    /// Guest RAM, MiB.
    mib: u64,
    /// `large-1024`, `idle`: names its directories.
    tag: String,
    link: &'a str,
    link_bps: u64,
    m: Migrator,
    run: usize,
}

fn one_leg(env: &Env<'_>, spec: &RunSpec<'_>, from: &Vm, to: &Vm, forward: bool, dir: &Path, rate: &mut WriteRate) -> anyhow::Result<Leg> {
    let h = &env.hosts;
    // One snapshot directory per "host" and run: A's is where the VM's memory stays when it
    // leaves A, and what a return to A can refer to.
    let snaps = snapshots_dir(env, spec);
    let (snap_a, snap_b) = (snaps.join("host-a"), snaps.join("host-b"));
    // Only where a snapshot is used: elsewhere the sender's keeping one after the switchover
    // would count in livemig's total time (16 s of 53 s for the 4 GiB guest), QEMU keeps none.
    let snapshots = spec.s == Scenario::Return
        && !spec.m.is_qemu()
        && (env.send_help.contains("--snapshot-dir") || env.recv_help.contains("--snapshot-dir"));
    if snapshots {
        // Private, as livemig requires of a store of guest memory.
        for d in [&snap_a, &snap_b] {
            std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700).create(d)?;
        }
    }
    let ctx = LegCtx {
        exe: &env.exe,
        from,
        to,
        from_ns: if forward { &h.src_ns } else { &h.dst_ns },
        to_ns: if forward { &h.dst_ns } else { &h.src_ns },
        to_addr: if forward { net::DST_ADDR } else { net::SRC_ADDR },
        from_host: if forward { tls::HOST_A } else { tls::HOST_B },
        to_host: if forward { tls::HOST_B } else { tls::HOST_A },
        port: next_port(env),
        hosts: h,
        forward,
        link_bytes_per_s: spec.link_bps,
        unshaped: spec.link == UNSHAPED,
        connections: env.a.connections,
        migrator: spec.m,
        max_downtime: spec.m.max_downtime(env.a),
        tls: env.tls.as_ref(),
        timeout: Duration::from_secs_f64(env.a.timeout_for(spec.s, spec.mib) / 1000.0),
        cancel: &env.cancel,
        dir,
        disk: &env.image.disk,
        send_disk_image: env.send_help.contains("--disk-image"),
        recv_disk_image: env.recv_help.contains("--disk-image"),
        vm_id: env.send_help.contains("--vm-id").then(|| format!("lmb-{}-{}-{}-{}", spec.tag, spec.link, spec.m.name(), spec.run + 1)),
        send_snapshot_dir: snapshots && env.send_help.contains("--snapshot-dir"),
        recv_snapshot_dir: snapshots && env.recv_help.contains("--snapshot-dir"),
        send_snapshot: if forward { &snap_a } else { &snap_b },
        recv_snapshot: if forward { &snap_b } else { &snap_a },
    };
    legs::run(&ctx, rate)
}

fn snapshots_dir(env: &Env<'_>, spec: &RunSpec<'_>) -> PathBuf {
    env.work.join(format!("snapshots-{}-{}-{}-{}", spec.tag, spec.link, spec.m.name(), spec.run + 1))
}

/// Removes a directory when dropped (memory snapshots: hundreds of MiB per run).
#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Checks the guest on `vm` after a leg that went through: its verifier figures go to `r`, and a
/// failed check becomes the mark and is added to the leg's detail.
fn check_after_leg(env: &Env<'_>, spec: &RunSpec<'_>, vm: &mut Vm, r: &mut RunResult, leg: &mut Leg) -> anyhow::Result<Option<Mark>> {
    let (m, passes, bad, detail) = check_guest(env, spec.s, spec.mib, vm)?;
    r.verify_passes = passes;
    r.bad_pages = bad;
    if m == Mark::Ok {
        return Ok(None);
    }
    leg.detail = [leg.detail.clone(), detail].join("; ");
    Ok(Some(m))
}

fn leg_mark(leg: &Leg) -> Option<Mark> {
    match leg.end {
        Some(LegEnd::Completed) if leg.differing_pages.unwrap_or(0) > 0 => Some(Mark::Corrupt),
        Some(LegEnd::Completed) => None,
        Some(LegEnd::Timeout) => Some(Mark::Timeout),
        _ => Some(Mark::Failed),
    }
}

fn run_one(env: &Env<'_>, spec: &RunSpec<'_>, st: &mut Status, idx: usize, n: usize) -> anyhow::Result<RunResult> {
    let label = format!("[{}/{n}] {} {} {} run {}", idx + 1, case_label(spec.s, spec.mib), spec.link, spec.m.name(), spec.run + 1);
    let dir = legs::run_dir(&env.work, &format!("{}-{}-{}-{}", spec.tag, spec.link, spec.m.name(), spec.run + 1))?;
    let t_run = Instant::now();
    let _snapshots = RemoveOnDrop(snapshots_dir(env, spec));
    let case = Case { s: spec.s, mib: spec.mib, link: spec.link.to_string() };
    let mut r = RunResult::failed(&case, spec.m, spec.run + 1, String::new(), dir.clone());
    st.live(&format!("{label}: booting the source guest"));
    let cfg = vm_cfg(env, spec.s, spec.mib, spec.m, "a", &dir);
    let mut a = start_vm(env, &cfg, &env.hosts.src_ns)?;
    if env.greeting.borrow().is_none() {
        // A moment's QMP connection (the migrators connect later), for QEMU's own version.
        if let Ok(q) = livemig_qmp::Qmp::connect(a.qmp_path(), Duration::from_secs(10)) {
            *env.greeting.borrow_mut() = Some(q.greeting().clone());
        }
    }
    let mut rate_a = WriteRate::default();
    st.live(&format!("{label}: waiting for the guest workload"));
    r.guest_rate_before = wait_ready(env, spec.s, spec.mib, &mut a, &mut rate_a)?;
    st.live(&format!("{label}: starting the destination QEMU"));
    let mut b = start_vm(env, &cfg.as_incoming("b"), &env.hosts.dst_ns)?;
    st.live(&format!("{label}: migrating{}", if spec.s == Scenario::Return { " A->B" } else { "" }));
    let mut leg = one_leg(env, spec, &a, &b, true, &dir, &mut rate_a)?;
    let mut mark = leg_mark(&leg);
    if spec.s == Scenario::Return && mark.is_some() {
        leg.detail = format!("way there: {}", leg.detail);
    }
    if mark.is_none() {
        st.live(&format!("{label}: checking the destination guest"));
        mark = check_after_leg(env, spec, &mut b, &mut r, &mut leg)?;
    }
    if spec.s == Scenario::Return && mark.is_none() {
        drop(a);
        st.live(&format!("{label}: guest runs on B for {:.0} s", env.a.return_after / 1000.0));
        let t = Instant::now();
        wait_until(&env.cancel, Duration::from_secs_f64(env.a.return_after / 1000.0 + 1.0), "", || {
            Ok((t.elapsed().as_secs_f64() * 1000.0 >= env.a.return_after).then_some(()))
        })?;
        let mut a2 = start_vm(env, &cfg.as_incoming("a2"), &env.hosts.src_ns)?;
        let mut rate_b = WriteRate::default();
        st.live(&format!("{label}: migrating back B->A"));
        let first = leg.detail.clone();
        leg = one_leg(env, spec, &b, &a2, false, &dir, &mut rate_b)?;
        if !first.is_empty() || !leg.detail.is_empty() {
            leg.detail = format!("way there: {}; way back: {}", if first.is_empty() { "ok" } else { &first }, if leg.detail.is_empty() { "ok" } else { &leg.detail });
        }
        mark = leg_mark(&leg);
        if mark.is_none() {
            st.live(&format!("{label}: checking the guest back on A"));
            mark = check_after_leg(env, spec, &mut a2, &mut r, &mut leg)?;
        }
        drop(a2);
    }
    r.mark = mark.unwrap_or(Mark::Ok);
    r.detail = leg.detail.trim_matches([';', ' ']).to_string();
    r.total_ms = leg.total_ms;
    r.downtime_ms = leg.downtime_ms;
    r.wire_bytes = leg.wire_bytes;
    r.wire_back_bytes = leg.wire_back;
    r.cpu_ms = leg.cpu_ms;
    r.differing_pages = leg.differing_pages;
    r.guest_rate_during = leg.guest_rate;
    r.noise = leg.noise;
    r.settings = leg.capabilities;
    r.settings.push(backend_name(&cfg.backend));
    r.send_report = leg.send_report;
    r.wall_s = t_run.elapsed().as_secs_f64();
    Ok(r)
}

fn cancel_soon(c: &AtomicBool) -> bool {
    std::thread::sleep(Duration::from_millis(150));
    c.load(Ordering::SeqCst)
}

/// `livemig-dev bench`.
pub(crate) fn run(a: &BenchArgs) -> anyhow::Result<i32> {
    if let Some(p) = &a.from_json {
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?)?;
        let mut runs: Vec<RunResult> = serde_json::from_value(doc.get("runs").cloned().unwrap_or(Value::Null)).context("no runs in that file")?;
        fill_mem(&mut runs, doc.get("command").and_then(Value::as_str).unwrap_or(""));
        let started = doc.get("started").and_then(Value::as_str).unwrap_or("?").to_string();
        let finished = doc.get("finished").and_then(Value::as_str).unwrap_or("?").to_string();
        let meta = report::Meta::from_doc(&doc);
        let out = report::write_all(a, &runs, &started, Some(&finished), doc.get("cancelled").and_then(Value::as_bool).unwrap_or(false), &meta)?;
        eprintln!("bench: wrote {}", out.display());
        return Ok(0);
    }
    let plan = plan(a);
    let mut jobs: Vec<(&Case, Migrator, usize)> = Vec::new();
    for c in &plan {
        for m in migrators_for(a, c.s, &c.link) {
            for run in 0..a.runs {
                jobs.push((c, m, run));
            }
        }
    }
    let est_of = |c: &Case, m: Migrator| estimate_s(c.s, c.mib, &c.link, m, a.timeout_for(c.s, c.mib) / 1000.0);
    let est: f64 = jobs.iter().map(|(c, m, _)| est_of(c, *m)).sum();
    eprintln!(
        "bench: {} runs ({} cases of scenario, guest size and link; {} runs each), {}, estimated {:.0} min",
        jobs.len(),
        plan.len(),
        a.runs,
        if a.tls_on() { "TLS on both sides" } else { "plain TCP (--no-tls)" },
        est / 60.0
    );
    if a.dry_run {
        for c in &plan {
            let ms = migrators_for(a, c.s, &c.link);
            let t: f64 = ms.iter().map(|m| est_of(c, *m)).sum::<f64>() * a.runs as f64;
            let names: Vec<String> = ms.iter().map(|m| format!("{} (max downtime {})", m.name(), m.max_downtime(a))).collect();
            eprintln!(
                "  {} at {}, {} MiB guest, timeout {:.0} s, ~{:.0} min: {}",
                c.label(),
                c.link,
                c.mib,
                a.timeout_for(c.s, c.mib) / 1000.0,
                t / 60.0,
                names.join(", ")
            );
        }
        return Ok(0);
    }
    if !is_root() {
        bail!("livemig-dev bench needs root (it creates network namespaces, veth pairs and tc qdiscs); run it with sudo");
    }
    for c in &plan {
        link_rate(&c.link).map_err(|e| anyhow::anyhow!("--link {}: {e}", c.link))?;
    }
    let _machine = livemig_lab::machine_lock(|p| eprintln!("bench: waiting for the VM tests or another benchmark to finish (lock {})", p.display()))?;
    let cancel = signal::cancel_flag();
    let removed = net::remove_leftovers();
    if !removed.is_empty() {
        eprintln!("bench: removed leftovers of an earlier run: {}", removed.join(", "));
    }
    let work = a.workdir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("livemig-bench-{}", std::process::id())));
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    eprintln!("bench: building or finding the test guest");
    let image = GuestImage::build().context("cannot build the test guest")?;
    let exe = crate::livemig_exe()?;
    let tls = if a.tls_on() {
        let d = work.join("tls");
        let _ = std::fs::remove_dir_all(&d);
        Some(TlsFiles::make(&d)?)
    } else {
        None
    };
    let hosts = Hosts::create(std::process::id())?;
    let env = Env {
        a,
        image,
        send_help: help_of(&exe, "send"),
        recv_help: help_of(&exe, "receive"),
        exe,
        hosts,
        cancel,
        work: work.clone(),
        port: std::cell::Cell::new(20000),
        tls,
        greeting: std::cell::RefCell::new(None),
    };
    let started = report::utc_now();
    let mut st = Status::new();
    let mut results: Vec<RunResult> = Vec::new();
    let mut shaped: Option<String> = None;
    let n = jobs.len();
    let mut cancelled = false;
    for (i, (c, m, run)) in jobs.iter().enumerate() {
        if env.cancel.load(Ordering::SeqCst) {
            cancelled = true;
            break;
        }
        let l = &c.link;
        let link_bps = link_rate(l).map_err(anyhow::Error::msg)?;
        if shaped.as_deref() != Some(l.as_str()) {
            env.hosts.shape(&net::Shape { rate: l.clone(), delay_ms: a.delay.unwrap_or(0.0) }, link_bps)?;
            shaped = Some(l.clone());
        }
        let spec = RunSpec { s: c.s, mib: c.mib, tag: c.tag(), link: l, link_bps, m: *m, run: *run };
        match run_one(&env, &spec, &mut st, i, n) {
            Ok(r) => {
                st.line(&format!(
                    "{} {} {} run {}: {}{}",
                    c.label(),
                    l,
                    m.name(),
                    run + 1,
                    report::cell_summary(&r),
                    if r.detail.is_empty() { String::new() } else { format!(" ({})", r.detail) }
                ));
                results.push(r);
            }
            // A Ctrl-C also reaches the QEMUs (same process group); the flag follows within 50 ms.
            Err(e) if cancel_soon(&env.cancel) => {
                st.line(&format!("cancelled: {e:#}"));
                cancelled = true;
                break;
            }
            Err(e) => {
                st.line(&format!("{} {} {} run {}: failed: {e:#}", c.label(), l, m.name(), run + 1));
                let detail = format!("{e:#}").lines().next().unwrap_or("").to_string();
                results.push(RunResult::failed(c, *m, run + 1, detail, work.clone()));
            }
        }
    }
    let meta = report::Meta { tls: a.tls_on(), qmp_greeting: env.greeting.borrow().clone(), machine: None };
    drop(env);
    let out = report::write_all(a, &results, &started, None, cancelled, &meta)?;
    eprintln!("bench: wrote {}", out.display());
    Ok(if cancelled { i32::from(crate::exit::CANCELLED) } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: BenchArgs,
    }

    fn args(v: &[&str]) -> BenchArgs {
        Cli::parse_from(std::iter::once("bench").chain(v.iter().copied())).a
    }

    #[test]
    fn default_plan_adds_the_2s_pair_to_hot_at_100mbit_only() {
        let a = args(&[]);
        let p = plan(&a);
        assert_eq!(p.len(), 6);
        assert!(p.contains(&Case { s: Scenario::Large, mib: 4096, link: "1gbit".into() }));
        assert!(p.contains(&Case { s: Scenario::Idle, mib: 512, link: "1gbit".into() }));
        for Case { s, link: l, .. } in &p {
            let ms = migrators_for(&a, *s, l);
            let pair = ms.contains(&Migrator::QemuDefault2s) && ms.contains(&Migrator::LivemigAdaptive2s) && ms.contains(&Migrator::LivemigStream2s);
            assert_eq!(pair, *s == Scenario::Hot && l == "100mbit", "{s:?} {l}");
            assert!(ms.contains(&Migrator::LivemigStream), "both engines everywhere: {ms:?}");
            assert_eq!(ms.len(), if pair { 8 } else { 5 });
        }
        // Explicit migrators are exactly those.
        let a = args(&["--migrator", "qemu-default-2s", "--scenario", "idle"]);
        assert_eq!(migrators_for(&a, Scenario::Idle, "1gbit"), vec![Migrator::QemuDefault2s]);
    }

    #[test]
    fn like_for_like_downtimes_and_tls() {
        let a = args(&[]);
        assert!(a.tls_on());
        for m in MAIN_MIGRATORS {
            assert_eq!(m.max_downtime(&a), "300ms");
        }
        assert_eq!(Migrator::QemuDefault2s.max_downtime(&a), "2s");
        assert_eq!(Migrator::LivemigAdaptive2s.max_downtime(&a), "2s");
        assert!(Migrator::QemuDefault2s.is_qemu() && !Migrator::LivemigAdaptive2s.is_qemu());
        assert!(!args(&["--no-tls"]).tls_on());
        assert!(args(&["--no-tls", "--tls"]).tls_on());
        let a = args(&["--large-mib", "1000"]);
        assert_eq!((a.large_sizes(), large_touch_mib(1000), a.mem_mib), (vec![1000], 700, 512));
        assert_eq!(args(&[]).timeout_for(Scenario::Large, 4096), 240_000.0);
        assert_eq!(a.timeout_for(Scenario::Hot, 1000), 60_000.0);
    }

    fn parse_err(v: &[&str]) -> String {
        match Cli::try_parse_from(std::iter::once("bench").chain(v.iter().copied())) {
            Ok(_) => panic!("{v:?} parsed"),
            Err(e) => {
                assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{v:?}: {e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn large_mib_takes_a_list_run_smallest_first() {
        assert_eq!(args(&[]).large_sizes(), vec![4096]);
        assert_eq!(args(&["--large-mib", "2048"]).large_sizes(), vec![2048]);
        assert_eq!(args(&["--large-mib", "4096,1024,2048"]).large_sizes(), vec![1024, 2048, 4096]);
        assert_eq!(args(&["--large-mib=1024,1024,512"]).large_sizes(), vec![512, 1024], "each size once");
        assert_eq!(args(&["--large-mib", "1024", "--large-mib", "2048"]).large_sizes(), vec![1024, 2048]);
        let e = parse_err(&["--large-mib", "0"]);
        assert!(e.contains("--large-mib") && e.contains("above 0"), "{e}");
        let e = parse_err(&["--large-mib", "abc"]);
        assert!(e.contains("`abc` is not a whole number of MiB"), "{e}");
        let e = parse_err(&["--large-mib", "1024,2g"]);
        assert!(e.contains("`2g` is not a whole number of MiB"), "{e}");
        parse_err(&["--large-mib", "1024,,2048"]);
        parse_err(&["--large-mib", "1024,0"]);
    }

    #[test]
    fn the_plan_has_one_large_case_per_size_in_ascending_order() {
        let a = args(&["--scenario", "large", "--scenario", "idle", "--link", "1gbit", "--large-mib", "4096,1024,2048"]);
        let p = plan(&a);
        let got: Vec<(Scenario, u64, &str)> = p.iter().map(|c| (c.s, c.mib, c.link.as_str())).collect();
        assert_eq!(
            got,
            vec![(Scenario::Large, 1024, "1gbit"), (Scenario::Large, 2048, "1gbit"), (Scenario::Large, 4096, "1gbit"), (Scenario::Idle, 512, "1gbit")]
        );
        assert_eq!(p.iter().map(Case::label).collect::<Vec<_>>(), ["large 1 GiB", "large 2 GiB", "large 4 GiB", "idle"]);
        assert_eq!(p.iter().map(Case::tag).collect::<Vec<_>>(), ["large-1024", "large-2048", "large-4096", "idle"]);
        assert_eq!(case_label(Scenario::Large, 768), "large 768 MiB");
        // The default plan: every size at 1gbit, in order, each with every migrator.
        let p = plan(&args(&["--large-mib", "2048,1024"]));
        let large: Vec<u64> = p.iter().filter(|c| c.s == Scenario::Large).map(|c| c.mib).collect();
        assert_eq!((p.len(), large), (7, vec![1024, 2048]));
        // Two links: the sizes at each.
        let p = plan(&args(&["--scenario", "large", "--large-mib", "1024,2048"]));
        assert_eq!(p.iter().map(|c| (c.mib, c.link.as_str())).collect::<Vec<_>>(), [(1024, "1gbit"), (2048, "1gbit"), (1024, "100mbit"), (2048, "100mbit")]);
    }

    #[test]
    fn large_timeouts_and_estimates_scale_with_the_size() {
        let a = args(&["--large-mib", "512,1024,2048,4096,8192"]);
        let t: Vec<f64> = a.large_sizes().iter().map(|m| a.timeout_for(Scenario::Large, *m) / 1000.0).collect();
        // 240 s at 4096, linear, never under --timeout (60 s).
        assert_eq!(t, [60.0, 60.0, 120.0, 240.0, 480.0]);
        let a = args(&["--large-timeout", "30s", "--large-mib", "2048,4096"]);
        assert_eq!(a.timeout_for(Scenario::Large, 4096), 30_000.0, "4096 gets exactly --large-timeout");
        assert_eq!(a.timeout_for(Scenario::Large, 2048), 30_000.0, "not under the shorter of the two");
        let e = |mib, m| estimate_s(Scenario::Large, mib, "1gbit", m, 240.0);
        // The 4 GiB figures as measured.
        assert_eq!((e(4096, Migrator::QemuDefault), e(4096, Migrator::LivemigAdaptive)), (140.0, 130.0));
        assert_eq!(e(2048, Migrator::QemuDefault), LARGE_FIXED_S + (LARGE_FILL_S + LARGE_MIGRATE_QEMU_S) / 2.0);
        assert!(e(1024, Migrator::LivemigStream) < e(2048, Migrator::LivemigStream));
        // The smoke run of 2026-11-30 took 52-54 s at 512 MiB and 58 s at 768 MiB.
        for (mib, wall) in [(512, 53.0), (768, 58.0)] {
            let est = e(mib, Migrator::QemuDefault);
            assert!((est - wall).abs() < 0.15 * wall, "{mib}: {est} against {wall}");
        }
    }

    #[test]
    fn results_record_the_guest_size_and_old_files_get_their_runs_option() {
        let c = Case { s: Scenario::Large, mib: 2048, link: "1gbit".into() };
        let r = RunResult::failed(&c, Migrator::LivemigStream, 1, "x".into(), PathBuf::from("/tmp/x"));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["mem_mib"], 2048);
        let back: RunResult = serde_json::from_value(v.clone()).unwrap();
        assert_eq!((back.mem_mib, back.scenario), (2048, Scenario::Large));
        // A results.json of before: no mem_mib.
        let mut old = v;
        old.as_object_mut().unwrap().remove("mem_mib");
        let mut idle = old.clone();
        idle["scenario"] = "idle".into();
        let load = |cmd: &str| {
            let mut runs: Vec<RunResult> = serde_json::from_value(Value::Array(vec![old.clone(), idle.clone()])).unwrap();
            assert_eq!(runs[0].mem_mib, 0);
            fill_mem(&mut runs, cmd);
            (runs[0].mem_mib, runs[1].mem_mib)
        };
        assert_eq!(load("target/release/livemig bench --runs 1 --out /tmp/benchq10"), (4096, 512));
        assert_eq!(load("livemig bench --large-mib 2048 --mem-mib 1024"), (2048, 1024));
        assert_eq!(load("livemig bench --large-mib=1000"), (1000, 512));
        // A recorded size is kept.
        let mut runs = vec![r];
        fill_mem(&mut runs, "livemig bench --large-mib 4096");
        assert_eq!(runs[0].mem_mib, 2048);
    }

    #[test]
    fn names_round_trip() {
        for m in [Migrator::QemuDefault2s, Migrator::LivemigAdaptive2s, Migrator::QemuTuned] {
            assert_eq!(serde_json::to_value(m).unwrap(), Value::String(m.name().into()));
            assert_eq!(Migrator::from_str(m.name(), false).unwrap(), m);
        }
        assert_eq!(serde_json::to_value(Scenario::Large).unwrap(), Value::String("large".into()));
    }

    #[test]
    fn estimates_cover_every_pair() {
        for a in [args(&[]), args(&["--large-mib", "1024,2048,4096"]), args(&["--scenario", "large", "--large-mib", "512,4096"])] {
            for Case { s, mib, link: l } in plan(&a) {
                for m in migrators_for(&a, s, &l) {
                    let e = estimate_s(s, mib, &l, m, a.timeout_for(s, mib) / 1000.0);
                    assert!(e > 5.0 && e < 600.0, "{s:?} {mib} {l} {m:?}: {e}");
                }
            }
        }
    }
}
