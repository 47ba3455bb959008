//! The commit (issue 14, item 1: never two VMs running). After `commit` the destination's `cont`
//! may fail or time out although QEMU ran it. The receiver then learns the destination's real
//! state before it answers: running means completed (never "abort", which would make the sender
//! resume the source: two VMs running); unknown stays unknown (exit 4 on both sides, the source
//! paused).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use livemig_lab::RamBackend;

use crate::harness::{self, Migration, Pair};
use crate::proxy::{Action, Dir, Proxy, Trigger};

/// A QMP proxy in front of a QEMU's monitor that swallows QEMU's reply to the first `cont` (QEMU
/// runs it; the client never hears so). Every client connection gets its own upstream one.
struct QmpProxy {
    path: PathBuf,
    swallowed: Arc<AtomicBool>,
}

impl QmpProxy {
    fn start(upstream: &Path, dir: &Path) -> QmpProxy {
        let path = dir.join("qmp-proxy.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let swallowed = Arc::new(AtomicBool::new(false));
        let (up, flag) = (upstream.to_path_buf(), Arc::clone(&swallowed));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = UnixStream::connect(&up) else { return };
                let (flag, drop_id) = (Arc::clone(&flag), Arc::new(std::sync::Mutex::new(None::<serde_json::Value>)));
                // client -> QEMU: note the id of the first `cont`.
                let (mut to_server, from_client) = (server.try_clone().unwrap(), client.try_clone().unwrap());
                let ids = Arc::clone(&drop_id);
                let f2 = Arc::clone(&flag);
                std::thread::spawn(move || {
                    for line in BufReader::new(from_client).lines() {
                        let Ok(line) = line else { break };
                        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                            if v["execute"] == "cont" && !f2.load(Ordering::SeqCst) {
                                *ids.lock().unwrap() = Some(v["id"].clone());
                            }
                        }
                        if writeln!(to_server, "{line}").is_err() {
                            break;
                        }
                    }
                    let _ = to_server.shutdown(std::net::Shutdown::Both);
                });
                // QEMU -> client: drop the reply with that id, once.
                std::thread::spawn(move || {
                    let mut to_client = client;
                    for line in BufReader::new(server).lines() {
                        let Ok(line) = line else { break };
                        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                        let mut id = drop_id.lock().unwrap();
                        if id.is_some() && v.get("return").is_some() && v.get("id") == id.as_ref() {
                            *id = None;
                            flag.store(true, Ordering::SeqCst);
                            continue;
                        }
                        drop(id);
                        if writeln!(to_client, "{line}").is_err() {
                            break;
                        }
                    }
                    let _ = to_client.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        QmpProxy { path, swallowed }
    }
}

/// QEMU runs the destination's `cont` but its reply is lost (the receiver's QMP timeout is 5 s).
/// The receiver asks the destination's state, finds it running and completes with a warning; the
/// sender completes; the source stays in `postmigrate`: one VM runs, the destination.
#[test]
fn lost_reply_to_the_destinations_cont_completes_and_the_source_stays_paused() {
    let _g = harness::vm_lock();
    let pair = Pair::start_custom(
        "commit-lost-reply",
        harness::dirty_guest(16, 4),
        |mut c| {
            c.backend = RamBackend::Anonymous;
            c
        },
        |mut d| {
            d.backend = RamBackend::Anonymous;
            d
        },
    );
    let qmp = QmpProxy::start(pair.dst.qmp_path(), &pair.dir);
    let proxy_path = qmp.path.display().to_string();
    // The sender allows the 5 s the receiver waits for the lost reply.
    let m = Migration::run(&pair, &["--engine", "stream", "--max-downtime", "10s"], &["--qmp", &proxy_path, "--timeout", "5s"]);
    assert!(qmp.swallowed.load(Ordering::SeqCst), "the reply to `cont` was swallowed");
    m.assert_completed();
    let warned = m.recv_report["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap_or("").contains("but the destination VM runs"));
    assert!(warned, "{:#}", m.recv_report);
    assert_eq!(pair.status_of_destination(), "running");
    assert_eq!(pair.status_of_source(), "postmigrate", "never two VMs running");
    pair.assert_destination_guest_verifies(2);
}

/// The destination QEMU is frozen (SIGSTOP) at the commit, before the receiver's `cont` (its QMP
/// timeout 5 s): `cont` times out, its state cannot be read, yet the process lives, so it may run
/// the guest once it thaws. The receiver says the state is unknown and sends no `abort`; both
/// sides exit 4; the source stays paused. (A destination QEMU that is gone is another case: the
/// source is resumed, `faults.rs` case 4.)
#[test]
fn frozen_destination_at_the_commit_is_unknown_and_the_source_stays_paused() {
    let _g = harness::vm_lock();
    let pair = Pair::start("commit-unknown", harness::dirty_guest(16, 4), |d| d);
    let pid = pair.dst.pid();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "kill {sig} {pid}");
    };
    let proxy = Proxy::new(
        Trigger::Control(Dir::FromSender, "commit"),
        Action::Before(Box::new(move || {
            let ok = std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status().map(|s| s.success()).unwrap_or(false);
            assert!(ok, "kill -STOP {pid}");
        })),
    );
    let m = Migration::between_via(&pair.src, &pair.dst, &pair.dir, "", &[], &["--timeout", "5s"], |a| proxy.forward_to(a), |_| {});
    signal("-CONT");
    assert!(proxy.fired().is_some(), "the commit went through the proxy");
    assert_eq!(m.recv_code, 4, "{}", m.recv_stderr);
    assert_eq!(m.recv_report["outcome"], "unknown", "{:#}", m.recv_report);
    assert!(m.recv_stderr.contains("state is unknown after the commit"), "{}", m.recv_stderr);
    assert!(m.recv_stderr.contains("the destination VM may run"), "{}", m.recv_stderr);
    assert_eq!(m.send_code, 4, "{}", m.send_stderr);
    assert_eq!(m.send_report["outcome"], "unknown", "{:#}", m.send_report);
    assert!(m.send_stderr.contains("the source VM stays paused"), "{}", m.send_stderr);
    assert_ne!(pair.status_of_source(), "running", "the source must not be resumed while the destination's state is unknown");
}

/// Issue 14, item 3: the source VM is paused when the migration begins and resumed (as an
/// operator or a management layer would) 2 s into iteration 0 (~11 s over 40 Mbit/s). `send`
/// stops it at the switchover all the same, so its final pass sees the last writes: the
/// migration completes, the destination guest's verifier finds no bad page, the source is in
/// `postmigrate`.
#[test]
fn source_paused_at_start_and_resumed_since_is_stopped_at_the_switchover() {
    let _g = harness::vm_lock();
    let pair = Pair::start("resumed-mid", harness::dirty_guest(16, 4), |d| d);
    let mut q = livemig_qmp::Qmp::connect(pair.src.qmp_path(), std::time::Duration::from_secs(10)).unwrap();
    q.stop().unwrap();
    drop(q);
    let observer = pair.src.observer_qmp_path();
    let m = Migration::run_with(&pair, &["--bandwidth", "40mbit", "--max-downtime", "1s"], &[], |r| {
        r.wait_send_progress("connecting to the receiver");
        std::thread::sleep(std::time::Duration::from_secs(2));
        let mut q = livemig_qmp::Qmp::connect(&observer, std::time::Duration::from_secs(10)).unwrap();
        q.cont().unwrap();
        assert!(q.query_status().unwrap().running, "the source guest runs again");
    });
    m.assert_completed();
    assert!(m.send_report["iterations"].as_array().unwrap().len() >= 2, "{:#}", m.send_report);
    assert_eq!(pair.status_of_source(), "postmigrate");
    assert_eq!(pair.status_of_destination(), "running");
    pair.assert_destination_guest_verifies(3);
}

/// The source VM resumed by someone else *during* the switchover (another QMP client's `cont`
/// when the sender's `switchover` passes the proxy: after livemig paused it and took its final
/// pass): its writes since would be missing on the destination. `send` sees QEMU's RESUME event
/// before the commit and stops: exit 1, the source runs, the destination is never resumed.
#[test]
fn source_resumed_during_the_switchover_stops_the_migration() {
    let _g = harness::vm_lock();
    let pair = Pair::start("resumed-switch", harness::dirty_guest(16, 4), |d| d);
    let observer = pair.src.observer_qmp_path();
    let proxy = Proxy::new(
        Trigger::Control(Dir::FromSender, "switchover"),
        Action::Before(Box::new(move || {
            let mut q = livemig_qmp::Qmp::connect(&observer, std::time::Duration::from_secs(10)).unwrap();
            q.cont().unwrap();
        })),
    );
    let m = Migration::between_via(&pair.src, &pair.dst, &pair.dir, "", &[], &[], |a| proxy.forward_to(a), |_| {});
    assert!(proxy.fired().is_some(), "the switchover went through the proxy");
    assert_eq!(m.send_code, 1, "{}", m.send_stderr);
    assert!(m.send_stderr.contains("the source VM was resumed during the switchover"), "{}", m.send_stderr);
    assert!(m.send_stderr.contains("the source VM keeps running"), "{}", m.send_stderr);
    assert_eq!(m.recv_code, 1, "{}", m.recv_stderr);
    assert!(m.recv_stderr.contains("the destination VM was not resumed"), "{}", m.recv_stderr);
    assert_eq!(pair.status_of_source(), "running");
    assert_ne!(pair.status_of_destination(), "running");
    pair.assert_source_guest_still_verifies(1);
}
