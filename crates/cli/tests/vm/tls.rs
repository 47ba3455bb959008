//! TLS between the agents (issue 6): TLS 1.3 with certificates or a PSK carries a migration; a
//! peer with the wrong CA or the wrong PSK is refused during the handshake, before any memory is
//! sent, and both VMs stay as they were.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{self, Migration, Pair};

/// `livemig certs DIR --host localhost`: a CA, the host's certificate and key, a PSK.
fn certs(dir: &Path) -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_livemig"))
        .args(["certs", "--host", "localhost"])
        .arg(dir)
        .output()
        .expect("run livemig certs");
    assert!(out.status.success(), "livemig certs failed: {}", String::from_utf8_lossy(&out.stderr));
    dir.to_path_buf()
}

fn cert_args(dir: &Path) -> Vec<String> {
    let f = |n: &str| dir.join(n).display().to_string();
    vec!["--tls-cert".into(), f("localhost.pem"), "--tls-key".into(), f("localhost-key.pem"), "--tls-ca".into(), f("ca.pem")]
}

fn psk_args(dir: &Path) -> Vec<String> {
    vec!["--psk-file".into(), dir.join("psk").display().to_string()]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The migration was refused during the handshake: both exit 1 with a TLS message, no page went
/// anywhere, the source runs and the destination was not resumed.
fn assert_refused_before_memory(pair: &Pair, m: &Migration) {
    assert_eq!(m.send_code, 1, "{}", m.send_stderr);
    assert_eq!(m.recv_code, 1, "{}", m.recv_stderr);
    assert!(m.send_stderr.contains("TLS handshake"), "{}", m.send_stderr);
    assert!(m.recv_stderr.contains("TLS handshake"), "{}", m.recv_stderr);
    let sent: u64 = m.send_report["pages"].as_object().map_or(0, |o| o.values().filter_map(|v| v.as_u64()).sum());
    assert_eq!(sent, 0, "pages were sent: {:#}", m.send_report);
    assert!(m.send_report["iterations"].as_array().is_none_or(Vec::is_empty), "{:#}", m.send_report);
    assert_eq!(m.recv_report["wire_bytes"].as_u64().unwrap_or(0), 0, "{:#}", m.recv_report);
    assert_eq!(pair.status_of_source(), "running");
    assert_eq!(pair.status_of_destination(), "inmigrate");
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

/// Over TLS both sides export the page key from the session: the reports say so and never
/// hold the key.
fn assert_tls_page_key(m: &Migration) {
    for r in [&m.send_report, &m.recv_report] {
        assert_eq!(r["page_key"], "tls-exporter", "{r:#}");
        assert!(r["page_key_hex"].is_null(), "a TLS session's key is never reported: {r:#}");
    }
    assert!(!m.send_stderr.contains("page key went in the clear"), "{}", m.send_stderr);
}

#[test]
fn wrong_ca_psk_or_key_is_refused_before_any_memory_then_the_right_psk_migrates() {
    let _g = harness::vm_lock();
    let mut pair = Pair::start("tlswrong", harness::dirty_guest(16, 5), |d| d);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (certs(a.path()), certs(b.path()));
    // The sender trusts another CA than the one that signed the receiver's certificate.
    let m = Migration::run(&pair, &strs(&cert_args(&b)), &strs(&cert_args(&a)));
    assert_refused_before_memory(&pair, &m);
    pair.assert_source_guest_still_verifies(1);

    pair.restart_destination();
    let m = Migration::run(&pair, &strs(&psk_args(&b)), &strs(&psk_args(&a)));
    assert_refused_before_memory(&pair, &m);

    // A receiver whose key does not belong to its certificate refuses to start: nothing is
    // touched, the sender finds no one to talk to.
    let mut mismatched = cert_args(&a);
    mismatched[3] = b.join("localhost-key.pem").display().to_string();
    let mut send = cert_args(&a);
    send.extend(["--connect-timeout".to_string(), "3s".to_string()]);
    let send = strs(&send);
    let m = Migration::run(&pair, &send, &strs(&mismatched));
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
