//! The pipeline end to end over a socket pair: every page arrives as it was read, the ledgers
//! agree, for any thread count, compressor and mix of whole pages.

use std::os::unix::net::UnixStream;

use livemig_compact::{decode_batch, Compressor, EncodeOptions, PageClass, PAGE_SIZE};
use livemig_wire::{FrameKind, WireError};
use proptest::prelude::*;

use super::*;
use crate::link::read_frames;

fn memory(dir: &std::path::Path, name: &str, pages: u64) -> GuestMemory {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(pages * PAGE_SIZE as u64).unwrap();
    GuestMemory::open_file(name, &path, pages * PAGE_SIZE as u64).unwrap()
}

struct Dest<'a> {
    mem: &'a GuestMemory,
    ledger: &'a mut Ledger,
}

impl livemig_compact::Destination for Dest<'_> {
    type Error = AgentError;
    fn read_page(&mut self, page: u64, out: &mut [u8; PAGE_SIZE]) -> bool {
        self.mem.read_page_into(page, out).is_ok()
    }
    fn write_page(&mut self, page: u64, _: PageClass, data: &[u8; PAGE_SIZE], _: usize) -> Result<(), AgentError> {
        self.mem.write_page(page, data)?;
        self.ledger.record_page(page, data);
        Ok(())
    }
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

fn round_trip(pages: u64, threads: usize, compressor: Compressor, passes: &[Vec<(u64, bool)>]) {
    let dir = tempfile::tempdir().unwrap();
    let src = memory(dir.path(), "src", pages);
    let dst = memory(dir.path(), "dst", pages);
    let key = PageKey::from_bytes([3; 32]);
    let (a, b) = UnixStream::pair().unwrap();
    let mut writer = Writer::spawn(Box::new(a), None);
    let frames = read_frames(b, 4);
    let mut ledger = Ledger::zeroed(pages, key.clone());
    let mut rx_ledger = Ledger::zeroed(pages, key.clone());
    let opts = EncodeOptions { compressor, ..EncodeOptions::for_ram(pages * PAGE_SIZE as u64) };
    let mut encoder = Encoder::new(pages, opts, key.clone());
    std::thread::scope(|s| {
        let rx = s.spawn(|| {
            loop {
                match frames.recv().unwrap() {
                    Ok(f) => {
                        assert_eq!(f.kind, FrameKind::Pages);
                        let mut d = Dest { mem: &dst, ledger: &mut rx_ledger };
                        let summary = decode_batch(&f.payload, pages, &key, &mut d).unwrap();
                        assert!(summary.misses.is_empty());
                    }
                    Err(WireError::Closed) => break,
                    Err(e) => panic!("{e}"),
                }
            }
        });
        for (v, list) in (1u64..).zip(passes) {
            for &(p, _) in list {
                src.write_page(p, &content(p, v)).unwrap();
            }
            let sent = send_pages(&src, list, &mut ledger, &mut encoder, &mut writer, threads, |_, _, _| Ok(())).unwrap();
            assert_eq!(sent, list.len() as u64);
        }
        writer.finish().unwrap();
        rx.join().unwrap();
    });
    for p in 0..pages {
        let (mut x, mut y) = (PageBuf::zeroed(), PageBuf::zeroed());
        src.read_page(p, &mut x).unwrap();
        dst.read_page(p, &mut y).unwrap();
        assert!(x == y, "page {p}");
    }
    assert_eq!(rx_ledger.digest(), ledger.digest());
    rx_ledger.record_page(0, &[1; PAGE_SIZE]);
    assert_ne!(rx_ledger.digest(), ledger.digest(), "the digests can differ");
}

fn list(pages: u64, every: u64, whole_every: u64) -> Vec<(u64, bool)> {
    (0..pages).filter(|p| p % every == 0).map(|p| (p, whole_every > 0 && p % whole_every == 0)).collect()
}

#[test]
fn every_page_arrives_as_read_on_one_and_many_threads() {
    for threads in [1, 2, 5] {
        round_trip(1500, threads, Compressor::Lz4, &[list(1500, 1, 0), list(1500, 3, 7), vec![]]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn any_threads_compressor_and_passes(
        threads in 1usize..6,
        comp in prop_oneof![Just(Compressor::None), Just(Compressor::Lz4), Just(Compressor::Zstd(1))],
        steps in proptest::collection::vec((1u64..6, 0u64..5), 1..4),
    ) {
        let pages = 700;
        let passes: Vec<_> = steps.iter().map(|&(every, whole)| list(pages, every, whole)).collect();
        round_trip(pages, threads, comp, &passes);
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
