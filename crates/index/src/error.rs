use std::io;
use std::path::PathBuf;

use crate::Fingerprint;

/// Everything that can go wrong building, loading, saving an index or reading a block.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// The image cannot be opened or examined.
    #[error("cannot open the disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The image is not a regular file (block devices are not supported yet).
    #[error("the disk image {path} is not a regular file")]
    NotAFile {
        /// The image.
        path: PathBuf,
    },
    /// Reading the image failed.
    #[error("cannot read the disk image {path} at byte {offset}")]
    Read {
        /// The image.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The image has more windows than the index's 32-bit window numbers address.
    #[error("the disk image {path} has {windows} windows of 4 KiB every {stride} bytes, more than an index addresses ({max}); a coarser stride (--disk-align) indexes it")]
    TooLarge {
        /// The image.
        path: PathBuf,
        /// Its windows at this stride.
        windows: u64,
        /// The stride in bytes.
        stride: u32,
        /// The most an index addresses.
        max: u64,
    },
    /// The image's format is read through `qemu-nbd`, which could not serve it.
    #[error("cannot read the disk image {path} through qemu-nbd: {what}")]
    Nbd {
        /// The image.
        path: PathBuf,
        /// What failed.
        what: String,
    },
    /// A stride that is not 512, 1024, 2048 or 4096 bytes.
    #[error("disk alignment {value}: expected 512, 1024, 2048 or 4096 bytes")]
    BadAlign {
        /// The value asked for.
        value: u32,
    },
    /// The image was modified while it was indexed: the index would not describe it.
    #[error("the disk image {path} changed while it was indexed ({what} differs); index it again while nothing writes it")]
    ChangedDuringBuild {
        /// The image.
        path: PathBuf,
        /// What changed first.
        what: &'static str,
    },
    /// An indexing thread could not be started.
    #[error("cannot start an indexing thread")]
    Thread(#[source] io::Error),
    /// The cache directory cannot be created.
    #[error("cannot create the index cache directory {path}")]
    CacheDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The cache directory belongs to another user, or group or others can use it.
    #[error(transparent)]
    Insecure(crate::InsecureDir),
    /// The index file cannot be written.
    #[error("cannot write the index file {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The index file cannot be read (missing, unreadable).
    #[error("cannot read the index file {path}")]
    ReadIndex {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The index file is truncated, corrupted or of another format.
    #[error("the index file {path} is invalid: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The index file describes another state of the image.
    #[error("the index file {path} describes another state of the image: {what} differs")]
    Stale {
        /// The file.
        path: PathBuf,
        /// What differs first.
        what: &'static str,
    },
    /// A 4 KiB window that does not end within the image.
    #[error("the 4 KiB at sector {sector} are beyond the end of the disk image {path} ({size} bytes)")]
    BlockOutOfRange {
        /// The image.
        path: PathBuf,
        /// The sector (512 bytes) the window starts at.
        sector: u64,
        /// Bytes the image has.
        size: u64,
    },
    /// The block does not hold the expected content any more: the image changed since it was
    /// indexed. The receiver should ask for the page itself.
    #[error("the 4 KiB at sector {sector} of the disk image {path} have fingerprint {found}, not the expected {expected}: the image changed since it was indexed")]
    BlockMismatch {
        /// The image.
        path: PathBuf,
        /// The sector (512 bytes) the window starts at.
        sector: u64,
        /// The fingerprint the reference carried.
        expected: Fingerprint,
        /// The fingerprint of the block as read.
        found: Fingerprint,
    },
}

impl IndexError {
    /// Whether this is a [`IndexError::BlockMismatch`] or a block beyond the end: the reference
    /// cannot be resolved from this image and the page must be sent again.
    pub fn needs_resend(&self) -> bool {
        matches!(self, IndexError::BlockMismatch { .. } | IndexError::BlockOutOfRange { .. })
    }
}
