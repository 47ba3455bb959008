//! Converts a send report (`livemig send --report`, or a `livemig-dev demo` report) into a trace.
//!
//! `cargo run -p livemig-sim --example report_to_trace -- REPORT.json TRACE.json "source text"`

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [report, out, source] = args.as_slice() else {
        eprintln!("usage: report_to_trace REPORT.json TRACE.json \"where the report comes from\"");
        return ExitCode::from(2);
    };
    let run = || -> Result<usize, Box<dyn std::error::Error>> {
        let text = std::fs::read_to_string(report).map_err(|e| format!("cannot read {report}: {e}"))?;
        let value: serde_json::Value = serde_json::from_str(&text)?;
        let trace = livemig_sim::Trace::from_report(&value, source)?;
        trace.save(Path::new(out))?;
        Ok(trace.iterations.len())
    };
    match run() {
        Ok(n) => {
            println!("{out}: {n} iterations");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("report_to_trace: {e}");
            ExitCode::FAILURE
        }
    }
}
