//! `livemig trace`: writes a WWS trace (the iteration history `livemig simulate` replays) from a
//! migration's report, or by observing a running VM for a while without migrating it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use livemig_memory::{GuestMemory, PageBuf};
use livemig_qmp::Qmp;
use livemig_sim::{Trace, TraceIteration, TRACE_VERSION};
use livemig_track::{ContentTracker, Ledger, PageKey, Tracker, PAGE_SIZE};

use crate::{exit, signal, units};

#[derive(Args, Debug, Clone)]
pub(crate) struct TraceArgs {
    /// Take the iterations of this migration report (`livemig send --report` or `livemig-dev demo --report`).
    #[arg(long, value_name = "FILE", conflicts_with = "qmp")]
    report: Option<PathBuf>,
    /// Observe the running VM behind this QMP socket instead (its RAM must be shared memory).
    #[arg(long, value_name = "SOCKET", required_unless_present = "report")]
    qmp: Option<PathBuf>,
    /// How long to observe.
    #[arg(long, default_value = "20s", value_parser = units::parse_duration_ms)]
    duration: f64,
    /// Link rate the observed iterations are paced for: an iteration lasts as long as sending its
    /// dirty pages whole at this rate would (at least --min-iteration).
    #[arg(long, default_value = "1gbit", value_parser = units::parse_rate)]
    bandwidth: u64,
    /// Shortest observed iteration.
    #[arg(long, default_value = "100ms", value_parser = units::parse_duration_ms)]
    min_iteration: f64,
    /// The trace file to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `livemig trace`.
pub(crate) fn run(a: &TraceArgs) -> anyhow::Result<u8> {
    let trace = match (&a.report, &a.qmp) {
        (Some(r), _) => {
            let text = std::fs::read_to_string(r).with_context(|| format!("cannot read the report {}", r.display()))?;
            let value: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not a JSON report", r.display()))?;
            Trace::from_report(&value, &format!("report {}", r.display()))?
        }
        (None, Some(q)) => observe(a, q)?,
        (None, None) => bail!("give --report FILE or --qmp SOCKET"),
    };
    trace.save(&a.out)?;
    println!(
        "wrote {}: {} iterations, WWS after the first pass {}",
        a.out.display(),
        trace.iterations.len(),
        trace.iterations.iter().skip(1).map(|i| i.dirty_pages.to_string()).collect::<Vec<_>>().join(" ")
    );
    Ok(exit::OK)
}

/// Pre-copy without a destination: scan, "send" (hash and record, paced for the link), repeat.
fn observe(a: &TraceArgs, qmp_path: &std::path::Path) -> anyhow::Result<Trace> {
    let mut qmp = Qmp::connect(qmp_path, Duration::from_secs(10))
        .with_context(|| format!("cannot reach the QMP socket {}", qmp_path.display()))?;
    let status = qmp.query_status().context("cannot query the VM's state")?;
    if !status.running {
        bail!("the VM is `{}`, not running: there is nothing to observe", status.status);
    }
    let mem = GuestMemory::open(&mut qmp)?;
    let src = livemig_agent::MemSource(&mem);
    // A random key, as a migration's: the guest cannot hide a write behind a hash collision.
    let key = PageKey::from_bytes(livemig_tls::random_key().context("cannot make a page key")?);
    let mut ledger = Ledger::zeroed(mem.total_pages(), key);
    let mut tracker = ContentTracker::with_available_parallelism();
    let cancel = signal::cancel_flag();
    let end = Instant::now() + Duration::from_secs_f64(a.duration / 1000.0);
    let mut iterations = Vec::new();
    let mut buf = Box::new(PageBuf::zeroed());
    let mut index = 0u32;
    while Instant::now() < end && !cancel.load(std::sync::atomic::Ordering::Relaxed) {
        let t0 = Instant::now();
        let scan = tracker.scan(&src, &ledger)?;
        for &p in &scan.dirty {
            mem.read_page(p, &mut buf)?;
            ledger.record_page(p, &buf.0);
        }
        let pages = scan.dirty.len() as u64;
        let send = Duration::from_secs_f64(pages as f64 * PAGE_SIZE as f64 / a.bandwidth as f64)
            .max(Duration::from_secs_f64(a.min_iteration / 1000.0));
        let spent = t0.elapsed();
        if send > spent {
            std::thread::sleep(send - spent);
        }
        let duration_ms = ms(t0.elapsed());
        eprint!("\r\x1b[Kiteration {index}: {pages} dirty pages, {duration_ms:.0} ms");
        iterations.push(TraceIteration {
            index,
            dirty_pages: pages,
            duration_ms,
            wire_bytes: None,
            sent_pages: None,
            scan_ms: Some(ms(scan.duration).min(duration_ms)),
            throttle: None,
        });
        index += 1;
    }
    eprintln!();
    let trace = Trace {
        version: TRACE_VERSION,
        source: format!(
            "observed {} for {:.0} s, iterations paced for {:.0} Mbit/s",
            qmp_path.display(),
            a.duration / 1000.0,
            a.bandwidth as f64 * 8.0 / 1e6
        ),
        page_size: PAGE_SIZE as u64,
        ram_pages: mem.total_pages(),
        iterations,
    };
    trace.validate().context("the observation is too short for a trace (it needs at least two iterations)")?;
    Ok(trace)
}
