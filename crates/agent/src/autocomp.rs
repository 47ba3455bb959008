//! The compressor chosen by the link (`--compressor auto`, the default): none, lz4 or a zstd
//! level, from the measured link rate and what each candidate costs on the guest's own pages.
//!
//! - [`choose`] is the policy, a pure function: the predicted rate of a candidate, in whole
//!   pages per second, is `min(threads x its pages per CPU second, link rate / its bytes per
//!   page)`; of those within [`MARGIN`] of the fastest the one taking the least CPU, with
//!   hysteresis (see there).
//! - [`Sampler`] measures the candidates: one page in [`SAMPLE_EVERY`] sent (zero pages skipped) is also
//!   compressed with every candidate ([`CANDIDATES`]) and timed. Its cost, measured with the
//!   pipeline benchmark (`livemig-dev pipeline --compressor auto`, BENCHMARKS.md, a loaded
//!   2-core machine): 40-90 us per sampled page, 0.6-1.3 % of the run's CPU time (244 pages in
//!   9-22 ms of 1.5-1.8 CPU s at 100 Mbit/s; 481 pages in 17-21 ms of 1.7-1.95 CPU s on
//!   loopback);
//!   the report gives each migration's figure (`sampled_pages`, `sampling_ms`).
//! - [`LinkMeter`] measures the link during a pass: wire bytes written per second over windows
//!   of at least [`LINK_WINDOW`], and whether the link was the bottleneck (the writer's queue
//!   mostly full) or the sender was (then the link carried all it was given: its rate is only a
//!   lower bound, [`Link::AtLeast`]: the shared engine then tries the cheapest candidate, the
//!   stream engine trades no bytes for CPU, its source QEMU may be what was slow).
//! - [`AutoCompressor`] holds the state of one migration: the current choice, the samples, the
//!   link, the hysteresis ([`DWELL`] consecutive decisions must agree before a change) and the
//!   report of every choice with the numbers behind it. Before any measurement it uses lz4 and
//!   says why. A forced compressor (`--compressor lz4|zstd|none`, `--no-compress`) never
//!   changes and the report says "forced".

use std::time::{Duration, Instant};

use livemig_compact::{is_zero, Compressor, Encoder, Scratch, PAGE_SIZE, RECORD_HEADER};
use serde::Serialize;

use crate::{Observer, Progress};

/// Which compressor whole pages get: chosen by the link, or forced by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressorMode {
    /// Chosen from the link rate and the measured cost of each candidate.
    Auto,
    /// Always this one.
    Forced(Compressor),
}

impl CompressorMode {
    /// The compressor the encoder starts with (lz4 for auto, before anything is measured).
    pub fn initial(self) -> Compressor {
        match self {
            CompressorMode::Auto => Compressor::Lz4,
            CompressorMode::Forced(c) => c,
        }
    }
}

/// The candidates, cheapest first. No zstd level above 1: on 4 KiB pages they hardly pay
/// (the test guest's root disk in 4 KiB blocks, `zstd -b<level> -B4096`: level 1 3.76x, 3
/// 3.81x, 6 3.98x at 2.8x the CPU, 19 4.11x at 60x; BENCHMARKS.md): a few percent at best, about
/// the [`MARGIN`] a change needs and the sampling noise of the bytes per page, for 3x the CPU;
/// and each candidate costs sampling time. The
/// policy and the encoder take any level ([`Compressor::Zstd`]).
pub const CANDIDATES: [Compressor; 3] = [Compressor::None, Compressor::Lz4, Compressor::Zstd(1)];

/// One non-zero page in this many is sampled with every candidate.
pub const SAMPLE_EVERY: usize = 256;

/// Samples needed before the first decision.
pub const MIN_SAMPLES: u64 = 8;

/// A candidate replaces the current compressor only if it is predicted this much faster.
pub const MARGIN: f64 = 0.05;

/// Consecutive decisions that must name the same better candidate before it is taken.
pub const DWELL: u32 = 3;

/// Link windows a candidate stays ruled out after a change to it did not pay ([`AutoCompressor::observe_window`]).
pub const HOLD_WINDOWS: u32 = 10;

/// Shortest window over which the link rate is measured.
pub const LINK_WINDOW: Duration = Duration::from_millis(1000);

/// What a candidate costs per whole page, measured on sampled pages.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cost {
    /// CPU nanoseconds per page (the page's hash, which every page costs, plus compression).
    pub ns_per_page: f64,
    /// Bytes its record takes on the wire (header included).
    pub bytes_per_page: f64,
}

/// What is known of the link's rate, in wire bytes per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Link {
    /// Nothing measured yet.
    Unmeasured,
    /// The sender was the bottleneck: the link carried all it was given, so it can carry at
    /// least this (its own limit is unknown).
    AtLeast(f64),
    /// The link was the bottleneck: this is its rate.
    Measured(f64),
}

impl Link {
    fn describe(self) -> String {
        match self {
            Link::Unmeasured => "link not measured yet".into(),
            Link::AtLeast(r) => format!("link carried {} (the sender was the bottleneck: its limit is unknown)", rate(r)),
            Link::Measured(r) => format!("link {} (measured while it was the bottleneck)", rate(r)),
        }
    }
}

fn rate(bytes_per_s: f64) -> String {
    format!("{:.1} MB/s", bytes_per_s / 1e6)
}

/// What the policy sees.
#[derive(Debug, Clone)]
pub struct PolicyInput<'a> {
    /// The link.
    pub link: Link,
    /// Threads the encoder may use.
    pub threads: usize,
    /// Each candidate's measured cost.
    pub costs: &'a [(Compressor, Cost)],
    /// The compressor in use.
    pub current: Compressor,
    /// When the link was not the bottleneck, the sender's own CPU was (the shared engine reads
    /// guest memory itself), so a cheaper candidate is faster; false where a slower source may
    /// have been (the stream engine's source QEMU).
    pub cpu_bound_sender: bool,
}

/// A candidate's predicted rate and the numbers behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// `none`, `lz4`, `zstd1`, ...
    pub compressor: String,
    /// Measured CPU time per page.
    pub ns_per_page: f64,
    /// Measured wire bytes per page.
    pub bytes_per_page: f64,
    /// threads x pages per CPU second.
    pub cpu_pages_per_s: f64,
    /// Link rate / bytes per page (none when the link's limit is unknown).
    pub link_pages_per_s: Option<f64>,
    /// The smaller of the two: the predicted rate.
    pub pages_per_s: f64,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The compressor to use (the current one unless another is better by [`MARGIN`]).
    pub best: Compressor,
    /// Why, in words, with the numbers.
    pub reason: String,
    /// Every candidate's prediction, best first.
    pub predictions: Vec<Prediction>,
}

/// CPU per page a candidate within [`MARGIN`] of the fastest must save to replace the current
/// compressor when that one is within [`MARGIN`] too (hysteresis).
pub const CPU_SAVING: f64 = 1.5;

/// The policy: predicts each candidate's rate in whole pages per second as `min(threads x
/// pages per CPU second, link rate / bytes per page)`. Of the candidates within [`MARGIN`] of
/// the fastest, the one that takes the least CPU is the target (a compressor that gains the
/// link almost nothing, or pages that do not compress, are not worth the CPU). The current
/// compressor stays if it is itself within [`MARGIN`] of the fastest, unless the target saves
/// [`CPU_SAVING`] times its CPU and is within half the margin of its rate (hysteresis, with a
/// dead band between 2.5 and 5 %). With the link's limit unknown ([`Link::AtLeast`]: the
/// sender was the bottleneck): where that is the sender's CPU
/// ([`PolicyInput::cpu_bound_sender`], the shared engine) only the CPU term counts, so the
/// cheapest candidate is tried, which then measures the link if it becomes the bottleneck;
/// elsewhere (the stream engine, whose source QEMU may write slower than the link) no bytes are
/// traded for CPU: only a candidate that sends as few bytes (within [`MARGIN`]) for at least
/// [`CPU_SAVING`] times less CPU replaces the current one (pages that do not compress go raw).
/// With nothing measured the current compressor stays.
pub fn choose(input: &PolicyInput<'_>) -> Verdict {
    let threads = input.threads.max(1) as f64;
    let mut predictions: Vec<(Compressor, Prediction)> = input
        .costs
        .iter()
        .map(|&(c, cost)| {
            let cpu = threads * 1e9 / cost.ns_per_page.max(1.0);
            let link = match input.link {
                Link::Measured(l) => Some(l / cost.bytes_per_page.max(1.0)),
                Link::AtLeast(_) | Link::Unmeasured => None,
            };
            let pages_per_s = link.map_or(cpu, |l| l.min(cpu));
            let p = Prediction {
                compressor: c.name(),
                ns_per_page: cost.ns_per_page,
                bytes_per_page: cost.bytes_per_page,
                cpu_pages_per_s: cpu,
                link_pages_per_s: link,
                pages_per_s,
            };
            (c, p)
        })
        .collect();
    // Fastest first; a tie keeps the candidates' order (cheaper first).
    predictions.sort_by(|a, b| b.1.pages_per_s.total_cmp(&a.1.pages_per_s));
    let listed = predictions
        .iter()
        .map(|(_, p)| {
            let bound = if p.link_pages_per_s.is_some_and(|l| l <= p.cpu_pages_per_s) { "link" } else { "CPU" };
            format!("{} {:.0} ({bound}-bound; {:.0} B, {:.1} us per page)", p.compressor, p.pages_per_s, p.bytes_per_page, p.ns_per_page / 1e3)
        })
        .collect::<Vec<_>>()
        .join(", ");
    let numbers = format!("{}, {} encoder thread(s); predicted whole pages/s: {listed}", input.link.describe(), input.threads.max(1));
    let stays = |why: String| (input.current, why);
    let (best, reason) = match (input.link, predictions.first()) {
        (Link::Unmeasured, _) | (_, None) => stays(format!("{} stays: {}", input.current.name(), input.link.describe())),
        (Link::AtLeast(_), Some(_)) if !input.cpu_bound_sender => {
            let current = predictions.iter().find(|(c, _)| *c == input.current).map(|(_, p)| p.clone());
            let cheaper = current.as_ref().and_then(|cp| {
                predictions
                    .iter()
                    .filter(|(c, p)| {
                        *c != input.current
                            && p.bytes_per_page <= cp.bytes_per_page * (1.0 + MARGIN)
                            && p.ns_per_page * CPU_SAVING <= cp.ns_per_page
                    })
                    .min_by(|a, b| a.1.ns_per_page.total_cmp(&b.1.ns_per_page))
            });
            match cheaper {
                Some((c, _)) => (*c, format!(
                    "{} sends as few bytes (within {:.0} %) at less CPU; {numbers}",
                    c.name(),
                    MARGIN * 100.0
                )),
                None => stays(format!(
                    "{} stays: the link's limit is unknown, and no candidate takes less CPU without sending more bytes; {numbers}",
                    input.current.name()
                )),
            }
        }
        (_, Some((fastest, top))) => {
            let good = |p: &Prediction| p.pages_per_s * (1.0 + MARGIN) >= top.pages_per_s;
            let (target, tp) = predictions
                .iter()
                .filter(|(_, p)| good(p))
                .min_by(|a, b| a.1.ns_per_page.total_cmp(&b.1.ns_per_page))
                .expect("the fastest is within the margin of itself");
            let current = predictions.iter().find(|(c, _)| *c == input.current).map(|(_, p)| p);
            let why_target = if target == fastest {
                format!("{} is predicted fastest", target.name())
            } else {
                format!(
                    "{} is within {:.0} % of the fastest ({}) at less CPU",
                    target.name(),
                    MARGIN * 100.0,
                    fastest.name()
                )
            };
            // A current compressor near the top gives way only to one that saves CPU_SAVING x
            // its CPU and is within half the margin of it (a dead band between 2.5 and 5 %: at
            // a gain of exactly the margin both ways would otherwise hold, and the choice flap).
            let gives_way = |cp: &Prediction| {
                cp.ns_per_page >= tp.ns_per_page * CPU_SAVING && tp.pages_per_s * (1.0 + MARGIN / 2.0) >= cp.pages_per_s
            };
            match current {
                Some(cp) if *target != input.current && good(cp) && !gives_way(cp) => stays(format!(
                    "{} stays: within {:.0} % of the fastest, and {} would not save {CPU_SAVING}x its CPU within {:.0} % of its rate; {numbers}",
                    input.current.name(),
                    MARGIN * 100.0,
                    target.name(),
                    MARGIN * 50.0
                )),
                _ => (*target, format!("{why_target}: {numbers}")),
            }
        }
    };
    Verdict { best, reason, predictions: predictions.into_iter().map(|(_, p)| p).collect() }
}

/// Samples whose median is a candidate's CPU time per page.
const RECENT: usize = 31;

/// Measures the candidates on sampled pages: record bytes as a moving average over about the
/// last 64 samples, CPU time as the median of the last [`RECENT`] (a sample the scheduler
/// preempted takes 100x the time: on the shared test machine one such made zstd look 5x dearer
/// in an average).
pub struct Sampler {
    scratch: Vec<Scratch>,
    sums: Vec<Cost>,
    recent_ns: Vec<std::collections::VecDeque<f64>>,
    samples: u64,
    offered: usize,
    spent: Duration,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler").field("samples", &self.samples).field("costs", &self.sums).finish_non_exhaustive()
    }
}

impl Default for Sampler {
    fn default() -> Self {
        Self::new()
    }
}

impl Sampler {
    /// A sampler of [`CANDIDATES`], its compressor contexts made (so no sample times their
    /// allocation).
    pub fn new() -> Self {
        let mut scratch: Vec<Scratch> = CANDIDATES.iter().map(|_| Scratch::default()).collect();
        let page = [1u8; PAGE_SIZE];
        for (s, &c) in scratch.iter_mut().zip(CANDIDATES.iter()) {
            s.compress_page(c, &page);
        }
        Sampler {
            scratch,
            sums: vec![Cost { ns_per_page: 0.0, bytes_per_page: 0.0 }; CANDIDATES.len()],
            recent_ns: vec![std::collections::VecDeque::with_capacity(RECENT); CANDIDATES.len()],
            samples: 0,
            offered: 0,
            spent: Duration::ZERO,
        }
    }

    /// A page being sent: one non-zero page in [`SAMPLE_EVERY`] is measured.
    pub fn offer(&mut self, page: &[u8; PAGE_SIZE]) {
        if is_zero(page) {
            return;
        }
        self.offered += 1;
        if (self.offered - 1).is_multiple_of(SAMPLE_EVERY) {
            self.measure(page);
        }
    }

    /// Measures `page` with every candidate (zero pages are skipped: they travel as `zero`
    /// whatever the compressor).
    pub fn measure(&mut self, page: &[u8; PAGE_SIZE]) {
        if is_zero(page) {
            return;
        }
        let t = Instant::now();
        // Every page costs its hash (the record's keyed fingerprint; the same xxh3 work).
        std::hint::black_box(livemig_compact::fingerprint(std::hint::black_box(page)));
        let base = t.elapsed().as_secs_f64() * 1e9;
        self.samples += 1;
        let weight = 1.0 / (self.samples.min(64) as f64);
        let slots = self.scratch.iter_mut().zip(CANDIDATES.iter()).zip(self.sums.iter_mut()).zip(self.recent_ns.iter_mut());
        for (((s, &c), sum), recent) in slots {
            let t0 = Instant::now();
            let (_, n) = s.compress_page(c, std::hint::black_box(page));
            let ns = base + t0.elapsed().as_secs_f64() * 1e9;
            let bytes = (n + RECORD_HEADER) as f64;
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(ns);
            let mut sorted: Vec<f64> = recent.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            sum.ns_per_page = sorted[sorted.len() / 2];
            sum.bytes_per_page += (bytes - sum.bytes_per_page) * weight;
        }
        self.spent += t.elapsed();
    }

    /// Each candidate's cost, once [`MIN_SAMPLES`] pages were measured.
    pub fn costs(&self) -> Option<Vec<(Compressor, Cost)>> {
        (self.samples >= MIN_SAMPLES).then(|| CANDIDATES.iter().copied().zip(self.sums.iter().copied()).collect())
    }

    /// Pages measured.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Time spent measuring.
    pub fn spent(&self) -> Duration {
        self.spent
    }
}

/// Measures the link over windows of at least [`LINK_WINDOW`] from the wire bytes written and
/// whether the writer's queue was full (the link the bottleneck) at each observation.
#[derive(Debug, Default)]
pub struct LinkMeter {
    start: Option<(Instant, u64, u64)>,
    observations: u32,
    backlogged: u32,
}

impl LinkMeter {
    /// Starts a new window (at the start of a pass: the time between passes is no link time).
    pub fn restart(&mut self) {
        self.start = None;
    }

    /// The writer has written `wire_bytes` in all by `now`, carrying `pages` pages in all;
    /// `backlogged`: its queue was at least half full. Returns (bytes per second, pages per
    /// second, the link was the bottleneck) when a window ends.
    pub fn observe(&mut self, now: Instant, wire_bytes: u64, pages: u64, backlogged: bool) -> Option<(f64, f64, bool)> {
        let Some((t0, b0, p0)) = self.start else {
            self.start = Some((now, wire_bytes, pages));
            return None;
        };
        self.observations += 1;
        self.backlogged += u32::from(backlogged);
        let dt = now.saturating_duration_since(t0);
        if dt < LINK_WINDOW {
            return None;
        }
        let r = wire_bytes.saturating_sub(b0) as f64 / dt.as_secs_f64();
        let pr = pages.saturating_sub(p0) as f64 / dt.as_secs_f64();
        let link_bound = self.backlogged * 2 >= self.observations;
        self.start = Some((now, wire_bytes, pages));
        self.observations = 0;
        self.backlogged = 0;
        Some((r, pr, link_bound))
    }
}

/// Where a choice was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// Shared engine: the pre-copy iteration.
    pub iteration: Option<u32>,
    /// Stream engine: the chunk of QEMU's stream.
    pub chunk: Option<u64>,
    /// Bytes on the wire so far.
    pub wire_bytes: u64,
}

/// The link as the report states it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LinkReport {
    /// Wire bytes per second.
    pub bytes_per_s: f64,
    /// `measured` (the link was the bottleneck) or `at-least` (the sender was).
    pub kind: String,
}

/// One choice: the first, and each change.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CompressorChange {
    /// Shared engine: the iteration it was made in.
    pub iteration: Option<u32>,
    /// Stream engine: the chunk it was made after.
    pub chunk: Option<u64>,
    /// Wire bytes sent when it was made.
    pub wire_bytes: u64,
    /// The compressor before (none for the first choice).
    pub from: Option<String>,
    /// The compressor chosen.
    pub to: String,
    /// Why, in words.
    pub reason: String,
    /// The link then.
    pub link: Option<LinkReport>,
    /// Each candidate's prediction then, best first.
    pub predictions: Vec<Prediction>,
}

/// The report's `compressor` section.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct CompressorReport {
    /// `auto` or `forced`.
    pub mode: String,
    /// The compressor in use at the end.
    pub chosen: String,
    /// Threads the policy counted on.
    pub threads: usize,
    /// Pages measured with every candidate.
    pub sampled_pages: u64,
    /// Time spent measuring them.
    pub sampling_ms: f64,
    /// The first choice and every change.
    pub changes: Vec<CompressorChange>,
    /// The policy's last verdict, with its numbers (also when it kept the compressor); none
    /// when it never decided (forced, or too little measured).
    pub last_decision: Option<String>,
}

/// The compressor choice of one migration.
#[derive(Debug)]
pub struct AutoCompressor {
    mode: CompressorMode,
    threads: usize,
    current: Compressor,
    sampler: Sampler,
    link: Link,
    streak: Option<(Compressor, u32)>,
    report: CompressorReport,
    cpu_bound_sender: bool,
    /// Wire bytes and pages per second of the last whole window under one compressor.
    last_window: Option<(Compressor, f64, f64)>,
    /// The compressor changed during the current window.
    changed_in_window: bool,
    /// The last change, until a whole window under it shows whether it paid.
    trial: Option<Trial>,
    /// Candidates ruled out, with the windows left.
    ruled_out: Vec<(Compressor, u32)>,
}

/// A change on trial: `before` wire bytes and pages per second under `from`; `far`: the candidates ruled out
/// if it does not pay (`to` and every other on its side of `from` in CPU per page: they rest on
/// the same premise, that trading CPU for bytes, or bytes for CPU, moves more pages).
#[derive(Debug, Clone)]
struct Trial {
    from: Compressor,
    to: Compressor,
    before: (f64, f64),
    predicted: f64,
    /// `to` takes more CPU per page than `from` (trades CPU for bytes).
    more_cpu: bool,
    /// `to`'s sampled bytes per page over `from`'s.
    size_ratio: f64,
    far: Vec<Compressor>,
}

impl AutoCompressor {
    /// The choice of a migration whose encoder may use `threads` threads; records the first
    /// choice (lz4 for auto, before anything is measured).
    pub fn new(mode: CompressorMode, threads: usize) -> Self {
        let current = mode.initial();
        let reason = match mode {
            CompressorMode::Auto => "nothing measured yet: lz4, the cheapest compressor that still shrinks text and code (about 2x), until the link rate and the candidates' cost on this guest's pages are known".to_string(),
            CompressorMode::Forced(c) => format!("forced (--compressor {})", match c {
                Compressor::Zstd(_) => "zstd".to_string(),
                c => c.name(),
            }),
        };
        let report = CompressorReport {
            mode: if mode == CompressorMode::Auto { "auto" } else { "forced" }.into(),
            chosen: current.name(),
            threads,
            changes: vec![CompressorChange {
                iteration: None,
                chunk: None,
                wire_bytes: 0,
                from: None,
                to: current.name(),
                reason,
                link: None,
                predictions: Vec::new(),
            }],
            ..CompressorReport::default()
        };
        AutoCompressor {
            mode,
            threads: threads.max(1),
            current,
            sampler: Sampler::new(),
            link: Link::Unmeasured,
            streak: None,
            report,
            cpu_bound_sender: false,
            last_window: None,
            changed_in_window: false,
            trial: None,
            ruled_out: Vec::new(),
        }
    }

    /// The sender's own CPU is what limits it when the link does not
    /// ([`PolicyInput::cpu_bound_sender`]).
    #[must_use]
    pub fn cpu_bound_sender(mut self, yes: bool) -> Self {
        self.cpu_bound_sender = yes;
        self
    }

    /// The compressor in use.
    pub fn current(&self) -> Compressor {
        self.current
    }

    /// True when the choice may change.
    pub fn is_auto(&self) -> bool {
        self.mode == CompressorMode::Auto
    }

    /// A page being sent (sampled one in [`SAMPLE_EVERY`] non-zero pages; nothing when forced).
    pub fn offer(&mut self, page: &[u8; PAGE_SIZE]) {
        if self.is_auto() {
            self.sampler.offer(page);
        }
    }

    /// Measures a page picked by the caller (one in [`SAMPLE_EVERY`] of those sent).
    pub fn measure(&mut self, page: &[u8; PAGE_SIZE]) {
        if self.is_auto() {
            self.sampler.measure(page);
        }
    }

    /// A link measurement: `bytes_per_s` on the wire, and whether the link was the bottleneck.
    /// One taken while the sender was the bottleneck only raises a known rate (it is a lower
    /// bound).
    pub fn observe_link(&mut self, bytes_per_s: f64, link_bound: bool) {
        if !(bytes_per_s.is_finite() && bytes_per_s > 0.0) {
            return;
        }
        self.link = match (self.link, link_bound) {
            (_, true) => Link::Measured(bytes_per_s),
            (Link::Measured(l), false) => Link::Measured(l.max(bytes_per_s)),
            (Link::AtLeast(l), false) => Link::AtLeast(l.max(bytes_per_s)),
            (Link::Unmeasured, false) => Link::AtLeast(bytes_per_s),
        };
    }

    /// Decides with the sampled costs (nothing before [`MIN_SAMPLES`]); returns the change
    /// made, if any.
    pub fn decide(&mut self, at: Position) -> Option<&CompressorChange> {
        self.sync_sampling();
        let costs = self.sampler.costs()?;
        self.decide_on(&costs, at)
    }

    /// Decides with the given costs: the policy's best must win [`DWELL`] decisions in a row.
    pub fn decide_on(&mut self, costs: &[(Compressor, Cost)], at: Position) -> Option<&CompressorChange> {
        if !self.is_auto() {
            return None;
        }
        let allowed: Vec<(Compressor, Cost)> =
            costs.iter().copied().filter(|(c, _)| *c == self.current || !self.ruled_out.iter().any(|(r, _)| r == c)).collect();
        let v = choose(&PolicyInput { link: self.link, threads: self.threads, costs: &allowed, current: self.current, cpu_bound_sender: self.cpu_bound_sender });
        self.report.last_decision = Some(v.reason.clone());
        if v.best == self.current {
            self.streak = None;
            return None;
        }
        let n = match self.streak {
            Some((c, n)) if c == v.best => n + 1,
            _ => 1,
        };
        self.streak = Some((v.best, n));
        if n < DWELL {
            return None;
        }
        self.streak = None;
        let link = match self.link {
            Link::Unmeasured => None,
            Link::AtLeast(r) => Some(LinkReport { bytes_per_s: r, kind: "at-least".into() }),
            Link::Measured(r) => Some(LinkReport { bytes_per_s: r, kind: "measured".into() }),
        };
        let predicted = v.predictions.iter().find(|p| p.compressor == v.best.name()).map_or(0.0, |p| p.pages_per_s);
        self.report.changes.push(CompressorChange {
            iteration: at.iteration,
            chunk: at.chunk,
            wire_bytes: at.wire_bytes,
            from: Some(self.current.name()),
            to: v.best.name(),
            reason: v.reason,
            link,
            predictions: v.predictions,
        });
        let cost_of = |c: Compressor| allowed.iter().find(|(k, _)| *k == c).map(|(_, k)| *k);
        self.trial = match (self.last_window, cost_of(self.current), cost_of(v.best)) {
            (Some((c, bytes, pages)), Some(from), Some(to)) if c == self.current => Some(Trial {
                from: self.current,
                to: v.best,
                before: (bytes, pages),
                predicted,
                more_cpu: to.ns_per_page > from.ns_per_page,
                size_ratio: to.bytes_per_page / from.bytes_per_page.max(1.0),
                far: allowed
                    .iter()
                    .filter(|(_, k)| if to.ns_per_page > from.ns_per_page { k.ns_per_page > from.ns_per_page } else { k.ns_per_page < from.ns_per_page })
                    .map(|(c, _)| *c)
                    .collect(),
            }),
            _ => None,
        };
        self.changed_in_window = true;
        self.current = v.best;
        self.report.chosen = v.best.name();
        self.report.changes.last()
    }

    /// A new pass of the shared engine: its pages per second are not comparable with the last
    /// pass's, so a change on trial is left untested and the last window forgotten.
    pub fn new_pass(&mut self) {
        self.trial = None;
        self.last_window = None;
    }

    /// The wire bytes and pages per second of a link window that just ended (after
    /// [`Self::observe_link`]). A change is a prediction, and the first whole window under the
    /// new compressor tests its premise. A change to more compression assumes the link carries as
    /// many bytes per second as before (so smaller pages go faster); one to less, that the
    /// sender's CPU was the limit (so cheaper pages go faster). If the window carried fewer bytes
    /// per second, by at least half the drop the smaller pages would make at the same page rate
    /// and at least twice [`MARGIN`], and not more pages per second (more compression); or fewer
    /// pages per second by twice [`MARGIN`] and no more bytes (less compression): the
    /// premise was wrong (typically: the "link" was a receiver, or CPU shared with it, that
    /// compressed pages do not relieve). The page mix of a guest changes from window to window,
    /// so a single rate would not do: both must agree. Then the compressor goes back, and the
    /// candidate, with every other on its side of the old one in CPU per page, is ruled out for
    /// [`HOLD_WINDOWS`] windows.
    /// Returns that change. The shared engine calls it ([`SharedAuto`]); the stream engine's
    /// link figure comes from acknowledgements of raw stream bytes scaled by the recent chunks'
    /// wire/raw ratio, which lags a change by the window's depth, so one window would judge a mix
    /// of both compressors: it is not tested there (it measured 10-14 % below the capped link
    /// right after a change to zstd in the VM test at 100 Mbit/s).
    pub fn observe_window(&mut self, bytes_per_s: f64, pages_per_s: f64) -> Option<&CompressorChange> {
        if !self.is_auto() || !pages_per_s.is_finite() || !bytes_per_s.is_finite() {
            return None;
        }
        for r in &mut self.ruled_out {
            r.1 = r.1.saturating_sub(1);
        }
        self.ruled_out.retain(|r| r.1 > 0);
        let whole = !std::mem::replace(&mut self.changed_in_window, false);
        self.last_window = whole.then_some((self.current, bytes_per_s, pages_per_s));
        if !whole {
            return None;
        }
        let t = self.trial.take()?;
        let (bytes0, pages0) = t.before;
        let more_cpu = t.more_cpu;
        let failed = if more_cpu {
            // Pages as fast as before would carry `size_ratio` of the bytes: a drop of at least
            // half that (and of twice the margin: a rate cap's windows differ by 5-8 %).
            let drop = (0.5 * (1.0 - t.size_ratio)).max(2.0 * MARGIN);
            bytes_per_s < bytes0 * (1.0 - drop) && pages_per_s < pages0 * (1.0 + MARGIN)
        } else {
            pages_per_s < pages0 * (1.0 - 2.0 * MARGIN) && bytes_per_s < bytes0 * (1.0 + MARGIN)
        };
        if t.to != self.current || !failed {
            return None;
        }
        for c in &t.far {
            match self.ruled_out.iter_mut().find(|(r, _)| r == c) {
                Some(r) => r.1 = HOLD_WINDOWS,
                None => self.ruled_out.push((*c, HOLD_WINDOWS)),
            }
        }
        let names: Vec<String> = t.far.iter().map(|c| c.name()).collect();
        let reason = format!(
            "{} did not pay: {:.0} pages/s and {:.1} MB/s against {:.0} and {:.1} under {} before the change (predicted {:.0} pages/s): what limits this migration is not what the prediction assumed ({}); back to {}, {} ruled out for {HOLD_WINDOWS} link windows",
            t.to.name(),
            pages_per_s,
            bytes_per_s / 1e6,
            pages0,
            bytes0 / 1e6,
            t.from.name(),
            t.predicted,
            if more_cpu { "the link carried fewer bytes: a receiver, or CPU it shares, that compressed pages do not relieve" } else { "the pages got no faster: the link, not the sender's CPU" },
            t.from.name(),
            names.join(", ")
        );
        let wire_bytes = self.report.changes.last().map_or(0, |c| c.wire_bytes);
        let (iteration, chunk) = self.report.changes.last().map_or((None, None), |c| (c.iteration, c.chunk));
        self.report.changes.push(CompressorChange {
            iteration,
            chunk,
            wire_bytes,
            from: Some(t.to.name()),
            to: t.from.name(),
            reason,
            link: None,
            predictions: Vec::new(),
        });
        self.report.last_decision = self.report.changes.last().map(|c| c.reason.clone());
        self.streak = None;
        self.changed_in_window = true;
        self.last_window = None;
        self.current = t.from;
        self.report.chosen = t.from.name();
        self.report.changes.last()
    }

    fn sync_sampling(&mut self) {
        self.report.sampled_pages = self.sampler.samples();
        self.report.sampling_ms = self.sampler.spent().as_secs_f64() * 1000.0;
    }

    /// The report so far.
    pub fn report(&mut self) -> CompressorReport {
        self.sync_sampling();
        self.report.clone()
    }

    /// Decides at `at` and, on a change, sets the encoder's compressor and says so.
    pub fn apply(&mut self, at: Position, encoder: &mut Encoder, obs: &mut dyn Observer) {
        if let Some(change) = self.decide(at) {
            obs.progress(Progress::Phase(&phase_line(change)));
            encoder.set_compressor(self.current);
        }
    }
}

/// The shared engine's side: samples pages of each pass's list and measures the link at
/// every batch the pipeline hands to the writer ([`crate::pipeline::send_pages`]'s
/// `after_batch`), and changes the encoder's compressor there.
#[derive(Debug)]
pub struct SharedAuto {
    /// The choice.
    pub auto: AutoCompressor,
    meter: LinkMeter,
    next: usize,
    buf: Box<livemig_memory::PageBuf>,
}

impl SharedAuto {
    /// The choice of a shared-engine migration, its first choice said on `obs`.
    pub fn new(mode: CompressorMode, threads: usize, obs: &mut dyn Observer) -> Self {
        // The shared engine reads guest memory itself: when the link is not its bottleneck, its
        // own CPU is.
        let mut auto = AutoCompressor::new(mode, threads).cpu_bound_sender(true);
        announce(Some(&auto.report()), &mut 0, obs);
        SharedAuto { auto, meter: LinkMeter::default(), next: 0, buf: Box::new(livemig_memory::PageBuf::zeroed()) }
    }

    /// A pass begins (its list is new; the time since the last pass is no link time).
    pub fn start_pass(&mut self) {
        self.meter.restart();
        self.auto.new_pass();
        self.next = 0;
    }

    /// After a batch of pass `iteration`: the first `sent` pages of `list` are committed.
    /// Measures one page in [`SAMPLE_EVERY`] of them (read again from guest memory; zero pages
    /// are skipped), the link, and decides.
    #[allow(clippy::too_many_arguments)]
    pub fn after_batch(
        &mut self,
        mem: &livemig_memory::GuestMemory,
        list: &[(u64, bool)],
        sent: u64,
        links: &crate::link::Links,
        encoder: &mut Encoder,
        iteration: u32,
        obs: &mut dyn Observer,
    ) -> Result<(), crate::AgentError> {
        if !self.auto.is_auto() {
            return Ok(());
        }
        let sent = usize::try_from(sent).unwrap_or(usize::MAX).min(list.len());
        while self.next < sent {
            mem.read_page(list[self.next].0, &mut self.buf)?;
            self.auto.measure(&self.buf.0);
            self.next += SAMPLE_EVERY;
        }
        let backlogged = links.backlogged();
        let wire_bytes = links.total_bytes();
        if let Some((r, pages, link_bound)) = self.meter.observe(Instant::now(), wire_bytes, sent as u64, backlogged) {
            self.auto.observe_link(r, link_bound);
            if let Some(change) = self.auto.observe_window(r, pages) {
                obs.progress(Progress::Phase(&phase_line(change)));
                encoder.set_compressor(self.auto.current());
            }
        }
        self.auto.apply(Position { iteration: Some(iteration), chunk: None, wire_bytes }, encoder, obs);
        Ok(())
    }
}

/// The stream engine's side (the relay's thread, [`crate::stream::source`]): after each
/// chunk, samples one page in [`SAMPLE_EVERY`] of its PAGE records, measures the link from
/// what the receiver acknowledges ([`crate::stream::source::Window::drain_rate`], raw stream
/// bytes, times the wire/raw ratio of the recent chunks) and whether the link was the
/// bottleneck (the window or the writer's queue at least half full: with QEMU writing in small
/// pieces the relay's small chunks fill the writer's 16-frame queue before the window), and
/// decides.
#[derive(Debug)]
pub struct StreamAuto {
    /// The choice.
    pub auto: AutoCompressor,
    counter: usize,
    recent: std::collections::VecDeque<(Instant, u64, u64)>,
    wire_total: u64,
    window_start: Option<Instant>,
    observations: u32,
    backlogged: u32,
}

impl StreamAuto {
    /// The choice of a relay whose encoder runs on `threads` threads.
    pub fn new(mode: CompressorMode, threads: usize) -> Self {
        StreamAuto {
            auto: AutoCompressor::new(mode, threads),
            counter: 0,
            recent: std::collections::VecDeque::new(),
            wire_total: 0,
            window_start: None,
            observations: 0,
            backlogged: 0,
        }
    }

    /// After chunk `seq` (`raw` stream bytes, `wire` bytes of its frame, its `pages`) and
    /// before it enters `window`; `queue`: the writer's queue (frames queued, its capacity).
    /// Returns the report when the choice changed (the encoder's compressor is set).
    #[allow(clippy::too_many_arguments)]
    pub fn after_chunk<'a>(
        &mut self,
        pages: impl Iterator<Item = &'a [u8; PAGE_SIZE]>,
        (raw, wire): (u64, u64),
        window: &crate::stream::source::Window,
        queue: (usize, Option<usize>),
        seq: u64,
        encoder: &mut Encoder,
    ) -> Option<CompressorReport> {
        if !self.auto.is_auto() {
            return None;
        }
        let now = Instant::now();
        self.wire_total += wire;
        for p in pages {
            if self.counter.is_multiple_of(SAMPLE_EVERY) {
                self.auto.measure(p);
            }
            self.counter += 1;
        }
        self.recent.push_back((now, raw, wire));
        while self.recent.front().is_some_and(|(t, _, _)| now.saturating_duration_since(*t) > 2 * LINK_WINDOW) {
            self.recent.pop_front();
        }
        let (unacked, limit) = window.fill();
        self.observations += 1;
        let queued = queue.1.is_some_and(|c| queue.0 * 2 >= c);
        self.backlogged += u32::from(unacked * 2 >= limit || queued);
        let start = *self.window_start.get_or_insert(now);
        if now.saturating_duration_since(start) >= LINK_WINDOW {
            let (r, w) = self.recent.iter().fold((0u64, 0u64), |(r, w), c| (r + c.1, w + c.2));
            let dt = now.saturating_duration_since(start);
            if let Some(drain) = window.drain_rate(dt).filter(|_| r > 0) {
                self.auto.observe_link(drain * w as f64 / r as f64, self.backlogged * 2 >= self.observations);
            }
            (self.window_start, self.observations, self.backlogged) = (Some(now), 0, 0);
        }
        self.auto.decide(Position { iteration: None, chunk: Some(seq), wire_bytes: self.wire_total })?;
        encoder.set_compressor(self.auto.current());
        Some(self.auto.report())
    }
}

/// The progress line of a change.
pub fn phase_line(c: &CompressorChange) -> String {
    let at = match (c.iteration, c.chunk) {
        (Some(i), _) => format!("iteration {i}, "),
        (None, Some(k)) => format!("chunk {k}, "),
        (None, None) => String::new(),
    };
    match &c.from {
        None => format!("compressor: {}: {}", c.to, c.reason),
        Some(from) => format!("compressor: {from} -> {} ({at}{:.1} MiB sent): {}", c.to, c.wire_bytes as f64 / (1024.0 * 1024.0), c.reason),
    }
}

/// Says the changes of `report` from the `shown`-th on (the stream engine's relay thread has no
/// observer: its steering loop calls this).
pub fn announce(report: Option<&CompressorReport>, shown: &mut usize, obs: &mut dyn Observer) {
    let Some(r) = report else { return };
    for c in r.changes.iter().skip(*shown) {
        obs.progress(Progress::Phase(&phase_line(c)));
    }
    *shown = r.changes.len().max(*shown);
}

#[cfg(test)]
mod tests;
