//! What differs between QEMU versions for the shared engine: since QEMU 8.1 `x-ignore-shared`
//! skips only RAM backed by a named file, so a memfd VM is refused on the QEMU that runs the
//! tests (10.x) and migrates on QEMU 7.2 (unpacked beside it by `guest/build.sh`); a device-state
//! stream above `--max-device-state` stops the migration with the source running.

use livemig_lab::RamBackend;

use crate::harness::{self, Migration, Pair};

/// The QEMU the tests run (the system's) is >= 8.1: the shared engine refuses a memfd VM before
/// any page moves, with the fix in the message (the receiver, never reached, gives up waiting and
/// touches nothing); `--engine auto` then migrates the same VM through the stream engine, where
/// QEMU's own pre-copy carries the RAM and nothing is copied in the downtime unannounced.
#[test]
fn memfd_vm_is_refused_by_the_shared_engine_and_taken_by_the_stream_engine_on_current_qemu() {
    let _g = harness::vm_lock();
    let pair = Pair::start_with_backend("memfd10", harness::dirty_guest(16, 5), RamBackend::Memfd, |d| d);
    let m = Migration::run(&pair, &["--engine", "shared"], &[]);
    assert_eq!(m.send_code, 1, "{}", m.send_stderr);
    let text = &m.send_stderr;
    assert!(text.contains("memory-backend-memfd") && text.contains(">= 8.1"), "send names the cause: {text}");
    assert!(text.contains("memory-backend-file") && text.contains("/dev/shm"), "send names the fix: {text}");
    assert_eq!(m.recv_code, 1, "the receiver gives up when no sender comes: {}", m.recv_stderr);
    assert!(m.recv_stderr.contains("timed out"), "{}", m.recv_stderr);
    let version = m.send_report["qemu_version"].as_str().expect("the report names QEMU's version").to_string();
    assert!(!version.starts_with("7."), "the tests' default QEMU is current: {version}");
    assert_eq!(m.send_report["wire_bytes"].as_u64().unwrap_or(0), 0, "no page was sent");
    assert_eq!(pair.status_of_source(), "running");
    assert_eq!(pair.status_of_destination(), "inmigrate", "the destination was not touched");
    pair.assert_source_guest_still_verifies(1);

    let m = Migration::run(&pair, &["--engine", "auto"], &[]);
    m.assert_completed();
    assert_eq!(m.send_report["engine"], "stream", "{:#}", m.send_report);
    assert!(m.send_report["engine_reason"].as_str().is_some_and(|r| r.contains("tracks dirty pages itself")), "{:#}", m.send_report);
    assert_eq!(m.send_report["verification"]["ok"], true);
    assert_eq!(pair.status_of_source(), "postmigrate");
    assert_eq!(pair.status_of_destination(), "running");
    pair.assert_destination_guest_verifies(2);
}

/// QEMU 7.2 skips memfd RAM with x-ignore-shared: the same memfd VM migrates there, with a small
/// device state and the guest intact.
#[test]
fn memfd_vm_migrates_on_qemu_7_2() {
    let _g = harness::vm_lock();
    let qemu = livemig_lab::qemu_7_2().expect("QEMU 7.2 is unpacked by guest/build.sh");
    let pair = Pair::start_custom(
        "memfd72",
        harness::dirty_guest(32, 10),
        |mut c| {
            c.backend = RamBackend::Memfd;
            c.qemu = Some(qemu);
            c
        },
        |d| d,
    );
    let m = Migration::run(&pair, &[], &[]);
    m.assert_completed();
    assert!(m.send_report["qemu_version"].as_str().is_some_and(|v| v.starts_with("7.2.")), "{:#}", m.send_report);
    assert!(m.recv_report["qemu_version"].as_str().is_some_and(|v| v.starts_with("7.2.")), "{:#}", m.recv_report);
    assert_eq!(m.send_report["verification"]["ok"], true, "{:#}", m.send_report);
    let dev = m.send_report["device_state_bytes"].as_u64().unwrap();
    assert!(dev < 4 << 20, "QEMU 7.2 carried only device state, not the memfd RAM: {dev} bytes");
    assert_eq!(pair.status_of_source(), "postmigrate");
    assert_eq!(pair.status_of_destination(), "running");
    pair.assert_destination_guest_verifies(2);
}

/// A device-state stream above `--max-device-state` (here set below the real device state, as
/// QEMU copying RAM in the downtime would pass the default) stops the migration in the downtime:
/// the source resumes and keeps running intact, the destination is never resumed.
#[test]
fn device_state_above_its_cap_stops_the_migration_and_the_source_runs() {
    let _g = harness::vm_lock();
    let pair = Pair::start("devcap", harness::dirty_guest(16, 5), |d| d);
    let m = Migration::run(&pair, &["--max-device-state", "64KiB"], &[]);
    assert_eq!(m.send_code, 1, "{}", m.send_stderr);
    assert!(m.send_stderr.contains("--max-device-state"), "{}", m.send_stderr);
    assert!(m.send_stderr.contains("the source VM keeps running"), "{}", m.send_stderr);
    assert_eq!(m.send_report["outcome"], "failed");
    assert_eq!(m.send_report["source_state"], "running", "{:#}", m.send_report);
    assert_eq!(m.recv_code, 1, "{}", m.recv_stderr);
    assert_eq!(pair.status_of_source(), "running");
    assert_ne!(pair.status_of_destination(), "running");
    pair.assert_source_guest_still_verifies(2);
}
