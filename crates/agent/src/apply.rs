//! The receiver's side of the page pipeline: batches of page records decoded and written into
//! the destination memory on several threads (`receive --threads`), from one connection or
//! several (`send --connections`).
//!
//! The batches of one iteration are applied in any order, concurrently: within an iteration
//! each page is sent once and a delta's base is the page's own version from an earlier
//! iteration; `dup` records are resolved once every batch of the iteration is applied (their
//! source may be written by another batch), and the sender names no page the iteration sends
//! later as a source ([`livemig_compact::Encoder::begin_pass`]). Every reference is checked
//! against its keyed fingerprint anyway, so a race costs a resend, never wrong data. Between iterations the
//! receiver waits until every batch handed over is applied ([`Feeder::wait_idle`]) before it
//! acknowledges the iteration, and the sender starts the next one only after that
//! acknowledgement.
//!
//! Each thread keeps its own pending zero run ([`ZeroRuns`]), class counts and the ledger hashes
//! of the pages it wrote; the hashes go into the shared ledger once per batch, under its lock.

use std::io::Read;
use std::net::TcpStream;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use livemig_compact::{decode_batch, ClassStats, Destination, DiskRef, PageClass, PageKey, PAGE_SIZE};
use livemig_index::{Snapshot, SnapshotWriter};
use livemig_memory::{GuestMemory, Zeroed};
use livemig_track::Ledger;
use livemig_wire::{FrameKind, Message};

use crate::error::AgentError;
use crate::pipeline::{PageHashes, ZeroRuns};

/// Most decoding threads.
pub const MAX_THREADS: usize = 64;

/// Where references other than `dup` and delta are read from: the destination's disk images and
/// the memory snapshot the plan names.
pub trait Sources: Sync {
    /// [`Destination::read_disk_block`].
    fn read_disk_block(&self, r: DiskRef, out: &mut [u8; PAGE_SIZE]) -> bool;
    /// [`Destination::read_snapshot_page`].
    fn read_snapshot_page(&self, page: u64, out: &mut [u8; PAGE_SIZE]) -> bool;
}

/// No disk image, no snapshot.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSources;

impl Sources for NoSources {
    fn read_disk_block(&self, _: DiskRef, _: &mut [u8; PAGE_SIZE]) -> bool {
        false
    }
    fn read_snapshot_page(&self, _: u64, _: &mut [u8; PAGE_SIZE]) -> bool {
        false
    }
}

/// The receiver's images and snapshot as [`Sources`].
pub(crate) struct Held<'a> {
    pub(crate) disks: &'a crate::holdings::ReceiverDisks,
    pub(crate) snapshot: Option<&'a Snapshot>,
}

impl Sources for Held<'_> {
    fn read_disk_block(&self, r: DiskRef, out: &mut [u8; PAGE_SIZE]) -> bool {
        self.disks.read(r, out)
    }
    fn read_snapshot_page(&self, page: u64, out: &mut [u8; PAGE_SIZE]) -> bool {
        self.snapshot.is_some_and(|s| s.read_page(page, out).is_ok())
    }
}

/// What every decoding thread writes into or reads from.
pub struct Target<'a, 'w> {
    /// The destination's guest memory.
    pub mem: &'a GuestMemory,
    /// Pages of the guest (records beyond are malformed).
    pub total: u64,
    /// The migration's page key.
    pub key: &'a PageKey,
    /// Disk images and snapshot.
    pub sources: &'a dyn Sources,
    /// The ledger of what the destination holds.
    pub ledger: Mutex<Ledger>,
    /// The memory snapshot being kept of the received pages, if any; dropped (and the reason
    /// kept in `keep_error`) at its first failure.
    pub keep: Mutex<Option<SnapshotWriter<'w>>>,
    /// Why the snapshot is not kept any more.
    pub keep_error: Mutex<Option<String>>,
    /// Map each batch's runs of data pages for writing ahead of the writes
    /// ([`GuestMemory::populate_write`]); cleared at the kernel's first refusal (Linux < 5.14),
    /// after which the writes fault their pages in one by one, as before.
    pub populate: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Target<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("total", &self.total).finish_non_exhaustive()
    }
}

impl<'a, 'w> Target<'a, 'w> {
    /// A target without a kept snapshot.
    pub fn new(mem: &'a GuestMemory, total: u64, key: &'a PageKey, sources: &'a dyn Sources, ledger: Ledger) -> Self {
        Target {
            mem,
            total,
            key,
            sources,
            ledger: Mutex::new(ledger),
            keep: Mutex::new(None),
            keep_error: Mutex::new(None),
            populate: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// The ledger (its lock).
    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A `dup` record left for the end of its pass: (page, source, fingerprint, record length).
type Dup = (u64, u64, u128, usize);

/// What the threads did so far.
#[derive(Debug, Default)]
struct Progress {
    handed: u64,
    applied: u64,
    /// Pages whose reference or delta did not resolve, since the last [`Feeder::wait_idle`].
    misses: Vec<u64>,
    /// `dup` records of the pass, resolved once it is applied: (page, source, fingerprint,
    /// record length).
    dups: Vec<Dup>,
    error: Option<AgentError>,
    stats: ClassStats,
    zeroed: Zeroed,
}

/// What the threads of a pool share.
#[derive(Debug, Default)]
pub struct State {
    progress: Mutex<Progress>,
    changed: Condvar,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Both ends of the queue of batches.
type Batches = (Sender<Vec<u8>>, Receiver<Vec<u8>>);

/// The decoding threads of one migration: made before a thread scope (it outlives the
/// threads), started in it ([`Pool::start`]), fed through [`Feeder`]s.
#[derive(Debug)]
pub struct Pool {
    state: State,
    threads: usize,
    /// Taken when the threads start.
    channel: Mutex<Option<Batches>>,
}

impl Pool {
    /// A pool of `threads` threads (1 to [`MAX_THREADS`]).
    pub fn new(threads: usize) -> Pool {
        let threads = threads.clamp(1, MAX_THREADS);
        Pool { state: State::default(), threads, channel: Mutex::new(Some(bounded(threads * 2))) }
    }

    /// Threads it runs.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Starts the threads in `scope`, writing into `target`; returns the first feeder. The
    /// threads end once every feeder is dropped and the batches queued are applied. A pool
    /// starts once.
    pub fn start<'scope, 'env, 'a, 'w>(
        &'env self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        target: &'env Target<'a, 'w>,
    ) -> Result<Feeder<'env>, AgentError>
    where
        'a: 'env,
        'w: 'env,
    {
        let (tx, rx) = self
            .channel
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| AgentError::Internal("the decoding threads were started already".into()))?;
        for i in 0..self.threads {
            let rx = rx.clone();
            let state = &self.state;
            std::thread::Builder::new()
                .name(format!("livemig-apply-{i}"))
                .spawn_scoped(scope, move || worker(target, &rx, state))
                .map_err(|e| AgentError::Internal(format!("cannot start a decoding thread: {e}")))?;
        }
        Ok(Feeder { tx, state: &self.state })
    }
}

/// Hands batches to a [`Pool`]'s threads (bounded: it waits while every thread is busy and the
/// queue is full). Cloned for each connection's reader.
#[derive(Debug, Clone)]
pub struct Feeder<'p> {
    tx: Sender<Vec<u8>>,
    state: &'p State,
}

impl Feeder<'_> {
    /// Hands a batch to the threads; fails if an earlier batch failed.
    pub fn apply(&self, payload: Vec<u8>) -> Result<(), AgentError> {
        {
            let mut p = self.state.lock();
            if let Some(e) = p.error.take() {
                return Err(e);
            }
            p.handed += 1;
        }
        self.tx.send(payload).map_err(|_| AgentError::Internal("the decoding threads ended".into()))
    }

    /// Waits until every batch handed over is applied, then resolves the pass's `dup` records
    /// (their sources are written by then); returns the pages that did not resolve since the
    /// last call (ascending), or the first error.
    pub fn wait_idle(&self, target: &Target<'_, '_>) -> Result<Vec<u64>, AgentError> {
        let dups = {
            let mut p = self.state.lock();
            while p.applied < p.handed && p.error.is_none() {
                p = self.state.changed.wait(p).unwrap_or_else(PoisonError::into_inner);
            }
            if let Some(e) = p.error.take() {
                return Err(e);
            }
            std::mem::take(&mut p.dups)
        };
        let mut stats = ClassStats::default();
        let mut missed = Vec::new();
        resolve_dups(target, &dups, &mut stats, &mut missed)?;
        let mut p = self.state.lock();
        p.stats.merge(&stats);
        let mut misses = std::mem::take(&mut p.misses);
        misses.extend(missed);
        misses.sort_unstable();
        Ok(misses)
    }

    /// Record counts and zeroed pages of every batch applied so far.
    pub fn totals(&self) -> (ClassStats, Zeroed) {
        let p = self.state.lock();
        (p.stats, p.zeroed)
    }
}

/// The ledger hashes of the pages one thread wrote in a batch, added to the ledger afterwards.
struct Hashes<'k> {
    key: &'k PageKey,
    list: Vec<(u64, u64)>,
}

impl PageHashes for Hashes<'_> {
    fn key(&self) -> &PageKey {
        self.key
    }
    fn record_hash(&mut self, page: u64, hash: u64) {
        self.list.push((page, hash));
    }
}

/// The destination as one decoding thread sees it.
struct ThreadDest<'t, 'a, 'w> {
    target: &'t Target<'a, 'w>,
    zeros: &'t mut ZeroRuns,
    hashes: &'t mut Hashes<'a>,
    stats: &'t mut ClassStats,
    dups: &'t mut Vec<Dup>,
}

impl Destination for ThreadDest<'_, '_, '_> {
    type Error = AgentError;

    fn read_page(&mut self, page: u64, out: &mut [u8; PAGE_SIZE]) -> bool {
        // A page that cannot be made zero first is unreadable (a miss; the batch's flush then
        // reports the error).
        self.zeros.before_access(self.target.mem, page).is_ok() && self.target.mem.read_page_into(page, out).is_ok()
    }

    fn read_disk_block(&mut self, r: DiskRef, out: &mut [u8; PAGE_SIZE]) -> bool {
        self.target.sources.read_disk_block(r, out)
    }

    fn read_snapshot_page(&mut self, page: u64, out: &mut [u8; PAGE_SIZE]) -> bool {
        self.target.sources.read_snapshot_page(page, out)
    }

    fn defer_dup(&mut self, page: u64, src: u64, fp: u128, record_len: usize) -> bool {
        // The source may be written by another batch of the pass, on another thread.
        self.dups.push((page, src, fp, record_len));
        true
    }

    fn write_page(&mut self, page: u64, class: PageClass, data: &[u8; PAGE_SIZE], record_len: usize) -> Result<(), AgentError> {
        // A zero page is freed (a hole) rather than written, where the memory is on tmpfs.
        self.zeros.apply(self.target.mem, self.hashes, page, class == PageClass::Zero, data)?;
        self.stats.add(class, record_len);
        let mut keep = self.target.keep.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = keep.as_mut() {
            if let Err(e) = w.write_page(page, data) {
                *self.target.keep_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(crate::with_sources(&e));
                *keep = None;
            }
        }
        Ok(())
    }
}

/// Answers for a thread that panics inside a batch, so a waiter gets an error instead of
/// waiting forever.
struct PanicGuard<'s>(&'s State);

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        let mut p = self.0.lock();
        p.error.get_or_insert(AgentError::Internal("a decoding thread panicked".into()));
        p.applied += 1;
        self.0.changed.notify_all();
    }
}

/// Resolves `dup` records once their pass is applied: each source's content checked against the
/// record's keyed fingerprint, then written (a mismatch is a miss: the page is sent whole again).
fn resolve_dups(target: &Target<'_, '_>, dups: &[Dup], stats: &mut ClassStats, missed: &mut Vec<u64>) -> Result<(), AgentError> {
    let mut buf = [0u8; PAGE_SIZE];
    let mut hashes = Hashes { key: target.key, list: Vec::with_capacity(dups.len()) };
    for &(page, src, fp, record_len) in dups {
        if target.mem.read_page_into(src, &mut buf).is_err() || target.key.fingerprint(&buf) != fp {
            missed.push(page);
            continue;
        }
        target.mem.write_page(page, &buf)?;
        hashes.list.push((page, PageKey::hash_of(fp)));
        stats.add(PageClass::Dup, record_len);
        let mut keep = target.keep.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = keep.as_mut() {
            if let Err(e) = w.write_page(page, &buf) {
                *target.keep_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(crate::with_sources(&e));
                *keep = None;
            }
        }
    }
    let mut ledger = target.ledger();
    for (page, hash) in hashes.list {
        ledger.record_hash(page, hash);
    }
    Ok(())
}

/// Runs of fewer pages are left to fault in as they are written.
const POPULATE_MIN_PAGES: u64 = 4;

/// Maps the batch's runs of data pages for writing in one system call each (a page fault per
/// page costs more, the more so in a VM), where the kernel allows it.
fn prefault(target: &Target<'_, '_>, payload: &[u8]) {
    use std::sync::atomic::Ordering::Relaxed;
    if !target.populate.load(Relaxed) {
        return;
    }
    for run in livemig_compact::data_runs(payload) {
        if run.end - run.start >= POPULATE_MIN_PAGES && run.end <= target.total && target.mem.populate_write(run).is_err() {
            target.populate.store(false, Relaxed);
            return;
        }
    }
}

fn worker(target: &Target<'_, '_>, rx: &Receiver<Vec<u8>>, state: &State) {
    let mut zeros = ZeroRuns::default();
    let mut hashes = Hashes { key: target.key, list: Vec::with_capacity(512) };
    let mut dups = Vec::new();
    for payload in rx {
        let guard = PanicGuard(state);
        prefault(target, &payload);
        let mut stats = ClassStats::default();
        let decoded = {
            let mut dest = ThreadDest { target, zeros: &mut zeros, hashes: &mut hashes, stats: &mut stats, dups: &mut dups };
            decode_batch(&payload, target.total, target.key, &mut dest)
        };
        // Zero runs end with the batch: another thread may read those pages next.
        let flushed = zeros.flush(target.mem);
        {
            let mut ledger = target.ledger();
            for (page, hash) in hashes.list.drain(..) {
                ledger.record_hash(page, hash);
            }
        }
        std::mem::forget(guard);
        let mut p = state.lock();
        match decoded.and_then(|s| flushed.map(|()| s)) {
            Ok(summary) => p.misses.extend(summary.misses.iter().map(|m| m.page)),
            Err(e) => {
                p.error.get_or_insert(e);
            }
        }
        p.stats.merge(&stats);
        p.dups.append(&mut dups);
        let z = std::mem::take(&mut zeros.done);
        p.zeroed.punched += z.punched;
        p.zeroed.written += z.written;
        p.applied += 1;
        state.changed.notify_all();
    }
}

/// What a data connection's reader tells the receiving loop.
#[derive(Debug)]
pub enum DataEvent {
    /// Connection `conn` reached the end of iteration `iteration`: everything before is handed over.
    Fence { conn: u32, iteration: u32 },
    /// Connection `conn` failed.
    Failed { conn: u32, error: AgentError },
}

/// The data connections of a migration (protocol 6) as the receiving loop sees them: a reader
/// thread each, which hands its batches to the decoding threads and reports its fences and its
/// failure. Dropping it shuts the connections down, so the readers end.
#[derive(Debug)]
pub struct DataConnections {
    count: u32,
    /// The last fence of each (connection 1 at index 0).
    fences: Vec<Option<u32>>,
    events: crossbeam_channel::Receiver<DataEvent>,
    /// Kept so `events` never reports every reader gone (a loop selecting on it would spin).
    _events_tx: crossbeam_channel::Sender<DataEvent>,
    sockets: crate::link::ShutOnDrop,
}

impl DataConnections {
    /// Starts a reader in `scope` for each data connection: (its number, its socket, its reading
    /// half, past the `join`).
    pub fn start<'scope, 'env, R: Read + Send + 'scope>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        conns: Vec<(u32, TcpStream, R)>,
        feeder: &Feeder<'env>,
    ) -> Result<DataConnections, AgentError> {
        let (events_tx, events) = crossbeam_channel::unbounded::<DataEvent>();
        let count = u32::try_from(conns.len()).unwrap_or(u32::MAX);
        let mut data = DataConnections { count, fences: vec![None; conns.len()], events, _events_tx: events_tx.clone(), sockets: crate::link::ShutOnDrop::default() };
        for (index, stream, reader) in conns {
            data.sockets.0.push(stream);
            let (feeder, events) = (feeder.clone(), events_tx.clone());
            std::thread::Builder::new()
                .name(format!("livemig-data-{index}"))
                .spawn_scoped(scope, move || read_data_connection(index, reader, &feeder, &events))
                .map_err(|e| AgentError::Internal(format!("cannot start a data connection's reader: {e}")))?;
        }
        Ok(data)
    }

    /// The readers' reports, for a `select!`; each goes to [`DataConnections::take`].
    pub fn events(&self) -> &crossbeam_channel::Receiver<DataEvent> {
        &self.events
    }

    /// Takes a reader's report: a fence is noted, a failure is the error.
    pub fn take(&mut self, e: DataEvent) -> Result<(), AgentError> {
        match e {
            DataEvent::Fence { conn, iteration } => {
                let slot = usize::try_from(conn).ok().and_then(|c| c.checked_sub(1)).and_then(|c| self.fences.get_mut(c));
                match slot {
                    Some(f) => {
                        *f = Some(iteration);
                        Ok(())
                    }
                    None => Err(AgentError::Internal(format!("a fence from unknown connection {conn}"))),
                }
            }
            DataEvent::Failed { conn, error } => Err(AgentError::DataConnection { index: conn, of: self.count + 1, source: Box::new(error) }),
        }
    }

    /// Waits until every data connection reached the end of iteration `index`.
    pub fn wait_fences(&mut self, index: u32, timeout: Duration) -> Result<(), AgentError> {
        loop {
            if let Some(late) = self.fences.iter().find(|f| f.is_some_and(|i| i > index)) {
                return Err(AgentError::Protocol { expected: format!("the end of iteration {index} on every data connection"), got: format!("the end of iteration {late:?} first") });
            }
            if self.fences.iter().all(|f| *f == Some(index)) {
                return Ok(());
            }
            match self.events.recv_timeout(timeout) {
                Ok(e) => self.take(e)?,
                Err(_) => return Err(AgentError::Timeout { what: format!("the data connections to end iteration {index}"), secs: timeout.as_secs_f64() }),
            }
        }
    }
}

/// Reads data connection `conn` until it ends: its batches to the decoding threads, its fences
/// and its failure to the loop. Only `Pages` frames and fences are allowed on it.
fn read_data_connection(conn: u32, mut reader: impl Read, feeder: &Feeder<'_>, events: &crossbeam_channel::Sender<DataEvent>) {
    let failed = |error| {
        let _ = events.send(DataEvent::Failed { conn, error });
    };
    loop {
        let frame = match livemig_wire::read_frame(&mut reader) {
            Ok(f) => f,
            Err(e) => return failed(AgentError::Wire(e)),
        };
        match frame.kind {
            FrameKind::Pages => {
                if let Err(e) = feeder.apply(frame.payload) {
                    return failed(e);
                }
            }
            FrameKind::Control => match frame.message() {
                Ok(Message::Fence { index }) => {
                    if events.send(DataEvent::Fence { conn, iteration: index }).is_err() {
                        return;
                    }
                }
                Ok(Message::Abort { reason }) => return failed(AgentError::PeerAborted { peer: "source", reason }),
                Ok(other) => {
                    return failed(AgentError::Protocol { expected: "pages or a fence on a data connection".into(), got: other.name().into() })
                }
                Err(e) => return failed(AgentError::Wire(e)),
            },
            other => return failed(AgentError::Protocol { expected: "pages or a fence on a data connection".into(), got: format!("{other:?}") }),
        }
    }
}

