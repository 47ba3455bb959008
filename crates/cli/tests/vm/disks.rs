//! Writable disks on shared storage: the source and the destination QEMU open the same image
//! file (on this one host QEMU's image locking behaves as between hosts on shared storage), and
//! the guest writes files on it (ext4, each file fsynced) all through the migration. The
//! destination's images must stay inactive until the commit (`late-block-activate`): after a cut
//! at any phase the source resumes, takes its images back and goes on writing; after success the
//! destination writes, and every file is intact in the guest and, once the VMs are gone, from
//! the host (`e2fsck -fn`, each file read back with debugfs).

use std::path::Path;
use std::time::Duration;

use livemig_lab::{kv, DataDisk, DiskFormat, RamBackend, Vm, VmConfig};

use crate::harness::{self, Migration, Pair};
use crate::proxy::{Action, Dir, Proxy, Trigger};

/// The guest: files on the data disk every 200 ms (verified every 2 s) beside 8 MiB of memory
/// rewritten at 1 MiB/s.
fn disk_guest() -> Vec<(String, String)> {
    [("mode", "disk"), ("mib", "8"), ("rate", "1"), ("verify-secs", "2"), ("file-ms", "200")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A 256 MiB source (and its destination) with the root disk read-only and a writable `format`
/// data disk, the same image file for both; `adjust` sets the RAM backend or QEMU.
fn disk_pair(name: &str, format: DiskFormat, adjust: impl Fn(VmConfig) -> VmConfig) -> (Pair, DataDisk) {
    let dir = std::env::temp_dir().join(format!("livemig-test-{name}-disk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = DataDisk::create(dir.join(format!("data.{}", format.name())), format, 64).expect("the data disk is made");
    let d = disk.clone();
    let pair = Pair::start_custom(
        name,
        disk_guest(),
        |mut c| {
            c.mem_mib = 256;
            c.with_disk = true;
            c.data_disk = Some(d);
            adjust(c)
        },
        |c| c,
    );
    // The guest mounted the disk and wrote its first files.
    let line = pair
        .src
        .wait_console(Duration::from_secs(120), |l| {
            l.starts_with("LIVEMIG-DISKERROR") || (l.starts_with("LIVEMIG-DISKWRITE") && kv(l, "files") == Some("3"))
        })
        .expect("the source guest writes files on its data disk");
    assert!(line.starts_with("LIVEMIG-DISKWRITE"), "{line}\n{}", pair.src.console());
    (pair, disk)
}

/// The highest `files=` of the guest's `LIVEMIG-DISKWRITE` lines: files durable on the disk.
fn files_written(vm: &Vm) -> u64 {
    vm.console()
        .lines()
        .filter(|l| l.starts_with("LIVEMIG-DISKWRITE"))
        .filter_map(|l| kv(l, "files").and_then(|v| v.trim_end().parse().ok()))
        .max()
        .unwrap_or(0)
}

/// The guest running in `vm` writes at least 3 files beyond `base` and then verifies all its
/// files from the disk with none bad; no `LIVEMIG-DISKBAD` or `LIVEMIG-DISKERROR` line ever.
/// Returns the files it then has.
fn assert_guest_writes(vm: &Vm, base: u64, what: &str) -> u64 {
    let mut mark = vm.console_mark();
    let line = vm
        .wait_console_from(&mut mark, Duration::from_secs(120), |l| {
            l.starts_with("LIVEMIG-DISKBAD")
                || l.starts_with("LIVEMIG-DISKERROR")
                || (l.starts_with("LIVEMIG-DISKVERIFY") && kv(l, "files").and_then(|v| v.parse::<u64>().ok()).is_some_and(|f| f >= base + 3))
        })
        .unwrap_or_else(|e| panic!("{what}: the guest does not write and verify its files: {e}"));
    assert!(line.starts_with("LIVEMIG-DISKVERIFY") && kv(&line, "bad") == Some("0"), "{what}: {line}\n{}", vm.console());
    let console = vm.console();
    assert!(
        !console.lines().any(|l| l.starts_with("LIVEMIG-DISKBAD") || l.starts_with("LIVEMIG-DISKERROR")),
        "{what}: the guest found a bad file or could not write:\n{console}"
    );
    files_written(vm)
}

/// A migration whose sender goes through `proxy`; logs are prefixed by `tag`.
fn through(pair: &Pair, proxy: &Proxy, tag: &str, send_args: &[&str]) -> Migration {
    let m = Migration::between_via(&pair.src, &pair.dst, &pair.dir, tag, send_args, &[], |a| proxy.forward_to(a), |_| {});
    eprintln!("--- proxy: fired {:?}; messages {:?}", proxy.fired(), proxy.trace());
    m
}

/// After a failure before the commit: both agents exit 1, the source runs (its QEMU took its
/// images back: its guest writes more files and reads every file back intact), the destination
/// does not run.
fn assert_cut_leaves_the_source_writing(pair: &Pair, m: &Migration, what: &str) {
    m.assert_failed_before_commit(pair, what);
    let before = files_written(&pair.src);
    assert_guest_writes(&pair.src, before, &format!("{what}: the source"));
}

/// A destination that loaded the whole device state and was not committed: the receiver quit
/// its QEMU (it can never run that stale copy later).
fn assert_destination_quit(pair: &Pair, m: &Migration, what: &str) {
    let state = m.recv_report["destination_state"].as_str().unwrap_or_default();
    assert!(state.starts_with("quit by the receiver"), "{what}: {:#}", m.recv_report);
    assert!(pair.status_of_destination().starts_with("unreachable"), "{what}: the destination QEMU is gone");
}

/// The migration completed: the source is in `postmigrate`, the destination runs and its guest
/// writes files past the source's and reads every one back intact; then, both VMs killed, the
/// image checks clean from the host with every file the guest confirmed.
fn assert_migrated_and_intact(mut pair: Pair, disk: &DataDisk, m: &Migration) {
    m.assert_completed();
    assert_eq!(pair.status_of_source(), "postmigrate");
    assert_eq!(pair.status_of_destination(), "running");
    let at_source = files_written(&pair.src);
    let at_destination = assert_guest_writes(&pair.dst, at_source, "the destination");
    pair.assert_destination_guest_verifies(1);
    pair.dst.kill();
    pair.src.kill();
    let check = disk.check(&pair.dir.join("check")).expect("the data disk checks clean from the host");
    eprintln!("--- data disk: {check:?}; the guest confirmed {at_destination} files");
    assert!(check.files >= at_destination, "{check:?}: the guest confirmed {at_destination} files");
}

fn remove(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// A raw data disk, the shared engine, one source VM: the connection is cut in the first
/// iteration, at the sender's `switchover` (the source paused), in the device state (its second
/// frame) and at the receiver's `loaded`
/// (the source QEMU completed and inactivated its images; the destination QEMU loaded the whole
/// device state, its images inactive: the receiver quits it). After each the source runs and
/// writes; then a migration completes and the destination writes, every file intact.
#[test]
fn raw_disk_cut_at_each_phase_then_migrated_with_files_intact() {
    let _g = harness::vm_lock();
    let (mut pair, disk) = disk_pair("disk-raw", DiskFormat::Raw, |c| c);

    let proxy = Proxy::new(Trigger::SenderBytes(2 << 20), Action::Cut);
    let m = through(&pair, &proxy, "iter0-", &[]);
    proxy.assert_fired();
    assert_cut_leaves_the_source_writing(&pair, &m, "cut in iteration 0");

    pair.restart_destination();
    let proxy = Proxy::new(Trigger::Control(Dir::FromSender, "switchover"), Action::Cut);
    let m = through(&pair, &proxy, "switchover-", &[]);
    proxy.assert_fired();
    assert_cut_leaves_the_source_writing(&pair, &m, "cut at the switchover");

    // The sender's second DeviceState frame: the destination QEMU has part of the device state
    // (it exits or is quit), the source QEMU completed with its images inactive.
    pair.restart_destination();
    let proxy = Proxy::new(Trigger::Frame(Dir::FromSender, livemig_wire::FrameKind::DeviceState as u16, 1), Action::Cut);
    let m = through(&pair, &proxy, "device-state-", &[]);
    proxy.assert_fired();
    assert!(!proxy.trace().iter().any(|t| t == "<loaded"), "{:?}", proxy.trace());
    assert_cut_leaves_the_source_writing(&pair, &m, "cut in the device state");

    pair.restart_destination();
    cut_after_loaded_then_migrate(&mut pair, &[], "shared engine", |m| {
        assert!(m.send_report["device_state_bytes"].as_u64().unwrap_or(0) > 0, "the device state went: {:#}", m.send_report);
    });
    let m = Migration::run(&pair, &[], &[]);
    migrated_and_intact(pair, &disk, &m);
}

/// A qcow2 data disk through the stream engine (private RAM, the VM most hosts run): the cut at
/// the receiver's `loaded`, then a completed migration; as above.
#[test]
fn qcow2_disk_stream_engine_cut_after_loaded_then_migrated_with_files_intact() {
    let _g = harness::vm_lock();
    let (mut pair, disk) = disk_pair("disk-qcow2-stream", DiskFormat::Qcow2, |mut c| {
        c.backend = RamBackend::Anonymous;
        c
    });
    cut_after_loaded_then_migrate(&mut pair, &["--engine", "stream"], "stream engine", |m| {
        assert_eq!(m.send_report["engine"], "stream", "{:#}", m.send_report);
    });
    let m = Migration::run(&pair, &["--engine", "stream"], &[]);
    assert_eq!(m.send_report["engine"], "stream", "{:#}", m.send_report);
    migrated_and_intact(pair, &disk, &m);
}

/// The cut at the receiver's `loaded` (`check` looks at the failed migration too): the source
/// runs and writes, the destination was quit; then a new destination.
fn cut_after_loaded_then_migrate(pair: &mut Pair, send_args: &[&str], what: &str, check: impl Fn(&Migration)) {
    let proxy = Proxy::new(Trigger::Control(Dir::FromReceiver, "loaded"), Action::Cut);
    let m = through(pair, &proxy, "loaded-", send_args);
    proxy.assert_fired();
    check(&m);
    let what = format!("{what}, cut after the device state loaded");
    assert_cut_leaves_the_source_writing(pair, &m, &what);
    assert_destination_quit(pair, &m, &what);
    pair.restart_destination();
}

/// A source paused when the migration began (its guest writing files until then), the cut at the
/// receiver's `loaded`: its QEMU completed and inactivated its images. `send` leaves it paused, as
/// it was, and makes its images active again (`blockdev-set-active`): every block node reports
/// `active` before anyone resumes it. Then resumed from outside, its guest writes more files and
/// reads every one back intact.
#[test]
fn paused_source_cut_after_loaded_gets_its_images_back_and_stays_paused() {
    let _g = harness::vm_lock();
    let (pair, disk) = disk_pair("disk-paused", DiskFormat::Raw, |c| c);
    let monitor = |vm: &Vm| livemig_qmp::Qmp::connect(&vm.observer_qmp_path(), Duration::from_secs(10)).expect("the second monitor");
    monitor(&pair.src).execute("stop", None).expect("stop");
    let proxy = Proxy::new(Trigger::Control(Dir::FromReceiver, "loaded"), Action::Cut);
    let m = through(&pair, &proxy, "paused-", &[]);
    proxy.assert_fired();
    assert_eq!(m.send_code, 1, "{}", m.send_stderr);
    assert!(m.send_stderr.contains("the source VM stays paused, as it was"), "{}", m.send_stderr);
    let warnings = m.send_report["warnings"].to_string();
    assert_eq!(pair.status_of_source(), "postmigrate");
    assert_destination_quit(&pair, &m, "a paused source");
    let nodes = monitor(&pair.src).execute("query-named-block-nodes", Some(serde_json::json!({ "flat": true }))).expect("block nodes");
    let nodes = nodes.as_array().expect("a list");
    assert!(!nodes.is_empty());
    for n in nodes {
        assert_eq!(n["active"], serde_json::Value::Bool(true), "an inactive image after the failure: {n:#}");
    }
    assert!(warnings.contains("they are active again"), "{:#}", m.send_report);
    monitor(&pair.src).execute("cont", None).expect("cont");
    let before = files_written(&pair.src);
    assert_guest_writes(&pair.src, before, "the source, resumed");
    drop(pair);
    remove(disk.path.parent().unwrap());
}

/// [`assert_migrated_and_intact`], then the disk removed (the pair removes the run's files).
fn migrated_and_intact(pair: Pair, disk: &DataDisk, m: &Migration) {
    assert_migrated_and_intact(pair, disk, m);
    remove(disk.path.parent().unwrap());
}

/// QEMU 7.2, where `late-block-activate` matters (from 10.0 QEMU delays the activation of a
/// destination started with `-S` by itself): a qcow2 data disk, the shared engine (memfd RAM,
/// which 7.2's x-ignore-shared skips). Without the capability the destination QEMU would take the
/// write locks as the device state loads, and the source's `cont` after the cut at `loaded` would
/// fail on them.
#[test]
fn qcow2_disk_on_qemu_7_2_cut_after_loaded_then_migrated_with_files_intact() {
    let _g = harness::vm_lock();
    let qemu = livemig_lab::qemu_7_2().expect("QEMU 7.2 is unpacked by guest/build.sh");
    let (mut pair, disk) = disk_pair("disk-qcow2-72", DiskFormat::Qcow2, move |mut c| {
        c.backend = RamBackend::Memfd;
        c.qemu = Some(qemu.clone());
        c
    });

    cut_after_loaded_then_migrate(&mut pair, &[], "QEMU 7.2", |m| {
        assert!(m.send_report["qemu_version"].as_str().is_some_and(|v| v.starts_with("7.2.")), "{:#}", m.send_report);
    });
    let m = Migration::run(&pair, &[], &[]);
    migrated_and_intact(pair, &disk, &m);
}
