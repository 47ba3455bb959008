//! The soft-dirty tracker (issue 7): used only when asked for, and only where the kernel proves
//! it tracks soft-dirty pages. On a kernel that does (Debian's cloud kernel), `--tracker
//! soft-dirty` migrates with a short pause per iteration and says it is experimental; on one that
//! does not (this machine's), it is refused before anything is sent. `--tracker auto` (the
//! default) is the content tracker either way.

use livemig_track::softdirty::SoftDirty;

use crate::harness::{self, Migration, Pair};

#[test]
fn soft_dirty_is_used_only_where_the_kernel_proves_it() {
    let _g = harness::vm_lock();
    let mut pair = Pair::start("softdirty", harness::dirty_guest(16, 5), |d| d);
    let m = Migration::run(&pair, &["--tracker", "soft-dirty"], &[]);
    match SoftDirty::probe() {
        Ok(()) => {
            m.assert_completed();
            assert_eq!(m.send_report["tracker"], "soft-dirty");
            assert!(m.send_report["warnings"].to_string().contains("the soft-dirty tracker is experimental"), "{:#}", m.send_report);
            let iterations = m.send_report["iterations"].as_array().unwrap();
            assert!(
                iterations.iter().skip(1).filter(|i| i["last"] == false).all(|i| i["tracker_pause_ms"].as_f64().is_some()),
                "every scan after the first pauses the guest, and says how long: {iterations:#?}"
            );
            pair.assert_destination_guest_verifies(3);
            drop(pair);
            auto_is_content(&Pair::start("softdirty-auto", harness::dirty_guest(16, 5), |d| d));
        }
        Err(e) => {
            assert_eq!(m.send_code, 1, "{}", m.send_stderr);
            assert!(m.send_stderr.contains("does not track soft-dirty"), "{e}: {}", m.send_stderr);
            assert!(m.send_report["iterations"].as_array().is_none_or(Vec::is_empty), "refused before any page: {:#}", m.send_report);
            assert_eq!(pair.status_of_source(), "running");
            pair.assert_source_guest_still_verifies(1);
            pair.restart_destination();
            auto_is_content(&pair);
        }
    }
}

/// `auto` is the content tracker, whatever the kernel can do (the soft-dirty tracker is
/// experimental: `scanner::SOFT_DIRTY_CAVEAT`), and says nothing of soft-dirty.
fn auto_is_content(pair: &Pair) {
    let auto = Migration::run(pair, &["--tracker", "auto"], &[]);
    auto.assert_completed();
    assert_eq!(auto.send_report["tracker"], "content");
    let warnings = auto.send_report["warnings"].to_string();
    assert!(!warnings.contains("soft-dirty"), "{warnings}");
    pair.assert_destination_guest_verifies(3);
}
