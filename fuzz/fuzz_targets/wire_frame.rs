//! `livemig_wire::read_frame` (and `read_magic`, `Frame::message`) over arbitrary bytes.
//! Input: `[mode][stream]`; mode bit 1 fixes every frame checksum (to get past it), bit 2 reads
//! the connection magic first. Contract: never panic; a frame returned has a known kind, a payload
//! within the cap of its kind and the checksum its header announced.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use livemig_fuzz_common::{fix_frame_checksums, WIRE_FIX_CHECKSUMS, WIRE_MAGIC};
use livemig_wire::{FrameKind, MAX_CONTROL_PAYLOAD, MAX_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else { return };
    let mut stream = stream.to_vec();
    if mode & WIRE_FIX_CHECKSUMS != 0 {
        let skip = if mode & WIRE_MAGIC != 0 { 8.min(stream.len()) } else { 0 };
        fix_frame_checksums(&mut stream[skip..]);
    }
    let mut r = Cursor::new(stream);
    if mode & WIRE_MAGIC != 0 && livemig_wire::read_magic(&mut r).is_err() {
        return;
    }
    // A frame read consumes at least its header: the loop ends.
    while let Ok(frame) = livemig_wire::read_frame(&mut r) {
        let cap = if frame.kind == FrameKind::Control { MAX_CONTROL_PAYLOAD } else { MAX_PAYLOAD };
        assert!(frame.payload.len() <= cap as usize, "{:?} frame of {} bytes accepted", frame.kind, frame.payload.len());
        assert_ne!(frame.kind, FrameKind::Invalid);
        match frame.message() {
            Ok(msg) => {
                assert_eq!(frame.kind, FrameKind::Control);
                let _ = msg.name();
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
