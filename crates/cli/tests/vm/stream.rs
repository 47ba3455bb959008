//! The stream engine with real QEMU 10 guests: QEMU migrates with its own dirty tracking into
//! livemig, which compacts and relays its stream; plain private RAM (`-m`), the VM most hosts run.

use livemig_lab::RamBackend;
use serde_json::Value;

use crate::harness::{self, Migration, Pair};

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
