//! SVG plot of the writable working set per iteration, the controller's regression line and the
//! switchover.

use std::path::Path;

use livemig_control::{Fit, IterationStats};
use plotters::prelude::*;
use serde_json::Value;

use crate::trace::{report_iterations, send_report};
use crate::SimError;

fn plot_err<E: std::fmt::Display>(e: E) -> SimError {
    SimError::Plot(e.to_string())
}

/// Draws the WWS (dirty pages) of every iteration after the first full pass, the regression
/// line `fit` over the iterations it covers (up to one iteration past the last, its
/// prediction), and a marker at `switchover_index`, to an SVG file at `path`.
///
/// Iteration 0 (the first full pass, the whole non-zero RAM) is left out: it would flatten the
/// rest of the curve, and the controllers leave it out of their fit too. With only iteration 0,
/// it is drawn alone.
pub fn plot_wws_svg(
    iterations: &[IterationStats],
    fit: Option<Fit>,
    switchover_index: Option<u32>,
    path: &Path,
) -> Result<(), SimError> {
    if iterations.is_empty() {
        return Err(SimError::Plot("there are no iterations to plot".into()));
    }
    let later: Vec<&IterationStats> = iterations.iter().filter(|s| s.index > 0).collect();
    let shown: Vec<&IterationStats> = if later.is_empty() { iterations.iter().collect() } else { later };
    let points: Vec<(f64, f64)> = shown.iter().map(|s| (f64::from(s.index), s.dirty_pages as f64)).collect();

    let x_min = points.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let last_x = points.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    // The fit covers its last `points` WWS values up to the last (or switchover) iteration, and
    // the controller extrapolates one iteration further.
    let fit_end = f64::from(switchover_index.unwrap_or(0)).max(last_x);
    let fit_line: Vec<(f64, f64)> = fit
        .map(|f| {
            let start = (fit_end - f64::from(f.points.saturating_sub(1))).max(x_min);
            vec![(start, f.at(start)), (fit_end + 1.0, f.at(fit_end + 1.0))]
        })
        .unwrap_or_default();
    let x_max = fit_line.iter().map(|p| p.0).fold(last_x, f64::max).max(x_min + 1.0);
    let y_max = points.iter().chain(&fit_line).map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let y_min = fit_line.iter().map(|p| p.1).fold(0.0, f64::min);

    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Writable working set per iteration (iteration 0 not shown)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x_min - 0.5)..(x_max + 0.5), y_min..y_max)
        .map_err(plot_err)?;
    // One label per iteration (up to 20): the default spacing repeats rounded labels.
    let span = x_max - x_min + 2.0;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let x_labels = span.clamp(2.0, 20.0) as usize;
    chart
        .configure_mesh()
        .x_labels(x_labels)
        .x_desc("iteration")
        .y_desc("dirty pages (WWS)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(plot_err)?;

    chart
        .draw_series(LineSeries::new(points.iter().copied(), BLUE.stroke_width(2)))
        .map_err(plot_err)?
        .label("WWS (dirty pages)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
        .map_err(plot_err)?;
    let throttled: Vec<(f64, f64, f64)> = shown
        .iter()
        .filter(|s| s.throttle > 0.0)
        .map(|s| (f64::from(s.index), s.dirty_pages as f64, s.throttle))
        .collect();
    if !throttled.is_empty() {
        let orange = RGBColor(230, 120, 0);
        let most = throttled.iter().map(|t| t.2).fold(0.0, f64::max);
        chart
            .draw_series(throttled.iter().map(|&(x, y, _)| TriangleMarker::new((x, y), 7, orange.filled())))
            .map_err(plot_err)?
            .label(format!("guest throttled during the iteration (up to {:.0}%)", most * 100.0))
            .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, orange.filled()));
    }
    if !fit_line.is_empty() {
        chart
            .draw_series(LineSeries::new(fit_line.iter().copied(), RED.stroke_width(2)))
            .map_err(plot_err)?
            .label("regression (controller's fit)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    }
    if let Some(sw) = switchover_index {
        let x = f64::from(sw);
        let y = iterations.iter().find(|s| s.index == sw).map_or(0.0, |s| s.dirty_pages as f64);
        let green = RGBColor(0, 140, 0);
        chart
            .draw_series(std::iter::once(PathElement::new(vec![(x, y_min), (x, y_max)], green.stroke_width(1))))
            .map_err(plot_err)?
            .label(format!("switchover (iteration {sw})"))
            .legend(move |(lx, ly)| PathElement::new(vec![(lx + 10, ly - 8), (lx + 10, ly + 8)], green.stroke_width(2)));
        chart
            .draw_series(std::iter::once(Cross::new((x, y), 8, green.stroke_width(3))))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// [`plot_wws_svg`] for a send report (or a demo report's `send`): its iterations, the last fit
/// it recorded, and the final pass as the switchover.
pub fn plot_report_svg(report: &Value, path: &Path) -> Result<(), SimError> {
    let iterations = report_iterations(report)?;
    let records = send_report(report)?.get("iterations").and_then(Value::as_array).cloned().unwrap_or_default();
    let fit = records
        .iter()
        .rev()
        .filter_map(|r| r.get("fit").filter(|f| !f.is_null()))
        .find_map(|f| serde_json::from_value::<Fit>(f.clone()).ok());
    let switchover = records
        .iter()
        .zip(&iterations)
        .find(|(r, _)| r.get("last").and_then(Value::as_bool) == Some(true))
        .map(|(_, s)| s.index);
    plot_wws_svg(&iterations, fit, switchover, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(index: u32, dirty_pages: u64) -> IterationStats {
        IterationStats {
            index,
            dirty_pages,
            sent_pages: dirty_pages,
            wire_bytes: dirty_pages * 4109,
            duration_ms: 100.0,
            scan_ms: 10.0,
            rate_bytes_per_s: 12.5e6,
            throttle: 0.0,
        }
    }

    fn looks_like_svg(p: &Path) -> String {
        let s = std::fs::read_to_string(p).unwrap();
        assert!(s.trim_start().starts_with("<svg"), "{}", &s[..s.len().min(200)]);
        assert!(s.contains("<polyline") || s.contains("<path"), "no line in the SVG");
        assert!(s.trim_end().ends_with("</svg>"));
        s
    }

    #[test]
    fn writes_an_svg_with_lines_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wws.svg");
        let it: Vec<IterationStats> =
            [131_072, 6000, 5900, 6100, 6000].iter().enumerate().map(|(i, &d)| stats(u32::try_from(i).unwrap(), d)).collect();
        let fit = livemig_control::fit_wws(&[(1.0, 6000.0), (2.0, 5900.0), (3.0, 6100.0), (4.0, 6000.0)]);
        plot_wws_svg(&it, fit, Some(4), &p).unwrap();
        let s = looks_like_svg(&p);
        assert!(s.contains("iteration"), "axis label missing");
        assert!(s.contains("dirty pages"), "axis label missing");
        assert!(!s.contains("throttled"), "no throttle, no throttle legend");
        // throttled iterations are marked, with the level in the legend
        let mut it = it;
        it[3].throttle = 0.5;
        it[4].throttle = 0.75;
        plot_wws_svg(&it, fit, Some(4), &p).unwrap();
        let s = looks_like_svg(&p);
        assert!(s.contains("throttled during the iteration (up to 75%)"), "throttle legend missing");
    }

    #[test]
    fn plots_a_report_and_rejects_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.svg");
        let report = serde_json::json!({ "send": { "ram_bytes": 1 << 29, "iterations": [
            { "index": 0, "dirty_pages": 35766, "sent_pages": 35766, "wire_bytes": 106_886_193, "duration_ms": 851.5, "scan_ms": 519.5,
              "rate_bytes_per_s": 3.2e8, "decision": "continue", "reason": "", "predicted_downtime_ms": null, "fit": null, "last": false },
            { "index": 1, "dirty_pages": 1234, "sent_pages": 1234, "wire_bytes": 4_855_793, "duration_ms": 81.2, "scan_ms": 67.3,
              "rate_bytes_per_s": 4.0e8, "decision": "final", "reason": "", "predicted_downtime_ms": 135.2, "fit": null, "last": true }
        ] } });
        plot_report_svg(&report, &p).unwrap();
        looks_like_svg(&p);
        let empty = serde_json::json!({ "ram_bytes": 4096, "iterations": [] });
        let e = plot_report_svg(&empty, &p).unwrap_err();
        assert!(e.to_string().contains("no iterations"), "{e}");
    }
}
