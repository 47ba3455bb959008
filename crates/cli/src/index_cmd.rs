//! `livemig index DISK`: builds (or confirms up to date) the fingerprint index of a raw disk
//! image, which lets pages equal to 4 KiB of the disk go as short references.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use livemig_index::{Align, BuildProgress, DiskIndex, Origin, BLOCK_SIZE};

use crate::exit;

#[derive(Args, Debug, Clone)]
pub(crate) struct IndexArgs {
    /// The raw disk image to index (e.g. the guest's root disk).
    #[arg(value_name = "DISK")]
    disk: PathBuf,
    /// Where index files are kept [default: $LIVEMIG_CACHE/index, else ~/.cache/livemig/index].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Bytes between the starts of indexed 4 KiB windows: 512, 1024, 2048, 4096, or auto (from
    /// the image's partitions and ext2/3/4 or XFS block sizes; 512 where none is found). `send`
    /// and `receive` use auto.
    #[arg(long, value_name = "BYTES", default_value = "auto")]
    align: Align,
}

/// `$LIVEMIG_CACHE/index`, else `$HOME/.cache/livemig/index` (the rule of the guest cache).
pub(crate) fn default_cache_dir() -> PathBuf {
    match std::env::var_os("LIVEMIG_CACHE") {
        Some(c) if !c.is_empty() => PathBuf::from(c).join("index"),
        _ => {
            let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
            home.join(".cache/livemig/index")
        }
    }
}

/// Shows build progress: a bar on a terminal, a line per tenth elsewhere.
struct Progress {
    bar: Option<ProgressBar>,
    last_tenth: u64,
    started: bool,
}

impl Progress {
    fn new() -> Self {
        Progress { bar: None, last_tenth: 0, started: false }
    }

    fn update(&mut self, p: BuildProgress) {
        if !self.started {
            self.started = true;
            eprintln!("indexing {} MiB", p.total_bytes >> 20);
            if std::io::stderr().is_terminal() {
                let bar = ProgressBar::new(p.total_bytes);
                if let Ok(style) = ProgressStyle::with_template(
                    "{bar:40.cyan/blue} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                ) {
                    bar.set_style(style);
                }
                bar.enable_steady_tick(Duration::from_millis(200));
                self.bar = Some(bar);
            }
        }
        match &self.bar {
            Some(bar) => bar.set_position(p.done_bytes),
            None => {
                let tenth = p.done_bytes.saturating_mul(10).checked_div(p.total_bytes).unwrap_or(10);
                if tenth > self.last_tenth {
                    self.last_tenth = tenth;
                    eprintln!("indexed {} of {} MiB", p.done_bytes >> 20, p.total_bytes >> 20);
                }
            }
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

pub(crate) fn run(a: &IndexArgs) -> anyhow::Result<u8> {
    let cache_dir = a.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let start = Instant::now();
    let mut progress = Progress::new();
    let result = DiskIndex::load_or_build_aligned(&a.disk, &cache_dir, a.align, &mut |p| progress.update(p));
    progress.finish();
    let (index, origin, stride) = result.with_context(|| format!("cannot index {}", a.disk.display()))?;
    let took = start.elapsed();

    let state = match &origin {
        Origin::Loaded { .. } => "up to date".to_string(),
        Origin::Built { previous: None, .. } => "built".to_string(),
        Origin::Built { previous: Some(why), .. } => format!("rebuilt ({why})"),
        _ => "ready".to_string(),
    };
    let size = index.image_size();
    println!("index of {}: {state}", a.disk.display());
    let file_bytes = std::fs::metadata(origin.file()).map(|m| m.len()).unwrap_or(0);
    println!("  index file:   {} ({file_bytes} bytes)", origin.file().display());
    println!("  stride:       {} bytes ({})", stride.bytes, stride.reason);
    println!(
        "  windows:      {} of {BLOCK_SIZE} bytes ({} zero, not indexed)",
        index.windows(),
        index.zero_blocks()
    );
    println!(
        "  fingerprints: {} unique non-zero ({:.1} MiB in memory)",
        index.len(),
        index.memory_bytes() as f64 / (1024.0 * 1024.0)
    );
    println!("  image size:   {size} bytes ({:.1} MiB)", size as f64 / (1024.0 * 1024.0));
    println!("  time:         {:.3} s", took.as_secs_f64());
    let id = index.identity();
    println!("  identity:     size {}, sample {:032x}, index {:032x}", id.size, id.sample_hash, id.index_hash);
    Ok(exit::OK)
}
