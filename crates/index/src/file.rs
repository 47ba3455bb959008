//! The persisted index: one file per image in a cache directory, named after the hash of the
//! image's canonical path.
//!
//! Layout (little-endian):
//!
//! ```text
//! header (120 bytes):
//!   magic "LMIGIDX\0", version u32, stride u32 (bytes between window starts: 512..4096),
//!   image size u64, mtime s i64, mtime ns i64, ctime s i64, ctime ns i64, inode u64, device u64,
//!   sample hash u128, index hash u128, zero windows u64, entries u64
//! body: entries x (fingerprint u128, window u32, zero tail sectors u8), fingerprints strictly
//!   ascending
//! trailer: xxh3-128 of header and body
//! ```

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use crate::build::{sample_hash, BuildProgress};
use crate::{windows, Align, DiskIndex, IndexError, Meta, Stride, STRIDES};

const MAGIC: [u8; 8] = *b"LMIGIDX\0";
/// 2: windows every `stride` bytes (version 1 had 4 KiB blocks only).
const VERSION: u32 = 2;
const HEADER_LEN: usize = 120;
const ENTRY_LEN: usize = 21;
const TRAILER_LEN: usize = 16;
/// Entries serialised per chunk when hashing or writing the body.
const CHUNK_ENTRIES: usize = 16 * 1024;

/// What identifies a state of the image file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) size: u64,
    pub(crate) mtime: (i64, i64),
    pub(crate) ctime: (i64, i64),
    pub(crate) ino: u64,
    pub(crate) dev: u64,
}

impl Stamp {
    /// The stamp of the file with `size` the guest-visible size (for a raw image the file's).
    pub(crate) fn of_source(f: &File, image: &Path, src: &crate::Source) -> Result<Stamp, IndexError> {
        let mut s = Stamp::of(f, image)?;
        s.size = src.guest_size(s.size);
        Ok(s)
    }

    pub(crate) fn of(f: &File, image: &Path) -> Result<Stamp, IndexError> {
        let m = f.metadata().map_err(|source| IndexError::Open { path: image.to_path_buf(), source })?;
        if !m.is_file() {
            return Err(IndexError::NotAFile { path: image.to_path_buf() });
        }
        Ok(Stamp {
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
            dev: m.dev(),
        })
    }

    /// The first field that differs, if any.
    pub(crate) fn differs(&self, o: &Stamp) -> Option<&'static str> {
        if self.size != o.size {
            Some("size")
        } else if self.mtime != o.mtime {
            Some("mtime")
        } else if self.ctime != o.ctime {
            Some("ctime")
        } else if self.ino != o.ino {
            Some("inode")
        } else if self.dev != o.dev {
            Some("device")
        } else {
            None
        }
    }
}

/// How [`DiskIndex::load_or_build`] got its index.
#[derive(Debug)]
#[non_exhaustive]
pub enum Origin {
    /// Read from the index file: the image had not changed.
    Loaded {
        /// The index file.
        file: PathBuf,
    },
    /// Built from the image and saved.
    Built {
        /// The index file written.
        file: PathBuf,
        /// Why the index file was not used; `None` when there was none.
        previous: Option<IndexError>,
    },
}

impl Origin {
    /// Whether the image was scanned.
    pub fn built(&self) -> bool {
        matches!(self, Origin::Built { .. })
    }

    /// The index file.
    pub fn file(&self) -> &Path {
        match self {
            Origin::Loaded { file } | Origin::Built { file, .. } => file,
        }
    }
}

/// The name of the index file of an image: xxh3-128 of its canonical path.
pub fn cache_file_name(canonical_image: &Path) -> String {
    format!("{:032x}.idx", xxh3_128(canonical_image.as_os_str().as_bytes()))
}

fn encode_body_chunk(keys: &[u128], blocks: &[u32], tails: &[u8], out: &mut Vec<u8>) {
    out.clear();
    for ((k, b), t) in keys.iter().zip(blocks).zip(tails) {
        out.extend_from_slice(&k.to_le_bytes());
        out.extend_from_slice(&b.to_le_bytes());
        out.push(*t);
    }
}

/// xxh3-128 of the stride and the serialised body: the index hash.
pub(crate) fn body_hash(stride: u32, keys: &[u128], blocks: &[u32], tails: &[u8]) -> u128 {
    let mut h = Xxh3::new();
    h.update(&stride.to_le_bytes());
    let mut buf = Vec::with_capacity(CHUNK_ENTRIES * ENTRY_LEN);
    for ((k, b), t) in keys.chunks(CHUNK_ENTRIES).zip(blocks.chunks(CHUNK_ENTRIES)).zip(tails.chunks(CHUNK_ENTRIES)) {
        encode_body_chunk(k, b, t, &mut buf);
        h.update(&buf);
    }
    h.digest128()
}

fn header(meta: &Meta, entries: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    let mut w = &mut h[..];
    let s = &meta.stamp;
    // Writing into a slice of exactly HEADER_LEN bytes cannot fail.
    let _ = (|| -> io::Result<()> {
        w.write_all(&MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&meta.stride.to_le_bytes())?;
        w.write_all(&s.size.to_le_bytes())?;
        for v in [s.mtime.0, s.mtime.1, s.ctime.0, s.ctime.1] {
            w.write_all(&v.to_le_bytes())?;
        }
        for v in [s.ino, s.dev] {
            w.write_all(&v.to_le_bytes())?;
        }
        w.write_all(&meta.sample_hash.to_le_bytes())?;
        w.write_all(&meta.index_hash.to_le_bytes())?;
        w.write_all(&meta.zero_blocks.to_le_bytes())?;
        w.write_all(&entries.to_le_bytes())?;
        Ok(())
    })();
    h
}

/// Reads fixed-size fields from the header.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        if let Some((head, rest)) = self.0.split_at_checked(N) {
            a.copy_from_slice(head);
            self.0 = rest;
        }
        a
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn i64(&mut self) -> i64 {
        i64::from_le_bytes(self.take())
    }
    fn u128(&mut self) -> u128 {
        u128::from_le_bytes(self.take())
    }
}

impl DiskIndex {
    /// Writes the index file, mode 0600 (to a temporary file in the same directory, then renamed).
    pub fn save(&self, file: &Path) -> Result<(), IndexError> {
        let werr = |source| IndexError::Write { path: file.to_path_buf(), source };
        let mut name = file.as_os_str().to_owned();
        name.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(name);
        let result = (|| -> io::Result<()> {
            let mut w = BufWriter::new(crate::private::create_file(&tmp)?);
            let mut h = Xxh3::new();
            let entries = u64::try_from(self.keys.len()).unwrap_or(u64::MAX);
            let head = header(&self.meta, entries);
            h.update(&head);
            w.write_all(&head)?;
            let mut buf = Vec::with_capacity(CHUNK_ENTRIES * ENTRY_LEN);
            let chunks = self.keys.chunks(CHUNK_ENTRIES).zip(self.blocks.chunks(CHUNK_ENTRIES)).zip(self.tails.chunks(CHUNK_ENTRIES));
            for ((k, b), t) in chunks {
                encode_body_chunk(k, b, t, &mut buf);
                h.update(&buf);
                w.write_all(&buf)?;
            }
            w.write_all(&h.digest128().to_le_bytes())?;
            w.into_inner().map_err(|e| e.into_error())?;
            fs::rename(&tmp, file)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(werr)
    }

    /// Reads the index file of `image`, checking that it describes the image as it is now.
    pub fn load(image: &Path, file: &Path) -> Result<DiskIndex, IndexError> {
        let img = File::open(image).map_err(|source| IndexError::Open { path: image.to_path_buf(), source })?;
        Stamp::of(&img, image)?;
        let src = crate::Source::open(&img, image)?;
        let now = Stamp::of_source(&img, image, &src)?;
        let rerr = |source| IndexError::ReadIndex { path: file.to_path_buf(), source };
        let invalid = |reason: String| IndexError::Invalid { path: file.to_path_buf(), reason };
        let stale = |what| IndexError::Stale { path: file.to_path_buf(), what };

        let f = File::open(file).map_err(rerr)?;
        let len = f.metadata().map_err(rerr)?.len();
        let mut r = BufReader::with_capacity(1 << 20, f);
        let mut head = [0u8; HEADER_LEN];
        if len < (HEADER_LEN + TRAILER_LEN) as u64 {
            return Err(invalid(format!("{len} bytes, shorter than header and checksum")));
        }
        r.read_exact(&mut head).map_err(rerr)?;
        let mut fl = Fields(&head);
        if fl.take::<8>() != MAGIC {
            return Err(invalid("not a livemig index file (bad magic)".into()));
        }
        let version = fl.u32();
        if version != VERSION {
            return Err(invalid(format!("format version {version}, this build reads {VERSION}")));
        }
        let stride = fl.u32();
        if !STRIDES.contains(&stride) {
            return Err(invalid(format!("stride {stride}, expected one of {STRIDES:?}")));
        }
        let stamp = Stamp {
            size: fl.u64(),
            mtime: (fl.i64(), fl.i64()),
            ctime: (fl.i64(), fl.i64()),
            ino: fl.u64(),
            dev: fl.u64(),
        };
        let sample = fl.u128();
        let index_hash = fl.u128();
        let zero_blocks = fl.u64();
        let entries = fl.u64();
        let image_windows = windows(stamp.size, stride);
        let expected_len = entries
            .checked_mul(ENTRY_LEN as u64)
            .and_then(|b| b.checked_add((HEADER_LEN + TRAILER_LEN) as u64));
        if expected_len != Some(len) {
            return Err(invalid(format!("{len} bytes, but the header announces {entries} entries")));
        }
        // Each window: its own entry and, under a 4096 stride, one per zero tail.
        let per_window = 4096 / u64::from(stride);
        if zero_blocks > image_windows || !matches!(image_windows.checked_mul(per_window), Some(n) if entries <= n) {
            return Err(invalid(format!(
                "{entries} entries and {zero_blocks} zero windows for an image of {image_windows} windows"
            )));
        }
        if let Some(what) = stamp.differs(&now) {
            return Err(stale(what));
        }
        if sample_hash(&src, image, now.size)? != sample {
            return Err(stale("content sample"));
        }

        // entries <= the file's length / 20 (checked above): the allocation is backed by the file.
        let n = usize::try_from(entries).map_err(|_| invalid(format!("{entries} entries")))?;
        let mut keys = Vec::with_capacity(n);
        let mut blocks = Vec::with_capacity(n);
        let mut tails = Vec::with_capacity(n);
        let mut check = Xxh3::new();
        check.update(&head);
        let mut body = Xxh3::new();
        body.update(&stride.to_le_bytes());
        let mut buf = vec![0u8; CHUNK_ENTRIES * ENTRY_LEN];
        let mut left = n;
        let mut prev: Option<u128> = None;
        while left > 0 {
            let m = left.min(CHUNK_ENTRIES);
            let chunk = &mut buf[..m * ENTRY_LEN];
            r.read_exact(chunk).map_err(rerr)?;
            check.update(chunk);
            body.update(chunk);
            for e in chunk.chunks_exact(ENTRY_LEN) {
                let mut fe = Fields(e);
                let k = fe.u128();
                let b = fe.u32();
                let t = fe.take::<1>()[0];
                if u64::from(t) * 512 + u64::from(stride) > 4096 || (t > 0 && (4096 - u64::from(t) * 512) % u64::from(stride) != 0) {
                    return Err(invalid(format!("zero tail of {t} sectors at a stride of {stride}")));
                }
                if prev.is_some_and(|p| p >= k) {
                    return Err(invalid("fingerprints out of order".into()));
                }
                if u64::from(b) >= image_windows {
                    return Err(invalid(format!("window {b} beyond the image's {image_windows} windows")));
                }
                prev = Some(k);
                keys.push(k);
                blocks.push(b);
                tails.push(t);
            }
            left -= m;
        }
        let mut trailer = [0u8; TRAILER_LEN];
        r.read_exact(&mut trailer).map_err(rerr)?;
        if u128::from_le_bytes(trailer) != check.digest128() {
            return Err(invalid("checksum mismatch".into()));
        }
        if body.digest128() != index_hash {
            return Err(invalid("index hash mismatch".into()));
        }
        Ok(DiskIndex::from_sorted(keys, blocks, tails, Meta { stamp, sample_hash: sample, index_hash, zero_blocks, stride }))
    }

    /// The index of `image` from its file in `cache_dir` when that describes the image as it is,
    /// else built (with `progress`) and saved there; its stride detected ([`Align::Auto`]).
    /// Returns how it was obtained. `cache_dir` is created mode 0700 if needed, and refused
    /// ([`IndexError::Insecure`]) if it belongs to another user or group or others have any
    /// permission on it.
    pub fn load_or_build(
        image: &Path,
        cache_dir: &Path,
        progress: &mut dyn FnMut(BuildProgress),
    ) -> Result<(DiskIndex, Origin), IndexError> {
        Self::load_or_build_aligned(image, cache_dir, Align::Auto, progress).map(|(i, o, _)| (i, o))
    }

    /// [`DiskIndex::load_or_build`] with the stride chosen by `align`; also returns the stride
    /// and why it was chosen. An index file of another stride is rebuilt.
    pub fn load_or_build_aligned(
        image: &Path,
        cache_dir: &Path,
        align: Align,
        progress: &mut dyn FnMut(BuildProgress),
    ) -> Result<(DiskIndex, Origin, Stride), IndexError> {
        let canon = fs::canonicalize(image).map_err(|source| IndexError::Open { path: image.to_path_buf(), source })?;
        crate::private::private_dir(cache_dir, "index cache directory", "fingerprints of the disk image's blocks")
            .map_err(|e| match e {
                crate::private::DirError::Io(source) => IndexError::CacheDir { path: cache_dir.to_path_buf(), source },
                crate::private::DirError::Insecure(i) => IndexError::Insecure(i),
            })?;
        let stride = {
            let f = File::open(&canon).map_err(|source| IndexError::Open { path: canon.clone(), source })?;
            Stamp::of(&f, &canon)?;
            align.resolve(&crate::Source::open(&f, &canon)?, &canon)?
        };
        let file = cache_dir.join(cache_file_name(&canon));
        let previous = match Self::load(&canon, &file) {
            Ok(index) if index.stride() == stride.bytes => return Ok((index, Origin::Loaded { file }, stride)),
            Ok(_) => Some(IndexError::Stale { path: file.clone(), what: "stride" }),
            Err(IndexError::ReadIndex { source, .. }) if source.kind() == io::ErrorKind::NotFound => None,
            Err(e) => Some(e),
        };
        let index = Self::build_aligned(&canon, Align::Bytes(stride.bytes), progress)?;
        index.save(&file)?;
        Ok((index, Origin::Built { file, previous }, stride))
    }
}
