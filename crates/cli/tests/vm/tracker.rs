//! The soft-dirty tracker (issue 7): used only where the kernel proves it tracks soft-dirty
//! pages. On a kernel that does (Debian's cloud kernel), `--tracker soft-dirty` migrates with a
//! short pause per iteration; on one that does not (this machine's), it is refused before
//! anything is sent, and `--tracker auto` falls back to the content tracker and says so.

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
            let iterations = m.send_report["iterations"].as_array().unwrap();
            assert!(
                iterations.iter().skip(1).filter(|i| i["last"] == false).all(|i| i["tracker_pause_ms"].as_f64().is_some()),
                "every scan after the first pauses the guest, and says how long: {iterations:#?}"
            );
            pair.assert_destination_guest_verifies(3);
        }
        Err(e) => {
            assert_eq!(m.send_code, 1, "{}", m.send_stderr);
            assert!(m.send_stderr.contains("does not track soft-dirty"), "{e}: {}", m.send_stderr);
            assert!(m.send_report["iterations"].as_array().is_none_or(Vec::is_empty), "refused before any page: {:#}", m.send_report);
            assert_eq!(pair.status_of_source(), "running");
            pair.assert_source_guest_still_verifies(1);
            pair.restart_destination();
            let auto = Migration::run(&pair, &["--tracker", "auto"], &[]);
            auto.assert_completed();
            assert_eq!(auto.send_report["tracker"], "content");
            let warnings = auto.send_report["warnings"].to_string();
            assert!(warnings.contains("soft-dirty tracker not usable"), "{warnings}");
            assert!(auto.send_stderr.contains("using the content tracker"), "{}", auto.send_stderr);
            pair.assert_destination_guest_verifies(3);
        }
    }
}
