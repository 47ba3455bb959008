//! Measures building, saving, loading and looking up the index of a disk image:
//! `cargo run --release -p livemig-index --example measure -- IMAGE [THREADS] [ALIGN]` (ALIGN:
//! auto, the default, or 512, 1024, 2048, 4096 bytes between indexed windows).

use std::collections::HashMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use livemig_index::{Align, DiskIndex, Fingerprint, Source};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let image = PathBuf::from(args.next().ok_or("usage: measure IMAGE [THREADS]")?);
    let threads: usize = args.next().map_or(Ok(2), |t| t.parse())?;
    let align: Align = args.next().map_or(Ok(Align::Auto), |a| a.parse())?;
    let stride = align.resolve(&Source::open(&std::fs::File::open(&image)?, &image)?, &image)?;
    println!("stride: {} bytes ({})", stride.bytes, stride.reason);

    let t = Instant::now();
    let idx = DiskIndex::build_with_threads(&image, Align::Bytes(stride.bytes), threads, &mut |_| {})?;
    let build = t.elapsed();
    println!(
        "build: {threads} threads, {:.3} s, {} windows ({} MiB), {} zero, {} unique non-zero fingerprints, {:.1} MiB in memory",
        build.as_secs_f64(),
        idx.windows(),
        idx.image_size() >> 20,
        idx.zero_blocks(),
        idx.len(),
        idx.memory_bytes() as f64 / 1048576.0
    );

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("x.idx");
    let t = Instant::now();
    idx.save(&file)?;
    println!("save: {:.3} s, index file {} bytes", t.elapsed().as_secs_f64(), std::fs::metadata(&file)?.len());
    let t = Instant::now();
    let again = DiskIndex::load(&image, &file)?;
    println!("load: {:.3} s (identical: {})", t.elapsed().as_secs_f64(), again.identity() == idx.identity());

    // Probes in block order, not fingerprint order: a sorted probe sequence would walk the
    // index sequentially and flatter it.
    let mut hits: Vec<(u64, Fingerprint)> = idx.iter().map(|(f, w)| (w.sector, f)).collect();
    hits.sort_unstable_by_key(|&(b, _)| b);
    let hits: Vec<Fingerprint> = hits.into_iter().map(|(_, f)| f).collect();
    let mut x = 0x1234_5678_9abc_def0_u128;
    let misses: Vec<Fingerprint> = (0..hits.len().max(100_000))
        .map(|_| {
            x = x.wrapping_mul(0x2360_ED05_1FC6_5DA4_4385_DF64_9FCC_F645).wrapping_add(0x5851_F42D_4C95_7F2D_1405_7B7E_F767_814F);
            Fingerprint(x)
        })
        .collect();
    let rounds = (20_000_000 / hits.len().max(1)).max(1);
    for (name, probes) in [("hits", &hits), ("misses", &misses)] {
        let t = Instant::now();
        let mut found = 0u64;
        for _ in 0..rounds {
            for p in probes.iter() {
                found += u64::from(idx.lookup(black_box(p)).is_some());
            }
        }
        let n = (rounds * probes.len()) as f64;
        let s = t.elapsed().as_secs_f64();
        println!("lookup {name}: {:.1} M/s ({:.0} ns each, {found} found of {n})", n / s / 1e6, s / n * 1e9);
    }
    let map: HashMap<u128, u64> = idx.iter().map(|(f, w)| (f.0, w.sector)).collect();
    let t = Instant::now();
    let mut found = 0u64;
    for _ in 0..rounds {
        for p in &hits {
            found += u64::from(map.contains_key(black_box(&p.0)));
        }
    }
    let n = (rounds * hits.len()) as f64;
    let s = t.elapsed().as_secs_f64();
    println!("(std HashMap hits for comparison: {:.1} M/s, {found} found)", n / s / 1e6);
    Ok(())
}
