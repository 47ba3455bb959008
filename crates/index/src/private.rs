//! Directories and files only their owner can use: memory snapshots hold copies of guest memory
//! (which holds the guest's keys and passwords), index files the fingerprints of a disk's blocks.
//!
//! Store directories are created mode 0700 and files in them 0600 (the mode given at creation,
//! so the content is never readable by others, not even briefly; the umask can only narrow it).
//! A store directory that exists already is used only if it belongs to this user and neither
//! group nor others have any permission on it ([`InsecureDir`] otherwise, with the fix).

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Mode of the directories livemig creates for snapshots and index files.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files livemig writes into them.
pub const FILE_MODE: u32 = 0o600;

/// A store directory that others could read, write or enter, or that belongs to another user:
/// livemig refuses to keep its data there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsecureDir {
    /// What the directory is for ("snapshot directory", "index cache directory").
    pub what: &'static str,
    /// What it holds, for the message.
    pub holds: &'static str,
    /// The directory.
    pub path: PathBuf,
    /// Its permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Its owner's uid.
    pub owner: u32,
    /// This process's effective uid.
    pub uid: u32,
}

impl fmt::Display for InsecureDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.path.display();
        if self.owner != self.uid {
            write!(
                f,
                "the {} {p} belongs to uid {}, not to this user (uid {}); it will hold {}, so livemig uses only a \
                 directory of its own user: give one of yours (`mkdir -m 700 DIR`), or take this one with \
                 `chown {} {p} && chmod 700 {p}`",
                self.what, self.owner, self.uid, self.holds, self.uid
            )
        } else {
            write!(
                f,
                "the {} {p} has mode {:04o}: group or others can read, write or enter it, and it will hold {}; \
                 run `chmod 700 {p}`",
                self.what, self.mode, self.holds
            )
        }
    }
}

impl std::error::Error for InsecureDir {}

/// Why [`private_dir`] failed.
#[derive(Debug)]
pub(crate) enum DirError {
    /// Creating or examining it failed.
    Io(io::Error),
    /// It exists but others can use it.
    Insecure(InsecureDir),
}

/// Creates `path` (and missing parents) mode 0700 if needed, then checks that it is a directory
/// of this user that group and others have no permission on.
pub(crate) fn private_dir(path: &Path, what: &'static str, holds: &'static str) -> Result<(), DirError> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(path).map_err(DirError::Io)?;
    let m = fs::metadata(path).map_err(DirError::Io)?;
    if !m.is_dir() {
        return Err(DirError::Io(io::Error::new(io::ErrorKind::NotADirectory, "not a directory")));
    }
    let uid = rustix::process::geteuid().as_raw();
    let mode = m.mode() & 0o7777;
    if m.uid() != uid || mode & 0o077 != 0 {
        return Err(DirError::Insecure(InsecureDir { what, holds, path: path.to_path_buf(), mode, owner: m.uid(), uid }));
    }
    Ok(())
}

/// Creates one directory mode 0700 (inside a checked store).
pub(crate) fn create_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(DIR_MODE).create(path)
}

/// Creates one directory and missing parents mode 0700 (inside a checked store).
pub(crate) fn create_dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(path)
}

/// Opens a file for writing mode 0600, creating it or truncating it.
pub(crate) fn create_file(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create(true).truncate(true).mode(FILE_MODE).open(path)
}

/// Creates a new file (an error if it exists) mode 0600, open for reading and writing.
pub(crate) fn create_new_file(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).create_new(true).mode(FILE_MODE).open(path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn creates_0700_and_refuses_what_others_can_use() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b");
        assert!(private_dir(&p, "test directory", "secrets").is_ok());
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(d.path().join("a")).unwrap().mode() & 0o777 & !0o700, 0, "parents are private too");
        for mode in [0o755, 0o750, 0o701, 0o710, 0o1777, 0o770] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let Err(DirError::Insecure(e)) = private_dir(&p, "test directory", "secrets") else {
                panic!("mode {mode:o} accepted")
            };
            assert_eq!(e.mode, mode);
            let text = e.to_string();
            assert!(text.contains(&format!("mode {mode:04o}")) && text.contains(&format!("chmod 700 {}", p.display())), "{text}");
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o500)).unwrap();
        assert!(private_dir(&p, "test directory", "secrets").is_ok(), "only group and other bits matter");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn another_users_directory_names_both_uids() {
        let e = InsecureDir { what: "snapshot directory", holds: "copies of guest memory", path: "/x".into(), mode: 0o700, owner: 1000, uid: 0 };
        let text = e.to_string();
        assert!(text.contains("belongs to uid 1000") && text.contains("(uid 0)") && text.contains("chown 0 /x"), "{text}");
    }

    #[test]
    fn files_are_0600() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        create_file(&a).unwrap();
        create_new_file(&d.path().join("b")).unwrap();
        for n in ["a", "b"] {
            assert_eq!(fs::metadata(d.path().join(n)).unwrap().mode() & 0o777, 0o600, "{n}");
        }
        create_dir(&d.path().join("c")).unwrap();
        assert_eq!(fs::metadata(d.path().join("c")).unwrap().mode() & 0o777, 0o700);
    }
}
