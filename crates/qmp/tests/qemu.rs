//! Integration tests against a real `qemu-system-x86_64` (TCG, paused with -S, no guest code).

use std::time::Duration;

use livemig_lab::Vm;
use livemig_qmp::{Qmp, QmpError};

/// Longest wait for QEMU.
const T: Duration = Duration::from_secs(10);

/// A QEMU running no guest code, killed and reaped when dropped.
fn start(args: &[&str]) -> Vm {
    Vm::start_paused("qemu", args).expect("QEMU starts")
}

const MEMFD_ARGS: &[&str] = &[
    "-m",
    "256",
    "-machine",
    "q35,memory-backend=mem0",
    "-object",
    "memory-backend-memfd,id=mem0,size=256M,share=on",
];

#[test]
fn real_qemu_status_memdev_stop_cont_quit() {
    let mut qemu = start(MEMFD_ARGS);
    let mut q = Qmp::connect(qemu.qmp_path(), T).expect("QMP connects");
    // The greeting names the version of the binary that runs (whichever QEMU the lab starts).
    let out = std::process::Command::new(livemig_lab::default_qemu()).arg("--version").output().expect("qemu --version");
    let text = String::from_utf8_lossy(&out.stdout);
    let v = &q.greeting()["version"]["qemu"];
    let dotted = format!("version {}.{}.{}", v["major"], v["minor"], v["micro"]);
    assert!(text.contains(&dotted), "greeting {v} vs `{}`", text.lines().next().unwrap_or(""));
    assert_eq!(q.peer_pid().unwrap(), qemu.pid());

    let st = q.query_status().unwrap();
    assert_eq!(st.status, "prelaunch");
    assert!(!st.running);

    let mem = q.query_memdev().unwrap();
    assert_eq!(mem.len(), 1);
    assert_eq!(mem[0].id.as_deref(), Some("mem0"));
    assert_eq!(mem[0].size, 256 << 20);
    assert!(mem[0].share);
    assert_eq!(
        q.qom_get("/objects/mem0", "type").unwrap(),
        "memory-backend-memfd"
    );

    q.cont().unwrap();
    let ev = q.wait_event("RESUME", T).unwrap();
    assert!(ev.timestamp.0 > 0);
    assert!(q.query_status().unwrap().running);
    q.stop().unwrap();
    q.wait_event("STOP", T).unwrap();
    let st = q.query_status().unwrap();
    assert_eq!(st.status, "paused");
    assert!(!st.running);

    let mig = q.query_migrate().unwrap();
    assert!(
        mig.status.is_none() || mig.status.as_deref() == Some("none"),
        "{mig:?}"
    );
    q.migrate_set_capabilities(&[("x-ignore-shared", true)])
        .unwrap();
    q.migrate_set_parameters(serde_json::json!({"downtime-limit": 500}))
        .unwrap();

    q.quit().unwrap();
    assert!(qemu.wait_exit(T).is_some(), "QEMU did not exit after quit");
    // The connection is gone now.
    let e = q.query_status().unwrap_err();
    assert!(matches!(e, QmpError::Closed | QmpError::Io(_)), "{e:?}");
}

#[test]
fn real_qemu_unknown_command_and_bad_arguments() {
    let qemu = start(MEMFD_ARGS);
    let mut q = Qmp::connect(qemu.qmp_path(), T).expect("QMP connects");
    match q.execute("no-such-command", None).unwrap_err() {
        QmpError::Command { class, desc, .. } => {
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        e => panic!("unexpected {e:?}"),
    }
    let e = q.qom_get("/objects/nope", "type").unwrap_err();
    assert!(matches!(e, QmpError::Command { .. }), "{e:?}");
    assert!(e.to_string().starts_with("QEMU refused `qom-get`: "), "{e}");
    // The connection is still usable after errors.
    assert_eq!(q.query_status().unwrap().status, "prelaunch");
}

#[test]
fn real_qemu_migration_to_file_completes() {
    // Migration of a paused VM into a file: exercises migrate + wait_migration end to end.
    let qemu = start(MEMFD_ARGS);
    let mut q = Qmp::connect(qemu.qmp_path(), T).expect("QMP connects");
    q.migrate_set_capabilities(&[("x-ignore-shared", true)])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("state");
    q.migrate(&format!("exec:cat > {}", out.display())).unwrap();
    let info = q.wait_migration(Duration::from_secs(30)).unwrap();
    assert_eq!(info.status.as_deref(), Some("completed"), "{info:?}");
    let len = std::fs::metadata(&out).unwrap().len();
    // x-ignore-shared: the 256 MiB of shared RAM are not in the stream.
    assert!(len < 16 << 20, "stream is {len} bytes");
    assert!(info.total_time.is_some());
}
