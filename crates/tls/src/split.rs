//! The two halves of a session, used concurrently from two threads.
//!
//! A rustls connection is one state machine, so it sits behind a mutex (the connection lock); the
//! socket is cloned, one clone per half. The write side of the socket has its own mutex (the
//! socket-write lock) and the lock order is always socket-write lock, then connection lock.
//!
//! - The reader reads raw bytes from its socket clone holding no lock (it may block there for a
//!   long time), then takes the connection lock to feed them to rustls and take the plaintext.
//! - The writer takes the socket-write lock, then the connection lock to hand rustls plaintext and
//!   take the TLS records out into a buffer; it drops the connection lock before writing that
//!   buffer to the socket (a writer blocked on a full socket must not stop the reader, or two
//!   agents streaming at each other would deadlock), and releases the socket-write lock only after
//!   seeing, under the connection lock, that rustls has nothing more to send.
//! - What the reader makes rustls want to send (the alert of a failure) is sent by whoever
//!   holds the socket-write lock: the reader tries to take it; if the writer holds it, the writer
//!   sends those records before releasing it. Records therefore reach the socket in the order
//!   rustls made them, and two threads never interleave their bytes.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use rustls::Connection;

/// How much plaintext one `write` call hands rustls (bounds the connection-lock hold time).
const WRITE_CHUNK: usize = 256 * 1024;
/// Raw read buffer of the reader.
const READ_BUF: usize = 64 * 1024;
/// Bound on the write of the final close_notify when the session is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

pub(crate) struct State {
    pub(crate) conn: Connection,
    /// Set when TLS records were taken out of rustls but could not all be written: the stream
    /// is cut mid-record and nothing more may be sent.
    broken: bool,
}

pub(crate) struct Shared {
    /// Lock order: `wsock` before `state`.
    wsock: Mutex<TcpStream>,
    state: Mutex<State>,
}

fn poisoned() -> io::Error {
    io::Error::other("TLS session state poisoned by a panicked thread")
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "TLS session broken by an earlier failed write")
}

impl Shared {
    pub(crate) fn new(conn: Connection, wsock: TcpStream) -> Shared {
        Shared { wsock: Mutex::new(wsock), state: Mutex::new(State { conn, broken: false }) }
    }

    pub(crate) fn state(&self) -> io::Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| poisoned())
    }

    /// Sends everything rustls wants to send, holding the socket-write lock `sock`, which it
    /// releases (under the connection lock) once rustls has nothing more.
    fn drain(&self, sock: MutexGuard<'_, TcpStream>, buf: &mut Vec<u8>) -> io::Result<()> {
        let mut sock = sock;
        loop {
            let mut st = self.state()?;
            if !st.conn.wants_write() {
                drop(sock);
                return Ok(());
            }
            if st.broken {
                return Err(broken());
            }
            buf.clear();
            while st.conn.wants_write() {
                st.conn.write_tls(buf)?;
            }
            drop(st);
            if let Err(e) = sock.write_all(buf) {
                if let Ok(mut st) = self.state() {
                    st.broken = true;
                }
                return Err(e);
            }
        }
    }

    /// Sends what rustls wants to send if no other thread holds the socket-write lock (that
    /// thread sends it before releasing the lock).
    fn try_drain(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        match self.wsock.try_lock() {
            Ok(sock) => self.drain(sock, buf),
            Err(TryLockError::WouldBlock) => Ok(()),
            Err(TryLockError::Poisoned(_)) => Err(poisoned()),
        }
    }
}

impl Drop for Shared {
    /// Both halves are gone: send close_notify (bounded in time) so the peer reads a clean EOF.
    fn drop(&mut self) {
        let (Ok(sock), Ok(st)) = (self.wsock.get_mut(), self.state.get_mut()) else { return };
        if st.broken {
            return;
        }
        st.conn.send_close_notify();
        let mut buf = Vec::new();
        while st.conn.wants_write() {
            if st.conn.write_tls(&mut buf).is_err() {
                return;
            }
        }
        let _ = sock.set_write_timeout(Some(CLOSE_TIMEOUT));
        let _ = sock.write_all(&buf);
    }
}

/// The reading half.
pub(crate) struct TlsReader {
    shared: Arc<Shared>,
    sock: TcpStream,
    raw: Vec<u8>,
    pos: usize,
    len: usize,
    /// The socket reached EOF (and rustls was told).
    eof: bool,
    /// A fatal TLS error seen before: every later read repeats it.
    failed: Option<(io::ErrorKind, String)>,
    out: Vec<u8>,
}

impl TlsReader {
    pub(crate) fn new(shared: Arc<Shared>, sock: TcpStream) -> TlsReader {
        TlsReader { shared, sock, raw: vec![0; READ_BUF], pos: 0, len: 0, eof: false, failed: None, out: Vec::new() }
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        self.failed = Some((e.kind(), e.to_string()));
        // Best effort: let the peer see our alert.
        let _ = self.shared.try_drain(&mut self.out);
        e
    }

    /// Under the connection lock: plaintext if there is some (`Some(n)`, 0 for a clean
    /// close_notify), else feeds buffered raw bytes to rustls; `None` when more raw bytes are needed.
    fn step(&mut self, out: &mut [u8]) -> io::Result<(Option<usize>, bool)> {
        let mut st = self.shared.state()?;
        loop {
            match st.conn.reader().read(out) {
                Ok(n) => return Ok((Some(n), st.conn.wants_write())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.pos < self.len {
                let mut slice = &self.raw[self.pos..self.len];
                let n = st.conn.read_tls(&mut slice)?;
                self.pos += n;
            } else if self.eof {
                // Tell rustls (again: idempotent); it then reports close_notify or a truncation.
                st.conn.read_tls(&mut io::empty())?;
            } else {
                return Ok((None, st.conn.wants_write()));
            }
            if let Err(e) = st.conn.process_new_packets() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            if self.eof && self.pos >= self.len {
                // rustls knows everything there is; if it still has no answer, say truncation.
                match st.conn.reader().read(out) {
                    Ok(n) => return Ok((Some(n), st.conn.wants_write())),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed the connection"))
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if let Some((kind, msg)) = &self.failed {
            return Err(io::Error::new(*kind, msg.clone()));
        }
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let (got, wants_write) = match self.step(out) {
                Ok(r) => r,
                Err(e) => return Err(self.fail(e)),
            };
            if wants_write {
                // Whatever processing queued (rustls sends key-update replies with the next data).
                let _ = self.shared.try_drain(&mut self.out);
            }
            if let Some(n) = got {
                return Ok(n);
            }
            match self.sock.read(&mut self.raw) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.pos = 0;
                    self.len = n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A timeout is not fatal: the caller may read again.
                Err(e) => return Err(e),
            }
        }
    }
}

/// The writing half.
pub(crate) struct TlsWriter {
    shared: Arc<Shared>,
    buf: Vec<u8>,
}

impl TlsWriter {
    pub(crate) fn new(shared: Arc<Shared>) -> TlsWriter {
        TlsWriter { shared, buf: Vec::new() }
    }
}

impl Write for TlsWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let chunk = &data[..data.len().min(WRITE_CHUNK)];
        let sock = self.shared.wsock.lock().map_err(|_| poisoned())?;
        let n = {
            let mut st = self.shared.state()?;
            if st.broken {
                return Err(broken());
            }
            st.conn.writer().write(chunk)?
        };
        self.shared.drain(sock, &mut self.buf)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "the TLS session accepts no more data"));
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let sock = self.shared.wsock.lock().map_err(|_| poisoned())?;
        self.shared.drain(sock, &mut self.buf)
    }
}
