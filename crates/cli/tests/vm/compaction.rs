//! Memory compaction (issue 3) with real VMs: every page class arrives byte-exact (the test reads
//! the source memory itself and compares with the destination's memory read back before it
//! resumes), and a reference that does not resolve — a disk image changed between the hosts, a
//! damaged snapshot page — is sent again whole, never written wrong.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{self, Migration, Pair};

/// A guest with its root disk that reads `mib` MiB of it into its page cache, then rewrites
/// 8 MiB at 2 MiB/s.
fn cache_guest(name: &str, mib: u64) -> Pair {
    cache_guest_on(name, mib, livemig_lab::RamBackend::ShmFile)
}

/// [`cache_guest`] with its RAM on `backend`, both sides.
pub(crate) fn cache_guest_on(name: &str, mib: u64, backend: livemig_lab::RamBackend) -> Pair {
    cache_guest_of(harness::image(), name, mib, backend)
}

/// [`cache_guest_on`] of the guest `image` (its root disk read into the page cache).
pub(crate) fn cache_guest_of(image: livemig_lab::GuestImage, name: &str, mib: u64, backend: livemig_lab::RamBackend) -> Pair {
    let workload = [("mode", "cache"), ("mib", &mib.to_string()), ("then-dirty-mib", "8"), ("rate", "2"), ("pattern", "uniform"), ("verify-secs", "2")]
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    let dst_backend = backend.clone();
    Pair::start_custom_on(
        image,
        name,
        workload,
        |mut c| {
            c.with_disk = true;
            c.mem_mib = 512;
            c.backend = backend;
            c
        },
        |mut d| {
            d.backend = dst_backend;
            d
        },
    )
}

/// Flips a byte in up to `n` non-zero pages of a snapshot's `memory.raw` (every 97th page
/// looked at); returns how many were damaged.
pub(crate) fn damage_snapshot(mem: &Path, n: usize) -> usize {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(mem).expect("snapshot memory.raw");
    let mut damaged = 0;
    let mut page = [0u8; 4096];
    let mut off = 0u64;
    while damaged < n && f.read_exact_at(&mut page, off).is_ok() {
        if page.iter().any(|&x| x != 0) {
            page[100] ^= 0xff;
            f.write_all_at(&page, off).unwrap();
            damaged += 1;
        }
        off += 4096 * 97;
    }
    damaged
}

pub(crate) fn pages(r: &Value, class: &str) -> u64 {
    r["pages"][class].as_u64().unwrap_or(0)
}

/// The destination's memory, read back before it resumed, equals the source's as this test
/// reads it (the source stays paused in `postmigrate` with its memory as at the switchover).
/// The digests are keyed with the migration's page key: on the plain link these tests use, both
/// reports carry it (the same), so the test can hash with it.
pub(crate) fn assert_byte_exact(src_qmp: &Path, m: &Migration) {
    let key = m.recv_report["page_key_hex"].as_str().expect("a plain-link migration reports its page key");
    assert_eq!(m.send_report["page_key_hex"].as_str(), Some(key), "both sides used the same key");
    let ours = harness::memory_digest(src_qmp, key);
    let r = &m.recv_report["verification"];
    assert!(r["reread_ms"].as_f64().is_some(), "the receiver did not re-read its memory: {r:#}");
    assert_eq!(r["destination_digest"].as_str(), Some(ours.as_str()), "destination memory differs from the source's");
    assert_eq!(m.send_report["verification"]["source_digest"].as_str(), Some(ours.as_str()));
}

#[test]
fn cached_disk_blocks_go_as_references_and_every_class_arrives_byte_exact() {
    let _g = harness::vm_lock();
    let pair = cache_guest("cache", 200);
    let disk = harness::image().disk.display().to_string();
    // One thread for the tracker and the encoder (the cap; the other tests use every core). One
    // thread scans the RAM in the downtime slower, so a busy machine may take more than the
    // default 300 ms: 2 s (this test is about references, not downtime).
    let m = Migration::run(
        &pair,
        &["--disk-image", &disk, "--threads", "1", "--max-downtime", "2s"],
        &["--disk-image", &disk, "--verify-reread"],
    );
    m.assert_completed();
    let r = &m.send_report;
    assert_eq!(r["threads"], 1, "--threads caps the tracker and encoder");
    assert!(pages(r, "disk_ref") > 20_000, "page-cache blocks not sent as disk references: {:#}", r["pages"]);
    assert!(pages(r, "dup") > 0 && pages(r, "raw") > 0, "{:#}", r["pages"]);
    assert_eq!(r["resent_pages"], 0, "an unchanged disk image resolves every reference");
    assert_eq!(r["disk_images_used"], 1);
    let fraction = r["wire_fraction"].as_f64().unwrap();
    assert!(fraction < 0.5, "cached disk blocks should cut the stream well below half: {fraction}");
    // the receiver counted the same classes
    for class in ["disk_ref", "dup", "delta", "raw", "zero", "snapshot_ref"] {
        assert_eq!(pages(&m.recv_report, class), pages(r, class), "{class}");
    }
    // The destination's RAM is a file on /dev/shm (tmpfs): every zero page was punched.
    assert_eq!(m.recv_report["zero_pages_punched"], pages(&m.recv_report, "zero"), "{:#}", m.recv_report);
    assert_eq!(m.recv_report["zero_pages_written"], 0);
    assert_byte_exact(pair.src.qmp_path(), &m);
    pair.assert_destination_guest_verifies(3);
}

/// A root disk on ext4 with 1 KiB blocks (`root-1k.raw`): a page-cache page of a file is four
/// 1 KiB blocks, on the disk at any 1 KiB boundary. Both agents detect the block size and index a
/// window every 1 KiB; the cached pages go as references to their sectors, byte-exact. With
/// `engine` "shared" or "stream".
fn one_k_block_root_migrates_with_its_cache_as_references(engine: &str) -> Migration {
    let backend = if engine == "stream" { livemig_lab::RamBackend::Anonymous } else { livemig_lab::RamBackend::ShmFile };
    let image = harness::image_1k();
    let disk = image.disk.display().to_string();
    let pair = cache_guest_of(image, &format!("cache1k-{engine}"), 200, backend);
    let cache = pair.dir.join("index-cache").display().to_string();
    // Integrity is the point: a maximum the downtime fits in on a loaded machine.
    let m = Migration::run(
        &pair,
        &["--engine", engine, "--disk-image", &disk, "--index-cache", &cache, "--max-downtime", "3s"],
        &["--disk-image", &disk, "--index-cache", &cache, "--verify-reread"],
    );
    m.assert_completed();
    let (s, r) = (&m.send_report, &m.recv_report);
    assert_eq!(s["engine"], engine, "{s:#}");
    for rep in [s, r] {
        let idx = &rep["disk_indexes"][0];
        assert_eq!(idx["stride"], 1024, "{idx:#}");
        assert!(idx["stride_reason"].as_str().unwrap().contains("ext4 with 1024-byte blocks at byte 0"), "{idx:#}");
    }
    assert_eq!(s["disk_images_used"], 1);
    // 200 MiB of files read: most of their ~51,000 pages are references.
    assert!(pages(s, "disk_ref") > 30_000, "page-cache pages not sent as disk references: {:#}", s["pages"]);
    assert_eq!(s["resent_pages"], 0, "an unchanged disk image resolves every reference");
    assert_eq!(pages(r, "disk_ref"), pages(s, "disk_ref"));
    if engine == "shared" {
        assert_byte_exact(pair.src.qmp_path(), &m);
    } else {
        // The stream engine rebuilds QEMU's stream byte for byte: its keyed digest was compared
        // before the rest reached the destination QEMU, and nothing fell back to verbatim.
        assert!(s["stream"]["fallback"].is_null(), "{s:#}");
        let v = &r["verification"];
        assert_eq!(v["ok"], true, "{v:#}");
        assert_eq!(v["source_digest"], v["destination_digest"], "{v:#}");
    }
    pair.assert_destination_guest_verifies(3);
    m
}

#[test]
fn a_1k_block_ext4_roots_cached_pages_go_as_references_byte_exact() {
    let _g = harness::vm_lock();
    let m = one_k_block_root_migrates_with_its_cache_as_references("shared");
    eprintln!("1 KiB-block root, shared engine: pages {:#}, wire_fraction {}", m.send_report["pages"], m.send_report["wire_fraction"]);
}

#[test]
fn a_1k_block_ext4_roots_cached_pages_go_as_references_with_the_stream_engine() {
    let _g = harness::vm_lock();
    let m = one_k_block_root_migrates_with_its_cache_as_references("stream");
    eprintln!("1 KiB-block root, stream engine: pages {:#}, wire_fraction {}", m.send_report["pages"], m.send_report["wire_fraction"]);
}

/// A qcow2 root with a backing file: both agents index and read its guest-visible content
/// through qemu-nbd; the cached pages go as references, byte-exact.
#[test]
fn a_qcow2_roots_cached_pages_go_as_references_byte_exact() {
    let _g = harness::vm_lock();
    let image = harness::image_qcow2();
    let disk = image.disk.display().to_string();
    let pair = cache_guest_of(image, "cache-qcow2", 200, livemig_lab::RamBackend::ShmFile);
    let cache = pair.dir.join("index-cache").display().to_string();
    let m = Migration::run(
        &pair,
        &["--disk-image", &disk, "--index-cache", &cache, "--max-downtime", "3s"],
        &["--disk-image", &disk, "--index-cache", &cache, "--verify-reread"],
    );
    m.assert_completed();
    let (s, r) = (&m.send_report, &m.recv_report);
    let guest_size = std::fs::metadata(harness::image().disk).unwrap().len();
    for rep in [s, r] {
        let idx = &rep["disk_indexes"][0];
        // The guest-visible size (root.raw's) and filesystem, not the qcow2 file's.
        assert!(idx["stride_reason"].as_str().unwrap().contains("ext4 with 4096-byte blocks at byte 0"), "{idx:#}");
        assert_eq!(idx["windows"], guest_size / 4096, "{idx:#}");
    }
    assert_eq!(s["disk_images_used"], 1);
    assert!(pages(s, "disk_ref") > 30_000, "page-cache pages not sent as disk references: {:#}", s["pages"]);
    assert_eq!(s["resent_pages"], 0, "an unchanged disk image resolves every reference");
    assert_eq!(pages(r, "disk_ref"), pages(s, "disk_ref"));
    assert_byte_exact(pair.src.qmp_path(), &m);
    pair.assert_destination_guest_verifies(3);
    eprintln!("qcow2 root: pages {:#}, wire_fraction {}", s["pages"], s["wire_fraction"]);
}

#[test]
fn a_disk_image_changed_between_hosts_is_resent_never_written_wrong() {
    let _g = harness::vm_lock();
    let pair = cache_guest("diskchg", 200);
    let original = harness::image().disk;
    // The destination's copy differs in one block of every eight.
    let copy = pair.dir.join("changed-root.raw");
    std::fs::copy(&original, &copy).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
    let blocks = f.metadata().unwrap().len() / 4096;
    for b in (0..blocks).step_by(8) {
        f.write_all_at(&[0xA5; 4096], b * 4096).unwrap();
    }
    drop(f);
    let cache = pair.dir.join("index-cache");
    let cache = cache.display().to_string();
    // Integrity is the point here, not the downtime: the final pass's references that do not
    // resolve come back whole in the downtime, which the prediction does not foresee (397 ms for
    // a predicted 139 ms once): a maximum the resends fit in.
    let m = Migration::run(
        &pair,
        &["--disk-image", &original.display().to_string(), "--index-cache", &cache, "--max-downtime", "3s"],
        &["--disk-image", &copy.display().to_string(), "--index-cache", &cache, "--verify-reread"],
    );
    m.assert_completed();
    let (s, r) = (&m.send_report, &m.recv_report);
    assert!(pages(s, "disk_ref") > 20_000, "{:#}", s["pages"]);
    let resent = s["resent_pages"].as_u64().unwrap();
    assert!(resent > 1000, "blocks changed at the destination must come back as resend requests: {resent}");
    assert_eq!(r["resent_pages"], s["resent_pages"]);
    assert_byte_exact(pair.src.qmp_path(), &m);
    pair.assert_destination_guest_verifies(3);
}

#[test]
fn a_return_trip_references_the_snapshot_and_a_damaged_snapshot_page_is_resent() {
    let _g = harness::vm_lock();
    let pair = Pair::start("return", harness::dirty_guest(8, 1), |d| d);
    let (snaps_a, snaps_b) = (pair.dir.join("snaps-a"), pair.dir.join("snaps-b"));
    let (a, b) = (snaps_a.display().to_string(), snaps_b.display().to_string());
    let there = Migration::run(&pair, &["--vm-id", "vm-t", "--snapshot-dir", &a], &["--snapshot-dir", &b]);
    there.assert_completed();
    let kept = there.send_report["snapshot_kept"].as_str().expect("the source kept a snapshot").to_string();
    assert_eq!(there.recv_report["snapshot_kept"].as_str(), Some(kept.as_str()), "both hosts keep the same snapshot");
    pair.assert_destination_guest_verifies(1);

    // Damage 64 non-zero pages of host A's copy: their references cannot resolve.
    let damaged = damage_snapshot(&snaps_a.join("vm-t").join(&kept).join("memory.raw"), 64);
    assert_eq!(damaged, 64);

    std::thread::sleep(Duration::from_secs(3));
    let home = pair.start_incoming("home");
    let back = Migration::between(
        &pair.dst,
        &home,
        &pair.dir,
        "back-",
        &["--vm-id", "vm-t", "--snapshot-dir", &b],
        &["--snapshot-dir", &a, "--verify-reread"],
        |_| {},
    );
    back.assert_completed();
    let s = &back.send_report;
    assert_eq!(s["snapshot_used"].as_str(), Some(kept.as_str()));
    assert!(pages(s, "snapshot_ref") > 5_000, "{:#}", s["pages"]);
    assert!(s["resent_pages"].as_u64().unwrap() >= 1, "damaged snapshot pages must be resent: {s:#}");
    let fraction = s["wire_fraction"].as_f64().unwrap();
    assert!(fraction < 0.5, "a return with a snapshot sends a fraction of the memory: {fraction}");
    assert_byte_exact(pair.dst.qmp_path(), &back);
    harness::assert_guest_verifies(&home, 3);
}
