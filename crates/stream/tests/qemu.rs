//! Streams written by the real QEMU installed here (`qemu-system-x86_64`, 10.0 on this machine):
//! a paused q35 guest migrated into a file, parsed, rebuilt byte-exact. QEMU missing is a
//! failure, not a skip. `LIVEMIG_STREAM_QEMU=/path/to/qemu-system-x86_64` runs another QEMU
//! (e.g. the 7.2 that `guest/build.sh` unpacks into `~/.cache/livemig/qemu-7.2/`).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use livemig_stream::{rebuild, Event, Parser, Phase, ReturnPathParser, RpEvent, RpKind, SectionKind};
use serde_json::{json, Value};
use support::*;

fn qemu() -> String {
    std::env::var("LIVEMIG_STREAM_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string())
}

fn qemu_version() -> String {
    let qemu = qemu();
    match Command::new(&qemu).arg("--version").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string(),
        Ok(o) => {
            panic!("`{qemu} --version` failed ({}): this test needs QEMU (apt-get install qemu-system-x86)", o.status)
        }
        Err(e) => panic!(
            "{qemu} is not installed or not runnable ({e}): this test needs QEMU (apt-get install qemu-system-x86)"
        ),
    }
}

/// Kills QEMU and removes the files when the test ends, also on a panic.
struct Vm {
    child: Child,
    files: Vec<PathBuf>,
    log: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("QEMU's stderr: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path, vm: &mut Vm) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(st)) = vm.child.try_wait() {
                        panic!("QEMU exited before its QMP socket was up: {st}");
                    }
                    assert!(Instant::now() < deadline, "QMP socket {} never came up: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let r = BufReader::new(s.try_clone().expect("clone"));
        let mut q = Self { w: s, r };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "no QMP greeting: {greeting}");
        q.cmd("qmp_capabilities", json!({}));
        q
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.r.read_line(&mut line).expect("read from QMP");
        assert!(n > 0, "QMP closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}"))
    }

    /// Runs a command; events in between are skipped.
    fn cmd(&mut self, name: &str, args: Value) -> Value {
        let msg = json!({"execute": name, "arguments": args});
        if let Err(e) = writeln!(self.w, "{msg}") {
            panic!("QMP {name}: cannot write to QEMU ({e})");
        }
        loop {
            let v = self.read();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            if let Some(e) = v.get("error") {
                panic!("QMP {name} failed: {e}");
            }
        }
    }
}

/// What one real migration produced.
struct Run {
    bytes: Vec<u8>,
    parser: Parser,
    events: Vec<Event>,
}

/// The common arguments: a paused 64 MiB q35 guest, TCG, nothing attached, QMP on `qmp`.
fn base_args(qmp: &Path) -> Vec<String> {
    let mut args: Vec<String> =
        ["-accel", "tcg", "-S", "-nodefaults", "-display", "none", "-m", "64"].iter().map(|s| s.to_string()).collect();
    args.push("-qmp".into());
    args.push(format!("unix:{},server=on,wait=off", qmp.display()));
    args
}

/// Starts QEMU with `args`; its stderr goes to `<dir>/<name>.log`; `files` are removed at the end.
fn spawn(dir: &Path, name: &str, args: &[String], files: Vec<PathBuf>) -> (Vm, Qmp) {
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(qemu())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", qemu()));
    let mut vm = Vm { child, files, log };
    let qmp = args
        .iter()
        .find_map(|a| a.strip_prefix("unix:").and_then(|r| r.split(',').next()))
        .map(PathBuf::from)
        .expect("a -qmp unix: argument");
    let q = Qmp::connect(&qmp, &mut vm);
    (vm, q)
}

/// Polls `query-migrate` until `completed`; panics on failure or after 60 s.
fn wait_completed(q: &mut Qmp, who: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = q.cmd("query-migrate", json!({}));
        match st.get("status").and_then(Value::as_str) {
            Some("completed") => return st,
            Some("failed" | "cancelled") => panic!("{who}: migration failed: {st}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "{who}: migration did not complete in 60 s: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asks QEMU to quit and waits (up to 20 s) for it to exit.
fn quit(vm: &mut Vm, q: &mut Qmp) {
    // QEMU may close the socket before or after answering: neither matters.
    let _ = writeln!(q.w, "{}", json!({"execute": "quit"}));
    let deadline = Instant::now() + Duration::from_secs(20);
    while vm.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a paused q35 guest, migrates it into a file, parses the file.
fn migrate_to_file(tag: &str, shared: bool) -> Run {
    let version = qemu_version();
    eprintln!("{version}");
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("stream.bin");
    let mem = PathBuf::from(format!("/dev/shm/livemig-stream-test-{tag}-{}", std::process::id()));
    let mut args = base_args(&dir.path().join("qmp.sock"));
    if shared {
        args.push("-object".into());
        args.push(format!("memory-backend-file,id=mem0,size=64M,mem-path={},share=on", mem.display()));
        args.push("-machine".into());
        args.push("q35,memory-backend=mem0".into());
    } else {
        args.push("-machine".into());
        args.push("q35".into());
    }
    let (mut vm, mut q) = spawn(dir.path(), "qemu", &args, vec![mem.clone()]);
    if shared {
        q.cmd("migrate-set-capabilities", json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}));
    }
    q.cmd("migrate", json!({"uri": format!("exec:cat > {}", out.display())}));
    eprintln!("query-migrate: {}", wait_completed(&mut q, "source"));
    quit(&mut vm, &mut q);
    drop(vm);
    assert!(!mem.exists(), "{} left behind", mem.display());

    let bytes = std::fs::read(&out).expect("read the stream file");
    let (parser, events, r) = parse_all(&bytes);
    r.unwrap_or_else(|e| panic!("the stream did not end cleanly: {e}"));
    Run { bytes, parser, events }
}

fn summary(run: &Run) -> String {
    let p = &run.parser;
    let s = p.stats();
    let sections: Vec<String> = run
        .events
        .iter()
        .filter_map(|e| match e {
            Event::RamSectionEnd(s) => Some(format!("{:?}(pages {}, zeros {})", s.kind, s.pages, s.zeros)),
            _ => None,
        })
        .collect();
    let blocks: Vec<String> = p
        .blocks()
        .iter()
        .map(|b| format!("{} {:#x}{}", b.name, b.used_length, b.addr.map(|a| format!(" @{a:#x}")).unwrap_or_default()))
        .collect();
    let rest: usize = {
        let at = run.events.iter().position(|e| *e == Event::RamDone).unwrap_or(run.events.len());
        run.events[at..].iter().map(Event::encoded_len).sum()
    };
    format!(
        "{} bytes; machine {:?}; capabilities {:?}; blocks [{}]; ram sections [{}]; pages {}, zeros {}, \
         record bytes {}, opaque bytes {} ({} after RAM END); return path {}; switchover-start {}",
        run.bytes.len(),
        p.config().machine,
        p.config().capabilities,
        blocks.join(", "),
        sections.join(", "),
        s.pages,
        s.zeros,
        s.record_bytes,
        s.opaque_bytes,
        rest,
        p.return_path_opened(),
        p.switchover_started()
    )
}

fn check_common(run: &Run) {
    assert_eq!(rebuild(&run.events), run.bytes, "the rebuild differs from QEMU's bytes");
    assert!(fallbacks(&run.events).is_empty(), "fell back: {:?}", fallbacks(&run.events));
    assert!(run.events.contains(&Event::RamDone), "no RamDone");
    assert_eq!(run.parser.phase(), Phase::Finished);
    let s = run.parser.stats();
    assert!(s.pages + s.zeros > 0, "no page records");
    assert_eq!(s.opaque_bytes + s.record_bytes, run.bytes.len() as u64);
    // Every record lies within its block.
    for e in &run.events {
        let (h, _) = match e {
            Event::Page(p) => (&p.header, ()),
            Event::Zero(z) => (&z.header, ()),
            _ => continue,
        };
        let b = run.parser.blocks().iter().find(|b| &b.name == h.block()).expect("block in the list");
        assert!(h.offset() < b.used_length);
    }
    // The ram END section is there, and the machine type.
    assert!(run.events.iter().any(|e| matches!(e, Event::RamSectionEnd(s) if s.kind == SectionKind::End)));
    assert!(run.parser.config().machine.as_deref().is_some_and(|m| m.starts_with("pc-q35-")));
    // Chunked feeding gives the same events.
    let mut p = Parser::new();
    let (ev, _, r) = feed_chunked(&mut p, &run.bytes, &[1, 4097, 13, 65536, 2, 8191]);
    r.expect("clean");
    assert_eq!(normalize(&ev), normalize(&run.events));
}

#[test]
fn real_qemu_stream_of_a_paused_guest() {
    let run = migrate_to_file("plain", false);
    eprintln!("plain: {}", summary(&run));
    check_common(&run);
    assert!(!run.parser.config().x_ignore_shared());
    assert!(run.parser.blocks().iter().all(|b| b.addr.is_none()));
    let ram = run.parser.blocks().iter().find(|b| b.name.as_bytes() == b"pc.ram").expect("pc.ram block");
    assert_eq!(ram.used_length, 64 << 20);
    // Its RAM was not skipped: every page of pc.ram went as a record.
    let n = run
        .events
        .iter()
        .filter(|e| match e {
            Event::Page(p) => p.header.block() == &ram.name,
            Event::Zero(z) => z.header.block() == &ram.name,
            _ => false,
        })
        .count();
    assert_eq!(n, (64 << 20) / 4096);
}

#[test]
fn real_qemu_stream_with_x_ignore_shared() {
    let run = migrate_to_file("shared", true);
    eprintln!("x-ignore-shared: {}", summary(&run));
    check_common(&run);
    assert!(run.parser.config().x_ignore_shared());
    assert!(run.parser.blocks().iter().all(|b| b.addr.is_some()), "every block has its address");
    let mem = run.parser.blocks().iter().find(|b| b.name.as_bytes() == b"mem0").expect("mem0 block");
    assert_eq!(mem.used_length, 64 << 20);
    // The shared block is listed but none of its pages is sent.
    assert!(!run.events.iter().any(|e| match e {
        Event::Page(p) => p.header.block() == &mem.name,
        Event::Zero(z) => z.header.block() == &mem.name,
        _ => false,
    }));
}

/// (major, minor) of `qemu_version()`'s "QEMU emulator version X.Y.Z".
fn version_of(line: &str) -> (u32, u32) {
    let v = line.split_whitespace().nth(3).unwrap_or("0.0");
    let mut it = v.split('.').map(|n| n.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// What the relay saw.
#[derive(Default)]
struct RelayLog {
    main: Vec<Event>,
    main_bytes: u64,
    finish: Option<Result<(), livemig_stream::StreamError>>,
    rp: Vec<RpKind>,
    rp_values: Vec<(RpKind, Option<u32>)>,
    ack_seen_at: Option<Instant>,
}

/// A source QEMU migrates into the relay, which parses the main channel, writes the events'
/// rebuild (not the bytes read) to the destination QEMU, and relays the return path message by
/// message, holding the destination's SWITCHOVER_ACK for `hold` (QEMU >= 8.1: `switchover-ack`
/// on and the source guest running, since QEMU does not wait for the ack of a stopped guest; on
/// older QEMU only `return-path`, guest paused).
#[test]
fn real_qemu_through_a_parsing_relay_with_the_return_path() {
    let version = qemu_version();
    eprintln!("{version}");
    let gate = version_of(&version) >= (8, 1);
    let hold = Duration::from_millis(1500);
    let dir = tempfile::tempdir().expect("temp dir");
    let relay_path = dir.path().join("relay.sock");
    let dst_path = dir.path().join("dst.sock");

    let mut src_args = base_args(&dir.path().join("src-qmp.sock"));
    src_args.extend(["-machine".to_string(), "q35".to_string()]);
    let mut dst_args = base_args(&dir.path().join("dst-qmp.sock"));
    dst_args.extend(["-machine".to_string(), "q35".to_string(), "-incoming".to_string(), "defer".to_string()]);
    let (mut src, mut sq) = spawn(dir.path(), "src", &src_args, Vec::new());
    let (mut dst, mut dq) = spawn(dir.path(), "dst", &dst_args, Vec::new());
    let mut caps = vec![json!({"capability": "return-path", "state": true})];
    if gate {
        caps.push(json!({"capability": "switchover-ack", "state": true}));
    }
    for q in [&mut sq, &mut dq] {
        q.cmd("migrate-set-capabilities", json!({ "capabilities": caps }));
    }
    if gate {
        // QEMU waits for the ack only while the guest runs (`migration_can_switchover`): let
        // the firmware run (it finds no boot device and waits).
        sq.cmd("cont", json!({}));
    }
    dq.cmd("migrate-incoming", json!({"uri": format!("unix:{}", dst_path.display())}));
    let listener = std::os::unix::net::UnixListener::bind(&relay_path).expect("relay socket");

    let log = std::sync::Arc::new(std::sync::Mutex::new(RelayLog::default()));
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let relay = {
        let log = log.clone();
        let dst_path = dst_path.clone();
        std::thread::spawn(move || {
            let (src_conn, _) = listener.accept().expect("the source connects");
            let dst_conn = UnixStream::connect(&dst_path).expect("connect to the destination");
            for c in [&src_conn, &dst_conn] {
                c.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
            }
            // Return path: destination -> source, message by message.
            let back = {
                let log = log.clone();
                let mut from = dst_conn.try_clone().expect("clone");
                let mut to = src_conn.try_clone().expect("clone");
                std::thread::spawn(move || {
                    let mut rp = ReturnPathParser::new();
                    let mut buf = vec![0u8; 4096];
                    loop {
                        let n = match std::io::Read::read(&mut from, &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut events = Vec::new();
                        rp.feed(&buf[..n], &mut |e| events.push(e));
                        for e in events {
                            if let RpEvent::Message(m) = &e {
                                let mut l = log.lock().expect("lock");
                                l.rp.push(m.kind());
                                l.rp_values.push((m.kind(), m.value()));
                                if m.kind() == RpKind::SwitchoverAck {
                                    l.ack_seen_at = Some(Instant::now());
                                    drop(l);
                                    let _ = release_rx.recv_timeout(Duration::from_secs(30));
                                }
                            }
                            let mut out = Vec::new();
                            e.write_to(&mut out);
                            if to.write_all(&out).is_err() {
                                return;
                            }
                        }
                    }
                    let _ = rp.finish(&mut |_| {});
                })
            };
            // Main channel: source -> destination, rebuilt from the events.
            let mut from = src_conn;
            let mut to = dst_conn;
            let mut p = Parser::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match std::io::Read::read(&mut from, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut events = Vec::new();
                p.feed(&buf[..n], &mut |e| events.push(e));
                let mut out = Vec::new();
                for e in &events {
                    e.write_to(&mut out);
                }
                let mut l = log.lock().expect("lock");
                l.main_bytes += n as u64;
                l.main.extend(events);
                drop(l);
                if to.write_all(&out).is_err() {
                    break;
                }
            }
            let mut tail = Vec::new();
            let r = p.finish(&mut |e| tail.push(e));
            let mut out = Vec::new();
            for e in &tail {
                e.write_to(&mut out);
            }
            let _ = to.write_all(&out);
            let _ = to.shutdown(std::net::Shutdown::Write);
            let mut l = log.lock().expect("lock");
            l.main.extend(tail);
            l.finish = Some(r);
            drop(l);
            let _ = back.join();
        })
    };

    sq.cmd("migrate", json!({"uri": format!("unix:{}", relay_path.display())}));
    if gate {
        // The destination acks at once (no device needs an ack); the source must wait for it.
        let deadline = Instant::now() + Duration::from_secs(30);
        while log.lock().expect("lock").ack_seen_at.is_none() {
            assert!(Instant::now() < deadline, "no SWITCHOVER_ACK from the destination");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(hold);
        let st = sq.cmd("query-migrate", json!({}));
        assert_eq!(
            st.get("status").and_then(Value::as_str),
            Some("active"),
            "the source switched over without the ack: {st}"
        );
        assert!(!log.lock().expect("lock").main.contains(&Event::RamDone));
    }
    let _ = release_tx.send(());
    let st = wait_completed(&mut sq, "source");
    eprintln!("source query-migrate: {st}");
    let dst_st = wait_completed(&mut dq, "destination");
    eprintln!("destination query-migrate: {dst_st}");
    let status = dq.cmd("query-status", json!({}));
    // Loaded and not resumed (-S): "paused", or "prelaunch" on QEMU 7.2 for a paused source.
    assert!(matches!(status.get("status").and_then(Value::as_str), Some("paused" | "prelaunch")), "{status}");
    quit(&mut src, &mut sq);
    quit(&mut dst, &mut dq);
    relay.join().expect("relay thread");

    let l = log.lock().expect("lock");
    l.finish.clone().expect("the relay finished").expect("the main channel ended cleanly");
    assert!(fallbacks(&l.main).is_empty(), "fell back: {:?}", fallbacks(&l.main));
    assert!(l.main.contains(&Event::RamDone));
    let records = l.main.iter().filter(|e| matches!(e, Event::Page(_) | Event::Zero(_))).count();
    let syncs = l.main.iter().filter(|e| matches!(e, Event::RamSectionEnd(_))).count();
    eprintln!(
        "relay: {} bytes, {records} page records in {syncs} ram sections; return path {:?}",
        l.main_bytes, l.rp_values
    );
    assert!(records >= (64 << 20) / 4096, "every page of pc.ram went as a record");
    assert!(l.rp.contains(&RpKind::Pong), "no PONG for the source's PING: {:?}", l.rp);
    assert_eq!(l.rp_values.last(), Some(&(RpKind::Shut, Some(0))), "the destination's last word is SHUT(0)");
    assert_eq!(l.rp.contains(&RpKind::SwitchoverAck), gate);
}
