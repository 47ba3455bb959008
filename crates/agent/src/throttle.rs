//! Slows a guest that dirties memory faster than the link carries it: stuns its vCPUs in short
//! slices with QMP `stop`/`cont`, a fraction of every period.
//!
//! The throttler shares the sender's QMP connection (QEMU serves one QMP client at a time). It
//! always leaves the VM running: when it is told to stop, when it is dropped, and when a QMP
//! command fails (it then tries `cont` once more and reports the error).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig_qmp::Qmp;

use crate::error::AgentError;

/// Length of one stun-and-run period.
pub const PERIOD: Duration = Duration::from_millis(100);

/// Locks the shared QMP connection; a panic elsewhere does not make it unusable.
pub(crate) fn lock(qmp: &Mutex<Qmp>) -> MutexGuard<'_, Qmp> {
    qmp.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the throttler did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ThrottleStats {
    /// Time the vCPUs were stunned.
    pub stunned: Duration,
    /// Stun slices.
    pub slices: u64,
}

/// A running throttler.
#[derive(Debug)]
pub struct Throttler {
    level: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<ThrottleStats, AgentError>>>,
}

impl Throttler {
    /// Starts a throttler at level 0 (the guest untouched).
    pub fn start(qmp: Arc<Mutex<Qmp>>) -> Throttler {
        let level = Arc::new(AtomicU64::new(0f64.to_bits()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (Arc::clone(&level), Arc::clone(&stop));
        let handle = std::thread::Builder::new()
            .name("livemig-throttle".into())
            .spawn(move || run(&qmp, &l, &s))
            .expect("spawn throttle thread");
        Throttler { level, stop, handle: Some(handle) }
    }

    /// Sets the fraction of every period the vCPUs are stunned (clamped to 0..0.99).
    pub fn set(&self, fraction: f64) {
        let f = if fraction.is_finite() { fraction.clamp(0.0, 0.99) } else { 0.0 };
        self.level.store(f.to_bits(), Ordering::Relaxed);
    }

    /// The level in force.
    pub fn level(&self) -> f64 {
        f64::from_bits(self.level.load(Ordering::Relaxed))
    }

    /// Fails if the throttler stopped on an error (the VM was left running if at all possible).
    pub fn check(&mut self) -> Result<(), AgentError> {
        if self.handle.as_ref().is_some_and(JoinHandle::is_finished) {
            return self.join().map(drop);
        }
        Ok(())
    }

    /// Stops the throttler; returns once the VM is running again.
    pub fn finish(mut self) -> Result<ThrottleStats, AgentError> {
        self.join()
    }

    fn join(&mut self) -> Result<ThrottleStats, AgentError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(AgentError::Throttle("the throttle thread panicked".into())),
            None => Ok(ThrottleStats::default()),
        }
    }
}

impl Drop for Throttler {
    fn drop(&mut self) {
        let _ = self.join();
    }
}

/// Sleeps up to `d`, waking early when `stop` is set.
fn nap(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(5)));
    }
}

fn run(qmp: &Mutex<Qmp>, level: &AtomicU64, stop: &AtomicBool) -> Result<ThrottleStats, AgentError> {
    let mut stats = ThrottleStats::default();
    while !stop.load(Ordering::Relaxed) {
        let f = f64::from_bits(level.load(Ordering::Relaxed));
        if f <= 0.0 {
            nap(Duration::from_millis(20), stop);
            continue;
        }
        let stun = PERIOD.mul_f64(f);
        let t0 = Instant::now();
        {
            let mut q = lock(qmp);
            q.stop().map_err(|e| AgentError::Throttle(format!("cannot stun the source VM: {e}")))?;
        }
        // Stunned: from here on the VM must be resumed whatever happens.
        nap(stun, stop);
        let resumed = {
            let mut q = lock(qmp);
            let r = q.cont().or_else(|_| q.cont());
            // The STOP/RESUME events of the slices are of no interest to anyone.
            let _ = q.take_events();
            r
        };
        resumed.map_err(|e| AgentError::Throttle(format!("cannot resume the source VM after a stun slice: {e}")))?;
        stats.stunned += t0.elapsed();
        stats.slices += 1;
        nap(PERIOD.saturating_sub(stun), stop);
    }
    Ok(stats)
}
