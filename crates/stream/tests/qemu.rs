//! Streams written by the real QEMU installed here (`qemu-system-x86_64`, 10.0 on this machine):
//! a paused q35 guest migrated into a file, parsed, rebuilt byte-exact. QEMU missing is a
//! failure, not a skip.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use livemig_stream::{rebuild, Event, Parser, Phase, SectionKind};
use serde_json::{json, Value};
use support::*;

const QEMU: &str = "qemu-system-x86_64";

fn qemu_version() -> String {
    match Command::new(QEMU).arg("--version").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string(),
        Ok(o) => {
            panic!("`{QEMU} --version` failed ({}): this test needs QEMU (apt-get install qemu-system-x86)", o.status)
        }
        Err(e) => panic!(
            "{QEMU} is not installed or not runnable ({e}): this test needs QEMU (apt-get install qemu-system-x86)"
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

/// Starts a paused q35 guest, migrates it into a file, parses the file.
fn migrate_to_file(tag: &str, shared: bool) -> Run {
    let version = qemu_version();
    eprintln!("{version}");
    let dir = tempfile::tempdir().expect("temp dir");
    let qmp_path = dir.path().join("qmp.sock");
    let out = dir.path().join("stream.bin");
    let mem = PathBuf::from(format!("/dev/shm/livemig-stream-test-{tag}-{}", std::process::id()));
    let mut args: Vec<String> =
        ["-accel", "tcg", "-S", "-nodefaults", "-display", "none", "-m", "64"].iter().map(|s| s.to_string()).collect();
    args.push("-qmp".into());
    args.push(format!("unix:{},server=on,wait=off", qmp_path.display()));
    if shared {
        args.push("-object".into());
        args.push(format!("memory-backend-file,id=mem0,size=64M,mem-path={},share=on", mem.display()));
        args.push("-machine".into());
        args.push("q35,memory-backend=mem0".into());
    } else {
        args.push("-machine".into());
        args.push("q35".into());
    }
    let child = Command::new(QEMU)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("qemu.log")).expect("log file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {QEMU}: {e}"));
    let mut vm = Vm { child, files: vec![mem.clone()], log: dir.path().join("qemu.log") };
    let mut q = Qmp::connect(&qmp_path, &mut vm);
    if shared {
        q.cmd("migrate-set-capabilities", json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}));
    }
    q.cmd("migrate", json!({"uri": format!("exec:cat > {}", out.display())}));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = q.cmd("query-migrate", json!({}));
        match st.get("status").and_then(Value::as_str) {
            Some("completed") => {
                eprintln!("query-migrate: {st}");
                break;
            }
            Some("failed" | "cancelled") => panic!("migration failed: {st}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "migration did not complete in 60 s: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // QEMU may close the socket before or after answering: neither matters.
    let _ = writeln!(q.w, "{}", json!({"execute": "quit"}));
    let deadline = Instant::now() + Duration::from_secs(20);
    while vm.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
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
