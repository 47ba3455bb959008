//! Hand-built streams: every record kind, CONTINUE, the block list with and without
//! x-ignore-shared, the fallback cases, chunking, the return path.

mod support;

use livemig_stream::{
    rebuild, BlockName, Event, PageRecord, Parser, Phase, RamSectionSummary, RecordHeader, ReturnPathParser, RpEvent,
    RpKind, SectionKind, StreamError, ZeroRecord, PAGE_SIZE,
};
use support::*;

const RAM_ID: u32 = 2;
const MB: u64 = 1 << 20;

fn blocks_plain() -> Vec<(&'static [u8], u64, Option<u64>)> {
    vec![(b"pc.ram", 64 * MB, None), (b"/rom@etc/acpi/tables", 128 << 10, None), (b"pc.bios", 256 << 10, None)]
}

/// Header, configuration, return path, ram START with the block list.
fn prologue(w: &mut W) {
    w.header().config(b"pc-q35-10.0").open_return_path().ping(1);
    w.ram_start(RAM_ID).mem_size(&blocks_plain()).eos().footer(RAM_ID);
}

/// A whole stream: START, one PART with every record kind, END, devices, EOF, vmdesc.
fn full_stream() -> Vec<u8> {
    let mut w = W::new();
    prologue(&mut w);
    w.part(RAM_ID);
    w.page(0, Some(b"pc.ram"), &page_data(1));
    w.page(4096, None, &page_data(2));
    w.zero(8192, None, 0);
    w.zero(0, Some(b"pc.bios"), 0);
    w.page(4096, None, &page_data(3));
    w.eos().footer(RAM_ID);
    w.switchover_start();
    w.end(RAM_ID).zero(12288, Some(b"pc.ram"), 0).eos().footer(RAM_ID);
    w.section_full_header(0x04, 3, b"timer", 0, 2).raw(&[1, 2, 3, 4, 5, 6, 7, 8]).footer(3);
    w.eof().vmdesc(br#"{"page_size": 4096, "devices": []}"#);
    w.bytes()
}

fn pages(events: &[Event]) -> Vec<&PageRecord> {
    events.iter().filter_map(|e| if let Event::Page(p) = e { Some(p) } else { None }).collect()
}

fn zeros(events: &[Event]) -> Vec<&ZeroRecord> {
    events.iter().filter_map(|e| if let Event::Zero(z) = e { Some(z) } else { None }).collect()
}

fn markers(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Opaque(_) => None,
            Event::Page(p) => Some(format!("page {} {:#x}", p.header.block(), p.header.offset())),
            Event::Zero(z) => Some(format!("zero {} {:#x}", z.header.block(), z.header.offset())),
            other => Some(format!("{other:?}")),
        })
        .collect()
}

#[test]
fn full_stream_parses_and_rebuilds() {
    let data = full_stream();
    let (p, ev, r) = parse_all(&data);
    r.expect("clean end");
    assert_eq!(rebuild(&ev), data);
    assert!(fallbacks(&ev).is_empty(), "{:?}", fallbacks(&ev));
    assert_eq!(
        markers(&ev),
        vec![
            "RamSectionStart { kind: Start, section_id: 2 }",
            "RamSectionEnd(RamSectionSummary { kind: Start, section_id: 2, pages: 0, zeros: 0 })",
            "RamSectionStart { kind: Part, section_id: 2 }",
            "page pc.ram 0x0",
            "page pc.ram 0x1000",
            "zero pc.ram 0x2000",
            "zero pc.bios 0x0",
            "page pc.bios 0x1000",
            "RamSectionEnd(RamSectionSummary { kind: Part, section_id: 2, pages: 3, zeros: 2 })",
            "SwitchoverStart",
            "RamSectionStart { kind: End, section_id: 2 }",
            "zero pc.ram 0x3000",
            "RamSectionEnd(RamSectionSummary { kind: End, section_id: 2, pages: 0, zeros: 1 })",
            "RamDone",
        ]
    );
    let ps = pages(&ev);
    assert_eq!(*ps[0].data, *page_data(1));
    assert!(ps[0].header.name_written() && !ps[0].header.continued());
    assert!(ps[1].header.continued());
    assert_eq!(*ps[2].data, *page_data(3));
    assert_eq!(p.phase(), Phase::Finished);
    assert_eq!(p.config().machine.as_deref(), Some("pc-q35-10.0"));
    assert!(p.config().present && !p.config().x_ignore_shared());
    assert!(p.return_path_opened() && p.switchover_started());
    assert_eq!(p.ram_section_id(), Some(RAM_ID));
    assert_eq!(p.ram_total(), Some(64 * MB + (384 << 10)));
    let names: Vec<_> = p.blocks().iter().map(|b| (b.name.to_string_lossy(), b.used_length, b.addr)).collect();
    assert_eq!(
        names,
        vec![
            ("pc.ram".to_string(), 64 * MB, None),
            ("/rom@etc/acpi/tables".to_string(), 128 << 10, None),
            ("pc.bios".to_string(), 256 << 10, None)
        ]
    );
    let s = p.stats();
    assert_eq!((s.pages, s.zeros, s.ram_sections, s.commands), (3, 3, 3, 3));
    assert_eq!(s.bytes_in, data.len() as u64);
    assert_eq!(s.opaque_bytes + s.record_bytes, data.len() as u64);
    // The page records alone: three pages of 8 + (1 + 6) + 4096 or 8 + 4096 bytes.
    assert_eq!(s.record_bytes, (8 + 7 + 4096) + (8 + 4096) + (8 + 4096) + (8 + 1) + (8 + 8 + 1) + (8 + 7 + 1));
}

#[test]
fn opaque_after_ram_end_is_passed_as_received() {
    let mut w = W::new();
    prologue(&mut w);
    w.end(RAM_ID).eos().footer(RAM_ID);
    let mut p = Parser::new();
    let ev = p.feed_vec(&w.bytes());
    assert!(ev.contains(&Event::RamDone));
    assert_eq!(p.phase(), Phase::RamDone);
    // Whatever follows, even garbage, goes out at once and whole.
    let ev = p.feed_vec(b"\xffgarbage");
    assert_eq!(ev, vec![Event::Opaque(b"\xffgarbage".to_vec())]);
    assert_eq!(p.held(), 0);
}

#[test]
fn one_byte_chunks_give_the_same_events() {
    let data = full_stream();
    let (_, whole, r) = parse_all(&data);
    r.expect("clean");
    for sizes in [vec![1], vec![2, 3, 5], vec![4095, 1, 4097], vec![7, 8191, 13]] {
        let mut p = Parser::new();
        let (ev, fin, r) = feed_chunked(&mut p, &data, &sizes);
        r.expect("clean");
        assert!(fin.is_empty());
        assert_eq!(normalize(&ev), normalize(&whole), "sizes {sizes:?}");
        assert_eq!(rebuild(&ev), data);
    }
}

#[test]
fn held_bytes_are_bounded_and_released() {
    let data = full_stream();
    let mut p = Parser::new();
    let mut out = Vec::new();
    for b in &data {
        p.feed(std::slice::from_ref(b), &mut |e| out.push(e));
        assert!(p.held() < 8 + 1 + 255 + PAGE_SIZE);
        // Everything but the held bytes has been handed out.
        assert_eq!((rebuild(&out).len() + p.held()) as u64, p.stats().bytes_in);
    }
}

#[test]
fn zero_fill_byte_is_kept() {
    let mut w = W::new();
    prologue(&mut w);
    w.part(RAM_ID).zero(0, Some(b"pc.ram"), 0xab).zero(4096, None, 0).eos().footer(RAM_ID);
    let data = w.bytes();
    let (_, ev, r) = parse_all(&data);
    r.expect("clean");
    let z = zeros(&ev);
    assert_eq!((z[0].fill, z[1].fill), (0xab, 0));
    assert_eq!(rebuild(&ev), data);
}

#[test]
fn continue_follows_the_last_block_across_sections() {
    let mut w = W::new();
    prologue(&mut w);
    w.part(RAM_ID).page(0, Some(b"pc.bios"), &page_data(9)).eos().footer(RAM_ID);
    w.part(RAM_ID).zero(0x3000, None, 0).eos().footer(RAM_ID);
    w.part(RAM_ID)
        .zero(0x5000, Some(b"/rom@etc/acpi/tables"), 0)
        .page(0x1000, None, &page_data(4))
        .eos()
        .footer(RAM_ID);
    let data = w.bytes();
    let (_, ev, r) = parse_all(&data);
    r.expect("clean");
    assert!(fallbacks(&ev).is_empty());
    let z = zeros(&ev);
    assert_eq!(z[0].header.block().as_bytes(), b"pc.bios");
    assert!(z[0].header.continued());
    let ps = pages(&ev);
    assert_eq!(ps[1].header.block().as_bytes(), b"/rom@etc/acpi/tables");
    assert!(ps[1].header.continued());
    assert_eq!(rebuild(&ev), data);
}

#[test]
fn continue_without_a_block_falls_back() {
    let mut w = W::new();
    prologue(&mut w);
    w.part(RAM_ID).page(0, None, &page_data(1)).eos().footer(RAM_ID);
    let data = w.bytes();
    let (p, ev, r) = parse_all(&data);
    r.expect("fallback is a clean pass-through");
    assert_eq!(fallbacks(&ev), vec!["a CONTINUE record with no block before it".to_string()]);
    assert!(pages(&ev).is_empty());
    assert_eq!(p.phase(), Phase::Finished);
    assert_eq!(rebuild(&ev), data);
}

#[test]
fn block_list_with_x_ignore_shared_has_addresses() {
    let mut w = W::new();
    w.header().config(b"pc-q35-7.2").sub_caps(&["x-ignore-shared"]);
    w.ram_start(RAM_ID);
    w.mem_size(&[
        (b"mem0", 64 * MB, Some(0)),
        (b"pc.bios", 256 << 10, Some(0xfffc_0000)),
        (b"pc.rom", 128 << 10, Some(0xc0000)),
    ]);
    w.eos().footer(RAM_ID);
    w.part(RAM_ID).page(0, Some(b"pc.bios"), &page_data(5)).eos().footer(RAM_ID);
    w.end(RAM_ID).eos().footer(RAM_ID).eof();
    let data = w.bytes();
    let (p, ev, r) = parse_all(&data);
    r.expect("clean");
    assert!(fallbacks(&ev).is_empty(), "{:?}", fallbacks(&ev));
    assert!(p.config().x_ignore_shared());
    assert_eq!(p.config().capabilities, vec!["x-ignore-shared".to_string()]);
    let addrs: Vec<_> = p.blocks().iter().map(|b| b.addr).collect();
    assert_eq!(addrs, vec![Some(0), Some(0xfffc_0000), Some(0xc0000)]);
    assert_eq!(pages(&ev).len(), 1);
    assert!(ev.contains(&Event::RamDone));
    assert_eq!(rebuild(&ev), data);
}

#[test]
fn block_list_without_x_ignore_shared_read_with_it_falls_back_or_misparses_never() {
    // The same list without addresses but with the capability announced: the parser reads
    // addresses that are not there, the sums do not match, and it falls back.
    let mut w = W::new();
    w.header().config(b"m").sub_caps(&["x-ignore-shared"]);
    w.ram_start(RAM_ID).mem_size(&blocks_plain()).eos().footer(RAM_ID);
    w.part(RAM_ID).page(0, Some(b"pc.ram"), &page_data(1)).eos().footer(RAM_ID);
    let data = w.bytes();
    let (_, ev, _) = parse_all(&data);
    assert_eq!(fallbacks(&ev).len(), 1);
    assert!(pages(&ev).is_empty());
    assert_eq!(rebuild(&ev), data);
}

#[test]
fn configuration_subsections() {
    let uuid = *b"0123456789abcdef";
    let mut w = W::new();
    w.header().config(b"pc-i440fx-7.2").sub_page_bits(12).sub_caps(&[]).sub_uuid(uuid);
    w.ram_start(RAM_ID).mem_size(&blocks_plain()).eos().footer(RAM_ID);
    let data = w.bytes();
    let (p, ev, r) = parse_all(&data);
    r.expect("clean");
    assert!(fallbacks(&ev).is_empty());
    let c = p.config();
    assert_eq!((c.target_page_bits, c.uuid, c.capabilities.len()), (Some(12), Some(uuid), 0));
    assert_eq!(p.phase(), Phase::Finished);

    // Another page size, an unknown subsection, a capability that changes the format.
    for (w, want) in [
        (W::new().header().config(b"virt").sub_page_bits(16).clone(), "target page bits 16"),
        (
            W::new().header().config(b"m").u8(0x05).name(b"configuration/new").be32(1).be32(0).clone(),
            "unknown configuration subsection",
        ),
        (
            W::new().header().config(b"m").sub_caps(&["x-ignore-shared", "mapped-ram"]).clone(),
            "capability \"mapped-ram\"",
        ),
        (W::new().header().u8(0x07).be32(100_000).clone(), "machine type name of 100000 bytes"),
        (W::new().header().config(b"m").u8(0x05).name(b"configuration/uuid").be32(2).clone(), "version 2"),
        (
            W::new().header().config(b"m").u8(0x05).name(b"configuration/capabilities").be32(1).be32(1000).clone(),
            "1000 capabilities",
        ),
    ] {
        let data = w.bytes();
        let (_, ev, r) = parse_all(&data);
        r.expect("fallback ends cleanly");
        let f = fallbacks(&ev);
        assert!(f.len() == 1 && f[0].contains(want), "{f:?} should say {want}");
        assert_eq!(rebuild(&ev), data);
    }
}

fn fallback_of(tail: impl FnOnce(&mut W)) -> (Vec<Event>, Vec<u8>) {
    let mut w = W::new();
    prologue(&mut w);
    tail(&mut w);
    w.raw(b"some bytes after");
    let data = w.bytes();
    let mut p = Parser::new();
    let (ev, _, r) = feed_chunked(&mut p, &data, &[3, 1, 4, 1, 5, 9, 2, 6]);
    r.expect("fallback ends cleanly");
    assert_eq!(rebuild(&ev), data);
    assert_eq!(p.fallback_reason().map(str::to_string), fallbacks(&ev).first().cloned());
    (ev, data)
}

#[test]
fn fallback_cases() {
    type Tail = Box<dyn FnOnce(&mut W)>;
    let cases: Vec<(&str, Tail)> = vec![
        (
            "XBZRLE",
            Box::new(|w| {
                w.part(RAM_ID).rec(0, 0x40, Some(b"pc.ram")).u8(1).be16(3).raw(b"abc");
            }),
        ),
        (
            "compressed page",
            Box::new(|w| {
                w.part(RAM_ID).rec(0, 0x100, Some(b"pc.ram")).be32(2).raw(b"zz");
            }),
        ),
        (
            "RDMA hook",
            Box::new(|w| {
                w.part(RAM_ID).be64(0x80);
            }),
        ),
        (
            "MULTIFD_FLUSH",
            Box::new(|w| {
                w.part(RAM_ID).be64(0x200);
            }),
        ),
        (
            "obsolete FULL",
            Box::new(|w| {
                w.part(RAM_ID).be64(0x01);
            }),
        ),
        (
            "MEM_SIZE record outside",
            Box::new(|w| {
                w.part(RAM_ID).mem_size(&blocks_plain());
            }),
        ),
        (
            "START section \"block\"",
            Box::new(|w| {
                w.section_full_header(0x01, 3, b"block", 0, 1);
            }),
        ),
        (
            "FULL section \"virtio-mem-device-early\"",
            Box::new(|w| {
                w.section_full_header(0x04, 3, b"virtio-mem-device-early", 0, 1);
            }),
        ),
        (
            "PART of section 7",
            Box::new(|w| {
                w.part(7);
            }),
        ),
        (
            "END of section 7",
            Box::new(|w| {
                w.end(7);
            }),
        ),
        (
            "a second ram START",
            Box::new(|w| {
                w.ram_start(5);
            }),
        ),
        (
            "POSTCOPY_ADVISE of 16 bytes: postcopy-ram is on",
            Box::new(|w| {
                w.cmd(3, &[0; 16]);
            }),
        ),
        (
            // dirty-bitmaps alone: an empty advise passes, its section falls back.
            "START section \"dirty-bitmap\"",
            Box::new(|w| {
                w.cmd(3, &[]).section_full_header(0x01, 3, b"dirty-bitmap", 0, 1);
            }),
        ),
        (
            "command 7 of 4 bytes",
            Box::new(|w| {
                w.cmd(7, &[0, 0, 0, 4]).raw(b"QEVM");
            }),
        ),
        (
            "command 2 of 3 bytes",
            Box::new(|w| {
                w.cmd(2, &[0, 0, 1]);
            }),
        ),
        (
            "instead of the footer",
            Box::new(|w| {
                w.part(RAM_ID).eos().u8(0x02);
            }),
        ),
        (
            "footer of section 9",
            Box::new(|w| {
                w.part(RAM_ID).eos().footer(9);
            }),
        ),
        (
            "block \"pc.vram\", not in the block list",
            Box::new(|w| {
                w.part(RAM_ID).zero(0, Some(b"pc.vram"), 0);
            }),
        ),
        (
            "beyond the 0x40000 bytes of block pc.bios",
            Box::new(|w| {
                w.part(RAM_ID).zero(0x40000, Some(b"pc.bios"), 0);
            }),
        ),
        (
            "EOF before",
            Box::new(|w| {
                w.eof();
            }),
        ),
        (
            "vmdesc before",
            Box::new(|w| {
                w.vmdesc(b"{}");
            }),
        ),
        (
            "unknown top-level byte 0x7e",
            Box::new(|w| {
                w.footer(RAM_ID);
            }),
        ),
        (
            "EOS record with CONTINUE",
            Box::new(|w| {
                w.part(RAM_ID).be64(0x30);
            }),
        ),
    ];
    for (want, tail) in cases {
        let (ev, _) = fallback_of(tail);
        let f = fallbacks(&ev);
        assert!(f.len() == 1 && f[0].contains(want), "{f:?} should say {want}");
        // Nothing but opaque bytes after the fallback.
        let at = ev.iter().position(|e| matches!(e, Event::Fallback { .. })).expect("fallback");
        assert!(ev[at + 1..].iter().all(|e| matches!(e, Event::Opaque(_))), "{want}");
        assert!(!ev.contains(&Event::RamDone));
    }
}

#[test]
fn block_list_overrun_and_bad_header_fall_back() {
    let mut w = W::new();
    w.header().config(b"m").ram_start(RAM_ID);
    // total says 8 KiB, the block says 16 KiB.
    w.be64(0x2000 | 0x04).name(b"pc.ram").be64(0x4000).eos().footer(RAM_ID);
    let (_, ev, r) = parse_all(&w.bytes());
    r.expect("clean");
    assert!(fallbacks(&ev)[0].contains("overruns the MEM_SIZE total"));

    for (data, want) in
        [(b"QEVN\0\0\0\x03".to_vec(), "not a QEMU migration stream"), (b"QEVM\0\0\0\x02".to_vec(), "stream version 2")]
    {
        let (_, ev, r) = parse_all(&data);
        r.expect("clean");
        assert!(fallbacks(&ev)[0].contains(want));
        assert_eq!(rebuild(&ev), data);
    }
}

#[test]
fn ram_start_of_another_version_falls_back() {
    let mut w = W::new();
    w.header().section_full_header(0x01, 1, b"ram", 0, 3);
    let (_, ev, _) = parse_all(&w.bytes());
    assert!(fallbacks(&ev)[0].contains("version 3"));
}

#[test]
fn no_configuration_section_is_fine() {
    let mut w = W::new();
    w.header().ram_start(0).mem_size(&[(b"pc.ram", 8192, None)]).eos().footer(0);
    w.end(0).page(4096, Some(b"pc.ram"), &page_data(0)).eos().footer(0).eof();
    let data = w.bytes();
    let (p, ev, r) = parse_all(&data);
    r.expect("clean");
    assert!(!p.config().present);
    assert_eq!(pages(&ev).len(), 1);
    assert!(ev.contains(&Event::RamDone));
}

#[test]
fn truncated_streams_are_errors_but_rebuild_whole() {
    let data = full_stream();
    // Cuts inside the header, inside a page, inside a section, after the ram END.
    let page_cut = data.len() / 2;
    for cut in [0, 3, 40, page_cut] {
        let mut p = Parser::new();
        let mut ev = p.feed_vec(&data[..cut]);
        let r = p.finish(&mut |e| ev.push(e));
        assert!(matches!(r, Err(StreamError::Truncated { .. })), "cut {cut}: {r:?}");
        assert_eq!(rebuild(&ev), &data[..cut], "cut {cut}");
    }
    let mut p = Parser::new();
    let mut ev = p.feed_vec(&data[..data.len() - 3]);
    p.finish(&mut |e| ev.push(e)).expect("after RAM END, any end is clean");
    assert_eq!(rebuild(&ev), &data[..data.len() - 3]);
    // Between top-level items before the ram section: clean.
    let mut w = W::new();
    w.header().config(b"m").open_return_path();
    parse_all(&w.bytes()).2.expect("clean");
}

#[test]
fn records_built_by_hand_write_like_qemu() {
    let name = BlockName::new(b"pc.ram").expect("name");
    let data = page_data(7);
    let rec =
        PageRecord { header: RecordHeader::new(name.clone(), 0x5000, false).expect("header"), data: data.clone() };
    let mut got = Vec::new();
    rec.write_to(&mut got);
    assert_eq!(got, W::new().page(0x5000, Some(b"pc.ram"), &data).bytes());
    assert_eq!(rec.encoded_len(), got.len());
    assert_eq!(rec.word(), 0x5008);
    let z = ZeroRecord { header: RecordHeader::new(name.clone(), 0x6000, true).expect("header"), fill: 3 };
    let mut got = Vec::new();
    z.write_to(&mut got);
    assert_eq!(got, W::new().zero(0x6000, None, 3).bytes());
    assert_eq!((z.word(), z.encoded_len()), (0x6022, 9));

    assert_eq!(RecordHeader::new(name, 0x5001, false), Err(StreamError::Unaligned(0x5001)));
    assert_eq!(BlockName::new(&[b'a'; 256]), Err(StreamError::NameTooLong(256)));
    assert!(BlockName::new(&[b'a'; 255]).is_ok());
}

#[test]
fn section_summaries_count_records() {
    let mut w = W::new();
    prologue(&mut w);
    w.part(RAM_ID);
    for i in 0..10u64 {
        w.zero(i * 4096, if i == 0 { Some(b"pc.ram") } else { None }, 0);
    }
    w.page(10 * 4096, None, &page_data(1)).eos().footer(RAM_ID);
    let (_, ev, _) = parse_all(&w.bytes());
    let sums: Vec<_> =
        ev.iter().filter_map(|e| if let Event::RamSectionEnd(s) = e { Some(*s) } else { None }).collect();
    assert_eq!(sums[1], RamSectionSummary { kind: SectionKind::Part, section_id: RAM_ID, pages: 1, zeros: 10 });
}

// ---- return path ----

fn rp_msg(t: u16, data: &[u8]) -> Vec<u8> {
    let mut v = t.to_be_bytes().to_vec();
    v.extend_from_slice(&u16::try_from(data.len()).expect("len").to_be_bytes());
    v.extend_from_slice(data);
    v
}

#[test]
fn return_path_messages() {
    let mut data = Vec::new();
    data.extend(rp_msg(7, &[]));
    data.extend(rp_msg(2, &1u32.to_be_bytes()));
    data.extend(rp_msg(4, &[0; 12]));
    data.extend(rp_msg(3, &[9; 40]));
    data.extend(rp_msg(1, &0u32.to_be_bytes()));
    data.extend(rp_msg(7, &[1]));
    for sizes in [vec![1], vec![100_000], vec![3, 5, 2]] {
        let mut p = ReturnPathParser::new();
        let ev = rp_feed_chunked(&mut p, &data, &sizes);
        assert_eq!(rp_rebuild(&ev), data);
        let kinds: Vec<_> =
            ev.iter().map(|e| if let RpEvent::Message(m) = e { m.kind() } else { panic!("{e:?}") }).collect();
        assert_eq!(
            kinds,
            vec![
                RpKind::SwitchoverAck,
                RpKind::Pong,
                RpKind::Other(4),
                RpKind::Other(3),
                RpKind::Shut,
                RpKind::Other(7)
            ]
        );
        let RpEvent::Message(pong) = &ev[1] else { panic!() };
        assert_eq!((pong.value(), pong.msg_type(), pong.raw().len()), (Some(1), 2, 8));
        let RpEvent::Message(shut) = &ev[4] else { panic!() };
        assert_eq!(shut.value(), Some(0));
        assert_eq!((p.stats().messages, p.stats().switchover_ack, p.stats().shut, p.stats().pong), (6, 1, 1, 1));
        p.finish(&mut |_| panic!("nothing held")).expect("clean end");
    }
}

#[test]
fn return_path_overlong_message_falls_back() {
    let mut data = rp_msg(7, &[]);
    data.extend_from_slice(&[0, 3, 0x02, 0x01]); // 513 bytes announced
    data.extend_from_slice(&[5; 600]);
    let mut p = ReturnPathParser::new();
    let ev = rp_feed_chunked(&mut p, &data, &[1, 2, 50]);
    assert_eq!(rp_rebuild(&ev), data);
    assert!(matches!(&ev[0], RpEvent::Message(m) if m.kind() == RpKind::SwitchoverAck));
    assert!(matches!(&ev[1], RpEvent::Fallback { reason } if reason.contains("513")));
    assert!(ev[2..].iter().all(|e| matches!(e, RpEvent::Opaque(_))));
    // Exactly at the cap is a message.
    let ok = rp_msg(3, &[0; 512]);
    let mut p = ReturnPathParser::new();
    let ev = rp_feed_chunked(&mut p, &ok, &[1000]);
    assert!(matches!(&ev[..], [RpEvent::Message(m)] if m.payload().len() == 512));
}

#[test]
fn return_path_truncated() {
    let data = rp_msg(1, &0u32.to_be_bytes());
    let mut p = ReturnPathParser::new();
    let mut ev = rp_feed_chunked(&mut p, &data[..6], &[1]);
    assert!(ev.is_empty());
    assert_eq!(p.held(), 6);
    let r = p.finish(&mut |e| ev.push(e));
    assert_eq!(r, Err(StreamError::Truncated { state: "a return-path message", held: 6 }));
    assert_eq!(rp_rebuild(&ev), &data[..6]);
}
