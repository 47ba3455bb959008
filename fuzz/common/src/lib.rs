//! Fixtures shared by the fuzz targets and by `gen_seeds`: an in-memory [`Destination`] for the
//! page decoder, a reference parser of page batches (the oracle the decoder is checked against),
//! the "fix-up" passes that let the fuzzer past checksums it cannot forge (frame checksums, page
//! fingerprints, index file hashes), and the small real files the file decoders read.
//!
//! Every target's input starts with one **mode byte**; its bits choose which fix-ups the harness
//! applies to the rest before handing it to the decoder. With no bit set the decoder sees the
//! bytes as they are, so the raw, unfixed input space is fuzzed too.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use livemig_compact::{delta_apply, DiskRef, PageClass, PageKey, PAGE_SIZE, RECORD_HEADER};

/// The migration page key of the fuzz targets and their seeds (the encoder that made the seeds
/// and the decoder under test use the same key, as the two agents of a migration do).
pub fn page_key() -> &'static PageKey {
    static KEY: OnceLock<PageKey> = OnceLock::new();
    KEY.get_or_init(|| PageKey::from_bytes(*b"livemig fuzz page key, 32 bytes!"))
}

/// A fresh directory for this process's scratch files (under `$TMPDIR`), mode 0700: the snapshot
/// store and index cache refuse a directory that others can use.
pub fn scratch_dir(name: &str) -> PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!("livemig-fuzz-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).expect("create the scratch directory");
    dir
}

// ---------------------------------------------------------------------------------------------
// wire

/// Mode bit of `wire_frame`: recompute the checksum of every frame header in the stream.
pub const WIRE_FIX_CHECKSUMS: u8 = 1;
/// Mode bit of `wire_frame`: the stream starts with the 8-byte connection magic.
pub const WIRE_MAGIC: u8 = 2;

/// Rewrites the checksum of each frame header found walking `stream` from its start (header,
/// then `len` bytes), as `livemig_wire::write_frame` computes it; stops at a header whose
/// payload would run past the end.
pub fn fix_frame_checksums(stream: &mut [u8]) {
    let mut pos = 0usize;
    while let Some(h) = stream.get(pos..pos + livemig_wire::HEADER_LEN) {
        let kind = u16::from_le_bytes([h[0], h[1]]);
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let start = pos + livemig_wire::HEADER_LEN;
        let Some(end) = start.checked_add(len as usize) else { return };
        let Some(payload) = stream.get(start..end) else { return };
        let seed = (u64::from(kind) << 32) | u64::from(len);
        let sum = xxhash_rust::xxh3::xxh3_64_with_seed(payload, seed);
        stream[pos + 8..pos + 16].copy_from_slice(&sum.to_le_bytes());
        pos = end;
    }
}

// ---------------------------------------------------------------------------------------------
// compact

/// Guest pages of the fake destination.
pub const RAM_PAGES: u64 = 64;
/// A guest page the fake destination cannot read (a read error).
pub const UNREADABLE_PAGE: u64 = 63;
/// 4 KiB windows of the one disk image (id 0) the fake destination holds, at sectors 0..16 (its
/// own layout: a reference names one by its sector).
pub const DISK_BLOCKS: u64 = 16;
/// Pages of the fake destination's snapshot.
pub const SNAPSHOT_PAGES: u64 = 16;
/// Mode bit of `compact_decode`: rewrite the fingerprint of every reference and delta to the
/// fingerprint of what it resolves to, so verified writes are reached.
pub const COMPACT_FIX_FINGERPRINTS: u8 = 1;

fn pattern(tag: u8, n: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    let mut x = (u64::from(tag) << 56) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x1234_5678;
    for chunk in p.chunks_exact_mut(8) {
        // xorshift: pseudo-random, incompressible content
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    // a readable text-like stretch so that compressors find something
    for (i, b) in p[..1024].iter_mut().enumerate() {
        *b = b"the quick brown fox "[i % 20];
    }
    p
}

/// Initial content of guest page `p` of the fake destination: zero below 32, patterned above.
pub fn ram_page(p: u64) -> [u8; PAGE_SIZE] {
    if p < 32 {
        [0u8; PAGE_SIZE]
    } else {
        pattern(b'r', p)
    }
}

/// Block `b` of disk image 0 (block 3 is zero, as disk images have).
pub fn disk_block(b: u64) -> [u8; PAGE_SIZE] {
    static DISK: OnceLock<Vec<[u8; PAGE_SIZE]>> = OnceLock::new();
    let disk = DISK.get_or_init(|| (0..DISK_BLOCKS).map(make_disk_block).collect());
    disk.get(b as usize).copied().unwrap_or_else(|| make_disk_block(b))
}

fn make_disk_block(b: u64) -> [u8; PAGE_SIZE] {
    if b == 3 {
        [0u8; PAGE_SIZE]
    } else {
        pattern(b'd', b)
    }
}

/// Page `q` of the snapshot.
pub fn snapshot_page(q: u64) -> [u8; PAGE_SIZE] {
    static SNAP: OnceLock<Vec<[u8; PAGE_SIZE]>> = OnceLock::new();
    let snap = SNAP.get_or_init(|| (0..SNAPSHOT_PAGES).map(|q| pattern(b's', q)).collect());
    snap.get(q as usize).copied().unwrap_or_else(|| pattern(b's', q))
}

/// What the fake destination holds and what the decoder wrote to it.
#[derive(Debug)]
pub struct FakeDest {
    /// Guest RAM.
    pub ram: Vec<[u8; PAGE_SIZE]>,
    /// Every `write_page` call, in order: page, class, data, record length.
    pub writes: Vec<(u64, PageClass, Box<[u8; PAGE_SIZE]>, usize)>,
}

impl Default for FakeDest {
    fn default() -> Self {
        static RAM: OnceLock<Vec<[u8; PAGE_SIZE]>> = OnceLock::new();
        let ram = RAM.get_or_init(|| (0..RAM_PAGES).map(ram_page).collect());
        FakeDest { ram: ram.clone(), writes: Vec::new() }
    }
}

impl livemig_compact::Destination for FakeDest {
    type Error = livemig_compact::CompactError;

    fn read_page(&mut self, page: u64, out: &mut [u8; PAGE_SIZE]) -> bool {
        assert!(page < RAM_PAGES, "decoder read guest page {page}, beyond the {RAM_PAGES} pages");
        if page == UNREADABLE_PAGE {
            return false;
        }
        out.copy_from_slice(&self.ram[page as usize]);
        true
    }

    fn read_disk_block(&mut self, r: DiskRef, out: &mut [u8; PAGE_SIZE]) -> bool {
        if r.image != 0 || r.sector >= DISK_BLOCKS {
            return false;
        }
        *out = disk_block(r.sector);
        out[r.disk_bytes()..].fill(0);
        true
    }

    fn read_snapshot_page(&mut self, page: u64, out: &mut [u8; PAGE_SIZE]) -> bool {
        if page >= SNAPSHOT_PAGES {
            return false;
        }
        *out = snapshot_page(page);
        true
    }

    fn write_page(&mut self, page: u64, class: PageClass, data: &[u8; PAGE_SIZE], record_len: usize) -> Result<(), Self::Error> {
        assert!(page < RAM_PAGES, "decoder wrote guest page {page}, beyond the {RAM_PAGES} pages");
        self.ram[page as usize] = *data;
        self.writes.push((page, class, Box::new(*data), record_len));
        Ok(())
    }
}

/// One record of a page batch as the format (crates/compact/src/lib.rs) describes it.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    /// Offset of the record header in the batch.
    pub at: usize,
    /// Guest page.
    pub page: u64,
    /// Class byte.
    pub class: u8,
    /// Data bytes: `batch[at + 13 .. at + 13 + len]`.
    pub len: usize,
}

/// The records of `batch` whose header and data are complete, up to the first that is not.
/// Lengths are not checked against the class: that is the decoder's job.
pub fn records(batch: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some(h) = batch.get(at..at + RECORD_HEADER) {
        let page = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(h[9..13].try_into().expect("4 bytes")) as usize;
        if batch.len() - at - RECORD_HEADER < len {
            break;
        }
        out.push(Record { at, page, class: h[8], len });
        at += RECORD_HEADER + len;
    }
    out
}

/// Decompresses one page as the decoder must: exactly one page or `None`.
pub fn decompress(class: PageClass, data: &[u8]) -> Option<[u8; PAGE_SIZE]> {
    let mut out = [0u8; PAGE_SIZE];
    match class {
        PageClass::Lz4 => match lz4_flex::block::decompress_into(data, &mut out) {
            Ok(PAGE_SIZE) => Some(out),
            _ => None,
        },
        PageClass::Zstd => {
            let v = zstd::stream::decode_all(data).ok()?;
            <[u8; PAGE_SIZE]>::try_from(v.as_slice()).ok()
        }
        _ => None,
    }
}

/// Offset (in the record's data) and value of the fingerprint a verified class carries.
pub fn carried_fingerprint(class: PageClass, data: &[u8]) -> Option<(usize, u128)> {
    let at = match class {
        PageClass::Dup | PageClass::SnapshotRef => 8,
        PageClass::DiskRef => 10,
        PageClass::Delta => 0,
        _ => return None,
    };
    let fp = u128::from_le_bytes(data.get(at..at + 16)?.try_into().ok()?);
    Some((at, fp))
}

/// Rewrites, in place, the fingerprint of each reference and delta of `batch` to the keyed
/// fingerprint ([`page_key`]) of what it resolves to on a fresh [`FakeDest`] (following the
/// writes of the records before it).
/// Records it cannot resolve are left as they are.
pub fn fix_fingerprints(batch: &mut [u8]) {
    let mut dest = FakeDest::default();
    for r in records(batch) {
        let Some(class) = PageClass::from_u8(r.class) else { return };
        if r.page >= RAM_PAGES {
            return;
        }
        let start = r.at + RECORD_HEADER;
        let data = &batch[start..start + r.len];
        let content: Option<[u8; PAGE_SIZE]> = match class {
            PageClass::Zero => Some([0u8; PAGE_SIZE]),
            PageClass::Raw => <[u8; PAGE_SIZE]>::try_from(data).ok(),
            PageClass::Lz4 | PageClass::Zstd => decompress(class, data),
            PageClass::Dup if r.len == 24 => {
                let src = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
                (src < RAM_PAGES && src != UNREADABLE_PAGE).then(|| dest.ram[src as usize])
            }
            PageClass::DiskRef if r.len == 26 => {
                let image = u16::from_le_bytes([data[0], data[1]]);
                let v = u64::from_le_bytes(data[2..10].try_into().expect("8 bytes"));
                // Bits 0-60: the sector; 61-63: sectors of zeros ending the page.
                let (sector, tail) = (v & ((1 << 61) - 1), (v >> 61) as usize);
                (image == 0 && sector < DISK_BLOCKS).then(|| {
                    let mut p = disk_block(sector);
                    p[PAGE_SIZE - 512 * tail..].fill(0);
                    p
                })
            }
            PageClass::SnapshotRef if r.len == 24 => {
                let q = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
                (q < SNAPSHOT_PAGES).then(|| snapshot_page(q))
            }
            PageClass::Delta if (16..=PAGE_SIZE).contains(&r.len) && r.page != UNREADABLE_PAGE => {
                let mut p = dest.ram[r.page as usize];
                delta_apply(&mut p, &data[16..]).then_some(p)
            }
            _ => None,
        };
        let Some(content) = content else { continue };
        if let Some((off, _)) = carried_fingerprint(class, &batch[start..start + r.len]) {
            let fp = page_key().fingerprint(&content);
            batch[start + off..start + off + 16].copy_from_slice(&fp.to_le_bytes());
        }
        dest.ram[r.page as usize] = content;
    }
}

// ---------------------------------------------------------------------------------------------
// index files

/// Blocks of the test image (4 KiB each; some zero, some repeated).
pub const IMAGE_BLOCKS: u64 = 24;
/// Header length of an index file.
pub const INDEX_HEADER: usize = 120;
/// Trailer (checksum) length of an index file.
pub const INDEX_TRAILER: usize = 16;
/// Mode bit of `index_file` (index part): set the entry count from the file length.
pub const INDEX_FIX_ENTRIES: u8 = 1;
/// Mode bit: copy the image's stamp and sample hash (what the stale check compares) into the header.
pub const INDEX_FIX_STAMP: u8 = 2;
/// Mode bit: set the index hash to the hash of the body.
pub const INDEX_FIX_INDEX_HASH: u8 = 4;
/// Mode bit: set the trailer to the checksum of header and body.
pub const INDEX_FIX_TRAILER: u8 = 8;
/// Mode bit: the input is a snapshot directory, not an index file (see [`SnapshotInput`]).
pub const MODE_SNAPSHOT: u8 = 0x80;

/// Content of block `b` of the test image.
pub fn image_block(b: u64) -> [u8; PAGE_SIZE] {
    match b % 6 {
        0 => [0u8; PAGE_SIZE],
        5 => pattern(b'i', 1), // a repeated block: the index keeps its first number
        _ => pattern(b'i', b),
    }
}

/// Writes the test image to `path`.
pub fn write_image(path: &Path) {
    let mut f = fs::File::create(path).expect("create the test image");
    for b in 0..IMAGE_BLOCKS {
        f.write_all(&image_block(b)).expect("write the test image");
    }
}

/// The test image of this process and the header of its real index file.
#[derive(Debug)]
pub struct IndexFixture {
    /// The image.
    pub image: PathBuf,
    /// Where the fuzz input is written as the index file.
    pub file: PathBuf,
    /// The real index file of the image, as `DiskIndex::save` writes it.
    pub real: Vec<u8>,
}

/// Creates (once per process) the test image and its real index file.
pub fn index_fixture() -> &'static IndexFixture {
    static F: OnceLock<IndexFixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = scratch_dir("index");
        let image = dir.join("disk.img");
        write_image(&image);
        let real_file = dir.join("real.idx");
        let index = livemig_index::DiskIndex::build(&image, &mut |_| {}).expect("index the test image");
        index.save(&real_file).expect("save the test index");
        let real = fs::read(&real_file).expect("read the test index");
        IndexFixture { image, file: dir.join("fuzzed.idx"), real }
    })
}

/// Applies the index fix-ups of `mode` to an index file.
pub fn fix_index_file(mode: u8, file: &mut [u8], real: &[u8]) {
    if file.len() < INDEX_HEADER + INDEX_TRAILER {
        return;
    }
    let body = INDEX_HEADER..file.len() - INDEX_TRAILER;
    if mode & INDEX_FIX_ENTRIES != 0 {
        let entries = (body.len() / 21) as u64;
        file[112..120].copy_from_slice(&entries.to_le_bytes());
    }
    if mode & INDEX_FIX_STAMP != 0 {
        // image size, mtime, ctime, inode, device, sample hash
        file[16..88].copy_from_slice(&real[16..88]);
    }
    if mode & INDEX_FIX_INDEX_HASH != 0 {
        // The index hash covers the stride (header bytes 12..16), then the body.
        let mut x = xxhash_rust::xxh3::Xxh3::new();
        x.update(&file[12..16]);
        x.update(&file[body.clone()]);
        let h = x.digest128();
        file[88..104].copy_from_slice(&h.to_le_bytes());
    }
    if mode & INDEX_FIX_TRAILER != 0 {
        let h = xxhash_rust::xxh3::xxh3_128(&file[..body.end]);
        file[body.end..].copy_from_slice(&h.to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// snapshots

/// VM id of the fuzzed snapshot.
pub const SNAPSHOT_VM: &str = "vm-fuzz";
/// Id of the fuzzed snapshot.
pub const SNAPSHOT_ID: u128 = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
/// Placeholder in a fuzzed meta.json replaced by the hash of the fingerprints file.
pub const FP_HASH_PLACEHOLDER: &[u8] = b"FPHASH";
/// Snapshot mode bit: replace [`FP_HASH_PLACEHOLDER`] in meta.json by the real hash.
pub const SNAP_FIX_HASH: u8 = 1;
/// Snapshot mode bit: the rest is memory.raw and fingerprints.bin is computed from it.
pub const SNAP_MEMORY_GIVEN: u8 = 2;
/// Snapshot mode bit (with [`SNAP_MEMORY_GIVEN`]): damage the fingerprint of the last page.
pub const SNAP_DAMAGE_FP: u8 = 4;
/// Most memory pages an input makes.
pub const SNAP_MAX_PAGES: usize = 8;

/// The files of a snapshot directory made from a fuzz input:
/// `[mode][meta length u16 LE][meta.json][memory pages u8][rest]`.
#[derive(Debug, Default)]
pub struct SnapshotInput {
    /// meta.json.
    pub meta: Vec<u8>,
    /// memory.raw.
    pub memory: Vec<u8>,
    /// fingerprints.bin.
    pub fingerprints: Vec<u8>,
}

impl SnapshotInput {
    /// Splits and fixes an input (without its mode byte) as `mode` says.
    pub fn parse(mode: u8, data: &[u8]) -> SnapshotInput {
        let meta_len = data.get(..2).map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])));
        let data = data.get(2..).unwrap_or_default();
        let meta_len = meta_len.min(data.len());
        let mut meta = data[..meta_len].to_vec();
        let data = &data[meta_len..];
        let pages = data.first().map_or(0, |&p| usize::from(p) % (SNAP_MAX_PAGES + 1));
        let rest = data.get(1..).unwrap_or_default();
        let mut memory = vec![0u8; pages * PAGE_SIZE];
        let fingerprints = if mode & SNAP_MEMORY_GIVEN != 0 {
            let n = rest.len().min(memory.len());
            memory[..n].copy_from_slice(&rest[..n]);
            let mut fps: Vec<u8> = memory
                .chunks_exact(PAGE_SIZE)
                .flat_map(|p| xxhash_rust::xxh3::xxh3_128(p).to_le_bytes())
                .collect();
            if mode & SNAP_DAMAGE_FP != 0 {
                if let Some(b) = fps.last_mut() {
                    *b ^= 1;
                }
            }
            fps
        } else {
            rest.to_vec()
        };
        if mode & SNAP_FIX_HASH != 0 {
            let hex = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&fingerprints));
            if let Some(i) = meta.windows(FP_HASH_PLACEHOLDER.len()).position(|w| w == FP_HASH_PLACEHOLDER) {
                meta.splice(i..i + FP_HASH_PLACEHOLDER.len(), hex.bytes());
            }
        }
        SnapshotInput { meta, memory, fingerprints }
    }

    /// Encodes files into an input (the inverse of [`SnapshotInput::parse`] for mode 0).
    pub fn encode(mode: u8, meta: &[u8], pages: u8, rest: &[u8]) -> Vec<u8> {
        let mut v = vec![mode | MODE_SNAPSHOT];
        v.extend_from_slice(&u16::try_from(meta.len()).expect("short meta").to_le_bytes());
        v.extend_from_slice(meta);
        v.push(pages);
        v.extend_from_slice(rest);
        v
    }
}

/// Writes the snapshot files under `store/<vm dir>/<id>/`; returns that directory.
pub fn write_snapshot_dir(store: &Path, input: &SnapshotInput) -> PathBuf {
    let vm_dir = livemig_index::snapshot::vm_dir_name(SNAPSHOT_VM).expect("valid VM id");
    let dir = store.join(vm_dir).join(format!("{SNAPSHOT_ID:032x}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create the snapshot directory");
    fs::write(dir.join("meta.json"), &input.meta).expect("write meta.json");
    fs::write(dir.join("memory.raw"), &input.memory).expect("write memory.raw");
    fs::write(dir.join("fingerprints.bin"), &input.fingerprints).expect("write fingerprints.bin");
    dir
}

// ---------------------------------------------------------------------------------------------
// tls

/// The PSK setup of this process (a PSK file in a scratch directory).
pub fn tls_setup() -> &'static livemig_tls::TlsSetup {
    static S: OnceLock<livemig_tls::TlsSetup> = OnceLock::new();
    S.get_or_init(|| {
        let dir = scratch_dir("tls");
        let file = dir.join("psk");
        // A fixed key (reproducible runs) in the one format a PSK file may have.
        let key: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(97) ^ 0x5a);
        fs::write(&file, livemig_tls::psk_file_text(&key)).expect("write the PSK file");
        livemig_tls::TlsSetup::load(&livemig_tls::Auth::Psk { file }).expect("load the PSK setup")
    })
}

// ---------------------------------------------------------------------------------------------
// qemu_stream

/// Input of `qemu_stream`: `[chunk][stream]`; the stream is fed to the parser `chunk` bytes at a
/// time (0 = all at once).
pub fn stream_chunk(mode: u8, len: usize) -> usize {
    if mode == 0 {
        len.max(1)
    } else {
        usize::from(mode)
    }
}

/// Writes QEMU migration streams (as `savevm.c` / `ram.c` lay them out) for the seeds.
#[derive(Debug, Default)]
pub struct QemuStream(pub Vec<u8>);

impl QemuStream {
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn name(&mut self, b: &[u8]) -> &mut Self {
        self.0.push(u8::try_from(b.len()).expect("short name"));
        self.raw(b)
    }
    fn be32(&mut self, v: u32) -> &mut Self {
        self.raw(&v.to_be_bytes())
    }
    fn be64(&mut self, v: u64) -> &mut Self {
        self.raw(&v.to_be_bytes())
    }
    /// Header, configuration (with x-ignore-shared in its capabilities if asked), return path.
    pub fn start(&mut self, ignore_shared: bool) -> &mut Self {
        self.raw(b"QEVM\0\0\0\x03\x07").be32(11).raw(b"pc-q35-10.0");
        if ignore_shared {
            self.raw(&[5]).name(b"configuration/capabilities").be32(1).be32(1).name(b"x-ignore-shared");
        }
        self.raw(&[8, 0, 1, 0, 0]).raw(&[8, 0, 2, 0, 4]).be32(1)
    }
    /// The ram START section (id 2) with its block list: pc.ram 1 MiB and pc.bios 64 KiB.
    pub fn ram_start(&mut self, ignore_shared: bool) -> &mut Self {
        self.raw(&[1]).be32(2).name(b"ram").be32(0).be32(4);
        self.be64((1 << 20) + (64 << 10) | 4);
        self.name(b"pc.ram").be64(1 << 20);
        if ignore_shared {
            self.be64(0);
        }
        self.name(b"pc.bios").be64(64 << 10);
        if ignore_shared {
            self.be64(0xfff0_0000);
        }
        self.be64(0x10).raw(&[0x7e]).be32(2)
    }
    /// A PART (or END) section of the ram section: zero pages with and without CONTINUE, and
    /// with `pages` a page of each block (the second one a CONTINUE record).
    pub fn ram_section(&mut self, end: bool, first: u64, pages: bool) -> &mut Self {
        self.raw(&[if end { 3 } else { 2 }]).be32(2);
        self.be64(first * 4096 | 2).name(b"pc.ram").raw(&[0]);
        self.be64((first + 1) * 4096 | 0x22).raw(&[0]);
        self.be64((first + 2) * 4096 | 0x22).raw(&[7]);
        if pages {
            self.be64((first + 3) * 4096 | 0x28).raw(&ram_page(40 + first));
            self.be64(0x2000 | 2).name(b"pc.bios").raw(&[0]);
            self.be64(0x3000 | 0x28).raw(&ram_page(34));
        }
        self.be64(0x10).raw(&[0x7e]).be32(2)
    }
    /// QEMU 10's SWITCHOVER_START command.
    pub fn switchover_start(&mut self) -> &mut Self {
        self.raw(&[8, 0, 11, 0, 0])
    }
    /// A device section, EOF and the vmdesc.
    pub fn tail(&mut self) -> &mut Self {
        self.raw(&[4]).be32(3).name(b"timer").be32(0).be32(2).raw(&[0; 17]).raw(&[0x7e]).be32(3);
        let json = br#"{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0}]}"#;
        self.raw(&[0, 6]).be32(u32::try_from(json.len()).expect("len")).raw(json)
    }
    /// A record the parser does not understand (XBZRLE) inside a PART section.
    pub fn xbzrle(&mut self) -> &mut Self {
        self.raw(&[2]).be32(2).be64(0x40).name(b"pc.ram").raw(&[1, 0, 3, 1, 2, 3])
    }
}

/// The seeds of `qemu_stream` (without the chunk byte): name and stream.
pub fn qemu_stream_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut plain = QemuStream::default();
    plain.start(false).ram_start(false).ram_section(false, 0, true).ram_section(false, 8, false).switchover_start();
    plain.ram_section(true, 16, false).tail();
    let mut shared = QemuStream::default();
    shared.start(true).ram_start(true).ram_section(false, 0, true).ram_section(true, 4, false).tail();
    let mut fallback = QemuStream::default();
    fallback.start(false).ram_start(false).ram_section(false, 0, true).xbzrle().tail();
    vec![("plain", plain.0), ("x-ignore-shared", shared.0), ("xbzrle", fallback.0)]
}

#[cfg(test)]
mod tests;

// stream_chunk

/// The seeds of `stream_chunk`: a chunk of opaque spans and page records (a header with a block
/// name and a short one; the record bytes, opaque to this codec, are a page index and the start
/// of a page), an empty chunk, a resend.
pub fn stream_chunk_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use livemig_stream::chunk::{resend_payload, ChunkBuilder};
    let mut b = ChunkBuilder::new(3);
    b.opaque(b"QEVM\0\0\0\x03");
    let mut named = 0x2000u64.to_be_bytes().to_vec();
    named.push(6);
    named.extend_from_slice(b"pc.ram");
    let mut rec = 7u64.to_le_bytes().to_vec();
    rec.extend_from_slice(&ram_page(7)[..64]);
    b.page(&named, &rec);
    b.page(&0x3000u64.to_be_bytes(), &rec);
    b.opaque(&[0x04, 0, 0, 0, 2]);
    let chunk = b.finish();
    vec![("chunk", chunk), ("empty", ChunkBuilder::new(0).finish()), ("resend", resend_payload(9, 2, &ram_page(5)))]
}
