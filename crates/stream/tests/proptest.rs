//! Random valid streams from a model (serialised by the test's own writer, fed in random
//! chunks) parse into the model's pages and rebuild byte-identical; random, truncated and
//! mutated streams never panic and never make the parser invent bytes.

mod support;

use livemig_stream::{Event, Parser, Phase, RamSectionSummary, ReturnPathParser, RpEvent, SectionKind, PAGE_SIZE};
use proptest::prelude::*;
use support::*;

#[derive(Debug, Clone)]
struct Config {
    machine: Vec<u8>,
    page_bits: bool,
    ignore_shared: bool,
    uuid: Option<[u8; 16]>,
}

#[derive(Debug, Clone)]
struct Block {
    name: Vec<u8>,
    pages: u64,
    addr: u64,
}

#[derive(Debug, Clone)]
enum Rec {
    Page { block: usize, page: u64, seed: u64, cont: bool },
    Zero { block: usize, page: u64, fill: u8, cont: bool },
}

#[derive(Debug, Clone)]
struct Model {
    config: Option<Config>,
    return_path: bool,
    ram_id: u32,
    blocks: Vec<Block>,
    /// PART sections, each preceded by that many PING commands.
    parts: Vec<(u8, Vec<Rec>)>,
    switchover_start: bool,
    end: Vec<Rec>,
    /// Sections after the RAM END: (type END or FULL, id, idstr, payload).
    devices: Vec<(u8, u32, Vec<u8>, Vec<u8>)>,
    vmdesc: Option<Vec<u8>>,
}

/// A record as the parser must report it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    block: Vec<u8>,
    offset: u64,
    continued: bool,
    /// Page data, or the fill byte of a ZERO record.
    content: Result<Box<[u8; PAGE_SIZE]>, u8>,
}

impl Model {
    /// The stream's bytes, the records it holds and the (pages, zeros) of each ram section.
    fn serialise(&self) -> (Vec<u8>, Vec<Expected>, Vec<(u64, u64)>) {
        let mut w = W::new();
        let mut exp = Vec::new();
        let mut counts = Vec::new();
        w.header();
        let ignore_shared = self.config.as_ref().is_some_and(|c| c.ignore_shared);
        if let Some(c) = &self.config {
            w.config(&c.machine);
            if c.page_bits {
                w.sub_page_bits(12);
            }
            if c.ignore_shared {
                w.sub_caps(&["x-ignore-shared"]);
            }
            if let Some(u) = c.uuid {
                w.sub_uuid(u);
            }
        }
        if self.return_path {
            w.open_return_path().ping(1);
        }
        let id = self.ram_id;
        w.ram_start(id);
        let list: Vec<(&[u8], u64, Option<u64>)> = self
            .blocks
            .iter()
            .map(|b| (b.name.as_slice(), b.pages * PAGE_SIZE as u64, ignore_shared.then_some(b.addr)))
            .collect();
        w.mem_size(&list).eos().footer(id);
        counts.push((0, 0));
        let mut last: Option<usize> = None;
        let mut records = |w: &mut W, recs: &[Rec], exp: &mut Vec<Expected>| {
            let (mut pages, mut zeros) = (0, 0);
            for r in recs {
                let (block, page, cont) = match r {
                    Rec::Page { block, page, cont, .. } | Rec::Zero { block, page, cont, .. } => (*block, *page, *cont),
                };
                let b = &self.blocks[block];
                let page = page % b.pages;
                let continued = cont && last == Some(block);
                last = Some(block);
                let name = (!continued).then_some(b.name.as_slice());
                let offset = page * PAGE_SIZE as u64;
                let content = match r {
                    Rec::Page { seed, .. } => {
                        let data = page_data(*seed);
                        w.page(offset, name, &data);
                        pages += 1;
                        Ok(data)
                    }
                    Rec::Zero { fill, .. } => {
                        w.zero(offset, name, *fill);
                        zeros += 1;
                        Err(*fill)
                    }
                };
                exp.push(Expected { block: b.name.clone(), offset, continued, content });
            }
            (pages, zeros)
        };
        for (pings, recs) in &self.parts {
            for i in 0..*pings {
                w.ping(u32::from(i));
            }
            w.part(id);
            counts.push(records(&mut w, recs, &mut exp));
            w.eos().footer(id);
        }
        if self.switchover_start {
            w.switchover_start();
        }
        w.end(id);
        counts.push(records(&mut w, &self.end, &mut exp));
        w.eos().footer(id);
        for (ty, sid, idstr, payload) in &self.devices {
            if *ty == 0x04 {
                w.section_full_header(0x04, *sid, idstr, 0, 1);
            } else {
                w.end(*sid);
            }
            w.raw(payload).footer(*sid);
        }
        w.eof();
        if let Some(j) = &self.vmdesc {
            w.vmdesc(j);
        }
        (w.bytes(), exp, counts)
    }
}

fn rec_strategy(nblocks: usize) -> impl Strategy<Value = Rec> {
    prop_oneof![
        (0..nblocks, any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(block, page, seed, cont)| Rec::Page {
            block,
            page,
            seed,
            cont
        }),
        (0..nblocks, any::<u64>(), prop_oneof![Just(0u8), any::<u8>()], any::<bool>())
            .prop_map(|(block, page, fill, cont)| Rec::Zero { block, page, fill, cont }),
    ]
}

fn model_strategy() -> impl Strategy<Value = Model> {
    let config = proptest::option::weighted(
        0.9,
        (
            prop::collection::vec(any::<u8>(), 0..40),
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(any::<[u8; 16]>()),
        )
            .prop_map(|(machine, page_bits, ignore_shared, uuid)| Config {
                machine,
                page_bits,
                ignore_shared,
                uuid,
            }),
    );
    let blocks =
        prop::collection::vec((prop::collection::vec(any::<u8>(), 0..24), 1u64..=(1 << 20), any::<u64>()), 1..6)
            .prop_map(|v| {
                v.into_iter()
                    .enumerate()
                    .map(|(i, (mut name, pages, addr))| {
                        // Unique names: the index and a separator first.
                        let mut n = format!("{i}/").into_bytes();
                        n.append(&mut name);
                        n.truncate(255);
                        Block { name: n, pages, addr }
                    })
                    .collect::<Vec<_>>()
            });
    (config, any::<bool>(), any::<u32>(), blocks).prop_flat_map(|(config, return_path, ram_id, blocks)| {
        let n = blocks.len();
        let parts = prop::collection::vec((0u8..3, prop::collection::vec(rec_strategy(n), 0..12)), 0..5);
        let end = prop::collection::vec(rec_strategy(n), 0..6);
        let devices = prop::collection::vec(
            (
                prop_oneof![Just(0x03u8), Just(0x04u8)],
                any::<u32>(),
                prop::collection::vec(any::<u8>(), 0..30),
                prop::collection::vec(any::<u8>(), 0..300),
            ),
            0..4,
        );
        let vmdesc = proptest::option::of(prop::collection::vec(any::<u8>(), 0..200));
        (Just((config.clone(), return_path, ram_id, blocks.clone())), parts, any::<bool>(), end, devices, vmdesc)
            .prop_map(|((config, return_path, ram_id, blocks), parts, switchover_start, end, devices, vmdesc)| Model {
                config,
                return_path,
                ram_id,
                blocks,
                parts,
                switchover_start,
                end,
                devices,
                vmdesc,
            })
    })
}

fn chunks() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![1usize..16, 1usize..5000, 4000usize..20000], 1..16)
}

fn expected_of(ev: &[Event]) -> Vec<Expected> {
    ev.iter()
        .filter_map(|e| match e {
            Event::Page(p) => Some(Expected {
                block: p.header.block().as_bytes().to_vec(),
                offset: p.header.offset(),
                continued: p.header.continued(),
                content: Ok(p.data.clone()),
            }),
            Event::Zero(z) => Some(Expected {
                block: z.header.block().as_bytes().to_vec(),
                offset: z.header.offset(),
                continued: z.header.continued(),
                content: Err(z.fill),
            }),
            _ => None,
        })
        .collect()
}

/// Feeds in chunks checking after every feed that the events so far rebuild exactly the bytes
/// fed minus those held back; then finishes (the rebuild is then the whole input).
fn feed_checked(data: &[u8], sizes: &[usize]) -> (Parser, Vec<Event>) {
    let mut p = Parser::new();
    let mut events = Vec::new();
    let mut rebuilt = Vec::new();
    let mut fed = 0;
    let mut k = 0;
    let mut fallbacks = 0;
    let mut after_end = false;
    while fed < data.len() {
        let n = sizes[k % sizes.len()].max(1).min(data.len() - fed);
        k += 1;
        let mut new = Vec::new();
        p.feed(&data[fed..fed + n], &mut |e| new.push(e));
        fed += n;
        for e in &new {
            e.write_to(&mut rebuilt);
            match e {
                Event::Fallback { .. } => {
                    fallbacks += 1;
                    assert!(!after_end, "fallback after RamDone");
                    after_end = true;
                }
                Event::RamDone => after_end = true,
                Event::Opaque(_) => {}
                other => assert!(!after_end, "{other:?} after the stream became opaque"),
            }
        }
        events.extend(new);
        assert!(p.held() <= livemig_stream::MAX_HELD);
        assert_eq!(rebuilt.len() + p.held(), fed, "bytes lost or invented");
        assert_eq!(rebuilt[..], data[..rebuilt.len()], "the rebuild is not a prefix of the input");
        if matches!(p.phase(), Phase::RamDone | Phase::Fallback) {
            assert_eq!(p.held(), 0);
        }
    }
    assert!(fallbacks <= 1);
    let mut fin = Vec::new();
    let _ = p.finish(&mut |e| fin.push(e));
    for e in &fin {
        assert!(matches!(e, Event::Opaque(_)), "finish gave {e:?}");
        e.write_to(&mut rebuilt);
    }
    events.extend(fin);
    assert_eq!(rebuilt, data, "the rebuild after finish is not the input");
    (p, events)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn model_streams_round_trip(model in model_strategy(), sizes in chunks()) {
        let (data, exp, counts) = model.serialise();
        let (p, ev) = feed_checked(&data, &sizes);
        prop_assert!(fallbacks(&ev).is_empty(), "fallback {:?}", fallbacks(&ev));
        prop_assert!(ev.contains(&Event::RamDone));
        prop_assert_eq!(&expected_of(&ev), &exp);
        // Section summaries.
        let sums: Vec<RamSectionSummary> =
            ev.iter().filter_map(|e| if let Event::RamSectionEnd(s) = e { Some(*s) } else { None }).collect();
        prop_assert_eq!(sums.iter().map(|s| (s.pages, s.zeros)).collect::<Vec<_>>(), counts);
        prop_assert!(sums.iter().all(|s| s.section_id == model.ram_id));
        prop_assert_eq!(sums.first().map(|s| s.kind), Some(SectionKind::Start));
        prop_assert_eq!(sums.last().map(|s| s.kind), Some(SectionKind::End));
        prop_assert_eq!(ev.contains(&Event::SwitchoverStart), model.switchover_start);
        // Configuration facts.
        let c = p.config();
        match &model.config {
            Some(m) => {
                prop_assert_eq!(c.machine.clone(), Some(String::from_utf8_lossy(&m.machine).into_owned()));
                prop_assert_eq!(c.x_ignore_shared(), m.ignore_shared);
                prop_assert_eq!(c.target_page_bits, m.page_bits.then_some(12));
                prop_assert_eq!(c.uuid, m.uuid);
            }
            None => prop_assert!(!c.present),
        }
        prop_assert_eq!(p.return_path_opened(), model.return_path);
        let blocks: Vec<_> = p.blocks().iter().map(|b| (b.name.as_bytes().to_vec(), b.used_length, b.addr)).collect();
        let ignore = model.config.as_ref().is_some_and(|c| c.ignore_shared);
        let want: Vec<_> = model
            .blocks
            .iter()
            .map(|b| (b.name.clone(), b.pages * PAGE_SIZE as u64, ignore.then_some(b.addr)))
            .collect();
        prop_assert_eq!(blocks, want);
        // Same events as one feed, apart from how opaque bytes are split.
        let (_, whole, r) = parse_all(&data);
        prop_assert!(r.is_ok());
        prop_assert_eq!(normalize(&ev), normalize(&whole));
        let s = p.stats();
        prop_assert_eq!(s.pages + s.zeros, exp.len() as u64);
        prop_assert_eq!(s.opaque_bytes + s.record_bytes, data.len() as u64);
    }

    #[test]
    fn truncated_model_streams_give_a_prefix_of_the_pages(model in model_strategy(), cut in any::<prop::sample::Index>(), sizes in chunks()) {
        let (data, exp, _) = model.serialise();
        let cut = cut.index(data.len() + 1);
        let (_, ev) = feed_checked(&data[..cut], &sizes);
        prop_assert!(fallbacks(&ev).is_empty());
        let got = expected_of(&ev);
        prop_assert_eq!(&exp[..got.len()], &got[..]);
    }

    #[test]
    fn mutated_model_streams_never_panic(
        model in model_strategy(),
        muts in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        sizes in chunks(),
    ) {
        let (mut data, _, _) = model.serialise();
        for (i, v) in muts {
            let i = i.index(data.len());
            data[i] = v;
        }
        let (_, ev) = feed_checked(&data, &sizes);
        // Every page reported lies in the bytes (checked by the rebuild) and at most one
        // fallback; nothing else to say about arbitrary damage.
        prop_assert!(fallbacks(&ev).len() <= 1);
    }

    #[test]
    fn garbage_never_panics(
        prefix in prop_oneof![Just(Vec::new()), Just(b"QEVM\0\0\0\x03".to_vec()), Just(b"QEVM\0\0\0\x03\x01\0\0\0\0\x03ram\0\0\0\0\0\0\0\x04".to_vec())],
        body in prop::collection::vec(any::<u8>(), 0..3000),
        sizes in chunks(),
    ) {
        let mut data = prefix;
        data.extend(body);
        feed_checked(&data, &sizes);
    }

    #[test]
    fn return_path_round_trips(
        msgs in prop::collection::vec((0u16..10, prop::collection::vec(any::<u8>(), 0..600)), 0..20),
        sizes in chunks(),
    ) {
        let mut data = Vec::new();
        for (t, d) in &msgs {
            data.extend_from_slice(&t.to_be_bytes());
            data.extend_from_slice(&u16::try_from(d.len()).unwrap_or(0).to_be_bytes());
            data.extend_from_slice(d);
        }
        let mut p = ReturnPathParser::new();
        let mut ev = rp_feed_chunked(&mut p, &data, &sizes);
        let fin = p.finish(&mut |e| ev.push(e));
        prop_assert!(fin.is_ok());
        prop_assert_eq!(rp_rebuild(&ev), data);
        // Messages up to the first over-long one, then opaque.
        let first_long = msgs.iter().position(|(_, d)| d.len() > 512).unwrap_or(msgs.len());
        let n = ev.iter().filter(|e| matches!(e, RpEvent::Message(_))).count();
        prop_assert_eq!(n, first_long);
        for (e, (t, d)) in ev.iter().zip(&msgs) {
            if let RpEvent::Message(m) = e {
                prop_assert_eq!(m.msg_type(), *t);
                prop_assert_eq!(m.payload(), &d[..]);
            }
        }
    }

    #[test]
    fn return_path_garbage(data in prop::collection::vec(any::<u8>(), 0..2000), sizes in chunks()) {
        let mut p = ReturnPathParser::new();
        let mut ev = rp_feed_chunked(&mut p, &data, &sizes);
        let _ = p.finish(&mut |e| ev.push(e));
        prop_assert_eq!(rp_rebuild(&ev), data);
    }
}
