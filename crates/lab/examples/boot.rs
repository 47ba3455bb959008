//! Boots one test VM and streams its console for a while, with timings.
//!
//! `cargo run -p livemig-lab --example boot -- [--secs N] [--mem MIB] [--no-disk] [KEY=VALUE ...]`
//! e.g. `-- mode=dirty mib=64 rate=0` (KEY=VALUE become lm.KEY=VALUE).

use std::time::{Duration, Instant};

use livemig_lab::{GuestImage, Vm, VmConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut secs = 10u64;
    let mut cfg = VmConfig::new("example", std::env::temp_dir().join(format!("livemig-lab-example-{}", std::process::id())));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => secs = args.next().ok_or("--secs N")?.parse()?,
            "--mem" => cfg.mem_mib = args.next().ok_or("--mem MIB")?.parse()?,
            "--no-disk" => cfg.with_disk = false,
            kv => {
                let (k, v) = kv.split_once('=').ok_or("expected KEY=VALUE")?;
                cfg = cfg.param(k, v);
            }
        }
    }
    let image = GuestImage::build()?;
    let t0 = Instant::now();
    let vm = Vm::start(&image, &cfg)?;
    let mut mark = 0;
    let end = Duration::from_secs(secs);
    while t0.elapsed() < end {
        let line = match vm.wait_console_from(&mut mark, end.saturating_sub(t0.elapsed()), |_| true) {
            Ok(l) => l,
            Err(livemig_lab::LabError::Timeout { .. }) => break,
            Err(e) => return Err(e.into()),
        };
        println!("{:7.3} {line}", t0.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_dir_all(&cfg.run_dir);
    Ok(())
}
