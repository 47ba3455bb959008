//! `livemig tunnel` with real QEMU 10 guests, the test playing libvirt: it owns both QEMUs'
//! monitors, sets the migration capabilities the tunnel needs on both, starts the destination's
//! incoming migration on a unix socket (`migrate-incoming unix:DST`), has the source QEMU migrate
//! to the tunnel's socket (`migrate unix:SRC`), and resumes the destination itself. livemig
//! touches no monitor: `tunnel receive` connects to DST, `tunnel send` listens on SRC.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use livemig_lab::RamBackend;
use livemig_qmp::Qmp;
use serde_json::{json, Value};

use crate::harness::{self, Pair};

/// Plain `-m` RAM on both sides, the VM libvirt runs by default.
fn private_ram(name: &str, workload: Vec<(String, String)>) -> Pair {
    let anon = |mut c: livemig_lab::VmConfig| {
        c.backend = RamBackend::Anonymous;
        c
    };
    Pair::start_custom(name, workload, anon, anon)
}

/// What libvirt (or the operator) sets on both QEMUs for a tunnel: what the stream engine sets
/// (`crates/agent/src/stream/send.rs`), less what only a relay that holds the monitor can use:
/// `return-path` on (the destination's result comes back through the tunnel); `switchover-ack`
/// off (the tunnel steers nothing; were it on, the ack would pass through as it comes); no
/// `auto-converge`; every capability the relay cannot parse off. Each only if this QEMU knows it.
/// `on`: capabilities turned on besides (a libvirt that migrates more).
fn tunnel_capabilities(qmp: &mut Qmp, on: &[&str]) {
    let known: Vec<String> = qmp
        .execute("query-migrate-capabilities", None)
        .expect("query-migrate-capabilities")
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|c| c["capability"].as_str().map(str::to_string))
        .collect();
    let mut want = vec![("return-path", true), ("switchover-ack", false), ("x-ignore-shared", false), ("auto-converge", false)];
    for off in [
        "multifd", "xbzrle", "compress", "postcopy-ram", "postcopy-preempt", "mapped-ram", "dirty-bitmaps", "block", "dirty-limit",
        "zero-blocks", "x-colo", "background-snapshot", "rdma-pin-all", "validate-uuid",
    ] {
        want.push((off, false));
    }
    for c in &mut want {
        c.1 |= on.contains(&c.0);
    }
    let caps: Vec<(&str, bool)> = want.into_iter().filter(|(c, _)| known.iter().any(|k| k == c)).collect();
    qmp.migrate_set_capabilities(&caps).expect("the capabilities are accepted");
}

/// Both `livemig tunnel` processes of one migration, and where they write.
struct Tunnel {
    send: Child,
    recv: Child,
    send_log: PathBuf,
    recv_log: PathBuf,
    send_json: PathBuf,
    recv_json: PathBuf,
    src_sock: PathBuf,
}

/// How a tunnel process ended.
struct Ended {
    code: i32,
    stderr: String,
    report: Value,
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} did not happen within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Tunnel {
    /// libvirt's order: the destination QEMU listens on DST (`migrate-incoming`), the tunnel's
    /// two ends start (its sender listens on SRC), then the source QEMU migrates to SRC.
    fn start(pair: &Pair, send_args: &[&str]) -> Tunnel {
        Self::start_with(pair, send_args, &[])
    }

    /// [`Tunnel::start`], the capabilities `on` turned on on both QEMUs.
    fn start_with(pair: &Pair, send_args: &[&str], on: &[&str]) -> Tunnel {
        let exe = env!("CARGO_BIN_EXE_livemig");
        let d = &pair.dir;
        let (src_sock, dst_sock) = (d.join("tunnel-src.sock"), d.join("tunnel-dst.sock"));
        let mut dq = Qmp::connect(pair.dst.qmp_path(), Duration::from_secs(10)).expect("the destination's QMP");
        tunnel_capabilities(&mut dq, on);
        dq.migrate_incoming(&format!("unix:{}", dst_sock.display())).expect("migrate-incoming");
        drop(dq);

        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let (send_log, recv_log) = (d.join("tunnel-send.log"), d.join("tunnel-receive.log"));
        let (send_json, recv_json) = (d.join("tunnel-send.json"), d.join("tunnel-receive.json"));
        let recv = Command::new(exe)
            .args(["tunnel", "receive", "--listen", &addr, "--insecure", "--timeout", "30s", "--accept-timeout", "120s", "--connect-unix"])
            .arg(&dst_sock)
            .arg("--report")
            .arg(&recv_json)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&recv_log).unwrap())
            .spawn()
            .expect("start livemig tunnel receive");
        let send = Command::new(exe)
            .args(["tunnel", "send", "--to", &addr, "--insecure", "--timeout", "30s", "--accept-timeout", "120s", "--listen-unix"])
            .arg(&src_sock)
            .arg("--report")
            .arg(&send_json)
            .args(send_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&send_log).unwrap())
            .spawn()
            .expect("start livemig tunnel send");
        let t = Tunnel { send, recv, send_log, recv_log, send_json, recv_json, src_sock };
        t.wait_send_log("waiting for the source QEMU to migrate");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&t.src_sock).expect("the tunnel's socket").permissions());
        assert_eq!(mode & 0o777, 0o600, "the tunnel's socket is private");

        let mut sq = Qmp::connect(pair.src.qmp_path(), Duration::from_secs(10)).expect("the source's QMP");
        tunnel_capabilities(&mut sq, on);
        // QEMU's default cap (128 MiB/s) is libvirt's to lift: the tunnel's window and link bound the rate.
        sq.migrate_set_parameters(json!({"max-bandwidth": 100u64 << 30})).expect("migrate-set-parameters");
        sq.migrate(&format!("unix:{}", t.src_sock.display())).expect("the source QEMU migrates to the tunnel");
        t
    }

    fn wait_send_log(&self, text: &str) {
        wait_for(&format!("tunnel send printing {text:?}"), Duration::from_secs(120), || read(&self.send_log).contains(text));
    }

    fn wait(child: &mut Child, log: &Path, json: &Path, what: &str) -> Ended {
        let status = livemig_lab::wait_timeout(child, Duration::from_secs(600)).unwrap();
        let Some(status) = status else {
            let _ = child.kill();
            panic!("{what} did not finish in 600 s:\n{}", read(log));
        };
        let e = Ended { code: status.code().unwrap_or(-1), stderr: read(log), report: serde_json::from_str(&read(json)).unwrap_or(Value::Null) };
        eprintln!("--- {what} (exit {}):\n{}", e.code, e.stderr);
        e
    }

    fn wait_send(&mut self) -> Ended {
        Self::wait(&mut self.send, &self.send_log, &self.send_json, "tunnel send")
    }

    fn wait_recv(&mut self) -> Ended {
        Self::wait(&mut self.recv, &self.recv_log, &self.recv_json, "tunnel receive")
    }
}

/// A tunnel migration of `pair` (capabilities `on` besides the tunnel's) that must complete:
/// the source QEMU's migration `completed`, both ends exit 0.
fn completed(pair: &Pair, on: &[&str]) -> (Tunnel, Ended, Ended) {
    let mut t = Tunnel::start_with(pair, &[], on);
    let (status, info) = source_migration_end(pair);
    let send = t.wait_send();
    let recv = t.wait_recv();
    assert_eq!(status, "completed", "the source QEMU's migration: {info:#}");
    assert_eq!(send.code, 0, "tunnel send failed:\n{}", send.stderr);
    assert_eq!(recv.code, 0, "tunnel receive failed:\n{}", recv.stderr);
    (t, send, recv)
}

/// The source QEMU's migration status once it is no longer active (as libvirt would follow it).
fn source_migration_end(pair: &Pair) -> (String, Value) {
    let mut q = Qmp::connect(pair.src.qmp_path(), Duration::from_secs(10)).expect("the source's QMP");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let info = q.query_migrate().expect("query-migrate");
        let status = info.status.clone().unwrap_or_default();
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            return (status, info.raw);
        }
        assert!(Instant::now() < deadline, "the source's migration is still `{status}` after 300 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Both VMs' RAM read from outside (`/proc/PID/mem`) through their second QMP monitors: the
/// statuses and the comparison.
fn compare_rams(pair: &Pair) -> (String, String, livemig_lab::ram::RamDiff) {
    let open = |qmp: &Path, pid: u32| {
        let mut q = Qmp::connect(qmp, Duration::from_secs(10)).expect("the second QMP monitor");
        let status = q.query_status().expect("query-status").status;
        let (hva, len) = q.ram_location().expect("where the RAM is");
        (status, livemig_lab::ram::RamView::open(pid, hva, len).expect("the RAM opens"))
    };
    let (s, a) = open(&pair.src.observer_qmp_path(), pair.src.pid());
    let (d, b) = open(&pair.dst.observer_qmp_path(), pair.dst.pid());
    (s, d, livemig_lab::ram::compare(&a, &b).expect("both RAMs read"))
}

/// A private-RAM guest rewriting 32 MiB at 8 MiB/s migrates through `livemig tunnel` with the
/// test as libvirt: both tunnel ends complete (exit 0) with the stream digest verified and fewer
/// bytes on the wire than QEMU wrote; the source QEMU's migration completes (`postmigrate`);
/// with both paused, the destination's RAM equals the source's page for page; after `cont` the
/// destination guest's verifier finds no bad page.
#[test]
fn tunnel_migrates_a_guest_libvirt_style_and_the_rams_are_equal() {
    let _g = harness::vm_lock();
    let pair = private_ram("tunnel", harness::dirty_guest(32, 8));
    let (t, send, recv) = completed(&pair, &[]);
    assert!(!t.src_sock.exists(), "the tunnel's socket is removed at the end");

    // Both paused (the source in postmigrate, the destination loaded, -S): their RAMs are equal.
    let (s, d, diff) = compare_rams(&pair);
    assert_eq!((s.as_str(), d.as_str()), ("postmigrate", "paused"));
    assert_eq!(diff.differ, 0, "{diff}");
    assert!(diff.nonzero > 8_000, "real guest memory was compared: {diff}");

    let (sr, rr) = (&send.report, &recv.report);
    for r in [sr, rr] {
        assert_eq!(r["outcome"], "completed", "{r:#}");
        assert_eq!(r["engine"], "tunnel", "{r:#}");
        assert_eq!(r["verification"]["ok"], Value::Bool(true), "the stream digest was verified: {r:#}");
    }
    assert_eq!(sr["role"], "tunnel-send");
    assert_eq!(rr["role"], "tunnel-receive");
    assert_eq!(rr["verification"]["source_digest"], rr["verification"]["destination_digest"]);
    let stream = &sr["stream"];
    let raw = stream["raw_bytes"].as_u64().unwrap();
    assert!(stream["fallback"].is_null(), "no fallback: {stream:#}");
    assert!(stream["pages"].as_u64().unwrap() > 0 && stream["zero_records"].as_u64().unwrap() > 0, "{stream:#}");
    assert!(sr["wire_bytes"].as_u64().unwrap() < raw, "compacted: {sr:#}");
    assert!(sr["device_state_bytes"].as_u64().unwrap() > 0, "{sr:#}");
    assert_eq!(rr["stream"]["raw_bytes"].as_u64(), Some(raw), "the receiver rebuilt every byte: {rr:#}");
    assert_eq!(sr["pages"], rr["pages"], "the receiver decoded what the sender encoded");
    assert!(rr["destination_state"].as_str().unwrap().starts_with("loaded"), "{rr:#}");
    assert!(send.stderr.contains("completed: the destination QEMU loaded the whole stream"), "{}", send.stderr);

    // libvirt's Finish: it resumes the destination.
    harness::qmp_cont(pair.dst.qmp_path());
    assert_eq!(pair.status_of_destination(), "running");
    assert_eq!(pair.status_of_source(), "postmigrate");
    pair.assert_destination_guest_verifies(3);
}

/// A section the parser does not know before the RAM is done: libvirt migrates a block dirty
/// bitmap (`dirty-bitmaps` on both QEMUs, a bitmap on the source's disk), so QEMU's stream carries
/// a `dirty-bitmap` section beside `ram`. The parser falls back: from there on the stream passes
/// verbatim, not compacted, said in both reports' `fallback` and warnings, the digest checked at
/// the fallback; the migration completes, the RAMs are equal, the destination has the bitmap
/// (the unknown section arrived intact) and its guest verifies.
#[test]
fn tunnel_passes_an_unknown_section_verbatim_and_says_so() {
    let _g = harness::vm_lock();
    let pair = harness::private_ram_with_bitmap("tunnel-bitmap", harness::dirty_guest(32, 8), "backup-0");
    let (_, send, recv) = completed(&pair, &["dirty-bitmaps"]);
    for r in [&send.report, &recv.report] {
        let fallback = r["stream"]["fallback"].as_str().unwrap_or_else(|| panic!("no fallback reported: {r:#}"));
        assert!(fallback.contains("dirty-bitmap"), "the fallback names the section: {fallback}");
        assert!(r["warnings"].to_string().contains("verbatim (not compacted)"), "{r:#}");
        assert_eq!(r["verification"]["ok"], Value::Bool(true), "the digest up to the fallback was checked: {r:#}");
    }
    assert!(send.stderr.contains("fell back"), "{}", send.stderr);
    let (s, d, diff) = compare_rams(&pair);
    assert_eq!((s.as_str(), d.as_str()), ("postmigrate", "paused"));
    assert_eq!(diff.differ, 0, "{diff}");
    assert!(harness::destination_has_bitmap(&pair, "backup-0"), "the destination has the migrated bitmap");
    harness::qmp_cont(pair.dst.qmp_path());
    pair.assert_destination_guest_verifies(2);
}

/// `livemig tunnel receive` killed (SIGKILL) 2 s into the relay over a 40 Mbit/s link: `tunnel
/// send` fails (exit 1) naming the lost connection and closes the source QEMU's socket, so the
/// source QEMU's migration fails and QEMU keeps the source VM running (its guest verifies); the
/// destination QEMU lost its incoming connection: its migration fails and QEMU 10 exits.
#[test]
fn tunnel_receiver_killed_mid_migration_leaves_the_source_running() {
    let _g = harness::vm_lock();
    let pair = private_ram("tunnel-kill-recv", harness::dirty_guest(32, 8));
    let mut t = Tunnel::start(&pair, &["--bandwidth", "40mbit"]);
    t.wait_send_log("relaying the migration");
    std::thread::sleep(Duration::from_secs(2));
    t.recv.kill().expect("kill tunnel receive");
    let recv = t.wait_recv();
    assert_ne!(recv.code, 0, "killed");
    let send = t.wait_send();
    let (status, info) = source_migration_end(&pair);
    assert_eq!(send.code, 1, "tunnel send must fail:\n{}", send.stderr);
    assert!(send.stderr.contains("the migration connection failed"), "it names the lost connection: {}", send.stderr);
    assert!(send.stderr.contains("the tunnel closed the source QEMU's migration socket"), "{}", send.stderr);
    assert_eq!(send.report["outcome"], "failed", "{:#}", send.report);
    assert!(send.report["verification"]["ok"] == Value::Bool(false), "killed in the pre-copy: {:#}", send.report);
    assert!(!t.src_sock.exists(), "the tunnel's socket is removed");
    assert_eq!(status, "failed", "the source QEMU's migration fails: {info:#}");
    assert_eq!(pair.status_of_source(), "running", "QEMU keeps the source VM running");
    pair.assert_source_guest_still_verifies(2);
    // QEMU 10 exits when its incoming migration fails (`exit-on-error`, on by default).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pair.status_of_destination().starts_with("unreachable") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let d = pair.status_of_destination();
    assert!(d.starts_with("unreachable"), "the destination QEMU's incoming migration failed and it exited: `{d}`");
}
