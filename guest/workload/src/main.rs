//! livemig test-guest workload. See guest/README.md for the console line formats.

mod disk;
mod page;
mod sys;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use page::PAGE_SIZE;

/// Writes one whole line (with '\n') to stdout in one write, flushed.
fn emit(line: &str) {
    let mut s = String::with_capacity(line.len() + 1);
    s.push_str(line);
    s.push('\n');
    let out = std::io::stdout();
    let mut lock = out.lock();
    let _ = lock.write_all(s.as_bytes());
    let _ = lock.flush();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    Uniform,
    HotCold,
    Sequential,
}

#[derive(Debug, Clone)]
struct Args {
    mode: String,
    mib: Option<u64>,
    rate: Option<f64>,
    pattern: Pattern,
    verify_secs: f64,
    dir: PathBuf,
    then_dirty_mib: Option<u64>,
    seed: u64,
    /// disk mode: milliseconds between two files.
    file_ms: Option<u64>,
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut a = Args {
        mode: "heartbeat".into(),
        mib: None,
        rate: None,
        pattern: Pattern::Uniform,
        verify_secs: 2.0,
        dir: PathBuf::from("/mnt/root"),
        then_dirty_mib: None,
        seed: 1,
        file_ms: None,
    };
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        let Some(key) = k.strip_prefix("--") else {
            return Err(format!("unexpected argument {k:?}"));
        };
        let (key, val) = match key.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (
                key.to_string(),
                it.next().cloned().ok_or_else(|| format!("--{key} needs a value"))?,
            ),
        };
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("--{key} {v:?}: {e}"));
        let flt = |v: &str| v.parse::<f64>().map_err(|e| format!("--{key} {v:?}: {e}"));
        match key.replace('_', "-").as_str() {
            "mode" => a.mode = val,
            "mib" => a.mib = Some(num(&val)?),
            "rate" => a.rate = Some(flt(&val)?),
            "pattern" => {
                a.pattern = match val.as_str() {
                    "uniform" => Pattern::Uniform,
                    "hotcold" => Pattern::HotCold,
                    "sequential" => Pattern::Sequential,
                    _ => return Err(format!("unknown pattern {val:?}")),
                }
            }
            "verify-secs" => a.verify_secs = flt(&val)?,
            "dir" => a.dir = PathBuf::from(val),
            "then-dirty-mib" => a.then_dirty_mib = Some(num(&val)?),
            "seed" => a.seed = num(&val)?,
            "file-ms" => a.file_ms = Some(num(&val)?),
            _ => emit(&format!("LIVEMIG-WARN unknown option --{key} (ignored)")),
        }
    }
    Ok(a)
}

struct Heartbeat {
    n: u64,
    last: Instant,
}

impl Heartbeat {
    fn new() -> Heartbeat {
        Heartbeat { n: 0, last: Instant::now() }
    }
    fn beat(&mut self) {
        self.n += 1;
        self.last = Instant::now();
        emit(&format!("LIVEMIG-HEARTBEAT n={} uptime_ms={}", self.n, sys::uptime_ms()));
    }
    /// Emits a heartbeat if a second has passed since the last one.
    fn maybe(&mut self) {
        if self.last.elapsed() >= Duration::from_secs(1) {
            self.beat();
        }
    }
}

fn heartbeat_forever(hb: &mut Heartbeat) -> ! {
    loop {
        hb.beat();
        std::thread::sleep(Duration::from_secs(1).saturating_sub(hb.last.elapsed()));
    }
}

/// Small fast PRNG (xorshift64*) for choosing pages.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        // n is a page count, far below 2^32 * 2^32; the product fits u128 and the result < n.
        usize::try_from((u128::from(self.next()) * n as u128) >> 64).unwrap_or(0)
    }
}

struct Dirty {
    buf: sys::AnonMap,
    pages: usize,
    expected: Vec<u64>,
    writes: u64,
    pass: u64,
    rng: Rng,
    cursor: usize,
    pattern: Pattern,
}

impl Dirty {
    fn new(mib: u64, pattern: Pattern, seed: u64) -> std::io::Result<Dirty> {
        let bytes = usize::try_from(mib.max(1) << 20)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "too large"))?;
        let buf = sys::AnonMap::new(bytes)?;
        let pages = bytes / PAGE_SIZE;
        Ok(Dirty {
            buf,
            pages,
            expected: vec![0; pages],
            writes: 0,
            pass: 0,
            rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
            cursor: 0,
            pattern,
        })
    }

    fn write_page(&mut self, i: usize) {
        let g = self.expected[i] + 1;
        let p = &mut self.buf.as_mut_slice()[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
        page::write(p, i as u64, g);
        self.expected[i] = g;
        self.writes += 1;
    }

    fn next_page(&mut self) -> usize {
        match self.pattern {
            Pattern::Uniform => self.rng.below(self.pages),
            Pattern::Sequential => {
                let i = self.cursor;
                self.cursor = (self.cursor + 1) % self.pages;
                i
            }
            Pattern::HotCold => {
                let hot = (self.pages / 10).max(1);
                if self.pages <= hot || self.rng.below(10) < 9 {
                    self.rng.below(hot)
                } else {
                    hot + self.rng.below(self.pages - hot)
                }
            }
        }
    }

    fn verify(&mut self) {
        self.pass += 1;
        let t0 = Instant::now();
        let mut bad = 0u64;
        let mut lines = Vec::new();
        let buf = self.buf.as_slice();
        for (i, exp) in self.expected.iter().enumerate() {
            let p = &buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            if let Err(why) = page::verify(p, i as u64, *exp) {
                bad += 1;
                if lines.len() < 8 {
                    lines.push(format!(
                        "LIVEMIG-BAD page={i} reason={} expected_gen={exp} found_gen={}",
                        why.as_str(),
                        page::generation(p)
                    ));
                }
            }
        }
        let ms = t0.elapsed().as_millis();
        for l in &lines {
            emit(l);
        }
        emit(&format!(
            "LIVEMIG-VERIFY pass={} pages={} bad={bad} writes={}",
            self.pass, self.pages, self.writes
        ));
        emit(&format!("LIVEMIG-STAT verify_ms={ms} pass={}", self.pass));
    }

    fn run(&mut self, rate_mib: f64, verify_secs: f64, hb: &mut Heartbeat) -> ! {
        for i in 0..self.pages {
            self.write_page(i);
            if i % 256 == 0 {
                hb.maybe();
            }
        }
        emit(&format!(
            "LIVEMIG-READY mode=dirty mib={} pages={}",
            (self.pages * PAGE_SIZE) >> 20,
            self.pages
        ));
        let slice = Duration::from_millis(10);
        let verify_every = Duration::from_secs_f64(verify_secs.max(0.05));
        let pages_per_sec = rate_mib.max(0.0) * 256.0;
        let mut last_verify = Instant::now();
        let mut credit = 0.0f64;
        let mut last_tick = Instant::now();
        loop {
            if last_verify.elapsed() >= verify_every {
                self.verify();
                last_verify = Instant::now();
                last_tick = Instant::now(); // do not make up for time spent verifying
            }
            hb.maybe();
            if pages_per_sec <= 0.0 {
                for _ in 0..64 {
                    let i = self.next_page();
                    self.write_page(i);
                }
                continue;
            }
            let now = Instant::now();
            credit += now.duration_since(last_tick).as_secs_f64() * pages_per_sec;
            last_tick = now;
            // At most two slices of backlog, so the rate stays smooth.
            credit = credit.min(pages_per_sec * 0.02 + 1.0);
            while credit >= 1.0 {
                let i = self.next_page();
                self.write_page(i);
                credit -= 1.0;
            }
            std::thread::sleep(slice);
        }
    }
}

fn cache_dir(dir: &Path, limit: u64, hb: &mut Heartbeat) -> (u64, u64) {
    let mut files = 0u64;
    let mut bytes = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    let mut buf = vec![0u8; 1 << 20];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                if bytes >= limit {
                    return (files, bytes);
                }
                let Ok(mut f) = std::fs::File::open(e.path()) else { continue };
                files += 1;
                loop {
                    match f.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => bytes += n as u64,
                    }
                    hb.maybe();
                    if bytes >= limit {
                        break;
                    }
                }
            }
        }
    }
    (files, bytes)
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            emit(&format!("LIVEMIG-ERROR {e}"));
            std::process::exit(2);
        }
    };
    let mut hb = Heartbeat::new();
    match args.mode.as_str() {
        "heartbeat" => heartbeat_forever(&mut hb),
        "disk" => {
            // Files on the data disk in a thread, the dirty-memory workload here.
            let every = Duration::from_millis(args.file_ms.unwrap_or(200));
            let verify = Duration::from_secs_f64(args.verify_secs.max(0.05));
            std::thread::spawn(move || disk::run(every, verify));
            let mib = args.mib.unwrap_or(8);
            let mut d = dirty_or_exit(mib, &args);
            d.run(args.rate.unwrap_or(1.0), args.verify_secs, &mut hb)
        }
        "dirty" => {
            let mib = args.mib.unwrap_or(64);
            let mut d = dirty_or_exit(mib, &args);
            d.run(args.rate.unwrap_or(0.0), args.verify_secs, &mut hb)
        }
        "cache" => {
            let limit = args.mib.map_or(u64::MAX, |m| m << 20);
            let (files, bytes) = cache_dir(&args.dir, limit, &mut hb);
            emit(&format!("LIVEMIG-CACHE files={files} bytes={bytes}"));
            match args.then_dirty_mib {
                Some(m) if m > 0 => {
                    let mut d = dirty_or_exit(m, &args);
                    d.run(args.rate.unwrap_or(1.0), args.verify_secs, &mut hb)
                }
                _ => heartbeat_forever(&mut hb),
            }
        }
        other => {
            emit(&format!("LIVEMIG-ERROR unknown mode {other:?}"));
            std::process::exit(2);
        }
    }
}

/// The dirty-memory workload over `mib` MiB, or `LIVEMIG-ERROR` and exit 1 if it cannot be
/// allocated.
fn dirty_or_exit(mib: u64, args: &Args) -> Dirty {
    Dirty::new(mib, args.pattern, args.seed).unwrap_or_else(|e| {
        emit(&format!("LIVEMIG-ERROR cannot allocate {mib} MiB: {e}"));
        std::process::exit(1);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn args_parse() {
        let a = parse_args(&s(&["--mode", "dirty", "--mib", "64", "--pattern", "hotcold", "--rate=5"])).unwrap();
        assert_eq!(a.mode, "dirty");
        assert_eq!(a.mib, Some(64));
        assert_eq!(a.pattern, Pattern::HotCold);
        assert_eq!(a.rate, Some(5.0));
        assert!(parse_args(&s(&["--mib"])).is_err());
        assert!(parse_args(&s(&["--pattern", "x"])).is_err());
    }

    #[test]
    fn dirty_buffer_verifies_and_detects_corruption() {
        let mut d = Dirty::new(1, Pattern::HotCold, 3).unwrap();
        for i in 0..d.pages {
            d.write_page(i);
        }
        for _ in 0..1000 {
            let i = d.next_page();
            assert!(i < d.pages);
            d.write_page(i);
        }
        let buf = d.buf.as_slice();
        for (i, e) in d.expected.iter().enumerate() {
            assert_eq!(page::verify(&buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE], i as u64, *e), Ok(()));
        }
        // Roll one page back to an older generation.
        let e = d.expected[5];
        page::write(&mut d.buf.as_mut_slice()[5 * PAGE_SIZE..6 * PAGE_SIZE], 5, e.max(2) - 1);
        d.expected[5] = e.max(2);
        let buf = d.buf.as_slice();
        assert_eq!(page::verify(&buf[5 * PAGE_SIZE..6 * PAGE_SIZE], 5, d.expected[5]), Err(page::Bad::Generation));
    }
}
