//! Integration tests against a real `qemu-system-x86_64` (TCG, paused with -S, no guest code).

use std::time::Duration;

use livemig_lab::Vm;
use livemig_memory::{Backend, GuestMemory, MemoryError, PageBuf, PAGE_SIZE};
use livemig_qmp::Qmp;

/// Longest wait for QEMU.
const T: Duration = Duration::from_secs(10);

/// A QMP connection to a QEMU running no guest code; the QEMU is killed when the Vm drops.
fn connect(vm: Vm) -> (Vm, Qmp) {
    let q = Qmp::connect(vm.qmp_path(), T).expect("QMP connects");
    (vm, q)
}

/// A paused QEMU whose 256 MiB of RAM is memdev `mem0`, with the given `-object`s.
fn qemu_with(objects: &[&str]) -> (Vm, Qmp) {
    let mut args = vec!["-m", "256", "-machine", "q35,memory-backend=mem0"];
    for o in objects {
        args.extend(["-object", o]);
    }
    connect(Vm::start_paused("qemu", &args).expect("QEMU starts"))
}

const MIB: u64 = 1 << 20;

fn pattern(seed: u8) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    for (i, b) in p.iter_mut().enumerate() {
        *b = seed.wrapping_add(u8::try_from(i % 251).unwrap());
    }
    p
}

/// The first bytes of guest-physical `addr` as QEMU shows them (HMP `xp`).
fn guest_bytes(q: &mut livemig_qmp::Qmp, addr: u64) -> String {
    let v = q
        .execute(
            "human-monitor-command",
            Some(serde_json::json!({ "command-line": format!("xp /4xb {addr:#x}") })),
        )
        .unwrap();
    v.as_str().unwrap().trim().to_owned()
}

#[test]
fn memfd_region_is_found_and_shared_with_the_guest() {
    let (_qemu, mut q) = qemu_with(&["memory-backend-memfd,id=mem0,size=256M,share=on"]);
    let mem = GuestMemory::open(&mut q).unwrap();
    assert_eq!(mem.layout(), vec![("mem0".to_owned(), 256 * MIB)]);
    assert_eq!(mem.regions[0].backend(), &Backend::Memfd);
    assert_eq!(mem.total_pages(), 256 * MIB / 4096);

    mem.write_page(0, &pattern(0x10)).unwrap();
    mem.write_page(1000, &pattern(0x20)).unwrap();

    // A second, independent mapping sees the writes.
    let again = GuestMemory::open(&mut q).unwrap();
    let mut buf = PageBuf::zeroed();
    again.read_page(1000, &mut buf).unwrap();
    assert_eq!(buf.0, pattern(0x20));
    again.read_page(0, &mut buf).unwrap();
    assert_eq!(buf.0, pattern(0x10));

    // And so does the guest: guest-physical 0 and 1000 * 4096 are in mem0.
    assert!(
        guest_bytes(&mut q, 0).ends_with("0x10 0x11 0x12 0x13"),
        "{}",
        guest_bytes(&mut q, 0)
    );
    assert!(guest_bytes(&mut q, 1000 * 4096).ends_with("0x20 0x21 0x22 0x23"));
}

#[test]
fn file_region_is_found_and_writes_reach_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ram = dir.path().join("guest.ram");
    let object = format!(
        "memory-backend-file,id=mem0,size=256M,share=on,mem-path={}",
        ram.display()
    );
    let (_qemu, mut q) = qemu_with(&[&object]);
    let mem = GuestMemory::open(&mut q).unwrap();
    assert_eq!(mem.layout(), vec![("mem0".to_owned(), 256 * MIB)]);
    assert_eq!(mem.regions[0].backend(), &Backend::File(ram.clone()));

    mem.write_page(7, &pattern(0x33)).unwrap();
    let on_disk = std::fs::read(&ram).unwrap();
    assert_eq!(on_disk.len(), usize::try_from(256 * MIB).unwrap());
    assert_eq!(&on_disk[7 * PAGE_SIZE..8 * PAGE_SIZE], &pattern(0x33)[..]);

    let again = GuestMemory::open_file("mem0", &ram, 256 * MIB).unwrap();
    let mut buf = PageBuf::zeroed();
    again.read_page(7, &mut buf).unwrap();
    assert_eq!(buf.0, pattern(0x33));
    assert!(guest_bytes(&mut q, 7 * 4096).ends_with("0x33 0x34 0x35 0x36"));

    mem.regions[0].zero_page(7).unwrap();
    again.read_page(7, &mut buf).unwrap();
    assert_eq!(buf, PageBuf::zeroed());
}

#[test]
fn several_memdevs_are_sorted_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let file = format!(
        "memory-backend-file,id=a-file,size=32M,share=on,mem-path={}",
        dir.path().join("a.ram").display()
    );
    let (_qemu, mut q) = qemu_with(&[
        "memory-backend-memfd,id=mem0,size=256M,share=on",
        "memory-backend-memfd,id=mem1,size=64M,share=on",
        &file,
    ]);
    let mem = GuestMemory::open(&mut q).unwrap();
    assert_eq!(
        mem.layout(),
        vec![
            ("a-file".to_owned(), 32 * MIB),
            ("mem0".to_owned(), 256 * MIB),
            ("mem1".to_owned(), 64 * MIB)
        ]
    );
    // Global numbering: a-file first, then mem0.
    let first_mem0 = 32 * MIB / 4096;
    assert_eq!(mem.locate(first_mem0), Some((1, 0)));
    mem.write_page(first_mem0, &pattern(0x44)).unwrap();
    assert!(guest_bytes(&mut q, 0).ends_with("0x44 0x45 0x46 0x47"));
}

#[test]
fn same_size_memfds_are_ambiguous() {
    let (_qemu, mut q) = qemu_with(&[
        "memory-backend-memfd,id=mem0,size=256M,share=on",
        "memory-backend-memfd,id=mem1,size=256M,share=on",
    ]);
    let e = GuestMemory::open(&mut q).unwrap_err();
    assert!(
        matches!(e, MemoryError::AmbiguousMemfd { candidates: 2, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("mem0, mem1"), "{e}");
}

#[test]
fn plain_ram_is_not_shared() {
    let (_qemu, mut q) =
        connect(Vm::start_paused("qemu", &["-m", "256", "-machine", "q35"]).expect("QEMU starts"));
    let e = GuestMemory::open(&mut q).unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, MemoryError::NotShared { .. }), "{e:?}");
    assert!(e.to_string().contains("share=on"), "{e}");
}

#[test]
fn share_off_is_not_shared() {
    let (_qemu, mut q) = qemu_with(&["memory-backend-memfd,id=mem0,size=256M,share=off"]);
    let e = GuestMemory::open(&mut q).unwrap_err();
    assert!(
        matches!(e, MemoryError::NotShared { id: Some(ref id) } if id == "mem0"),
        "{e:?}"
    );
    assert!(e.to_string().contains("share=on"), "{e}");
}

#[test]
fn shared_anonymous_ram_is_unsupported() {
    let (_qemu, mut q) = qemu_with(&["memory-backend-ram,id=mem0,size=256M,share=on"]);
    let e = GuestMemory::open(&mut q).unwrap_err();
    assert!(
        matches!(e, MemoryError::UnsupportedBackend { ref backend, .. } if backend == "memory-backend-ram"),
        "{e:?}"
    );
}
