//! The connection between the agents: a writer thread with an optional rate cap, a reader thread,
//! both joined to the agent by bounded channels.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use livemig_wire::{read_frame, write_frame, write_message, Frame, FrameKind, Message, WireError};

use crate::error::AgentError;

/// Caps the rate of a writer (token bucket over a sliding window that restarts after idle time,
/// so a pause in sending does not buy a burst).
#[derive(Debug)]
pub struct RateLimited<W> {
    inner: W,
    rate: Option<u64>,
    window_start: Instant,
    window_bytes: u64,
    last: Instant,
}

impl<W: Write> RateLimited<W> {
    /// Wraps `inner`; `rate` in bytes per second, `None` for no cap.
    pub fn new(inner: W, rate: Option<u64>) -> Self {
        let now = Instant::now();
        RateLimited { inner, rate, window_start: now, window_bytes: 0, last: now }
    }
}

const CHUNK: usize = 64 * 1024;

/// Written `Pages` payloads kept for reuse.
const RECYCLED: usize = 4;

impl<W: Write> Write for RateLimited<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(rate) = self.rate else { return self.inner.write(buf) };
        let now = Instant::now();
        if now.duration_since(self.last) > Duration::from_millis(100) {
            self.window_start = now;
            self.window_bytes = 0;
        }
        let due = self.window_start + Duration::from_secs_f64(self.window_bytes as f64 / rate as f64);
        if due > now {
            std::thread::sleep(due - now);
        }
        let n = self.inner.write(&buf[..buf.len().min(CHUNK)])?;
        self.window_bytes += n as u64;
        self.last = Instant::now();
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Something for the writer thread to send.
#[derive(Debug)]
pub enum Out {
    /// A raw frame.
    Frame(FrameKind, Vec<u8>),
    /// A control message.
    Message(Message),
    /// Flush and report what was written since the previous marker.
    Marker,
}

/// What the writer did between two markers.
#[derive(Debug, Clone, Copy)]
pub struct MarkerAck {
    /// Bytes written.
    pub bytes: u64,
    /// From the first write after the previous marker to this one.
    pub active: Duration,
}

/// The sending half, run by a thread.
#[derive(Debug)]
pub struct Writer {
    tx: Option<Sender<Out>>,
    recycled: Receiver<Vec<u8>>,
    acks: Receiver<MarkerAck>,
    total: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<(), WireError>>>,
}

impl Writer {
    /// Starts the writer thread.
    pub fn spawn(stream: Box<dyn Write + Send>, rate: Option<u64>) -> Writer {
        let (tx, rx) = bounded::<Out>(16);
        let (ack_tx, acks) = bounded::<MarkerAck>(4);
        let (recycle_tx, recycled) = bounded::<Vec<u8>>(RECYCLED);
        let total = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&total);
        let handle = std::thread::Builder::new()
            .name("livemig-writer".into())
            .spawn(move || {
                let mut w = CountingWriter { inner: RateLimited::new(stream, rate), count: counter };
                let mut since_marker = 0u64;
                let mut first: Option<Instant> = None;
                for item in rx {
                    let before = w.count.load(Ordering::Relaxed);
                    let t0 = Instant::now();
                    match item {
                        Out::Frame(kind, payload) => {
                            write_frame(&mut w, kind, &payload)?;
                            if kind == FrameKind::Pages {
                                // Nobody taking them back is fine: the buffer is then dropped.
                                let _ = recycle_tx.try_send(payload);
                            }
                        }
                        Out::Message(m) => write_message(&mut w, &m)?,
                        Out::Marker => {
                            w.flush().map_err(|source| WireError::Io { what: "sending", source })?;
                            let active = first.map_or(Duration::ZERO, |f| f.elapsed());
                            let _ = ack_tx.send(MarkerAck { bytes: since_marker, active });
                            since_marker = 0;
                            first = None;
                            continue;
                        }
                    }
                    first.get_or_insert(t0);
                    since_marker += w.count.load(Ordering::Relaxed) - before;
                }
                w.flush().map_err(|source| WireError::Io { what: "sending", source })?;
                Ok(())
            })
            .expect("spawn writer thread");
        Writer { tx: Some(tx), recycled, acks, total, handle: Some(handle) }
    }

    /// Queues an item; fails with the writer's own error if it stopped.
    pub fn send(&mut self, out: Out) -> Result<(), AgentError> {
        let ok = self.tx.as_ref().is_some_and(|tx| tx.send(out).is_ok());
        if ok {
            Ok(())
        } else {
            Err(self.failure())
        }
    }

    /// Queues an item if there is room now; gives it back if the queue is full (the connection
    /// is behind), fails with the writer's own error if it stopped.
    pub fn try_send(&mut self, out: Out) -> Result<Option<Out>, AgentError> {
        let Some(tx) = self.tx.as_ref() else { return Err(self.failure()) };
        match tx.try_send(out) {
            Ok(()) => Ok(None),
            Err(crossbeam_channel::TrySendError::Full(out)) => Ok(Some(out)),
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => Err(self.failure()),
        }
    }

    /// Waits until everything queued before is written; returns what was written since the last marker.
    pub fn marker(&mut self, timeout: Duration) -> Result<MarkerAck, AgentError> {
        self.send(Out::Marker)?;
        self.marker_ack(timeout, "the connection to drain")
    }

    /// The acknowledgement of a marker queued before (`what` names the wait in a timeout).
    fn marker_ack(&mut self, timeout: Duration, what: &str) -> Result<MarkerAck, AgentError> {
        match self.acks.recv_timeout(timeout) {
            Ok(a) => Ok(a),
            Err(RecvTimeoutError::Timeout) => Err(AgentError::Timeout { what: what.into(), secs: timeout.as_secs_f64() }),
            Err(RecvTimeoutError::Disconnected) => Err(self.failure()),
        }
    }

    /// Another producer of frames for this connection (e.g. a relay thread); frames from all
    /// producers go out in the order they were queued.
    pub fn sender(&self) -> Sender<Out> {
        self.tx.clone().unwrap_or_else(|| bounded(0).0)
    }

    /// The payloads of `Pages` frames written since the last call (at most a few), to be
    /// reused for the next batches ([`livemig_compact::Encoder::recycle`]).
    pub fn recycled(&self) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.recycled.try_iter()
    }

    /// Bytes written so far.
    pub fn total_bytes(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    fn failure(&mut self) -> AgentError {
        self.tx = None;
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => AgentError::Wire(e),
            Some(Err(_)) => AgentError::Wire(WireError::Closed),
            _ => AgentError::Wire(WireError::Closed),
        }
    }

    /// Flushes and stops the thread.
    pub fn finish(mut self) -> Result<(), AgentError> {
        self.tx = None;
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r.map_err(AgentError::Wire),
            Some(Err(_)) => Err(AgentError::Wire(WireError::Closed)),
            None => Ok(()),
        }
    }
}

/// The sender's connections to the receiver. The first carries the control messages, the
/// device state and its share of the pages; the others (protocol 6, `send --connections`) carry
/// only pages and, at the end of each iteration, a [`Message::Fence`]. Each has its own writer
/// thread (its own TLS session, so encryption runs on as many threads). A batch goes to the
/// first connection from the last one used on whose queue there is room: a slow connection gets
/// fewer batches rather than holding the others back.
#[derive(Debug)]
pub struct Links {
    conns: Vec<Writer>,
    next: usize,
}

impl Links {
    /// One connection, `control`.
    pub fn new(control: Writer) -> Links {
        Links { conns: vec![control], next: 0 }
    }

    /// Adds a data connection.
    pub fn add(&mut self, data: Writer) {
        self.conns.push(data);
    }

    /// Connections, the first included.
    pub fn count(&self) -> usize {
        self.conns.len()
    }

    /// The first connection's writer (control messages, device state).
    pub fn control(&mut self) -> &mut Writer {
        &mut self.conns[0]
    }

    /// Queues a control message or frame on the first connection.
    pub fn send(&mut self, out: Out) -> Result<(), AgentError> {
        self.conns[0].send(out)
    }

    /// Queues a batch of pages on the next connection with room (see the type).
    pub fn send_pages(&mut self, payload: Vec<u8>) -> Result<(), AgentError> {
        let n = self.conns.len();
        let mut out = Out::Frame(FrameKind::Pages, payload);
        if n > 1 {
            for k in 0..n {
                let i = (self.next + k) % n;
                match self.conns[i].try_send(out)? {
                    None => {
                        self.next = (i + 1) % n;
                        return Ok(());
                    }
                    Some(back) => out = back,
                }
            }
        }
        // Every queue is full (or one connection): wait for the next one in turn.
        let i = self.next % n;
        self.next = (i + 1) % n;
        self.conns[i].send(out)
    }

    /// Ends iteration `index` on the data connections: a fence on each (the first connection's
    /// `IterationEnd` is its own).
    pub fn fence(&mut self, index: u32) -> Result<(), AgentError> {
        for w in &mut self.conns[1..] {
            w.send(Out::Message(Message::Fence { index }))?;
        }
        Ok(())
    }

    /// [`Writer::marker`] on every connection: the bytes of all, the longest active time.
    pub fn marker(&mut self, timeout: Duration) -> Result<MarkerAck, AgentError> {
        for w in &mut self.conns[1..] {
            w.send(Out::Marker)?;
        }
        let mut ack = self.conns[0].marker(timeout)?;
        for w in &mut self.conns[1..] {
            let a = w.marker_ack(timeout, "a data connection to drain")?;
            ack.bytes += a.bytes;
            ack.active = ack.active.max(a.active);
        }
        Ok(ack)
    }

    /// Another producer for every connection, the first one first (the stream engine's relay
    /// thread spreads its chunks over them: `crate::stream::conns::Spread`).
    pub fn senders(&self) -> Vec<Sender<Out>> {
        self.conns.iter().map(Writer::sender).collect()
    }

    /// The error of a connection whose writer stopped (its socket failed), if one did: a data
    /// connection's names it. For a loop that does not write itself (the stream engine's relay
    /// writes on a thread of its own) and must still see a connection go.
    pub fn failed(&mut self) -> Option<AgentError> {
        let of = u32::try_from(self.conns.len()).unwrap_or(u32::MAX);
        let i = self.conns.iter().position(|w| w.tx.is_some() && w.handle.as_ref().is_some_and(JoinHandle::is_finished))?;
        let e = self.conns[i].failure();
        Some(match i {
            0 => e,
            i => AgentError::DataConnection { index: u32::try_from(i).unwrap_or(u32::MAX), of, source: Box::new(e) },
        })
    }

    /// Page batch buffers written on any connection, for reuse ([`Writer::recycled`]).
    pub fn recycled(&self) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.conns.iter().flat_map(Writer::recycled)
    }

    /// Every connection's queue is at least half full: the link (or the connections' TLS
    /// threads), not the encoder, holds the pages back.
    pub fn backlogged(&self) -> bool {
        self.conns.iter().all(|w| w.tx.as_ref().is_some_and(|tx| tx.capacity().is_some_and(|c| tx.len() * 2 >= c)))
    }

    /// Bytes written so far on all connections.
    pub fn total_bytes(&self) -> u64 {
        self.conns.iter().map(Writer::total_bytes).sum()
    }

    /// Flushes and stops every writer thread; the first error.
    pub fn finish(self) -> Result<(), AgentError> {
        let mut first = Ok(());
        for w in self.conns {
            let r = w.finish();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

struct CountingWriter<W> {
    inner: W,
    count: Arc<AtomicU64>,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads frames on a thread, up to `ahead` of the consumer; the first error ends it.
pub fn read_frames<R: Read + Send + 'static>(mut stream: R, ahead: usize) -> Receiver<Result<Frame, WireError>> {
    let (tx, rx) = bounded(ahead);
    std::thread::Builder::new()
        .name("livemig-reader".into())
        .spawn(move || loop {
            let r = read_frame(&mut stream);
            let stop = r.is_err();
            if tx.send(r).is_err() || stop {
                break;
            }
        })
        .expect("spawn reader thread");
    rx
}

/// Frames from the peer, read by a thread.
#[derive(Debug)]
pub struct Inbox {
    rx: Receiver<Result<Frame, WireError>>,
    peer: &'static str,
}

impl Inbox {
    /// Starts the reader thread.
    pub fn spawn(stream: Box<dyn Read + Send>, peer: &'static str) -> Inbox {
        Inbox { rx: read_frames(stream, 64), peer }
    }

    fn convert(&self, r: Result<Frame, WireError>) -> Result<Message, AgentError> {
        let m = r?.message()?;
        if let Message::Abort { reason } = m {
            return Err(AgentError::PeerAborted { peer: self.peer, reason });
        }
        Ok(m)
    }

    /// The next control message; an `Abort` from the peer becomes an error.
    pub fn next(&self, timeout: Duration, what: &str) -> Result<Message, AgentError> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => self.convert(r),
            Err(RecvTimeoutError::Timeout) => {
                Err(AgentError::Timeout { what: what.to_string(), secs: timeout.as_secs_f64() })
            }
            Err(RecvTimeoutError::Disconnected) => Err(AgentError::Wire(WireError::Closed)),
        }
    }

    /// The next control message if one has arrived; does not wait. An `Abort` or a broken
    /// connection is an error.
    pub fn poll(&self) -> Result<Option<Message>, AgentError> {
        match self.rx.try_recv() {
            Ok(r) => self.convert(r).map(Some),
            Err(crossbeam_channel::TryRecvError::Empty) => Ok(None),
            Err(crossbeam_channel::TryRecvError::Disconnected) => Err(AgentError::Wire(WireError::Closed)),
        }
    }
}

/// The reason of an `abort` frame; `None` for any other frame.
pub(crate) fn abort_reason(f: &Frame) -> Option<String> {
    match f.message() {
        Ok(Message::Abort { reason }) => Some(reason),
        _ => None,
    }
}

/// The sockets of a migration's data connections, shut down when dropped, so the threads
/// reading them end (the receiver's `apply::DataConnections` and `stream::conns::Ordered`).
#[derive(Debug, Default)]
pub(crate) struct ShutOnDrop(pub(crate) Vec<TcpStream>);

impl Drop for ShutOnDrop {
    fn drop(&mut self) {
        for s in &self.0 {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Connects to `addr`, retrying while the peer is not listening yet, until `timeout`.
pub fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, AgentError> {
    let deadline = Instant::now() + timeout;
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| AgentError::Network { what: format!("cannot resolve {addr}"), source })?
        .collect();
    let first = *addrs.first().ok_or_else(|| AgentError::Incompatible(format!("{addr} resolves to no address")))?;
    loop {
        match TcpStream::connect_timeout(&first, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline && matches!(e.kind(), io::ErrorKind::ConnectionRefused) => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(source) => {
                return Err(AgentError::Network { what: format!("cannot connect to the receiver at {addr}"), source })
            }
        }
    }
}

/// Socket settings both agents use.
pub fn tune(s: &TcpStream, timeout: Duration) -> Result<(), AgentError> {
    let net = |source| AgentError::Network { what: "cannot configure the socket".into(), source };
    s.set_nodelay(true).map_err(net)?;
    s.set_read_timeout(Some(timeout)).map_err(net)?;
    s.set_write_timeout(Some(timeout)).map_err(net)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_holds_the_rate() {
        // 2 MB at 8 MB/s takes at least ~0.25 s (a lower bound, not a timing threshold on speed)
        let mut w = RateLimited::new(io::sink(), Some(8_000_000));
        let t = Instant::now();
        let buf = vec![0u8; 100_000];
        for _ in 0..20 {
            w.write_all(&buf).unwrap();
        }
        assert!(t.elapsed() >= Duration::from_millis(240), "{:?}", t.elapsed());
    }

    #[test]
    fn writer_reports_bytes_between_markers() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut w = Writer::spawn(Box::new(a), None);
        let reader = std::thread::spawn(move || {
            let mut b = b;
            let mut v = Vec::new();
            b.read_to_end(&mut v).unwrap();
            v.len()
        });
        w.send(Out::Frame(FrameKind::Pages, vec![1; 1000])).unwrap();
        let ack = w.marker(Duration::from_secs(5)).unwrap();
        assert_eq!(ack.bytes, 1000 + 16);
        w.send(Out::Message(Message::Commit)).unwrap();
        let ack = w.marker(Duration::from_secs(5)).unwrap();
        assert!(ack.bytes > 16);
        let total = w.total_bytes();
        w.finish().unwrap();
        assert_eq!(reader.join().unwrap() as u64, total);
    }

    /// An abort reason with terminal escapes, a CR and a newline reaches the operator escaped.
    #[test]
    fn a_peer_abort_reason_is_printed_escaped() {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let inbox = Inbox::spawn(Box::new(b), "destination");
        let reason = "disk full\x1b[2J\r\nlivemig: migration completed".to_string();
        write_message(&mut a, &Message::Abort { reason }).unwrap();
        let e = inbox.next(Duration::from_secs(5), "the abort").unwrap_err();
        assert!(matches!(e, AgentError::PeerAborted { peer: "destination", .. }), "{e:?}");
        let shown = e.to_string();
        assert_eq!(
            shown,
            "the destination aborted the migration: disk full\\u{1b}[2J\\r\\nlivemig: migration completed"
        );
        assert!(!e.chain().chars().any(char::is_control), "{}", e.chain());
    }

    /// A data connection whose writer failed (its peer gone) is found by `Links::failed`, named
    /// by its number; healthy connections are not.
    #[test]
    fn links_name_a_failed_data_connection() {
        let (a, _keep) = std::os::unix::net::UnixStream::pair().unwrap();
        let (b, gone) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(gone);
        let mut links = Links::new(Writer::spawn(Box::new(a), None));
        links.add(Writer::spawn(Box::new(b), None));
        assert!(links.failed().is_none(), "nothing written yet: nothing failed");
        let data = links.senders().pop().unwrap();
        // Written until the writer thread notices its peer is gone (its channel then closes).
        let deadline = Instant::now() + Duration::from_secs(10);
        while data.send(Out::Frame(FrameKind::Stream, vec![0; 100_000])).is_ok() && Instant::now() < deadline {}
        let e = loop {
            if let Some(e) = links.failed() {
                break e;
            }
            assert!(Instant::now() < deadline, "the failed data connection was never found");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(matches!(e, AgentError::DataConnection { index: 1, of: 2, .. }), "{e:?}");
        assert!(e.chain().starts_with("data connection 1 of 2 failed"), "{}", e.chain());
        assert!(links.failed().is_none(), "reported once; the first connection is fine");
    }

    #[test]
    fn writer_error_surfaces() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(b);
        let mut w = Writer::spawn(Box::new(a), None);
        let mut failed = false;
        for _ in 0..100 {
            if w.send(Out::Frame(FrameKind::Pages, vec![0; 100_000])).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed || w.marker(Duration::from_secs(5)).is_err());
    }
}
