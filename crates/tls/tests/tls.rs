//! Real TCP on 127.0.0.1: handshakes, refusals on both sides, full-duplex transfer through the
//! split halves, and a peer going away. Socket timeouts only guard against hangs.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use livemig_tls::{
    accept, connect, generate_psk, make_certs, psk_file_text, Auth, Session, TlsError, TlsSetup, CA_FILE, PSK_FILE,
    PSK_PREFIX,
};

/// Only a guard: a bug fails the test instead of hanging it.
const GUARD: Duration = Duration::from_secs(30);

fn certs(dir: &Path, host: &str) -> Auth {
    Auth::Certs {
        cert: dir.join(format!("{host}.pem")),
        key: dir.join(format!("{host}-key.pem")),
        ca: dir.join(CA_FILE),
    }
}

fn load(auth: &Auth) -> TlsSetup {
    TlsSetup::load(auth).expect("load TLS setup")
}

/// Runs a handshake over a fresh loopback connection; returns (server, client) results and a
/// raw clone of the server's socket.
fn pair(
    server: &TlsSetup,
    client: &TlsSetup,
    name: &str,
) -> (Result<Session, TlsError>, Result<Session, TlsError>, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = server.clone();
    let t = thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(GUARD)).expect("timeout");
        s.set_write_timeout(Some(GUARD)).expect("timeout");
        let raw = s.try_clone().expect("clone");
        (accept(&server, s), raw)
    });
    let c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(GUARD)).expect("timeout");
    c.set_write_timeout(Some(GUARD)).expect("timeout");
    let client = connect(client, c, name);
    let (server, raw) = t.join().expect("server thread");
    (server, client, raw)
}

fn ok_pair(server: &TlsSetup, client: &TlsSetup, name: &str) -> (Session, Session, TcpStream) {
    let (s, c, raw) = pair(server, client, name);
    (s.expect("server session"), c.expect("client session"), raw)
}

fn assert_refused(server: Result<Session, TlsError>, client: Result<Session, TlsError>) {
    let s = server.expect_err("the server must refuse");
    let c = client.expect_err("the client must refuse");
    assert!(matches!(s, TlsError::Handshake { .. }), "server: {s}");
    assert!(matches!(c, TlsError::Handshake { .. }), "client: {c}");
    // Not a hang that ended in a guard timeout.
    for e in [&s, &c] {
        let TlsError::Handshake { source, .. } = e else { unreachable!() };
        assert!(!matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "timed out: {e:?}");
    }
}

/// Sends a message each way and checks it arrives.
fn exchange(server: Session, client: Session) {
    let (mut sr, mut sw) = server.split();
    let (mut cr, mut cw) = client.split();
    cw.write_all(b"hello from the client").expect("client write");
    cw.flush().expect("flush");
    let mut buf = [0u8; 21];
    sr.read_exact(&mut buf).expect("server read");
    assert_eq!(&buf, b"hello from the client");
    sw.write_all(b"hello from the server").expect("server write");
    sw.flush().expect("flush");
    cr.read_exact(&mut buf).expect("client read");
    assert_eq!(&buf, b"hello from the server");
}

fn two_hosts() -> (tempfile::TempDir, TlsSetup, TlsSetup) {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path(), &["alpha".into(), "beta".into()]).expect("make_certs");
    let a = load(&certs(dir.path(), "alpha"));
    let b = load(&certs(dir.path(), "beta"));
    (dir, a, b)
}

#[test]
fn make_certs_makes_the_files_with_private_keys_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let made = make_certs(dir.path(), &["alpha".into(), "10.1.2.3".into()]).expect("make_certs");
    let names: Vec<String> = made.iter().map(|p| p.file_name().expect("name").to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["ca.pem", "alpha.pem", "alpha-key.pem", "10.1.2.3.pem", "10.1.2.3-key.pem", "psk"]);
    for p in &made {
        let mode = std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        let secret = p.ends_with("psk") || p.to_string_lossy().ends_with("-key.pem");
        assert_eq!(mode, if secret { 0o600 } else { 0o644 }, "{}", p.display());
    }
    let psk = std::fs::read_to_string(dir.path().join(PSK_FILE)).expect("psk");
    let hex = psk.strip_prefix("livemig-psk-v1:").and_then(|r| r.strip_suffix('\n')).expect(&psk);
    assert!(hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{psk}");
    // Never overwrites.
    let e = make_certs(dir.path(), &["alpha".into()]).expect_err("refuses to overwrite");
    assert!(e.to_string().contains("ca.pem"), "{e}");
    let e = make_certs(dir.path(), &["../x".into()]).expect_err("bad host");
    assert!(matches!(e, TlsError::BadHost { .. }), "{e}");
}

#[test]
fn certs_mutual_auth_works_and_data_flows() {
    let (_dir, alpha, beta) = two_hosts();
    for name in ["beta", "localhost", "127.0.0.1", "[::1]"] {
        let (s, c, _raw) = ok_pair(&beta, &alpha, name);
        assert!(s.peer().contains("CN=alpha"), "server sees {}", s.peer());
        assert!(c.peer().contains("CN=beta") && c.peer().contains("127.0.0.1"), "client sees {}", c.peer());
        exchange(s, c);
    }
}

#[test]
fn certs_wrong_server_name_is_refused_on_both_sides() {
    let (_dir, alpha, beta) = two_hosts();
    let (s, c, _raw) = pair(&beta, &alpha, "gamma");
    assert_refused(s, c);
    let (s, c, _raw) = pair(&beta, &alpha, "10.9.9.9");
    assert_refused(s, c);
}

#[test]
fn client_trusting_another_ca_is_refused_on_both_sides() {
    let (_dir, _alpha, beta) = two_hosts();
    let other = tempfile::tempdir().expect("tempdir");
    make_certs(other.path(), &["alpha".into()]).expect("make_certs");
    let stranger = load(&certs(other.path(), "alpha"));
    let (s, c, _raw) = pair(&beta, &stranger, "beta");
    assert_refused(s, c);
}

#[test]
fn server_refuses_a_client_cert_from_another_ca() {
    let (dir, _alpha, beta) = two_hosts();
    let other = tempfile::tempdir().expect("tempdir");
    make_certs(other.path(), &["alpha".into()]).expect("make_certs");
    // The client trusts both CAs (so it accepts the server) but its certificate is from the other.
    let bundle = other.path().join("both-ca.pem");
    let mut both = std::fs::read(dir.path().join(CA_FILE)).expect("ca");
    both.extend(std::fs::read(other.path().join(CA_FILE)).expect("ca"));
    std::fs::write(&bundle, both).expect("write");
    let client = load(&Auth::Certs {
        cert: other.path().join("alpha.pem"),
        key: other.path().join("alpha-key.pem"),
        ca: bundle,
    });
    let (s, c, _raw) = pair(&beta, &client, "beta");
    let se = s.expect_err("server refuses");
    assert!(se.to_string().contains("handshake"), "{se}");
    let ce = c.expect_err("client learns of the refusal in connect");
    assert!(matches!(ce, TlsError::Handshake { during_confirm: true, .. }), "{ce:?}");
    let TlsError::Handshake { source, .. } = &ce else { unreachable!() };
    assert!(!matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "timed out: {ce:?}");
}

fn psk_setup(path: &Path) -> TlsSetup {
    load(&Auth::Psk { file: path.to_owned() })
}

#[test]
fn psk_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path(), &["a".into()]).expect("make_certs");
    let psk = dir.path().join(PSK_FILE);
    // Two independent loads (as on two hosts) of the same file.
    let (s, c, _raw) = ok_pair(&psk_setup(&psk), &psk_setup(&psk), "whatever.example");
    assert_eq!(s.peer(), "psk peer");
    assert_eq!(c.peer(), "psk peer");
    exchange(s, c);
}

#[test]
fn wrong_psk_is_refused_on_both_sides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    let key: [u8; 32] = std::array::from_fn(|i| u8::try_from(i * 7 + 1).expect("small"));
    std::fs::write(&one, psk_file_text(&key)).expect("write");
    let mut other = key;
    other[31] ^= 1;
    std::fs::write(&two, psk_file_text(&other)).expect("write");
    let (s, c, _raw) = pair(&psk_setup(&one), &psk_setup(&two), "host");
    assert_refused(s, c);
    let (s, c, _raw) = pair(&psk_setup(&two), &psk_setup(&one), "host");
    assert_refused(s, c);
}

#[test]
fn a_certificate_peer_cannot_talk_to_a_psk_peer() {
    let (dir, alpha, beta) = two_hosts();
    let psk = psk_setup(&dir.path().join(PSK_FILE));
    let (s, c, _raw) = pair(&psk, &alpha, "localhost");
    assert_refused(s, c);
    let (s, c, _raw) = pair(&beta, &psk, "localhost");
    assert_refused(s, c);
}

/// Two sides that each read the same key, written by the certs code (twice, as on two hosts
/// given a copy), with or without its newline, agree; a fresh key is another identity.
#[test]
fn a_key_written_by_the_certs_code_is_accepted_and_both_sides_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = generate_psk().expect("generate");
    assert!(text.starts_with(PSK_PREFIX) && text.ends_with('\n') && text.len() == PSK_PREFIX.len() + 65, "{text}");
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    std::fs::write(&a, &text).expect("write");
    std::fs::write(&b, text.trim_end()).expect("write");
    let (s, c, _raw) = ok_pair(&psk_setup(&a), &psk_setup(&b), "host");
    exchange(s, c);
    let other = dir.path().join("other");
    std::fs::write(&other, generate_psk().expect("generate")).expect("write");
    let (s, c, _raw) = pair(&psk_setup(&a), &psk_setup(&other), "host");
    assert_refused(s, c);
}

/// A passphrase, or any file that is not a key as `livemig certs` writes it, is refused with an
/// error that names the file and says how to make a proper key.
#[test]
fn a_psk_that_is_not_a_livemig_key_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = psk_file_text(&std::array::from_fn(|i| u8::try_from(i * 7 + 5).expect("small")));
    let hex = good.trim_end().strip_prefix(PSK_PREFIX).expect("prefix").to_string();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("password", b"password123".to_vec(), "does not start with `livemig-psk-v1:`"),
        ("long-passphrase", b"correct horse battery staple, a long passphrase\n".to_vec(), "does not start with"),
        ("old-raw", (0u8..32).map(|i| i.wrapping_mul(151) | 0x80).collect(), "32 raw bytes"),
        ("short", format!("{PSK_PREFIX}{}\n", &hex[..62]).into_bytes(), "64 lowercase hex digits"),
        ("long", format!("{PSK_PREFIX}{hex}00\n").into_bytes(), "64 lowercase hex digits"),
        ("upper", format!("{PSK_PREFIX}{}\n", hex.to_uppercase()).into_bytes(), "64 lowercase hex digits"),
        ("two-lines", format!("{good}\n").into_bytes(), "64 lowercase hex digits"),
        ("spaces", format!(" {good}").into_bytes(), "does not start with"),
        ("zeros", format!("{PSK_PREFIX}{}\n", "0".repeat(64)).into_bytes(), "not random"),
        ("pattern", format!("{PSK_PREFIX}{}\n", "0123456789abcdef".repeat(4)).into_bytes(), "not random"),
        ("empty", Vec::new(), "does not start with"),
    ];
    for (name, content, why) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, &content).expect("write");
        let e = TlsSetup::load(&Auth::Psk { file: p.clone() }).expect_err(name);
        assert!(matches!(e, TlsError::PskFormat { .. }), "{name}: {e:?}");
        let text = e.to_string();
        assert!(text.contains(&format!("the PSK file {} is not a livemig key", p.display())), "{name}: {text}");
        assert!(text.contains(why), "{name}: {text}");
        assert!(text.contains("guessed offline") && text.contains("livemig certs DIR"), "{name}: {text}");
    }
    // The same key written right loads, with "\r\n" too.
    let p = dir.path().join("good");
    std::fs::write(&p, good.replace('\n', "\r\n")).expect("write");
    TlsSetup::load(&Auth::Psk { file: p }).expect("a well-formed key");
}

fn load_err(auth: Auth) -> TlsError {
    TlsSetup::load(&auth).expect_err("must fail")
}

#[test]
fn bad_files_give_errors_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path(), &["alpha".into(), "beta".into()]).expect("make_certs");
    let p = |n: &str| -> PathBuf { dir.path().join(n) };
    let garbage = p("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").expect("write");
    let broken = p("broken.pem");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n").expect("write");
    let names = |e: &TlsError, f: &Path| {
        let msg = e.to_string();
        assert!(msg.contains(&f.display().to_string()), "{msg:?} does not name {}", f.display());
    };

    let missing = p("missing.pem");
    let e = load_err(Auth::Certs { cert: missing.clone(), key: p("alpha-key.pem"), ca: p(CA_FILE) });
    assert!(matches!(e, TlsError::Read { .. }), "{e:?}");
    names(&e, &missing);
    let e = load_err(Auth::Psk { file: missing.clone() });
    names(&e, &missing);

    let e = load_err(Auth::Certs { cert: garbage.clone(), key: p("alpha-key.pem"), ca: p(CA_FILE) });
    assert!(matches!(e, TlsError::Missing { .. }), "{e:?}");
    names(&e, &garbage);
    let e = load_err(Auth::Certs { cert: broken.clone(), key: p("alpha-key.pem"), ca: p(CA_FILE) });
    assert!(matches!(e, TlsError::Pem { .. }), "{e:?}");
    names(&e, &broken);
    let e = load_err(Auth::Certs { cert: p("alpha.pem"), key: garbage.clone(), ca: p(CA_FILE) });
    names(&e, &garbage);
    // A certificate where the key should be.
    let e = load_err(Auth::Certs { cert: p("alpha.pem"), key: p("alpha.pem"), ca: p(CA_FILE) });
    assert!(e.to_string().contains("private key"), "{e}");
    names(&e, &p("alpha.pem"));
    let e = load_err(Auth::Certs { cert: p("alpha.pem"), key: p("alpha-key.pem"), ca: garbage.clone() });
    names(&e, &garbage);
    // The key of another certificate.
    let e = load_err(Auth::Certs { cert: p("alpha.pem"), key: p("beta-key.pem"), ca: p(CA_FILE) });
    assert!(matches!(e, TlsError::BadKey { .. }), "{e:?}");
    names(&e, &p("beta-key.pem"));
    // A certificate not under the CA given.
    let other = tempfile::tempdir().expect("tempdir");
    make_certs(other.path(), &["alpha".into()]).expect("make_certs");
    let other_ca = other.path().join(CA_FILE);
    let e = load_err(Auth::Certs { cert: p("alpha.pem"), key: p("alpha-key.pem"), ca: other_ca.clone() });
    assert!(matches!(e, TlsError::NotUnderCa { .. }), "{e:?}");
    names(&e, &other_ca);
}

/// Deterministic test data.
fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// Writes `frames` frames of `size` bytes, returns their hash.
fn send(w: &mut dyn Write, seed: u64, frames: usize, size: usize) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; size];
    for i in 0..frames {
        fill(seed.wrapping_add(i as u64), &mut buf);
        h.update(&buf);
        w.write_all(&buf).expect("write");
    }
    w.flush().expect("flush");
    h.finalize()
}

/// Reads exactly `total` bytes (in reads of whatever size), returns their hash.
fn receive(r: &mut dyn Read, total: usize) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 100_000];
    let mut got = 0;
    while got < total {
        let want = buf.len().min(total - got);
        let n = r.read(&mut buf[..want]).expect("read");
        assert!(n > 0, "EOF after {got} of {total} bytes");
        h.update(&buf[..n]);
        got += n;
    }
    h.finalize()
}

fn full_duplex(setup_s: &TlsSetup, setup_c: &TlsSetup, big: usize, small_frames: usize, both_big: bool) {
    const MIB: usize = 1 << 20;
    let (s, c, _raw) = ok_pair(setup_s, setup_c, "localhost");
    let (mut sr, mut sw) = s.split();
    let (mut cr, mut cw) = c.split();
    // Client -> server: `big` MiB in 1 MiB writes. Server -> client: small messages (or as much).
    let (back_frames, back_size) = if both_big { (big, MIB) } else { (small_frames, 100) };
    let client_sender = thread::spawn(move || send(&mut *cw, 1, big, MIB));
    let server_receiver = thread::spawn(move || receive(&mut *sr, big * MIB));
    let server_sender = thread::spawn(move || send(&mut *sw, 99, back_frames, back_size));
    let back = receive(&mut *cr, back_frames * back_size);
    assert_eq!(client_sender.join().expect("join"), server_receiver.join().expect("join"), "client->server data");
    assert_eq!(server_sender.join().expect("join"), back, "server->client data");
}

#[test]
fn concurrent_full_duplex_transfer_through_split_halves() {
    let (_dir, alpha, beta) = two_hosts();
    full_duplex(&beta, &alpha, 64, 2000, false);
}

#[test]
fn both_directions_streaming_at_once_do_not_deadlock() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path(), &["h".into()]).expect("make_certs");
    let psk = psk_setup(&dir.path().join(PSK_FILE));
    full_duplex(&psk, &psk, 24, 0, true);
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

#[test]
fn peer_closing_mid_stream_gives_eof_or_error_not_a_hang() {
    let (_dir, alpha, beta) = two_hosts();
    let (s, c, raw) = ok_pair(&beta, &alpha, "localhost");
    let (mut sr, sw) = s.split();
    let (mut cr, mut cw) = c.split();
    // The client streams; the server reads a little and then drops its session.
    let writer = thread::spawn(move || {
        let buf = vec![7u8; 1 << 20];
        for _ in 0..100_000 {
            if let Err(e) = cw.write_all(&buf) {
                return e;
            }
        }
        panic!("writes kept succeeding after the peer closed");
    });
    let mut buf = vec![0u8; 1 << 20];
    sr.read_exact(&mut buf).expect("first MiB");
    drop(sr);
    drop(sw);
    drop(raw);
    let e = writer.join().expect("join");
    assert!(!is_timeout(&e), "the writer timed out instead of failing: {e}");
    // The client's reader sees the close_notify (a clean EOF) or, as the server closed with
    // unread data, the connection reset: either way it ends, and stays ended.
    let mut one = [0u8; 1];
    for _ in 0..2 {
        match cr.read(&mut one) {
            Ok(n) => assert_eq!(n, 0),
            Err(e) => assert!(!is_timeout(&e), "the reader timed out instead of ending: {e}"),
        }
    }
}

#[test]
fn peer_dropping_its_session_gives_a_clean_eof() {
    let (_dir, alpha, beta) = two_hosts();
    let (s, c, raw) = ok_pair(&beta, &alpha, "localhost");
    drop(raw);
    let (mut cr, _cw) = c.split();
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 64];
        let n = cr.read(&mut buf)?;
        let again = cr.read(&mut buf)?;
        Ok::<_, io::Error>((n, again))
    });
    let (sr, mut sw) = s.split();
    drop(sr);
    sw.write_all(b"last words").expect("write");
    drop(sw);
    let (n, again) = reader.join().expect("join").expect("no error");
    assert_eq!(n, 10, "the data first");
    assert_eq!(again, 0, "then the close_notify: a clean EOF");
}

#[test]
fn connection_cut_without_close_notify_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path(), &["h".into()]).expect("make_certs");
    let psk = psk_setup(&dir.path().join(PSK_FILE));
    let (s, c, raw) = ok_pair(&psk, &psk, "localhost");
    let (cr, mut cw) = c.split();
    let (mut sr, _sw) = s.split();
    // The client's reader is blocked in read when the server's socket is cut.
    let reader = thread::spawn(move || {
        let mut cr = cr;
        let mut buf = [0u8; 64];
        cr.read(&mut buf)
    });
    cw.write_all(b"ping").expect("write");
    cw.flush().expect("flush");
    let mut ping = [0u8; 4];
    sr.read_exact(&mut ping).expect("ping");
    raw.shutdown(std::net::Shutdown::Both).expect("shutdown");
    let r = reader.join().expect("join");
    let e = r.expect_err("a cut connection is an error, not a clean EOF");
    assert!(!is_timeout(&e), "the reader timed out instead of failing: {e}");
    // And the server's own reader, with its socket shut, ends too.
    let mut b = [0u8; 1];
    match sr.read(&mut b) {
        Ok(n) => assert_eq!(n, 0),
        Err(e) => assert!(!is_timeout(&e), "{e}"),
    }
}

#[test]
fn a_silent_or_non_tls_peer_fails_the_handshake_without_a_hang() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path(), &["h".into()]).expect("make_certs");
    let setup = psk_setup(&dir.path().join(PSK_FILE));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    // A peer that says nothing: the caller's read timeout ends the handshake with an error.
    let silent = TcpStream::connect(addr).expect("connect");
    let (s, _) = listener.accept().expect("accept");
    s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let e = accept(&setup, s).expect_err("timeout");
    assert!(matches!(e, TlsError::Handshake { .. }), "{e:?}");
    drop(silent);
    // A peer speaking something else (HTTP): refused on the spot.
    let mut http = TcpStream::connect(addr).expect("connect");
    let (s, _) = listener.accept().expect("accept");
    s.set_read_timeout(Some(GUARD)).expect("timeout");
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let e = accept(&setup, s).expect_err("not TLS");
    let TlsError::Handshake { source, .. } = &e else { panic!("{e:?}") };
    assert!(!is_timeout(source), "{e}");
    // A client facing a server that is not TLS.
    let t = thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
        s
    });
    let c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(GUARD)).expect("timeout");
    let e = connect(&setup, c, "h").expect_err("not TLS");
    let TlsError::Handshake { source, .. } = &e else { panic!("{e:?}") };
    assert!(!is_timeout(source), "{e}");
    drop(t.join());
}
