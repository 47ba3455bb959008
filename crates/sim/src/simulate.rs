//! The replay: a guest model from the trace, a link model, and the engine's decision loop.

use livemig_control::{Decision, DowntimeController, Fit, IterationStats, Pending};
use serde::{Deserialize, Serialize};

use crate::{SimError, Trace};

/// Wire bytes of one uncompacted page: the 4096 bytes and a 13-byte record header.
pub const DEFAULT_BYTES_PER_PAGE: f64 = 4096.0 + 13.0;
/// Scan time per iteration when the trace records none.
pub const DEFAULT_SCAN_MS: f64 = 20.0;
/// The engine reports no wire rate for a burst smaller than this (see `iteration_stats` in the
/// send agent); the simulator does the same so the controllers see what they would see live.
const MIN_RATE_BURST_BYTES: u64 = 256 * 1024;
/// Hard stop for a controller that never ends (the shipped ones end at their iteration cap).
const MAX_SIM_ITERATIONS: u32 = 10_000;

/// The modelled link and per-iteration costs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkModel {
    /// Wire rate, bytes per second.
    pub bandwidth_bytes_per_s: f64,
    /// Wire bytes per page sent (4096 + 13 uncompacted; less with compaction).
    pub bytes_per_page: f64,
    /// Fixed cost of the switchover besides pages and scan (device state, resume), actual.
    pub overhead_ms: f64,
    /// Time of one dirty-page scan (each iteration, and the final one in downtime).
    pub scan_ms: f64,
}

impl LinkModel {
    /// A link of `bandwidth_bytes_per_s` with uncompacted pages, 60 ms of switchover overhead and
    /// 20 ms scans.
    pub fn new(bandwidth_bytes_per_s: f64) -> Self {
        LinkModel { bandwidth_bytes_per_s, bytes_per_page: DEFAULT_BYTES_PER_PAGE, overhead_ms: 60.0, scan_ms: DEFAULT_SCAN_MS }
    }

    /// [`LinkModel::new`] with the trace's median scan time, when it records one.
    pub fn for_trace(trace: &Trace, bandwidth_bytes_per_s: f64) -> Self {
        let mut l = LinkModel::new(bandwidth_bytes_per_s);
        if let Some(s) = trace.median_scan_ms() {
            l.scan_ms = s;
        }
        l
    }

    fn check(&self) -> Result<(), SimError> {
        let pos = |v: f64| v.is_finite() && v > 0.0;
        let nonneg = |v: f64| v.is_finite() && v >= 0.0;
        if !pos(self.bandwidth_bytes_per_s) {
            return Err(SimError::Link(format!("bandwidth {} bytes/s must be positive", self.bandwidth_bytes_per_s)));
        }
        if !pos(self.bytes_per_page) {
            return Err(SimError::Link(format!("{} wire bytes per page must be positive", self.bytes_per_page)));
        }
        if !nonneg(self.overhead_ms) || !nonneg(self.scan_ms) {
            return Err(SimError::Link("overhead and scan times must be zero or positive".into()));
        }
        Ok(())
    }

    /// Milliseconds to send `pages`.
    fn send_ms(&self, pages: u64) -> f64 {
        pages as f64 * self.bytes_per_page / self.bandwidth_bytes_per_s * 1000.0
    }

    fn wire_bytes(&self, pages: u64) -> u64 {
        round_u64(pages as f64 * self.bytes_per_page)
    }
}

/// How the simulated migration ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Switched over: the destination would run.
    Completed,
    /// The controller gave up (or the simulation's own iteration bound was hit).
    Aborted {
        /// Why.
        reason: String,
    },
}

impl Outcome {
    /// `completed` or `aborted`.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Aborted { .. } => "aborted",
        }
    }
}

/// One simulated iteration, as the engine would report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimIteration {
    /// The statistics the controller saw (for the final pass: its pages and downtime).
    #[serde(flatten)]
    pub stats: IterationStats,
    /// The decision taken after this iteration's scan.
    pub decision: Decision,
    /// The controller's trend fit after that decision, if it keeps one.
    pub fit: Option<Fit>,
    /// True for the final pass with the source paused.
    pub last: bool,
}

/// The result of one simulated migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimResult {
    /// Controller name.
    pub policy: String,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Pre-copy iterations sent with the guest running (the final pass not counted).
    pub precopy_iterations: u32,
    /// From the start to the destination running (or to the abort).
    pub total_time_ms: f64,
    /// Final scan + final pages at the bandwidth + overhead, when completed.
    pub downtime_ms: Option<f64>,
    /// Bytes put on the wire (pages only).
    pub wire_bytes: u64,
    /// Every iteration with its decision.
    pub iterations: Vec<SimIteration>,
}

impl SimResult {
    /// The controller's last fit, if any.
    pub fn last_fit(&self) -> Option<Fit> {
        self.iterations.iter().rev().find_map(|i| i.fit)
    }

    /// Index of the final (switchover) pass, when completed.
    pub fn switchover_index(&self) -> Option<u32> {
        self.iterations.iter().find(|i| i.last).map(|i| i.stats.index)
    }
}

/// The guest model of a trace: pages dirtied over a span of time in a given iteration.
#[derive(Debug, Clone)]
struct Guest {
    /// Pages per ms during trace iteration k (from the WWS of k+1 over the duration of k).
    rates: Vec<f64>,
    /// Largest WWS after iteration 0.
    cap: u64,
    ram_pages: u64,
}

impl Guest {
    fn new(trace: &Trace) -> Self {
        Guest { rates: trace.dirty_rates_per_ms(), cap: trace.working_set_cap(), ram_pages: trace.ram_pages }
    }

    /// Rate during simulated iteration k: the trace's, then cycling through its iterations after 0.
    fn rate(&self, k: usize) -> f64 {
        let n = self.rates.len();
        if k < n {
            self.rates[k]
        } else if n <= 1 {
            self.rates.first().copied().unwrap_or(0.0)
        } else {
            self.rates[1 + (k - n) % (n - 1)]
        }
    }

    /// Pages found dirty after simulated iteration k of `duration_ms`.
    fn dirtied(&self, k: usize, duration_ms: f64) -> u64 {
        round_u64(self.rate(k) * duration_ms).min(self.cap).min(self.ram_pages)
    }
}

/// Rounds a non-negative, finite value to u64, saturating (NaN and negatives give 0).
fn round_u64(v: f64) -> u64 {
    if v.is_nan() || v <= 0.0 {
        0
    } else if v >= u64::MAX as f64 {
        u64::MAX
    } else {
        // In range and non-negative after the checks above.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let r = v.round() as u64;
        r
    }
}

/// Replays `trace` through `policy` over `link`, feeding the controller `IterationStats` and
/// `Pending` exactly as the send engine does: scan, decide, then either send and record the
/// iteration, switch over (final scan and pages in downtime) or abort.
///
/// Guest model: iteration 0 sends the trace's iteration-0 dirty pages (the non-zero RAM); the
/// guest then dirties, during simulated iteration k of duration T, min(cap, rate_k * T) pages,
/// where rate_k is the trace's dirty rate during its iteration k (its WWS of k+1 over the
/// duration of k), cycling through the trace's iterations after 0 when the simulation runs
/// longer, and cap is the trace's largest WWS after iteration 0. A throttle decided by the
/// controller scales the guest's running time by the share of CPU time left to it.
pub fn simulate(trace: &Trace, policy: &mut dyn DowntimeController, link: LinkModel) -> Result<SimResult, SimError> {
    trace.validate()?;
    link.check()?;
    let guest = Guest::new(trace);
    let mut history: Vec<IterationStats> = Vec::new();
    let mut iterations = Vec::new();
    let mut total_time_ms = 0.0;
    let mut wire_bytes = 0u64;
    let mut dirty = trace.iterations[0].dirty_pages;
    let mut index: u32 = 0;
    let scan_ms = link.scan_ms;
    let mut throttle = 0.0;
    loop {
        let pending = Pending { index, dirty_pages: dirty, scan_ms, bytes_per_page: None };
        let decision = policy.decide(&history, &pending);
        match decision {
            Decision::Switchover { .. } => {
                // Final pass with the source paused: the scan, the pages, the fixed overhead.
                let send_ms = link.send_ms(dirty);
                // The device state crosses the link in downtime too (the controller's estimate).
                let device_ms = livemig_control::DEVICE_STATE_ESTIMATE_BYTES / link.bandwidth_bytes_per_s * 1000.0;
                let downtime = scan_ms + send_ms + device_ms + link.overhead_ms;
                let bytes = link.wire_bytes(dirty);
                total_time_ms += downtime;
                wire_bytes += bytes;
                let stats = IterationStats {
                    index,
                    dirty_pages: dirty,
                    sent_pages: dirty,
                    wire_bytes: bytes,
                    duration_ms: downtime,
                    scan_ms,
                    rate_bytes_per_s: link.bandwidth_bytes_per_s,
                    throttle,
                };
                iterations.push(SimIteration { stats, decision, fit: policy.fit(), last: true });
                return Ok(SimResult {
                    policy: policy.name().to_string(),
                    outcome: Outcome::Completed,
                    precopy_iterations: index,
                    total_time_ms,
                    downtime_ms: Some(downtime),
                    wire_bytes,
                    iterations,
                });
            }
            Decision::Abort { ref reason, .. } => {
                let reason = reason.clone();
                total_time_ms += scan_ms;
                let stats = IterationStats {
                    index,
                    dirty_pages: dirty,
                    sent_pages: 0,
                    wire_bytes: 0,
                    duration_ms: scan_ms,
                    scan_ms,
                    rate_bytes_per_s: 0.0,
                    throttle,
                };
                iterations.push(SimIteration { stats, decision, fit: policy.fit(), last: false });
                return Ok(aborted(policy.name(), reason, index, total_time_ms, wire_bytes, iterations));
            }
            Decision::Throttle { fraction, .. } => throttle = fraction,
            Decision::Continue { .. } => {}
        }
        if index >= MAX_SIM_ITERATIONS {
            let reason = format!("the controller did not end the migration within {MAX_SIM_ITERATIONS} iterations");
            return Ok(aborted(policy.name(), reason, index, total_time_ms, wire_bytes, iterations));
        }
        let bytes = link.wire_bytes(dirty);
        let duration_ms = scan_ms + link.send_ms(dirty);
        let stats = IterationStats {
            index,
            dirty_pages: dirty,
            sent_pages: dirty,
            wire_bytes: bytes,
            duration_ms,
            scan_ms,
            rate_bytes_per_s: if bytes >= MIN_RATE_BURST_BYTES { link.bandwidth_bytes_per_s } else { 0.0 },
            throttle,
        };
        iterations.push(SimIteration { stats: stats.clone(), decision, fit: policy.fit(), last: false });
        history.push(stats);
        total_time_ms += duration_ms;
        wire_bytes += bytes;
        let k = usize::try_from(index).unwrap_or(usize::MAX);
        // A throttled guest runs only the share of the time left to it.
        dirty = guest.dirtied(k, duration_ms * (1.0 - throttle));
        index += 1;
    }
}

fn aborted(
    policy: &str,
    reason: String,
    index: u32,
    total_time_ms: f64,
    wire_bytes: u64,
    iterations: Vec<SimIteration>,
) -> SimResult {
    SimResult {
        policy: policy.to_string(),
        outcome: Outcome::Aborted { reason },
        precopy_iterations: index,
        total_time_ms,
        downtime_ms: None,
        wire_bytes,
        iterations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TraceIteration;
    use livemig_control::{AdaptivePolicy, FixedPolicy, Limits};

    /// 100 Mbit/s.
    const LINK: f64 = 12.5e6;

    fn trace(points: &[(u64, f64)]) -> Trace {
        Trace {
            version: 1,
            source: "unit test".into(),
            page_size: 4096,
            ram_pages: 131_072,
            iterations: points
                .iter()
                .enumerate()
                .map(|(i, &(dirty_pages, duration_ms))| TraceIteration {
                    index: u32::try_from(i).unwrap(),
                    dirty_pages,
                    duration_ms,
                    wire_bytes: None,
                    sent_pages: None,
                    scan_ms: None,
                    throttle: None,
                })
                .collect(),
        }
    }

    /// WWS falling as it would at 100 Mbit/s with a guest whose writes cool down.
    fn converging() -> Trace {
        trace(&[(60_000, 19_700.0), (20_000, 6_600.0), (8_000, 2_650.0), (3_000, 1_000.0), (1_200, 420.0), (500, 185.0), (300, 120.0)])
    }

    /// 40000 pages in 3 s, then a 5000-page working set rewritten every 400 ms (~51 MB/s, four
    /// times what 100 Mbit/s carries). 5000 pages take ~1.64 s at 100 Mbit/s: within a 2 s maximum.
    fn hot() -> Trace {
        let mut p = vec![(40_000, 3_000.0)];
        p.extend([(5_000, 400.0); 10]);
        trace(&p)
    }

    fn fixed(max: f64) -> FixedPolicy {
        FixedPolicy { limits: Limits { max_downtime_ms: max, ..Limits::default() } }
    }

    fn adaptive(max: f64) -> AdaptivePolicy {
        AdaptivePolicy::new(Limits { max_downtime_ms: max, ..Limits::default() })
    }

    #[test]
    fn converging_trace_completes_under_both_policies() {
        let t = converging();
        for policy in [&mut fixed(300.0) as &mut dyn DowntimeController, &mut adaptive(2000.0)] {
            let r = simulate(&t, policy, LinkModel::new(LINK)).unwrap();
            assert_eq!(r.outcome, Outcome::Completed, "{}: {r:#?}", r.policy);
            let d = r.downtime_ms.unwrap();
            assert!(d <= 300.0, "{}: downtime {d}", r.policy);
            assert!(r.precopy_iterations >= 3, "{}: {}", r.policy, r.precopy_iterations);
            let last = r.iterations.last().unwrap();
            assert!(last.last && matches!(last.decision, Decision::Switchover { .. }));
            // the controller's prediction matches the model (same overhead, bytes per page, rate)
            assert!((last.decision.predicted_downtime_ms() - d).abs() < 1.0, "{} vs {d}", last.decision.predicted_downtime_ms());
            let sent: u64 = r.iterations.iter().map(|i| i.stats.wire_bytes).sum();
            assert_eq!(sent, r.wire_bytes);
        }
    }

    #[test]
    fn hot_trace_aborts_under_fixed_and_completes_under_adaptive() {
        let t = hot();
        let r = simulate(&t, &mut fixed(300.0), LinkModel::new(LINK)).unwrap();
        assert!(matches!(r.outcome, Outcome::Aborted { .. }), "{r:#?}");
        assert_eq!(r.downtime_ms, None);
        assert_eq!(r.precopy_iterations, Limits::default().max_iterations);
        assert!(r.iterations.len() > t.iterations.len(), "runs past the trace by cycling it");

        let r = simulate(&t, &mut adaptive(2000.0), LinkModel::new(LINK)).unwrap();
        assert_eq!(r.outcome, Outcome::Completed, "{r:#?}");
        let d = r.downtime_ms.unwrap();
        assert!(d > 300.0 && d <= 2000.0, "downtime {d}");
        assert!(r.precopy_iterations < 10, "adaptive stops on a flat trend: {}", r.precopy_iterations);
        assert!(r.last_fit().is_some());
        assert_eq!(r.switchover_index(), Some(r.precopy_iterations));
    }

    #[test]
    fn working_set_cap_bounds_the_wws() {
        let t = hot();
        let r = simulate(&t, &mut fixed(300.0), LinkModel::new(LINK)).unwrap();
        // 40000 pages at 100 Mbit/s take ~13 s: the guest would dirty far more, but its working set is 5000
        assert_eq!(r.iterations[1].stats.dirty_pages, 5000);
        assert!(r.iterations.iter().skip(1).all(|i| i.stats.dirty_pages <= 5000));
    }

    #[test]
    fn deterministic() {
        let t = hot();
        let a = simulate(&t, &mut adaptive(2000.0), LinkModel::new(LINK)).unwrap();
        let b = simulate(&t, &mut adaptive(2000.0), LinkModel::new(LINK)).unwrap();
        assert_eq!(a, b);
        assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
    }

    #[test]
    fn faster_link_converges_sooner() {
        let t = hot();
        // 1 Gbit/s sends 5000 pages in ~165 ms: fits 300 ms once the guest's rate is below the link's
        let r = simulate(&t, &mut fixed(300.0), LinkModel::new(125e6)).unwrap();
        assert_eq!(r.outcome, Outcome::Completed, "{r:#?}");
    }

    #[test]
    fn rejects_a_bad_link() {
        let e = simulate(&hot(), &mut fixed(300.0), LinkModel::new(0.0)).unwrap_err();
        assert!(e.to_string().contains("bandwidth"), "{e}");
        let mut l = LinkModel::new(LINK);
        l.bytes_per_page = f64::NAN;
        assert!(simulate(&hot(), &mut fixed(300.0), l).is_err());
    }

    #[test]
    fn rate_cycles_through_later_iterations() {
        let g = Guest { rates: vec![1.0, 2.0, 3.0], cap: 100, ram_pages: 100 };
        let seq: Vec<f64> = (0..7).map(|k| g.rate(k)).collect();
        assert_eq!(seq, vec![1.0, 2.0, 3.0, 2.0, 3.0, 2.0, 3.0]);
        assert_eq!(g.dirtied(0, 1000.0), 100);
    }
}
