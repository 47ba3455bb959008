//! Building an index: threads take 16 MiB segments of window starts in turn, read them with
//! pread (and the 4 KiB - stride after them) and fingerprint every non-zero window.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use xxhash_rust::xxh3::Xxh3;

use crate::file::{self, Stamp};
use crate::{is_zero, windows, Align, DiskIndex, Source, IndexError, Meta, BLOCK_SIZE, BLOCK_SIZE_U64, MAX_WINDOWS};

/// Bytes of window starts per work unit (16 MiB).
const SEGMENT_BYTES: u64 = 16 << 20;
/// Bytes of window starts per read (1 MiB; a read takes the 4 KiB - stride after them too).
const READ_BYTES: u64 = 1 << 20;
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

type SegmentResult = (u64, Vec<(u128, u32, u8)>);

/// What the workers share.
struct Job<'a> {
    f: &'a Source,
    image: &'a Path,
    size: u64,
    stride: u64,
    windows: u64,
    next: AtomicU64,
    done: AtomicU64,
    abort: AtomicBool,
}

impl DiskIndex {
    /// Builds the index of a raw image with one thread per available core (at most 8), its
    /// stride detected ([`Align::Auto`]).
    pub fn build(image: &Path, progress: &mut dyn FnMut(BuildProgress)) -> Result<DiskIndex, IndexError> {
        Self::build_aligned(image, Align::Auto, progress)
    }

    /// Builds the index of a raw image with one thread per available core (at most 8).
    pub fn build_aligned(image: &Path, align: Align, progress: &mut dyn FnMut(BuildProgress)) -> Result<DiskIndex, IndexError> {
        let threads = thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        Self::build_with_threads(image, align, threads, progress)
    }

    /// Builds the index of a raw image with `threads` threads (at least one).
    pub fn build_with_threads(
        image: &Path,
        align: Align,
        threads: usize,
        progress: &mut dyn FnMut(BuildProgress),
    ) -> Result<DiskIndex, IndexError> {
        let file = File::open(image).map_err(|source| IndexError::Open { path: image.to_path_buf(), source })?;
        Stamp::of(&file, image)?;
        let f = Source::open(&file, image)?;
        let before = Stamp::of_source(&file, image, &f)?;
        let stride = align.resolve(&f, image)?.bytes;
        let windows = windows(before.size, stride);
        if windows > MAX_WINDOWS {
            return Err(IndexError::TooLarge { path: image.to_path_buf(), windows, stride, max: MAX_WINDOWS });
        }
        let sample_hash = sample_hash(&f, image, before.size)?;
        // Window starts span [0, windows * stride).
        let total_bytes = windows * u64::from(stride);
        let segments = total_bytes.div_ceil(SEGMENT_BYTES);
        let job = Job {
            f: &f,
            image,
            size: before.size,
            stride: u64::from(stride),
            windows,
            next: AtomicU64::new(0),
            done: AtomicU64::new(0),
            abort: AtomicBool::new(false),
        };
        let threads = threads.clamp(1, usize::try_from(segments).unwrap_or(usize::MAX).max(1));
        progress(BuildProgress { done_bytes: 0, total_bytes });

        let results: Vec<Result<(Vec<SegmentResult>, u64), IndexError>> = thread::scope(|s| {
            let mut handles = Vec::with_capacity(threads);
            let mut spawn_error = None;
            for i in 0..threads {
                let work = || worker(&job);
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
                progress(BuildProgress { done_bytes: job.done.load(Ordering::Relaxed), total_bytes });
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

        let after = Stamp::of_source(&file, image, &f)?;
        if let Some(what) = before.differs(&after) {
            return Err(IndexError::ChangedDuringBuild { path: image.to_path_buf(), what });
        }

        // Each segment is sorted by key with equal keys in window order; concatenated in segment
        // order, a stable sort merges the runs and keeps the first window of every key first.
        segs.sort_unstable_by_key(|(seg, _)| *seg);
        let mut all: Vec<(u128, u32, u8)> = Vec::with_capacity(segs.iter().map(|(_, v)| v.len()).sum());
        for (_, v) in segs {
            all.extend(v);
        }
        all.sort_by_key(|&(k, _, _)| k);
        all.dedup_by_key(|&mut (k, _, _)| k);
        let mut keys = Vec::with_capacity(all.len());
        let mut blocks = Vec::with_capacity(all.len());
        let mut tails = Vec::with_capacity(all.len());
        for (k, b, t) in all {
            keys.push(k);
            blocks.push(b);
            tails.push(t);
        }
        let index_hash = file::body_hash(stride, &keys, &blocks, &tails);
        Ok(DiskIndex::from_sorted(keys, blocks, tails, Meta { stamp: before, sample_hash, index_hash, zero_blocks, stride }))
    }
}

fn worker(job: &Job<'_>) -> Result<(Vec<SegmentResult>, u64), IndexError> {
    let mut out = Vec::new();
    let mut zero = 0u64;
    let tail = BLOCK_SIZE_U64 - job.stride;
    let mut buf = vec![0u8; usize::try_from(READ_BYTES + tail).unwrap_or(usize::MAX)];
    let mut page = [0u8; BLOCK_SIZE];
    // Window starts of this job are [0, end).
    let end = job.windows * job.stride;
    loop {
        if job.abort.load(Ordering::Relaxed) {
            return Ok((out, zero));
        }
        let seg = job.next.fetch_add(1, Ordering::Relaxed);
        let first = seg.saturating_mul(SEGMENT_BYTES);
        if first >= end {
            return Ok((out, zero));
        }
        let seg_end = first.saturating_add(SEGMENT_BYTES).min(end);
        let mut entries = Vec::new();
        let mut at = first;
        while at < seg_end {
            let starts = (seg_end - at).min(READ_BYTES);
            // The bytes of every window starting in [at, at + starts): the image holds them all
            // (the last window starts at most size - 4096).
            let len = (starts - job.stride + BLOCK_SIZE_U64).min(job.size - at);
            let chunk = &mut buf[..usize::try_from(len).unwrap_or(0)];
            if let Err(source) = job.f.read_exact_at(chunk, at) {
                job.abort.store(true, Ordering::Relaxed);
                return Err(IndexError::Read { path: job.image.to_path_buf(), offset: at, source });
            }
            let mut off = 0usize;
            let step = usize::try_from(job.stride).unwrap_or(BLOCK_SIZE);
            while off as u64 + BLOCK_SIZE_U64 <= len && (off as u64) < starts {
                let w = &chunk[off..off + BLOCK_SIZE];
                if is_zero(w) {
                    zero += 1;
                } else {
                    // The window number is below windows <= MAX_WINDOWS = u32::MAX, so it fits.
                    let n = u32::try_from((at + off as u64) / job.stride).unwrap_or(u32::MAX);
                    entries.push((xxhash_rust::xxh3::xxh3_128(w), n, 0));
                    // Under 4 KiB blocks, the last page of a file: its first blocks, then zeros.
                    // Only where the kept part ends with a zero byte, as a file's last block
                    // does unless the file fills it to the last byte (then its last page is
                    // sent as any other page): less than half the tail entries otherwise.
                    let mut keep = step;
                    while keep < BLOCK_SIZE {
                        let (head, rest) = w.split_at(keep);
                        if head.last() == Some(&0) && !is_zero(rest) && !is_zero(head) {
                            page[..keep].copy_from_slice(head);
                            page[keep..].fill(0);
                            // (4096 - keep) / 512 <= 7.
                            let t = u8::try_from((BLOCK_SIZE - keep) / 512).unwrap_or(7);
                            entries.push((xxhash_rust::xxh3::xxh3_128(&page), n, t));
                        }
                        keep += step;
                    }
                }
                off += step;
            }
            at += starts;
            job.done.fetch_add(starts, Ordering::Relaxed);
        }
        entries.sort_by_key(|&(k, _, _)| k);
        out.push((seg, entries));
    }
}

/// xxh3-128 of the image size and of [`SAMPLES`] whole blocks spread evenly over the image
/// (first and last included).
pub(crate) fn sample_hash(f: &Source, image: &Path, size: u64) -> Result<u128, IndexError> {
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
