//! Writes the seed corpora of the fuzz targets, made with the real encoders, into
//! `<dir>/<target>/` (default `fuzz/corpus`). Run by `scripts/fuzz --seeds`; the output is
//! committed. Every seed starts with the mode byte its target expects.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use livemig_compact::{Compressor, DiskLookup, DiskRef, EncodeOptions, Encoder, SnapshotLookup, PAGE_SIZE};
use livemig_fuzz_common as common;
use livemig_wire::{DiskHeld, DiskOffer, FrameKind, Holdings, Message, RegionInfo};

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    fs::create_dir_all(&d).expect("create the corpus directory");
    fs::write(d.join(name), bytes).expect("write a seed");
}

fn with_mode(mode: u8, rest: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(rest);
    v
}

fn messages() -> Vec<Message> {
    vec![
        Message::Hello {
            version: 2,
            min_version: 2,
            software: "livemig 0.1.0".into(),
            page_size: 4096,
            regions: vec![RegionInfo { id: "mem0".into(), size: 1 << 29 }],
            vm: Some("vm1".into()),
            disks: vec![DiskOffer { id: 0, size: 1 << 30, index_hash: format!("{:032x}", 0xabcdu128) }],
            engine: "shared".into(),
        },
        Message::Welcome {
            version: 2,
            software: "livemig 0.1.0".into(),
            holds: Holdings { disks: vec![DiskHeld { id: 0, same: true }], snapshots: vec![format!("{:032x}", 7u128)] },
            page_key: None,
            join: None,
        },
        Message::Welcome {
            version: 4,
            software: "livemig 0.1.0".into(),
            holds: Holdings::default(),
            page_key: Some(common::page_key().to_hex()),
            join: Some("cd".repeat(16)),
        },
        Message::Plan { snapshot: Some(format!("{:032x}", 7u128)), connections: 1 },
        Message::Plan { snapshot: None, connections: 1 },
        Message::Plan { snapshot: None, connections: 4 },
        Message::Join { token: "ab".repeat(16), index: 1 },
        Message::Fence { index: 2 },
        Message::Resend { pages: vec![1, 2, 63] },
        Message::EndAck { index: 3 },
        Message::IterationEnd { index: 3, pages: 120, last: true },
        Message::Switchover { digest: format!("{:032x}", 99u128), pages: 64 },
        Message::Verified { ok: true, digest: format!("{:032x}", 99u128) },
        Message::DeviceStateEnd { bytes: 123_456 },
        Message::Loaded,
        Message::Commit,
        Message::Resumed,
        Message::Abort { reason: "the guest \"stopped\" \u{e9}".into() },
        Message::StreamEnd { bytes: 10 },
        Message::StreamOrder { seq: 11 },
    ]
}

struct Disk(HashMap<u128, u64>);
impl DiskLookup for Disk {
    fn lookup_disk(&self, fp: u128) -> Option<DiskRef> {
        self.0.get(&fp).map(|&sector| DiskRef { image: 0, sector, zero_tail_sectors: 0 })
    }
}
struct Snap(HashMap<u128, u64>);
impl SnapshotLookup for Snap {
    fn lookup_snapshot(&self, fp: u128) -> Option<u64> {
        self.0.get(&fp).copied()
    }
}

/// Page batches as the sender makes them against the fake destination's disk and snapshot.
fn batches() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, compressor) in [("lz4", Compressor::Lz4), ("zstd", Compressor::Zstd(1)), ("raw", Compressor::None)] {
        let mut enc =
            Encoder::new(common::RAM_PAGES, EncodeOptions::for_ram(common::RAM_PAGES * PAGE_SIZE as u64), common::page_key().clone());
        enc.set_compressor(compressor);
        let disk = (0..common::DISK_BLOCKS).map(|b| (livemig_compact::fingerprint(&common::disk_block(b)), b)).collect();
        enc.set_disk_lookup(Arc::new(Disk(disk)));
        let snap = (0..common::SNAPSHOT_PAGES).map(|q| (livemig_compact::fingerprint(&common::snapshot_page(q)), q)).collect();
        enc.set_snapshot_lookup(Arc::new(Snap(snap)));

        let text = common::ram_page(40);
        let mut sparse = [0u8; PAGE_SIZE];
        sparse[100..108].copy_from_slice(b"livemig!");
        enc.push(0, &[0u8; PAGE_SIZE]);
        enc.push(1, &text);
        enc.push(2, &common::disk_block(5));
        enc.push(3, &common::snapshot_page(2));
        enc.push(4, &text); // dup of page 1
        enc.push(5, &sparse); // delta against a zero page
        enc.push(33, &common::ram_page(33)); // a page the destination already has
        out.push((name, enc.take()));

        let mut changed = text;
        changed[2000..2016].copy_from_slice(b"sixteen changed!");
        enc.push(1, &changed); // delta against the version sent before
        enc.push_whole(2, &common::disk_block(5));
        enc.push(6, &common::disk_block(9));
        out.push((name, enc.take()));
    }
    out
}

fn qmp_sessions() -> Vec<(&'static str, Vec<u8>)> {
    let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}"#;
    let ok = r#"{"return": {}, "id": 1}"#;
    let replies = [
        r#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": 2}"#,
        r#"{"return": [{"id": "mem0", "size": 536870912, "merge": true, "dump": true, "prealloc": false, "share": true, "reserve": true, "host-nodes": [], "policy": "default"}], "id": 3}"#,
        r#"{"timestamp": {"seconds": 1700000000, "microseconds": 12345}, "event": "MIGRATION", "data": {"status": "active"}}"#,
        r#"{"return": {"status": "completed", "total-time": 1200, "downtime": 30, "setup-time": 2, "ram": {"transferred": 4096, "remaining": 0, "total": 536870912, "dirty-pages-rate": 0, "mbps": 800.5}}, "id": 4}"#,
        r#"{"return": "pc-i440fx-7.2-machine", "id": 5}"#,
        r#"{"timestamp": {"seconds": 1700000001, "microseconds": 1}, "event": "STOP"}"#,
        r#"{"return": {"status": "failed", "error-desc": "no space"}, "id": 6}"#,
        r#"{"error": {"class": "GenericError", "desc": "not now"}, "id": 7}"#,
        r#"{"return": {}, "id": 8}"#,
    ];
    let mut full = format!("{greeting}\r\n{ok}\n");
    for r in replies {
        full.push_str(r);
        full.push('\n');
    }
    vec![
        ("session", with_mode(0, full.as_bytes())),
        ("greeting-only", with_mode(0, format!("{greeting}\n{ok}\n").as_bytes())),
        ("error-reply", with_mode(3, format!("{greeting}\n{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"x\"}}}}\n").as_bytes())),
    ]
}

/// The first flight of a real client (PSK mode), captured on the loopback.
fn client_hello() -> Vec<u8> {
    let setup = common::tls_setup().clone();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("address");
    let t = std::thread::spawn(move || {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        let _ = livemig_tls::connect(&setup, s, "localhost");
    });
    let (mut s, _) = l.accept().expect("accept");
    s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    drop(s);
    let _ = t.join();
    buf
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/corpus".into()));

    // wire_message: each control message as JSON
    for (i, m) in messages().iter().enumerate() {
        put(&dir, "wire_message", &format!("{i:02}-{}", m.name()), &serde_json::to_vec(m).expect("json"));
    }

    // wire_frame: a connection's stream (magic, control frames, a page batch, device state)
    let batches = batches();
    let mut stream = Vec::new();
    livemig_wire::write_magic(&mut stream).expect("magic");
    for m in messages().iter().take(4) {
        livemig_wire::write_message(&mut stream, m).expect("frame");
    }
    livemig_wire::write_frame(&mut stream, FrameKind::Pages, &batches[0].1).expect("frame");
    livemig_wire::write_frame(&mut stream, FrameKind::DeviceState, b"QEVM\0\0\0\x03device state").expect("frame");
    livemig_wire::write_message(&mut stream, &Message::Commit).expect("frame");
    put(&dir, "wire_frame", "stream", &with_mode(common::WIRE_MAGIC, &stream));
    put(&dir, "wire_frame", "stream-fix", &with_mode(common::WIRE_MAGIC | common::WIRE_FIX_CHECKSUMS, &stream));
    let mut frames = Vec::new();
    for m in messages().iter().skip(4) {
        livemig_wire::write_message(&mut frames, m).expect("frame");
    }
    put(&dir, "wire_frame", "frames", &with_mode(0, &frames));

    // compact_decode: batches of every class
    for (i, (name, b)) in batches.iter().enumerate() {
        put(&dir, "compact_decode", &format!("{i}-{name}"), &with_mode(0, b));
        put(&dir, "compact_decode", &format!("{i}-{name}-fix"), &with_mode(common::COMPACT_FIX_FINGERPRINTS, b));
    }

    // qmp_reply
    for (name, s) in qmp_sessions() {
        put(&dir, "qmp_reply", name, &s);
    }

    // index_file: the real index of the test image; its stamp is this machine's, so the seed
    // that loads everywhere has the stamp fix-up bit set.
    let fx = common::index_fixture();
    put(&dir, "index_file", "index-fixed", &with_mode(0x0f, &fx.real));
    put(&dir, "index_file", "index-raw", &with_mode(0, &fx.real));
    // a snapshot with memory pages given; meta.json in the format the store writes
    let meta = format!(
        r#"{{"format":1,"vm":"{}","id":"{:032x}","pages":3,"created_unix_nanos":1700000000000000000,"bytes":12288,"fingerprints_hash":"FPHASH"}}"#,
        common::SNAPSHOT_VM,
        common::SNAPSHOT_ID
    );
    let mut mem = Vec::new();
    mem.extend_from_slice(&common::snapshot_page(0));
    mem.extend_from_slice(&[0u8; PAGE_SIZE]);
    mem.extend_from_slice(&common::snapshot_page(0)[..100]);
    let fix = common::SNAP_FIX_HASH | common::SNAP_MEMORY_GIVEN;
    put(&dir, "index_file", "snapshot", &common::SnapshotInput::encode(fix, meta.as_bytes(), 3, &mem));
    put(&dir, "index_file", "snapshot-damaged", &common::SnapshotInput::encode(fix | common::SNAP_DAMAGE_FP, meta.as_bytes(), 3, &mem));
    let fps: Vec<u8> = (0..3u64).flat_map(|q| livemig_compact::fingerprint(&common::snapshot_page(q)).to_le_bytes()).collect();
    put(&dir, "index_file", "snapshot-fps", &common::SnapshotInput::encode(common::SNAP_FIX_HASH, meta.as_bytes(), 3, &fps));

    // tls_record: a real client's first flight, and that flight cut short
    let hello = client_hello();
    assert!(!hello.is_empty(), "captured no ClientHello");
    put(&dir, "tls_record", "client-hello", &hello);
    put(&dir, "tls_record", "client-hello-cut", &hello[..hello.len() / 2]);

    // qemu_stream: synthetic streams, fed whole and in chunks of 1 and 61 bytes
    for (name, stream) in common::qemu_stream_seeds() {
        put(&dir, "qemu_stream", name, &with_mode(0, &stream));
        put(&dir, "qemu_stream", &format!("{name}-1"), &with_mode(1, &stream));
        put(&dir, "qemu_stream", &format!("{name}-61"), &with_mode(61, &stream));
    }

    // stream_chunk: the stream engine's frame payloads, as the relay's builders write them
    for (name, payload) in common::stream_chunk_seeds() {
        put(&dir, "stream_chunk", name, &payload);
    }

    let _ = fs::remove_dir_all(std::env::temp_dir().join(format!("livemig-fuzz-{}-index", std::process::id())));
    let _ = fs::remove_dir_all(std::env::temp_dir().join(format!("livemig-fuzz-{}-tls", std::process::id())));
    let _ = std::io::stdout().flush();
    println!("seeds written to {}", dir.display());
}
