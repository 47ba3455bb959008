//! Verified window reads on the receiving side.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::file::Stamp;
use crate::{Fingerprint, IndexError, Source, Window, BLOCK_SIZE, SECTOR};

/// Reads 4 KiB windows of the receiver's copy of the image (pread, shareable between threads) and
/// checks each against the fingerprint the reference carried.
#[derive(Debug)]
pub struct BlockReader {
    file: File,
    src: Source,
    path: PathBuf,
}

impl BlockReader {
    /// Opens the image read-only.
    pub fn open(image: &Path) -> Result<BlockReader, IndexError> {
        let file = File::open(image).map_err(|source| IndexError::Open { path: image.to_path_buf(), source })?;
        Stamp::of(&file, image)?;
        let src = Source::open(&file, image)?;
        Ok(BlockReader { file, src, path: image.to_path_buf() })
    }

    /// The image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes the guest sees in the image now.
    pub fn size(&self) -> Result<u64, IndexError> {
        let m = self.file.metadata().map_err(|source| IndexError::Open { path: self.path.clone(), source })?;
        Ok(self.src.guest_size(m.len()))
    }

    /// Reads the content of `w` (the 4 KiB at its sector, or their first bytes then zeros) into
    /// `buf` and checks its fingerprint. On [`IndexError::BlockMismatch`] (the image changed) or
    /// [`IndexError::BlockOutOfRange`] the caller should ask for the page itself; `buf` then
    /// holds nothing meaningful.
    pub fn read_window(&self, w: Window, expected: Fingerprint, buf: &mut [u8; BLOCK_SIZE]) -> Result<(), IndexError> {
        let sector = w.sector;
        let out_of_range = |size| IndexError::BlockOutOfRange { path: self.path.clone(), sector, size };
        let Some(offset) = sector.checked_mul(SECTOR) else {
            return Err(out_of_range(self.size()?));
        };
        let (disk, zero) = buf.split_at_mut(w.disk_bytes());
        if let Err(source) = self.src.read_exact_at(disk, offset) {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                return Err(out_of_range(self.size()?));
            }
            return Err(IndexError::Read { path: self.path.clone(), offset, source });
        }
        zero.fill(0);
        let found = Fingerprint::of(buf);
        if found != expected {
            return Err(IndexError::BlockMismatch { path: self.path.clone(), sector, expected, found });
        }
        Ok(())
    }
}
