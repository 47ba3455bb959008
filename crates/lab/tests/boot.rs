//! Boots real test VMs (TCG). Needs QEMU; builds the guest with guest/build.sh if needed.
//! The tests take a process-wide lock so only one QEMU runs at a time.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use livemig_lab::{GuestImage, RamBackend, Vm, VmConfig};

static ONE_VM: Mutex<()> = Mutex::new(());

fn run_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("livemig-lab-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn dirty_guest_verifies() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let image = GuestImage::build().expect("guest build");
    let dir = run_dir("dirty");
    let mut cfg = VmConfig::new("dirty", &dir).param("mode", "dirty").param("mib", 32).param("rate", 10);
    cfg.mem_mib = 256;
    let t0 = Instant::now();
    let vm = Vm::start(&image, &cfg).expect("start");
    vm.wait_console(Duration::from_secs(90), |l| l == "LIVEMIG-BOOT ok").expect("boot");
    let ready = vm.wait_console(Duration::from_secs(60), |l| l.starts_with("LIVEMIG-READY")).expect("ready");
    assert_eq!(ready, "LIVEMIG-READY mode=dirty mib=32 pages=8192");
    eprintln!("READY after {:.1} s", t0.elapsed().as_secs_f64());
    vm.wait_console(Duration::from_secs(60), |l| l.starts_with("LIVEMIG-VERIFY pass=2 ")).expect("two verify passes");
    let v = vm.verify_lines();
    assert!(v.len() >= 2, "{v:?}");
    for (i, l) in v.iter().enumerate() {
        assert_eq!(l.pass, i as u64 + 1);
        assert_eq!(l.pages, 8192);
        assert_eq!(l.bad, 0, "{}", vm.console());
    }
    assert!(v[1].writes > v[0].writes, "{v:?}");
    assert!(vm.bad_lines().is_empty());
    assert!(vm.console().contains("LIVEMIG-HEARTBEAT n="));
    assert!(vm.console().contains("disk=ro"), "{}", vm.console());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn anonymous_ram_guest_boots() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let image = GuestImage::build().expect("guest build");
    let dir = run_dir("anon");
    let mut cfg = VmConfig::new("anon", &dir);
    cfg.backend = RamBackend::Anonymous;
    cfg.mem_mib = 256;
    cfg.with_disk = false;
    let mut vm = Vm::start(&image, &cfg).expect("start");
    let pid = vm.pid();
    vm.wait_console(Duration::from_secs(90), |l| l == "LIVEMIG-BOOT ok").expect("boot");
    vm.wait_console(Duration::from_secs(30), |l| l.starts_with("LIVEMIG-HEARTBEAT n=2 ")).expect("heartbeat");
    assert!(vm.console().contains("disk=none"), "{}", vm.console());
    assert!(vm.is_alive());
    drop(vm);
    // Dropped: the process is gone (reaped, so no /proc entry).
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn exited_qemu_is_reported() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let image = GuestImage::build().expect("guest build");
    let dir = run_dir("bad");
    let mut cfg = VmConfig::new("bad", &dir);
    cfg.extra_qemu_args = vec!["-no-such-option".into()];
    let err = Vm::start(&image, &cfg).expect_err("must fail");
    let msg = err.to_string();
    assert!(msg.contains("no-such-option"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// End to end: corrupting workload pages in the shared RAM file is seen by the guest verifier.
#[test]
fn guest_verifier_detects_host_corruption() {
    use std::os::unix::fs::FileExt;
    const MAGIC: u64 = 0x4c4d_5047_5041_4745;
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let image = GuestImage::build().expect("guest build");
    let dir = run_dir("corrupt");
    let ram = dir.join("ram");
    let mut cfg = VmConfig::new("corrupt", &dir)
        .param("mode", "dirty")
        .param("mib", 16)
        .param("rate", 1)
        .param("verify-secs", 1);
    cfg.mem_mib = 256;
    cfg.with_disk = false;
    cfg.backend = RamBackend::File(ram.clone());
    let vm = Vm::start(&image, &cfg).expect("start");
    vm.wait_console(Duration::from_secs(90), |l| l.starts_with("LIVEMIG-READY")).expect("ready");
    let mut mark = vm.console_mark();
    vm.wait_console_from(&mut mark, Duration::from_secs(30), |l| l.starts_with("LIVEMIG-VERIFY") && l.contains(" bad=0 "))
        .expect("clean pass");

    let f = std::fs::OpenOptions::new().read(true).write(true).open(&ram).unwrap();
    let len = f.metadata().unwrap().len();
    let mut buf = vec![0u8; 1 << 20];
    let mut corrupted = 0;
    let mut off = 0u64;
    while off < len && corrupted < 16 {
        f.read_exact_at(&mut buf, off).unwrap();
        for (i, page) in buf.chunks_exact(4096).enumerate() {
            if u64::from_le_bytes(page[0..8].try_into().unwrap()) == MAGIC && corrupted < 16 {
                let at = off + i as u64 * 4096 + 1000;
                let mut b = [0u8; 1];
                f.read_exact_at(&mut b, at).unwrap();
                f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
                corrupted += 1;
            }
        }
        off += buf.len() as u64;
    }
    assert_eq!(corrupted, 16, "workload pages not found in the RAM file");
    let mark2 = vm.console_mark();
    let mut m = mark2;
    let line = vm
        .wait_console_from(&mut m, Duration::from_secs(30), |l| l.starts_with("LIVEMIG-VERIFY"))
        .expect("verify after corruption");
    let v = livemig_lab::VerifyLine::parse(&line).unwrap();
    assert!(v.bad >= 1, "{line}");
    assert!(vm.bad_lines().iter().any(|l| l.contains("reason=checksum")), "{:?}", vm.bad_lines());
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}
