//! One migration (a "leg") from a running VM into an incoming VM, by one migrator, with its
//! figures: total time, downtime, veth bytes, CPU time of the migrator processes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use livemig_lab::{Vm, VerifyLine};
use livemig_qmp::Qmp;
use serde_json::{json, Value};

use super::net::Hosts;
use super::procs::{compare_ram, process_cpu_ms, thread_cpu_ms, Noise, NoiseProbe, Proc};
use super::tls::TlsFiles;
use super::Migrator;

/// How a leg ended before the guest check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LegEnd {
    Completed,
    Timeout,
    Failed,
}

/// Figures of one leg.
#[derive(Debug, Clone, Default)]
pub(crate) struct Leg {
    pub end: Option<LegEnd>,
    pub detail: String,
    pub total_ms: Option<f64>,
    pub downtime_ms: Option<f64>,
    /// Bytes the sending veth end transmitted (data direction, headers included).
    pub wire_bytes: Option<u64>,
    /// Bytes of the reverse direction (acks, livemig's answers).
    pub wire_back: Option<u64>,
    pub cpu_ms: Option<f64>,
    /// QEMU native: pages differing between the paused source and destination.
    pub differing_pages: Option<u64>,
    pub capabilities: Vec<String>,
    pub send_report: Option<Value>,
    /// Guest writes per second on the source during the leg (from its verifier lines).
    pub guest_rate: Option<f64>,
    /// What else the machine did meanwhile.
    pub noise: Option<Noise>,
}

/// Guest writes (the `writes=` total of `LIVEMIG-VERIFY` lines) as they appear on a console.
#[derive(Debug, Default)]
pub(crate) struct WriteRate {
    mark: usize,
    pub samples: Vec<(Instant, u64)>,
}

impl WriteRate {
    /// Reads new complete lines of `vm`'s console.
    pub fn poll(&mut self, vm: &Vm) {
        let data = std::fs::read(vm.console_path()).unwrap_or_default();
        while self.mark < data.len() {
            let Some(nl) = data[self.mark..].iter().position(|&b| b == b'\n') else { break };
            let line = String::from_utf8_lossy(&data[self.mark..self.mark + nl]).into_owned();
            self.mark += nl + 1;
            if let Some(v) = VerifyLine::parse(line.trim_end_matches('\r')) {
                self.samples.push((Instant::now(), v.writes));
            }
        }
    }

    /// Writes per second between the samples taken in `[from, to]` (two or more needed).
    pub fn rate(&self, from: Instant, to: Instant) -> Option<f64> {
        let s: Vec<&(Instant, u64)> = self.samples.iter().filter(|(t, _)| *t >= from && *t <= to).collect();
        let (first, last) = (s.first()?, s.last()?);
        let dt = last.0.duration_since(first.0).as_secs_f64();
        (s.len() >= 2 && dt > 0.5).then(|| last.1.saturating_sub(first.1) as f64 / dt)
    }
}

/// Everything a leg needs.
#[derive(Debug)]
pub(crate) struct LegCtx<'a> {
    pub exe: &'a Path,
    pub from: &'a Vm,
    pub to: &'a Vm,
    pub from_ns: &'a str,
    pub to_ns: &'a str,
    pub to_addr: &'a str,
    /// Host names of the sending and the receiving "host" (`lmb-a`, `lmb-b`): what their
    /// certificates carry and what the sender checks.
    pub from_host: &'a str,
    pub to_host: &'a str,
    pub port: u16,
    pub hosts: &'a Hosts,
    /// Source namespace to destination namespace (false: the way back).
    pub forward: bool,
    pub link_bytes_per_s: u64,
    /// `--link unshaped`: no qdisc, and QEMU estimates the switchover's bandwidth itself.
    pub unshaped: bool,
    /// `livemig send --connections` of the shared engine's migrators.
    pub connections: u32,
    pub migrator: Migrator,
    /// The migrator's maximum downtime (QEMU's `downtime-limit`, livemig's `--max-downtime`).
    pub max_downtime: &'a str,
    /// TLS material (`None`: plain TCP for every migrator, `--no-tls`).
    pub tls: Option<&'a TlsFiles>,
    pub timeout: Duration,
    pub cancel: &'a AtomicBool,
    pub dir: &'a Path,
    pub disk: &'a Path,
    /// `send --help` lists `--disk-image` / `--snapshot-dir`; `receive --help` lists
    /// `--disk-image` / `--snapshot-dir`.
    pub send_disk_image: bool,
    pub send_snapshot_dir: bool,
    pub recv_disk_image: bool,
    pub recv_snapshot_dir: bool,
    /// `--vm-id` for send (when its --help lists it): the same on the way there and back, so a
    /// return finds the snapshot its first leg left.
    pub vm_id: Option<String>,
    /// Snapshot directories of the sending and the receiving host.
    pub send_snapshot: &'a Path,
    pub recv_snapshot: &'a Path,
}

impl LegCtx<'_> {
    fn tx(&self) -> anyhow::Result<(u64, u64)> {
        let (s, d) = self.hosts.tx_bytes()?;
        Ok(if self.forward { (s, d) } else { (d, s) })
    }
}

fn cancelled(c: &AtomicBool) -> anyhow::Result<()> {
    if c.load(Ordering::SeqCst) {
        bail!("cancelled");
    }
    Ok(())
}

/// Runs the leg with the context's migrator.
pub(crate) fn run(ctx: &LegCtx<'_>, rate: &mut WriteRate) -> anyhow::Result<Leg> {
    match ctx.migrator {
        m if m.is_qemu() => native(ctx, rate),
        _ => livemig(ctx, rate),
    }
}

fn livemig(ctx: &LegCtx<'_>, rate: &mut WriteRate) -> anyhow::Result<Leg> {
    let mut leg = Leg::default();
    let addr = format!("{}:{}", ctx.to_addr, ctx.port);
    let tag = if ctx.forward { "fwd" } else { "back" };
    let recv_report = ctx.dir.join(format!("receive-{tag}.json"));
    let send_report = ctx.dir.join(format!("send-{tag}.json"));
    let recv_log = std::fs::File::create(ctx.dir.join(format!("receive-{tag}.log")))?;
    let send_log = std::fs::File::create(ctx.dir.join(format!("send-{tag}.log")))?;
    let mut rc = Command::new("ip");
    rc.args(["netns", "exec", ctx.to_ns]).arg(ctx.exe).args(["receive", "--listen", &addr]);
    match ctx.tls {
        Some(t) => rc.args(t.livemig_args(ctx.to_host)),
        None => rc.arg("--insecure"),
    };
    rc.arg("--qmp")
        .arg(ctx.to.qmp_path())
        .arg("--report")
        .arg(&recv_report);
    if ctx.recv_snapshot_dir {
        rc.arg("--snapshot-dir").arg(ctx.recv_snapshot);
    }
    if ctx.recv_disk_image {
        rc.arg("--disk-image").arg(ctx.disk);
    }
    let mut receiver =
        Proc::new(rc.stdin(Stdio::null()).stdout(recv_log.try_clone()?).stderr(recv_log).spawn().context("cannot start livemig receive")?);
    let policy = if ctx.migrator == Migrator::LivemigFixed { "fixed" } else { "adaptive" };
    let maxd = ctx.max_downtime;
    let mut sc = Command::new("ip");
    sc.args(["netns", "exec", ctx.from_ns]).arg(ctx.exe).args(["send", "--to", &addr]);
    match ctx.tls {
        Some(t) => sc.args(t.livemig_args(ctx.from_host)).args(["--tls-server-name", ctx.to_host]),
        None => sc.arg("--insecure"),
    };
    sc.args(["--engine", ctx.migrator.engine(), "--policy", policy, "--max-downtime", maxd, "--qmp"])
        .arg(ctx.from.qmp_path())
        .arg("--report")
        .arg(&send_report);
    if ctx.send_disk_image {
        sc.arg("--disk-image").arg(ctx.disk);
    }
    if ctx.connections > 1 && ctx.migrator.engine() == "shared" {
        sc.args(["--connections", &ctx.connections.to_string()]);
    }
    if ctx.send_snapshot_dir {
        sc.arg("--snapshot-dir").arg(ctx.send_snapshot);
    }
    if let Some(id) = &ctx.vm_id {
        sc.args(["--vm-id", id]);
    }
    rate.poll(ctx.from); // lines printed before the start are not part of the window
    let (tx0, back0) = ctx.tx()?;
    let probe = NoiseProbe::start(&[ctx.from.pid(), ctx.to.pid()]);
    let t0 = Instant::now();
    let mut sender =
        Proc::new(sc.stdin(Stdio::null()).stdout(send_log.try_clone()?).stderr(send_log).spawn().context("cannot start livemig send")?);
    let mut timed_out = false;
    let send_end = loop {
        rate.poll(ctx.from);
        if let Some(r) = sender.try_wait() {
            break r;
        }
        if ctx.cancel.load(Ordering::SeqCst) {
            sender.stop(Duration::from_secs(10));
            receiver.stop(Duration::from_secs(5));
            bail!("cancelled");
        }
        if t0.elapsed() > ctx.timeout {
            timed_out = true;
            // SIGTERM: livemig send cancels and puts the source back running.
            break sender.stop(Duration::from_secs(15));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let recv_end = match receiver.wait_for(Duration::from_secs(30), ctx.cancel) {
        Some(r) => r,
        None => receiver.stop(Duration::from_secs(5)),
    };
    let t1 = Instant::now();
    let (tx1, back1) = ctx.tx()?;
    leg.wire_bytes = Some(tx1 - tx0);
    leg.wire_back = Some(back1 - back0);
    leg.cpu_ms = Some(send_end.1 + recv_end.1);
    leg.noise = probe.finish(send_end.1 + recv_end.1);
    leg.guest_rate = rate.rate(t0, t1);
    let report: Value = std::fs::read_to_string(&send_report).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or(Value::Null);
    leg.total_ms = report.get("total_time_ms").and_then(Value::as_f64);
    leg.downtime_ms = report.get("downtime_ms").and_then(Value::as_f64);
    leg.capabilities = vec![format!("engine {}", ctx.migrator.engine()), format!("policy {policy}"), format!("max-downtime {maxd}")];
    leg.capabilities.push(match ctx.tls {
        Some(_) => format!("TLS 1.3, certificates of `livemig certs` (server name {})", ctx.to_host),
        None => "plain TCP (--insecure)".into(),
    });
    if ctx.send_disk_image || ctx.recv_disk_image {
        leg.capabilities.push("--disk-image (the guest's root disk)".into());
    }
    if ctx.send_snapshot_dir || ctx.recv_snapshot_dir {
        leg.capabilities.push("--snapshot-dir (one per host)".into());
    }
    let err = report.get("error").and_then(Value::as_str).unwrap_or("").to_string();
    leg.send_report = (!report.is_null()).then_some(report);
    leg.end = Some(if timed_out {
        leg.detail = format!("no switchover within {} s (send stopped with SIGTERM)", ctx.timeout.as_secs());
        LegEnd::Timeout
    } else if send_end.0 == 0 && recv_end.0 == 0 {
        LegEnd::Completed
    } else {
        leg.detail = format!("send exit {}, receive exit {}: {err}", send_end.0, recv_end.0);
        LegEnd::Failed
    });
    Ok(leg)
}

fn caps_supported(q: &mut Qmp) -> anyhow::Result<Vec<String>> {
    let v = q.execute("query-migrate-capabilities", None)?;
    Ok(v.as_array()
        .map(|a| a.iter().filter_map(|c| c.get("capability").and_then(Value::as_str).map(String::from)).collect())
        .unwrap_or_default())
}

/// Capabilities and parameters of the tuned QEMU migrator, applied to both sides; returns what
/// was set.
fn tune(src: &mut Qmp, dst: &mut Qmp) -> anyhow::Result<Vec<String>> {
    let have = caps_supported(src)?;
    let mut want: Vec<&str> = ["xbzrle", "auto-converge", "multifd"].into_iter().filter(|c| have.iter().any(|h| h == c)).collect();
    let mut set = Vec::new();
    // Try all; if QEMU refuses the combination, drop xbzrle (multifd ignores or rejects it).
    loop {
        let caps: Vec<(&str, bool)> = want.iter().map(|c| (*c, true)).collect();
        let r = src.migrate_set_capabilities(&caps).and_then(|()| dst.migrate_set_capabilities(&caps));
        match r {
            Ok(()) => break,
            Err(e) if want.contains(&"xbzrle") => {
                set.push(format!("xbzrle refused with the others: {e}"));
                want.retain(|c| *c != "xbzrle");
            }
            Err(e) => return Err(e.into()),
        }
    }
    set.extend(want.iter().map(|c| c.to_string()));
    if want.contains(&"multifd") {
        let p = json!({"multifd-channels": 2, "multifd-compression": "zstd"});
        match src.migrate_set_parameters(p.clone()).and_then(|()| dst.migrate_set_parameters(p)) {
            Ok(()) => set.push("multifd-compression zstd, 2 channels".into()),
            Err(e) => {
                set.push(format!("no zstd ({e})"));
                let p = json!({"multifd-channels": 2});
                src.migrate_set_parameters(p.clone())?;
                dst.migrate_set_parameters(p)?;
            }
        }
    }
    if want.contains(&"xbzrle") {
        src.migrate_set_parameters(json!({"xbzrle-cache-size": 64u64 << 20}))?;
        set.push("xbzrle-cache-size 64 MiB".into());
    }
    Ok(set)
}

/// (major, minor) of QEMU's QMP greeting (`(0, 0)` if it has none).
pub(crate) fn qemu_version(greeting: &Value) -> (u64, u64) {
    let q = &greeting["version"]["qemu"];
    (q["major"].as_u64().unwrap_or(0), q["minor"].as_u64().unwrap_or(0))
}

/// Thread ids of the vCPUs (`query-cpus-fast`).
fn vcpu_threads(q: &mut Qmp) -> Vec<u64> {
    q.execute("query-cpus-fast", None)
        .ok()
        .and_then(|v| v.as_array().map(|a| a.iter().filter_map(|c| c.get("thread-id").and_then(Value::as_u64)).collect()))
        .unwrap_or_default()
}

/// CPU ms of QEMU process `pid` not spent in its vCPU threads.
fn non_vcpu_cpu(pid: u32, vcpus: &[u64]) -> f64 {
    let all = process_cpu_ms(pid).unwrap_or(0.0);
    let v: f64 = vcpus.iter().filter_map(|t| thread_cpu_ms(pid, *t)).sum();
    all - v
}

fn native(ctx: &LegCtx<'_>, rate: &mut WriteRate) -> anyhow::Result<Leg> {
    let mut leg = Leg::default();
    let qt = Duration::from_secs(30);
    let mut src = Qmp::connect(ctx.from.qmp_path(), qt).context("QMP of the source")?;
    let mut dst = Qmp::connect(ctx.to.qmp_path(), qt).context("QMP of the destination")?;
    // The link rate, in bytes/s as QEMU takes it (its default, 128 MiB/s, is not the link).
    let max_bw = ctx.link_bytes_per_s;
    let ms = crate::units::parse_duration_ms(ctx.max_downtime).map_err(anyhow::Error::msg)?;
    let limit_ms = format!("{:.0}", ms.round()).parse::<u64>()?;
    src.migrate_set_parameters(json!({"downtime-limit": limit_ms, "max-bandwidth": max_bw}))?;
    leg.capabilities.push(format!("downtime-limit {limit_ms} ms, max-bandwidth {max_bw} B/s (the link)"));
    // QEMU >= 8.2: the bandwidth the switchover may count on, else QEMU estimates it from the
    // iterations (which a throttled or idle guest makes low).
    let v = qemu_version(src.greeting());
    if v >= (8, 2) && !ctx.unshaped {
        src.migrate_set_parameters(json!({"avail-switchover-bandwidth": max_bw}))?;
        leg.capabilities.push(format!("avail-switchover-bandwidth {max_bw} B/s"));
    } else if ctx.unshaped {
        // Set to 10 GB/s on a link that moves far less, QEMU would plan a downtime of seconds.
        leg.capabilities.push("avail-switchover-bandwidth not set (unshaped link: QEMU estimates it)".into());
    }
    if ctx.migrator == Migrator::QemuTuned {
        leg.capabilities.extend(tune(&mut src, &mut dst)?);
    }
    match ctx.tls {
        Some(t) => {
            let id = format!("lmb-tls-{}", ctx.port);
            src.execute(
                "object-add",
                Some(json!({"qom-type": "tls-creds-x509", "id": id, "dir": t.qemu_dir(ctx.from_host), "endpoint": "client"})),
            )
            .context("the source QEMU refused its tls-creds-x509")?;
            dst.execute(
                "object-add",
                Some(json!({"qom-type": "tls-creds-x509", "id": id, "dir": t.qemu_dir(ctx.to_host), "endpoint": "server", "verify-peer": true})),
            )
            .context("the destination QEMU refused its tls-creds-x509")?;
            src.migrate_set_parameters(json!({"tls-creds": id, "tls-hostname": ctx.to_host}))?;
            dst.migrate_set_parameters(json!({"tls-creds": id}))?;
            leg.capabilities.push(format!("TLS: tls-creds-x509 on both (client certificate checked), tls-hostname {}", ctx.to_host));
        }
        None => leg.capabilities.push("plain TCP".into()),
    }
    let uri = format!("tcp:{}:{}", ctx.to_addr, ctx.port);
    dst.migrate_incoming(&uri)?;
    let (sv, dv) = (vcpu_threads(&mut src), vcpu_threads(&mut dst));
    let (spid, dpid) = (ctx.from.pid(), ctx.to.pid());
    let cpu0 = non_vcpu_cpu(spid, &sv) + non_vcpu_cpu(dpid, &dv);
    rate.poll(ctx.from); // lines printed before the start are not part of the window
    let (tx0, back0) = ctx.tx()?;
    let probe = NoiseProbe::start(&[spid, dpid]);
    let t0 = Instant::now();
    src.migrate(&uri)?;
    let info = loop {
        rate.poll(ctx.from);
        let mut info = src.query_migrate()?;
        if info.is_finished() {
            // QEMU sets `completed` before it computes total-time and downtime: until then both
            // read 0 (caught often on the slow nested KVM lane).
            let d0 = Instant::now();
            while info.status.as_deref() == Some("completed") && info.total_time == Some(0) && d0.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
                info = src.query_migrate()?;
            }
            break Some(info);
        }
        if ctx.cancel.load(Ordering::SeqCst) {
            let _ = src.migrate_cancel();
            bail!("cancelled");
        }
        if t0.elapsed() > ctx.timeout {
            let _ = src.migrate_cancel();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let t1 = Instant::now();
    // The destination loads the last state after the source says completed: wait until it left
    // `inmigrate` before reading figures and comparing memory.
    let mut dst_status = String::new();
    if info.as_ref().and_then(|i| i.status.as_deref()) == Some("completed") {
        let d0 = Instant::now();
        loop {
            cancelled(ctx.cancel)?;
            dst_status = dst.query_status().map(|s| s.status).unwrap_or_else(|e| format!("error: {e}"));
            if dst_status != "inmigrate" || d0.elapsed() > Duration::from_secs(30) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let cpu1 = non_vcpu_cpu(spid, &sv) + non_vcpu_cpu(dpid, &dv);
    let (tx1, back1) = ctx.tx()?;
    leg.wire_bytes = Some(tx1 - tx0);
    leg.wire_back = Some(back1 - back0);
    leg.cpu_ms = Some(cpu1 - cpu0);
    leg.noise = probe.finish(0.0);
    leg.guest_rate = rate.rate(t0, t1);
    let Some(info) = info else {
        leg.end = Some(LegEnd::Timeout);
        leg.detail = format!("QEMU did not complete within {} s (cancelled)", ctx.timeout.as_secs());
        return Ok(leg);
    };
    // Still 0 after the wait above: no measurement; the figures stay unknown rather than enter
    // the medians as 0.
    let zero = info.total_time == Some(0);
    leg.total_ms = info.total_time.filter(|_| !zero).map(|t| t as f64);
    leg.downtime_ms = info.downtime.filter(|_| !zero).map(|t| t as f64);
    if info.status.as_deref() != Some("completed") {
        leg.end = Some(LegEnd::Failed);
        leg.detail = format!("QEMU migration {}: {}", info.status.as_deref().unwrap_or("?"), info.error_desc.as_deref().unwrap_or(""));
        return Ok(leg);
    }
    if dst_status != "paused" {
        leg.end = Some(LegEnd::Failed);
        leg.detail = format!("destination QEMU is `{dst_status}` after the migration (expected paused)");
        return Ok(leg);
    }
    let diff = compare_ram(&mut src, spid, &mut dst, dpid)?;
    let zero_note = if zero { "; QEMU reported total-time 0 and downtime 0 (figures unknown)" } else { "" };
    if livemig_lab::Accel::from_env()? == livemig_lab::Accel::Kvm && diff.only_kvm_records(1) {
        leg.differing_pages = Some(0);
        leg.detail = format!("{diff}: KVM's steal-time record, not guest memory{zero_note}");
    } else {
        leg.differing_pages = Some(diff.differ);
        leg.detail = format!("{diff}{zero_note}");
    }
    dst.cont()?;
    leg.end = Some(LegEnd::Completed);
    Ok(leg)
}

/// Work dir of one run.
pub(crate) fn run_dir(base: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let d = base.join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    Ok(d)
}
