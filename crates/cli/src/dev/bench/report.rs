//! BENCHMARKS.md, bench/results.json and the SVG plots.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use serde_json::json;

use super::{case_label, case_tag, large_touch_mib, size_label, BenchArgs, Mark, Migrator, RunResult, Scenario};

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd).args(args).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}

/// `date -u` as ISO 8601.
pub(crate) fn utc_now() -> String {
    sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// One line for the progress output.
pub(crate) fn cell_summary(r: &RunResult) -> String {
    if r.mark != Mark::Ok {
        return r.mark.name().to_string();
    }
    format!(
        "ok, total {:.0} ms, downtime {:.0} ms, wire {:.1} MiB, cpu {:.1} s{}",
        r.total_ms.unwrap_or(f64::NAN),
        r.downtime_ms.unwrap_or(f64::NAN),
        mib(r.wire_bytes.unwrap_or(0)),
        r.cpu_ms.unwrap_or(f64::NAN) / 1000.0,
        busy_note(r).map(|n| format!("; WARNING: {n}")).unwrap_or_default()
    )
}

/// Says so when the machine did other work during the run (its times are then not comparable).
pub(crate) fn busy_note(r: &RunResult) -> Option<String> {
    let n = r.noise.filter(|n| n.busy())?;
    Some(format!(
        "busy machine: {:.1} CPU s of other processes and {:.1} s stolen by the hypervisor during the {:.1} s migration ({} cores): its times are not comparable",
        n.other_cpu_ms / 1000.0,
        n.steal_ms / 1000.0,
        n.window_ms / 1000.0,
        n.cores
    ))
}

/// Median, min, max.
fn stats(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Some((med, v[0], v[n - 1]))
}

fn fmt_stats(s: Option<(f64, f64, f64)>, scale: f64, prec: usize) -> String {
    match s {
        None => "–".into(),
        Some((m, lo, hi)) if (hi - lo).abs() < 1e-9 => format!("{:.*}", prec, m / scale),
        Some((m, lo, hi)) => format!("{:.*} ({:.*}–{:.*})", prec, m / scale, prec, lo / scale, prec, hi / scale),
    }
}

/// (scenario, guest MiB, link, migrator): `large` is one group per size, ascending.
type Key = (Scenario, u64, String, Migrator);

fn groups(results: &[RunResult]) -> BTreeMap<Key, Vec<&RunResult>> {
    let mut g: BTreeMap<Key, Vec<&RunResult>> = BTreeMap::new();
    for r in results {
        g.entry((r.scenario, r.mem_mib, r.link.clone(), r.migrator)).or_default().push(r);
    }
    g
}

/// The `large` sizes in `results`, ascending; --large-mib if there is no `large` run.
fn large_sizes_of(a: &BenchArgs, results: &[RunResult]) -> Vec<u64> {
    let v: std::collections::BTreeSet<u64> = results.iter().filter(|r| r.scenario == Scenario::Large).map(|r| r.mem_mib).collect();
    if v.is_empty() {
        a.large_sizes()
    } else {
        v.into_iter().collect()
    }
}

/// `1024, 2048 and 4096` of a list.
fn and_list(v: &[String]) -> String {
    match v {
        [] => String::new(),
        [x] => x.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// "Downtime, total time and wire bytes by RAM size": for each link where `large` ran at more
/// than one size, one row per migrator and one column per size (medians of ok runs), then
/// livemig-stream against qemu-default at each size. Empty when no link has two sizes.
fn by_size_section(g: &BTreeMap<Key, Vec<&RunResult>>) -> String {
    let mut links: Vec<&str> = Vec::new();
    for k in g.keys().filter(|k| k.0 == Scenario::Large) {
        if !links.contains(&k.2.as_str()) {
            links.push(&k.2);
        }
    }
    let mut md = String::new();
    for link in links {
        let sizes: std::collections::BTreeSet<u64> = g.keys().filter(|k| k.0 == Scenario::Large && k.2 == link).map(|k| k.1).collect();
        if sizes.len() < 2 {
            continue;
        }
        if md.is_empty() {
            md.push_str("\n## Downtime, total time and wire bytes by RAM size\n");
        }
        let rs_of = |size: u64, m: Migrator| g.get(&(Scenario::Large, size, link.to_string(), m));
        let med = |size: u64, m: Migrator, f: &dyn Fn(&RunResult) -> Option<f64>| rs_of(size, m).and_then(|rs| ok_vals(rs, f)).map(|x| x.0);
        let ms: Vec<Migrator> = MIGRATORS.iter().copied().filter(|m| sizes.iter().any(|size| rs_of(*size, *m).is_some())).collect();
        let _ = writeln!(
            md,
            "\n`large` at {link}, guest RAM {} (70 % of it written once, then rewritten slowly). Each cell: downtime / total time / bytes on the wire, medians of ok runs; a size with no ok run shows its marks.\n",
            and_list(&sizes.iter().map(|m| size_label(*m)).collect::<Vec<_>>())
        );
        md.push_str("| migrator |");
        for size in &sizes {
            let _ = write!(md, " {} |", size_label(*size));
        }
        md.push_str("\n|---|");
        md.push_str(&"---|".repeat(sizes.len()));
        md.push('\n');
        for m in &ms {
            let _ = write!(md, "| {} |", m.name());
            for size in &sizes {
                let cell = match rs_of(*size, *m) {
                    None => String::new(),
                    Some(rs) if rs.iter().all(|r| r.mark != Mark::Ok) => marks(rs),
                    Some(rs) => {
                        let f = |v: Option<f64>, p: usize| v.map_or_else(|| "–".into(), |x| format!("{x:.p$}"));
                        let partial = if rs.iter().any(|r| r.mark != Mark::Ok) { format!(" ({})", marks(rs)) } else { String::new() };
                        format!(
                            "{} ms / {} s / {} MiB{partial}",
                            f(med(*size, *m, &|r| r.downtime_ms), 0),
                            f(med(*size, *m, &|r| r.total_ms).map(|t| t / 1000.0), 1),
                            f(med(*size, *m, &|r| r.wire_bytes.map(mib)), 0)
                        )
                    }
                };
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        }
        let (l, q) = (Migrator::LivemigStream, Migrator::QemuDefault);
        if ms.contains(&l) && ms.contains(&q) {
            let parts: Vec<String> = sizes
                .iter()
                .map(|size| {
                    let d = (med(*size, l, &|r| r.downtime_ms), med(*size, q, &|r| r.downtime_ms));
                    let w = (med(*size, l, &|r| r.wire_bytes.map(mib)), med(*size, q, &|r| r.wire_bytes.map(mib)));
                    let text = match (d, w) {
                        ((Some(ld), Some(qd)), (Some(lw), Some(qw))) => format!(
                            "downtime {} ({ld:.0} vs {qd:.0} ms), wire {} QEMU's ({lw:.0} vs {qw:.0} MiB)",
                            if qd > 0.0 { format!("{:.2}x QEMU's", ld / qd) } else { "– (QEMU's 0 ms)".into() },
                            if lw < qw { "below" } else { "not below" }
                        ),
                        _ => "–".into(),
                    };
                    format!("{}: {text}", size_label(*size))
                })
                .collect();
            let _ = writeln!(md, "\n{} against {} (medians of ok runs; – where either has no ok run): {}.", l.name(), q.name(), parts.join("; "));
        }
    }
    md
}

fn ok_vals(rs: &[&RunResult], f: impl Fn(&RunResult) -> Option<f64>) -> Option<(f64, f64, f64)> {
    stats(rs.iter().filter(|r| r.mark == Mark::Ok).filter_map(|r| f(r)).collect())
}

fn marks(rs: &[&RunResult]) -> String {
    let mut c: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rs {
        *c.entry(r.mark.name()).or_default() += 1;
    }
    c.iter().map(|(k, v)| format!("{k} {v}/{}", rs.len())).collect::<Vec<_>>().join(", ")
}

const COLORS: [&str; 8] = ["#9e9e9e", "#616161", "#64b5f6", "#1565c0", "#2e7d32", "#bdbdbd", "#0d47a1", "#1b5e20"];
const MIGRATORS: [Migrator; 8] = [
    Migrator::QemuDefault,
    Migrator::QemuTuned,
    Migrator::LivemigFixed,
    Migrator::LivemigAdaptive,
    Migrator::LivemigStream,
    Migrator::QemuDefault2s,
    Migrator::LivemigAdaptive2s,
    Migrator::LivemigStream2s,
];

/// What a run's header needs beyond the options: the transport, QEMU's QMP greeting and (when
/// regenerating from a results.json) the machine it was measured on.
#[derive(Debug, Clone, Default)]
pub(crate) struct Meta {
    pub tls: bool,
    pub qmp_greeting: Option<Value>,
    pub machine: Option<Value>,
}

impl Meta {
    /// From a results.json (runs before `tls` was recorded used plain TCP).
    pub(crate) fn from_doc(doc: &Value) -> Meta {
        Meta {
            tls: doc.get("tls").and_then(Value::as_bool).unwrap_or(false),
            qmp_greeting: doc["machine"].get("qmp_greeting").cloned(),
            machine: doc.get("machine").cloned(),
        }
    }
}

/// "10.0.2 (Debian 1:10.0.2+ds-2...)" of a QMP greeting.
fn greeting_version(g: &Value) -> Option<String> {
    let q = &g["version"]["qemu"];
    let v = format!("{}.{}.{}", q["major"].as_u64()?, q["minor"].as_u64()?, q["micro"].as_u64()?);
    Some(match g["version"]["package"].as_str().map(str::trim) {
        Some(p) if !p.is_empty() => format!("{v} ({p})"),
        _ => v,
    })
}

/// The livemig migrators of the ratio table, each against the QEMU migrators with the same
/// maximum downtime.
const PAIRS: [(Migrator, &[Migrator]); 5] = [
    (Migrator::LivemigFixed, &[Migrator::QemuDefault, Migrator::QemuTuned]),
    (Migrator::LivemigAdaptive, &[Migrator::QemuDefault, Migrator::QemuTuned]),
    (Migrator::LivemigStream, &[Migrator::QemuDefault, Migrator::QemuTuned]),
    (Migrator::LivemigAdaptive2s, &[Migrator::QemuDefault2s]),
    (Migrator::LivemigStream2s, &[Migrator::QemuDefault2s]),
];

/// Grouped bars: one group per scenario, one bar per migrator (median of ok runs); a migrator
/// with no ok run gets its mark written instead of a bar.
fn bar_svg(title: &str, unit: &str, link: &str, g: &BTreeMap<Key, Vec<&RunResult>>, f: &dyn Fn(&RunResult) -> Option<f64>) -> Option<String> {
    let scen: Vec<(Scenario, u64)> = {
        let mut v: Vec<(Scenario, u64)> = g.keys().filter(|k| k.2 == link).map(|k| (k.0, k.1)).collect();
        v.dedup();
        v
    };
    if scen.is_empty() {
        return None;
    }
    let val = |(s, mib): (Scenario, u64), m: Migrator| -> (Option<f64>, String) {
        match g.get(&(s, mib, link.to_string(), m)) {
            None => (None, String::new()),
            Some(rs) => (ok_vals(rs, f).map(|x| x.0), rs.iter().map(|r| r.mark.name()).find(|n| *n != "ok").unwrap_or("").to_string()),
        }
    };
    // The migrators that ran at this link, each with its colour.
    let ms: Vec<(usize, Migrator)> = MIGRATORS.iter().copied().enumerate().filter(|(_, m)| g.keys().any(|k| k.2 == link && k.3 == *m)).collect();
    let max = scen.iter().flat_map(|s| ms.iter().filter_map(move |(_, m)| val(*s, *m).0)).fold(0.0f64, f64::max);
    let max = if max > 0.0 { max * 1.1 } else { 1.0 };
    let group = 32.0 * ms.len() as f64 + 32.0;
    let (w, h, left, top, bottom) = ((group * scen.len() as f64 + 120.0).max(150.0 * ms.len() as f64 + 100.0).max(680.0), 360.0, 70.0, 40.0, 60.0);
    let ph = h - top - bottom;
    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#);
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="20" font-size="14" text-anchor="middle">{title} ({unit}), link {link}, median of ok runs</text>"#, w / 2.0);
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let y = top + ph - ph * f64::from(i) / 4.0;
        let _ = writeln!(s, r##"<line x1="{left}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##, w - 20.0, left - 5.0, y + 4.0, if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") });
    }
    for (i, sc) in scen.iter().enumerate() {
        let gx = left + 10.0 + group * i as f64;
        for (k, (j, m)) in ms.iter().enumerate() {
            let (j, m) = (*j, m);
            let x = gx + 32.0 * k as f64;
            let (v, mark) = val(*sc, *m);
            match v {
                Some(v) => {
                    let bh = ph * v / max;
                    let _ = writeln!(s, r#"<rect x="{x}" y="{}" width="28" height="{bh}" fill="{}"><title>{} {}: {v:.1}</title></rect>"#, top + ph - bh, COLORS[j], case_label(sc.0, sc.1), m.name());
                }
                None if !mark.is_empty() => {
                    let _ = writeln!(s, r#"<text x="{}" y="{}" transform="rotate(-90 {} {})" fill="{}">{mark}</text>"#, x + 18.0, top + ph - 4.0, x + 18.0, top + ph - 4.0, COLORS[j]);
                }
                None => {}
            }
        }
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{}</text>"#, gx + 16.0 * ms.len() as f64 - 2.0, top + ph + 18.0, case_label(sc.0, sc.1));
    }
    for (k, (j, m)) in ms.iter().enumerate() {
        let (j, m) = (*j, m);
        let x = left + 150.0 * k as f64;
        let _ = writeln!(s, r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#, h - 22.0, COLORS[j], x + 16.0, h - 12.0, m.name());
    }
    s.push_str("</svg>\n");
    Some(s)
}

/// Writes everything; returns the path of BENCHMARKS.md.
/// `finished`: `None` for now (a fresh run, which also writes results.json); `Some` when
/// regenerating from an existing results.json (not rewritten).
pub(crate) fn write_all(a: &BenchArgs, results: &[RunResult], started: &str, finished: Option<&str>, cancelled: bool, meta: &Meta) -> anyhow::Result<PathBuf> {
    let bench_dir = a.out.join("bench");
    let plots = bench_dir.join("plots");
    std::fs::create_dir_all(&plots).with_context(|| format!("cannot create {}", plots.display()))?;
    let fresh = finished.is_none();
    let finished = finished.map_or_else(utc_now, str::to_string);
    let cmdline = std::env::args().collect::<Vec<_>>().join(" ");
    let machine = match &meta.machine {
        Some(m) => m.clone(),
        None => {
            let cpu = std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|c| c.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string()))
                .unwrap_or_default();
            json!({
                "kernel": sh("uname", &["-r"]),
                "cpu": cpu,
                "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "qemu": sh(&qemu_binary(), &["--version"]).lines().next().unwrap_or("").to_string(),
                "qmp_greeting": meta.qmp_greeting.clone().unwrap_or(Value::Null),
                "accel": livemig_lab::Accel::from_env().unwrap_or(livemig_lab::Accel::Tcg).name(),
            })
        }
    };
    let json_path = bench_dir.join("results.json");
    let transport = if meta.tls {
        "TLS on both sides: livemig TLS 1.3 with certificates made by `livemig certs`; QEMU tls-creds-x509 (gnutls) with certificates made by openssl (ECDSA P-256 like livemig's; QEMU refuses rcgen's host certificates), tls-hostname checked, client certificates checked"
    } else {
        "plain TCP on both sides (`--no-tls`: livemig `--insecure`, QEMU without tls-creds)"
    };
    let doc = json!({"started": started, "finished": finished, "command": cmdline, "cancelled": cancelled, "tls": meta.tls, "transport": transport, "machine": machine, "runs": results});
    if fresh {
        std::fs::write(&json_path, serde_json::to_string_pretty(&doc)?).with_context(|| format!("cannot write {}", json_path.display()))?;
    }
    let greeting = machine.get("qmp_greeting").and_then(greeting_version);
    let qemu_version = qemu_version_of(&machine);
    let older = older_section(&a.out);

    let g = groups(results);
    let mut links: Vec<String> = Vec::new();
    for r in results {
        if !links.contains(&r.link) {
            links.push(r.link.clone());
        }
    }
    let has = |m: Migrator| results.iter().any(|r| r.migrator == m);
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks: livemig against QEMU's own migration\n");
    let _ = writeln!(md, "Generated by `livemig-dev bench` (see `bench/README.md`); every figure below comes from `bench/results.json` of the same run.{}\n", if cancelled { " **The run was cancelled: the tables are incomplete.**" } else { "" });
    let _ = writeln!(md, "- command: `{cmdline}`");
    let _ = writeln!(md, "- date: {started} to {finished} (UTC)");
    let kvm = machine["accel"] == "kvm";
    let guests = if kvm { "guests on KVM (`-cpu host`) inside the KVM lane's L1 host, itself under TCG (`lane/`)" } else { "guests under TCG" };
    let large = large_sizes_of(a, results);
    let large_list = and_list(&large.iter().map(u64::to_string).collect::<Vec<_>>());
    let _ = writeln!(md, "- machine: {}, {} cores, kernel {}, {guests} (1 vCPU, {} MiB; `large`: {large_list} MiB)", machine["cpu"].as_str().unwrap_or(""), machine["cores"], machine["kernel"].as_str().unwrap_or(""), a.mem_mib);
    let _ = writeln!(md, "- QEMU: `qemu-system-x86_64 --version`: {}; QMP greeting: {}", machine["qemu"].as_str().unwrap_or("?"), greeting.as_deref().unwrap_or("not recorded"));
    let _ = writeln!(md, "- guest RAM: plain `-m` (private) for QEMU's own migration and livemig's stream engine (what most VMs have; both migrate any RAM), `memory-backend-file,share=on` on /dev/shm for livemig's shared engine (which needs shared RAM; QEMU >= 8.1 skips only file-backed RAM with `x-ignore-shared`); each run's `settings` in results.json say which");
    let _ = writeln!(md, "- transport: {transport}");
    let _ = writeln!(md, "- link: two network namespaces joined by a veth pair, `tc qdisc tbf rate <link>` (burst: 10 ms of the rate) on both ends{}", a.delay.map(|d| format!(", netem with {d} ms delay each way instead of tbf")).unwrap_or_default());
    let _ = writeln!(md, "- scenarios: idle (heartbeat only); hot (rewrites {} MiB flat out, self-checking pages); cache (reads {} MiB of its root disk, then rewrites 8 MiB at 1 MiB/s); return (the cache guest migrated A->B, {:.0} s on B, migrated back: figures of the way back); large (a guest of {large_list} MiB that writes {} MiB once, then rewrites it at {} MiB/s{})", a.hot_mib, a.cache_mib, a.return_after / 1000.0, and_list(&large.iter().map(|m| large_touch_mib(*m).to_string()).collect::<Vec<_>>()), a.large_rate, if large.len() > 1 { "; one case per size, in the tables `large <size>`" } else { "" });
    let _ = writeln!(md, "- migrators, all with the same maximum downtime {md_}: qemu-default (`downtime-limit` {md_}, `max-bandwidth` = the link rate{asb}); qemu-tuned (the same plus multifd with zstd, auto-converge and xbzrle where this QEMU takes them together; the settings used are in results.json); livemig-fixed (shared engine, `--policy fixed --max-downtime {md_}`); livemig-adaptive (shared engine, `--policy adaptive --max-downtime {md_}`); livemig-stream (stream engine: QEMU's own pre-copy relayed and compacted, `--engine stream --policy adaptive --max-downtime {md_}`){two}", md_ = a.max_downtime, asb = if qemu_version >= (8, 2) { ", and `avail-switchover-bandwidth` = the link rate" } else { "" }, two = if has(Migrator::QemuDefault2s) || has(Migrator::LivemigAdaptive2s) { "; and a pair with 2 s: qemu-default-2s (qemu-default with `downtime-limit` 2000 ms), livemig-adaptive-2s (shared engine, `--policy adaptive --max-downtime 2s`) and livemig-stream-2s (stream engine, the same)" } else { "" });
    let large_timeouts = and_list(&large.iter().map(|m| format!("{:.0} s", a.timeout_for(Scenario::Large, *m) / 1000.0)).collect::<Vec<_>>());
    let _ = writeln!(
        md,
        "- a migration not done after {:.0} s ({large_timeouts} for `large`{}) is stopped and marked `timeout`",
        a.timeout / 1000.0,
        if large.len() > 1 || large.first() != Some(&4096) { format!(" of {large_list} MiB: --large-timeout {:.0} s scaled linearly from 4096 MiB, at least --timeout", a.large_timeout / 1000.0) } else { String::new() }
    );
    if older.is_some() {
        let _ = writeln!(md, "- older figures: the previous default run, measured on QEMU 7.2, is kept below in \"{OLDER_TITLE}\" (not like for like: QEMU 7.2 under TCG loses guest writes, both migrators used memfd RAM over plain TCP, QEMU had max-bandwidth 2x the link, livemig-adaptive a 2 s maximum downtime against QEMU's 300 ms)");
    }
    md.push('\n');
    md.push_str("## What is measured\n\n");
    md.push_str("- **mark**: `ok` only if the migration completed, the destination guest then printed a heartbeat (idle) or its verifier passes with 0 bad pages (writing guests), no oops, and (QEMU native, where source and destination are both paused before `cont`) the two RAMs were equal page by page (on KVM: but for KVM's own steal-time record, one page differing in its first 12 bytes, which the host kernel writes). `corrupt`: any of these checks failed. `timeout`: no switchover in time (QEMU cancelled, livemig stopped with SIGTERM; the source keeps running). `failed`: the migrator gave up or errored (livemig --policy fixed gives up at its iteration cap by design). A run that is not ok shows no figures.\n");
    md.push_str("- **total**: QEMU's `total-time`; livemig's report `total_time_ms` (start of `send` to the end). **downtime**: QEMU's `downtime`; livemig's `downtime_ms` (source `stop` to the destination's confirmed `cont`).\n");
    md.push_str("- **wire**: bytes transmitted by the sending veth end during the migration (`/sys/class/net/<veth>/statistics/tx_bytes` in its namespace), IP/TCP headers included, the same for every migrator.\n");
    md.push_str("- **CPU**: livemig: utime+stime of the `send` and `receive` processes (wait4 rusage); the QEMUs' own share (device state, a few hundred KiB) is not counted. QEMU native: utime+stime of both QEMU processes during the migration minus their vCPU threads (`query-cpus-fast` thread ids), i.e. the migration thread, multifd threads and the main loop (which also serves the console and timers).\n");
    md.push_str("- **busy machine**: during every migration the bench takes the machine's CPU time (/proc/stat) minus that of its own processes (itself, both QEMUs, `send` and `receive`), and the time the hypervisor stole; a run where other processes took more than 10 % of the CPU time there was, or steal more than 5 %, says so in its note and on the console: its times are not comparable (byte counts are). **fresh memory**: just before each migration the bench allocates 256 MiB no process had and writes it once; the rate (in each run's note) bounds how fast a destination can take its memory. On a machine that is itself a VM whose host takes freed pages back (free page reporting), each fresh page costs a fault on the host too, and that rate varies with the host's state.\n");
    md.push_str("- **guest w/s**: the writing guest's own rate (writes/s from its verifier lines on the source console) before the migration and during it; blank when the migration was shorter than two verifier lines.\n\n");

    md.push_str("## Summary (median of ok runs, range in parentheses)\n\n");
    md.push_str("| scenario | link | migrator | runs | total (s) | downtime (ms) | wire (MiB) | CPU (s) | guest w/s before -> during |\n|---|---|---|---|---|---|---|---|---|\n");
    for ((s, mib, l, m), rs) in &g {
        let before = ok_vals(rs, |r| r.guest_rate_before);
        let during = ok_vals(rs, |r| r.guest_rate_during);
        let gw = match (before, during) {
            (Some(b), Some(d)) => format!("{:.0} -> {:.0}", b.0, d.0),
            (Some(b), None) => format!("{:.0} -> –", b.0),
            _ => "–".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {l} | {} | {} | {} | {} | {} | {} | {gw} |",
            case_label(*s, *mib),
            m.name(),
            marks(rs),
            fmt_stats(ok_vals(rs, |r| r.total_ms), 1000.0, 2),
            fmt_stats(ok_vals(rs, |r| r.downtime_ms), 1.0, 0),
            fmt_stats(ok_vals(rs, |r| r.wire_bytes.map(|b| b as f64)), 1048576.0, 1),
            fmt_stats(ok_vals(rs, |r| r.cpu_ms), 1000.0, 2),
        );
    }

    md.push_str("\n## livemig / best ok QEMU (ratio of medians; < 1 is better for livemig)\n\n");
    md.push_str("The best QEMU is the ok QEMU migrator with the same maximum downtime (qemu-default and qemu-tuned for livemig-fixed and livemig-adaptive, qemu-default-2s for livemig-adaptive-2s) with the lowest median total time in that scenario and link.\n\n");
    md.push_str("| scenario | link | livemig | vs | total | downtime | wire | CPU |\n|---|---|---|---|---|---|---|---|\n");
    let mut pairs: Vec<(Scenario, u64, String)> = g.keys().map(|k| (k.0, k.1, k.2.clone())).collect();
    pairs.dedup();
    for (s, mib, l) in &pairs {
        let med = |m: Migrator, f: &dyn Fn(&RunResult) -> Option<f64>| g.get(&(*s, *mib, l.clone(), m)).and_then(|rs| ok_vals(rs, f)).map(|x| x.0);
        let label = case_label(*s, *mib);
        for (lm, qemus) in PAIRS {
            if !g.contains_key(&(*s, *mib, l.clone(), lm)) {
                continue;
            }
            let best = qemus
                .iter()
                .filter_map(|m| med(*m, &|r| r.total_ms).map(|t| (*m, t)))
                .min_by(|x, y| x.1.total_cmp(&y.1))
                .map(|x| x.0);
            let Some(q) = best else {
                let _ = writeln!(md, "| {label} | {l} | {} | no ok QEMU run | | | | |", lm.name());
                continue;
            };
            let ratio = |f: &dyn Fn(&RunResult) -> Option<f64>| match (med(lm, f), med(q, f)) {
                (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
                (None, _) => "no ok run".into(),
                _ => "–".into(),
            };
            let _ = writeln!(
                md,
                "| {label} | {l} | {} | {} | {} | {} | {} | {} |",
                lm.name(),
                q.name(),
                ratio(&|r| r.total_ms),
                ratio(&|r| r.downtime_ms),
                ratio(&|r| r.wire_bytes.map(|b| b as f64)),
                ratio(&|r| r.cpu_ms)
            );
        }
    }

    md.push_str(&by_size_section(&g));

    md.push_str("\n## Memory compaction (livemig's own reports, ok runs)\n\n");
    md.push_str("`wire / non-zero` is livemig's whole stream (`wire_bytes`) over the bytes its non-zero pages would take sent whole and uncompacted (`uncompacted_bytes`, 4096 per page); pages by class are medians.\n\n");
    md.push_str("| scenario | link | migrator | wire / non-zero | non-zero pages (MiB) | zero | dup | disk_ref | snapshot_ref | delta | raw | resent |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (k, rs) in &g {
        if k.3.is_qemu() {
            continue;
        }
        let reps: Vec<&Value> = rs.iter().filter(|r| r.mark == Mark::Ok).filter_map(|r| r.send_report.as_ref()).collect();
        if reps.is_empty() {
            continue;
        }
        let med = |f: &dyn Fn(&Value) -> Option<f64>| stats(reps.iter().filter_map(|v| f(v)).collect()).map(|x| x.0);
        let class = |c: &str| med(&|v: &Value| v["pages"][c].as_f64()).map_or_else(|| "–".into(), |x| format!("{x:.0}"));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            case_label(k.0, k.1),
            k.2,
            k.3.name(),
            fmt_stats(stats(reps.iter().filter_map(|v| v["wire_fraction"].as_f64()).collect()), 1.0, 3),
            med(&|v: &Value| v["uncompacted_bytes"].as_f64()).map_or_else(|| "–".into(), |x| format!("{:.1}", x / 1048576.0)),
            class("zero"),
            class("dup"),
            class("disk_ref"),
            class("snapshot_ref"),
            class("delta"),
            class("raw"),
            med(&|v: &Value| v["resent_pages"].as_f64()).map_or_else(|| "–".into(), |x| format!("{x:.0}")),
        );
    }

    md.push_str("\n## Every run\n\n| scenario | link | migrator | run | mark | total (s) | downtime (ms) | wire (MiB) | CPU (s) | note |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for r in results {
        let detail: String = r.detail.chars().take(160).collect();
        let fresh = r.noise.and_then(|n| n.fresh_mb_per_s).map(|f| format!("fresh memory {:.1} GB/s; ", f / 1000.0)).unwrap_or_default();
        let note = match busy_note(r) {
            Some(b) => format!("**{b}**; {fresh}{detail}"),
            None => format!("{fresh}{detail}"),
        };
        let note = note.replace('|', "/");
        if r.mark == Mark::Ok {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | ok | {:.2} | {:.0} | {:.1} | {:.2} | {note} |",
                case_label(r.scenario, r.mem_mib),
                r.link,
                r.migrator.name(),
                r.run,
                r.total_ms.unwrap_or(f64::NAN) / 1000.0,
                r.downtime_ms.unwrap_or(f64::NAN),
                mib(r.wire_bytes.unwrap_or(0)),
                r.cpu_ms.unwrap_or(f64::NAN) / 1000.0
            );
        } else {
            let _ = writeln!(md, "| {} | {} | {} | {} | **{}** | | | | | {note} |", case_label(r.scenario, r.mem_mib), r.link, r.migrator.name(), r.run, r.mark.name());
        }
    }

    md.push_str("\n## Plots\n\n");
    type Metric = (&'static str, &'static str, &'static str, fn(&RunResult) -> Option<f64>);
    let metrics: [Metric; 3] = [
        ("total", "total time", "s", |r| r.total_ms.map(|t| t / 1000.0)),
        ("downtime", "downtime", "ms", |r| r.downtime_ms),
        ("wire", "bytes on the wire", "MiB", |r| r.wire_bytes.map(mib)),
    ];
    for l in &links {
        for (file, title, unit, f) in &metrics {
            if let Some(svg) = bar_svg(title, unit, l, &g, f) {
                let p = plots.join(format!("{file}-{l}.svg"));
                std::fs::write(&p, svg)?;
                let _ = writeln!(md, "![{title} at {l}]({})\n", rel(&a.out, &p));
            }
        }
    }
    md.push_str("WWS (pages dirtied) per iteration of livemig's pre-copy, first ok run of each livemig scenario, link and policy (from its send report `iterations[]`):\n\n");
    for ((s, mib, l, m), rs) in &g {
        if m.is_qemu() {
            continue;
        }
        if let Some(rep) = rs.iter().find(|r| r.mark == Mark::Ok).and_then(|r| r.send_report.as_ref()) {
            let p = plots.join(format!("wws-{}-{l}-{}.svg", case_tag(*s, *mib), m.name()));
            match livemig_sim::plot_report_svg(rep, &p) {
                Ok(()) => {
                    let _ = writeln!(md, "![WWS {} {l} {}]({})\n", case_label(*s, *mib), m.name(), rel(&a.out, &p));
                }
                Err(e) => {
                    let _ = writeln!(md, "(WWS plot of {} {l} {} failed: {e})\n", case_label(*s, *mib), m.name());
                }
            }
        }
    }
    md.push_str("\n## Notes\n\n");
    if kvm {
        md.push_str("- The guests run on KVM, so QEMU's native migration is a correct baseline here (under TCG, QEMU before 9.0 loses guest writes).\n");
        md.push_str("- Timings are nested: livemig and QEMU run in the L1 host, whose code is emulated (TCG) on 2 cores; hashing, compression and copying cost several times what they cost on hardware, and more for livemig (it hashes pages; QEMU on KVM reads dirty bits). Compare migrators within one scenario and link, not with the TCG tables.\n");
    } else if qemu_version >= (9, 0) {
        md.push_str("- QEMU's own dirty tracking is correct under TCG since QEMU 9.0 (commit 03bfc2188f, see `../shared/FACTS.md`), so QEMU's native migration is a correct baseline here; a `corrupt` QEMU run is a real finding.\n");
        md.push_str("- TCG guests are slow and share the 2 cores with the migrators: absolute figures are of this machine only; compare migrators within one scenario and link.\n");
    } else {
        md.push_str("- QEMU's own migration under TCG loses guest writes before QEMU 9.0 (see `../shared/FACTS.md`): QEMU runs of writing guests are expected to be marked `corrupt` (differing pages between the paused source and destination, bad pages in the guest verifier, or a crashed destination guest). This is QEMU + TCG, not the harness; under KVM QEMU's dirty tracking is exact. The table shows it as it happened.\n");
        md.push_str("- TCG guests are slow and share the 2 cores with the migrators: absolute figures are of this machine only; compare migrators within one scenario and link.\n");
    }
    // Kept as they are: the KVM section of the BENCHMARKS.md being replaced, then the older
    // QEMU 7.2 figures (bench/older-qemu-7.2.md).
    if let Some(k) = kvm_section(&a.out) {
        md.push('\n');
        md.push_str(&k);
    }
    if let Some(o) = older {
        md.push('\n');
        md.push_str(&o);
    }
    let path = a.out.join("BENCHMARKS.md");
    std::fs::write(&path, md).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The heading of the older figures' section (bench/older-qemu-7.2.md starts with it).
const OLDER_TITLE: &str = "Older: QEMU 7.2 (2026-11-24)";

/// `$LIVEMIG_QEMU`, else `qemu-system-x86_64`: the QEMU the lab's VMs run.
fn qemu_binary() -> String {
    std::env::var("LIVEMIG_QEMU").ok().filter(|q| !q.is_empty()).unwrap_or_else(|| "qemu-system-x86_64".into())
}

/// (major, minor) of the QEMU in `machine`: its QMP greeting, else its `--version` line (older
/// results.json have only that).
fn qemu_version_of(machine: &Value) -> (u64, u64) {
    let q = &machine["qmp_greeting"]["version"]["qemu"];
    if let (Some(a), Some(b)) = (q["major"].as_u64(), q["minor"].as_u64()) {
        return (a, b);
    }
    let v = machine["qemu"].as_str().and_then(|v| v.split("version ").nth(1)).unwrap_or("");
    let mut it = v.split(|c: char| !c.is_ascii_digit()).filter_map(|x| x.parse::<u64>().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// `<out>/bench/older-qemu-7.2.md`, if there is one: appended to BENCHMARKS.md as it is.
fn older_section(out: &Path) -> Option<String> {
    std::fs::read_to_string(out.join("bench").join("older-qemu-7.2.md")).ok().filter(|s| !s.trim().is_empty())
}

/// The KVM lane's section of the BENCHMARKS.md at `out` ("## On KVM guests" up to the older
/// figures or the end): written by hand from lane/bench.sh's report, so a new run keeps it.
fn kvm_section(out: &Path) -> Option<String> {
    let old = std::fs::read_to_string(out.join("BENCHMARKS.md")).ok()?;
    let start = old.find("\n## On KVM guests")? + 1;
    let rest = &old[start..];
    let end = rest.find(&format!("\n## {OLDER_TITLE}")).map_or(rest.len(), |e| e + 1);
    Some(rest[..end].trim_end().to_string() + "\n")
}

fn rel(base: &Path, p: &Path) -> String {
    p.strip_prefix(base).unwrap_or(p).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::super::Case;
    use super::*;

    /// A `large` run of `mib` at 1gbit: ok with these figures, or `mark` with none.
    fn run(mib: u64, m: Migrator, n: usize, figures: Option<(f64, f64, u64)>) -> RunResult {
        let c = Case { s: Scenario::Large, mib, link: "1gbit".into() };
        let mut r = RunResult::failed(&c, m, n, String::new(), PathBuf::from("/tmp"));
        if let Some((downtime, total, wire_mib)) = figures {
            r.mark = Mark::Ok;
            r.downtime_ms = Some(downtime);
            r.total_ms = Some(total);
            r.wire_bytes = Some(wire_mib << 20);
        }
        r
    }

    fn synthetic() -> Vec<RunResult> {
        vec![
            run(1024, Migrator::QemuDefault, 1, Some((300.0, 8000.0, 800))),
            run(1024, Migrator::LivemigAdaptive, 1, None),
            run(1024, Migrator::LivemigStream, 1, Some((150.0, 9000.0, 700))),
            run(2048, Migrator::QemuDefault, 1, Some((280.0, 16000.0, 1500))),
            run(2048, Migrator::LivemigAdaptive, 1, Some((250.0, 20000.0, 1400))),
            run(2048, Migrator::LivemigStream, 1, Some((420.0, 17000.0, 1600))),
            run(4096, Migrator::QemuDefault, 1, Some((310.0, 31000.0, 3000))),
            run(4096, Migrator::LivemigAdaptive, 1, Some((290.0, 50000.0, 2900))),
            run(4096, Migrator::LivemigStream, 1, None),
        ]
    }

    #[test]
    fn the_by_size_table_has_a_row_per_migrator_and_the_stream_ratios() {
        let rs = synthetic();
        let md = by_size_section(&groups(&rs));
        assert!(md.contains("## Downtime, total time and wire bytes by RAM size"), "{md}");
        assert!(md.contains("| migrator | 1 GiB | 2 GiB | 4 GiB |\n|---|---|---|---|\n"), "{md}");
        assert!(md.contains("| qemu-default | 300 ms / 8.0 s / 800 MiB | 280 ms / 16.0 s / 1500 MiB | 310 ms / 31.0 s / 3000 MiB |\n"), "{md}");
        assert!(md.contains("| livemig-adaptive | failed 1/1 | 250 ms / 20.0 s / 1400 MiB | 290 ms / 50.0 s / 2900 MiB |\n"), "{md}");
        assert!(md.contains("| livemig-stream | 150 ms / 9.0 s / 700 MiB | 420 ms / 17.0 s / 1600 MiB | failed 1/1 |\n"), "{md}");
        assert!(!md.contains("qemu-tuned"), "only migrators that ran: {md}");
        let line = md.lines().find(|l| l.starts_with("livemig-stream against qemu-default")).expect(&md);
        assert!(line.contains("1 GiB: downtime 0.50x QEMU's (150 vs 300 ms), wire below QEMU's (700 vs 800 MiB)"), "{line}");
        assert!(line.contains("2 GiB: downtime 1.50x QEMU's (420 vs 280 ms), wire not below QEMU's (1600 vs 1500 MiB)"), "{line}");
        assert!(line.contains("4 GiB: –."), "no ok stream run at 4 GiB: {line}");
        // A partly ok size shows its marks; the medians are of the ok runs.
        let mut rs = synthetic();
        rs.push(run(1024, Migrator::LivemigStream, 2, None));
        let md = by_size_section(&groups(&rs));
        assert!(md.contains("| livemig-stream | 150 ms / 9.0 s / 700 MiB (failed 1/2, ok 1/2) |"), "{md}");
    }

    #[test]
    fn the_by_size_table_needs_two_sizes() {
        let one: Vec<RunResult> = synthetic().into_iter().filter(|r| r.mem_mib == 4096).collect();
        assert_eq!(by_size_section(&groups(&one)), "");
        // Two sizes at 100mbit only: the table is of that link.
        let mut rs = one;
        for mib in [1024, 2048] {
            let mut r = run(mib, Migrator::QemuDefault, 1, Some((100.0, 1000.0, 10)));
            r.link = "100mbit".into();
            rs.push(r);
        }
        let md = by_size_section(&groups(&rs));
        assert!(md.contains("`large` at 100mbit, guest RAM 1 GiB and 2 GiB") && !md.contains("at 1gbit"), "{md}");
        assert!(!md.contains("livemig-stream against"), "no stream run there: {md}");
    }

    #[test]
    fn benchmarks_md_names_each_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut cli = vec!["bench".to_string(), "--out".into(), dir.path().display().to_string()];
        cli.extend(["--large-mib".into(), "4096".into()]);
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: BenchArgs,
        }
        let a = <Cli as clap::Parser>::parse_from(cli).a;
        let meta = Meta { tls: true, qmp_greeting: None, machine: Some(json!({"cpu": "x", "cores": 2, "kernel": "k", "qemu": "QEMU emulator version 10.0.2"})) };
        let p = write_all(&a, &synthetic(), "s", Some("f"), false, &meta).unwrap();
        let md = std::fs::read_to_string(p).unwrap();
        assert!(md.contains("`large`: 1024, 2048 and 4096 MiB)"), "sizes of the results, not of the invocation");
        assert!(md.contains("(60 s, 120 s and 240 s for `large` of 1024, 2048 and 4096 MiB"), "{md}");
        assert!(md.contains("large (a guest of 1024, 2048 and 4096 MiB that writes 716, 1433 and 2867 MiB once"), "{md}");
        assert!(md.contains("| large 1 GiB | 1gbit | qemu-default | ok 1/1 | 8.00 |"), "{md}");
        assert!(md.contains("| large 2 GiB | 1gbit | livemig-stream | qemu-default |"), "ratio table per size: {md}");
        assert!(md.contains("| large 4 GiB | 1gbit | livemig-stream | 1 | **failed** |"), "{md}");
        assert!(md.contains("## Downtime, total time and wire bytes by RAM size"));
        assert!(!dir.path().join("bench/results.json").exists(), "regenerating does not rewrite results.json");
    }

    #[test]
    fn qemu_version_from_greeting_or_version_line() {
        let m = json!({"qmp_greeting": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "Debian 1:10.0.2"}}});
        assert_eq!(qemu_version_of(&m), (10, 0));
        assert_eq!(greeting_version(&m["qmp_greeting"]).as_deref(), Some("10.0.2 (Debian 1:10.0.2)"));
        let old = json!({"qemu": "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"});
        assert_eq!(qemu_version_of(&old), (7, 2));
        assert_eq!(qemu_version_of(&json!({})), (0, 0));
    }

    #[test]
    fn the_older_figures_start_with_their_title() {
        let s = include_str!("../../../../../bench/older-qemu-7.2.md");
        assert!(s.starts_with(&format!("## {OLDER_TITLE}\n")));
        assert!(!s.contains("](bench/plots/"), "the older plots are in bench/older-qemu-7.2/plots");
    }

    #[test]
    fn the_kvm_section_is_kept_without_the_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let md = format!("# B\n\n## Notes\n\n- n\n\n## On KVM guests (x)\n\nk1\n\n### Summary\n\nk2\n\n## {OLDER_TITLE}\n\nold\n");
        std::fs::write(dir.path().join("BENCHMARKS.md"), md).unwrap();
        assert_eq!(kvm_section(dir.path()).unwrap(), "## On KVM guests (x)\n\nk1\n\n### Summary\n\nk2\n");
        std::fs::write(dir.path().join("BENCHMARKS.md"), "# B\n\n## On KVM guests\n\nk\n").unwrap();
        assert_eq!(kvm_section(dir.path()).unwrap(), "## On KVM guests\n\nk\n");
        std::fs::write(dir.path().join("BENCHMARKS.md"), "# B\n").unwrap();
        assert!(kvm_section(dir.path()).is_none());
        assert!(older_section(dir.path()).is_none());
    }
}
