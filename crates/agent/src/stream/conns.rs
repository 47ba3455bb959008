//! The stream engine over several connections (protocol 7, `send --connections N`, the
//! tunnel's `connections`): the sender's [`Spread`] puts each chunk on the connection with room
//! (as the shared engine's [`crate::link::Links`] its page batches) and its control messages on
//! the first, each after a [`Message::StreamOrder`] that gives it a number of the chunks'
//! sequence; the receiver's [`Ordered`] reads every connection on threads of its own and hands
//! the rebuild one stream of frames in the order the relay queued them, by those numbers. The
//! first connection's other frames (resends, aborts) go at once; a frame there without a
//! number waits for the first connection's chunks and numbered messages before it. So the rebuilt stream, the mirrored cache and the
//! resends are the same as over one connection.
//!
//! What the receiver holds out of order is capped ([`REORDER_CAP`] bytes, [`REORDER_FRAMES`]
//! frames): a sender that runs further ahead fails the migration with an error that says so.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use livemig_wire::{Frame, FrameKind, Message, WireError};

use super::chunk::chunk_seq;
use crate::error::AgentError;
use crate::link::Out;

/// Most bytes of frames the receiver holds while an earlier chunk is missing: 8 times the
/// sender's window of unacknowledged stream ([`super::source::DEFAULT_WINDOW`]), which bounds
/// what a sender following the protocol can have on the way.
pub const REORDER_CAP: usize = 64 << 20;
/// Most frames held out of order (chunks can be small: a cap on bytes alone would let a
/// sender make the receiver keep millions of them).
pub const REORDER_FRAMES: usize = 1 << 16;

// ---- sender ----

/// Where the relay queues its frames: one connection, or several (see the module).
#[derive(Debug)]
pub struct Spread {
    conns: Vec<Sender<Out>>,
    next: usize,
}

impl Spread {
    /// Everything on one connection, in order (as before protocol 7: no markers).
    pub fn one(tx: Sender<Out>) -> Spread {
        Spread { conns: vec![tx], next: 0 }
    }

    /// Over `conns`, the first of which carries the control messages.
    pub fn new(conns: Vec<Sender<Out>>) -> Spread {
        assert!(!conns.is_empty(), "at least the first connection");
        Spread { conns, next: 0 }
    }

    fn closed(&self, i: usize) -> AgentError {
        let lost = AgentError::Wire(WireError::Closed);
        if i == 0 {
            return lost;
        }
        let n = u32::try_from(self.conns.len()).unwrap_or(u32::MAX);
        AgentError::DataConnection { index: u32::try_from(i).unwrap_or(u32::MAX), of: n, source: Box::new(lost) }
    }

    /// Queues a chunk (a `Stream` frame's payload) on the first connection with room from the
    /// one after the last used; when every queue is full, waits for the next one in turn.
    pub fn chunk(&mut self, payload: Vec<u8>) -> Result<(), AgentError> {
        let n = self.conns.len();
        let mut out = Out::Frame(FrameKind::Stream, payload);
        if n > 1 {
            for k in 0..n {
                let i = (self.next + k) % n;
                match self.conns[i].try_send(out) {
                    Ok(()) => {
                        self.next = (i + 1) % n;
                        return Ok(());
                    }
                    Err(TrySendError::Full(back)) => out = back,
                    Err(TrySendError::Disconnected(_)) => return Err(self.closed(i)),
                }
            }
        }
        let i = self.next % n;
        self.next = (i + 1) % n;
        self.conns[i].send(out).map_err(|_| self.closed(i))
    }

    /// Queues a control message on the first connection in its place after the chunks queued
    /// so far (`seq` is the next chunk's number): over several connections a
    /// [`Message::StreamOrder`] goes first and the message takes number `seq` (the next chunk
    /// gets the one after).
    pub fn control(&mut self, m: Message, seq: &mut u64) -> Result<(), AgentError> {
        if self.conns.len() > 1 {
            self.conns[0].send(Out::Message(Message::StreamOrder { seq: *seq })).map_err(|_| self.closed(0))?;
            *seq += 1;
        }
        self.conns[0].send(Out::Message(m)).map_err(|_| self.closed(0))
    }

    /// Items queued and room, over all connections (how far the link is behind).
    pub fn fill(&self) -> (usize, Option<usize>) {
        let len = self.conns.iter().map(Sender::len).sum();
        let cap = self.conns.iter().map(Sender::capacity).sum::<Option<usize>>();
        (len, cap)
    }
}

// ---- receiver ----

/// The receiver's order: chunks and numbered control messages by sequence number, the first
/// connection's other frames in their place there (see the module). Pure state, fed frames and
/// giving back those due.
#[derive(Debug)]
pub(crate) struct Reorder {
    /// Connections of the migration.
    n: u32,
    /// The next number due.
    next: u64,
    /// Chunks and numbered messages that came before their turn.
    early: BTreeMap<u64, Frame>,
    /// The first connection's frames not placed yet, in their order.
    first: VecDeque<Frame>,
    /// The number a `stream_order` just gave the first connection's next frame.
    numbered: Option<u64>,
    /// The first connection's frames without a number wait until everything below this is out
    /// (what came before them on that connection).
    barrier: u64,
    /// Payload bytes held (`early` and `first`).
    bytes: usize,
    cap: usize,
    /// When each connection's last frame came (or the start).
    last_seen: Vec<Instant>,
    /// Since when frames are held waiting for an earlier one.
    held_since: Option<Instant>,
}

fn size(f: &Frame) -> usize {
    f.payload.len() + livemig_wire::HEADER_LEN
}

/// The sequence number of a chunk frame.
fn seq_of(f: &Frame) -> Option<u64> {
    (f.kind == FrameKind::Stream).then(|| chunk_seq(&f.payload)).flatten()
}

impl Reorder {
    /// For `n` connections, holding at most `cap` bytes out of order.
    pub(crate) fn new(n: u32, cap: usize) -> Reorder {
        let now = Instant::now();
        Reorder {
            n,
            next: 0,
            early: BTreeMap::new(),
            first: VecDeque::new(),
            numbered: None,
            barrier: 0,
            bytes: 0,
            cap,
            last_seen: vec![now; n.max(1) as usize],
            held_since: None,
        }
    }

    fn seen(&mut self, conn: u32) {
        if let Some(t) = self.last_seen.get_mut(conn as usize) {
            *t = Instant::now();
        }
    }

    /// A connection that stalled: frames have waited `limit` for an earlier one, and the
    /// connection silent the longest has sent nothing for as long (it holds the one due).
    pub(crate) fn stalled(&self, now: Instant, limit: Duration) -> Option<AgentError> {
        let since = self.held_since?;
        if now.duration_since(since) < limit {
            return None;
        }
        let (index, last) = self.last_seen.iter().enumerate().min_by_key(|(_, t)| **t)?;
        if now.duration_since(*last) < limit {
            return None;
        }
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        Some(AgentError::DataConnection {
            index,
            of: self.n,
            source: Box::new(AgentError::Timeout {
                what: format!(
                    "connection {index}, silent while chunk {} was due and {} later frames were held (the connection stalled)",
                    self.next,
                    self.early.len() + self.first.len()
                ),
                secs: now.duration_since(*last).as_secs_f64(),
            }),
        })
    }

    fn hold(&mut self, f: &Frame) -> Result<(), AgentError> {
        self.bytes += size(f);
        let frames = self.early.len() + self.first.len() + 1;
        if self.bytes > self.cap || frames > REORDER_FRAMES {
            return Err(AgentError::Protocol {
                expected: format!(
                    "chunks at most {} MiB and {REORDER_FRAMES} frames ahead of the next one due (number {}), over {} connections",
                    self.cap >> 20,
                    self.next,
                    self.n
                ),
                got: format!("{} bytes in {frames} frames held: the reorder buffer's cap", self.bytes),
            });
        }
        Ok(())
    }

    fn insert(&mut self, seq: u64, f: Frame, conn: u32) -> Result<(), AgentError> {
        if seq < self.next || self.early.contains_key(&seq) {
            return Err(AgentError::Protocol {
                expected: format!("each number of the chunks' sequence once (next due: {})", self.next),
                got: format!("number {seq} again, on connection {conn}"),
            });
        }
        self.hold(&f)?;
        self.early.insert(seq, f);
        Ok(())
    }

    /// A frame from the first connection; `out` gets what is due now.
    pub(crate) fn on_first(&mut self, f: Frame, out: &mut Vec<Frame>) -> Result<(), AgentError> {
        let resend = f.kind == FrameKind::Stream && chunk_seq(&f.payload).is_none();
        if resend || crate::link::abort_reason(&f).is_some() {
            // Answers and aborts have no place in the order: at once.
            out.push(f);
            return Ok(());
        }
        self.seen(0);
        self.hold(&f)?;
        self.first.push_back(f);
        self.drain(out)
    }

    /// A frame from data connection `conn` (chunks only, or an abort).
    pub(crate) fn on_data(&mut self, conn: u32, f: Frame, out: &mut Vec<Frame>) -> Result<(), AgentError> {
        self.seen(conn);
        if crate::link::abort_reason(&f).is_some() {
            out.push(f);
            return Ok(());
        }
        let Some(seq) = seq_of(&f) else {
            let got = match f.kind {
                FrameKind::Control => f.message().map_or_else(|e| e.to_string(), |m| m.name().to_string()),
                k => format!("{k:?}"),
            };
            return Err(AgentError::DataConnection {
                index: conn,
                of: self.n,
                source: Box::new(AgentError::Protocol { expected: "stream chunks on a data connection".into(), got }),
            });
        };
        self.insert(seq, f, conn)?;
        self.drain(out)
    }

    fn drain(&mut self, out: &mut Vec<Frame>) -> Result<(), AgentError> {
        let r = self.drain_due(out);
        if self.early.is_empty() && self.first.is_empty() {
            self.held_since = None;
        } else if self.held_since.is_none() {
            self.held_since = Some(Instant::now());
        }
        r
    }

    fn drain_due(&mut self, out: &mut Vec<Frame>) -> Result<(), AgentError> {
        loop {
            while let Some(f) = self.early.remove(&self.next) {
                self.bytes -= size(&f);
                out.push(f);
                self.next += 1;
            }
            let Some(f) = self.first.front() else { return Ok(()) };
            // A chunk or a numbered message of the first connection takes its place at once;
            // what follows it there without a number waits for it.
            let seq = seq_of(f).or(self.numbered);
            if seq.is_none() && self.next < self.barrier {
                return Ok(());
            }
            let f = self.first.pop_front().expect("a front");
            self.bytes -= size(&f);
            if let Some(seq) = seq {
                if seq_of(&f).is_none() {
                    self.numbered = None;
                }
                self.barrier = self.barrier.max(seq + 1);
                self.insert(seq, f, 0)?;
                continue;
            }
            match (f.kind == FrameKind::Control).then(|| f.message()) {
                Some(Ok(Message::StreamOrder { seq })) => self.numbered = Some(seq),
                _ => out.push(f),
            }
        }
    }

    /// Bytes held out of order.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.bytes
    }
}

/// The receiver's connections as one stream of frames in order (see the module): a thread
/// puts them in order, a reader thread per data connection. Dropping it shuts the data
/// connections, so their readers end.
#[derive(Debug)]
pub(crate) struct Ordered {
    rx: Receiver<Result<Frame, AgentError>>,
    _sockets: crate::link::ShutOnDrop,
}

impl Ordered {
    /// Starts putting in order the frames of the first connection (`first`, read by a thread of
    /// the caller's) and of the data connections (their number, socket and reading half, past
    /// the `join`), `n` in all, holding at most `cap` bytes out of order; a connection that
    /// holds up the others for `stall` fails, named.
    pub(crate) fn start(
        first: Receiver<Result<Frame, WireError>>,
        data: Vec<(u32, TcpStream, Box<dyn Read + Send>)>,
        n: u32,
        (cap, stall): (usize, Duration),
    ) -> Result<Ordered, AgentError> {
        let (data_tx, data_rx) = bounded::<(u32, Result<Frame, WireError>)>(16);
        let mut sockets = Vec::new();
        let spawn_err = |e: std::io::Error| AgentError::Internal(format!("cannot start a connection's reader: {e}"));
        for (index, stream, mut reader) in data {
            sockets.push(stream);
            let tx = data_tx.clone();
            std::thread::Builder::new()
                .name(format!("livemig-data-{index}"))
                .spawn(move || loop {
                    let r = livemig_wire::read_frame(&mut reader);
                    let stop = r.is_err();
                    if tx.send((index, r)).is_err() || stop {
                        break;
                    }
                })
                .map_err(spawn_err)?;
        }
        drop(data_tx);
        let (tx, rx) = bounded(64);
        std::thread::Builder::new().name("livemig-order".into()).spawn(move || order(&first, &data_rx, n, (cap, stall), &tx)).map_err(spawn_err)?;
        Ok(Ordered { rx, _sockets: crate::link::ShutOnDrop(sockets) })
    }

    /// [`Ordered::start`] with the data connections as [`crate::arrival::accept_joins`] gave them,
    /// holding at most [`REORDER_CAP`] out of order, a stall bounded by the link's `timeout`.
    pub(crate) fn start_joined(
        first: Receiver<Result<Frame, WireError>>,
        joined: Vec<crate::arrival::Joined>,
        n: u32,
        timeout: Duration,
    ) -> Result<Ordered, AgentError> {
        let data = joined.into_iter().map(|j| (j.index, j.stream, Box::new(j.reader) as Box<dyn Read + Send>)).collect();
        Ordered::start(first, data, n, (REORDER_CAP, timeout))
    }

    /// The frames in order; an error (a connection lost, named, or out of order) ends them.
    pub(crate) fn frames(&self) -> &Receiver<Result<Frame, AgentError>> {
        &self.rx
    }
}

fn order(
    first: &Receiver<Result<Frame, WireError>>,
    data: &Receiver<(u32, Result<Frame, WireError>)>,
    n: u32,
    (cap, stall): (usize, Duration),
    tx: &Sender<Result<Frame, AgentError>>,
) {
    let mut r = Reorder::new(n, cap);
    // How often a stall is looked for.
    let tick = (stall / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut out = Vec::new();
    // With no data connections, `data` is disconnected at once: not selected then.
    let mut data_open = n > 1;
    loop {
        let step = if data_open {
            crossbeam_channel::select! {
                recv(first) -> f => match f {
                    Ok(Ok(f)) => r.on_first(f, &mut out),
                    Ok(Err(e)) => Err(AgentError::Wire(e)),
                    Err(_) => Err(AgentError::Wire(WireError::Closed)),
                },
                recv(data) -> d => match d {
                    Ok((conn, Ok(f))) => r.on_data(conn, f, &mut out),
                    Ok((conn, Err(e))) => Err(AgentError::DataConnection { index: conn, of: n, source: Box::new(AgentError::Wire(e)) }),
                    Err(_) => {
                        data_open = false;
                        Ok(())
                    }
                },
                default(tick) => r.stalled(Instant::now(), stall).map_or(Ok(()), Err),
            }
        } else {
            match first.recv() {
                Ok(Ok(f)) => r.on_first(f, &mut out),
                Ok(Err(e)) => Err(AgentError::Wire(e)),
                Err(_) => Err(AgentError::Wire(WireError::Closed)),
            }
        };
        for f in out.drain(..) {
            if tx.send(Ok(f)).is_err() {
                return;
            }
        }
        if let Err(e) = step {
            let _ = tx.send(Err(e));
            return;
        }
    }
}

#[cfg(test)]
mod tests;
