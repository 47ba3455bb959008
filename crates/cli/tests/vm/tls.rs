//! TLS between the agents (issue 6): TLS 1.3 with certificates or a PSK carries a migration; a
//! peer with the wrong CA or the wrong PSK is refused during the handshake, before any memory is
//! sent, and both VMs stay as they were; the receiver goes on waiting for the right sender
//! (issue 14 item 4: stray connections).

use std::path::{Path, PathBuf};
use std::io::Write;
use std::net::TcpStream;
use std::process::Command;

use crate::harness::{self, Migration, Pair};

/// `livemig certs DIR --host localhost`: a CA, the host's certificate and key, a PSK.
pub(crate) fn certs(dir: &Path) -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_livemig"))
        .args(["certs", "--host", "localhost"])
        .arg(dir)
        .output()
        .expect("run livemig certs");
    assert!(out.status.success(), "livemig certs failed: {}", String::from_utf8_lossy(&out.stderr));
    dir.to_path_buf()
}

pub(crate) fn cert_args(dir: &Path) -> Vec<String> {
    let f = |n: &str| dir.join(n).display().to_string();
    vec!["--tls-cert".into(), f("localhost.pem"), "--tls-key".into(), f("localhost-key.pem"), "--tls-ca".into(), f("ca.pem")]
}

pub(crate) fn psk_args(dir: &Path) -> Vec<String> {
    vec!["--psk-file".into(), dir.join("psk").display().to_string()]
}

pub(crate) fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn migrates_over_tls_with_certificates() {
    let _g = harness::vm_lock();
    let pair = Pair::start("tlscert", harness::dirty_guest(16, 5), |d| d);
    let dir = tempfile::tempdir().unwrap();
    let args = cert_args(&certs(dir.path()));
    let m = Migration::run(&pair, &strs(&args), &strs(&args));
    m.assert_completed();
    assert_eq!(m.send_report["transport"], "tls-certificates");
    assert_eq!(m.recv_report["transport"], "tls-certificates");
    assert!(m.send_report["peer"].as_str().unwrap().contains("localhost"), "{:#}", m.send_report);
    assert!(!m.send_stderr.contains("--insecure"), "no plain-TCP warning over TLS: {}", m.send_stderr);
    assert_tls_page_key(&m);
    pair.assert_destination_guest_verifies(2);
}

/// Issue 15: `send --connections 3` over TLS with certificates, each connection its own TLS
/// session checked as the first, the receiver decoding on 2 threads: the migration completes,
/// the keyed digests are equal, both reports say 3 connections, and the guest verifies its own
/// pages on the destination.
#[test]
fn migrates_over_three_tls_connections() {
    let _g = harness::vm_lock();
    let pair = Pair::start("tls3", harness::dirty_guest(16, 5), |d| d);
    let dir = tempfile::tempdir().unwrap();
    let args = cert_args(&certs(dir.path()));
    let mut send = strs(&args);
    send.extend(["--connections", "3"]);
    let mut recv = strs(&args);
    recv.extend(["--threads", "2"]);
    let m = Migration::run(&pair, &send, &recv);
    m.assert_completed();
    for r in [&m.send_report, &m.recv_report] {
        assert_eq!(r["connections"], 3, "{r:#}");
        assert_eq!(r["engine"], "shared", "{r:#}");
    }
    assert_eq!(m.recv_report["threads"], 2, "{:#}", m.recv_report);
    assert_eq!(m.recv_report["verification"]["ok"], true, "{:#}", m.recv_report);
    assert!(m.send_stderr.contains("opening 2 more connections"), "{}", m.send_stderr);
    assert!(m.recv_stderr.contains("waiting for the sender's 2 data connections"), "{}", m.recv_stderr);
    assert_tls_page_key(&m);
    pair.assert_destination_guest_verifies(2);
}

/// Over TLS both sides export the page key from the session: the reports say so and never
/// hold the key.
fn assert_tls_page_key(m: &Migration) {
    for r in [&m.send_report, &m.recv_report] {
        assert_eq!(r["page_key"], "tls-exporter", "{r:#}");
        assert!(r["page_key_hex"].is_null(), "a TLS session's key is never reported: {r:#}");
    }
    assert!(!m.send_stderr.contains("page key went in the clear"), "{}", m.send_stderr);
}

/// A `livemig send` of `pair`'s source to `addr` that the receiver refuses: exit 1 with a TLS
/// message, no page sent, the source runs.
fn refused_sender(pair: &Pair, addr: &str, tag: &str, args: &[String]) {
    let json = pair.dir.join(format!("{tag}-send.json"));
    let out = Command::new(env!("CARGO_BIN_EXE_livemig"))
        .args(["send", "--to", addr, "--timeout", "30s", "--engine", "shared", "--qmp"])
        .arg(pair.src.qmp_path())
        .arg("--report")
        .arg(&json)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run livemig send");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- {tag} send (exit {:?}):\n{stderr}", out.status.code());
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("TLS handshake"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let sent: u64 = report["pages"].as_object().map_or(0, |o| o.values().filter_map(|v| v.as_u64()).sum());
    assert_eq!(sent, 0, "pages were sent: {report:#}");
    assert_eq!(report["source_state"], "running", "{report:#}");
    assert_eq!(pair.status_of_source(), "running");
}

/// Issue 14 item 4: one receiver, and before the right sender a port scan, a garbage client, a
/// sender trusting another CA and a sender with a PSK instead of certificates. Each is refused,
/// logged and reported while the receiver keeps listening; the destination QEMU is not touched
/// by them (still `inmigrate`); the right sender then migrates; after it the port is closed.
#[test]
fn strangers_and_wrong_keys_are_refused_and_the_receiver_waits_for_the_right_sender() {
    let _g = harness::vm_lock();
    let pair = Pair::start("tlswrong", harness::dirty_guest(16, 5), |d| d);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (certs(a.path()), certs(b.path()));
    let right = cert_args(&a);
    let mut receiver_addr = String::new();
    let m = Migration::between_via(&pair.src, &pair.dst, &pair.dir, "", &strs(&right), &strs(&right), |addr| {
        receiver_addr = addr.to_string();
        // A port scan (until the receiver listens: every probe is one).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while TcpStream::connect(addr).is_err() {
            assert!(std::time::Instant::now() < deadline, "the receiver never listened");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // A garbage client.
        TcpStream::connect(addr).unwrap().write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        refused_sender(&pair, addr, "wrong-ca", &cert_args(&b));
        refused_sender(&pair, addr, "psk-for-certs", &psk_args(&a));
        assert_eq!(pair.observed_status_of_destination(), "inmigrate");
        addr.to_string()
    }, |_| {});
    m.assert_completed();
    assert_tls_page_key(&m);
    let refused = m.recv_report["refused_connections"].as_array().cloned().unwrap_or_default();
    let reasons: Vec<&str> = refused.iter().filter_map(|r| r["reason"].as_str()).collect();
    assert!(m.recv_report["refused_connections_total"].as_u64().unwrap_or(0) >= 4, "{:#}", m.recv_report);
    // Every one of them (probes, garbage, both wrong senders) failed the TLS handshake.
    assert!(reasons.len() >= 4 && reasons.iter().all(|r| r.contains("TLS handshake")), "{reasons:#?}");
    assert!(m.recv_stderr.contains("refused a connection from 127.0.0.1:"), "{}", m.recv_stderr);
    assert!(m.recv_stderr.contains("still waiting for the sender"), "{}", m.recv_stderr);
    assert_eq!(pair.status_of_source(), "postmigrate");
    pair.assert_destination_guest_verifies(2);
    // The receiver is gone and so is its port: nobody else gets in.
    assert!(TcpStream::connect(&receiver_addr).is_err());
}

/// A receiver whose key does not belong to its certificate refuses to start: nothing is
/// touched, the sender finds no one to talk to. Then the same VMs migrate with a PSK.
#[test]
fn a_receiver_with_a_mismatched_key_refuses_to_start_then_a_psk_migrates() {
    let _g = harness::vm_lock();
    let mut pair = Pair::start("tlsmismatch", harness::dirty_guest(8, 2), |d| d);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (certs(a.path()), certs(b.path()));
    let mut mismatched = cert_args(&a);
    mismatched[3] = b.join("localhost-key.pem").display().to_string();
    let mut send = cert_args(&a);
    send.extend(["--connect-timeout".to_string(), "3s".to_string()]);
    let m = Migration::run(&pair, &strs(&send), &strs(&mismatched));
    assert_eq!(m.recv_code, 1, "{}", m.recv_stderr);
    assert!(m.recv_stderr.contains("localhost-key.pem"), "the error names the key file: {}", m.recv_stderr);
    assert_eq!(m.send_code, 1, "{}", m.send_stderr);
    assert!(m.send_stderr.contains("cannot connect to the receiver"), "{}", m.send_stderr);
    assert_eq!(pair.status_of_source(), "running");
    assert_eq!(pair.status_of_destination(), "inmigrate");

    pair.restart_destination();
    let m = Migration::run(&pair, &strs(&psk_args(&a)), &strs(&psk_args(&a)));
    m.assert_completed();
    assert_eq!(m.send_report["transport"], "tls-psk");
    assert_tls_page_key(&m);
    assert_eq!(pair.status_of_source(), "postmigrate");
    pair.assert_destination_guest_verifies(2);
}
