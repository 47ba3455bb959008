//! `livemig demo`: a real VM migrated on this machine through `livemig send` / `livemig receive`,
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

pub(crate) fn run(a: &DemoArgs) -> anyhow::Result<u8> {
    let work = match &a.workdir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("livemig-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    eprintln!("demo: building or finding the test guest (first build downloads the Debian cloud kernel)");
    let image = GuestImage::build().context("cannot build the test guest")?;

    let mut cfg = VmConfig::new("source", &work);
    cfg.mem_mib = a.mem_mib;
    cfg = match a.scenario {
        Scenario::Dirty => cfg.param("mode", "dirty").param("mib", 64).param("rate", 20).param("pattern", "uniform").param("verify-secs", 2),
        Scenario::Idle => cfg.param("mode", "heartbeat"),
        Scenario::Hot => cfg.param("mode", "dirty").param("mib", 64).param("rate", 24).param("pattern", "uniform").param("verify-secs", 2),
    };
    let hot = a.scenario == Scenario::Hot;
    let max_downtime = a.max_downtime.clone().unwrap_or_else(|| if hot { "1s" } else { "300ms" }.to_string());
    let bandwidth = a.bandwidth.or(hot.then_some(12_500_000));
    eprintln!("demo: starting the source VM ({} MiB, TCG) in {}", a.mem_mib, work.display());
    let src = Vm::start(&image, &cfg)?;
    let ready = match a.scenario {
        Scenario::Dirty | Scenario::Hot => "LIVEMIG-READY",
        Scenario::Idle => "LIVEMIG-HEARTBEAT",
    };
    src.wait_console(Duration::from_secs(120), |l| l.contains(ready)).context("the source guest did not start its workload")?;
    if a.scenario != Scenario::Idle {
        src.wait_console(Duration::from_secs(120), |l| l.contains("LIVEMIG-VERIFY"))
            .context("the source guest's verifier did not run")?;
    }
    eprintln!("demo: starting the destination VM (-incoming defer)");
    let dst = Vm::start(&image, &cfg.as_incoming("destination"))?;

    let exe = std::env::current_exe().context("cannot find the livemig binary")?;
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let recv_report = work.join("receive.json");
    let send_report = work.join("send.json");
    let recv_log = std::fs::File::create(work.join("receive.log"))?;
    let mut receiver = Command::new(&exe)
        .args(["receive", "--insecure", "--listen", &addr, "--qmp"])
        .arg(dst.qmp_path())
        .arg("--report")
        .arg(&recv_report)
        .stdin(Stdio::null())
        .stdout(recv_log.try_clone()?)
        .stderr(recv_log)
        .spawn()
        .context("cannot start livemig receive")?;
    let mut send_cmd = Command::new(&exe);
    send_cmd
        .args(["send", "--insecure", "--to", &addr, "--max-downtime", &max_downtime, "--policy", &a.policy, "--qmp"])
        .arg(src.qmp_path())
        .arg("--report")
        .arg(&send_report)
        .stdin(Stdio::null());
    if let Some(b) = bandwidth {
        send_cmd.args(["--bandwidth", &format!("{b}B/s")]);
    }
    eprintln!("demo: migrating: livemig send -> livemig receive on {addr}");
    let mut sender = send_cmd.spawn().context("cannot start livemig send")?;
    let send_code = wait_child(&mut sender, Duration::from_secs(900))?;
    let recv_code = wait_child(&mut receiver, Duration::from_secs(60))?;
    let send_json = read_json(&send_report);
    let recv_json = read_json(&recv_report);

    let mut guest = json!({"checked": false});
    let mut ok = send_code == 0 && recv_code == 0;
    if ok && a.scenario != Scenario::Idle {
        eprintln!("demo: waiting for {} verifier passes in the destination guest", a.passes);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let lines = dst.verify_lines();
            if lines.len() >= a.passes || lines.iter().any(|l| l.bad > 0) || Instant::now() > deadline {
                let bad: u64 = lines.iter().map(|l| l.bad).sum();
                guest = json!({"checked": true, "verify_passes": lines.len(), "bad_pages": bad,
                               "bad_lines": dst.bad_lines()});
                ok = lines.len() >= a.passes && bad == 0;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    } else if ok {
        dst.wait_console(Duration::from_secs(60), |l| l.contains("LIVEMIG-HEARTBEAT"))
            .context("the destination guest printed no heartbeat after the switchover")?;
        guest = json!({"checked": true, "heartbeat": true});
    }

    let combined = json!({
        "scenario": format!("{:?}", a.scenario).to_lowercase(),
        "outcome": if ok { "completed" } else { "failed" },
        "send_exit": send_code, "receive_exit": recv_code,
        "send": send_json, "receive": recv_json, "guest": guest,
        "workdir": work,
    });
    let out = a.report.clone().unwrap_or_else(|| work.join("demo.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&combined)?)?;

    println!("\n=== livemig demo: {:?} scenario, {} MiB guest ===", a.scenario, a.mem_mib);
    let g = |k: &str| send_json.get(k).cloned().unwrap_or(Value::Null);
    println!("outcome:          {}", if ok { "completed, guest verified" } else { "FAILED" });
    println!("total time:       {:.0} ms", g("total_time_ms").as_f64().unwrap_or(f64::NAN));
    println!("downtime:         {:.0} ms (predicted {:.0} ms, max {max_downtime})", g("downtime_ms").as_f64().unwrap_or(f64::NAN), g("predicted_downtime_ms").as_f64().unwrap_or(f64::NAN));
    println!("link:             {}", bandwidth.map_or_else(|| "loopback, no cap".to_string(), |b| format!("{:.0} Mbit/s", b as f64 * 8.0 / 1e6)));
    println!("iterations:       {}", g("iterations").as_array().map_or(0, Vec::len));
    if let Some(t) = send_json.get("throttle").filter(|t| !t.is_null()) {
        println!(
            "throttle:         up to {:.0}% of guest CPU time taken away ({:.0} ms stunned)",
            t["max"].as_f64().unwrap_or(0.0) * 100.0,
            t["stunned_ms"].as_f64().unwrap_or(0.0)
        );
    }
    println!("guest RAM:        {:.0} MiB", g("ram_bytes").as_f64().unwrap_or(0.0) / 1048576.0);
    println!("on the wire:      {:.1} MiB", g("wire_bytes").as_f64().unwrap_or(0.0) / 1048576.0);
    println!("pages by class:   {}", g("pages"));
    println!("memory verified:  {}", send_json.pointer("/verification/ok").and_then(Value::as_bool).unwrap_or(false));
    println!("source VM:        {}", g("source_state").as_str().unwrap_or("?"));
    println!("destination VM:   {}", recv_json.get("destination_state").and_then(Value::as_str).unwrap_or("?"));
    println!("guest verifier:   {guest}");
    println!("report:           {}", out.display());
    let svg = send_report.with_extension("svg");
    if svg.exists() {
        println!("WWS plot:         {}", svg.display());
    }
    drop(src);
    drop(dst);
    Ok(if ok { exit::OK } else { exit::FAILED })
}
