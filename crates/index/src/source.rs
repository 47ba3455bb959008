//! What an index reads: the guest-visible content of a disk image. A raw image is read with
//! pread; an image of another format QEMU reads (qcow2 and qcow, qed, vmdk, vhdx, vpc, vdi; found
//! by its magic; a backing chain included) through QEMU's own block layer: a `qemu-nbd`
//! this process starts (read-only, `force-share=on`, on a private unix socket) and a minimal NBD
//! client (fixed newstyle handshake, `NBD_OPT_EXPORT_NAME`, simple replies to `NBD_CMD_READ`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::IndexError;

/// The formats read through `qemu-nbd`, by their magic (at its offset in the header), as
/// QEMU's own probes find them (`block/*.c`, `*_probe`); anything else is raw. qcow (version 1)
/// shares qcow2's magic: the version after it tells them apart ([`format_of`]).
const FORMATS: [(usize, &[u8], &str); 6] = [
    (0, b"QFI\xfb", "qcow2"),
    (0, b"QED\0", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0x40, &[0x7f, 0x10, 0xda, 0xbe], "vdi"),
];

/// The format of an image whose first bytes are `head` (at most 0x44 of them): a QEMU block
/// driver `qemu-nbd` reads, or `None` for raw.
pub(crate) fn format_of(head: &[u8]) -> Option<&'static str> {
    let (_, _, f) = FORMATS.iter().find(|(at, m, _)| head.get(*at..at + m.len()) == Some(*m))?;
    match *f {
        "qcow2" if head.get(4..8) == Some(&[0, 0, 0, 1]) => Some("qcow"),
        f => Some(f),
    }
}
/// Most NBD connections to one export (one per indexing thread, plus the receiver's).
const MAX_CONNECTIONS: usize = 16;
/// How long `qemu-nbd` may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Most bytes one NBD read asks for (qemu-nbd's limit is 32 MiB).
const MAX_READ: usize = 4 << 20;

/// The guest-visible content of a disk image.
#[derive(Debug)]
pub enum Source {
    /// A raw image: its bytes.
    Raw(File),
    /// An image of another format, read through `qemu-nbd`.
    Nbd(NbdExport),
}

impl Source {
    /// Opens `image` (`f`, already open) as its format requires.
    pub fn open(f: &File, image: &Path) -> Result<Source, IndexError> {
        let mut head = [0u8; 0x44];
        let n = f.read_at(&mut head, 0).map_err(|source| IndexError::Read { path: image.to_path_buf(), offset: 0, source })?;
        if let Some(format) = format_of(&head[..n]) {
            return NbdExport::start(image, format).map(Source::Nbd);
        }
        let file = f.try_clone().map_err(|source| IndexError::Open { path: image.to_path_buf(), source })?;
        Ok(Source::Raw(file))
    }

    /// The format: "raw" or the one `qemu-nbd` reads.
    pub fn format(&self) -> &'static str {
        match self {
            Source::Raw(_) => "raw",
            Source::Nbd(n) => n.format,
        }
    }

    /// Bytes the guest sees, or `file_len` for a raw image.
    pub fn guest_size(&self, file_len: u64) -> u64 {
        match self {
            Source::Raw(_) => file_len,
            Source::Nbd(n) => n.size,
        }
    }

    /// Reads `buf.len()` bytes of guest-visible content at `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Source::Raw(f) => f.read_exact_at(buf, offset),
            Source::Nbd(n) => n.read_exact_at(buf, offset),
        }
    }
}

/// A `qemu-nbd` serving one image read-only on a private socket, and connections to it. The
/// server is killed when this is dropped.
#[derive(Debug)]
pub struct NbdExport {
    child: Child,
    /// The private directory of the socket and the log: removed when this is dropped, after
    /// the server (fields drop after `drop`).
    _dir: tempfile::TempDir,
    socket: PathBuf,
    format: &'static str,
    size: u64,
    /// Idle connections, and how many are open (idle or in use): at most [`MAX_CONNECTIONS`],
    /// as many as the server serves at once.
    pool: Mutex<(Vec<NbdConn>, usize)>,
    freed: Condvar,
}

impl NbdExport {
    fn start(image: &Path, format: &'static str) -> Result<NbdExport, IndexError> {
        let err = |what: String| IndexError::Nbd { path: image.to_path_buf(), what };
        let dir = tempfile::Builder::new()
            .prefix("livemig-nbd-")
            .tempdir()
            .map_err(|e| err(format!("cannot create a directory for its socket: {e}")))?;
        let socket = dir.path().join("nbd.sock");
        // Its messages go to a file (a pipe nobody reads could fill and stall it).
        let log = dir.path().join("qemu-nbd.log");
        let log_file = File::create(&log).map_err(|e| err(format!("cannot create {}: {e}", log.display())))?;
        // QEMU's option syntax doubles a comma inside a value.
        let name = image.to_str().ok_or_else(|| err("the path is not UTF-8".into()))?.replace(',', ",,");
        let opts = format!("driver={format},read-only=on,force-share=on,file.driver=file,file.filename={name}");
        let mut child = Command::new("qemu-nbd")
            .arg("--read-only")
            .arg(format!("--shared={MAX_CONNECTIONS}"))
            .arg("--persistent")
            .arg("--socket")
            .arg(&socket)
            .arg("--image-opts")
            .arg(&opts)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .map_err(|e| err(format!("cannot start qemu-nbd (install qemu-utils): {e}")))?;
        let started = Instant::now();
        let first = loop {
            if let Some(status) = child.try_wait().map_err(|e| err(format!("qemu-nbd: {e}")))? {
                let msg = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(err(format!("qemu-nbd exited ({status}): {}", msg.trim())));
            }
            if socket.exists() {
                match NbdConn::connect(&socket) {
                    Ok(c) => break c,
                    Err(e) if started.elapsed() > START_TIMEOUT => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(err(format!("cannot connect to qemu-nbd: {e}")));
                    }
                    Err(_) => {}
                }
            } else if started.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(format!("qemu-nbd made no socket in {} s", START_TIMEOUT.as_secs())));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let size = first.size;
        Ok(NbdExport { child, _dir: dir, socket, format, size, pool: Mutex::new((vec![first], 1)), freed: Condvar::new() })
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        if end > self.size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "beyond the end of the image"));
        }
        let mut conn = self.take()?;
        let mut at = offset;
        let mut result = Ok(());
        for chunk in buf.chunks_mut(MAX_READ) {
            result = conn.read(chunk, at);
            if result.is_err() {
                break;
            }
            at += chunk.len() as u64;
        }
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            // A good connection is kept for reuse; a failed one is closed.
            Ok(()) => pool.0.push(conn),
            Err(_) => pool.1 -= 1,
        }
        self.freed.notify_one();
        result
    }

    /// An idle connection, a new one while fewer than [`MAX_CONNECTIONS`] are open, else the
    /// next one freed.
    fn take(&self) -> io::Result<NbdConn> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(c) = pool.0.pop() {
                return Ok(c);
            }
            if pool.1 < MAX_CONNECTIONS {
                pool.1 += 1;
                drop(pool);
                return NbdConn::connect(&self.socket).inspect_err(|_| {
                    self.pool.lock().unwrap_or_else(|p| p.into_inner()).1 -= 1;
                    self.freed.notify_one();
                });
            }
            pool = self.freed.wait(pool).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for NbdExport {
    fn drop(&mut self) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).0.clear();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;

/// One NBD connection in transmission phase.
#[derive(Debug)]
struct NbdConn {
    s: UnixStream,
    size: u64,
    handle: u64,
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl NbdConn {
    fn connect(socket: &Path) -> io::Result<NbdConn> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        if read_u64(&mut s)? != NBDMAGIC || read_u64(&mut s)? != IHAVEOPT {
            return Err(bad("not a newstyle NBD server".into()));
        }
        let flags = read_u16(&mut s)?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad(format!("NBD server without fixed newstyle (flags {flags:#x})")));
        }
        let no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let client = u32::from(FLAG_FIXED_NEWSTYLE) | if no_zeroes { u32::from(FLAG_NO_ZEROES) } else { 0 };
        let mut hello = Vec::with_capacity(20);
        hello.extend_from_slice(&client.to_be_bytes());
        // NBD_OPT_EXPORT_NAME of the default export ("").
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        hello.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&hello)?;
        let size = read_u64(&mut s)?;
        let _transmission_flags = read_u16(&mut s)?;
        if !no_zeroes {
            let mut z = [0u8; 124];
            s.read_exact(&mut z)?;
        }
        Ok(NbdConn { s, size, handle: 0 })
    }

    fn read(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.handle = self.handle.wrapping_add(1);
        let len = u32::try_from(buf.len()).map_err(|_| bad("read too large".into()))?;
        let mut req = [0u8; 28];
        req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req[4..6].copy_from_slice(&0u16.to_be_bytes());
        req[6..8].copy_from_slice(&CMD_READ.to_be_bytes());
        req[8..16].copy_from_slice(&self.handle.to_be_bytes());
        req[16..24].copy_from_slice(&offset.to_be_bytes());
        req[24..28].copy_from_slice(&len.to_be_bytes());
        self.s.write_all(&req)?;
        let magic = read_u32(&mut self.s)?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(bad(format!("NBD reply magic {magic:#x}")));
        }
        let error = read_u32(&mut self.s)?;
        let handle = read_u64(&mut self.s)?;
        if handle != self.handle {
            return Err(bad(format!("NBD reply to request {handle}, expected {}", self.handle)));
        }
        if error != 0 {
            return Err(io::Error::other(format!("NBD read of {len} bytes at {offset} failed: error {error}")));
        }
        self.s.read_exact(buf)
    }
}
