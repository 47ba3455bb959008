//! The order of the stream engine's frames over several connections: the reorder alone, and
//! real TCP connections through [`Ordered`].

use super::*;
use crate::stream::chunk::{resend_payload, ChunkBuilder};
use std::net::TcpListener;
use std::time::Duration;

fn chunk(seq: u64, len: usize) -> Frame {
    let mut b = ChunkBuilder::new(seq);
    b.opaque(&vec![u8::try_from(seq % 251).unwrap(); len.max(1)]);
    Frame { kind: FrameKind::Stream, payload: b.finish() }
}

fn control(m: &Message) -> Frame {
    let mut buf = Vec::new();
    livemig_wire::write_message(&mut buf, m).unwrap();
    livemig_wire::read_frame(&mut &buf[..]).unwrap()
}

/// What a frame is, for comparing orders.
fn what(f: &Frame) -> String {
    match f.kind {
        FrameKind::Stream => chunk_seq(&f.payload).map_or_else(|| "resend".to_string(), |s| format!("chunk {s}")),
        FrameKind::Control => f.message().unwrap().name().to_string(),
        k => format!("{k:?}"),
    }
}

/// Chunks that arrive out of order over three connections come out by sequence number, the
/// first connection's numbered control messages in their place among them (never before the
/// chunks below, never after those above, even when those arrive first), a resend and an abort
/// at once.
#[test]
fn chunks_come_out_in_order_and_control_messages_in_their_place() {
    let mut r = Reorder::new(3, 1 << 20);
    let mut got: Vec<String> = Vec::new();
    let step = |r: &mut Reorder, got: &mut Vec<String>, from: u32, f: Frame| {
        let mut out = Vec::new();
        if from == 0 {
            r.on_first(f, &mut out).unwrap();
        } else {
            r.on_data(from, f, &mut out).unwrap();
        }
        got.extend(out.iter().map(what));
    };
    // The relay queued: chunk 0 (conn 1), chunk 1 (conn 2), blocks as 2, chunk 3 (conn 0),
    // chunk 4 (conn 1), the checkpoint as 5, chunk 6 (conn 2), the end as 7.
    // Chunk 6 arrives before everything: it must not pass the checkpoint.
    step(&mut r, &mut got, 2, chunk(6, 10));
    step(&mut r, &mut got, 0, control(&Message::StreamOrder { seq: 2 }));
    step(&mut r, &mut got, 0, control(&Message::StreamBlocks { blocks: Vec::new(), cache_pages: 1 }));
    step(&mut r, &mut got, 0, chunk(3, 10));
    step(&mut r, &mut got, 0, control(&Message::StreamOrder { seq: 5 }));
    step(&mut r, &mut got, 0, control(&Message::StreamCheckpoint { bytes: 1, digest: "00".into(), at: "ram-done".into() }));
    step(&mut r, &mut got, 0, control(&Message::StreamOrder { seq: 7 }));
    step(&mut r, &mut got, 0, control(&Message::StreamEnd { bytes: 4 }));
    // A resend answered while all that waits: at once.
    step(&mut r, &mut got, 0, Frame { kind: FrameKind::Stream, payload: resend_payload(0, 0, &[7; 4096]) });
    assert_eq!(got, ["resend"], "nothing else is due before chunk 0");
    step(&mut r, &mut got, 2, chunk(1, 10));
    step(&mut r, &mut got, 1, chunk(4, 10));
    assert_eq!(got, ["resend"]);
    assert!(r.held() > 0);
    step(&mut r, &mut got, 1, chunk(0, 10));
    let want = ["resend", "chunk 0", "chunk 1", "stream-blocks", "chunk 3", "chunk 4", "stream-checkpoint", "chunk 6", "stream-end"];
    assert_eq!(got, want);
    assert_eq!(r.held(), 0, "nothing held once everything is out");

    // An abort from a data connection, too, at once.
    step(&mut r, &mut got, 2, control(&Message::Abort { reason: "x".into() }));
    assert_eq!(got.last().map(String::as_str), Some("abort"));
}

/// Without a marker, the first connection's control message still waits for the first
/// connection's chunks before it (FIFO on that connection), never for later ones.
#[test]
fn a_first_connection_message_waits_for_its_own_chunks_before_it() {
    let mut r = Reorder::new(2, 1 << 20);
    let mut out = Vec::new();
    r.on_first(chunk(1, 5), &mut out).unwrap();
    r.on_first(control(&Message::StreamEnd { bytes: 1 }), &mut out).unwrap();
    assert!(out.is_empty(), "chunk 1 waits for chunk 0, and the end for chunk 1");
    r.on_data(1, chunk(0, 5), &mut out).unwrap();
    let got: Vec<String> = out.iter().map(what).collect();
    assert_eq!(got, ["chunk 0", "chunk 1", "stream-end"]);
}

/// A sender that runs further ahead than the cap while an earlier chunk is missing fails the
/// migration with an error that names the cap; a chunk sent twice and anything but chunks on a
/// data connection are errors too (the latter naming the connection).
#[test]
fn the_reorder_buffer_is_capped_and_a_sender_past_it_fails_clearly() {
    let mut r = Reorder::new(2, 64 << 10);
    let mut out = Vec::new();
    let mut seq = 1;
    let e = loop {
        match r.on_data(1, chunk(seq, 4000), &mut out) {
            Ok(()) => seq += 1,
            Err(e) => break e,
        }
        assert!(seq < 100, "the cap was never hit");
    };
    assert!(out.is_empty(), "chunk 0 never came");
    assert!(r.held() > 60 << 10, "held {} bytes before failing", r.held());
    let e = e.chain();
    assert!(e.contains("the reorder buffer's cap") && e.contains("next one due (number 0)"), "{e}");

    // The count of frames is capped too, however small they are.
    let mut r = Reorder::new(2, usize::MAX);
    let e = (1..=u64::try_from(REORDER_FRAMES).unwrap() + 1).find_map(|s| r.on_data(1, chunk(s, 1), &mut out).err());
    assert!(e.expect("the frame cap").chain().contains("reorder buffer's cap"));

    let mut r = Reorder::new(2, 1 << 20);
    r.on_data(1, chunk(0, 5), &mut out).unwrap();
    let e = r.on_first(chunk(0, 5), &mut out).unwrap_err().chain();
    assert!(e.contains("number 0 again"), "{e}");
    let mut r = Reorder::new(3, 1 << 20);
    let e = r.on_data(2, control(&Message::Commit), &mut out).unwrap_err();
    assert!(matches!(e, AgentError::DataConnection { index: 2, of: 3, .. }), "{e:?}");
    assert!(e.chain().contains("stream chunks on a data connection") && e.chain().contains("commit"), "{}", e.chain());
}

/// A TCP connection pair on loopback: (the sender's end, the receiver's end).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

/// Sets up `n` real TCP connections into an [`Ordered`] with `cap`: the senders' ends.
fn ordered(n: u32, cap: usize) -> (Vec<TcpStream>, Ordered) {
    ordered_stalling(n, cap, Duration::from_secs(3600))
}

/// [`ordered`], a connection that holds up the others failing after `stall`.
fn ordered_stalling(n: u32, cap: usize, stall: Duration) -> (Vec<TcpStream>, Ordered) {
    let mut senders = Vec::new();
    let mut first = None;
    let mut data = Vec::new();
    for i in 0..n {
        let (a, b) = tcp_pair();
        senders.push(a);
        if i == 0 {
            first = Some(crate::link::read_frames(b, 8));
        } else {
            let reader = b.try_clone().unwrap();
            data.push((i, b, Box::new(reader) as Box<dyn Read + Send>));
        }
    }
    (senders, Ordered::start(first.unwrap(), data, n, (cap, stall)).unwrap())
}

fn write(s: &mut TcpStream, f: &Frame) {
    livemig_wire::write_frame(s, f.kind, &f.payload).unwrap();
}

/// Over real TCP connections, with the data connections' chunks written in reverse and the
/// end numbered among them: the frames come out in the relay's order.
#[test]
fn over_real_connections_the_frames_come_out_in_the_relays_order() {
    let (mut s, o) = ordered(3, REORDER_CAP);
    // Numbers 0..31, the end as 20: the chunks of connections 1 and 2 written last first.
    let mut on: [Vec<u64>; 3] = Default::default();
    for seq in (0..31u64).filter(|&s| s != 20) {
        on[usize::try_from(seq % 3).unwrap()].push(seq);
    }
    for &seq in on[2].iter().rev() {
        write(&mut s[2], &chunk(seq, 3000));
    }
    for &seq in &on[0] {
        if seq == 21 {
            write(&mut s[0], &control(&Message::StreamOrder { seq: 20 }));
            write(&mut s[0], &control(&Message::StreamEnd { bytes: 0 }));
        }
        write(&mut s[0], &chunk(seq, 3000));
    }
    for &seq in on[1].iter().rev() {
        write(&mut s[1], &chunk(seq, 3000));
    }
    let mut got = Vec::new();
    while got.len() < 31 {
        let f = o.frames().recv_timeout(Duration::from_secs(20)).expect("a frame").unwrap_or_else(|e| panic!("{}", e.chain()));
        got.push(what(&f));
    }
    let want: Vec<String> = (0..31).map(|s| if s == 20 { "stream-end".to_string() } else { format!("chunk {s}") }).collect();
    assert_eq!(got, want);
}

/// A data connection lost: the frames end with an error that names it.
#[test]
fn a_data_connection_lost_ends_the_frames_with_an_error_naming_it() {
    let (mut s, o) = ordered(3, REORDER_CAP);
    write(&mut s[0], &chunk(0, 10));
    let f = o.frames().recv_timeout(Duration::from_secs(20)).unwrap().unwrap();
    assert_eq!(what(&f), "chunk 0");
    s[2].shutdown(std::net::Shutdown::Both).unwrap();
    let e = o.frames().recv_timeout(Duration::from_secs(20)).expect("an end").expect_err("an error");
    assert!(matches!(e, AgentError::DataConnection { index: 2, of: 3, .. }), "{e:?}");
    assert!(e.chain().starts_with("data connection 2 of 3 failed"), "{}", e.chain());
}

/// Over real connections, a data connection that stalls (open, silent) while the chunks after
/// its own wait: the frames end with an error naming it, after the limit.
#[test]
fn over_real_connections_a_stalled_data_connection_is_named() {
    let (mut s, o) = ordered_stalling(3, REORDER_CAP, Duration::from_millis(300));
    write(&mut s[0], &chunk(0, 10));
    write(&mut s[2], &chunk(2, 10));
    write(&mut s[0], &chunk(3, 10));
    let f = o.frames().recv_timeout(Duration::from_secs(20)).unwrap().unwrap();
    assert_eq!(what(&f), "chunk 0");
    let e = o.frames().recv_timeout(Duration::from_secs(20)).expect("an end").expect_err("an error, not chunk 1");
    assert!(matches!(e, AgentError::DataConnection { index: 1, of: 3, .. }), "{e:?}");
    assert!(e.chain().contains("the connection stalled") && e.chain().contains("chunk 1 was due"), "{}", e.chain());
    drop(s);
}

/// A sender that sends far ahead over a data connection while the first chunk never comes is
/// stopped at the cap, with an error that says so, over real connections too.
#[test]
fn over_real_connections_a_sender_past_the_cap_fails_the_migration() {
    let (mut s, o) = ordered(2, 1 << 20);
    let writer = std::thread::spawn(move || {
        for seq in 1..2000u64 {
            if livemig_wire::write_frame(&mut s[1], FrameKind::Stream, &chunk(seq, 4000).payload).is_err() {
                break;
            }
        }
        s
    });
    let e = o.frames().recv_timeout(Duration::from_secs(20)).expect("an end").expect_err("the cap");
    assert!(e.chain().contains("reorder buffer's cap") && e.chain().contains("1 MiB"), "{}", e.chain());
    drop(o);
    let _ = writer.join();
}

/// A connection that stalls (silent, not closed) while later chunks wait for the one it holds
/// is named once the wait passes the limit; a wait that ends in time names nobody.
#[test]
fn a_stalled_connection_is_named_once_the_others_wait_past_the_limit() {
    let mut r = Reorder::new(3, 1 << 20);
    let mut out = Vec::new();
    std::thread::sleep(Duration::from_millis(30));
    // The first connection speaks (a message due at once), connection 2 sends chunk 1; chunk 0
    // is connection 1's, which says nothing.
    r.on_first(control(&Message::StreamReady), &mut out).unwrap();
    r.on_data(2, chunk(1, 10), &mut out).unwrap();
    assert_eq!(out.len(), 1, "only the message is due");
    assert!(r.stalled(Instant::now(), Duration::from_secs(60)).is_none(), "within the limit");
    let later = Instant::now() + Duration::from_millis(50);
    let e = r.stalled(later, Duration::from_millis(40)).expect("held past the limit");
    match &e {
        AgentError::DataConnection { index, of, source } => {
            assert_eq!((*index, *of), (1, 3), "{e:?}");
            let why = source.to_string();
            assert!(why.contains("chunk 0 was due") && why.contains("1 later frames"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    // Chunk 0 comes: nothing is held, nobody stalled.
    r.on_data(1, chunk(0, 10), &mut out).unwrap();
    assert!(r.stalled(Instant::now() + Duration::from_secs(3600), Duration::from_millis(40)).is_none());
}
