//! `livemig-dev demo`: a real VM migrated on this machine through `livemig send` / `livemig receive`,
//! with the guest's own verifier checked on the destination.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use livemig_lab::{GuestImage, Vm, VmConfig};
use serde_json::{json, Value};

use crate::{exit, units};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum Scenario {
    /// The guest rewrites a 64 MiB working set at 20 MiB/s with self-checking pages.
    Dirty,
    /// The guest only prints a heartbeat.
    Idle,
    /// The guest rewrites a 64 MiB working set at 24 MiB/s, faster than the link carries it:
    /// pre-copy alone never converges; adaptive slows the guest until the trend fits and switches
    /// over within --max-downtime. Defaults: --bandwidth 100mbit, --max-downtime 1s.
    Hot,
    /// The guest reads 300 MiB of its root disk into its page cache, then rewrites 8 MiB at
    /// 1 MiB/s: both agents hold the root disk image (--disk-image), so cached blocks go as
    /// references.
    Cache,
    /// Migrate A -> B (each host keeps a memory snapshot), run 10 s on B, migrate back B -> A:
    /// unchanged pages go as references to the snapshot A kept. The guest rewrites 8 MiB at 1 MiB/s.
    Return,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct DemoArgs {
    /// What the guest does during the migration.
    #[arg(long, value_enum, default_value_t = Scenario::Dirty)]
    scenario: Scenario,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    mem_mib: u64,
    /// Cap the wire rate (e.g. 100mbit; the hot scenario's default is 100mbit).
    #[arg(long, value_parser = units::parse_rate)]
    bandwidth: Option<u64>,
    /// Longest acceptable downtime (default 300ms; the hot scenario's default is 1s).
    #[arg(long)]
    max_downtime: Option<String>,
    /// Downtime policy (fixed or adaptive).
    #[arg(long, default_value = "adaptive")]
    policy: String,
    /// Verifier passes the destination guest must report after the switchover.
    #[arg(long, default_value_t = 3)]
    passes: usize,
    /// Directory for sockets, consoles and reports (default: a new one under /tmp).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Write the combined JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// The guest's write rate in MiB/s (dirty, hot and return scenarios; defaults 20, 24, 1).
    #[arg(long)]
    rate: Option<u64>,
    /// Dirty-page tracker of the sender's shared engine (auto, content or soft-dirty; see
    /// `livemig send --help`).
    #[arg(long, default_value = "auto")]
    tracker: String,
    /// Engine of the sender (auto, stream or shared; see `livemig send --help`). Default: auto,
    /// which takes the stream engine on this QEMU.
    #[arg(long)]
    engine: Option<String>,
    /// The guest's root disk: `4k` (root.raw, ext4 with 4 KiB blocks) or `1k` (root-1k.raw: the
    /// same files on an ext4 with 1 KiB blocks, whose cached pages sit at 1 KiB offsets).
    #[arg(long, value_enum, default_value_t = Root::FourK)]
    root: Root,
    /// Passed to `send` and `receive` with the cache scenario's --disk-image (auto, 512, 1024,
    /// 2048, 4096).
    #[arg(long, default_value = "auto")]
    disk_align: String,
}

/// The root disk the demo guest boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Root {
    /// root.raw: ext4 with 4 KiB blocks.
    #[value(name = "4k")]
    FourK,
    /// root-1k.raw: ext4 with 1 KiB blocks.
    #[value(name = "1k")]
    OneK,
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

fn read_json(p: &Path) -> Value {
    std::fs::read_to_string(p).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or(Value::Null)
}

fn wait_child(c: &mut Child, limit: Duration) -> anyhow::Result<i32> {
    match livemig_lab::wait_timeout(c, limit)? {
        Some(s) => Ok(s.code().unwrap_or(-1)),
        None => {
            let _ = c.kill();
            let _ = c.wait();
            bail!("a livemig process did not finish within {} s", limit.as_secs());
        }
    }
}

/// One migration between two VMs through the real `livemig send` / `livemig receive`.
struct Leg {
    send_code: i32,
    recv_code: i32,
    send: Value,
    recv: Value,
    send_report: PathBuf,
}

#[allow(clippy::too_many_arguments)]
fn migrate(
    work: &Path,
    tag: &str,
    src: &Vm,
    dst: &Vm,
    a: &DemoArgs,
    max_downtime: &str,
    bandwidth: Option<u64>,
    send_extra: &[String],
    recv_extra: &[String],
) -> anyhow::Result<Leg> {
    let exe = crate::livemig_exe()?;
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let recv_report = work.join(format!("{tag}receive.json"));
    let send_report = work.join(format!("{tag}send.json"));
    let recv_log = std::fs::File::create(work.join(format!("{tag}receive.log")))?;
    let mut receiver = Command::new(&exe)
        .args(["receive", "--listen", &addr])
        .args(tls_args(work))
        .arg("--qmp")
        .arg(dst.qmp_path())
        .arg("--report")
        .arg(&recv_report)
        .args(recv_extra)
        .stdin(Stdio::null())
        .stdout(recv_log.try_clone()?)
        .stderr(recv_log)
        .spawn()
        .context("cannot start livemig receive")?;
    let mut send_cmd = Command::new(&exe);
    send_cmd
        .args(["send", "--to", &addr, "--max-downtime", max_downtime, "--policy", &a.policy, "--tracker", &a.tracker])
        .args(["--engine", a.engine.as_deref().unwrap_or("auto")])
        .args(tls_args(work))
        .arg("--qmp")
        .arg(src.qmp_path())
        .arg("--report")
        .arg(&send_report)
        .args(send_extra)
        .stdin(Stdio::null());
    if let Some(b) = bandwidth {
        send_cmd.args(["--bandwidth", &format!("{b}B/s")]);
    }
    eprintln!("demo: migrating {} -> {}: livemig send -> livemig receive on {addr}", src.name(), dst.name());
    let mut sender = send_cmd.spawn().context("cannot start livemig send")?;
    let send_code = wait_child(&mut sender, Duration::from_secs(900))?;
    let recv_code = wait_child(&mut receiver, Duration::from_secs(60))?;
    Ok(Leg { send_code, recv_code, send: read_json(&send_report), recv: read_json(&recv_report), send_report })
}

/// The TLS flags of both agents: one host certificate ("localhost", also valid for 127.0.0.1)
/// made by `livemig certs` into the work directory.
fn tls_args(work: &Path) -> Vec<String> {
    let d = work.join("tls");
    ["--tls-cert", "localhost.pem", "--tls-key", "localhost-key.pem", "--tls-ca", livemig_tls::CA_FILE]
        .iter()
        .enumerate()
        .map(|(i, x)| if i % 2 == 0 { (*x).to_string() } else { d.join(x).display().to_string() })
        .collect()
}

/// Waits for `passes` verifier passes (or a bad page) on `vm`'s console after `mark`.
fn check_guest(vm: &Vm, passes: usize, dirty: bool) -> anyhow::Result<(Value, bool)> {
    if !dirty {
        vm.wait_console(Duration::from_secs(60), |l| l.contains("LIVEMIG-HEARTBEAT"))
            .context("the destination guest printed no heartbeat after the switchover")?;
        return Ok((json!({"checked": true, "heartbeat": true}), true));
    }
    eprintln!("demo: waiting for {passes} verifier passes in the {} guest", vm.name());
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let lines = vm.verify_lines();
        if lines.len() >= passes || lines.iter().any(|l| l.bad > 0) || Instant::now() > deadline {
            let bad: u64 = lines.iter().map(|l| l.bad).sum();
            let ok = lines.len() >= passes && bad == 0;
            let mut g = json!({"checked": true, "verify_passes": lines.len(), "bad_pages": bad, "bad_lines": vm.bad_lines()});
            if lines.len() < passes && bad == 0 {
                // A guest silent after the switchover: whether its vCPUs still run says whether
                // it hangs (halted, or spinning in one place) or only its console went quiet.
                g["silent"] = silent_guest(vm);
                eprintln!("demo: the {} guest printed {} of {passes} verifier passes in 180 s: {}", vm.name(), lines.len(), g["silent"]);
            }
            return Ok((g, ok));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a silent guest's QEMU says of it: its run state, its console's last lines, and each
/// vCPU's instruction pointer and halt state read twice, a second apart.
fn silent_guest(vm: &Vm) -> Value {
    let mut qmp = match livemig_qmp::Qmp::connect(&vm.observer_qmp_path(), Duration::from_secs(5)) {
        Ok(q) => q,
        Err(e) => return json!({"qmp": e.to_string()}),
    };
    let status = qmp.execute("query-status", None).unwrap_or_else(|e| json!(e.to_string()));
    let mut cpus = Vec::new();
    for i in 0..2 {
        if i > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        let regs = qmp.execute("human-monitor-command", Some(json!({"command-line": "info registers -a"})));
        let rips: Vec<String> = match regs {
            Ok(Value::String(text)) => text
                .lines()
                .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("RIP=") || w.starts_with("EIP=")).map(str::to_string).map(|r| {
                    let hlt = l.contains("HLT=1");
                    format!("{r}{}", if hlt { " HLT" } else { "" })
                }))
                .collect(),
            Ok(other) => vec![other.to_string()],
            Err(e) => vec![e.to_string()],
        };
        cpus.push(rips);
    }
    let console = vm.console();
    let tail: Vec<&str> = console.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
    json!({"status": status, "rip_then_1s_later": cpus, "console_bytes": console.len(), "console_tail": tail})
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_string()).collect()
}

pub(crate) fn run(a: &DemoArgs) -> anyhow::Result<u8> {
    let work = match &a.workdir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("livemig-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    eprintln!("demo: building or finding the test guest (first build downloads the Debian cloud kernel)");
    let mut image = GuestImage::build().context("cannot build the test guest")?;
    if a.root == Root::OneK {
        image.disk = image.disk.with_file_name("root-1k.raw");
    }
    let tls = work.join("tls");
    if !tls.join(livemig_tls::CA_FILE).exists() {
        livemig_tls::make_certs(&tls, &["localhost".to_string()]).context("cannot make TLS certificates for the demo")?;
    }

    let mut cfg = VmConfig::new("source", &work);
    cfg.mem_mib = a.mem_mib;
    let dirty = |c: VmConfig, mib: u64, rate: u64| {
        c.param("mode", "dirty").param("mib", mib).param("rate", rate).param("pattern", "uniform").param("verify-secs", 2)
    };
    cfg = match a.scenario {
        Scenario::Dirty => dirty(cfg, 64, a.rate.unwrap_or(20)),
        Scenario::Idle => cfg.param("mode", "heartbeat"),
        Scenario::Hot => dirty(cfg, 64, a.rate.unwrap_or(24)),
        Scenario::Cache => cfg
            .param("mode", "cache")
            .param("mib", 300)
            .param("then-dirty-mib", 8)
            .param("rate", 1)
            .param("pattern", "uniform")
            .param("verify-secs", 2),
        Scenario::Return => dirty(cfg, 8, a.rate.unwrap_or(1)),
    };
    let hot = a.scenario == Scenario::Hot;
    let checks_pages = a.scenario != Scenario::Idle;
    let max_downtime = a.max_downtime.clone().unwrap_or_else(|| if hot { "1s" } else { "300ms" }.to_string());
    let bandwidth = a.bandwidth.or(hot.then_some(12_500_000));
    // What each "host" holds besides the RAM: the root disk image (both), and a snapshot directory.
    let disk = image.disk.display().to_string();
    let (snaps_a, snaps_b) = (work.join("host-a-snapshots"), work.join("host-b-snapshots"));
    let (send_extra, recv_extra) = match a.scenario {
        Scenario::Cache => (
            s(&["--disk-image", &disk, "--disk-align", &a.disk_align]),
            s(&["--disk-image", &disk, "--disk-align", &a.disk_align]),
        ),
        Scenario::Return => (
            s(&["--vm-id", "demo-vm", "--snapshot-dir", &snaps_a.display().to_string()]),
            s(&["--snapshot-dir", &snaps_b.display().to_string()]),
        ),
        _ => (Vec::new(), Vec::new()),
    };

    eprintln!("demo: starting the source VM ({} MiB, {}) in {}", a.mem_mib, cfg.accel.name().to_uppercase(), work.display());
    let src = Vm::start(&image, &cfg)?;
    if a.scenario == Scenario::Cache {
        eprintln!("demo: the guest reads its root disk into its page cache");
        src.wait_console(Duration::from_secs(300), |l| l.contains("LIVEMIG-CACHE"))
            .context("the source guest did not finish reading its disk")?;
    }
    let ready = if checks_pages { "LIVEMIG-READY" } else { "LIVEMIG-HEARTBEAT" };
    src.wait_console(Duration::from_secs(120), |l| l.contains(ready)).context("the source guest did not start its workload")?;
    if checks_pages {
        src.wait_console(Duration::from_secs(120), |l| l.contains("LIVEMIG-VERIFY"))
            .context("the source guest's verifier did not run")?;
    }
    eprintln!("demo: starting the destination VM (-incoming defer)");
    let dst = Vm::start(&image, &cfg.as_incoming("destination"))?;
    let first = migrate(&work, "", &src, &dst, a, &max_downtime, bandwidth, &send_extra, &recv_extra)?;
    // Exit 5: completed, but the downtime was above the maximum (checked, then said below).
    let completed = |leg: &Leg| matches!(leg.send_code, 0 | 5) && leg.recv_code == 0;
    let mut over = first.send_code == 5;
    let mut ok = completed(&first);
    let mut guest = json!({"checked": false});
    if ok {
        let (g, good) = check_guest(&dst, a.passes, checks_pages)?;
        guest = g;
        ok = good;
    }
    drop(src);

    // The return trip: the VM runs on B for a while, then goes back to a new QEMU on A, which
    // holds the snapshot A kept of the first trip.
    let mut back: Option<(Leg, Value)> = None;
    if ok && a.scenario == Scenario::Return {
        eprintln!("demo: the VM runs on host B for {} s", RETURN_RUN_SECS);
        std::thread::sleep(Duration::from_secs(RETURN_RUN_SECS));
        let home = Vm::start(&image, &cfg.as_incoming("source-again"))?;
        let leg = migrate(
            &work,
            "return-",
            &dst,
            &home,
            a,
            &max_downtime,
            bandwidth,
            &s(&["--vm-id", "demo-vm", "--snapshot-dir", &snaps_b.display().to_string()]),
            &s(&["--snapshot-dir", &snaps_a.display().to_string()]),
        )?;
        over |= leg.send_code == 5;
        ok = completed(&leg);
        let mut g = json!({"checked": false});
        if ok {
            let (gg, good) = check_guest(&home, a.passes, true)?;
            g = gg;
            ok = good;
        }
        back = Some((leg, g));
        drop(home);
    }

    let mut combined = json!({
        "scenario": format!("{:?}", a.scenario).to_lowercase(),
        "accel": cfg.accel.name(),
        "outcome": match (ok, over) { (true, false) => "completed", (true, true) => livemig_agent::OUTCOME_OVER_MAXIMUM, _ => "failed" },
        "send_exit": first.send_code, "receive_exit": first.recv_code,
        "send": first.send, "receive": first.recv, "guest": guest,
        "workdir": work,
    });
    if let Some((leg, g)) = &back {
        combined["return"] = json!({
            "send_exit": leg.send_code, "receive_exit": leg.recv_code,
            "send": leg.send, "receive": leg.recv, "guest": g,
        });
    }
    let out = a.report.clone().unwrap_or_else(|| work.join("demo.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&combined)?)?;

    println!("\n=== livemig demo: {:?} scenario, {} MiB guest, {} ===", a.scenario, a.mem_mib, cfg.accel.name().to_uppercase());
    println!(
        "outcome:          {}",
        match (ok, over) {
            (true, false) => "completed, guest verified",
            (true, true) => "completed, guest verified, BUT THE DOWNTIME WAS ABOVE THE MAXIMUM",
            _ => "FAILED",
        }
    );
    print_leg(if back.is_some() { "A -> B" } else { "" }, &first, &combined["guest"], &max_downtime, bandwidth);
    if let Some((leg, g)) = &back {
        print_leg("B -> A (back, with the snapshot)", leg, g, &max_downtime, bandwidth);
    }
    println!("report:           {}", out.display());
    drop(dst);
    Ok(match (ok, over) {
        (true, false) => exit::OK,
        (true, true) => exit::OVER_MAXIMUM,
        _ => exit::FAILED,
    })
}

/// Seconds the VM runs on host B before the return trip.
const RETURN_RUN_SECS: u64 = 10;

fn print_leg(title: &str, leg: &Leg, guest: &Value, max_downtime: &str, bandwidth: Option<u64>) {
    let send_json = &leg.send;
    let g = |k: &str| send_json.get(k).cloned().unwrap_or(Value::Null);
    let f = |k: &str| g(k).as_f64().unwrap_or(f64::NAN);
    if !title.is_empty() {
        println!("--- {title}");
    }
    println!(
        "engine:           {} on QEMU {} ({})",
        g("engine").as_str().unwrap_or("?"),
        g("qemu_version").as_str().unwrap_or("?"),
        g("engine_reason").as_str().unwrap_or("")
    );
    println!("total time:       {:.0} ms", f("total_time_ms"));
    let qemu_dt = g("qemu_downtime_ms").as_f64().map(|q| format!(", QEMU's own figure {q:.0} ms")).unwrap_or_default();
    println!("downtime:         {:.0} ms (predicted {:.0} ms, max {max_downtime}{qemu_dt})", f("downtime_ms"), f("predicted_downtime_ms"));
    println!("transport:        {} (peer: {})", g("transport").as_str().unwrap_or("?"), g("peer").as_str().unwrap_or("?"));
    println!("link:             {}", bandwidth.map_or_else(|| "loopback, no cap".to_string(), |b| format!("{:.0} Mbit/s", b as f64 * 8.0 / 1e6)));
    println!("iterations:       {}", g("iterations").as_array().map_or(0, Vec::len));
    let pauses: Vec<f64> = g("iterations")
        .as_array()
        .map(|its| its.iter().filter_map(|i| i["tracker_pause_ms"].as_f64()).collect())
        .unwrap_or_default();
    let pause_note = if pauses.is_empty() {
        String::new()
    } else {
        format!(" (dirty-bit reads paused the guest {:.1} ms per iteration, {:.1} ms at most)", pauses.iter().sum::<f64>() / pauses.len() as f64, pauses.iter().copied().fold(0.0, f64::max))
    };
    println!("tracker:          {}{pause_note}", g("tracker").as_str().unwrap_or("?"));
    if let Some(t) = send_json.get("throttle").filter(|t| !t.is_null()) {
        println!(
            "throttle:         up to {:.0}% of guest CPU time taken away ({:.0} ms stunned)",
            t["max"].as_f64().unwrap_or(0.0) * 100.0,
            t["stunned_ms"].as_f64().unwrap_or(0.0)
        );
    }
    println!("guest RAM:        {:.0} MiB", f("ram_bytes") / 1048576.0);
    println!(
        "on the wire:      {:.1} MiB for {:.1} MiB of non-zero pages ({:.3}x; compaction {:.2}x)",
        f("wire_bytes") / 1048576.0,
        f("uncompacted_bytes") / 1048576.0,
        f("wire_fraction"),
        f("compaction_ratio")
    );
    let pages: Vec<String> = g("pages")
        .as_object()
        .map(|m| m.iter().filter(|(_, v)| v.as_u64().unwrap_or(0) > 0).map(|(k, v)| format!("{k} {v}")).collect())
        .unwrap_or_default();
    println!("pages by class:   {}", pages.join(", "));
    if g("resent_pages").as_u64().unwrap_or(0) > 0 {
        println!("resent pages:     {}", g("resent_pages"));
    }
    let what = if g("engine").as_str() == Some("stream") { "stream verified: " } else { "memory verified: " };
    println!("{what} {}", send_json.pointer("/verification/ok").and_then(Value::as_bool).unwrap_or(false));
    println!("source VM:        {}", g("source_state").as_str().unwrap_or("?"));
    println!("destination VM:   {}", leg.recv.get("destination_state").and_then(Value::as_str).unwrap_or("?"));
    println!("guest verifier:   {guest}");
    let svg = leg.send_report.with_extension("svg");
    if svg.exists() {
        println!("WWS plot:         {}", svg.display());
    }
}
