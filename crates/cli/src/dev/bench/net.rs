//! Two "hosts" on one machine: network namespaces joined by a veth pair, shaped with `tc` (tbf, or netem for a delay).

use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// Prefix of every namespace this harness creates (leftovers of killed runs are found by it).
pub(crate) const PREFIX: &str = "lmb-";

/// Source side address (in the source namespace).
pub(crate) const SRC_ADDR: &str = "10.213.0.1";
/// Destination side address.
pub(crate) const DST_ADDR: &str = "10.213.0.2";

fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The two namespaces and the veth pair. Dropping it deletes both namespaces (which removes
/// the veth pair and its qdiscs); kill the processes inside first.
#[derive(Debug)]
pub(crate) struct Hosts {
    pub src_ns: String,
    pub dst_ns: String,
    pub src_if: String,
    pub dst_if: String,
    deleted: bool,
}

/// One link shape.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Shape {
    /// As `tc` reads it, e.g. `1gbit`.
    pub rate: String,
    /// One-way delay added on each side, ms (0: none).
    pub delay_ms: f64,
}

impl Hosts {
    /// Creates `lmb-<id>-src` and `lmb-<id>-dst` and a veth pair between them, with addresses.
    pub fn create(id: u32) -> anyhow::Result<Hosts> {
        let h = Hosts {
            src_ns: format!("{PREFIX}{id}-src"),
            dst_ns: format!("{PREFIX}{id}-dst"),
            src_if: format!("lmbs{id}"),
            dst_if: format!("lmbd{id}"),
            deleted: false,
        };
        run(&["ip", "netns", "add", &h.src_ns])?;
        run(&["ip", "netns", "add", &h.dst_ns])?;
        run(&["ip", "link", "add", &h.src_if, "netns", &h.src_ns, "type", "veth", "peer", "name", &h.dst_if, "netns", &h.dst_ns])?;
        for (ns, dev, addr) in [(&h.src_ns, &h.src_if, SRC_ADDR), (&h.dst_ns, &h.dst_if, DST_ADDR)] {
            run(&["ip", "-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(h)
    }

    /// Shapes both directions: root qdisc `tbf rate R burst B latency 50ms` on each veth end
    /// (burst: 10 ms of the rate, at least 32 KiB); with a delay, `netem delay D rate R` instead
    /// (needs sch_netem, which some kernels lack).
    pub fn shape(&self, s: &Shape, bytes_per_s: u64) -> anyhow::Result<()> {
        for (ns, dev) in [(&self.src_ns, &self.src_if), (&self.dst_ns, &self.dst_if)] {
            if s.rate == super::UNSHAPED {
                // Back to the veth's default (no queue); fails harmlessly where none was set.
                let _ = run(&["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"]);
                continue;
            }
            let mut a: Vec<String> =
                ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root"].iter().map(|x| x.to_string()).collect();
            if s.delay_ms > 0.0 {
                a.extend(["netem", "delay", &format!("{}ms", s.delay_ms), "rate", &s.rate, "limit", "100000"].map(String::from));
            } else {
                let burst = (bytes_per_s / 100).max(32 * 1024);
                a.extend(["tbf", "rate", &s.rate, "burst", &burst.to_string(), "latency", "50ms"].map(String::from));
            }
            let refs: Vec<&str> = a.iter().map(String::as_str).collect();
            run(&refs).context(if s.delay_ms > 0.0 { "a delay needs the sch_netem qdisc" } else { "shaping the link with tbf" })?;
        }
        Ok(())
    }

    /// The prefix that runs a command in a namespace.
    pub fn prefix(ns: &str) -> Vec<String> {
        ["ip", "netns", "exec", ns].iter().map(|s| s.to_string()).collect()
    }

    /// (tx_bytes of the source veth, tx_bytes of the destination veth).
    pub fn tx_bytes(&self) -> anyhow::Result<(u64, u64)> {
        let read = |ns: &str, dev: &str| -> anyhow::Result<u64> {
            let s = run(&["ip", "netns", "exec", ns, "cat", &format!("/sys/class/net/{dev}/statistics/tx_bytes")])?;
            s.trim().parse::<u64>().with_context(|| format!("bad tx_bytes {s:?}"))
        };
        Ok((read(&self.src_ns, &self.src_if)?, read(&self.dst_ns, &self.dst_if)?))
    }

    /// Deletes both namespaces (idempotent).
    pub fn delete(&mut self) {
        if self.deleted {
            return;
        }
        self.deleted = true;
        for ns in [&self.src_ns, &self.dst_ns] {
            kill_ns_pids(ns);
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.delete();
    }
}

/// SIGKILLs every process left in namespace `ns` (all of them were started by this harness).
fn kill_ns_pids(ns: &str) {
    if let Ok(out) = run(&["ip", "netns", "pids", ns]) {
        for pid in out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
            if pid > 1 && pid != std::process::id() {
                // Not our own processes' names: pids listed as members of our namespace.
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
    }
}

/// Removes namespaces named `lmb-*` left by an earlier killed run (and the processes in them).
/// Returns their names.
pub(crate) fn remove_leftovers() -> Vec<String> {
    let mut removed = Vec::new();
    if let Ok(list) = run(&["ip", "netns", "list"]) {
        for line in list.lines() {
            let Some(name) = line.split_whitespace().next() else { continue };
            if name.starts_with(PREFIX) && !owner_alive(name) {
                kill_ns_pids(name);
                let _ = run(&["ip", "netns", "del", name]);
                removed.push(name.to_string());
            }
        }
    }
    removed
}

/// Whether the bench process that named namespace `lmb-<pid>-...` still runs (then it is not a
/// leftover but a concurrent run).
fn owner_alive(name: &str) -> bool {
    let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    if pid == std::process::id() {
        return false;
    }
    std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.contains("bench"))
}
