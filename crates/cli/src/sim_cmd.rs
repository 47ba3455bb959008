//! `livemig simulate`: replays WWS traces through the downtime policies over a modelled link;
//! `livemig plot`: the WWS of a send report as SVG.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use livemig_control::{AdaptivePolicy, DowntimeController, FixedPolicy, Limits, OnNoConverge};
use livemig_sim::{simulate, LinkModel, Outcome, SimResult, Trace};
use serde::Serialize;

use crate::{exit, units};

/// Which policies to simulate.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum SimPolicy {
    /// QEMU's rule: switch over when the rest fits --max-downtime, else iterate up to the cap and fail.
    Fixed,
    /// Fit the writable-working-set trend and switch over at the best downtime within --max-downtime.
    Adaptive,
    /// Both, side by side.
    All,
}

/// What the adaptive policy does when the trend does not reach --max-downtime.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum NoConverge {
    /// Slow the guest (stun its vCPUs in short slices) step by step until the trend fits.
    Throttle,
    /// Leave the guest untouched and give up at the iteration cap.
    Fail,
}

impl From<NoConverge> for OnNoConverge {
    fn from(n: NoConverge) -> Self {
        match n {
            NoConverge::Throttle => OnNoConverge::Throttle,
            NoConverge::Fail => OnNoConverge::Fail,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub(crate) struct SimulateArgs {
    /// A trace file (JSON, see traces/README.md); repeat for several.
    #[arg(long = "trace", required = true, value_name = "FILE")]
    traces: Vec<PathBuf>,
    /// Policy to simulate.
    #[arg(long, value_enum, default_value_t = SimPolicy::All)]
    policy: SimPolicy,
    /// Modelled wire rate (e.g. 100mbit, 1gbit, 50MiB/s).
    #[arg(long, default_value = "100mbit", value_parser = units::parse_rate)]
    bandwidth: u64,
    /// Longest acceptable downtime: the fixed policy's limit, the adaptive policy's maximum.
    #[arg(long, default_value = "300ms", value_parser = units::parse_duration_ms)]
    max_downtime: f64,
    /// The fixed policy's limit when it should differ from --max-downtime (e.g. QEMU's 300ms
    /// against an adaptive maximum of 2s).
    #[arg(long, value_parser = units::parse_duration_ms)]
    fixed_max_downtime: Option<f64>,
    /// Most pre-copy iterations before the policy must switch over or give up.
    #[arg(long, default_value_t = 30)]
    max_iterations: u32,
    /// What the adaptive policy does when even the best downtime exceeds --max-downtime.
    #[arg(long, value_enum, default_value_t = NoConverge::Throttle)]
    on_no_converge: NoConverge,
    /// Print the results (with every iteration and decision) as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct PlotArgs {
    /// A send report (`livemig send --report`) or a demo report (`livemig-dev demo --report`).
    #[arg(long, value_name = "FILE")]
    report: PathBuf,
    /// The SVG to write.
    #[arg(long, value_name = "FILE.svg")]
    out: PathBuf,
}

#[derive(Serialize)]
struct Row {
    trace: String,
    #[serde(flatten)]
    result: SimResult,
}

fn controllers(which: SimPolicy, limits: Limits, fixed_limits: Limits, on: NoConverge) -> Vec<Box<dyn DowntimeController>> {
    let fixed = || Box::new(FixedPolicy { limits: fixed_limits }) as Box<dyn DowntimeController>;
    let adaptive = || Box::new(AdaptivePolicy::new(limits).on_no_converge(on.into())) as Box<dyn DowntimeController>;
    match which {
        SimPolicy::Fixed => vec![fixed()],
        SimPolicy::Adaptive => vec![adaptive()],
        SimPolicy::All => vec![fixed(), adaptive()],
    }
}

fn table(rows: &[Row], a: &SimulateArgs) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "link {:.1} Mbit/s, max downtime {:.0} ms{}, at most {} iterations, adaptive on no convergence: {}",
        a.bandwidth as f64 * 8.0 / 1e6,
        a.max_downtime,
        a.fixed_max_downtime.map_or_else(String::new, |f| format!(" (fixed policy: {f:.0} ms)")),
        a.max_iterations,
        match a.on_no_converge {
            NoConverge::Throttle => "throttle",
            NoConverge::Fail => "fail",
        }
    );
    let width = rows.iter().map(|r| r.trace.len()).max().unwrap_or(5).max(5);
    let _ = writeln!(
        s,
        "{:<width$}  {:<8}  {:<9}  {:>10}  {:>12}  {:>11}  {:>9}  {:>8}",
        "trace", "policy", "outcome", "iterations", "total time", "downtime", "wire MB", "throttle"
    );
    for r in rows {
        let x = &r.result;
        let downtime = x.downtime_ms.map_or_else(|| "-".to_string(), |d| format!("{d:.0} ms"));
        let throttle = x.iterations.iter().map(|i| i.stats.throttle).fold(0.0, f64::max);
        let _ = writeln!(
            s,
            "{:<width$}  {:<8}  {:<9}  {:>10}  {:>12}  {:>11}  {:>9.1}  {:>7.0}%",
            r.trace,
            x.policy,
            x.outcome.name(),
            x.precopy_iterations,
            format!("{:.1} s", x.total_time_ms / 1000.0),
            downtime,
            x.wire_bytes as f64 / 1e6,
            throttle * 100.0
        );
    }
    for r in rows {
        if let Outcome::Aborted { reason } = &r.result.outcome {
            let _ = writeln!(s, "{} / {}: {reason}", r.trace, r.result.policy);
        }
    }
    s
}

/// `livemig simulate`.
pub(crate) fn run_simulate(a: &SimulateArgs) -> anyhow::Result<u8> {
    let limits = Limits { max_downtime_ms: a.max_downtime, max_iterations: a.max_iterations, ..Limits::default() };
    let fixed_limits = Limits { max_downtime_ms: a.fixed_max_downtime.unwrap_or(a.max_downtime), ..limits };
    let mut rows = Vec::new();
    for path in &a.traces {
        let trace = Trace::load(path)?;
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let link = LinkModel::for_trace(&trace, a.bandwidth as f64);
        for mut c in controllers(a.policy, limits, fixed_limits, a.on_no_converge) {
            let result = simulate(&trace, c.as_mut(), link)
                .with_context(|| format!("cannot simulate {} with the {} policy", path.display(), c.name()))?;
            rows.push(Row { trace: name.clone(), result });
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", table(&rows, a));
    }
    Ok(exit::OK)
}

/// `livemig plot`.
pub(crate) fn run_plot(a: &PlotArgs) -> anyhow::Result<u8> {
    let text = std::fs::read_to_string(&a.report).with_context(|| format!("cannot read the report {}", a.report.display()))?;
    let report: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not a JSON report", a.report.display()))?;
    livemig_sim::plot_report_svg(&report, &a.out)?;
    println!("wrote {}", a.out.display());
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[command(flatten)]
        a: SimulateArgs,
    }

    fn traces_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../traces")
    }

    #[test]
    fn parses_units_and_repeated_traces() {
        let t = T::try_parse_from(["x", "--trace", "a.json", "--trace", "b.json", "--bandwidth", "1gbit", "--max-downtime", "2s"]).unwrap();
        assert_eq!(t.a.traces.len(), 2);
        assert_eq!(t.a.bandwidth, 125_000_000);
        assert!((t.a.max_downtime - 2000.0).abs() < 1e-9);
        assert_eq!(t.a.policy, SimPolicy::All);
        assert_eq!(t.a.fixed_max_downtime, None);
        let t = T::try_parse_from(["x", "--trace", "a", "--fixed-max-downtime", "300ms", "--policy", "fixed"]).unwrap();
        assert_eq!(t.a.fixed_max_downtime, Some(300.0));
        assert_eq!(t.a.policy, SimPolicy::Fixed);
        assert!(T::try_parse_from(["x"]).is_err(), "--trace is required");
        assert!(T::try_parse_from(["x", "--trace", "a", "--bandwidth", "fast"]).is_err());
    }

    #[test]
    fn simulates_the_shipped_traces() {
        let hot = traces_dir().join("hot.json");
        let t = T::try_parse_from(["x", "--trace", hot.to_str().unwrap(), "--max-downtime", "2s"]).unwrap();
        assert_eq!(run_simulate(&t.a).unwrap(), exit::OK);
        let missing = T::try_parse_from(["x", "--trace", "/nonexistent/trace.json"]).unwrap();
        let e = run_simulate(&missing.a).unwrap_err();
        assert!(format!("{e:#}").contains("cannot access"), "{e:#}");
    }
}
