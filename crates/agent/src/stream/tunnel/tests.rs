//! The tunnel without VMs: who may talk to whom, the source socket, and whole migrations of
//! hand-built QEMU streams between a fake source QEMU and a fake destination QEMU.

use super::*;
use livemig_wire::PROTOCOL_VERSION;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;

const T: Duration = Duration::from_secs(20);

fn hello(engine: &str) -> Message {
    Message::Hello {
        version: PROTOCOL_VERSION,
        min_version: STREAM_PROTOCOL_VERSION,
        software: "livemig test".into(),
        page_size: 4096,
        regions: Vec::new(),
        vm: None,
        disks: Vec::new(),
        engine: engine.into(),
    }
}

#[test]
fn each_receiver_takes_its_own_senders_only() {
    assert_eq!(receive_refuses(&hello(ENGINE_SHARED)), None);
    assert_eq!(receive_refuses(&hello(ENGINE_STREAM)), None);
    let r = receive_refuses(&hello(ENGINE_TUNNEL)).expect("a tunnel sender is refused by `livemig receive`");
    assert!(r.contains("`livemig tunnel send`") && r.contains("livemig tunnel receive --connect-unix"), "{r}");
    let r = receive_refuses(&hello("warp")).expect("an unknown engine is refused");
    assert!(r.contains("engine `warp`") && r.contains("does not know"), "{r}");

    assert_eq!(tunnel_refuses(&hello(ENGINE_TUNNEL)), None);
    for e in [ENGINE_SHARED, ENGINE_STREAM] {
        let r = tunnel_refuses(&hello(e)).expect("a `livemig send` is refused by a tunnel receiver");
        assert!(r.contains("`livemig send`") && r.contains("livemig receive --qmp"), "{r}");
    }
    assert!(tunnel_refuses(&hello("warp")).unwrap().contains("engine `warp`"));
    assert!(tunnel_refuses(&Message::Commit).unwrap().contains("hello"));
}

/// An observer that hands the listening address over and keeps the phases.
struct Catch {
    addr: Option<crossbeam_channel::Sender<SocketAddr>>,
    phases: Arc<Mutex<Vec<String>>>,
}

impl Catch {
    fn new() -> (Catch, crossbeam_channel::Receiver<SocketAddr>, Arc<Mutex<Vec<String>>>) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let phases = Arc::new(Mutex::new(Vec::new()));
        (Catch { addr: Some(tx), phases: Arc::clone(&phases) }, rx, phases)
    }
}

impl Observer for Catch {
    fn progress(&mut self, p: Progress<'_>) {
        match p {
            Progress::Listening(a) => {
                if let Some(tx) = self.addr.take() {
                    let _ = tx.send(a);
                }
            }
            Progress::Phase(s) => self.phases.lock().unwrap().push(s.to_string()),
            _ => {}
        }
    }
}

fn private_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("livemig-tunnel-test-").tempdir().unwrap()
}

type Outcome = (Report, Result<(), AgentError>);

fn start_tunnel_receive(dst: PathBuf) -> (String, std::thread::JoinHandle<Outcome>) {
    let mut o = TunnelReceiveOptions::new("127.0.0.1:0".into(), dst);
    o.timeout = T;
    o.accept_timeout = T;
    let (mut obs, addr, _) = Catch::new();
    let h = std::thread::spawn(move || tunnel_receive(&o, &mut obs));
    let addr = addr.recv_timeout(T).expect("the tunnel receiver listens");
    (addr.to_string(), h)
}

fn start_tunnel_send(src: PathBuf, to: String) -> std::thread::JoinHandle<Outcome> {
    start_tunnel_send_over(src, to, 1)
}

fn start_tunnel_send_over(src: PathBuf, to: String, connections: u32) -> std::thread::JoinHandle<Outcome> {
    let mut o = TunnelSendOptions::new(src, to);
    o.connections = connections;
    o.timeout = T;
    o.connect_timeout = T;
    o.accept_timeout = T;
    std::thread::spawn(move || {
        let (mut obs, _, _) = Catch::new();
        tunnel_send(&o, &mut obs)
    })
}

/// A `livemig send` (stream engine) at a tunnel receiver: refused in the handshake with a reason
/// that names the command to run; the receiver never touches its QEMU socket.
#[test]
fn a_tunnel_receiver_refuses_livemig_send() {
    let dir = private_dir();
    let (addr, h) = start_tunnel_receive(dir.path().join("dst.sock"));
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    livemig_wire::write_magic(&mut s).unwrap();
    livemig_wire::write_message(&mut s, &hello(ENGINE_STREAM)).unwrap();
    match livemig_wire::read_message(&mut s).unwrap() {
        Message::Abort { reason } => assert!(reason.contains("livemig receive --qmp"), "{reason}"),
        other => panic!("expected an abort, got {other:?}"),
    }
    let (report, r) = h.join().unwrap();
    let e = r.unwrap_err();
    assert!(matches!(e, AgentError::Incompatible(_)) && e.to_string().contains("`livemig send`"), "{e}");
    assert_eq!(report.outcome, "failed");
    assert_eq!(report.role, ROLE_RECEIVE);
    assert!(report.stream.is_none(), "no QEMU was connected");
}

/// A QMP server that says it is a QEMU 10.0.2 waiting for an incoming migration and answers
/// every other command with an empty return.
fn fake_destination_qmp(path: &Path) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        while let Ok((c, _)) = l.accept() {
            let mut w = c.try_clone().unwrap();
            let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}"#;
            if writeln!(w, "{greeting}").is_err() {
                continue;
            }
            for line in BufReader::new(c).lines() {
                let Ok(line) = line else { break };
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let ret = if v["execute"] == "query-status" {
                    serde_json::json!({"status": "inmigrate", "running": false})
                } else {
                    serde_json::json!({})
                };
                if writeln!(w, "{}", serde_json::json!({"return": ret, "id": v["id"]})).is_err() {
                    break;
                }
            }
            return;
        }
    })
}

/// `livemig tunnel send` at a `livemig receive`: refused in the handshake, before any QEMU
/// connects; both say why; the tunnel's socket is gone afterwards.
#[test]
fn livemig_receive_refuses_a_tunnel_sender() {
    let dir = private_dir();
    let qmp = dir.path().join("qmp.sock");
    let _qemu = fake_destination_qmp(&qmp);
    let mut ro = ReceiveOptions::new("127.0.0.1:0".into(), qmp);
    ro.timeout = T;
    ro.accept_timeout = T;
    let (mut obs, addr, _) = Catch::new();
    let recv = std::thread::spawn(move || crate::receive::receive(&ro, &mut obs));
    let addr = addr.recv_timeout(T).expect("receive listens").to_string();
    let src = dir.path().join("src.sock");
    let (report, r) = start_tunnel_send(src.clone(), addr).join().unwrap();
    let e = r.unwrap_err();
    let text = e.chain();
    assert!(matches!(e, AgentError::PeerAborted { peer: "destination", .. }), "{text}");
    assert!(text.contains("this is `livemig receive`") && text.contains("livemig tunnel receive"), "{text}");
    assert_eq!(report.outcome, "failed");
    assert!(report.stream.is_none(), "no QEMU connected");
    assert!(!src.exists(), "the tunnel's socket is removed");
    let (rreport, rr) = recv.join().unwrap();
    let e = rr.unwrap_err();
    assert!(e.to_string().contains("`livemig tunnel send`"), "{e}");
    assert_eq!(rreport.outcome, "failed");
}

#[test]
fn the_source_socket_is_private_replaces_a_stale_one_and_is_removed() {
    let dir = private_dir();
    let p = dir.path().join("src.sock");
    {
        let s = SourceSocket::bind(&p).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert!(UnixStream::connect(&p).is_ok(), "QEMU can connect");
        let e = SourceSocket::bind(&p).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        drop(s);
    }
    assert!(!p.exists(), "removed at the end");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no private directory left behind");
    // A stale socket of an earlier run (nobody listens) is replaced.
    drop(UnixListener::bind(&p).unwrap());
    assert!(p.exists());
    let s = SourceSocket::bind(&p).unwrap();
    assert!(UnixStream::connect(&p).is_ok());
    drop(s);
    // Anything else at the path is left alone.
    std::fs::write(&p, b"data").unwrap();
    let e = SourceSocket::bind(&p).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), b"data");
}

// ---- Whole migrations of hand-built streams ----

/// Writes a QEMU migration stream as `savevm.c` / `ram.c` do.
#[derive(Default)]
struct W(Vec<u8>);

const RAM: u32 = 2;

impl W {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn be16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn be32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn be64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn name(&mut self, b: &[u8]) -> &mut Self {
        self.u8(u8::try_from(b.len()).unwrap()).raw(b)
    }
    fn cmd(&mut self, cmd: u16, payload: &[u8]) -> &mut Self {
        self.u8(0x08).be16(cmd).be16(u16::try_from(payload.len()).unwrap()).raw(payload)
    }
    fn section(&mut self, ty: u8) -> &mut Self {
        self.u8(ty).be32(RAM)
    }
    fn end_section(&mut self) -> &mut Self {
        self.be64(0x10).u8(0x7e).be32(RAM)
    }
    fn page(&mut self, index: u64, first: bool, data: &[u8; 4096]) -> &mut Self {
        self.rec(index, 0x08, first).raw(data)
    }
    fn rec(&mut self, index: u64, flag: u64, first: bool) -> &mut Self {
        self.be64((index * 4096) | flag | if first { 0 } else { 0x20 });
        if first {
            self.name(b"pc.ram");
        }
        self
    }
}

pub(crate) fn noise(seed: u64) -> [u8; 4096] {
    let mut p = [0u8; 4096];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for c in p.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    p
}

pub(crate) fn text(seed: u64) -> [u8; 4096] {
    let mut p = [0u8; 4096];
    let line = format!("page {seed} of the guest's page cache, mostly text that compresses. ");
    for (i, b) in p.iter_mut().enumerate() {
        *b = line.as_bytes()[i % line.len()];
    }
    p
}

/// A whole precopy stream of a 4 MiB `pc.ram`: the first pass (noise, text, duplicates, ZERO
/// records, a zero PAGE), a second pass re-sending changed pages (deltas), the completion with
/// SWITCHOVER_START, a device section, EOF and the vmdesc.
pub(crate) fn stream() -> Vec<u8> {
    let mut w = W::default();
    w.be32(0x5145_564d).be32(3);
    w.u8(0x07).be32(11).raw(b"pc-q35-10.0");
    w.cmd(1, &[]).cmd(2, &1u32.to_be_bytes());
    w.u8(0x01).be32(RAM).name(b"ram").be32(0).be32(4);
    w.be64((4 << 20) | 0x04).name(b"pc.ram").be64(4 << 20);
    w.end_section();
    w.section(0x02);
    for i in 0..1024u64 {
        match i % 8 {
            0 | 1 => w.page(i, i == 0, &noise(i)),
            2 | 3 => w.page(i, false, &text(i)),
            4 => w.page(i, false, &noise(i - 4)), // a duplicate of a page already sent
            5 => w.rec(i, 0x02, false).u8(0),     // QEMU's ZERO record
            6 => w.page(i, false, &[0u8; 4096]),  // a zero page sent whole
            _ => w.page(i, false, &text(7)),
        };
    }
    w.end_section();
    w.section(0x02);
    for i in (0..1024u64).step_by(8) {
        let mut p = noise(i);
        p[100..108].copy_from_slice(b"changed!");
        w.page(i, i == 0, &p);
    }
    w.end_section();
    w.cmd(11, &[]);
    w.section(0x03);
    w.page(1, true, &noise(99_999)).page(3, false, &text(5));
    w.end_section();
    w.u8(0x04).be32(3).name(b"timer").be32(0).be32(2).raw(&[1, 2, 3, 4, 5, 6, 7, 8]).u8(0x7e).be32(3);
    w.u8(0x00);
    let vmdesc = br#"{"page_size": 4096, "devices": []}"#;
    w.u8(0x06).be32(u32::try_from(vmdesc.len()).unwrap()).raw(vmdesc);
    w.0
}

fn rp_msg(ty: u16, value: u32) -> Vec<u8> {
    let mut v = ty.to_be_bytes().to_vec();
    v.extend_from_slice(&4u16.to_be_bytes());
    v.extend_from_slice(&value.to_be_bytes());
    v
}

/// The source QEMU: connects to the tunnel, writes `data`, reads its return path until a SHUT,
/// then closes. Returns what came back.
fn fake_source(path: PathBuf, data: Vec<u8>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + T;
        let mut s = loop {
            match UnixStream::connect(&path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("the tunnel never listened at {}: {e}", path.display()),
            }
        };
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(&data).unwrap();
        let mut back = Vec::new();
        let mut buf = [0u8; 64];
        while !back.windows(4).any(|w| w == [0, 1, 0, 4]) || back.len() % 8 != 0 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => back.extend_from_slice(&buf[..n]),
            }
        }
        back
    })
}

/// The destination QEMU: listens, reads `len` bytes, answers PONG 1 and SHUT `status`, closes.
fn fake_destination(path: PathBuf, len: usize, status: u32) -> std::thread::JoinHandle<Vec<u8>> {
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        let mut got = vec![0u8; len];
        c.read_exact(&mut got).unwrap();
        let mut rp = rp_msg(2, 1);
        rp.extend(rp_msg(1, status));
        c.write_all(&rp).unwrap();
        got
    })
}

/// A hand-built stream goes source QEMU -> tunnel send -> tunnel receive -> destination QEMU
/// byte for byte, compacted on the way, and the destination's return path (PONG, SHUT 0) comes
/// back to the source verbatim. Both ends complete with the digest verified.
#[test]
fn a_stream_goes_through_the_tunnel_byte_exact_and_compacted() {
    let dir = private_dir();
    let (src, dst) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    let data = stream();
    let destination = fake_destination(dst.clone(), data.len(), 0);
    let (addr, recv) = start_tunnel_receive(dst);
    let send = start_tunnel_send(src.clone(), addr);
    let source = fake_source(src.clone(), data.clone());

    let (sr, s) = send.join().unwrap();
    let (rr, r) = recv.join().unwrap();
    s.unwrap_or_else(|e| panic!("tunnel send: {}", e.chain()));
    r.unwrap_or_else(|e| panic!("tunnel receive: {}", e.chain()));
    let got = destination.join().unwrap();
    assert!(got == data, "the destination QEMU read other bytes than the source QEMU wrote");
    let mut rp = rp_msg(2, 1);
    rp.extend(rp_msg(1, 0));
    assert_eq!(source.join().unwrap(), rp, "the return path comes back verbatim");
    assert!(!src.exists(), "the tunnel's socket is removed");

    for r in [&sr, &rr] {
        assert_eq!(r.outcome, "completed", "{r:#?}");
        assert_eq!(r.engine, ENGINE_TUNNEL);
        assert!(r.verification.ok, "{r:#?}");
        // A plain link: the receiver's random page key, sent in its welcome, keyed both ends.
        assert_eq!(r.page_key.as_deref(), Some(crate::transport::PAGE_KEY_PLAIN));
    }
    let key = rr.page_key_hex.as_deref().expect("a plain link's key is reported");
    assert_eq!(sr.page_key_hex.as_deref(), Some(key), "both ends used the same key");
    // The stream digest is keyed: the keyed xxh3-128 of exactly the bytes the source QEMU wrote.
    let mut h = livemig_compact::PageKey::from_hex(key).unwrap().stream_hasher();
    h.update(&data[..usize::try_from(sr.stream.as_ref().unwrap().raw_bytes - sr.device_state_bytes).unwrap()]);
    assert_eq!(rr.verification.source_digest.as_deref(), Some(format!("{:032x}", h.digest128()).as_str()));
    let st = sr.stream.as_ref().unwrap();
    assert_eq!(st.raw_bytes, data.len() as u64);
    assert!(st.fallback.is_none(), "{st:?}");
    assert_eq!(st.zero_records, 128);
    assert_eq!(st.pages, 1024 - 128 + 128 + 2);
    assert!(sr.wire_bytes < st.raw_bytes, "compacted: {} wire bytes for {} of stream", sr.wire_bytes, st.raw_bytes);
    assert!(sr.device_state_bytes > 0);
    for class in ["dup", "delta", "raw", "zero"] {
        assert!(sr.pages.get(class).copied().unwrap_or(0) > 0, "no {class} page: {:?}", sr.pages);
    }
    assert_eq!(rr.pages, sr.pages, "the receiver decoded what the sender encoded");
    assert_eq!(rr.stream.as_ref().unwrap().raw_bytes, data.len() as u64);
    assert_eq!(rr.verification.source_digest, rr.verification.destination_digest);
    assert!(rr.destination_state.as_deref().unwrap().starts_with("loaded"), "{rr:#?}");
    assert!(rr.warnings.is_empty(), "{:?}", rr.warnings);
}

/// The same stream through the real relay over 1 to 4 real TCP connections (protocol 7):
/// byte for byte the same at the destination QEMU, the same pages decoded as encoded (the
/// mirrored cache and the resends are those of one connection), and both ends report the
/// connections used.
#[test]
fn a_stream_goes_through_the_tunnel_byte_exact_over_one_to_four_connections() {
    let data = stream();
    for n in 1..=4u32 {
        let dir = private_dir();
        let (src, dst) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
        let destination = fake_destination(dst.clone(), data.len(), 0);
        let (addr, recv) = start_tunnel_receive(dst);
        let send = start_tunnel_send_over(src.clone(), addr, n);
        let source = fake_source(src, data.clone());
        let (sr, s) = send.join().unwrap();
        let (rr, r) = recv.join().unwrap();
        s.unwrap_or_else(|e| panic!("{n} connections: tunnel send: {}", e.chain()));
        r.unwrap_or_else(|e| panic!("{n} connections: tunnel receive: {}", e.chain()));
        assert!(destination.join().unwrap() == data, "{n} connections: the destination QEMU read other bytes than the source QEMU wrote");
        assert!(source.join().unwrap().ends_with(&rp_msg(1, 0)), "{n} connections: the SHUT 0 came back");
        assert_eq!((sr.connections, rr.connections), (Some(n), Some(n)), "{n} connections");
        assert!(sr.warnings.is_empty() && rr.warnings.is_empty(), "{:?} {:?}", sr.warnings, rr.warnings);
        assert!(rr.verification.ok && sr.verification.ok, "{n} connections");
        assert_eq!(rr.pages, sr.pages, "{n} connections: the receiver decoded what the sender encoded");
        assert_eq!(rr.resent_pages, sr.resent_pages);
        assert_eq!(sr.stream.as_ref().unwrap().raw_bytes, data.len() as u64);
        assert!(rr.wire_bytes >= sr.wire_bytes, "{n} connections: the receiver counts every connection's bytes");
    }
}

/// The destination QEMU fails its load (SHUT 1): the source QEMU gets that SHUT (its migration
/// fails), and both ends fail saying so.
#[test]
fn a_failed_load_fails_both_ends() {
    let dir = private_dir();
    let (src, dst) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    let data = stream();
    let destination = fake_destination(dst.clone(), data.len(), 1);
    let (addr, recv) = start_tunnel_receive(dst);
    let send = start_tunnel_send(src.clone(), addr);
    let source = fake_source(src, data.clone());
    let (sr, s) = send.join().unwrap();
    let (rr, r) = recv.join().unwrap();
    let _ = destination.join().unwrap();
    let back = source.join().unwrap();
    assert!(back.ends_with(&rp_msg(1, 1)), "the source QEMU learns of the failure: {back:?}");
    let (se, re) = (s.unwrap_err().chain(), r.unwrap_err().chain());
    assert!(re.contains("failed to load the migration") && re.contains("SHUT 1"), "{re}");
    assert!(se.contains("the destination aborted the migration") && se.contains("SHUT 1"), "{se}");
    assert_eq!((sr.outcome.as_str(), rr.outcome.as_str()), ("failed", "failed"));
    assert!(rr.destination_state.as_deref().unwrap().contains("failed"), "{rr:#?}");
}

/// The source QEMU opens a second connection (multifd): refused, the migration fails with a
/// reason that names the capability.
#[test]
fn a_second_connection_from_qemu_fails_the_tunnel_clearly() {
    let dir = private_dir();
    let (src, dst) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    let mut data = stream();
    data.truncate(64 << 10);
    let _destination = UnixListener::bind(&dst).unwrap();
    let (addr, recv) = start_tunnel_receive(dst);
    let send = start_tunnel_send(src.clone(), addr);
    let deadline = Instant::now() + T;
    let mut first = loop {
        match UnixStream::connect(&src) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("{e}"),
        }
    };
    first.write_all(&data).unwrap();
    // Once the relay runs (its destination connected), a second channel.
    std::thread::sleep(Duration::from_millis(500));
    let _second = UnixStream::connect(&src).unwrap();
    let (sr, s) = send.join().unwrap();
    let e = s.unwrap_err().chain();
    assert!(e.contains("second connection") && e.contains("multifd"), "{e}");
    assert_eq!(sr.outcome, "failed");
    // The first connection is closed: QEMU's migration fails.
    first.set_read_timeout(Some(T)).unwrap();
    assert!(matches!(first.read(&mut [0u8; 16]), Ok(0) | Err(_)));
    let (_, r) = recv.join().unwrap();
    assert!(r.unwrap_err().chain().contains("second connection"), "the receiver is told why");
}
