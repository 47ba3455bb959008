//! The stream engine with real QEMU 10 guests: QEMU migrates with its own dirty tracking into
//! livemig, which compacts and relays its stream; plain private RAM (`-m`), the VM most hosts run.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use livemig_lab::{RamBackend, Vm};
use serde_json::Value;

use crate::harness::{self, Migration, Pair, Running};
use crate::proxy::{Action, Dir, Proxy, Trigger};

/// Plain `-m` RAM on both sides.
fn private_ram(name: &str, workload: Vec<(String, String)>) -> Pair {
    Pair::start_custom(
        name,
        workload,
        |mut c| {
            c.backend = RamBackend::Anonymous;
            c
        },
        |mut d| {
            d.backend = RamBackend::Anonymous;
            d
        },
    )
}

/// A guest with private RAM rewriting 32 MiB at 8 MiB/s migrates through the stream engine:
/// completed, the destination runs and its verifier finds no bad page, the source is in
/// `postmigrate`, the digest of QEMU's stream was checked, and pages went compacted.
#[test]
fn private_ram_guest_migrates_through_the_stream_engine() {
    let _g = harness::vm_lock();
    let pair = private_ram("stream", harness::dirty_guest(32, 8));
    let m = Migration::run(&pair, &["--engine", "stream"], &[]);
    m.assert_completed();
    let send = &m.send_report;
    assert_eq!(send["engine"], "stream", "{send:#}");
    assert_eq!(m.recv_report["engine"], "stream");
    assert_eq!(send["verification"]["ok"], Value::Bool(true), "{send:#}");
    assert_eq!(m.recv_report["verification"]["source_digest"], m.recv_report["verification"]["destination_digest"]);
    // A plain link: the receiver's random page key, sent in its welcome, used by both sides.
    assert_eq!(m.recv_report["page_key"], "plain-link");
    assert_eq!(m.send_report["page_key_hex"], m.recv_report["page_key_hex"]);
    assert_eq!(m.recv_report["page_key_hex"].as_str().map(str::len), Some(64));
    let stream = &send["stream"];
    assert!(stream["fallback"].is_null(), "no fallback: {stream:#}");
    assert!(stream["pages"].as_u64().unwrap() > 0 && stream["zero_records"].as_u64().unwrap() > 0, "{stream:#}");
    assert!(stream["switchover_ack_held"].as_bool().unwrap(), "{stream:#}");
    assert!(send["downtime_ms"].as_f64().unwrap() > 0.0);
    assert!(!send["iterations"].as_array().unwrap().is_empty());
    // Compaction: fewer bytes on the wire than QEMU wrote.
    assert!(send["wire_bytes"].as_u64().unwrap() < stream["raw_bytes"].as_u64().unwrap(), "{send:#}");
    assert_eq!(pair.status_of_source(), "postmigrate");
    assert_eq!(pair.status_of_destination(), "running");
    pair.assert_destination_guest_verifies(3);
}

/// Both VMs' RAM, read from outside while both are paused (the source in `postmigrate`, the
/// destination loaded and waiting for livemig's `commit`): what [`Action::Before`] at the commit
/// records. Each VM through its second QMP monitor (livemig holds the first).
#[derive(Debug)]
pub(crate) struct PausedRams {
    source_status: String,
    destination_status: String,
    pub(crate) diff: livemig_lab::ram::RamDiff,
}

fn read_both_rams(src: (&std::path::Path, u32), dst: (&std::path::Path, u32)) -> PausedRams {
    let open = |qmp: &std::path::Path, pid: u32| {
        let mut q = livemig_qmp::Qmp::connect(qmp, Duration::from_secs(10)).expect("the second QMP monitor");
        let status = q.query_status().expect("query-status").status;
        let (hva, len) = q.ram_location().expect("where the RAM is");
        (status, livemig_lab::ram::RamView::open(pid, hva, len).expect("the RAM opens"))
    };
    let (source_status, a) = open(src.0, src.1);
    let (destination_status, b) = open(dst.0, dst.1);
    let diff = livemig_lab::ram::compare(&a, &b).expect("both RAMs read");
    PausedRams { source_status, destination_status, diff }
}

/// Every page class of the stream engine arrives byte-exact: a private-RAM guest that read 200 MiB
/// of its root disk into its page cache (disk references), then rewrites 8 MiB at 2 MiB/s (deltas,
/// compressed pages), with its zero and duplicate pages. At the commit, both VMs paused, the test
/// reads both RAMs from outside (`/proc/PID/mem`): every page equal. The migration then completes.
/// A stream-engine migration from `src` to `dst` through a proxy that, at the sender's commit
/// (both VMs paused), reads both RAMs: completed, and every page equal.
pub(crate) fn compared_at_commit(src: &Vm, dst: &Vm, dir: &std::path::Path, tag: &str, send_args: &[&str], recv_args: &[&str]) -> (Migration, PausedRams) {
    let seen: Arc<Mutex<Option<PausedRams>>> = Arc::new(Mutex::new(None));
    let proxy = {
        let seen = Arc::clone(&seen);
        let s = (src.observer_qmp_path(), src.pid());
        let d = (dst.observer_qmp_path(), dst.pid());
        Proxy::new(
            Trigger::Control(Dir::FromSender, "commit"),
            Action::Before(Box::new(move || {
                *seen.lock().unwrap() = Some(read_both_rams((&s.0, s.1), (&d.0, d.1)));
            })),
        )
    };
    let m = Migration::between_via(src, dst, dir, tag, send_args, recv_args, |a| proxy.forward_to(a), |_| {});
    eprintln!("--- proxy: fired {:?}; messages: {}", proxy.fired(), trace_summary(&proxy));
    m.assert_completed();
    assert_fired(&proxy, &m);
    let rams = seen.lock().unwrap().take().expect("the hook ran");
    assert_eq!((rams.source_status.as_str(), rams.destination_status.as_str()), ("postmigrate", "paused"), "{rams:?}");
    assert_eq!(rams.diff.differ, 0, "{}", rams.diff);
    (m, rams)
}

#[test]
fn stream_every_class_arrives_and_the_destination_ram_equals_the_source_ram() {
    let _g = harness::vm_lock();
    let pair = crate::compaction::cache_guest_on("stream-exact", 200, RamBackend::Anonymous);
    let disk = harness::image().disk.display().to_string();
    // Integrity is the point here: a maximum the downtime fits in under a loaded CI machine
    // (619 ms against a predicted 194 ms once, at the default 300 ms).
    let args = stream_args(&["--disk-image", &disk, "--max-downtime", "3s"]);
    let (m, rams) = compared_at_commit(&pair.src, &pair.dst, &pair.dir, "", &args, &["--disk-image", &disk]);
    // Real guest memory was compared: the page cache and the rewritten 8 MiB at least.
    assert!(rams.diff.nonzero > 30_000, "{}", rams.diff);
    let s = &m.send_report;
    assert_eq!(s["engine"], "stream", "{s:#}");
    assert!(s["stream"]["fallback"].is_null(), "{s:#}");
    use crate::compaction::pages;
    assert!(pages(s, "disk_ref") > 20_000, "page-cache blocks not sent as disk references: {:#}", s["pages"]);
    for class in ["dup", "delta", "raw"] {
        assert!(pages(s, class) > 0, "no {class} page: {:#}", s["pages"]);
    }
    // Zero pages travel as QEMU's own ZERO records, passed through.
    assert!(s["stream"]["zero_records"].as_u64().unwrap() > 0, "{:#}", s["stream"]);
    assert_eq!(s["disk_images_used"], 1, "{s:#}");
    assert_eq!(pair.status_of_source(), "postmigrate");
    assert_eq!(pair.status_of_destination(), "running");
    pair.assert_destination_guest_verifies(2);
}

/// Memory snapshots with the stream engine: a private-RAM guest goes A -> B, both hosts keep the
/// same snapshot from QEMU's stream, 64 of its pages are damaged on A, and the way back B -> A
/// sends the unchanged pages as `snapshot_ref`s; the damaged ones are misses, resent whole. At the
/// way back's commit both RAMs are read: every page equal.
#[test]
fn stream_return_trip_references_the_snapshot_and_a_damaged_snapshot_page_is_resent() {
    return_trip("stream-return", "1");
}

/// The same return trip, the way back over three connections (plain TCP, so the proxy reads
/// both RAMs at the commit): the snapshot references, the misses and their resends, and the
/// mirrored cache come out as over one, every page equal.
#[test]
fn stream_return_trip_over_three_connections_resends_the_damaged_snapshot_pages() {
    return_trip("stream-return3", "3");
}

/// A -> B, 64 pages of A's snapshot damaged, B -> A over `back_connections` connections.
fn return_trip(name: &str, back_connections: &str) {
    let _g = harness::vm_lock();
    let pair = private_ram(name, harness::dirty_guest(8, 1));
    let (snaps_a, snaps_b) = (pair.dir.join("snaps-a"), pair.dir.join("snaps-b"));
    let (a, b) = (snaps_a.display().to_string(), snaps_b.display().to_string());
    // Integrity is the point, not the downtime: both legs get a maximum a loaded machine fits
    // (335 ms against 300 ms once, QEMU's own figure 237 ms, while a CI run shared the cores).
    let there = Migration::run(&pair, &stream_args(&["--vm-id", "vm-s", "--snapshot-dir", &a, "--max-downtime", "3s"]), &["--snapshot-dir", &b]);
    there.assert_completed();
    assert_eq!(there.send_report["engine"], "stream");
    assert!(there.send_report["snapshot_used"].is_null(), "no snapshot before the first trip");
    let kept = there.send_report["snapshot_kept"].as_str().unwrap_or_else(|| panic!("the source kept no snapshot: {:#}", there.send_report)).to_string();
    assert_eq!(there.recv_report["snapshot_kept"].as_str(), Some(kept.as_str()), "both hosts keep the same snapshot: {:#}", there.recv_report);
    assert_eq!(there.recv_report["vm"].as_str(), Some("vm-s"));
    let files = |dir: &std::path::Path| -> Vec<Vec<u8>> {
        ["memory.raw", "fingerprints.bin"].iter().map(|f| std::fs::read(dir.join("vm-s").join(&kept).join(f)).expect("snapshot file")).collect()
    };
    assert!(files(&snaps_a) == files(&snaps_b), "the two hosts' snapshots differ");
    pair.assert_destination_guest_verifies(1);

    let damaged = crate::compaction::damage_snapshot(&snaps_a.join("vm-s").join(&kept).join("memory.raw"), 64);
    assert_eq!(damaged, 64);

    std::thread::sleep(Duration::from_secs(3));
    let home = pair.start_incoming("home");
    let (back, rams) = compared_at_commit(
        &pair.dst,
        &home,
        &pair.dir,
        "back-",
        &stream_args(&["--vm-id", "vm-s", "--snapshot-dir", &b, "--max-downtime", "3s", "--connections", back_connections]),
        &["--snapshot-dir", &a],
    );
    assert!(rams.diff.nonzero > 5_000, "{}", rams.diff);
    let s = &back.send_report;
    assert_eq!(s["engine"], "stream", "{s:#}");
    assert_eq!(s["connections"].to_string(), back_connections, "{s:#}");
    assert_eq!(back.recv_report["connections"].to_string(), back_connections);
    assert_eq!(s["snapshot_used"].as_str(), Some(kept.as_str()), "{s:#}");
    assert_eq!(back.recv_report["snapshot_used"].as_str(), Some(kept.as_str()));
    use crate::compaction::pages;
    assert!(pages(s, "snapshot_ref") > 5_000, "{:#}", s["pages"]);
    assert_eq!(pages(&back.recv_report, "snapshot_ref") + s["resent_pages"].as_u64().unwrap(), pages(s, "snapshot_ref"), "the receiver resolved every reference but the resent ones");
    assert!(s["resent_pages"].as_u64().unwrap() >= 1, "damaged snapshot pages must be resent: {s:#}");
    let fraction = s["wire_fraction"].as_f64().unwrap();
    assert!(fraction < 0.5, "a return with a snapshot sends a fraction of the memory: {fraction}");
    harness::assert_guest_verifies(&home, 3);
}

/// A VM with a block dirty bitmap that lives only in QEMU (an incremental backup's, say): the
/// stream engine keeps `dirty-bitmaps` on so the bitmap is not dropped, and says that QEMU's
/// stream then passes verbatim from the bitmap's section on (the parser does not know it). The
/// migration completes; the destination has the bitmap and its guest verifies.
#[test]
fn stream_migrates_a_transient_dirty_bitmap_verbatim_and_says_so() {
    let _g = harness::vm_lock();
    let pair = harness::private_ram_with_bitmap("stream-bitmap", harness::dirty_guest(16, 4), "backup-0");
    let m = Migration::run(&pair, &stream_args(&["--max-downtime", "3s"]), &[]);
    m.assert_completed();
    let s = &m.send_report;
    assert_eq!(s["engine"], "stream", "{s:#}");
    let warnings = s["warnings"].to_string();
    assert!(warnings.contains("block dirty bitmaps that live only in QEMU") && warnings.contains("backup-0"), "{s:#}");
    let fallback = s["stream"]["fallback"].as_str().unwrap_or_else(|| panic!("no fallback: {s:#}"));
    assert!(fallback.contains("dirty-bitmap"), "{fallback}");
    assert_eq!(s["verification"]["ok"], Value::Bool(true), "{s:#}");
    assert!(harness::destination_has_bitmap(&pair, "backup-0"), "the destination has the bitmap");
    assert_eq!(pair.status_of_destination(), "running");
    pair.assert_destination_guest_verifies(2);
}

// ---- Failures (docs/FAILURES.md, rows S1-S6): one fault each, both VMs' states asserted. ----

/// The stream engine's `send` arguments, plus `extra`.
fn stream_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["--engine", "stream"];
    a.extend_from_slice(extra);
    a
}

/// The proxy's trace with runs of the same message collapsed (`<stream_ack x120`).
fn trace_summary(proxy: &Proxy) -> String {
    let mut out: Vec<(String, usize)> = Vec::new();
    for t in proxy.trace() {
        match out.last_mut() {
            Some((last, n)) if *last == t => *n += 1,
            _ => out.push((t, 1)),
        }
    }
    out.iter().map(|(t, n)| if *n > 1 { format!("{t} x{n}") } else { t.clone() }).collect::<Vec<_>>().join(" ")
}

/// A stream-engine migration whose sender goes through `proxy`; logs are prefixed by `tag`.
fn through(pair: &Pair, proxy: &Proxy, tag: &str, send_args: &[&str], during: impl FnOnce(&mut Running)) -> Migration {
    let args = stream_args(send_args);
    let m = Migration::between_via(&pair.src, &pair.dst, &pair.dir, tag, &args, &[], |a| proxy.forward_to(a), during);
    eprintln!("--- proxy: fired {:?}; messages: {}", proxy.fired(), trace_summary(proxy));
    m
}

/// The proxy's fault fired; otherwise what went through and how `send` ended.
fn assert_fired(proxy: &Proxy, m: &Migration) {
    assert!(
        proxy.fired().is_some(),
        "the proxy's fault never fired; messages: {}; send ended with: {}",
        trace_summary(proxy),
        m.send_stderr.lines().last().unwrap_or("")
    );
}

/// Whether a control message of this type went through the proxy.
fn saw(proxy: &Proxy, what: &str) -> bool {
    proxy.trace().iter().any(|t| t == what)
}

/// What every stream-engine failure before the commit must end as: `send` (stream engine) exits
/// 1 saying the source keeps running, its report says `failed` and the source `running`;
/// `receive` exits 1 saying the destination was not resumed (unless the test killed it); the
/// source VM runs and its guest verifier passes again with no bad page; the destination never
/// runs.
fn assert_failed_safely(pair: &Pair, m: &Migration, receiver_killed: bool) {
    assert_eq!(m.send_code, 1, "send must fail:\n{}", m.send_stderr);
    assert!(m.send_stderr.contains("the source VM keeps running"), "{}", m.send_stderr);
    assert_eq!(m.send_report["engine"], "stream", "{:#}", m.send_report);
    assert_eq!(m.send_report["outcome"], "failed", "{:#}", m.send_report);
    assert_eq!(m.send_report["source_state"], "running", "{:#}", m.send_report);
    if !receiver_killed {
        assert_eq!(m.recv_code, 1, "receive must fail:\n{}", m.recv_stderr);
        assert!(m.recv_stderr.contains("the destination VM was not resumed"), "{}", m.recv_stderr);
        assert_eq!(m.recv_report["outcome"], "failed", "{:#}", m.recv_report);
    }
    assert_eq!(pair.status_of_source(), "running");
    assert_ne!(pair.status_of_destination(), "running");
    pair.assert_source_guest_still_verifies(1);
}

/// Both agents name the lost connection.
fn assert_says_connection_lost(m: &Migration) {
    for (who, text) in [("send", &m.send_stderr), ("receive", &m.recv_stderr)] {
        assert!(
            text.contains("the migration connection failed")
                && ["closed the connection", "reset", "Broken pipe"].iter().any(|w| text.contains(w)),
            "{who} names the lost connection: {text}"
        );
    }
}

/// The fault came before QEMU's RAM was done: the sender never sent its checkpoint, the
/// receiver never verified a digest.
fn assert_in_precopy(m: &Migration) {
    assert!(!m.recv_stderr.contains("stream digest verified"), "{}", m.recv_stderr);
    assert_eq!(m.send_report["device_state_bytes"].as_u64().unwrap_or(0), 0, "{:#}", m.send_report);
}

/// Case S1: the connection is cut in QEMU's pre-copy, the source guest running: after 8 MiB from
/// the sender over a 40 Mbit/s link (inside iteration 0, inside a Stream frame), and at the
/// receiver's 20th `stream_ack` (its answer for a chunk written into the destination QEMU).
#[test]
fn stream_cut_in_precopy_leaves_the_source_running() {
    let _g = harness::vm_lock();
    let mut pair = private_ram("stream-cut-precopy", harness::dirty_guest(32, 8));

    let proxy = Proxy::new(Trigger::SenderBytes(8 << 20), Action::Cut);
    let m = through(&pair, &proxy, "bytes-", &["--bandwidth", "40mbit"], |_| {});
    assert_fired(&proxy, &m);
    assert!(!saw(&proxy, ">stream_checkpoint"), "{}", trace_summary(&proxy));
    assert_in_precopy(&m);
    assert_says_connection_lost(&m);
    assert_failed_safely(&pair, &m, false);

    pair.restart_destination();
    // The receiver's control frames: `welcome`, `stream_ready`, then one `stream_ack` per chunk
    // written into the destination QEMU: cut at the 20th ack (~10 MiB of QEMU's stream).
    let proxy = Proxy::new(Trigger::Frame(Dir::FromReceiver, livemig_wire::FrameKind::Control as u16, 21), Action::Cut);
    let m = through(&pair, &proxy, "ack-", &[], |_| {});
    assert_fired(&proxy, &m);
    assert_eq!(proxy.trace().iter().filter(|t| *t == "<stream_ack").count(), 20, "{}", trace_summary(&proxy));
    assert_in_precopy(&m);
    assert_says_connection_lost(&m);
    assert_failed_safely(&pair, &m, false);
}

/// Complete `LIVEMIG-HEARTBEAT` lines (the guest prints one a second while it runs) in a console
/// log from byte `from` on.
fn heartbeats_since(console: &std::path::Path, from: usize) -> usize {
    let data = std::fs::read(console).unwrap_or_default();
    let new = String::from_utf8_lossy(&data[from.min(data.len())..]).into_owned();
    // The last piece has no line end yet: not counted.
    let complete = new.rsplit_once('\n').map_or("", |(done, _)| done);
    complete.split('\n').filter(|l| l.trim_end_matches('\r').starts_with("LIVEMIG-HEARTBEAT")).count()
}

/// Case S2: the connection is cut at the sender's `stream_checkpoint`: QEMU's RAM is done, so
/// QEMU has stopped the source guest (the proxy holds the checkpoint 3 s first and sees no
/// heartbeat from the guest meanwhile). The migration fails and the source guest runs again.
#[test]
fn stream_cut_at_the_checkpoint_resumes_the_stopped_source() {
    let _g = harness::vm_lock();
    let pair = private_ram("stream-cut-checkpoint", harness::dirty_guest(32, 8));
    let console = pair.src.console_path().to_path_buf();
    let silent: Arc<Mutex<Option<usize>>> = Arc::new(Mutex::new(None));
    let proxy = {
        let silent = Arc::clone(&silent);
        Proxy::new(
            Trigger::Control(Dir::FromSender, "stream_checkpoint"),
            Action::HookThenCut(Box::new(move || {
                let mark = std::fs::metadata(&console).map_or(0, |m| usize::try_from(m.len()).unwrap_or(usize::MAX));
                std::thread::sleep(Duration::from_secs(3));
                *silent.lock().unwrap() = Some(heartbeats_since(&console, mark));
            })),
        )
    };
    let m = through(&pair, &proxy, "", &[], |_| {});
    assert_fired(&proxy, &m);
    let beats = silent.lock().unwrap().expect("the hook ran");
    // At most one line that was on its way out when the guest stopped.
    assert!(beats <= 1, "the source guest printed {beats} heartbeats in 3 s at the checkpoint: it was not stopped");
    assert!(m.send_stderr.contains("releasing the switchover-ack"), "{}", m.send_stderr);
    assert!(!m.recv_stderr.contains("stream digest verified"), "the checkpoint never arrived: {}", m.recv_stderr);
    assert_says_connection_lost(&m);
    assert_failed_safely(&pair, &m, false);
    // The guest runs again: heartbeats.
    let mark = pair.src.console_mark();
    std::thread::sleep(Duration::from_secs(3));
    assert!(heartbeats_since(pair.src.console_path(), mark) >= 2, "the source guest does not run again");
}

/// Case S3: the connection is cut in QEMU's device state (the source guest stopped since the
/// checkpoint): at the receiver's `stream_verified` (the digest matched; the device state may be
/// on its way into the destination QEMU), and at the sender's `stream_end` (the source QEMU's
/// whole stream was read: it completed, the source is in `postmigrate`).
#[test]
fn stream_cut_in_the_device_state_restores_the_source() {
    let _g = harness::vm_lock();
    let mut pair = private_ram("stream-cut-device", harness::dirty_guest(32, 8));

    let proxy = Proxy::new(Trigger::Control(Dir::FromReceiver, "stream_verified"), Action::Cut);
    let m = through(&pair, &proxy, "verified-", &[], |_| {});
    assert_fired(&proxy, &m);
    assert!(saw(&proxy, ">stream_checkpoint"), "{}", trace_summary(&proxy));
    assert!(m.recv_stderr.contains("stream digest verified"), "{}", m.recv_stderr);
    assert!(!saw(&proxy, ">commit"), "{}", trace_summary(&proxy));
    assert_says_connection_lost(&m);
    assert_failed_safely(&pair, &m, false);

    pair.restart_destination();
    let proxy = Proxy::new(Trigger::Control(Dir::FromSender, "stream_end"), Action::Cut);
    let m = through(&pair, &proxy, "end-", &[], |_| {});
    assert_fired(&proxy, &m);
    assert!(saw(&proxy, "<stream_verified"), "{}", trace_summary(&proxy));
    assert!(!saw(&proxy, ">commit") && !saw(&proxy, "<loaded"), "{}", trace_summary(&proxy));
    assert!(m.send_report["device_state_bytes"].as_u64().unwrap_or(0) > 0, "the device state went: {:#}", m.send_report);
    assert_says_connection_lost(&m);
    assert_failed_safely(&pair, &m, false);
}

/// Case S4: `livemig receive` is killed (SIGKILL) 2 s into QEMU's pre-copy over a 40 Mbit/s link.
#[test]
fn stream_receiver_killed_in_precopy_leaves_the_source_running() {
    let _g = harness::vm_lock();
    let pair = private_ram("stream-kill-recv", harness::dirty_guest(32, 8));
    let m = Migration::run_with(&pair, &stream_args(&["--bandwidth", "40mbit"]), &[], |r| {
        r.wait_send_progress("QEMU migrates into the relay");
        std::thread::sleep(Duration::from_secs(2));
        r.kill_receiver();
    });
    assert_ne!(m.recv_code, 0, "killed");
    assert_in_precopy(&m);
    assert!(m.send_stderr.contains("the migration connection failed"), "{}", m.send_stderr);
    assert_failed_safely(&pair, &m, true);
}

/// Case S5: the destination QEMU is killed (-9) 2 s into QEMU's pre-copy over a 40 Mbit/s link:
/// the receiver cannot write the stream into it and says so; the sender relays its reason.
#[test]
fn stream_destination_qemu_killed_mid_migration_leaves_the_source_running() {
    let _g = harness::vm_lock();
    let pair = private_ram("stream-kill-dst", harness::dirty_guest(32, 8));
    let pid = pair.dst.pid();
    let m = Migration::run_with(&pair, &stream_args(&["--bandwidth", "40mbit"]), &[], |r| {
        r.wait_send_progress("QEMU migrates into the relay");
        std::thread::sleep(Duration::from_secs(2));
        Pair::kill_destination_qemu(pid);
    });
    assert_in_precopy(&m);
    assert!(m.recv_stderr.contains("destination QEMU"), "{}", m.recv_stderr);
    assert!(m.send_stderr.contains("the destination aborted the migration"), "the sender relays the receiver's reason: {}", m.send_stderr);
    assert!(m.send_stderr.contains("destination QEMU"), "{}", m.send_stderr);
    assert_failed_safely(&pair, &m, false);
    assert!(pair.status_of_destination().starts_with("unreachable"), "the destination QEMU is dead");
}

/// Case S6: one byte flipped in the middle of the sender's fourth Stream frame (pre-copy): the
/// receiver's frame checksum catches it, nothing of it reaches the destination QEMU, the sender
/// relays the receiver's reason.
#[test]
fn stream_corrupted_stream_frame_is_detected() {
    let _g = harness::vm_lock();
    let pair = private_ram("stream-corrupt", harness::dirty_guest(32, 8));
    let proxy = Proxy::new(Trigger::Frame(Dir::FromSender, livemig_wire::FrameKind::Stream as u16, 3), Action::Flip);
    let m = through(&pair, &proxy, "", &[], |_| {});
    assert_fired(&proxy, &m);
    let corrupt = "received a corrupted Stream frame";
    assert!(m.recv_stderr.contains(corrupt) && m.recv_stderr.contains("checksum mismatch"), "{}", m.recv_stderr);
    assert!(m.send_stderr.contains(corrupt), "the sender relays the receiver's reason: {}", m.send_stderr);
    assert_in_precopy(&m);
    assert_failed_safely(&pair, &m, false);
}

/// The switchover with a final pass larger than the relay's window (8 MiB of QEMU's stream
/// unacknowledged): a guest rewriting 32 MiB flat out, a 3 s maximum downtime, so QEMU's last
/// pass, written while it holds its big lock, carries most of the 32 MiB. The relay must keep
/// draining it while QEMU does not answer QMP; the migration completes within the maximum.
#[test]
fn stream_final_pass_larger_than_the_relay_window_completes() {
    let _g = harness::vm_lock();
    let pair = private_ram("stream-big-final", harness::dirty_guest(32, 0));
    let m = Migration::run(&pair, &stream_args(&["--max-downtime", "3s"]), &[]);
    m.assert_completed();
    let downtime = m.send_report["downtime_ms"].as_f64().unwrap();
    assert!(downtime <= 3000.0, "downtime {downtime} ms above the 3 s maximum: {:#}", m.send_report);
    assert_eq!(pair.status_of_source(), "postmigrate");
    assert_eq!(pair.status_of_destination(), "running");
    pair.assert_destination_guest_verifies(2);
}

/// Adaptive downtime control on the stream engine (the shared engine's test, on QEMU's own
/// pre-copy): a private-RAM guest rewrites a 16 MiB working set flat out over a 100 Mbit/s link.
/// The fixed rule with 300 ms never converges and gives up at its cap, the source running and
/// intact; the adaptive policy with a 2 s maximum switches over within it and the guest verifies on the destination.
#[test]
fn stream_hot_guest_fixed_gives_up_adaptive_completes_within_its_maximum() {
    let _g = harness::vm_lock();
    let mut pair = private_ram("stream-hot", harness::dirty_guest(16, 0));
    let fixed = Migration::run(
        &pair,
        &stream_args(&["--policy", "fixed", "--max-downtime", "300ms", "--max-iterations", "6", "--bandwidth", "100mbit"]),
        &[],
    );
    assert_eq!(fixed.send_code, 1, "{}", fixed.send_stderr);
    assert!(fixed.send_stderr.contains("did not converge"), "{}", fixed.send_stderr);
    assert_failed_safely(&pair, &fixed, false);

    pair.restart_destination();
    let adaptive = Migration::run(&pair, &stream_args(&["--policy", "adaptive", "--max-downtime", "2s", "--bandwidth", "100mbit"]), &[]);
    adaptive.assert_completed();
    let r = &adaptive.send_report;
    let downtime = r["downtime_ms"].as_f64().unwrap();
    let so = &r["stream"]["switchover"];
    eprintln!("adaptive: downtime {downtime:.0} ms, predicted {}, QEMU's {}; switchover {so}", r["predicted_downtime_ms"], r["qemu_downtime_ms"]);
    // QEMU's own check leaves out the stream the relay still holds: its limit leaves room for it.
    let limit = so["qemu_downtime_limit_ms"].as_f64().unwrap();
    let queued_ms = so["queued_ms"].as_f64().unwrap();
    assert!(so["relay_queued_bytes"].as_u64().unwrap() == 0 || queued_ms > 0.0, "{so:#}");
    assert!(limit <= (2000.0 - queued_ms).max(500.0), "QEMU may spend the time of the held stream again: {so:#}");
    assert!(so["final_raw_bytes"].as_u64().unwrap() > 0, "{so:#}");
    assert!(downtime <= 2000.0, "downtime {downtime} ms exceeds the 2 s maximum: {r:#}");
    assert!(r["qemu_downtime_ms"].as_f64().is_some(), "QEMU's own figure is reported: {r:#}");
    assert!(r["iterations"].as_array().unwrap().len() >= 2, "{r:#}");
    assert_eq!(pair.status_of_source(), "postmigrate");
    assert_eq!(pair.status_of_destination(), "running");
    pair.assert_destination_guest_verifies(3);
}

/// A downtime above the maximum is said, not reported as a plain "completed": the proxy holds
/// the destination's `resumed` 1.5 s (the destination runs; the sender waits for its word), with
/// a 1 s maximum. `send` exits 5 with outcome `completed-over-maximum` and a warning naming the
/// downtime and the maximum; the destination runs, the source is in `postmigrate`.
#[test]
fn stream_downtime_above_the_maximum_is_exit_5_and_a_warning() {
    let _g = harness::vm_lock();
    let pair = private_ram("stream-over-max", harness::dirty_guest(8, 1));
    let proxy = Proxy::new(
        Trigger::Control(Dir::FromReceiver, "resumed"),
        Action::Before(Box::new(|| std::thread::sleep(Duration::from_millis(1500)))),
    );
    let m = through(&pair, &proxy, "", &["--max-downtime", "1s"], |_| {});
    assert_fired(&proxy, &m);
    assert_eq!(m.send_code, 5, "{}", m.send_stderr);
    assert_eq!(m.recv_code, 0, "{}", m.recv_stderr);
    let s = &m.send_report;
    assert_eq!(s["outcome"], "completed-over-maximum", "{s:#}");
    assert!(s["downtime_ms"].as_f64().unwrap() > 1000.0, "{s:#}");
    let warned = s["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap_or("").contains("above the maximum of 1000 ms"));
    assert!(warned, "{s:#}");
    assert!(m.send_stderr.contains("WARNING: the downtime was"), "{}", m.send_stderr);
    assert_eq!(pair.status_of_source(), "postmigrate");
    assert_eq!(pair.status_of_destination(), "running");
    pair.assert_destination_guest_verifies(2);
}

/// Case S9 (issue 14 item 9): the stream engine over TLS (PSK), its connection cut after 8 MiB
/// from the sender in QEMU's pre-copy (at the TCP level, inside a TLS record), then the link
/// stalled there with nothing more going either way (both agents with `--timeout 5s`): each
/// fails safely, the source runs.
#[test]
fn stream_tls_connection_cut_or_stalled_leaves_the_source_running() {
    let _g = harness::vm_lock();
    let mut pair = private_ram("stream-tls-faults", harness::dirty_guest(32, 8));
    let keys = tempfile::tempdir().unwrap();
    let psk = crate::tls::psk_args(&crate::tls::certs(keys.path()));
    let recv = crate::tls::strs(&psk);
    let send = stream_args(&recv);

    let proxy = Proxy::raw(8 << 20, Action::Cut);
    let mut cut = send.clone();
    cut.extend(["--bandwidth", "40mbit"]);
    let m = Migration::between_via(&pair.src, &pair.dst, &pair.dir, "tls-cut-", &cut, &recv, |a| proxy.forward_to(a), |_| {});
    assert_fired(&proxy, &m);
    assert_eq!(m.send_report["transport"], "tls-psk", "{:#}", m.send_report);
    assert_in_precopy(&m);
    assert_says_connection_lost(&m);
    assert_failed_safely(&pair, &m, false);

    pair.restart_destination();
    let proxy = Proxy::raw(8 << 20, Action::Stall);
    let (mut send, mut recv) = (send, recv);
    send.extend(["--bandwidth", "40mbit", "--timeout", "5s"]);
    recv.extend(["--timeout", "5s"]);
    let m = Migration::between_via(&pair.src, &pair.dst, &pair.dir, "tls-stall-", &send, &recv, |a| proxy.forward_to(a), |_| {});
    assert_fired(&proxy, &m);
    assert_in_precopy(&m);
    // Each side finds the silence itself: nothing of the other's end crosses a stalled link.
    assert!(m.send_stderr.contains("no progress within the timeout while waiting for the receiver to acknowledge"), "{}", m.send_stderr);
    assert!(m.recv_stderr.contains("no progress within the timeout while waiting for the sender's next frame"), "{}", m.recv_stderr);
    assert_failed_safely(&pair, &m, false);
}

/// Issue 15: the stream engine over three TLS connections (certificates; `--connections 3`):
/// QEMU's compacted stream spread over all three, put back in order by the receiver. The
/// stream's digest (every byte QEMU wrote up to the device state, keyed) checked by the
/// receiver before the device state, both reports say 3, the destination guest verifies its
/// memory. (The RAMs are not read at the commit here: the proxy that does cannot see into TLS.)
#[test]
fn stream_migrates_over_three_tls_connections() {
    let _g = harness::vm_lock();
    let pair = private_ram("stream-tls3", harness::dirty_guest(32, 8));
    let keys = tempfile::tempdir().unwrap();
    let tls = crate::tls::cert_args(&crate::tls::certs(keys.path()));
    let recv = crate::tls::strs(&tls);
    let mut send = stream_args(&recv);
    send.extend(["--connections", "3"]);
    let m = Migration::run(&pair, &send, &recv);
    m.assert_completed();
    for r in [&m.send_report, &m.recv_report] {
        assert_eq!(r["connections"], 3, "{r:#}");
        assert_eq!(r["engine"], "stream", "{r:#}");
        assert_eq!(r["transport"], "tls-certificates", "{r:#}");
        assert_eq!(r["verification"]["ok"], true, "{r:#}");
    }
    assert!(m.send_report["stream"]["fallback"].is_null(), "{:#}", m.send_report);
    assert_eq!(m.recv_report["verification"]["source_digest"], m.recv_report["verification"]["destination_digest"]);
    assert!(m.send_stderr.contains("opening 2 more connections"), "{}", m.send_stderr);
    assert!(m.recv_stderr.contains("waiting for the sender's 2 data connections"), "{}", m.recv_stderr);
    assert_eq!(pair.status_of_source(), "postmigrate");
    assert_eq!(pair.status_of_destination(), "running");
    pair.assert_destination_guest_verifies(2);
}

/// Issue 15, case 21 (docs/FAILURES.md): the stream engine over three connections (TLS, PSK),
/// the first data connection cut after 2 MiB from the sender in QEMU's pre-copy (40 Mbit/s),
/// the other two left open. The migration fails as over one connection: the source keeps
/// running, the destination is not resumed, and both agents name the lost connection.
#[test]
fn stream_losing_one_of_three_connections_leaves_the_source_running() {
    let _g = harness::vm_lock();
    let pair = private_ram("stream-conn-lost", harness::dirty_guest(32, 8));
    let keys = tempfile::tempdir().unwrap();
    let psk = crate::tls::psk_args(&crate::tls::certs(keys.path()));
    let recv = crate::tls::strs(&psk);
    let mut send = stream_args(&recv);
    send.extend(["--connections", "3", "--bandwidth", "40mbit"]);
    let proxy = Proxy::raw_on(1, 2 << 20);
    let m = Migration::between_via(&pair.src, &pair.dst, &pair.dir, "conn-lost-", &send, &recv, |a| proxy.forward_to(a), |_| {});
    assert_fired(&proxy, &m);
    assert!(proxy.fired().unwrap().starts_with("connection 1 cut"), "{:?}", proxy.fired());
    assert_eq!(m.send_report["connections"], 3, "{:#}", m.send_report);
    assert_in_precopy(&m);
    assert!(m.recv_stderr.contains("data connection 1 of 3 failed"), "receive names the lost connection: {}", m.recv_stderr);
    assert!(m.send_stderr.contains("data connection 1 of 3 failed"), "send names the lost connection: {}", m.send_stderr);
    assert_failed_safely(&pair, &m, false);
}
