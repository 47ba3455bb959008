//! JSON control messages: `livemig_wire::from_json::<Message>` on arbitrary bytes, and the same
//! bytes as the payload of a well-formed control frame through `read_message`. Contract: never
//! panic; both paths agree (`read_message` gives the message with its peer text sanitised);
//! sanitising twice changes nothing; an accepted message writes and reads back as its sanitised
//! form.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use livemig_wire::{FrameKind, Message};

fuzz_target!(|data: &[u8]| {
    let direct = livemig_wire::from_json::<Message>(data);
    let mut framed = Vec::new();
    let via_frame = match livemig_wire::write_frame(&mut framed, FrameKind::Control, data) {
        Ok(()) => Some(livemig_wire::read_message(&mut Cursor::new(framed))),
        Err(_) => None, // longer than any frame: the peer cannot send it
    };
    if let Some(via_frame) = &via_frame {
        assert_eq!(direct.is_ok(), via_frame.is_ok(), "from_json and read_message disagree");
    }
    let Ok(msg) = direct else { return };
    let _ = msg.name();
    let clean = msg.clone().sanitized();
    assert_eq!(clean.clone().sanitized(), clean, "sanitising is not idempotent");
    if let Some(Ok(m2)) = &via_frame {
        assert_eq!(&clean, m2);
    }
    let mut out = Vec::new();
    livemig_wire::write_message(&mut out, &msg).expect("an accepted message is written");
    let back = livemig_wire::read_message(&mut Cursor::new(out)).expect("a written message reads back");
    assert_eq!(clean, back, "message changed through write/read (beyond sanitising)");
});
