//! The compressor chosen by the link (`--compressor auto`) with real VMs: on a link capped at
//! 100 Mbit/s by `send --bandwidth` (12.5 MB/s: any CPU compresses faster, so the choice is
//! zstd whatever the machine's load, not a timing threshold), a guest whose page cache holds its
//! root disk (binaries and text, which compress) migrates byte-exact, and the report names zstd
//! with the reason and the numbers behind it, for both engines.

use livemig_lab::RamBackend;
use serde_json::Value;

use crate::compaction::{assert_byte_exact, cache_guest_on};
use crate::harness::{self, Migration};

/// The sender's report says the choice started with lz4 before anything was measured, then
/// changed to a zstd level on the measured link with the numbers; both sides counted zstd pages.
fn assert_chose_zstd(m: &Migration) {
    let s = &m.send_report;
    let c = &s["compressor"];
    assert_eq!(c["mode"], "auto", "{c:#}");
    let changes = c["changes"].as_array().expect("the choices");
    assert_eq!(changes[0]["to"], "lz4", "{c:#}");
    assert!(changes[0]["reason"].as_str().unwrap().contains("nothing measured yet"), "{c:#}");
    let zstd = changes.iter().find(|ch| ch["to"].as_str().is_some_and(|t| t.starts_with("zstd"))).unwrap_or_else(|| panic!("no change to zstd: {c:#}"));
    let reason = zstd["reason"].as_str().unwrap();
    assert!(reason.contains("MB/s") && reason.contains("link-bound"), "{reason}");
    assert_eq!(zstd["link"]["kind"], "measured", "the capped link was the bottleneck: {zstd:#}");
    assert_eq!(zstd["predictions"].as_array().map(Vec::len), Some(3), "none, lz4, zstd1: {zstd:#}");
    assert!(zstd["wire_bytes"].as_u64().unwrap() > 0, "{zstd:#}");
    assert!(c["chosen"].as_str().unwrap().starts_with("zstd"), "{c:#}");
    assert!(c["sampled_pages"].as_u64().unwrap() >= 8, "{c:#}");
    assert!(c["last_decision"].as_str().is_some_and(|d| d.contains("MB/s")), "the last verdict and its numbers: {c:#}");
    // Both sides know how the whole pages travelled.
    let zstd_pages = s["whole_pages"]["zstd"].as_u64().unwrap();
    assert!(zstd_pages > 1000, "{:#}", s["whole_pages"]);
    // (Compressed ones: a stream-engine resend goes raw and only the receiver counts it.)
    for codec in ["lz4", "zstd"] {
        assert_eq!(m.recv_report["whole_pages"][codec], s["whole_pages"][codec], "the receiver decoded the same {codec} pages");
    }
    assert_eq!(m.recv_report["compressor"], Value::Null, "only the sender chooses");
}

#[test]
fn auto_compressor_on_a_100mbit_link_picks_zstd_shared_engine() {
    let _g = harness::vm_lock();
    let pair = cache_guest_on("autocomp-shared", 200, RamBackend::ShmFile);
    let m = Migration::run(
        &pair,
        &["--engine", "shared", "--compressor", "auto", "--bandwidth", "100mbit", "--max-downtime", "3s"],
        &["--verify-reread"],
    );
    m.assert_completed();
    assert_eq!(m.send_report["engine"], "shared");
    assert_chose_zstd(&m);
    let zstd = m.send_report["compressor"]["changes"].as_array().unwrap().iter().find(|c| c["to"] != "lz4").cloned().unwrap();
    assert!(zstd["iteration"].as_u64().is_some(), "the shared engine says the iteration: {zstd:#}");
    assert_byte_exact(pair.src.qmp_path(), &m);
    pair.assert_destination_guest_verifies(2);
}

#[test]
fn auto_compressor_on_a_100mbit_link_picks_zstd_stream_engine() {
    let _g = harness::vm_lock();
    let pair = cache_guest_on("autocomp-stream", 200, RamBackend::Anonymous);
    let args = ["--engine", "stream", "--compressor", "auto", "--bandwidth", "100mbit", "--max-downtime", "3s"];
    let (m, rams) = crate::stream::compared_at_commit(&pair.src, &pair.dst, &pair.dir, "", &args, &[]);
    assert!(rams.diff.nonzero > 30_000, "real guest memory was compared: {}", rams.diff);
    assert_eq!(m.send_report["engine"], "stream");
    assert_chose_zstd(&m);
    let zstd = m.send_report["compressor"]["changes"].as_array().unwrap().iter().find(|c| c["to"] != "lz4").cloned().unwrap();
    assert!(zstd["chunk"].as_u64().is_some(), "the stream engine says the chunk: {zstd:#}");
    pair.assert_destination_guest_verifies(2);
}
