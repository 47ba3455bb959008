//! The migration report: what the operator reads at the end and what `--report FILE` holds.

use std::collections::BTreeMap;

use livemig_compact::{ClassStats, PageClass};
use livemig_control::{Decision, Fit, IterationStats};
use serde::Serialize;

/// One pre-copy iteration as reported.
#[derive(Debug, Clone, Serialize)]
pub struct IterationRecord {
    /// Iteration statistics (index, dirty_pages, sent_pages, wire_bytes, duration_ms, scan_ms, rate_bytes_per_s).
    #[serde(flatten)]
    pub stats: IterationStats,
    /// What the controller decided after this iteration's scan.
    pub decision: String,
    /// Why.
    pub reason: String,
    /// Downtime predicted for a switchover at that point.
    pub predicted_downtime_ms: Option<f64>,
    /// The WWS trend fit, for policies that fit one.
    pub fit: Option<Fit>,
    /// True for the final iteration, sent with the source paused.
    pub last: bool,
    /// Pause of the guest the tracker needed to read the dirty pages (soft-dirty), if any.
    pub tracker_pause_ms: Option<f64>,
}

impl IterationRecord {
    /// A record from stats and the decision taken after its scan.
    pub fn new(stats: IterationStats, decision: &Decision, fit: Option<Fit>, last: bool) -> Self {
        let p = decision.predicted_downtime_ms();
        IterationRecord {
            stats,
            decision: if last { "final" } else { decision.name() }.into(),
            reason: decision.reason().to_string(),
            predicted_downtime_ms: p.is_finite().then_some(p),
            fit,
            last,
            tracker_pause_ms: None,
        }
    }
}

/// The index of one disk image.
#[derive(Debug, Clone, Serialize, Default)]
pub struct DiskIndexReport {
    /// The image as given.
    pub image: String,
    /// Bytes between the starts of the indexed 4 KiB windows (512, 1024, 2048 or 4096).
    pub stride: u32,
    /// Why that stride (the filesystems found, or none).
    pub stride_reason: String,
    /// Windows of the image at that stride, zero ones included.
    pub windows: u64,
    /// Distinct non-zero fingerprints indexed.
    pub fingerprints: u64,
    /// Bytes of memory the index holds.
    pub memory_bytes: u64,
    /// Whether it was built now (else read from the index cache).
    pub built: bool,
    /// Time to load or build it.
    pub ms: f64,
}

/// How much the source guest was slowed to make the migration converge.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ThrottleReport {
    /// Highest fraction of CPU time taken away.
    pub max: f64,
    /// Time the vCPUs were stunned in total.
    pub stunned_ms: f64,
    /// Stun slices.
    pub slices: u64,
}

/// Memory verification at switchover.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Verification {
    /// Digest of the source memory.
    pub source_digest: Option<String>,
    /// Digest of the destination memory.
    pub destination_digest: Option<String>,
    /// Whether they matched.
    pub ok: bool,
    /// Time the destination took to re-read its whole memory for the digest, if it did.
    pub reread_ms: Option<f64>,
}

/// The whole report of one agent.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// `send` or `receive`.
    pub role: String,
    /// `completed`, `failed`, `cancelled`, or `unknown` (destination did not confirm its resume).
    pub outcome: String,
    /// The error, when not completed.
    pub error: Option<String>,
    /// State the source VM was left in (`running`, `paused`, ...), as QEMU reports it.
    pub source_state: Option<String>,
    /// State of the destination VM at the end, as QEMU reports it.
    pub destination_state: Option<String>,
    /// From the start of the agent to the end.
    pub total_time_ms: f64,
    /// From the source's `stop` to the destination's confirmed `cont`.
    pub downtime_ms: Option<f64>,
    /// Downtime the controller predicted for the switchover.
    pub predicted_downtime_ms: Option<f64>,
    /// Bytes of guest RAM.
    pub ram_bytes: u64,
    /// Bytes of livemig's stream, frames and headers included.
    pub wire_bytes: u64,
    /// Bytes of QEMU's device-state stream carried inside it.
    pub device_state_bytes: u64,
    /// The most the device-state stream may carry (`--max-device-state`; send only).
    pub max_device_state_bytes: Option<u64>,
    /// The QEMU version this agent drove (from its QMP greeting).
    pub qemu_version: Option<String>,
    /// How the RAM travelled: `shared` (livemig read the shared RAM) or `stream` (QEMU's own
    /// migration stream, relayed and compacted).
    pub engine: String,
    /// Why that engine (`--engine auto` says what it measured; a forced engine says so).
    pub engine_reason: Option<String>,
    /// Stream engine: what the relay saw.
    pub stream: Option<crate::stream::StreamReport>,
    /// Stream engine: QEMU's own downtime figure (source `query-migrate`), beside `downtime_ms`
    /// (QEMU's stop of the source to the destination's confirmed `cont`).
    pub qemu_downtime_ms: Option<f64>,
    /// Pages sent, by class (`zero`, `dup`, `disk_ref`, `snapshot_ref`, `delta`, `raw`; `raw`
    /// includes compressed whole pages).
    pub pages: BTreeMap<String, u64>,
    /// Wire bytes of page records (headers included), by class.
    pub page_bytes: BTreeMap<String, u64>,
    /// Whole pages (the `raw` class) by how they travelled: `raw` (uncompressed), `lz4`, `zstd`
    /// (any level). Both sides know it.
    pub whole_pages: BTreeMap<String, u64>,
    /// The sender's compressor of whole pages: `auto` (chosen by the link) or `forced`, what was
    /// chosen, when (iteration or chunk, wire bytes) and why (the numbers behind it).
    pub compressor: Option<crate::autocomp::CompressorReport>,
    /// Bytes of the non-zero pages sent, as whole uncompacted pages (4096 each).
    pub uncompacted_bytes: u64,
    /// `uncompacted_bytes` / wire bytes of page records.
    pub compaction_ratio: Option<f64>,
    /// `wire_bytes` (the whole stream) / `uncompacted_bytes`.
    pub wire_fraction: Option<f64>,
    /// Pages the destination could not resolve (reference or delta miss) and got again whole.
    pub resent_pages: u64,
    /// Identity of the VM for snapshots.
    pub vm: Option<String>,
    /// Disk images the destination holds and references may name.
    pub disk_images_used: usize,
    /// This agent's index of each `--disk-image`, in order.
    pub disk_indexes: Vec<DiskIndexReport>,
    /// The memory snapshot references named, if any.
    pub snapshot_used: Option<String>,
    /// The memory snapshot kept after this migration, if any.
    pub snapshot_kept: Option<String>,
    /// Things that did not stop the migration but the operator should know.
    pub warnings: Vec<String>,
    /// Receive: connections refused while waiting for the sender (not a livemig sender, a
    /// failed TLS handshake, no hello in time); the first 32.
    pub refused_connections: Vec<crate::arrival::RefusedConnection>,
    /// Receive: how many connections were refused in all.
    pub refused_connections_total: u64,
    /// Every iteration.
    pub iterations: Vec<IterationRecord>,
    /// Throttling applied to the source guest, if any.
    pub throttle: Option<ThrottleReport>,
    /// Memory verification.
    pub verification: Verification,
    /// Downtime policy.
    pub policy: String,
    /// Tracker.
    pub tracker: String,
    /// The most threads the shared engine's tracker and page encoder, or the stream engine's
    /// page encoder, used (`--threads`); on the shared engine's receiver, its decoding threads
    /// (`receive --threads`).
    pub threads: Option<usize>,
    /// Shared engine: the connections the pages went over (`send --connections`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
    /// Shared engine's receiver: zero pages freed by punching a hole in the destination's RAM
    /// (a memfd or a file on tmpfs) instead of writing zeros.
    pub zero_pages_punched: Option<u64>,
    /// Shared engine's receiver: zero pages written as zeros (RAM on another file system).
    pub zero_pages_written: Option<u64>,
    /// Soft-dirty tracker only: pages the final full content check found changed although their
    /// soft-dirty bit was clear (sent in the final pass all the same). 0 when the kernel's bits
    /// were exact.
    pub tracker_missed_pages: Option<u64>,
    /// Operator's maximum downtime.
    pub max_downtime_ms: Option<f64>,
    /// Wire rate cap, bytes per second.
    pub bandwidth_bytes_per_s: Option<u64>,
    /// Transport: `tls-certificates`, `tls-psk` or `tcp-insecure`.
    pub transport: String,
    /// Who the peer proved to be (certificate subject, `psk peer`, or `unauthenticated`).
    pub peer: Option<String>,
    /// How the migration's page key (it keys the page hashes, reference fingerprints and
    /// digests) was agreed: `tls-exporter` (exported from the TLS session: secret) or
    /// `plain-link` (chosen by the receiver and sent in the clear: secret from the guest, not
    /// from the network).
    pub page_key: Option<String>,
    /// On a plain link only, the page key as 64 hex digits (it crossed the network in the
    /// clear; with it the digests can be recomputed afterwards). Never set over TLS.
    pub page_key_hex: Option<String>,
}

impl Report {
    /// Sets the per-class counts from the codec's.
    pub fn set_class_stats(&mut self, stats: &ClassStats) {
        for (name, c) in stats.by_report_name() {
            self.pages.insert(name.to_string(), c.pages);
            self.page_bytes.insert(name.to_string(), c.wire_bytes);
        }
        self.uncompacted_bytes = stats.whole_page_bytes();
        for class in [PageClass::Raw, PageClass::Lz4, PageClass::Zstd] {
            self.whole_pages.insert(class.name().to_string(), stats.get(class).pages);
        }
    }

    /// Sets `compaction_ratio` and `wire_fraction` from the counts and `wire_bytes`.
    pub fn compute_compaction_ratio(&mut self) {
        let wire: u64 = self.page_bytes.values().sum();
        let whole = self.uncompacted_bytes as f64;
        self.compaction_ratio = (wire > 0).then(|| whole / wire as f64);
        self.wire_fraction = (self.uncompacted_bytes > 0).then(|| self.wire_bytes as f64 / whole);
    }

    /// The human summary, a few lines.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let _ = writeln!(s, "outcome:      {}", self.outcome);
        if let Some(e) = &self.error {
            let _ = writeln!(s, "error:        {e}");
        }
        if !self.engine.is_empty() {
            let q = self.qemu_version.as_deref().map(|v| format!(", QEMU {v}")).unwrap_or_default();
            let _ = writeln!(s, "engine:       {}{q}", self.engine);
        }
        let _ = writeln!(s, "total time:   {:.0} ms", self.total_time_ms);
        if let Some(d) = self.downtime_ms {
            let pred = self.predicted_downtime_ms.map(|p| format!(" (predicted {p:.0} ms)")).unwrap_or_default();
            let qemu = self.qemu_downtime_ms.map(|q| format!(", QEMU's own figure {q:.0} ms")).unwrap_or_default();
            let _ = writeln!(s, "downtime:     {d:.0} ms{pred}{qemu}");
        }
        if let Some(so) = self.stream.as_ref().and_then(|st| st.switchover.as_ref()) {
            let fin = so.final_raw_bytes.map(|b| format!(", then QEMU's final pass and device state {:.1} MiB", mib(b))).unwrap_or_default();
            let _ = writeln!(
                s,
                "switchover:   QEMU's downtime-limit {:.0} ms at {:.1} MB/s; {:.1} MiB of its pass left, {:.1} MiB held by the relay ({:.0} ms){fin}",
                so.qemu_downtime_limit_ms,
                so.raw_bytes_per_s.unwrap_or(0.0) / 1e6,
                mib(so.qemu_remaining_bytes),
                mib(so.relay_queued_bytes),
                so.queued_ms
            );
        }
        let _ = writeln!(s, "guest RAM:    {:.0} MiB", mib(self.ram_bytes));
        let _ = writeln!(
            s,
            "on the wire:  {:.1} MiB (device state {:.0} KiB)",
            mib(self.wire_bytes),
            self.device_state_bytes as f64 / 1024.0
        );
        let classes: Vec<String> = self.pages.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(s, "pages:        {}", classes.join(", "));
        if let (Some(r), Some(f)) = (self.compaction_ratio, self.wire_fraction) {
            let _ = writeln!(
                s,
                "compaction:   {r:.2}x ({:.1} MiB of non-zero pages took {:.1} MiB on the wire: {f:.3}x)",
                mib(self.uncompacted_bytes),
                mib(self.wire_bytes)
            );
        }
        if let Some(c) = &self.compressor {
            let changes = c.changes.len().saturating_sub(1);
            let why = c.last_decision.as_deref().or(c.changes.last().map(|l| l.reason.as_str())).unwrap_or("");
            let _ = writeln!(s, "compressor:   {} ({}, {changes} change(s)): {why}", c.chosen, c.mode);
        }
        if self.resent_pages > 0 {
            let _ = writeln!(s, "resent:       {} pages the destination could not resolve", self.resent_pages);
        }
        if let Some(id) = &self.snapshot_used {
            let _ = writeln!(s, "snapshot:     references to snapshot {}", &id[..12.min(id.len())]);
        }
        if let Some(id) = &self.snapshot_kept {
            let _ = writeln!(s, "kept:         memory snapshot {}", &id[..12.min(id.len())]);
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning:      {w}");
        }
        let _ = writeln!(s, "iterations:   {}", self.iterations.len());
        if let Some(t) = &self.throttle {
            let _ = writeln!(
                s,
                "throttle:     up to {:.0}% of guest CPU time taken away, stunned {:.0} ms in {} slices",
                t.max * 100.0,
                t.stunned_ms,
                t.slices
            );
        }
        if self.verification.source_digest.is_some() || self.verification.destination_digest.is_some() {
            let _ = writeln!(s, "verification: {}", if self.verification.ok { "keyed memory digests equal" } else { "FAILED or not reached" });
        }
        match self.page_key.as_deref() {
            Some(crate::transport::PAGE_KEY_PLAIN) => {
                let _ = writeln!(s, "page key:     sent in the clear (plain link): secret from the guest, not from the network");
            }
            Some(k) => {
                let _ = writeln!(s, "page key:     {k}");
            }
            None => {}
        }
        if let Some(st) = &self.source_state {
            let _ = writeln!(s, "source VM:    {st}");
        }
        if let Some(st) = &self.destination_state {
            let _ = writeln!(s, "destination:  {st}");
        }
        s
    }
}
