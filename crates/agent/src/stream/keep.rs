//! Memory snapshots kept by the stream engine. Neither agent holds the guest's RAM (QEMU does),
//! but both see the same bytes of QEMU's stream: the sender what the source QEMU wrote, the
//! receiver what it rebuilt for the destination QEMU, checked equal by the stream digest. Each
//! side parses those bytes again on a thread of its own ([`Keeper`]) and writes the last version
//! of every page (PAGE records' data, ZERO records' fill) into a [`SnapshotWriter`], up to the
//! end of the RAM. Both get byte-identical snapshots, published under the stream digest (the same
//! on both hosts) once the destination runs, and a later migration of the VM between those hosts
//! sends `snapshot_ref`s for the pages unchanged since.
//!
//! Pages are numbered as the stream engine numbers them: QEMU's RAM blocks in the order of its
//! block list, each `used_length` rounded up to whole pages. A snapshot kept by the shared engine
//! (numbered by the memory layout) is as usable: a reference names the snapshot page that holds
//! the content, and the receiver checks the content against the fingerprint.
//!
//! Keeping is best effort, as with the shared engine: a snapshot that cannot be written (a full
//! disk, a stream the parser fell back on) is a warning, never a failed migration. The keeper is
//! fed through a bounded channel: a disk slower than the migration slows the relay (it never
//! buffers guest RAM in memory); [`CHANNEL_CHUNKS`] chunks are the most it holds.

use std::collections::HashMap;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use livemig_index::snapshot::{SnapshotInfo, SnapshotStore, SnapshotWriter};
use livemig_stream::{BlockName, Event, Parser};

use crate::error::AgentError;

/// Stream chunks the keeper's channel holds (each at most what one read of the stream returned).
pub const CHANNEL_CHUNKS: usize = 64;

const PAGE: u64 = livemig_index::BLOCK_SIZE_U64;

enum Msg {
    Bytes(Vec<u8>),
    Finish(u128),
}

/// The feeding end of a [`Keeper`], for the thread that sees the stream's bytes.
#[derive(Debug, Clone)]
pub struct KeepFeed {
    tx: Sender<Msg>,
}

impl KeepFeed {
    /// Hands over the next bytes of QEMU's stream (in order). Bytes after the end of the RAM are
    /// not needed: callers stop at the stream's checkpoint.
    pub fn feed(&self, b: &[u8]) {
        // A keeper that stopped (it failed, or was dropped) no longer listens: nothing to do.
        let _ = self.tx.send(Msg::Bytes(b.to_vec()));
    }
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Bytes(b) => write!(f, "Bytes({})", b.len()),
            Msg::Finish(id) => write!(f, "Finish({id:032x})"),
        }
    }
}

/// A snapshot of the VM being written from QEMU's stream on a thread of its own.
#[derive(Debug)]
pub struct Keeper {
    tx: Option<Sender<Msg>>,
    thread: Option<JoinHandle<Result<SnapshotInfo, String>>>,
}

impl Keeper {
    /// Starts keeping a snapshot of `vm` in `store`; feed it through [`Keeper::feed`].
    pub fn spawn(store: SnapshotStore, vm: String) -> Result<Keeper, AgentError> {
        let (tx, rx) = crossbeam_channel::bounded(CHANNEL_CHUNKS);
        let thread = std::thread::Builder::new()
            .name("livemig-keep".into())
            .spawn(move || keep(&store, &vm, &rx))
            .map_err(|source| AgentError::Network { what: "cannot start the snapshot thread".into(), source })?;
        Ok(Keeper { tx: Some(tx), thread: Some(thread) })
    }

    /// A feeding end for the thread that sees the stream.
    pub fn feed(&self) -> KeepFeed {
        KeepFeed { tx: self.tx.clone().expect("until finished") }
    }

    /// Publishes the snapshot under `id` once every byte fed so far is written. `Err` says why no
    /// snapshot was kept.
    pub fn finish(mut self, id: u128) -> Result<SnapshotInfo, String> {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Msg::Finish(id));
        }
        self.join()
    }

    fn join(&mut self) -> Result<SnapshotInfo, String> {
        self.tx = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("the snapshot thread panicked".into()),
            None => Err("already finished".into()),
        }
    }
}

/// Publishes the snapshot `keeper` wrote under `id` (the stream digest the receiver checked, or
/// why there is none) once the destination runs: `snapshot_kept` in the report, or a warning.
pub(crate) fn publish(keeper: Keeper, id: Result<u128, String>, obs: &mut dyn crate::Observer, report: &mut crate::report::Report) {
    obs.progress(crate::Progress::Phase("keeping a memory snapshot of the VM"));
    match id.and_then(|id| keeper.finish(id)) {
        Ok(info) => report.snapshot_kept = Some(format!("{:032x}", info.id)),
        Err(e) => report.warnings.push(format!("the memory snapshot was not kept: {e}")),
    }
}

impl Drop for Keeper {
    /// Abandons the snapshot: the thread removes what it wrote, and is waited for (every
    /// [`KeepFeed`] must be dropped first, or this waits for them).
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.join();
        }
    }
}

/// Where each RAM block's pages start in the snapshot, and the snapshot's page count.
pub(super) fn numbering(parser: &Parser) -> (HashMap<BlockName, (u64, u64)>, u64) {
    let mut bases = HashMap::new();
    let mut base = 0u64;
    for b in parser.blocks() {
        let pages = b.used_length.div_ceil(PAGE);
        bases.insert(b.name.clone(), (base, pages));
        base += pages;
    }
    (bases, base)
}

/// The keeper's thread: parses, writes, and publishes on `Finish` if the whole RAM was written.
fn keep(store: &SnapshotStore, vm: &str, rx: &Receiver<Msg>) -> Result<SnapshotInfo, String> {
    let mut parser = Parser::new();
    let mut writer: Option<SnapshotWriter<'_>> = None;
    let mut bases = HashMap::new();
    let mut failed: Option<String> = None;
    let mut done = false;
    let mut events = Vec::new();
    let mut page = Box::new([0u8; livemig_index::BLOCK_SIZE]);
    for msg in rx {
        let bytes = match msg {
            Msg::Bytes(b) => b,
            Msg::Finish(id) => {
                if let Some(why) = failed {
                    return Err(why);
                }
                if !done {
                    return Err("the stream ended before QEMU's RAM did".into());
                }
                let w = writer.take().ok_or("QEMU's stream had no RAM block")?;
                return w.finish(id).map_err(|e| crate::with_sources(&e));
            }
        };
        if failed.is_some() || done {
            continue;
        }
        parser.feed(&bytes, &mut |e| events.push(e));
        for e in events.drain(..) {
            if failed.is_some() || done {
                break;
            }
            let (header, fill) = match &e {
                Event::Page(p) => (&p.header, None),
                Event::Zero(z) => (&z.header, Some(z.fill)),
                Event::RamDone => {
                    done = true;
                    continue;
                }
                Event::Fallback { reason } => {
                    failed = Some(format!("the stream parser fell back ({reason}): pages after it are not known"));
                    continue;
                }
                _ => continue,
            };
            if writer.is_none() {
                let (b, pages) = numbering(&parser);
                bases = b;
                match store.writer(vm, pages) {
                    Ok(w) => writer = Some(w),
                    Err(err) => {
                        failed = Some(crate::with_sources(&err));
                        continue;
                    }
                }
            }
            let Some(&(base, pages)) = bases.get(header.block()) else {
                failed = Some(format!("a page of RAM block {:?}, which QEMU did not list", header.block()));
                continue;
            };
            let index = header.offset() / PAGE;
            if index >= pages {
                failed = Some(format!("a page at offset {} beyond RAM block {:?}", header.offset(), header.block()));
                continue;
            }
            let data: &[u8; livemig_index::BLOCK_SIZE] = match (&e, fill) {
                (Event::Page(p), _) => &p.data,
                (_, Some(f)) => {
                    page.fill(f);
                    &page
                }
                _ => unreachable!("a page or a zero record"),
            };
            if let Err(err) = writer.as_mut().expect("created above").write_page(base + index, data) {
                failed = Some(crate::with_sources(&err));
            }
        }
    }
    // Every sender dropped without `Finish`: the migration failed; the writer removes its files.
    Err("the migration did not complete".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::tunnel::tests::{noise, stream, text};

    fn store() -> (tempfile::TempDir, SnapshotStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path().join("snaps"), 1 << 30).unwrap();
        (dir, store)
    }

    /// What the hand-built stream leaves in page `i` of its 4 MiB `pc.ram`: the first pass, the
    /// second pass's changed pages, the completion's two pages.
    fn expected(i: u64) -> [u8; 4096] {
        match (i, i % 8) {
            (1, _) => noise(99_999),
            (3, _) => text(5),
            (_, 0) => {
                let mut p = noise(i);
                p[100..108].copy_from_slice(b"changed!");
                p
            }
            (_, 1) => noise(i),
            (_, 2 | 3) => text(i),
            (_, 4) => noise(i - 4),
            (_, 5 | 6) => [0; 4096],
            _ => text(7),
        }
    }

    #[test]
    fn a_snapshot_kept_from_the_stream_holds_the_last_version_of_every_page() {
        let (_d, store) = store();
        let k = Keeper::spawn(store.clone(), "vm".into()).unwrap();
        let feed = k.feed();
        // Fed as reads of any size return it.
        let s = stream();
        for part in s.chunks(1000) {
            feed.feed(part);
        }
        drop(feed);
        let info = k.finish(0xabc).expect("kept");
        assert_eq!(info.pages, 1024);
        let snap = store.get("vm", 0xabc).unwrap();
        let mut page = [0u8; 4096];
        for i in 0..1024 {
            snap.read_page(i, &mut page).unwrap();
            assert!(page == expected(i), "page {i}");
        }
    }

    #[test]
    fn no_snapshot_from_a_stream_cut_before_the_ram_ended_or_a_migration_that_failed() {
        let s = stream();
        // Cut in the second pass: finishing says why, and nothing is published.
        let (_d, store) = store();
        let k = Keeper::spawn(store.clone(), "vm".into()).unwrap();
        k.feed().feed(&s[..s.len() / 2]);
        let e = k.finish(1).expect_err("the RAM did not end");
        assert!(e.contains("before QEMU's RAM did"), "{e}");
        assert!(store.list().unwrap().is_empty());
        // A failed migration drops its keeper: nothing is left, not even a temporary directory.
        let k = Keeper::spawn(store.clone(), "vm".into()).unwrap();
        k.feed().feed(&s);
        drop(k);
        assert!(store.list().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 0, "a temporary directory was left");
        // Garbage: the parser falls back, no snapshot.
        let k = Keeper::spawn(store.clone(), "vm".into()).unwrap();
        k.feed().feed(&[0xff; 64]);
        assert!(k.finish(2).is_err());
        assert!(store.list().unwrap().is_empty());
    }
}
