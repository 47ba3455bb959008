//! Building an index: threads take 16 MiB segments of the image in turn, read them with pread
//! and fingerprint every non-zero block.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use xxhash_rust::xxh3::Xxh3;

use crate::file::{self, Stamp};
use crate::{is_zero, DiskIndex, IndexError, Meta, BLOCK_SIZE, BLOCK_SIZE_U64, MAX_BLOCKS};

/// Blocks per work unit (16 MiB).
const SEGMENT_BLOCKS: u64 = 4096;
/// Blocks per read (1 MiB).
const READ_BLOCKS: usize = 256;
/// Blocks sampled for the sample hash.
const SAMPLES: u64 = 16;
/// How often the progress callback runs during a build.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Progress of a build, given to the callback at the start, about ten times a second and once
/// at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuildProgress {
    /// Bytes of the image fingerprinted so far.
    pub done_bytes: u64,
    /// Bytes to fingerprint (whole blocks of the image).
    pub total_bytes: u64,
}

type SegmentResult = (u64, Vec<(u128, u32)>);

impl DiskIndex {
    /// Builds the index of a raw image with one thread per available core (at most 8).
    pub fn build(image: &Path, progress: &mut dyn FnMut(BuildProgress)) -> Result<DiskIndex, IndexError> {
        let threads = thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        Self::build_with_threads(image, threads, progress)
    }

    /// Builds the index of a raw image with `threads` threads (at least one).
    pub fn build_with_threads(
        image: &Path,
        threads: usize,
        progress: &mut dyn FnMut(BuildProgress),
    ) -> Result<DiskIndex, IndexError> {
        let f = File::open(image).map_err(|source| IndexError::Open { path: image.to_path_buf(), source })?;
        let before = Stamp::of(&f, image)?;
        let blocks = before.size / BLOCK_SIZE_U64;
        if blocks > MAX_BLOCKS {
            return Err(IndexError::TooLarge { path: image.to_path_buf(), blocks, max: MAX_BLOCKS });
        }
        let sample_hash = sample_hash(&f, image, before.size)?;
        let total_bytes = blocks * BLOCK_SIZE_U64;
        let segments = blocks.div_ceil(SEGMENT_BLOCKS);
        let next = AtomicU64::new(0);
        let done = AtomicU64::new(0);
        let abort = AtomicBool::new(false);
        let threads = threads.clamp(1, usize::try_from(segments).unwrap_or(usize::MAX).max(1));
        progress(BuildProgress { done_bytes: 0, total_bytes });

        let results: Vec<Result<(Vec<SegmentResult>, u64), IndexError>> = thread::scope(|s| {
            let mut handles = Vec::with_capacity(threads);
            let mut spawn_error = None;
            for i in 0..threads {
                let work = || worker(&f, image, blocks, &next, &done, &abort);
                match thread::Builder::new().name(format!("index-{i}")).spawn_scoped(s, work) {
                    Ok(h) => handles.push(h),
                    Err(e) => {
                        spawn_error = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = spawn_error {
                if handles.is_empty() {
                    return vec![Err(IndexError::Thread(e))];
                }
                // Fewer threads than asked: the ones running share all segments.
            }
            while !handles.iter().all(|h| h.is_finished()) {
                thread::sleep(PROGRESS_EVERY);
                progress(BuildProgress { done_bytes: done.load(Ordering::Relaxed), total_bytes });
            }
            handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });

        let mut segs = Vec::new();
        let mut zero_blocks = 0;
        for r in results {
            let (s, z) = r?;
            segs.extend(s);
            zero_blocks += z;
        }
        progress(BuildProgress { done_bytes: total_bytes, total_bytes });

        let after = Stamp::of(&f, image)?;
        if let Some(what) = before.differs(&after) {
            return Err(IndexError::ChangedDuringBuild { path: image.to_path_buf(), what });
        }

        // Each segment is sorted by key with equal keys in block order; concatenated in segment
        // order, a stable sort merges the runs and keeps the first block of every key first.
        segs.sort_unstable_by_key(|(seg, _)| *seg);
        let mut all: Vec<(u128, u32)> = Vec::with_capacity(segs.iter().map(|(_, v)| v.len()).sum());
        for (_, v) in segs {
            all.extend(v);
        }
        all.sort_by_key(|&(k, _)| k);
        all.dedup_by_key(|&mut (k, _)| k);
        let (keys, blocks): (Vec<u128>, Vec<u32>) = all.into_iter().unzip();
        let index_hash = file::body_hash(&keys, &blocks);
        Ok(DiskIndex::from_sorted(keys, blocks, Meta { stamp: before, sample_hash, index_hash, zero_blocks }))
    }
}

fn worker(
    f: &File,
    image: &Path,
    blocks: u64,
    next: &AtomicU64,
    done: &AtomicU64,
    abort: &AtomicBool,
) -> Result<(Vec<SegmentResult>, u64), IndexError> {
    let mut out = Vec::new();
    let mut zero = 0u64;
    let mut buf = vec![0u8; READ_BLOCKS * BLOCK_SIZE];
    loop {
        if abort.load(Ordering::Relaxed) {
            return Ok((out, zero));
        }
        let seg = next.fetch_add(1, Ordering::Relaxed);
        let first = seg.saturating_mul(SEGMENT_BLOCKS);
        if first >= blocks {
            return Ok((out, zero));
        }
        let end = (first + SEGMENT_BLOCKS).min(blocks);
        let mut entries = Vec::new();
        let mut b = first;
        while b < end {
            let n = usize::try_from(end - b).unwrap_or(READ_BLOCKS).min(READ_BLOCKS);
            let chunk = &mut buf[..n * BLOCK_SIZE];
            let offset = b * BLOCK_SIZE_U64;
            if let Err(source) = f.read_exact_at(chunk, offset) {
                abort.store(true, Ordering::Relaxed);
                return Err(IndexError::Read { path: image.to_path_buf(), offset, source });
            }
            for (i, block) in chunk.chunks_exact(BLOCK_SIZE).enumerate() {
                if is_zero(block) {
                    zero += 1;
                } else {
                    // b + i < blocks <= MAX_BLOCKS = u32::MAX, so it fits.
                    let n = u32::try_from(b + i as u64).unwrap_or(u32::MAX);
                    entries.push((xxhash_rust::xxh3::xxh3_128(block), n));
                }
            }
            b += n as u64;
            done.fetch_add(n as u64 * BLOCK_SIZE_U64, Ordering::Relaxed);
        }
        entries.sort_by_key(|&(k, _)| k);
        out.push((seg, entries));
    }
}

/// xxh3-128 of the image size and of [`SAMPLES`] whole blocks spread evenly over the image
/// (first and last included).
pub(crate) fn sample_hash(f: &File, image: &Path, size: u64) -> Result<u128, IndexError> {
    let blocks = size / BLOCK_SIZE_U64;
    let mut h = Xxh3::new();
    h.update(&size.to_le_bytes());
    let mut buf = [0u8; BLOCK_SIZE];
    let n = SAMPLES.min(blocks);
    for i in 0..n {
        let block = if n <= 1 { 0 } else { i * (blocks - 1) / (n - 1) };
        let offset = block * BLOCK_SIZE_U64;
        f.read_exact_at(&mut buf, offset).map_err(|source| IndexError::Read { path: image.to_path_buf(), offset, source })?;
        h.update(&block.to_le_bytes());
        h.update(&buf);
    }
    Ok(h.digest128())
}
