//! The trace file: the WWS (dirty pages) and duration of every pre-copy iteration of one migration.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::SimError;

/// The trace format version this build reads and writes.
pub const TRACE_VERSION: u32 = 1;

/// One iteration of a recorded (or constructed) migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceIteration {
    /// Index, from 0, consecutive.
    pub index: u32,
    /// Pages the iteration's scan found dirty (its WWS; iteration 0: the non-zero RAM).
    pub dirty_pages: u64,
    /// Wall time of the iteration (scan and send).
    pub duration_ms: f64,
    /// Bytes the iteration put on the wire, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire_bytes: Option<u64>,
    /// Pages the iteration sent, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_pages: Option<u64>,
    /// Part of the duration spent scanning, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_ms: Option<f64>,
    /// Fraction of the guest's CPU time taken away during the iteration, when it was throttled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<f64>,
}

/// A WWS trace: `{ "version": 1, "source": "...", "page_size": 4096, "ram_pages": N, "iterations": [...] }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Format version, [`TRACE_VERSION`].
    pub version: u32,
    /// Where the trace comes from (free text: measured run, constructed, ...).
    pub source: String,
    /// Bytes per guest page.
    pub page_size: u64,
    /// Guest RAM in pages.
    pub ram_pages: u64,
    /// The iterations, index 0 first.
    pub iterations: Vec<TraceIteration>,
}

impl Trace {
    /// Parses and checks a trace from JSON text; `what` names it in errors.
    pub fn from_json_str(text: &str, what: &str) -> Result<Trace, SimError> {
        // Look at the version first, so a future format gets a version error, not a shape error.
        let value: Value =
            serde_json::from_str(text).map_err(|source| SimError::Json { what: what.to_string(), source })?;
        match value.get("version").and_then(Value::as_u64) {
            Some(v) if v == u64::from(TRACE_VERSION) => {}
            Some(v) => {
                return Err(SimError::Version { found: u32::try_from(v).unwrap_or(u32::MAX), expected: TRACE_VERSION })
            }
            None => return Err(SimError::Invalid(format!("{what} has no numeric \"version\" field"))),
        }
        let trace: Trace =
            serde_json::from_value(value).map_err(|source| SimError::Json { what: what.to_string(), source })?;
        trace.validate()?;
        Ok(trace)
    }

    /// Reads and checks a trace file.
    pub fn load(path: &Path) -> Result<Trace, SimError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| SimError::Io { path: path.to_path_buf(), source })?;
        Trace::from_json_str(&text, &path.display().to_string())
    }

    /// Writes the trace as pretty JSON.
    pub fn save(&self, path: &Path) -> Result<(), SimError> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|source| SimError::Json { what: "the trace".into(), source })?;
        std::fs::write(path, text + "\n").map_err(|source| SimError::Io { path: path.to_path_buf(), source })
    }

    /// Checks the values: version, sizes, consecutive indices, finite positive durations, at least
    /// two iterations (the first full pass and one WWS after it).
    pub fn validate(&self) -> Result<(), SimError> {
        if self.version != TRACE_VERSION {
            return Err(SimError::Version { found: self.version, expected: TRACE_VERSION });
        }
        if self.page_size == 0 {
            return Err(SimError::Invalid("page_size is 0".into()));
        }
        if self.ram_pages == 0 {
            return Err(SimError::Invalid("ram_pages is 0".into()));
        }
        if self.iterations.len() < 2 {
            return Err(SimError::Invalid(format!(
                "it has {} iteration(s); a trace needs iteration 0 and at least one more",
                self.iterations.len()
            )));
        }
        for (i, it) in self.iterations.iter().enumerate() {
            if usize::try_from(it.index).ok() != Some(i) {
                return Err(SimError::Invalid(format!(
                    "iteration {i} has index {}; indices must count 0, 1, 2, ...",
                    it.index
                )));
            }
            if !it.duration_ms.is_finite() || it.duration_ms <= 0.0 {
                return Err(SimError::Invalid(format!(
                    "iteration {i} has duration_ms {}; it must be a positive number",
                    it.duration_ms
                )));
            }
            if it.dirty_pages > self.ram_pages {
                return Err(SimError::Invalid(format!(
                    "iteration {i} has {} dirty pages, more than the {} pages of RAM",
                    it.dirty_pages, self.ram_pages
                )));
            }
            if let Some(t) = it.throttle {
                if !(0.0..1.0).contains(&t) {
                    return Err(SimError::Invalid(format!(
                        "iteration {i} has throttle {t}; it must lie in [0, 1)"
                    )));
                }
            }
            if let Some(s) = it.scan_ms {
                if !s.is_finite() || s < 0.0 || s > it.duration_ms {
                    return Err(SimError::Invalid(format!(
                        "iteration {i} has scan_ms {s}; it must lie between 0 and its duration_ms"
                    )));
                }
            }
            if let (Some(sent), Some(wire)) = (it.sent_pages, it.wire_bytes) {
                if sent > 0 && wire == 0 {
                    return Err(SimError::Invalid(format!("iteration {i} sent {sent} pages in 0 wire bytes")));
                }
            }
        }
        if self.iterations[0].dirty_pages == 0 {
            return Err(SimError::Invalid("iteration 0 has no dirty pages (it is the first full pass)".into()));
        }
        Ok(())
    }

    /// A trace from a send report (the JSON of `livemig send --report`, or a `livemig-dev demo`
    /// report, whose `send` member is used): its `iterations` and `ram_bytes`.
    pub fn from_report(report: &Value, source: &str) -> Result<Trace, SimError> {
        let report = send_report(report)?;
        let ram_bytes = report
            .get("ram_bytes")
            .and_then(Value::as_u64)
            .ok_or_else(|| SimError::Report("it has no numeric \"ram_bytes\"".into()))?;
        let page_size = 4096;
        let records = report_iterations(report)?;
        let iterations = records
            .iter()
            .map(|r| TraceIteration {
                index: r.index,
                dirty_pages: r.dirty_pages,
                duration_ms: r.duration_ms,
                wire_bytes: Some(r.wire_bytes),
                sent_pages: Some(r.sent_pages),
                scan_ms: Some(r.scan_ms.min(r.duration_ms)),
                throttle: (r.throttle > 0.0).then_some(r.throttle),
            })
            .collect();
        let trace = Trace {
            version: TRACE_VERSION,
            source: source.to_string(),
            page_size,
            ram_pages: ram_bytes.div_ceil(page_size),
            iterations,
        };
        trace.validate()?;
        Ok(trace)
    }

    /// Wire bytes per page over the iterations after the first that record both (the recorded
    /// compaction), if any sent pages.
    pub fn wire_bytes_per_page(&self) -> Option<f64> {
        let (pages, bytes) = self
            .iterations
            .iter()
            .skip(1)
            .filter_map(|it| Some((it.sent_pages?, it.wire_bytes?)))
            .fold((0u64, 0u64), |(p, b), (sp, wb)| (p + sp, b + wb));
        (pages > 0).then(|| bytes as f64 / pages as f64)
    }

    /// Median recorded scan time, if the trace records any.
    pub fn median_scan_ms(&self) -> Option<f64> {
        let mut v: Vec<f64> = self.iterations.iter().filter_map(|it| it.scan_ms).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }

    /// The largest WWS after iteration 0: the working-set cap of the guest model.
    pub fn working_set_cap(&self) -> u64 {
        self.iterations.iter().skip(1).map(|it| it.dirty_pages).max().unwrap_or(0)
    }

    /// Dirty rate (pages per ms) of the untouched guest during each iteration but the last: the
    /// pages the next scan found dirty over the time the guest ran in this iteration (its
    /// duration less the share a throttle took away).
    pub fn dirty_rates_per_ms(&self) -> Vec<f64> {
        self.iterations
            .windows(2)
            .map(|w| w[1].dirty_pages as f64 / (w[0].duration_ms * (1.0 - w[0].throttle.unwrap_or(0.0))))
            .collect()
    }
}

/// The send report inside `report`: the value itself when it has `iterations`, else its `send`.
pub(crate) fn send_report(report: &Value) -> Result<&Value, SimError> {
    if report.get("iterations").is_some() {
        return Ok(report);
    }
    match report.get("send") {
        Some(s) if s.get("iterations").is_some() => Ok(s),
        _ => Err(SimError::Report("it has no \"iterations\" (nor a \"send\" report with them)".into())),
    }
}

/// The iteration statistics of a send report (or a demo report's `send`).
pub(crate) fn report_iterations(report: &Value) -> Result<Vec<livemig_control::IterationStats>, SimError> {
    let report = send_report(report)?;
    let list = report
        .get("iterations")
        .and_then(Value::as_array)
        .ok_or_else(|| SimError::Report("\"iterations\" is not a list".into()))?;
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            serde_json::from_value(v.clone())
                .map_err(|source| SimError::Json { what: format!("iteration {i} of the report"), source })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> String {
        r#"{ "version": 1, "source": "test", "page_size": 4096, "ram_pages": 1000,
             "iterations": [ { "index": 0, "dirty_pages": 900, "duration_ms": 100 },
                             { "index": 1, "dirty_pages": 50, "duration_ms": 10.5, "wire_bytes": 1000, "sent_pages": 50 } ] }"#
            .to_string()
    }

    #[test]
    fn loads_a_good_trace() {
        let t = Trace::from_json_str(&good(), "t").unwrap();
        assert_eq!(t.iterations.len(), 2);
        assert_eq!(t.working_set_cap(), 50);
        assert_eq!(t.dirty_rates_per_ms(), vec![0.5]);
        assert_eq!(t.wire_bytes_per_page(), Some(20.0));
    }

    #[test]
    fn rejects_bad_traces_with_clear_errors() {
        let cases = [
            (good().replace("\"version\": 1", "\"version\": 2"), "version 2"),
            (good().replace("\"version\": 1,", ""), "no numeric \"version\""),
            (good().replace("\"page_size\": 4096", "\"page_size\": 0"), "page_size is 0"),
            (good().replace("\"ram_pages\": 1000", "\"ram_pages\": 100"), "more than the 100 pages"),
            (good().replace("\"index\": 1", "\"index\": 3"), "indices must count"),
            (good().replace("\"duration_ms\": 100", "\"duration_ms\": -1"), "positive number"),
            (good().replace("\"dirty_pages\": 900", "\"dirty_pages\": \"x\""), "not valid JSON"),
            ("{ not json".to_string(), "not valid JSON"),
            (
                r#"{ "version": 1, "source": "", "page_size": 4096, "ram_pages": 10, "iterations": [] }"#.to_string(),
                "needs iteration 0",
            ),
        ];
        for (text, want) in cases {
            let e = Trace::from_json_str(&text, "t").unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(want), "{msg:?} should contain {want:?}");
        }
    }

    #[test]
    fn converts_a_send_report_and_a_demo_report() {
        let send = serde_json::json!({
            "role": "send", "ram_bytes": 8192 * 4096,
            "iterations": [
                { "index": 0, "dirty_pages": 5000, "sent_pages": 5000, "wire_bytes": 20_000_000, "duration_ms": 900.0,
                  "scan_ms": 100.0, "rate_bytes_per_s": 1e7, "decision": "continue", "reason": "", "predicted_downtime_ms": null, "fit": null, "last": false },
                { "index": 1, "dirty_pages": 300, "sent_pages": 300, "wire_bytes": 1_000_000, "duration_ms": 80.0,
                  "scan_ms": 20.0, "rate_bytes_per_s": 1e7, "decision": "final", "reason": "", "predicted_downtime_ms": 90.0, "fit": null, "last": true }
            ]
        });
        let t = Trace::from_report(&send, "unit test").unwrap();
        assert_eq!(t.ram_pages, 8192);
        assert_eq!(t.iterations[1].dirty_pages, 300);
        assert_eq!(t.iterations[0].scan_ms, Some(100.0));
        let demo = serde_json::json!({ "scenario": "dirty", "send": send });
        assert_eq!(Trace::from_report(&demo, "unit test").unwrap(), t);
        let e = Trace::from_report(&serde_json::json!({ "role": "receive" }), "x").unwrap_err();
        assert!(e.to_string().contains("no \"iterations\""), "{e}");
    }

    #[test]
    fn round_trips_through_a_file() {
        let t = Trace::from_json_str(&good(), "t").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.json");
        t.save(&p).unwrap();
        assert_eq!(Trace::load(&p).unwrap(), t);
        let e = Trace::load(&dir.path().join("missing.json")).unwrap_err();
        assert!(e.to_string().starts_with("cannot access"), "{e}");
    }
}
