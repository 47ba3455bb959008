//! The pipeline end to end over a socket pair: every page arrives as it was read, the ledgers
//! agree, for any thread count, compressor and mix of whole pages.

use std::net::{TcpListener, TcpStream};

use livemig_compact::{Compressor, EncodeOptions, PAGE_SIZE};
use livemig_wire::{FrameKind, Message, WireError};
use proptest::prelude::*;

use super::*;
use crate::apply::{DataConnections, Pool, Target};
use crate::link::{read_frames, Writer};

fn memory(dir: &std::path::Path, name: &str, pages: u64) -> GuestMemory {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(pages * PAGE_SIZE as u64).unwrap();
    GuestMemory::open_file(name, &path, pages * PAGE_SIZE as u64).unwrap()
}

/// Page `p` of version `v`: zero, repeated, small edits or noise, by `p`.
fn content(p: u64, v: u64) -> [u8; PAGE_SIZE] {
    let mut d = [0u8; PAGE_SIZE];
    match p % 5 {
        0 => {}
        1 => d.fill(7),
        2 => {
            d[..64].fill(u8::try_from(p % 251).unwrap());
            d[100] = u8::try_from(v % 256).unwrap();
        }
        _ => {
            let mut x = p.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ v;
            for w in d.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
    d
}

/// `n` loopback TCP connections: (sender's end, receiver's end) each.
fn connections(n: usize) -> Vec<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (0..n)
        .map(|_| {
            let c = TcpStream::connect(addr).unwrap();
            let (s, _) = listener.accept().unwrap();
            (c, s)
        })
        .collect()
}

/// The passes through the sender pipeline over `conns` connections (the first one's pages and
/// iteration ends, the others' pages and fences, as `send --connections`) into the receiver's
/// decoding threads (`rx_threads`), then both memories and ledgers compared.
fn round_trip(pages: u64, threads: usize, (conns, rx_threads): (usize, usize), compressor: Compressor, passes: &[Vec<(u64, bool)>]) {
    let dir = tempfile::tempdir().unwrap();
    let src = memory(dir.path(), "src", pages);
    let dst = memory(dir.path(), "dst", pages);
    let key = PageKey::from_bytes([3; 32]);
    let mut pairs = connections(conns).into_iter();
    let (c0, s0) = pairs.next().unwrap();
    let mut links = Links::new(Writer::spawn(Box::new(c0), None));
    let mut data = Vec::new();
    for (i, (c, s)) in (1u32..).zip(pairs) {
        links.add(Writer::spawn(Box::new(c), None));
        data.push((i, s.try_clone().unwrap(), s));
    }
    let frames = read_frames(s0, 4);
    let mut ledger = Ledger::zeroed(pages, key.clone());
    let opts = EncodeOptions { compressor, ..EncodeOptions::for_ram(pages * PAGE_SIZE as u64) };
    let mut encoder = Encoder::new(pages, opts, key.clone());
    let sources = crate::apply::NoSources;
    let target = Target::new(&dst, pages, &key, &sources, Ledger::zeroed(pages, key.clone()));
    let pool = Pool::new(rx_threads);
    let (acks_tx, acks) = crossbeam_channel::unbounded::<u32>();
    let last = u32::try_from(passes.len()).unwrap();
    std::thread::scope(|s| {
        let (pool, target) = (&pool, &target);
        s.spawn(move || {
            let feeder = pool.start(s, target).unwrap();
            let mut data = DataConnections::start(s, data, &feeder).unwrap();
            loop {
                let frame = loop {
                    crossbeam_channel::select! {
                        recv(frames) -> f => break f.unwrap(),
                        recv(data.events()) -> e => data.take(e.unwrap()).unwrap(),
                    }
                };
                match frame {
                    Ok(f) if f.kind == FrameKind::Pages => feeder.apply(f.payload).unwrap(),
                    Ok(f) => match f.message().unwrap() {
                        Message::IterationEnd { index, .. } => {
                            data.wait_fences(index, std::time::Duration::from_secs(30)).unwrap();
                            assert_eq!(feeder.wait_idle(target).unwrap(), Vec::<u64>::new(), "no page missed");
                            acks_tx.send(index).unwrap();
                            if index + 1 == last {
                                // The sender closes every connection next, in no set order.
                                break;
                            }
                        }
                        m => panic!("unexpected {m:?}"),
                    },
                    Err(WireError::Closed) => break,
                    Err(e) => panic!("{e}"),
                }
            }
        });
        for (v, (index, list)) in (1u64..).zip((0u32..).zip(passes)) {
            for &(p, _) in list {
                src.write_page(p, &content(p, v)).unwrap();
            }
            let sent = send_pages(&src, list, &mut ledger, &mut encoder, &mut links, threads, |_, _, _| Ok(())).unwrap();
            assert_eq!(sent, list.len() as u64);
            // As the sender: the next pass only after the destination applied this one.
            links.fence(index).unwrap();
            links.send(crate::link::Out::Message(Message::IterationEnd { index, pages: sent, last: false })).unwrap();
            assert_eq!(acks.recv().unwrap(), index);
        }
        links.finish().unwrap();
    });
    for p in 0..pages {
        let (mut x, mut y) = (PageBuf::zeroed(), PageBuf::zeroed());
        src.read_page(p, &mut x).unwrap();
        dst.read_page(p, &mut y).unwrap();
        assert!(x == y, "page {p}");
    }
    let mut rx_ledger = target.ledger();
    assert_eq!(rx_ledger.digest(), ledger.digest());
    rx_ledger.record_page(0, &[1; PAGE_SIZE]);
    assert_ne!(rx_ledger.digest(), ledger.digest(), "the digests can differ");
}

fn list(pages: u64, every: u64, whole_every: u64) -> Vec<(u64, bool)> {
    (0..pages).filter(|p| p % every == 0).map(|p| (p, whole_every > 0 && p % whole_every == 0)).collect()
}

#[test]
fn every_page_arrives_as_read_on_one_and_many_threads_and_connections() {
    for (threads, conns, rx) in [(1, 1, 1), (2, 1, 2), (5, 3, 2), (2, 4, 3)] {
        round_trip(1500, threads, (conns, rx), Compressor::Lz4, &[list(1500, 1, 0), list(1500, 3, 7), vec![]]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    /// Any number of connections, sending and decoding threads, compressor and passes (zero,
    /// repeated, edited and random pages; dups and deltas in the later passes).
    #[test]
    fn any_connections_threads_compressor_and_passes(
        conns in 1usize..=4,
        threads in 1usize..6,
        rx_threads in 1usize..4,
        comp in prop_oneof![Just(Compressor::None), Just(Compressor::Lz4), Just(Compressor::Zstd(1))],
        steps in proptest::collection::vec((1u64..6, 0u64..5), 1..4),
    ) {
        let pages = 700;
        let passes: Vec<_> = steps.iter().map(|&(every, whole)| list(pages, every, whole)).collect();
        round_trip(pages, threads, (conns, rx_threads), comp, &passes);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Zero(u64),
    Write(u64, u8),
    Read(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..16).prop_map(Op::Zero),
        2 => (0u64..16, 1u8..255).prop_map(|(p, v)| Op::Write(p, v)),
        1 => (0u64..16).prop_map(Op::Read),
    ]
}

proptest! {
    /// Zero runs, punched on /dev/shm, interleaved with writes and reads in any order, leave
    /// the memory as plain writes would, and every read sees what was last written.
    #[test]
    fn zero_runs_are_as_writing_zeros(ops in proptest::collection::vec(op(), 1..60)) {
        let f = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
        f.as_file().set_len(16 * PAGE_SIZE as u64).unwrap();
        let mem = GuestMemory::open_file("ram", f.path(), 16 * PAGE_SIZE as u64).unwrap();
        let mut model = vec![[0u8; PAGE_SIZE]; 16];
        for (p, m) in (0u64..).zip(model.iter_mut()) {
            *m = [u8::try_from(p).unwrap() + 1; PAGE_SIZE];
            mem.write_page(p, m).unwrap();
        }
        let mut zeros = ZeroRuns::default();
        let mut zeroed = 0;
        for o in &ops {
            match *o {
                Op::Zero(p) => {
                    zeros.zero(&mem, p).unwrap();
                    model[usize::try_from(p).unwrap()] = [0; PAGE_SIZE];
                    zeroed += 1;
                }
                Op::Write(p, v) => {
                    zeros.before_access(&mem, p).unwrap();
                    mem.write_page(p, &[v; PAGE_SIZE]).unwrap();
                    model[usize::try_from(p).unwrap()] = [v; PAGE_SIZE];
                }
                Op::Read(p) => {
                    zeros.before_access(&mem, p).unwrap();
                    let mut b = PageBuf::zeroed();
                    mem.read_page(p, &mut b).unwrap();
                    prop_assert!(b.0 == model[usize::try_from(p).unwrap()], "page {} read", p);
                }
            }
        }
        zeros.flush(&mem).unwrap();
        prop_assert_eq!(zeros.done.punched, zeroed, "every zero page punched on tmpfs");
        prop_assert_eq!(zeros.done.written, 0);
        for (p, m) in (0u64..).zip(model.iter()) {
            let mut b = PageBuf::zeroed();
            mem.read_page(p, &mut b).unwrap();
            prop_assert!(&b.0 == m, "page {} at the end", p);
        }
    }
}
