//! The page pipeline of the shared engine's sender, as one function: read the pages, hash them
//! for the ledger, encode them, hand full batches to the writer. `send` runs it every iteration;
//! the developer benchmark (`livemig-dev pipeline`, crate `livemig-dev`) runs the same function
//! over a synthetic guest memory, so what it measures is this code.
//!
//! Hashes: each page sent is hashed once, on the copy that is sent: one keyed xxh3-128
//! ([`PageKey::fingerprint`]) is the record's fingerprint and, by its low half
//! ([`PageKey::hash_of`]), the ledger's hash and digest term. Two other hashes remain, and why:
//! the content tracker hashes every page of RAM each iteration to find the dirty ones, but from
//! its own read, earlier: the guest may write the page between that read and the copy sent, and
//! the ledger must hold the hash of the bytes sent, so the copy is hashed again (the soft-dirty
//! tracker hashes nothing in its iterations). And with a disk index or snapshot the encoder also
//! computes the unkeyed xxh3-128 of pages that are not dups, because those indexes outlive one
//! migration's key.
//!
//! Work is split in rounds of [`ROUND_PAGES`] pages per thread. The calling thread and
//! `threads - 1` workers (started once per call, i.e. per iteration, and fed through bounded
//! channels) each copy their share of a round out of guest memory, hash it for the ledger and
//! prepare its records ([`Encoder::prepare`], the encoder read-only); the calling thread then
//! commits the round in page order
//! ([`Encoder::commit`], the encoder written) and sends full batches. Page buffers, prepared
//! records and compressor contexts move between the workers and the committing thread and are
//! reused for the whole call; batch buffers come back from the writer thread
//! ([`crate::link::Writer::recycled`]) and are reused by the encoder.

use std::ops::Range;
use std::sync::RwLock;

use crossbeam_channel::{bounded, Receiver, Sender};
use livemig_compact::{is_zero, Encoder, PageKey, PageRef, Prepared, Scratch};
use livemig_memory::{GuestMemory, PageBuf};
use livemig_track::Ledger;

use crate::error::AgentError;
use crate::link::Links;

/// Pages one thread handles per round.
pub const ROUND_PAGES: usize = 128;

/// Most worker threads.
pub const MAX_THREADS: usize = 64;

/// One page of a round: its copy, the ledger hash of that copy, its prepared record.
struct Slot {
    buf: Box<PageBuf>,
    hash: u64,
    prepared: Prepared,
}

/// A worker's share of a round: `range` of the page list, and the slots to fill (moved to the
/// worker and back, so no slot is ever shared).
struct Job {
    range: Range<usize>,
    slots: Vec<Slot>,
}

/// A finished share, or the error reading it.
type Done = (Range<usize>, Vec<Slot>, Result<(), AgentError>);

/// Copies, hashes and prepares the pages of `range` of the list into `slots`.
fn prepare_share(
    mem: &GuestMemory,
    list: &[(u64, bool)],
    key: &PageKey,
    enc: &Encoder,
    range: Range<usize>,
    slots: &mut [Slot],
    scratch: &mut Scratch,
) -> Result<(), AgentError> {
    for (&(page, whole), slot) in list[range].iter().zip(slots.iter_mut()) {
        mem.read_page(page, &mut slot.buf)?;
        let data = &slot.buf.0;
        let item = PageRef { page, data, whole };
        if is_zero(data) {
            slot.hash = key.zero_hash();
            enc.prepare(&item, scratch, &mut slot.prepared);
        } else {
            // The one hash of the copy: the record's fingerprint and the ledger's hash.
            let fp = key.fingerprint(data);
            slot.hash = PageKey::hash_of(fp);
            enc.prepare_fingerprinted(&item, fp, scratch, &mut slot.prepared);
        }
    }
    Ok(())
}

fn worker(
    mem: &GuestMemory,
    list: &[(u64, bool)],
    key: &PageKey,
    encoder: &RwLock<&mut Encoder>,
    jobs: &Receiver<Job>,
    done: &Sender<Done>,
) {
    let mut scratch = Scratch::default();
    for Job { range, mut slots } in jobs {
        let guard = PanicGuard { done, range: range.clone() };
        let result = {
            let enc = encoder.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            prepare_share(mem, list, key, &enc, range.clone(), &mut slots, &mut scratch)
        };
        std::mem::forget(guard);
        if done.send((range, slots, result)).is_err() {
            return;
        }
    }
}

/// Answers for a worker that panics inside a job, so the committing thread gets an error
/// instead of waiting forever for its share.
struct PanicGuard<'a> {
    done: &'a Sender<Done>,
    range: Range<usize>,
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        let e = AgentError::Internal("an encoder thread panicked".into());
        let _ = self.done.send((self.range.clone(), Vec::new(), Err(e)));
    }
}

/// Sends the pages of `list` (page, whole), which must be ascending, and records in the ledger
/// the hash of exactly the bytes sent: a write racing with the copy shows up as a changed page
/// in the next scan. Up to `threads` threads (this one included) copy, hash and prepare (see
/// the module).
/// After every batch handed to the connections, `after_batch(pages sent so far, links,
/// encoder)` runs (progress, cancellation, the compressor chosen by the link); its error stops
/// the sending. Returns the pages sent.
///
/// The list is one pass the destination may apply in any order (several connections, several
/// decoding threads: [`Encoder::begin_pass`]).
pub fn send_pages(
    mem: &GuestMemory,
    list: &[(u64, bool)],
    ledger: &mut Ledger,
    encoder: &mut Encoder,
    links: &mut Links,
    threads: usize,
    after_batch: impl FnMut(u64, &Links, &mut Encoder) -> Result<(), AgentError>,
) -> Result<u64, AgentError> {
    if list.is_empty() {
        return Ok(0);
    }
    encoder.begin_pass(list.iter().map(|&(p, _)| p));
    let r = send_pass(mem, list, ledger, encoder, links, threads, after_batch);
    encoder.end_pass();
    r
}

fn send_pass(
    mem: &GuestMemory,
    list: &[(u64, bool)],
    ledger: &mut Ledger,
    encoder: &mut Encoder,
    links: &mut Links,
    threads: usize,
    mut after_batch: impl FnMut(u64, &Links, &mut Encoder) -> Result<(), AgentError>,
) -> Result<u64, AgentError> {
    let threads = threads.clamp(1, MAX_THREADS).min(list.len().div_ceil(ROUND_PAGES));
    let key = ledger.key().clone();
    let encoder = RwLock::new(encoder);
    let mut sent = 0u64;
    let new_share = || -> Vec<Slot> {
        (0..ROUND_PAGES).map(|_| Slot { buf: Box::new(PageBuf::zeroed()), hash: 0, prepared: Prepared::default() }).collect()
    };
    std::thread::scope(|s| -> Result<(), AgentError> {
        // The calling thread prepares one share of each round itself: threads - 1 workers.
        let (done_tx, done_rx) = bounded::<Done>(threads);
        let mut to_workers = Vec::with_capacity(threads - 1);
        let mut shares: Vec<Vec<Slot>> = (0..threads).map(|_| new_share()).collect();
        for i in 1..threads {
            let (tx, rx) = bounded::<Job>(1);
            let (done_tx, key, encoder) = (done_tx.clone(), &key, &encoder);
            std::thread::Builder::new()
                .name(format!("livemig-encode-{i}"))
                .spawn_scoped(s, move || worker(mem, list, key, encoder, &rx, &done_tx))
                .map_err(|e| AgentError::Internal(format!("cannot start an encoder thread: {e}")))?;
            to_workers.push(tx);
        }
        drop(done_tx);
        let mut scratch = Scratch::default();
        let mut parts: Vec<(Range<usize>, Vec<Slot>)> = Vec::with_capacity(threads);
        let mut next = 0usize;
        while next < list.len() {
            // Hand out the round: one share per worker, in list order, the last one ours.
            let mut handed = 0;
            for tx in &to_workers {
                if next >= list.len() {
                    break;
                }
                let range = next..(next + ROUND_PAGES).min(list.len());
                next = range.end;
                let slots = shares.pop().expect("a free share per thread");
                tx.send(Job { range, slots }).map_err(|_| AgentError::Internal("an encoder thread ended".into()))?;
                handed += 1;
            }
            let mut failure = None;
            if next < list.len() {
                let range = next..(next + ROUND_PAGES).min(list.len());
                next = range.end;
                let mut own = shares.pop().expect("a free share per thread");
                let enc = encoder.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Err(e) = prepare_share(mem, list, &key, &enc, range.clone(), &mut own, &mut scratch) {
                    failure = Some(e);
                }
                drop(enc);
                parts.push((range, own));
            }
            for _ in 0..handed {
                let (range, slots, result) =
                    done_rx.recv().map_err(|_| AgentError::Internal("an encoder thread ended".into()))?;
                if let Err(e) = result {
                    failure.get_or_insert(e);
                }
                parts.push((range, slots));
            }
            if let Some(e) = failure {
                return Err(e);
            }
            parts.sort_unstable_by_key(|(r, _)| r.start);
            // Commit in page order.
            let mut enc = encoder.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (range, slots) in parts.drain(..) {
                for (&(page, _), slot) in list[range.clone()].iter().zip(slots.iter()) {
                    ledger.record_hash(page, slot.hash);
                    enc.commit(&slot.prepared, &slot.buf.0);
                }
                sent += range.len() as u64;
                shares.push(slots);
                if enc.is_full() {
                    for b in links.recycled() {
                        enc.recycle(b);
                    }
                    links.send_pages(enc.take())?;
                    after_batch(sent, links, &mut enc)?;
                }
            }
        }
        Ok(())
    })?;
    let encoder = encoder.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !encoder.is_empty() {
        links.send_pages(encoder.take())?;
    }
    Ok(sent)
}

/// Where the hashes of the pages written go: the ledger itself, or a list added to it later
/// ([`crate::apply`]).
pub trait PageHashes {
    /// The migration's page key.
    fn key(&self) -> &PageKey;
    /// The destination now holds a page whose keyed hash is `hash` at `page`.
    fn record_hash(&mut self, page: u64, hash: u64);
}

impl PageHashes for Ledger {
    fn key(&self) -> &PageKey {
        Ledger::key(self)
    }
    fn record_hash(&mut self, page: u64, hash: u64) {
        Ledger::record_hash(self, page, hash);
    }
}

/// Zero pages at the destination, made zero a run of consecutive pages at a time
/// ([`GuestMemory::zero_pages`]: a hole punched on tmpfs, which frees the pages instead of
/// writing zeros into them; zeros written on other files). The pending run must be made zero
/// before its pages are read or written otherwise ([`ZeroRuns::before_access`]), and at the end
/// of every batch ([`ZeroRuns::flush`]).
#[derive(Debug, Default)]
pub struct ZeroRuns {
    run: Option<Range<u64>>,
    /// Pages made zero so far, by punching and by writing.
    pub done: livemig_memory::Zeroed,
}

impl ZeroRuns {
    /// Page `page` must become zero.
    pub fn zero(&mut self, mem: &GuestMemory, page: u64) -> Result<(), AgentError> {
        match &mut self.run {
            Some(r) if r.end == page => {
                r.end += 1;
                Ok(())
            }
            _ => {
                self.flush(mem)?;
                self.run = Some(page..page + 1);
                Ok(())
            }
        }
    }

    /// Before page `page` is read or written otherwise: makes the pending run zero if it holds
    /// the page.
    pub fn before_access(&mut self, mem: &GuestMemory, page: u64) -> Result<(), AgentError> {
        if self.run.as_ref().is_some_and(|r| r.contains(&page)) {
            self.flush(mem)?;
        }
        Ok(())
    }

    /// Applies a decoded page to the destination memory and its ledger: a zero page joins the
    /// pending run (its hash the key's zero hash), any other is written (after the run, if it
    /// holds the page).
    pub fn apply(&mut self, mem: &GuestMemory, ledger: &mut impl PageHashes, page: u64, zero: bool, data: &[u8; livemig_compact::PAGE_SIZE]) -> Result<(), AgentError> {
        if zero {
            self.zero(mem, page)?;
            let z = ledger.key().zero_hash();
            ledger.record_hash(page, z);
        } else {
            self.before_access(mem, page)?;
            mem.write_page(page, data)?;
            let h = ledger.key().hash_page(data);
            ledger.record_hash(page, h);
        }
        Ok(())
    }

    /// Makes the pending run zero (it stays pending if that fails).
    pub fn flush(&mut self, mem: &GuestMemory) -> Result<(), AgentError> {
        if let Some(r) = self.run.clone() {
            let z = mem.zero_pages(r)?;
            self.run = None;
            self.done.punched += z.punched;
            self.done.written += z.written;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
