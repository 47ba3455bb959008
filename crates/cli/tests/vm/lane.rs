//! The KVM lane (issue 7): `lane/run` boots an L1 host under TCG with `-cpu max` (emulated AMD
//! SVM with nested paging); inside it, L2 guests run on real KVM. `lane/tests.sh` migrates the
//! same writing guest there with the shared engine's default tracker (content) and with the
//! stream engine (QEMU's own pre-copy: KVM's dirty log) through the `livemig` binary under test,
//! and this test checks what comes back: both migrations completed with equal digests, and the
//! guest's verifier found no bad page after the switchover.
//!
//! The soft-dirty tracker is not run here: it is experimental and not chosen by `auto`, because
//! its destination guest hung right after the switchover in 2 of 11 lane runs on 2026-12-07
//! (`scanner::SOFT_DIRTY_CAVEAT`, docs/FAILURES.md "Known gaps"). `bash lane/run lane/tests.sh
//! soft-dirty` runs it.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::harness;

/// The lane's runs here: the shared engine's content tracker, the stream engine.
const RUNS: [&str; 2] = ["content", "stream"];

fn report(out: &Path, tracker: &str) -> Value {
    let p = out.join(format!("{tracker}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn kvm_lane_migrates_a_writing_guest_with_the_content_tracker_and_the_stream_engine() {
    let _g = harness::vm_lock();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("bash")
        .arg(repo.join("lane/run"))
        .arg("--out")
        .arg(out.path())
        // L1 is emulated and its kernel has crashed on its own (lane/README.md): up to two more boots
        // then, which lane/run announces on stderr.
        .args(["--timeout", "1200", "--retries", "2"])
        .arg(repo.join("lane/tests.sh"))
        .args(RUNS)
        .env("LIVEMIG_BIN", env!("CARGO_BIN_EXE_livemig"))
        .stdin(Stdio::null())
        .output()
        .expect("lane/run starts");
    let console = std::fs::read_to_string(out.path().join("console.log")).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "lane/run failed ({}):\n{stderr}\nL1 console:\n{console}", run.status);
    assert!(console.contains("LANE-READY"), "L1 booted: {console}");

    for tracker in RUNS {
        let r = report(out.path(), tracker);
        let send = &r["send"];
        assert_eq!(r["accel"], "kvm", "{tracker}: the L2 guests ran on KVM");
        assert_eq!(r["outcome"], "completed", "{tracker}: {r:#}");
        assert_eq!(r["receive"]["destination_state"], "running");
        assert_eq!(send["source_state"], "postmigrate");
        assert_eq!(r["guest"]["bad_pages"], 0, "{tracker}: {:#}", r["guest"]);
        assert!(r["guest"]["verify_passes"].as_u64().unwrap() >= 3, "{tracker}: {:#}", r["guest"]);
        assert_no_oops(out.path(), tracker);
        if tracker == "stream" {
            // QEMU's own pre-copy with KVM's dirty log, relayed: the digest of QEMU's stream
            // was checked before the device state reached the destination QEMU.
            assert_eq!(send["engine"], "stream", "{send:#}");
            assert_eq!(send["verification"]["ok"], true, "{:#}", send["verification"]);
            let rv = &r["receive"]["verification"];
            assert_eq!(rv["source_digest"], rv["destination_digest"], "{rv:#}");
            assert!(send["stream"]["fallback"].is_null(), "{send:#}");
            continue;
        }
        assert_eq!(send["engine"], "shared", "{send:#}");
        assert_eq!(send["tracker"], tracker, "{tracker}: the tracker asked for is the one used");
        assert_eq!(send["verification"]["ok"], true, "{tracker}: {:#}", send["verification"]);
        assert_eq!(send["verification"]["source_digest"], send["verification"]["destination_digest"]);
        let iterations = send["iterations"].as_array().unwrap();
        assert!(iterations.len() >= 2, "{tracker}: at least one live and one final iteration");
        let live_pauses = iterations.iter().skip(1).filter(|i| i["last"] == false).map(|i| i["tracker_pause_ms"].as_f64()).collect::<Vec<_>>();
        assert!(live_pauses.iter().all(Option::is_none), "the content tracker never pauses the guest: {iterations:#?}");
        assert!(send["tracker_missed_pages"].is_null());
    }
}

/// The destination kernel printed no oops after the verifier passes.
fn assert_no_oops(out: &Path, run: &str) {
    let dest_console = std::fs::read_to_string(out.join(format!("{run}-destination.console.log"))).unwrap();
    for oops in ["BUG:", "Oops", "Kernel panic", "soft lockup"] {
        assert!(!dest_console.contains(oops), "{run}: the destination kernel printed {oops}:\n{dest_console}");
    }
}
