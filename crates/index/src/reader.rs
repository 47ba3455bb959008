//! Verified block reads on the receiving side.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::file::Stamp;
use crate::{Fingerprint, IndexError, BLOCK_SIZE, BLOCK_SIZE_U64};

/// Reads blocks of the receiver's copy of the image (pread, shareable between threads) and
/// checks each against the fingerprint the reference carried.
#[derive(Debug)]
pub struct BlockReader {
    file: File,
    path: PathBuf,
}

impl BlockReader {
    /// Opens the image read-only.
    pub fn open(image: &Path) -> Result<BlockReader, IndexError> {
        let file = File::open(image).map_err(|source| IndexError::Open { path: image.to_path_buf(), source })?;
        Stamp::of(&file, image)?;
        Ok(BlockReader { file, path: image.to_path_buf() })
    }

    /// The image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whole blocks the image has now.
    pub fn blocks(&self) -> Result<u64, IndexError> {
        let m = self.file.metadata().map_err(|source| IndexError::Open { path: self.path.clone(), source })?;
        Ok(m.len() / BLOCK_SIZE_U64)
    }

    /// Reads block `block` into `buf` and checks its fingerprint. On
    /// [`IndexError::BlockMismatch`] (the image changed) or [`IndexError::BlockOutOfRange`]
    /// the caller should ask for the page itself; `buf` then holds nothing meaningful.
    pub fn read_block(&self, block: u64, expected: Fingerprint, buf: &mut [u8; BLOCK_SIZE]) -> Result<(), IndexError> {
        let out_of_range = |blocks| IndexError::BlockOutOfRange { path: self.path.clone(), block, blocks };
        let Some(offset) = block.checked_mul(BLOCK_SIZE_U64) else {
            return Err(out_of_range(self.blocks()?));
        };
        if let Err(source) = self.file.read_exact_at(buf, offset) {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                return Err(out_of_range(self.blocks()?));
            }
            return Err(IndexError::Read { path: self.path.clone(), offset, source });
        }
        let found = Fingerprint::of(buf);
        if found != expected {
            return Err(IndexError::BlockMismatch { path: self.path.clone(), block, expected, found });
        }
        Ok(())
    }
}
