//! What each side holds besides the guest RAM: disk images (blocks the guest has in its page
//! cache) and memory snapshots of earlier migrations, and how the handshake agrees on them.
//!
//! The summary the destination sends is a few ids (`Holdings`): for a disk, the hash of its whole
//! fingerprint index (which both sides compute from their own copy); for a snapshot, its id (the
//! memory digest at the end of the migration that made it, equal on both sides). Never a list of
//! fingerprints.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use livemig_compact::{DiskLookup, DiskRef, SnapshotLookup};
use livemig_index::snapshot::{Snapshot, SnapshotStore};
use livemig_index::{Align, DiskIndex, Fingerprint, Source};
use livemig_wire::{DiskHeld, DiskOffer, Holdings, MAX_HANDSHAKE_ITEMS};

use crate::error::AgentError;
use crate::report::{DiskIndexReport, Report};
use crate::{Observer, Progress};

/// Where disk indexes are cached unless told otherwise: `$XDG_CACHE_HOME/livemig/index` or
/// `~/.cache/livemig/index` (as `livemig index`).
pub fn default_index_cache() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("livemig/index");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/livemig/index")
}

/// Loads (or builds and caches) the index of every image, its stride as `align` says (auto:
/// detected from the image's filesystems), and says which stride and why (a progress line and the report: a
/// 512-byte stride for want of a known filesystem costs 8x the index of a 4 KiB one).
pub(crate) fn load_indexes(
    images: &[PathBuf],
    cache: &Path,
    align: Align,
    obs: &mut dyn Observer,
    report: &mut Report,
) -> Result<Vec<DiskIndex>, AgentError> {
    let mut out = Vec::with_capacity(images.len());
    for p in images {
        let t = Instant::now();
        let (index, origin, stride) = DiskIndex::load_or_build_aligned(p, cache, align, &mut |_| {})
            .map_err(|e| AgentError::Holdings(format!("cannot index the disk image {}: {e}", p.display())))?;
        let r = DiskIndexReport {
            image: p.display().to_string(),
            stride: stride.bytes,
            stride_reason: stride.reason,
            windows: index.windows(),
            fingerprints: index.len() as u64,
            memory_bytes: index.memory_bytes() as u64,
            built: origin.built(),
            ms: t.elapsed().as_secs_f64() * 1e3,
        };
        obs.progress(Progress::Phase(&format!(
            "disk image {}: 4 KiB windows every {} bytes ({}), {} fingerprints, {}",
            r.image,
            r.stride,
            r.stride_reason,
            r.fingerprints,
            if r.built { "indexed now" } else { "index read from the cache" }
        )));
        report.disk_indexes.push(r);
        out.push(index);
    }
    Ok(out)
}

/// The sender's offer of its images.
pub(crate) fn offers(indexes: &[DiskIndex]) -> Result<Vec<DiskOffer>, AgentError> {
    if indexes.len() > MAX_HANDSHAKE_ITEMS {
        return Err(AgentError::Incompatible(format!("at most {MAX_HANDSHAKE_ITEMS} disk images can be offered")));
    }
    Ok(indexes
        .iter()
        .enumerate()
        .map(|(i, x)| DiskOffer {
            id: u16::try_from(i).unwrap_or(u16::MAX),
            size: x.image_size(),
            index_hash: format!("{:032x}", x.identity().index_hash),
        })
        .collect())
}

/// The sender's disk lookup over the images the destination holds.
pub(crate) struct SenderDisks {
    images: Vec<(u16, DiskIndex)>,
}

impl SenderDisks {
    /// Keeps the indexes of the images the destination said it holds.
    pub(crate) fn new(indexes: Vec<DiskIndex>, held: &[DiskHeld]) -> Option<Arc<Self>> {
        let images: Vec<(u16, DiskIndex)> = indexes
            .into_iter()
            .enumerate()
            .filter_map(|(i, x)| {
                let id = u16::try_from(i).ok()?;
                held.iter().any(|h| h.id == id).then_some((id, x))
            })
            .collect();
        (!images.is_empty()).then(|| Arc::new(SenderDisks { images }))
    }
}

impl DiskLookup for SenderDisks {
    fn lookup_disk(&self, fp: u128) -> Option<DiskRef> {
        let f = Fingerprint(fp);
        self.images.iter().find_map(|(id, x)| {
            x.lookup(&f).map(|w| DiskRef { image: *id, sector: w.sector, zero_tail_sectors: w.zero_tail_sectors })
        })
    }
}

/// The sender's snapshot lookup: fingerprint -> a page of the snapshot holding it.
pub(crate) struct SenderSnapshot(pub(crate) std::collections::HashMap<u128, u64>);

impl SnapshotLookup for SenderSnapshot {
    fn lookup_snapshot(&self, fp: u128) -> Option<u64> {
        self.0.get(&fp).copied()
    }
}

/// Ids (32 hex digits) of the snapshots of `vm` in `store`, newest first.
pub(crate) fn snapshot_ids(store: &SnapshotStore, vm: &str) -> Result<Vec<String>, AgentError> {
    let mut list: Vec<_> = store
        .list()
        .map_err(|e| AgentError::Holdings(format!("cannot list the snapshots in {}: {e}", store.dir().display())))?
        .into_iter()
        .filter(|s| s.vm == vm)
        .collect();
    list.sort_by_key(|s| std::cmp::Reverse(s.created_unix_nanos));
    Ok(list.into_iter().take(MAX_HANDSHAKE_ITEMS).map(|s| format!("{:032x}", s.id)).collect())
}

/// The VM identity a sender's `hello` names, if usable for snapshots (not empty, at most 256
/// bytes; the store refuses names it cannot keep when a snapshot is written, said then).
pub(crate) fn peer_vm(vm: Option<String>) -> Option<String> {
    vm.filter(|v| !v.is_empty() && v.len() <= 256)
}

/// Parses a snapshot id from the peer.
pub(crate) fn parse_id(s: &str) -> Result<u128, AgentError> {
    if s.len() != 32 {
        return Err(AgentError::Incompatible(format!("malformed snapshot id {s:?}")));
    }
    u128::from_str_radix(s, 16).map_err(|_| AgentError::Incompatible(format!("malformed snapshot id {s:?}")))
}

/// The destination's images, opened for reads of their guest-visible content (a qcow2 image
/// through a `qemu-nbd` of its own), by offered id.
#[derive(Default)]
pub(crate) struct ReceiverDisks {
    files: Vec<(u16, Source)>,
}

impl ReceiverDisks {
    /// Matches the offers against the local images: an image with the same index hash is the same
    /// image; else the image at the offer's position with the same size is taken, every
    /// reference into it being checked against its fingerprint.
    pub(crate) fn answer(
        offers: &[DiskOffer],
        images: &[PathBuf],
        indexes: &[DiskIndex],
    ) -> Result<(ReceiverDisks, Vec<DiskHeld>), AgentError> {
        if offers.len() > MAX_HANDSHAKE_ITEMS {
            return Err(AgentError::Incompatible(format!("the sender offers {} disk images, more than {MAX_HANDSHAKE_ITEMS}", offers.len())));
        }
        let mut files = Vec::new();
        let mut held = Vec::new();
        for o in offers {
            let same = indexes.iter().position(|x| format!("{:032x}", x.identity().index_hash) == o.index_hash);
            let pick = same.or_else(|| {
                let i = usize::from(o.id);
                indexes.get(i).filter(|x| x.image_size() == o.size).map(|_| i)
            });
            if let Some(i) = pick {
                let f = File::open(&images[i])
                    .map_err(|e| AgentError::Holdings(format!("cannot open the disk image {}: {e}", images[i].display())))?;
                let src = Source::open(&f, &images[i])
                    .map_err(|e| AgentError::Holdings(format!("cannot open the disk image {}: {e}", images[i].display())))?;
                files.push((o.id, src));
                held.push(DiskHeld { id: o.id, same: same.is_some() });
            }
        }
        Ok((ReceiverDisks { files }, held))
    }

    /// Reads what `r` names in image `r.image` (its bytes at sector `r.sector`, zeros after);
    /// false if there is no such image or they run past its end (the caller checks the
    /// fingerprint).
    pub(crate) fn read(&self, r: DiskRef, out: &mut [u8; 4096]) -> bool {
        let Some((_, f)) = self.files.iter().find(|(id, _)| *id == r.image) else { return false };
        let Some(off) = r.sector.checked_mul(livemig_index::SECTOR) else { return false };
        let (disk, zero) = out.split_at_mut(r.disk_bytes());
        zero.fill(0);
        f.read_exact_at(disk, off).is_ok()
    }
}

/// Holdings answer of the destination.
pub(crate) fn holdings(disks: Vec<DiskHeld>, snapshots: Vec<String>) -> Holdings {
    Holdings { disks, snapshots }
}

/// The newest snapshot of `vm` both hosts hold (the receiver's ids `theirs`, newest first), opened.
pub(crate) fn choose_snapshot(store: &SnapshotStore, vm: &str, theirs: &[String]) -> Result<Option<(String, Snapshot)>, AgentError> {
    let ours = snapshot_ids(store, vm)?;
    match theirs.iter().find(|id| ours.contains(id)) {
        Some(id) => Ok(Some((id.clone(), open_snapshot(store, vm, parse_id(id)?)?))),
        None => Ok(None),
    }
}

/// Opens the snapshot `id` of `vm`.
pub(crate) fn open_snapshot(store: &SnapshotStore, vm: &str, id: u128) -> Result<Snapshot, AgentError> {
    store.get(vm, id).map_err(|e| AgentError::Holdings(format!("cannot open snapshot {id:032x} of {vm}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Quiet;

    /// A raw image of `blocks` 4 KiB blocks, block i filled from `seed + i`.
    fn image(dir: &Path, name: &str, seed: u8, blocks: u8) -> PathBuf {
        let p = dir.join(name);
        let data: Vec<u8> = (0..blocks).flat_map(|i| (0..4096u32).map(move |j| seed.wrapping_add(i) ^ (j % 251) as u8)).collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    fn block_of(p: &Path, b: usize) -> [u8; 4096] {
        std::fs::read(p).unwrap()[b * 4096..][..4096].try_into().unwrap()
    }

    /// Several disk images: each indexed and offered; the destination holds them in another
    /// order (found by index hash), and a reference into the second one reads from that image.
    #[test]
    fn several_disks_are_each_indexed_offered_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (image(dir.path(), "a.raw", 1, 8), image(dir.path(), "b.raw", 101, 8));
        let cache = dir.path().join("cache");
        let mut report = Report::default();
        let images = vec![a.clone(), b.clone()];
        let idx = load_indexes(&images, &cache, Align::Bytes(4096), &mut Quiet, &mut report).unwrap();
        assert_eq!(report.disk_indexes.len(), 2);
        assert!(report.disk_indexes.iter().all(|r| r.stride == 4096 && r.built), "{:?}", report.disk_indexes);
        let offers = offers(&idx).unwrap();
        assert_eq!(offers.iter().map(|o| o.id).collect::<Vec<_>>(), vec![0, 1]);

        // The destination lists the same images the other way round.
        let theirs = vec![b.clone(), a.clone()];
        let tidx = load_indexes(&theirs, &cache, Align::Bytes(4096), &mut Quiet, &mut Report::default()).unwrap();
        let (rdisks, held) = ReceiverDisks::answer(&offers, &theirs, &tidx).unwrap();
        assert_eq!(held.iter().map(|h| (h.id, h.same)).collect::<Vec<_>>(), vec![(0, true), (1, true)]);

        let sender = SenderDisks::new(idx, &held).unwrap();
        let page = block_of(&b, 5);
        let r = sender.lookup_disk(livemig_compact::fingerprint(&page)).expect("a block of the second image");
        assert_eq!((r.image, r.sector, r.zero_tail_sectors), (1, 5 * 8, 0));
        let mut out = [0u8; 4096];
        assert!(rdisks.read(r, &mut out));
        assert_eq!(out, page);
        let r0 = sender.lookup_disk(livemig_compact::fingerprint(&block_of(&a, 2))).unwrap();
        assert_eq!((r0.image, r0.sector), (0, 16));
        assert!(rdisks.read(r0, &mut out));
        assert_eq!(out, block_of(&a, 2));
        // No such image, or past the end: nothing read.
        assert!(!rdisks.read(DiskRef { image: 7, sector: 0, zero_tail_sectors: 0 }, &mut out));
        assert!(!rdisks.read(DiskRef { image: 1, sector: 8 * 8 - 1, zero_tail_sectors: 0 }, &mut out));
    }
}
