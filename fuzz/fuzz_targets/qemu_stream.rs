//! `livemig_stream::Parser` (and `ReturnPathParser`) over arbitrary bytes fed in chunks.
//! Input: `[chunk][stream]`; the stream is fed `chunk` bytes at a time (0 = all at once).
//! Contract: never panic; after every feed the events rebuild exactly the bytes fed minus the
//! held ones (at most `MAX_HELD`, none once opaque), so a prefix of the input; after `finish` the
//! whole input; at most one fallback; no record after the stream became opaque; every record
//! lies within a block of the block list. The return-path parser rebuilds the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig_fuzz_common::stream_chunk;
use livemig_stream::{Event, Parser, Phase, ReturnPathParser, RpEvent, MAX_HELD};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else { return };
    let chunk = stream_chunk(mode, stream.len());

    let mut p = Parser::new();
    let mut rebuilt = Vec::new();
    let mut fed = 0usize;
    let mut checked = 0usize;
    let mut opaque_only = false;
    let mut fallbacks = 0;
    let mut check = |p: &Parser, events: std::vec::Drain<'_, Event>, rebuilt: &mut Vec<u8>| {
        for e in events {
            match &e {
                Event::Fallback { .. } => {
                    assert!(!opaque_only, "fallback after the stream became opaque");
                    fallbacks += 1;
                    opaque_only = true;
                }
                Event::RamDone => {
                    assert!(!opaque_only, "RamDone after the stream became opaque");
                    opaque_only = true;
                }
                Event::Page(_) | Event::Zero(_) => {
                    assert!(!opaque_only, "a record after the stream became opaque");
                    let h = match &e {
                        Event::Page(r) => &r.header,
                        Event::Zero(r) => &r.header,
                        _ => unreachable!(),
                    };
                    let b = p.blocks().iter().find(|b| &b.name == h.block()).expect("the record's block is listed");
                    assert!(h.offset() < b.used_length, "record beyond its block");
                }
                Event::Opaque(_) | Event::RamSectionStart { .. } | Event::RamSectionEnd(_) | Event::SwitchoverStart => {}
            }
            e.write_to(rebuilt);
        }
    };
    let mut events = Vec::new();
    for c in stream.chunks(chunk) {
        p.feed(c, &mut |e| events.push(e));
        fed += c.len();
        check(&p, events.drain(..), &mut rebuilt);
        assert!(p.held() <= MAX_HELD);
        assert_eq!(rebuilt.len() + p.held(), fed, "bytes lost or invented");
        // Only the new bytes: comparing the whole prefix every time is quadratic.
        assert_eq!(rebuilt[checked..], stream[checked..rebuilt.len()], "the rebuild is not a prefix of the input");
        checked = rebuilt.len();
        if matches!(p.phase(), Phase::RamDone | Phase::Fallback) {
            assert_eq!(p.held(), 0, "bytes held while opaque");
        }
    }
    let mut fin = Vec::new();
    let _ = p.finish(&mut |e| fin.push(e));
    assert!(fin.iter().all(|e| matches!(e, Event::Opaque(_))));
    check(&p, fin.drain(..), &mut rebuilt);
    assert_eq!(rebuilt, stream, "the rebuild after finish is not the input");
    assert!(fallbacks <= 1);
    let s = p.stats();
    assert_eq!(s.opaque_bytes + s.record_bytes, stream.len() as u64);

    let mut rp = ReturnPathParser::new();
    let mut out = Vec::new();
    let mut push = |e: RpEvent| e.write_to(&mut out);
    for c in stream.chunks(chunk) {
        rp.feed(c, &mut push);
    }
    let _ = rp.finish(&mut push);
    assert_eq!(out, stream, "the return path's rebuild is not the input");
});
