//! Downtime controllers: pure functions of the iteration history that decide whether pre-copy
//! goes on or switches over. One controller serves the engine, the simulator and the tests.

use serde::{Deserialize, Serialize};

/// Statistics of one finished pre-copy iteration (the writable working set and what it cost).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IterationStats {
    /// Index, from 0.
    pub index: u32,
    /// Pages found dirty by this iteration's scan (its WWS).
    pub dirty_pages: u64,
    /// Pages sent.
    pub sent_pages: u64,
    /// Bytes put on the wire.
    pub wire_bytes: u64,
    /// Wall time of the iteration (scan and send).
    pub duration_ms: f64,
    /// Part of it spent scanning.
    pub scan_ms: f64,
    /// Wire rate during the send phase.
    pub rate_bytes_per_s: f64,
    /// Fraction of the guest's CPU time taken away during the iteration (0 = untouched).
    #[serde(default)]
    pub throttle: f64,
}

/// What is known when a decision is due: the latest scan, not yet sent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// Index the next iteration would have.
    pub index: u32,
    /// Pages the latest scan found dirty.
    pub dirty_pages: u64,
    /// Time of that scan (a final scan in downtime costs about as much); the stream engine: the
    /// time to drain what its relay holds, which goes before the pending pages.
    pub scan_ms: f64,
    /// Wire bytes a pending page will cost, where the engine knows better than the recent
    /// iterations' mean (the stream engine: what its re-sent pages cost, where the iterations
    /// after the first pass still mix in first-sent cold pages that compress far better).
    #[serde(default)]
    pub bytes_per_page: Option<f64>,
}

/// Bounds set by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Longest acceptable downtime.
    pub max_downtime_ms: f64,
    /// Most pre-copy iterations.
    pub max_iterations: u32,
    /// Fixed cost of a switchover besides pages and scan (device state, resume), estimated.
    pub overhead_ms: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_downtime_ms: 300.0, max_iterations: 30, overhead_ms: 60.0 }
    }
}

/// A linear fit `y = intercept + slope * x` of the WWS over the iteration index.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Fit {
    /// Pages per iteration at index 0.
    pub intercept: f64,
    /// Change of pages per iteration.
    pub slope: f64,
    /// Points fitted.
    pub points: u32,
}

impl Fit {
    /// Value of the fit at `x`.
    pub fn at(&self, x: f64) -> f64 {
        self.intercept + self.slope * x
    }
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Decision {
    /// Send the pending pages and iterate again.
    Continue {
        /// Downtime if we switched over now.
        predicted_downtime_ms: f64,
        /// Why.
        reason: String,
    },
    /// Pause the source and send what is left.
    Switchover {
        /// Expected downtime.
        predicted_downtime_ms: f64,
        /// Why.
        reason: String,
    },
    /// Slow the guest to bring its writable working set down, then iterate again.
    Throttle {
        /// Fraction of the guest's CPU time to take away from now on (0..1).
        fraction: f64,
        /// Downtime if we switched over now.
        predicted_downtime_ms: f64,
        /// Why.
        reason: String,
    },
    /// Give up: the migration cannot finish within the limits; the source keeps running.
    Abort {
        /// Downtime a switchover would have cost.
        predicted_downtime_ms: f64,
        /// Why.
        reason: String,
    },
}

impl Decision {
    /// Predicted downtime carried by every decision.
    pub fn predicted_downtime_ms(&self) -> f64 {
        match self {
            Decision::Continue { predicted_downtime_ms, .. }
            | Decision::Switchover { predicted_downtime_ms, .. }
            | Decision::Throttle { predicted_downtime_ms, .. }
            | Decision::Abort { predicted_downtime_ms, .. } => *predicted_downtime_ms,
        }
    }
    /// Why the controller decided so.
    pub fn reason(&self) -> &str {
        match self {
            Decision::Continue { reason, .. }
            | Decision::Switchover { reason, .. }
            | Decision::Throttle { reason, .. }
            | Decision::Abort { reason, .. } => reason,
        }
    }
    /// Short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Decision::Continue { .. } => "continue",
            Decision::Switchover { .. } => "switchover",
            Decision::Throttle { .. } => "throttle",
            Decision::Abort { .. } => "abort",
        }
    }
}

/// Decides after every scan.
pub trait DowntimeController: Send {
    /// Name for reports.
    fn name(&self) -> &'static str;
    /// The decision for `pending`, given the finished iterations.
    fn decide(&mut self, history: &[IterationStats], pending: &Pending) -> Decision;
    /// The latest trend fit, if the policy uses one.
    fn fit(&self) -> Option<Fit> {
        None
    }
}

/// Wire bytes per page (median of the last three iterations that sent) and wire rate: the
/// smaller of the latest rate and that median, so a drop of the link is seen at once.
pub fn link_estimate(history: &[IterationStats]) -> (f64, f64) {
    let recent: Vec<&IterationStats> =
        history.iter().rev().filter(|s| s.sent_pages > 0 && s.rate_bytes_per_s > 0.0).take(3).collect();
    if recent.is_empty() {
        return (4096.0, 0.0);
    }
    let mut bpp: Vec<f64> = recent.iter().map(|s| s.wire_bytes as f64 / s.sent_pages as f64).collect();
    let mut rate: Vec<f64> = recent.iter().map(|s| s.rate_bytes_per_s).collect();
    let latest = rate[0];
    (median(&mut bpp), median(&mut rate).min(latest))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes of QEMU device state assumed to cross the link during downtime (a small VM sends about
/// 330 KiB; it travels in livemig's stream, so a slow link makes it part of the downtime).
pub const DEVICE_STATE_ESTIMATE_BYTES: f64 = 512.0 * 1024.0;

/// Downtime a switchover now would cost: the final scan, the pending pages at the recent wire
/// bytes per page and rate, the device state at that rate, and the fixed overhead. Infinite when
/// no rate was measured yet.
pub fn predict_downtime_ms(history: &[IterationStats], pending: &Pending, limits: &Limits) -> f64 {
    let (bpp, rate) = link_estimate(history);
    let bpp = pending.bytes_per_page.unwrap_or(bpp);
    if rate <= 0.0 {
        return f64::INFINITY;
    }
    pending.scan_ms + (pending.dirty_pages as f64 * bpp + DEVICE_STATE_ESTIMATE_BYTES) / rate * 1000.0 + limits.overhead_ms
}

/// QEMU's rule: switch over when the pending pages fit the maximum downtime at the measured rate;
/// otherwise iterate, and give up at the iteration cap.
#[derive(Debug, Clone)]
pub struct FixedPolicy {
    /// The bounds.
    pub limits: Limits,
}

impl DowntimeController for FixedPolicy {
    fn name(&self) -> &'static str {
        "fixed"
    }

    fn decide(&mut self, history: &[IterationStats], pending: &Pending) -> Decision {
        let predicted = predict_downtime_ms(history, pending, &self.limits);
        let max = self.limits.max_downtime_ms;
        if predicted <= max {
            Decision::Switchover {
                predicted_downtime_ms: predicted,
                reason: format!("{} dirty pages fit the {max:.0} ms limit", pending.dirty_pages),
            }
        } else if pending.index >= self.limits.max_iterations {
            Decision::Abort {
                predicted_downtime_ms: predicted,
                reason: format!(
                    "did not converge in {} iterations: {} dirty pages would need {predicted:.0} ms of downtime, more than the {max:.0} ms limit",
                    self.limits.max_iterations, pending.dirty_pages
                ),
            }
        } else {
            Decision::Continue {
                predicted_downtime_ms: predicted,
                reason: format!("predicted {predicted:.0} ms > {max:.0} ms"),
            }
        }
    }
}

/// What the adaptive policy does when even the best downtime the trend allows exceeds the
/// operator's maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnNoConverge {
    /// Slow the guest step by step ([`THROTTLE_STEPS`]) until the trend fits the maximum.
    #[default]
    Throttle,
    /// Leave the guest untouched and give up at the iteration cap.
    Fail,
}

/// The throttle levels the adaptive policy steps through, as fractions of the guest's CPU time
/// taken away.
pub const THROTTLE_STEPS: [f64; 4] = [0.5, 0.75, 0.9, 0.97];

/// The throttle in force: that of the latest finished iteration.
pub fn current_throttle(history: &[IterationStats]) -> f64 {
    history.last().map_or(0.0, |s| s.throttle)
}

/// Least-squares fit of the WWS (dirty pages) over the iteration index.
pub fn fit_wws(points: &[(f64, f64)]) -> Option<Fit> {
    let n = points.len();
    if n < 2 {
        return None;
    }
    let nf = n as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / nf;
    let my = points.iter().map(|p| p.1).sum::<f64>() / nf;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    if sxx == 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = sxy / sxx;
    Some(Fit { intercept: my - slope * mx, slope, points: u32::try_from(n).unwrap_or(u32::MAX) })
}

/// Adaptive downtime control (Piao et al. 2014): fit the trend of the writable working set over
/// the last iterations; while it falls clearly, iterate; when it is flat or rising, more
/// iterations buy nothing, so switch over now, at the smallest downtime the trend allows, provided
/// it is within the operator's maximum. Switches over at once when the pending pages already fit
/// the target downtime.
#[derive(Debug, Clone)]
pub struct AdaptivePolicy {
    /// The bounds; `max_downtime_ms` is the operator's maximum.
    pub limits: Limits,
    /// Downtime that is good enough to switch over at once.
    pub target_downtime_ms: f64,
    /// Iterations the fit looks back over.
    pub window: usize,
    /// A fall of at least this fraction of the current WWS per iteration counts as converging.
    pub min_relative_fall: f64,
    /// What to do when the trend does not reach the maximum.
    pub on_no_converge: OnNoConverge,
    last_fit: Option<Fit>,
}

impl AdaptivePolicy {
    /// A policy with the given maximum; the target is the smaller of 300 ms and the maximum.
    pub fn new(limits: Limits) -> Self {
        AdaptivePolicy {
            target_downtime_ms: limits.max_downtime_ms.min(300.0),
            limits,
            window: 6,
            min_relative_fall: 0.05,
            on_no_converge: OnNoConverge::default(),
            last_fit: None,
        }
    }

    /// The same policy with another answer to a trend that does not converge.
    pub fn on_no_converge(mut self, on: OnNoConverge) -> Self {
        self.on_no_converge = on;
        self
    }

    /// The next throttle level, if throttling is allowed and the current level has had an
    /// iteration to show its effect.
    fn next_throttle(&self, history: &[IterationStats]) -> Option<f64> {
        if self.on_no_converge != OnNoConverge::Throttle {
            return None;
        }
        let current = current_throttle(history);
        // The scan pending now saw a whole iteration at the current level only if the level
        // did not change at the start of the latest iteration.
        let settled = history.len() < 2 || history[history.len() - 2].throttle == current;
        if !settled {
            return None;
        }
        THROTTLE_STEPS.iter().copied().find(|&s| s > current)
    }
}

impl DowntimeController for AdaptivePolicy {
    fn name(&self) -> &'static str {
        "adaptive"
    }

    fn fit(&self) -> Option<Fit> {
        self.last_fit
    }

    fn decide(&mut self, history: &[IterationStats], pending: &Pending) -> Decision {
        let predicted = predict_downtime_ms(history, pending, &self.limits);
        let max = self.limits.max_downtime_ms;
        // The WWS series: every finished iteration after the first full pass, plus the pending scan.
        let mut points: Vec<(f64, f64)> = history
            .iter()
            .filter(|s| s.index > 0)
            .map(|s| (f64::from(s.index), s.dirty_pages as f64))
            .collect();
        points.push((f64::from(pending.index), pending.dirty_pages as f64));
        let start = points.len().saturating_sub(self.window);
        let fit = fit_wws(&points[start..]);
        self.last_fit = fit;

        if predicted <= self.target_downtime_ms {
            return Decision::Switchover {
                predicted_downtime_ms: predicted,
                reason: format!("predicted {predicted:.0} ms fits the {:.0} ms target", self.target_downtime_ms),
            };
        }
        let current = pending.dirty_pages.max(1) as f64;
        let threshold = current * (1.0 - self.min_relative_fall);
        // The last step must have fallen too: an early steep fall must not hide a plateau.
        let last_step_fell = history
            .iter()
            .rev()
            .find(|s| s.index > 0)
            .is_some_and(|prev| current < prev.dirty_pages as f64 * (1.0 - self.min_relative_fall));
        let converging = match fit {
            // Too little history to tell: keep iterating.
            None => true,
            Some(f) if f.points < 3 => true,
            Some(f) => f.at(f64::from(pending.index) + 1.0) < threshold && last_step_fell,
        };
        if converging && pending.index < self.limits.max_iterations {
            let slope = fit.map_or(String::from("n/a"), |f| format!("{:.0} pages/iteration", f.slope));
            return Decision::Continue {
                predicted_downtime_ms: predicted,
                reason: format!("WWS still falling (slope {slope})"),
            };
        }
        if predicted <= max {
            let why = if converging { "iteration cap reached" } else { "WWS trend flat or rising" };
            Decision::Switchover {
                predicted_downtime_ms: predicted,
                reason: format!("{why}: switching over at {predicted:.0} ms, within the {max:.0} ms maximum"),
            }
        } else if let Some(fraction) = self.next_throttle(history).filter(|_| pending.index < self.limits.max_iterations) {
            Decision::Throttle {
                fraction,
                predicted_downtime_ms: predicted,
                reason: format!(
                    "WWS not shrinking and {predicted:.0} ms > {max:.0} ms maximum: slowing the guest by {:.0}%",
                    fraction * 100.0
                ),
            }
        } else if pending.index >= self.limits.max_iterations {
            Decision::Abort {
                predicted_downtime_ms: predicted,
                reason: format!(
                    "the writable working set does not shrink: a switchover would need {predicted:.0} ms of downtime, more than the {max:.0} ms maximum, after {} iterations",
                    pending.index
                ),
            }
        } else {
            Decision::Continue {
                predicted_downtime_ms: predicted,
                reason: format!("WWS not shrinking and {predicted:.0} ms > {max:.0} ms maximum; waiting for a lull"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: f64 = 4096.0;
    /// 100 Mbit/s in bytes per second.
    const LINK: f64 = 12.5e6;

    /// Runs a controller over a WWS series; each iteration sends its WWS at `rates[i]`. `wws[i]`
    /// is what the guest dirties untouched; a throttle in force while it was dirtied scales it
    /// by the share of CPU time left to the guest.
    fn run(c: &mut dyn DowntimeController, wws: &[u64], rates: &[f64]) -> Vec<Decision> {
        let mut history: Vec<IterationStats> = Vec::new();
        let mut out = Vec::new();
        let mut throttle = 0.0;
        for (i, &w) in wws.iter().enumerate() {
            let index = u32::try_from(i).unwrap();
            // Test data: small non-negative values.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let w = (w as f64 * (1.0 - current_throttle(&history))).round() as u64;
            let pending = Pending { index, dirty_pages: w, scan_ms: 10.0, bytes_per_page: None };
            let d = c.decide(&history, &pending);
            let stop = !matches!(d, Decision::Continue { .. } | Decision::Throttle { .. });
            if let Decision::Throttle { fraction, .. } = d {
                throttle = fraction;
            }
            out.push(d);
            if stop {
                break;
            }
            let rate = rates[i.min(rates.len() - 1)];
            history.push(IterationStats {
                index,
                dirty_pages: w,
                sent_pages: w,
                wire_bytes: w * 4096,
                duration_ms: w as f64 * PAGE / rate * 1000.0,
                scan_ms: 10.0,
                rate_bytes_per_s: rate,
                throttle,
            });
        }
        out
    }

    fn limits(max: f64, cap: u32) -> Limits {
        Limits { max_downtime_ms: max, max_iterations: cap, overhead_ms: 50.0 }
    }

    #[test]
    fn fit_is_least_squares() {
        let f = fit_wws(&[(1.0, 10.0), (2.0, 8.0), (3.0, 6.0)]).unwrap();
        assert!((f.slope + 2.0).abs() < 1e-9);
        assert!((f.at(0.0) - 12.0).abs() < 1e-9);
        assert!(fit_wws(&[(1.0, 3.0)]).is_none());
    }

    #[test]
    fn no_rate_yet_means_infinite_prediction() {
        let p = Pending { index: 0, dirty_pages: 10, scan_ms: 1.0, bytes_per_page: None };
        assert!(predict_downtime_ms(&[], &p, &Limits::default()).is_infinite());
    }

    #[test]
    fn fixed_converging_switches_over_when_it_fits() {
        // 100 Mbit/s: 300 ms holds ~(300-60)/1000*12.5e6/4096 = 732 pages
        let wws = [131_072, 20_000, 8_000, 3_000, 1_000, 600, 500];
        let d = run(&mut FixedPolicy { limits: limits(300.0, 30) }, &wws, &[LINK]);
        let last = d.last().unwrap();
        assert!(matches!(last, Decision::Switchover { .. }), "{last:?}");
        assert_eq!(d.len(), 6, "switches at the first WWS that fits (600 pages)");
        assert!(last.predicted_downtime_ms() <= 300.0);
    }

    #[test]
    fn fixed_flat_aborts_at_cap() {
        let wws = [131_072; 12];
        let d = run(&mut FixedPolicy { limits: limits(300.0, 10) }, &wws, &[LINK]);
        assert!(matches!(d.last().unwrap(), Decision::Abort { .. }));
        assert_eq!(d.len(), 11);
    }

    #[test]
    fn adaptive_converging_waits_for_target() {
        let wws = [131_072, 20_000, 8_000, 3_000, 1_000, 600, 500];
        let d = run(&mut AdaptivePolicy::new(limits(2000.0, 30)), &wws, &[LINK]);
        assert!(matches!(d.last().unwrap(), Decision::Switchover { .. }));
        assert!(d.last().unwrap().predicted_downtime_ms() <= 300.0);
    }

    #[test]
    fn adaptive_flat_switches_within_max() {
        // flat WWS of 4000 pages: ~1.4 s at 100 Mbit/s; fixed 300 ms would never end
        let wws = [131_072, 4000, 4010, 3990, 4005, 4000, 4000, 4000, 4000, 4000, 4000];
        let d = run(&mut AdaptivePolicy::new(limits(2000.0, 30)), &wws, &[LINK]);
        let last = d.last().unwrap();
        assert!(matches!(last, Decision::Switchover { .. }), "{d:?}");
        assert!(last.predicted_downtime_ms() <= 2000.0);
        assert!(d.len() <= 5, "does not iterate on a flat trend: {}", d.len());
        let f = run(&mut FixedPolicy { limits: limits(300.0, 10) }, &wws, &[LINK]);
        assert!(matches!(f.last().unwrap(), Decision::Abort { .. }));
    }

    #[test]
    fn adaptive_growing_switches_early_or_aborts() {
        let wws = [131_072, 2000, 2600, 3300, 4100, 5000, 6000, 7000];
        let d = run(&mut AdaptivePolicy::new(limits(2000.0, 30)), &wws, &[LINK]);
        let last = d.last().unwrap();
        assert!(matches!(last, Decision::Switchover { .. }), "{d:?}");
        // growing working set that never fits, throttling refused: abort at the cap, never
        // exceed the maximum
        let huge = [131_072, 50_000, 60_000, 70_000, 80_000, 90_000, 100_000, 110_000];
        let fail = || AdaptivePolicy::new(limits(2000.0, 6)).on_no_converge(OnNoConverge::Fail);
        let d = run(&mut fail(), &huge, &[LINK]);
        assert!(matches!(d.last().unwrap(), Decision::Abort { .. }), "{d:?}");
        assert!(d.iter().all(|x| !matches!(x, Decision::Switchover { .. } | Decision::Throttle { .. })));
    }

    #[test]
    fn adaptive_throttles_a_guest_that_never_fits_then_switches_within_max() {
        // 20,000 pages per iteration flat: ~6.6 s at 100 Mbit/s; a 1 s maximum needs the guest
        // slowed to under ~2,900 pages per iteration, i.e. the 0.9 step.
        let hot = [131_072, 20_000, 20_000, 20_000, 20_000, 20_000, 20_000, 20_000, 20_000, 20_000, 20_000, 20_000, 20_000, 20_000];
        let d = run(&mut AdaptivePolicy::new(limits(1000.0, 30)), &hot, &[LINK]);
        let last = d.last().unwrap();
        assert!(matches!(last, Decision::Switchover { .. }), "{d:?}");
        assert!(last.predicted_downtime_ms() <= 1000.0, "{last:?}");
        let steps: Vec<f64> =
            d.iter().filter_map(|x| if let Decision::Throttle { fraction, .. } = x { Some(*fraction) } else { None }).collect();
        assert_eq!(steps, [0.5, 0.75, 0.9], "steps up one level at a time, no further than needed: {d:?}");
        // every step waited for an iteration at the previous level
        let idx: Vec<usize> = d.iter().enumerate().filter(|(_, x)| matches!(x, Decision::Throttle { .. })).map(|(i, _)| i).collect();
        assert!(idx.windows(2).all(|w| w[1] - w[0] >= 2), "{idx:?}");
        // with throttling refused the same guest is given up at the cap
        let d = run(&mut AdaptivePolicy::new(limits(1000.0, 12)).on_no_converge(OnNoConverge::Fail), &hot, &[LINK]);
        assert!(matches!(d.last().unwrap(), Decision::Abort { .. }), "{d:?}");
        // a guest too hot even at the last step gives up at the cap, throttled to the last step
        let inferno = [131_072; 20];
        let d = run(&mut AdaptivePolicy::new(limits(1000.0, 15)), &inferno, &[LINK]);
        assert!(matches!(d.last().unwrap(), Decision::Abort { .. }), "{d:?}");
        assert!(d.iter().any(|x| matches!(x, Decision::Throttle { fraction, .. } if *fraction == 0.97)));
    }

    #[test]
    fn fixed_never_throttles() {
        let hot = [131_072; 12];
        let d = run(&mut FixedPolicy { limits: limits(300.0, 10) }, &hot, &[LINK]);
        assert!(d.iter().all(|x| !matches!(x, Decision::Throttle { .. })));
    }

    #[test]
    fn adaptive_oscillating_and_noisy_end_within_max() {
        let osc = [131_072, 6000, 2000, 6000, 2000, 6000, 2000, 6000, 2000, 6000, 2000];
        let d = run(&mut AdaptivePolicy::new(limits(2000.0, 30)), &osc, &[LINK]);
        let last = d.last().unwrap();
        assert!(matches!(last, Decision::Switchover { .. }), "{d:?}");
        assert!(last.predicted_downtime_ms() <= 2000.0);
        let noisy = [131_072, 5200, 4700, 5100, 4900, 5300, 4800, 5000, 5100, 4950];
        let d = run(&mut AdaptivePolicy::new(limits(2000.0, 30)), &noisy, &[LINK]);
        assert!(matches!(d.last().unwrap(), Decision::Switchover { .. }), "{d:?}");
        assert!(d.len() < noisy.len());
    }

    #[test]
    fn bandwidth_drop_mid_way_is_seen() {
        // Link falls from 100 Mbit/s to 10 Mbit/s after iteration 3: the same WWS no longer fits
        // 300 ms, so fixed keeps iterating instead of switching over into a long downtime.
        let wws = [131_072, 3000, 1500, 600, 600, 600, 600];
        let rates = [LINK, LINK, LINK, LINK / 10.0];
        let d = run(&mut FixedPolicy { limits: limits(300.0, 30) }, &wws, &rates);
        // at index 3 the rate was still high: 600 pages fit
        assert!(matches!(d.last().unwrap(), Decision::Switchover { .. }));
        assert_eq!(d.len(), 4);
        let rates = [LINK, LINK, LINK / 10.0];
        let d = run(&mut FixedPolicy { limits: limits(300.0, 6) }, &wws, &rates);
        assert!(matches!(d.last().unwrap(), Decision::Abort { .. }), "{d:?}");
        let d = run(&mut AdaptivePolicy::new(limits(3000.0, 30)), &wws, &rates);
        let last = d.last().unwrap();
        assert!(matches!(last, Decision::Switchover { .. }), "{d:?}");
        assert!(last.predicted_downtime_ms() > 300.0 && last.predicted_downtime_ms() <= 3000.0);
    }
}
