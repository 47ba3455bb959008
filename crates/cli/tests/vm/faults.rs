//! Fault injection with real QEMU (issue "Secure transport and proven failure handling"): every
//! path that can fail is made to fail — the connection cut at each protocol phase, bytes
//! corrupted, a process or a QEMU killed at an exact step, an incompatible peer, the operator's
//! cancel, a full snapshot disk — and each test asserts what both agents say (exit code and
//! message) and what both VMs end as. The table of cases is in docs/FAILURES.md.
//!
//! Faults at protocol steps go through [`crate::proxy::Proxy`] (plain TCP, `--insecure`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::{self, Migration, Pair, Running};
use crate::proxy::{Action, Dir, Proxy, Trigger};

/// A migration whose sender goes through `proxy`; logs are prefixed by `tag`.
fn through(pair: &Pair, proxy: &Proxy, tag: &str, send_args: &[&str], during: impl FnOnce(&mut Running)) -> Migration {
    let m = Migration::between_via(&pair.src, &pair.dst, &pair.dir, tag, send_args, &[], |a| proxy.forward_to(a), during);
    eprintln!("--- proxy: fired {:?}; messages {:?}", proxy.fired(), proxy.trace());
    m
}

/// See [`Migration::assert_failed_before_commit`].
fn assert_failed_safely(pair: &Pair, m: &Migration) {
    m.assert_failed_before_commit(pair, "");
}

/// Both messages name the lost connection.
fn assert_says_connection_lost(m: &Migration) {
    for (who, text) in [("send", &m.send_stderr), ("receive", &m.recv_stderr)] {
        assert!(
            text.contains("the migration connection failed")
                && ["closed the connection", "reset", "Broken pipe"].iter().any(|w| text.contains(w)),
            "{who} names the lost connection: {text}"
        );
    }
}

const MIB: u64 = 1 << 20;

/// Case 1a/1b: the connection is cut in the handshake (the receiver's `welcome` to the sender's
/// `hello` never arrives) and in the first iteration (after 1 MiB from the sender, inside a
/// frame).
#[test]
fn cut_in_handshake_or_first_iteration_leaves_the_source_running() {
    let _g = harness::vm_lock();
    let mut pair = Pair::start("cut-early", harness::dirty_guest(16, 5), |d| d);

    let proxy = Proxy::new(Trigger::Control(Dir::FromReceiver, "welcome"), Action::Cut);
    let m = through(&pair, &proxy, "handshake-", &[], |_| {});
    proxy.assert_fired();
    assert_says_connection_lost(&m);
    assert_eq!(m.send_report["wire_bytes"].as_u64().unwrap_or(0), 0, "no page was sent: {:#}", m.send_report);
    assert_failed_safely(&pair, &m);

    pair.restart_destination();
    let proxy = Proxy::new(Trigger::SenderBytes(MIB), Action::Cut);
    let m = through(&pair, &proxy, "iter0-", &[], |_| {});
    proxy.assert_fired();
    assert_says_connection_lost(&m);
    assert_failed_safely(&pair, &m);
}

/// Case 1c: cut at the first pages after iteration 1 ended, in a guest that needs several
/// iterations over a slow link.
#[test]
fn cut_in_a_later_iteration_leaves_the_source_running() {
    let _g = harness::vm_lock();
    let pair = Pair::start("cut-later", harness::dirty_guest(16, 10), |d| d);
    let proxy = Proxy::new(Trigger::PagesAfterIterationEnd(Some(1)), Action::Cut);
    let m = through(&pair, &proxy, "", &["--bandwidth", "40mbit"], |_| {});
    proxy.assert_fired();
    assert!(proxy.trace().iter().any(|t| t == ">iteration_end(1)"), "{:?}", proxy.trace());
    assert_says_connection_lost(&m);
    assert!(m.send_report["iterations"].as_array().is_some_and(|a| a.len() >= 2), "{:#}", m.send_report);
    assert_failed_safely(&pair, &m);
}

/// Case 1d/1e: the sender's `switchover` is lost (the source is paused then: it must be resumed),
/// and the receiver's `loaded` is lost (QEMU migrated the device state, the source is in
/// `postmigrate`: the sender never saw `loaded`, so it must not commit and must resume the
/// source; the receiver never got `commit`, so it must not resume the destination).
#[test]
fn cut_at_switchover_or_after_device_state_restores_the_source() {
    let _g = harness::vm_lock();
    let mut pair = Pair::start("cut-switch", harness::dirty_guest(16, 5), |d| d);

    let proxy = Proxy::new(Trigger::Control(Dir::FromSender, "switchover"), Action::Cut);
    let m = through(&pair, &proxy, "switchover-", &[], |_| {});
    proxy.assert_fired();
    assert_says_connection_lost(&m);
    assert_failed_safely(&pair, &m);

    pair.restart_destination();
    let proxy = Proxy::new(Trigger::Control(Dir::FromReceiver, "loaded"), Action::Cut);
    let m = through(&pair, &proxy, "loaded-", &[], |_| {});
    proxy.assert_fired();
    assert!(!proxy.trace().iter().any(|t| t == ">commit"), "no commit without `loaded`: {:?}", proxy.trace());
    assert!(m.send_report["device_state_bytes"].as_u64().unwrap_or(0) > 0, "the device state went: {:#}", m.send_report);
    assert_says_connection_lost(&m);
    assert_failed_safely(&pair, &m);
}

/// Case 1f: the sender's `commit` is lost. The sender cannot know whether the destination
/// resumed: exit 4, the source stays paused, and it says so. The receiver never got the commit:
/// it must not resume. The operator then resumes the source, whose guest is intact.
#[test]
fn cut_commit_leaves_both_paused_and_says_unknown() {
    let _g = harness::vm_lock();
    let pair = Pair::start("cut-commit", harness::dirty_guest(16, 5), |d| d);
    let proxy = Proxy::new(Trigger::Control(Dir::FromSender, "commit"), Action::Cut);
    let m = through(&pair, &proxy, "", &[], |_| {});
    proxy.assert_fired();
    assert_eq!(m.send_code, 4, "unknown outcome:\n{}", m.send_stderr);
    assert!(m.send_stderr.contains("did not confirm"), "{}", m.send_stderr);
    assert!(m.send_stderr.contains("the source VM stays paused"), "{}", m.send_stderr);
    assert_eq!(m.send_report["outcome"], "unknown");
    assert_eq!(m.recv_code, 1, "{}", m.recv_stderr);
    assert!(m.recv_stderr.contains("the destination VM was not resumed"), "{}", m.recv_stderr);
    assert_eq!(pair.status_of_source(), "postmigrate");
    assert_ne!(pair.status_of_destination(), "running");
    // The operator checked the destination: not running. The source may run again.
    harness::qmp_cont(pair.src.qmp_path());
    assert_eq!(pair.status_of_source(), "running");
    pair.assert_source_guest_still_verifies(1);
}

/// Case 2: one byte flipped in a Pages frame of the first iteration, then in a control frame
/// (the sender's first `iteration_end`): the receiver detects the checksum mismatch and says so,
/// the sender relays its reason; both VMs as after any failure.
#[test]
fn corrupted_pages_or_control_frame_is_detected() {
    let _g = harness::vm_lock();
    let mut pair = Pair::start("corrupt", harness::dirty_guest(16, 5), |d| d);
    for (tag, trigger, kind) in [
        ("pages-", Trigger::PagesAfterIterationEnd(None), "Pages"),
        ("control-", Trigger::Control(Dir::FromSender, "iteration_end"), "Control"),
    ] {
        let proxy = Proxy::new(trigger, Action::Flip);
        let m = through(&pair, &proxy, tag, &[], |_| {});
        proxy.assert_fired();
        let corrupt = format!("received a corrupted {kind} frame");
        assert!(m.recv_stderr.contains(&corrupt) && m.recv_stderr.contains("checksum mismatch"), "{}", m.recv_stderr);
        assert!(m.send_stderr.contains(&corrupt), "the sender relays the receiver's reason: {}", m.send_stderr);
        assert_failed_safely(&pair, &m);
        pair.restart_destination();
    }
}

/// Case 3: the receiver process is killed once the sender's `switchover` has passed the proxy.
#[test]
fn receiver_killed_at_switchover_leaves_the_source_running() {
    let _g = harness::vm_lock();
    let pair = Pair::start("kill-recv-switch", harness::dirty_guest(16, 5), |d| d);
    let proxy = Proxy::new(Trigger::Control(Dir::FromSender, "switchover"), Action::After(Box::new(|| {})));
    let m = through(&pair, &proxy, "", &[], |r| {
        assert!(proxy.wait_fired(Duration::from_secs(120)), "no switchover: {:?}", proxy.trace());
        r.kill_receiver();
    });
    assert_ne!(m.recv_code, 0, "killed");
    assert_eq!(m.send_code, 1, "{}", m.send_stderr);
    assert!(m.send_stderr.contains("the migration connection failed"), "{}", m.send_stderr);
    assert!(m.send_stderr.contains("the source VM keeps running"), "{}", m.send_stderr);
    assert!(!proxy.trace().iter().any(|t| t == ">commit"), "{:?}", proxy.trace());
    assert_eq!(m.send_report["source_state"], "running", "{:#}", m.send_report);
    assert_eq!(pair.status_of_source(), "running");
    assert_ne!(pair.status_of_destination(), "running");
    pair.assert_source_guest_still_verifies(1);
}

/// Case 4: the destination QEMU is killed (-9) after it loaded the device state, before `cont`
/// (when the receiver's `loaded` reaches the proxy, before it is forwarded). The sender commits,
/// the receiver cannot resume the dead QEMU and says so; the sender, told the destination did
/// not resume, resumes the source.
#[test]
fn destination_qemu_killed_before_cont_restores_the_source() {
    let _g = harness::vm_lock();
    let pair = Pair::start("kill-dst-loaded", harness::dirty_guest(16, 5), |d| d);
    let pid = pair.dst.pid();
    let proxy = Proxy::new(Trigger::Control(Dir::FromReceiver, "loaded"), Action::Before(Box::new(move || Pair::kill_destination_qemu(pid))));
    let m = through(&pair, &proxy, "", &[], |_| {});
    proxy.assert_fired();
    assert!(m.recv_stderr.contains("cannot resume the destination VM"), "{}", m.recv_stderr);
    assert!(m.send_stderr.contains("cannot resume the destination VM"), "the sender relays the receiver's reason: {}", m.send_stderr);
    assert_failed_safely(&pair, &m);
    assert!(pair.status_of_destination().starts_with("unreachable"), "the destination QEMU is dead");
}

/// Case 5: the source QEMU is killed (-9) during iteration 1: the sender says the source is gone,
/// the destination is not resumed.
#[test]
fn source_qemu_killed_mid_migration_is_reported_and_destination_not_resumed() {
    let _g = harness::vm_lock();
    let pair = Pair::start("kill-src", harness::dirty_guest(16, 10), |d| d);
    let pid = pair.src.pid();
    let m = Migration::run_with(&pair, &["--bandwidth", "40mbit"], &[], |r| {
        r.wait_send_progress("iteration 0");
        Pair::kill_destination_qemu(pid);
    });
    assert_eq!(m.send_code, 1, "{}", m.send_stderr);
    assert!(m.send_stderr.contains("the source QEMU is gone"), "{}", m.send_stderr);
    assert_eq!(m.send_report["outcome"], "failed");
    assert_ne!(m.send_report["source_state"], "running", "{:#}", m.send_report);
    assert!(!m.send_stderr.contains("keeps running"), "a dead source is not said to run: {}", m.send_stderr);
    assert!(m.send_stderr.contains("the source QEMU no longer answers"), "{}", m.send_stderr);
    assert!(m.recv_stderr.contains("the source QEMU is gone"), "the receiver gets the source's reason: {}", m.recv_stderr);
    assert_eq!(m.recv_code, 1, "{}", m.recv_stderr);
    assert!(m.recv_stderr.contains("the destination VM was not resumed"), "{}", m.recv_stderr);
    assert!(pair.status_of_source().starts_with("unreachable"));
    assert_ne!(pair.status_of_destination(), "running");
}

/// Case 6: a sender speaking only protocol version 99 (written here) is refused by a real
/// receiver with a message naming both versions; the destination is not resumed.
#[test]
fn protocol_version_mismatch_is_refused_naming_both_versions() {
    use livemig_wire::{Message, RegionInfo, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
    let _g = harness::vm_lock();
    let pair = Pair::start("version", harness::dirty_guest(16, 5), |d| d);
    let mut answer = None;
    let (code, stderr, report) = harness::receive_alone(&pair.dst, &pair.dir, &[], |addr| {
        let mut s = connect_retrying(addr);
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        livemig_wire::write_magic(&mut s).unwrap();
        let hello = Message::Hello {
            version: 99,
            min_version: 99,
            software: "livemig-future 9.9".into(),
            page_size: 4096,
            regions: vec![RegionInfo { id: "mem0".into(), size: 384 * MIB }],
            vm: None,
            disks: vec![],
            engine: livemig_wire::ENGINE_SHARED.into(),
        };
        livemig_wire::write_message(&mut s, &hello).unwrap();
        answer = Some(livemig_wire::read_message(&mut s));
    });
    let want = format!("speaks 99..99, this destination {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}");
    match answer {
        Some(Ok(Message::Abort { reason })) => {
            assert!(reason.contains("protocol version mismatch") && reason.contains(&want), "{reason}");
        }
        other => panic!("expected an abort naming both versions, got {other:?}"),
    }
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("protocol version mismatch") && stderr.contains(&want), "{stderr}");
    assert!(stderr.contains("the destination VM was not resumed"), "{stderr}");
    assert_eq!(report["outcome"], "failed");
    assert_eq!(pair.status_of_destination(), "inmigrate");
    assert_eq!(pair.status_of_source(), "running");
}

fn connect_retrying(addr: &str) -> std::net::TcpStream {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match std::net::TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "receiver never listened on {addr}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Case 7: SIGTERM, then SIGINT, to `livemig send` during iteration 1: exit 3 "cancelled", the
/// source runs intact, the receiver fails with the source's reason, the destination not resumed.
#[test]
fn sigterm_or_sigint_cancels_and_the_source_keeps_running() {
    let _g = harness::vm_lock();
    let mut pair = Pair::start("cancel", harness::dirty_guest(16, 10), |d| d);
    for sig in ["TERM", "INT"] {
        let m = Migration::between(&pair.src, &pair.dst, &pair.dir, &format!("{sig}-"), &["--bandwidth", "40mbit"], &[], |r| {
            r.wait_send_progress("iteration 0");
            r.signal_sender(sig);
        });
        assert_eq!(m.send_code, 3, "SIG{sig}: cancelled:\n{}", m.send_stderr);
        assert!(m.send_stderr.contains("cancelled by the operator"), "{}", m.send_stderr);
        assert!(m.send_stderr.contains("the source VM keeps running"), "{}", m.send_stderr);
        assert_eq!(m.send_report["outcome"], "cancelled");
        assert_eq!(m.recv_code, 1, "{}", m.recv_stderr);
        assert!(m.recv_stderr.contains("the source aborted the migration: cancelled by the operator"), "{}", m.recv_stderr);
        assert_eq!(pair.status_of_source(), "running");
        assert_ne!(pair.status_of_destination(), "running");
        pair.assert_source_guest_still_verifies(1);
        pair.restart_destination();
    }
}

/// A tmpfs mounted for the test (mode 0700: livemig refuses a store others can enter),
/// unmounted on drop (also when the test panics).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"]).arg(dir).output();
        match out {
            Ok(o) if o.status.success() => Tmpfs(dir.to_path_buf()),
            Ok(o) => panic!(
                "cannot mount a {size} tmpfs on {} (this test needs root, as in CI): {}",
                dir.display(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("cannot run mount: {e}"),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Case 8: the destination's snapshot directory is full (a 256 KiB tmpfs). Snapshots are
/// best-effort: the migration completes, the receiver's report warns about the snapshot, the
/// destination guest verifies.
#[test]
fn full_snapshot_disk_on_the_destination_does_not_stop_the_migration() {
    full_snapshot_disk_on_the_destination("shared");
}

/// Case 8 with the stream engine, whose receiver keeps its snapshot from QEMU's stream on a
/// thread of its own: the write error ends that thread, not the migration.
#[test]
fn stream_full_snapshot_disk_on_the_destination_does_not_stop_the_migration() {
    full_snapshot_disk_on_the_destination("stream");
}

fn full_snapshot_disk_on_the_destination(engine: &str) {
    let _g = harness::vm_lock();
    let pair = Pair::start(&format!("snapfull-{engine}"), harness::dirty_guest(16, 5), |d| d);
    let full = Tmpfs::mount(&pair.dir.join("dst-snapshots"), "256k");
    let src_snaps = pair.dir.join("src-snapshots");
    let src_snaps = src_snaps.to_str().unwrap();
    let dst_snaps = full.0.to_str().unwrap();
    // What is tested is the snapshot's failure, not the downtime: a maximum a loaded machine fits.
    let m = Migration::run(&pair, &["--engine", engine, "--vm-id", "t", "--snapshot-dir", src_snaps, "--max-downtime", "3s"], &["--snapshot-dir", dst_snaps]);
    m.assert_completed();
    assert_eq!(m.send_report["engine"].as_str(), Some(engine));
    assert!(m.send_report["snapshot_kept"].is_string(), "the source's own directory has room: {:#}", m.send_report);
    let warnings = m.recv_report["warnings"].as_array().cloned().unwrap_or_default();
    assert!(
        warnings.iter().any(|w| w.as_str().is_some_and(|w| w.contains("snapshot") && w.contains("No space left"))),
        "the receiver warns about the snapshot: {:#}",
        m.recv_report
    );
    assert!(m.recv_report["snapshot_kept"].is_null(), "{:#}", m.recv_report);
    assert_eq!(pair.status_of_source(), "postmigrate");
    assert_eq!(pair.status_of_destination(), "running");
    pair.assert_destination_guest_verifies(2);
    drop(full);
}

/// Case 12: the receiver hangs (SIGSTOP) in the first iteration: its socket stops draining and it
/// answers nothing. The sender gives up (its socket's `--timeout`, 30 s here, with no progress;
/// partial writes restart it, so up to a few times that) instead of waiting forever, says so,
/// and the source keeps running; the receiver, continued afterwards, finds
/// the connection gone and does not resume the destination.
#[test]
fn hung_receiver_is_given_up_on_and_the_source_keeps_running() {
    let _g = harness::vm_lock();
    let pair = Pair::start("hung-recv", harness::dirty_guest(16, 5), |d| d);
    let m = Migration::run_with(&pair, &["--bandwidth", "40mbit"], &[], |r| {
        r.wait_send_progress("connecting to the receiver");
        r.signal_receiver("STOP");
        r.wait_send_progress("migration failed");
        r.signal_receiver("CONT");
    });
    assert!(m.send_stderr.contains("no progress within the timeout"), "send names the stalled connection: {}", m.send_stderr);
    assert!(m.send_stderr.contains("the peer hangs"), "{}", m.send_stderr);
    assert_failed_safely(&pair, &m);
}


/// Case 13: the destination's memory is damaged behind the receiver's back (one byte of one
/// page, written into the destination QEMU's RAM) after the last page arrived and before the
/// sender's `switchover` reaches the receiver. With `--verify-reread` the receiver hashes its
/// memory as it is, the digests differ, and neither side goes on: the source resumes and keeps
/// running, the destination is never resumed, both say the digests differ.
#[test]
fn destination_memory_damaged_before_the_switchover_is_caught_by_verification() {
    use std::os::unix::fs::FileExt;
    let _g = harness::vm_lock();
    let pair = Pair::start("damaged", harness::dirty_guest(16, 5), |d| d);
    let ram_file = pair.dst.ram_file().expect("the destination's RAM is a shared file").to_path_buf();
    let proxy = Proxy::new(
        Trigger::Control(Dir::FromSender, "switchover"),
        Action::Before(Box::new(move || {
            let ram = std::fs::OpenOptions::new().read(true).write(true).open(&ram_file).unwrap();
            // A page in the guest's low memory, which the kernel has written: not a hole.
            let off = 0x10_0000 + 17;
            let mut b = [0u8; 1];
            ram.read_exact_at(&mut b, off).unwrap();
            ram.write_all_at(&[b[0] ^ 0x5a], off).unwrap();
        })),
    );
    let m = Migration::between_via(&pair.src, &pair.dst, &pair.dir, "", &[], &["--verify-reread"], |a| proxy.forward_to(a), |_| {});
    proxy.assert_fired();
    for (who, text) in [("send", &m.send_stderr), ("receive", &m.recv_stderr)] {
        assert!(text.contains("digest"), "{who} names the digest mismatch: {text}");
    }
    assert_eq!(m.send_report["verification"]["ok"], false, "{:#}", m.send_report);
    assert_ne!(m.send_report["verification"]["source_digest"], m.send_report["verification"]["destination_digest"]);
    assert_failed_safely(&pair, &m);
}

/// `livemig certs` in `dir`, and the PSK arguments of both agents.
fn psk(dir: &Path) -> Vec<String> {
    crate::tls::psk_args(&crate::tls::certs(dir))
}

/// Issue 15: one of three connections (`send --connections 3`, TLS) lost mid-migration: the
/// first data connection cut after 1 MiB from the sender (inside the first iteration), the
/// other two left open. The migration fails as over one connection: the source keeps running,
/// the destination is not resumed, and the receiver names the lost connection.
#[test]
fn losing_one_of_three_connections_leaves_the_source_running() {
    let _g = harness::vm_lock();
    let pair = Pair::start("conn-lost", harness::dirty_guest(16, 5), |d| d);
    let keys = tempfile::tempdir().unwrap();
    let args = psk(keys.path());
    let args = crate::tls::strs(&args);
    let mut send = args.clone();
    send.extend(["--connections", "3"]);
    let proxy = Proxy::raw_on(1, MIB);
    let m = Migration::between_via(&pair.src, &pair.dst, &pair.dir, "conn-lost-", &send, &args, |a| proxy.forward_to(a), |_| {});
    eprintln!("--- proxy: fired {:?}", proxy.fired());
    proxy.assert_fired();
    assert!(proxy.fired().unwrap().starts_with("connection 1 cut"), "{:?}", proxy.fired());
    assert_eq!(m.send_report["connections"], 3, "{:#}", m.send_report);
    assert!(m.recv_stderr.contains("data connection 1 of 3 failed"), "receive names the lost connection: {}", m.recv_stderr);
    eprintln!("--- send: {}\n--- receive: {}", m.send_stderr.lines().last().unwrap_or(""), m.recv_stderr.lines().last().unwrap_or(""));
    assert_failed_safely(&pair, &m);
}

/// Case 14 (issue 14 item 9): faults of a TLS connection (PSK), at the TCP level under TLS (a
/// proxy that parses nothing): the connection cut after 1 MiB from the sender (inside the first
/// iteration, inside a TLS record), then the link stalled there, nothing more going either way
/// and both connections held open (both agents with `--timeout 5s`). Each fails safely, as over
/// plain TCP.
#[test]
fn tls_connection_cut_or_stalled_leaves_the_source_running() {
    let _g = harness::vm_lock();
    let mut pair = Pair::start("tls-faults", harness::dirty_guest(16, 5), |d| d);
    let keys = tempfile::tempdir().unwrap();
    let args = psk(keys.path());
    let args = crate::tls::strs(&args);

    let proxy = Proxy::raw(MIB, Action::Cut);
    let m = Migration::between_via(&pair.src, &pair.dst, &pair.dir, "tls-cut-", &args, &args, |a| proxy.forward_to(a), |_| {});
    eprintln!("--- proxy: fired {:?}", proxy.fired());
    proxy.assert_fired();
    assert_eq!(m.send_report["transport"], "tls-psk", "{:#}", m.send_report);
    assert_says_connection_lost(&m);
    assert_failed_safely(&pair, &m);

    pair.restart_destination();
    let mut stall = args.clone();
    stall.extend(["--timeout", "5s"]);
    let proxy = Proxy::raw(MIB, Action::Stall);
    let m = Migration::between_via(&pair.src, &pair.dst, &pair.dir, "tls-stall-", &stall, &stall, |a| proxy.forward_to(a), |_| {});
    eprintln!("--- proxy: fired {:?}", proxy.fired());
    proxy.assert_fired();
    assert!(m.send_stderr.contains("no progress within the timeout"), "send names the stalled link: {}", m.send_stderr);
    assert!(m.recv_stderr.contains("no progress within the timeout"), "receive names the stalled link: {}", m.recv_stderr);
    assert_failed_safely(&pair, &m);
}
