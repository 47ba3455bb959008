//! `livemig_stream::chunk::parse`, the stream engine's frame payload (what the receiver decodes
//! from the sender's Stream frames), over arbitrary bytes.
//! Contract: never panic; what parses is re-encoded by the real builders (`ChunkBuilder`,
//! `resend_payload`) into exactly the input, so nothing is dropped, reordered or invented; every
//! page header is within its bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig_stream::chunk::{parse, resend_payload, ChunkBuilder, Item, Payload, MAX_HEADER};

fuzz_target!(|data: &[u8]| {
    let Ok(payload) = parse(data) else { return };
    let rebuilt = match payload {
        Payload::Chunk { seq, items } => {
            let mut b = ChunkBuilder::new(seq);
            for it in &items {
                match it {
                    Item::Opaque(o) => b.opaque(o),
                    Item::Page { header, record } => {
                        assert!((8..=MAX_HEADER).contains(&header.len()), "page header of {} bytes", header.len());
                        b.page(header, record);
                    }
                }
            }
            assert_eq!(b.items() as usize, items.len());
            b.finish()
        }
        Payload::Resend { seq, item, data: page } => resend_payload(seq, item, page),
    };
    assert_eq!(rebuilt, data, "re-encoding what parsed gives other bytes");
});
