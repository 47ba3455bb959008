//! Pages classified and encoded per second on one core (and on 2 threads with `push_many`), for
//! single classes and a realistic mix; decoding of the mix; the delta and compressor choices;
//! page hashes keyed with a migration's key against unkeyed xxh3 (`page_hash`).
//!
//! Run: `cargo bench -p livemig-compact --bench encode -- --quick`
//! (only the hashes: `cargo bench -p livemig-compact --bench encode -- --quick page_hash`)
//! Gbit/s of guest pages per core = pages/s x 4096 x 8 / 1e9 (criterion prints elements/s).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use livemig_compact::{
    decode_batch, delta_encode, fingerprint, CompactError, Compressor, DiskLookup, DiskRef, Destination, EncodeOptions,
    Encoder, PageClass, PageKey, PageRef, PAGE_SIZE,
};

/// The key both sides of the bench use.
fn key() -> PageKey {
    PageKey::from_bytes([0x5c; 32])
}

type Page = [u8; PAGE_SIZE];

/// Pages per measured run.
const N: usize = 1024;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("small")
    }
}

const WORDS: [&str; 24] = [
    "the ", "memory ", "page ", "of ", "a ", "guest ", "kernel ", "struct ", "return ", "int ", "if (", "} else {\n",
    "static ", "void ", "migration ", "0x0000, ", "NULL;\n", "for (i = 0; ", "size_t ", "buffer", "->next", "/* ", " */\n",
    "\t",
];

fn text_page(r: &mut Rng) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    let mut i = 0;
    while i < PAGE_SIZE {
        let w = WORDS[r.below(WORDS.len())].as_bytes();
        let n = w.len().min(PAGE_SIZE - i);
        p[i..i + n].copy_from_slice(&w[..n]);
        i += n;
        if r.below(8) == 0 && i + 4 <= PAGE_SIZE {
            // Some numbers and pointers, as in real data.
            p[i..i + 4].copy_from_slice(&u32::try_from(r.next() & 0xFFFF_FFFF).expect("32 bits").to_le_bytes());
            i += 4;
        }
    }
    p
}

fn random_page(r: &mut Rng) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    for c in p.chunks_exact_mut(8) {
        c.copy_from_slice(&r.next().to_le_bytes());
    }
    p
}

/// A page with `words` 8-byte words changed.
fn redirty(p: &Page, r: &mut Rng, words: usize) -> Page {
    let mut q = *p;
    for _ in 0..words {
        let w = r.below(PAGE_SIZE / 8);
        q[w * 8..w * 8 + 8].copy_from_slice(&r.next().to_le_bytes());
    }
    q
}

struct Disk(HashMap<u128, DiskRef>);
impl DiskLookup for Disk {
    fn lookup_disk(&self, fp: u128) -> Option<DiskRef> {
        self.0.get(&fp).copied()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Zero,
    Text,
    Random,
    Dup,
    Delta,
    Disk,
}

/// A workload: pages already sent (setup, not measured) and the pages to encode (measured).
struct Workload {
    guest_pages: usize,
    first: Vec<(u64, Page)>,
    second: Vec<(u64, Page)>,
    disk: Arc<Disk>,
}

fn workload(kinds: &[(Kind, usize)], seed: u64) -> Workload {
    let mut r = Rng(seed | 1);
    let total: usize = kinds.iter().map(|k| k.1).sum();
    // Pages 0..N hold content sent in an earlier iteration; measured pages go to N..2N, except
    // re-dirtied pages which go to their own index.
    let base: Vec<Page> = (0..N).map(|i| if i % 2 == 0 { text_page(&mut r) } else { random_page(&mut r) }).collect();
    let first: Vec<(u64, Page)> = base.iter().enumerate().map(|(i, p)| (i as u64, *p)).collect();
    let mut disk = HashMap::new();
    let mut second = Vec::new();
    let mut slots: Vec<Kind> = kinds.iter().flat_map(|&(k, n)| std::iter::repeat_n(k, n)).collect();
    // Shuffle so classes interleave as in a real dirty set.
    for i in (1..slots.len()).rev() {
        slots.swap(i, r.below(i + 1));
    }
    let mut redirtied = 0usize;
    for (j, k) in slots.iter().enumerate() {
        let target = (N + j) as u64;
        let page = match k {
            Kind::Zero => [0u8; PAGE_SIZE],
            Kind::Text => text_page(&mut r),
            Kind::Random => random_page(&mut r),
            Kind::Dup => base[r.below(N)],
            Kind::Disk => {
                let p = text_page(&mut r);
                disk.insert(fingerprint(&p), DiskRef { image: 1, sector: j as u64 * 8, zero_tail_sectors: 0 });
                p
            }
            Kind::Delta => {
                let i = redirtied % N;
                redirtied += 1;
                second.push((i as u64, redirty(&base[i], &mut r, 16)));
                continue;
            }
        };
        second.push((target, page));
    }
    assert!(second.len() == total);
    Workload { guest_pages: 2 * N + total, first, second, disk: Arc::new(Disk(disk)) }
}

fn encoder(w: &Workload, opts: EncodeOptions) -> Encoder {
    let mut e = Encoder::new(w.guest_pages as u64, opts, key());
    e.set_disk_lookup(w.disk.clone());
    for (p, d) in &w.first {
        e.push(*p, d);
        if e.is_full() {
            let b = e.take();
            e.recycle(b);
        }
    }
    let b = e.take();
    e.recycle(b);
    e
}

/// Encodes one page at a time and recycles full batches, as the sender does.
fn push_all(e: &mut Encoder, pages: &[(u64, Page)]) {
    for (p, d) in pages {
        black_box(e.push(*p, d));
        if e.is_full() {
            let b = e.take();
            e.recycle(b);
        }
    }
}

fn bench_classes(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_class");
    g.throughput(Throughput::Elements(N as u64));
    let cases: [(&str, Kind, Compressor); 8] = [
        ("zero", Kind::Zero, Compressor::Lz4),
        ("text_lz4", Kind::Text, Compressor::Lz4),
        ("text_zstd1", Kind::Text, Compressor::Zstd(1)),
        ("text_none", Kind::Text, Compressor::None),
        ("random_lz4", Kind::Random, Compressor::Lz4),
        ("dup", Kind::Dup, Compressor::Lz4),
        ("delta_16_words", Kind::Delta, Compressor::Lz4),
        ("disk_ref", Kind::Disk, Compressor::Lz4),
    ];
    for (name, kind, compressor) in cases {
        let w = workload(&[(kind, N)], 7);
        let opts = EncodeOptions { compressor, ..EncodeOptions::default() };
        let want = match (kind, compressor) {
            (Kind::Zero, _) => PageClass::Zero,
            (Kind::Text, Compressor::Lz4) => PageClass::Lz4,
            (Kind::Text, Compressor::Zstd(1)) => PageClass::Zstd,
            (Kind::Text | Kind::Random, _) => PageClass::Raw,
            (Kind::Dup, _) => PageClass::Dup,
            (Kind::Delta, _) => PageClass::Delta,
            (Kind::Disk, _) => PageClass::DiskRef,
        };
        let mut e = encoder(&w, opts);
        for (p, d) in &w.second {
            e.push(*p, d);
        }
        assert!(e.stats().get(want).pages >= (N as u64) * 9 / 10, "{name}: {:?}", e.stats());
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || encoder(&w, opts),
                |e| push_all(e, &w.second),
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

/// A dirty set of one iteration: 25 % zero, 30 % text, 10 % random, 10 % dup, 20 % re-dirtied
/// (16 words changed), 5 % disk blocks.
fn mix() -> Workload {
    workload(
        &[
            (Kind::Zero, N / 4),
            (Kind::Text, N * 3 / 10),
            (Kind::Random, N / 10),
            (Kind::Dup, N / 10),
            (Kind::Delta, N / 5),
            (Kind::Disk, N - N / 4 - N * 3 / 10 - N / 10 - N / 10 - N / 5),
        ],
        11,
    )
}

fn bench_mix(c: &mut Criterion) {
    let w = mix();
    let mut g = c.benchmark_group("encode_mix");
    g.throughput(Throughput::Elements(w.second.len() as u64));
    for (name, compressor) in [("lz4", Compressor::Lz4), ("zstd1", Compressor::Zstd(1))] {
        let opts = EncodeOptions { compressor, ..EncodeOptions::default() };
        let mut e = encoder(&w, opts);
        let before = *e.stats();
        for (p, d) in &w.second {
            e.push(*p, d);
        }
        let s = *e.stats();
        let (pages, whole, wire) = (
            s.pages() - before.pages(),
            s.whole_page_bytes() - before.whole_page_bytes(),
            s.wire_bytes() - before.wire_bytes(),
        );
        let by: Vec<(&str, u64, u64)> = s
            .by_report_name()
            .iter()
            .zip(before.by_report_name().iter())
            .map(|(a, b)| (a.0, a.1.pages - b.1.pages, a.1.wire_bytes - b.1.wire_bytes))
            .collect();
        eprintln!(
            "mix {name}: {pages} pages, {whole} whole-page bytes, {wire} wire bytes (compaction {:.2}x); (class, pages, wire bytes) {by:?}",
            whole as f64 / wire as f64,
        );
        g.bench_function(format!("{name}_1_thread"), |b| {
            b.iter_batched_ref(
                || encoder(&w, opts),
                |e| push_all(e, &w.second),
                BatchSize::LargeInput,
            )
        });
        let refs: Vec<PageRef<'_>> = w.second.iter().map(|(p, d)| PageRef { page: *p, data: d, whole: false }).collect();
        g.bench_function(format!("{name}_2_threads"), |b| {
            b.iter_batched_ref(
                || encoder(&w, opts),
                |e| {
                    for chunk in refs.chunks(256) {
                        e.push_many(chunk, 2);
                        if e.is_full() {
                            let b = e.take();
                            e.recycle(b);
                        }
                    }
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

struct Mem(Vec<Page>);
impl Destination for Mem {
    type Error = CompactError;
    fn read_page(&mut self, page: u64, out: &mut Page) -> bool {
        self.0.get(usize::try_from(page).unwrap_or(usize::MAX)).map(|p| out.copy_from_slice(p)).is_some()
    }
    fn read_disk_block(&mut self, _: DiskRef, _: &mut Page) -> bool {
        false
    }
    fn write_page(&mut self, page: u64, _: PageClass, data: &Page, _: usize) -> Result<(), CompactError> {
        self.0[usize::try_from(page).expect("page")] = *data;
        Ok(())
    }
}

fn bench_decode(c: &mut Criterion) {
    // The mix without disk references (the bench destination holds no disk).
    let w = workload(
        &[(Kind::Zero, 256), (Kind::Text, 320), (Kind::Random, 112), (Kind::Dup, 112), (Kind::Delta, 224)],
        13,
    );
    let mut e = encoder(&w, EncodeOptions::default());
    let mut mem = Mem(vec![[0u8; PAGE_SIZE]; w.guest_pages]);
    for (p, d) in &w.first {
        mem.0[usize::try_from(*p).expect("page")] = *d;
    }
    for (p, d) in &w.second {
        e.push(*p, d);
    }
    let batch = e.take();
    let base = mem.0.clone();
    let key = key();
    let mut g = c.benchmark_group("decode_mix");
    g.throughput(Throughput::Elements(w.second.len() as u64));
    g.bench_function("lz4", |b| {
        b.iter_batched_ref(
            || Mem(base.clone()),
            |m| {
                let s = decode_batch(&batch, w.guest_pages as u64, &key, m).expect("valid");
                assert!(s.misses.is_empty());
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// The delta encoding chosen (runs of changed words) against xor + lz4 (FACTS.md: 4.0 us).
fn bench_delta_choice(c: &mut Criterion) {
    let mut r = Rng(99);
    let old = text_page(&mut r);
    let new = redirty(&old, &mut r, 16);
    let mut g = c.benchmark_group("delta_16_words_one_page");
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(PAGE_SIZE);
    out.clear();
    delta_encode(&old, &new, &mut out, PAGE_SIZE);
    let runs_len = out.len();
    let mut xor = [0u8; PAGE_SIZE];
    for i in 0..PAGE_SIZE {
        xor[i] = old[i] ^ new[i];
    }
    let xor_len = lz4_flex::block::compress(&xor).len();
    eprintln!("delta of 16 changed words: word runs {runs_len} B, xor+lz4 {xor_len} B");
    g.bench_function("word_runs", |b| {
        b.iter(|| {
            out.clear();
            black_box(delta_encode(black_box(&old), black_box(&new), &mut out, PAGE_SIZE));
        })
    });
    let mut buf = vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)];
    g.bench_function("xor_lz4", |b| {
        b.iter(|| {
            let (o, n) = (black_box(&old), black_box(&new));
            let mut x = [0u8; PAGE_SIZE];
            for i in 0..PAGE_SIZE {
                x[i] = o[i] ^ n[i];
            }
            black_box(lz4_flex::block::compress_into(&x, &mut buf).expect("fits"))
        })
    });
    g.finish();
}

/// One 4 KiB page hashed: unkeyed xxh3 (what livemig used before keys) against xxh3 with the
/// secret expanded from a migration's key (what it uses now), 64 and 128 bits.
fn bench_page_hash(c: &mut Criterion) {
    let mut r = Rng(7);
    let pages: Vec<Page> = (0..64).map(|_| random_page(&mut r)).collect();
    let key = key();
    let mut g = c.benchmark_group("page_hash");
    g.throughput(Throughput::Bytes((pages.len() * PAGE_SIZE) as u64));
    g.bench_function("xxh3_64_unkeyed", |b| b.iter(|| pages.iter().map(|p| xxhash_rust::xxh3::xxh3_64(black_box(p))).fold(0, u64::wrapping_add)));
    g.bench_function("xxh3_64_keyed", |b| b.iter(|| pages.iter().map(|p| key.hash_page(black_box(p))).fold(0, u64::wrapping_add)));
    g.bench_function("xxh3_128_unkeyed", |b| b.iter(|| pages.iter().map(|p| fingerprint(black_box(p))).fold(0, u128::wrapping_add)));
    g.bench_function("xxh3_128_keyed", |b| b.iter(|| pages.iter().map(|p| key.fingerprint(black_box(p))).fold(0, u128::wrapping_add)));
    g.finish();
}

criterion_group!(benches, bench_classes, bench_mix, bench_decode, bench_delta_choice, bench_page_hash);
criterion_main!(benches);
