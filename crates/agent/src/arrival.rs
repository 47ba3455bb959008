//! Waiting for the sender on the receiver's port: connections that are not a livemig sender (a
//! port scanner, a garbage client, a peer that fails the TLS handshake, one that stalls) are
//! refused, logged and reported, and the receiver keeps listening until an authenticated sender
//! has said hello. Then the port is closed (the caller drops the listener), so every later
//! connection is refused by the kernel; a migration over several connections (protocol 6) first
//! waits the same way for its data connections ([`accept_joins`]), each of which must present
//! the migration's secret.
//!
//! Each connection's handshake runs on a thread of its own, bounded in time
//! ([`HANDSHAKE_BOUND`]: its socket is shut down when it is over) and in number
//! ([`MAX_PENDING`] at once; more are closed at once), so neither a slow nor a flooding client
//! can keep the real sender out for longer than that.

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use livemig_wire::Message;
use serde::{Deserialize, Serialize};

use crate::error::AgentError;
use crate::transport::{self, Channel, Transport};
use crate::{link, Observer, Progress};

/// Longest a connection may take from `accept` to its hello (TLS handshake included).
pub(crate) const HANDSHAKE_BOUND: Duration = Duration::from_secs(10);
/// Connections in their handshake at once; one more is closed at once.
pub(crate) const MAX_PENDING: usize = 8;
/// Refused connections kept in the report (the count goes on).
const MAX_REPORTED: usize = 32;

/// A connection refused while waiting for the sender.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusedConnection {
    /// The peer's address.
    pub peer: String,
    /// Why (a failed TLS handshake, a wrong magic, no hello within the bound ...).
    pub reason: String,
}

/// Counts bytes read from the peer.
pub(crate) struct Counting<R> {
    pub(crate) inner: R,
    pub(crate) count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// An authenticated sender that said hello.
pub(crate) struct Arrival {
    pub(crate) stream: TcpStream,
    /// The channel's reader, past the magic and the hello, counting from the first byte.
    pub(crate) reader: Counting<Box<dyn Read + Send>>,
    pub(crate) writer: Box<dyn std::io::Write + Send>,
    /// Who the transport says the peer is.
    pub(crate) peer: String,
    /// The page key exported from the TLS session; `None` on a plain link.
    pub(crate) tls_key: Option<[u8; livemig_tls::PAGE_KEY_LEN]>,
    pub(crate) hello: Message,
}

/// What [`accept_sender`] needs.
pub(crate) struct Wait<'a> {
    pub(crate) transport: &'a Transport,
    /// The link's timeout, set on the sender's socket once it arrived.
    pub(crate) timeout: Duration,
    /// Longest wait for a sender.
    pub(crate) accept_timeout: Duration,
    /// Bound of one connection's handshake.
    pub(crate) handshake_bound: Duration,
    pub(crate) cancel: &'a AtomicBool,
    /// Set when the sender went away or gave up on its first connection (read while its data
    /// connections are awaited: [`accept_joins_watching`]).
    pub(crate) peer_gone: Option<&'a AtomicBool>,
    /// Who is awaited, for messages ("the sender", "the tunnel's sender").
    pub(crate) who: &'a str,
}

impl<'a> Wait<'a> {
    /// A wait for `who` with the link's `timeout` and `accept_timeout`; each handshake bounded
    /// by [`HANDSHAKE_BOUND`], or `timeout` if shorter.
    pub(crate) fn new(transport: &'a Transport, (timeout, accept_timeout): (Duration, Duration), cancel: &'a AtomicBool, who: &'a str) -> Self {
        Wait { transport, timeout, accept_timeout, handshake_bound: HANDSHAKE_BOUND.min(timeout), cancel, peer_gone: None, who }
    }
}

/// An authenticated sender as a receiver goes on with it: its page key settled.
pub(crate) struct Arrived {
    pub(crate) stream: TcpStream,
    pub(crate) reader: Counting<Box<dyn Read + Send>>,
    pub(crate) writer: Box<dyn std::io::Write + Send>,
    pub(crate) hello: Message,
    /// The migration's page key: from the TLS session, or chosen here.
    pub(crate) key: livemig_compact::PageKey,
    /// The key as the `welcome` carries it (plain link only).
    pub(crate) welcome_key: Option<String>,
}

/// [`accept_sender`] for a receiver: the refusals, the peer and the page key go to `report`
/// (and the key's provenance to `obs`).
pub(crate) fn receive_sender(listener: &TcpListener, w: &Wait<'_>, obs: &mut dyn Observer, report: &mut crate::report::Report) -> Result<Arrived, AgentError> {
    let Arrival { stream, reader, writer, peer, tls_key, hello } =
        accept_sender(listener, w, obs, &mut report.refused_connections, &mut report.refused_connections_total)?;
    report.peer = Some(peer);
    let (key, welcome_key) = transport::receiver_page_key(tls_key)?;
    transport::report_page_key(report, obs, &key, tls_key.is_some());
    Ok(Arrived { stream, reader, writer, hello, key, welcome_key })
}

struct Pending {
    id: u64,
    since: Instant,
    socket: TcpStream,
}

type Outcome = (u64, SocketAddr, Result<Box<Arrival>, String>);

/// Accepts connections on `listener` until one is an authenticated sender that said hello, and
/// returns it. Every refused connection is said to `obs` and pushed to `refused`.
pub(crate) fn accept_sender(
    listener: &TcpListener,
    w: &Wait<'_>,
    obs: &mut dyn Observer,
    refused: &mut Vec<RefusedConnection>,
    refused_count: &mut u64,
) -> Result<Arrival, AgentError> {
    let mut got = accept(listener, w, obs, (refused, refused_count), &First::Hello, 1)?;
    Ok(got.pop().expect("one arrival"))
}

/// A data connection of the migration (protocol 6).
pub(crate) struct Joined {
    /// Its number, 1 to `n - 1`.
    pub(crate) index: u32,
    pub(crate) stream: TcpStream,
    pub(crate) reader: Counting<Box<dyn Read + Send>>,
}

/// The bytes read so far on a migration's first connection and on each of its data connections
/// (their [`Counting`] readers' counts), for the report's `wire_bytes`.
pub(crate) struct WireCounts(Vec<Arc<AtomicU64>>);

impl WireCounts {
    pub(crate) fn new(first: &Arc<AtomicU64>, joined: &[Joined]) -> WireCounts {
        WireCounts(std::iter::once(Arc::clone(first)).chain(joined.iter().map(|j| Arc::clone(&j.reader.count))).collect())
    }

    /// Their sum so far.
    pub(crate) fn total(&self) -> u64 {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// Accepts the `n - 1` data connections of a migration on `listener`, as [`accept_sender`] its
/// first: each authenticated by the transport, and its first message a `join` with `token` and a
/// number from 1 to `n - 1` not taken yet. Anything else is refused (said and reported) and the
/// wait goes on, up to the link's timeout. Returned in connection order.
pub(crate) fn accept_joins(
    listener: &TcpListener,
    w: &Wait<'_>,
    token: &str,
    n: u32,
    obs: &mut dyn Observer,
    report: &mut crate::report::Report,
) -> Result<Vec<Joined>, AgentError> {
    let w = Wait { accept_timeout: w.timeout, who: "the sender's data connections", ..*w };
    let first = First::Join { token: token.to_string(), n };
    let refused = (&mut report.refused_connections, &mut report.refused_connections_total);
    let got = accept(listener, &w, obs, refused, &first, usize::try_from(n - 1).unwrap_or(0))?;
    let mut joined = Vec::with_capacity(got.len());
    for a in got {
        let Message::Join { index, .. } = a.hello else { unreachable!("checked in the handshake") };
        // A data connection may rest while the others carry an iteration: waits are bounded by
        // the first connection's and the fences' timeouts instead.
        a.stream
            .set_read_timeout(None)
            .map_err(|source| AgentError::Network { what: "cannot configure a data connection".into(), source })?;
        joined.push(Joined { index, stream: a.stream, reader: a.reader });
    }
    joined.sort_by_key(|j| j.index);
    Ok(joined)
}

/// [`accept_joins`] while the sender's first connection is read: a sender that gives up on its
/// data connections says so there (an `abort`), and that ends the wait at once with its reason,
/// as does the first connection closing, instead of the link's timeout. A frame that arrives there
/// otherwise (the sender starts as soon as its own joins are written) is put back: the caller
/// reads it next.
pub(crate) fn accept_joins_watching(
    listener: &TcpListener,
    w: &Wait<'_>,
    (token, n): (&str, u32),
    (first, socket): (&mut Counting<Box<dyn Read + Send>>, &TcpStream),
    obs: &mut dyn Observer,
    report: &mut crate::report::Report,
) -> Result<Vec<Joined>, AgentError> {
    let gone = AtomicBool::new(false);
    let inner = &mut first.inner;
    let (joined, frame) = std::thread::scope(|s| {
        let watcher = std::thread::Builder::new()
            .name("livemig-first-conn".into())
            .spawn_scoped(s, || {
                let r = livemig_wire::read_frame(inner);
                if r.as_ref().map_or(true, |f| link::abort_reason(f).is_some()) {
                    gone.store(true, Ordering::Relaxed);
                }
                r
            })
            .map_err(|source| AgentError::Network { what: "cannot start the first connection's reader".into(), source })?;
        let w = Wait { peer_gone: Some(&gone), ..*w };
        let joined = accept_joins(listener, &w, token, n, obs, report);
        let joined = match joined {
            // The wait failed on its own: the watcher's read must end (the sender may still be
            // told why on the writing half), and the wait's error is the answer.
            Err(e) if !gone.load(Ordering::Relaxed) => {
                let _ = socket.shutdown(Shutdown::Read);
                Err(Some(e))
            }
            // The watcher ended it: its frame or error says why.
            Err(_) => Err(None),
            Ok(j) => Ok(j),
        };
        let frame = watcher.join().map_err(|_| AgentError::Protocol { expected: "a frame".into(), got: "a panic reading it".into() })?;
        Ok::<_, AgentError>((joined, frame))
    })?;
    let (joined, f) = match (joined, frame) {
        (Err(Some(e)), _) => return Err(e),
        (_, Err(e)) => return Err(AgentError::Wire(e)),
        (joined, Ok(f)) => (joined, f),
    };
    match (link::abort_reason(&f), joined) {
        (Some(reason), _) => Err(AgentError::PeerAborted { peer: "source", reason }),
        // The watcher ends the wait only with an abort or an error.
        (None, Err(_)) => Err(AgentError::Protocol { expected: "an abort".into(), got: format!("a {:?} frame", f.kind) }),
        (None, Ok(joined)) => {
            // Put back in front of the rest of the connection, as it came.
            let mut bytes = Vec::with_capacity(f.payload.len() + livemig_wire::HEADER_LEN);
            livemig_wire::write_frame(&mut bytes, f.kind, &f.payload)?;
            let rest = std::mem::replace(&mut first.inner, Box::new(std::io::empty()));
            first.inner = Box::new(std::io::Cursor::new(bytes).chain(rest));
            Ok(joined)
        }
    }
}

/// Equal, compared in time that depends on the lengths only.
fn equal_secrets(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the first message of an accepted connection must be.
enum First {
    /// A sender's hello.
    Hello,
    /// A data connection's join with this secret and a number below `n`.
    Join { token: String, n: u32 },
}

impl First {
    fn check(&self, m: Message) -> Result<Message, String> {
        match (self, m) {
            (First::Hello, m @ Message::Hello { .. }) => Ok(m),
            (First::Join { token, n }, m @ Message::Join { .. }) => {
                let Message::Join { token: t, index } = &m else { unreachable!() };
                // Compared in constant time: the secret is what admits a connection.
                if !equal_secrets(t.as_bytes(), token.as_bytes()) {
                    return Err("a join with the wrong secret".into());
                }
                if *index == 0 || index >= n {
                    return Err(format!("a join as connection {index} (this migration has {n})"));
                }
                Ok(m)
            }
            (First::Hello, other) => Err(format!("not a livemig sender: its first message was `{}`, not hello", other.name())),
            (First::Join { .. }, other) => Err(format!("not a data connection of this migration: its first message was `{}`, not join", other.name())),
        }
    }
}

/// Accepts connections on `listener` until `want` of them are authenticated and their first
/// message passed `first`; the refused ones are said and reported.
fn accept(
    listener: &TcpListener,
    w: &Wait<'_>,
    obs: &mut dyn Observer,
    (refused, refused_count): (&mut Vec<RefusedConnection>, &mut u64),
    first: &First,
    want: usize,
) -> Result<Vec<Arrival>, AgentError> {
    let net = |source| AgentError::Network { what: format!("cannot accept {}'s connection", w.who), source };
    listener.set_nonblocking(true).map_err(net)?;
    let deadline = Instant::now() + w.accept_timeout;
    let (tx, rx) = mpsc::channel::<Outcome>();
    let mut pending: Vec<Pending> = Vec::new();
    let mut next_id = 0u64;
    let mut refuse = |obs: &mut dyn Observer, peer: String, reason: String| {
        obs.progress(Progress::Phase(&format!("refused a connection from {peer}: {reason}; still waiting for {}", w.who)));
        *refused_count += 1;
        if refused.len() < MAX_REPORTED {
            refused.push(RefusedConnection { peer, reason });
        }
    };
    let mut arrived: Vec<Arrival> = Vec::new();
    let result = loop {
        // The handshakes that ended, in the order they ended.
        while let Ok((id, addr, r)) = rx.try_recv() {
            pending.retain(|p| p.id != id);
            match r {
                Ok(a) if arrived.len() < want => {
                    let taken = matches!(&a.hello, Message::Join { index, .. }
                        if arrived.iter().any(|b| matches!(&b.hello, Message::Join { index: i, .. } if i == index)));
                    if taken {
                        refuse(obs, addr.to_string(), "a join as a connection that had already joined".into());
                    } else {
                        arrived.push(*a);
                    }
                }
                // A second sender that finished in the same instant: the first one wins.
                Ok(_) => refuse(obs, addr.to_string(), format!("{} had already arrived", w.who)),
                Err(reason) => refuse(obs, addr.to_string(), reason),
            }
        }
        if arrived.len() >= want {
            break Ok(std::mem::take(&mut arrived));
        }
        // Handshakes over their bound: their sockets are shut, their threads then report.
        for p in &pending {
            if p.since.elapsed() > w.handshake_bound {
                let _ = p.socket.shutdown(Shutdown::Both);
            }
        }
        if w.cancel.load(Ordering::Relaxed) {
            break Err(AgentError::Cancelled);
        }
        if w.peer_gone.is_some_and(|g| g.load(Ordering::Relaxed)) {
            break Err(AgentError::Wire(livemig_wire::WireError::Closed));
        }
        match listener.accept() {
            Ok((s, addr)) => {
                if pending.len() >= MAX_PENDING {
                    let _ = s.shutdown(Shutdown::Both);
                    refuse(obs, addr.to_string(), format!("{MAX_PENDING} connections were already in their handshake"));
                    continue;
                }
                let socket = match s.try_clone() {
                    Ok(c) => c,
                    Err(e) => {
                        refuse(obs, addr.to_string(), format!("cannot use the connection: {e}"));
                        continue;
                    }
                };
                next_id += 1;
                let id = next_id;
                pending.push(Pending { id, since: Instant::now(), socket });
                let (tx, transport, bound, timeout) = (tx.clone(), w.transport.clone(), w.handshake_bound, w.timeout);
                let first = match first {
                    First::Hello => First::Hello,
                    First::Join { token, n } => First::Join { token: token.clone(), n: *n },
                };
                let spawned = std::thread::Builder::new()
                    .name("livemig-arrival".into())
                    .spawn(move || {
                        let r = handshake(s, &transport, bound, timeout, &first).map(Box::new);
                        let _ = tx.send((id, addr, r));
                    });
                if let Err(e) = spawned {
                    pending.retain(|p| p.id != id);
                    refuse(obs, addr.to_string(), format!("cannot start its handshake thread: {e}"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    break Err(AgentError::Timeout { what: format!("{} to connect", w.who), secs: w.accept_timeout.as_secs_f64() });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // A connection that was reset while queued, or the like: not the listener's end.
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::Interrupted) => {}
            Err(e) => break Err(net(e)),
        }
    };
    // Whoever is still in a handshake is too late.
    for p in &pending {
        let _ = p.socket.shutdown(Shutdown::Both);
    }
    result
}

/// One connection's handshake: the transport's (TLS), then the magic and the first message
/// (`first`), all within `bound` (socket timeouts here; the caller shuts the socket when the
/// whole bound is over).
fn handshake(stream: TcpStream, transport: &Transport, bound: Duration, timeout: Duration, first: &First) -> Result<Arrival, String> {
    let set = |d: Duration| -> Result<(), String> {
        stream.set_nonblocking(false).map_err(|e| format!("cannot configure the socket: {e}"))?;
        link::tune(&stream, d).map_err(|e| e.chain())
    };
    set(bound)?;
    let Channel { reader, writer, peer, tls_key } = transport::server(transport, &stream).map_err(|e| e.chain())?;
    let mut reader = Counting { inner: reader, count: Arc::new(AtomicU64::new(0)) };
    livemig_wire::read_magic(&mut reader).map_err(|e| format!("not a livemig sender: {e}"))?;
    let hello = match livemig_wire::read_message(&mut reader) {
        Ok(m) => first.check(m)?,
        Err(e) if matches!(first, First::Hello) => return Err(format!("no hello: {e}")),
        Err(e) => return Err(format!("no join: {e}")),
    };
    set(timeout)?;
    Ok(Arrival { stream, reader, writer, peer, tls_key, hello })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpStream;

    fn hello() -> Message {
        Message::Hello {
            version: livemig_wire::PROTOCOL_VERSION,
            min_version: livemig_wire::MIN_PROTOCOL_VERSION,
            software: "test".into(),
            page_size: 4096,
            regions: Vec::new(),
            vm: None,
            disks: Vec::new(),
            engine: livemig_wire::ENGINE_STREAM.into(),
        }
    }

    fn psk_transport(dir: &std::path::Path, name: &str, byte: u8) -> Transport {
        let file = dir.join(name);
        let key: [u8; livemig_tls::PSK_KEY_LEN] = std::array::from_fn(|i| u8::try_from(i).unwrap().wrapping_mul(37).wrapping_add(byte));
        std::fs::write(&file, livemig_tls::psk_file_text(&key)).unwrap();
        let mut perm = std::fs::metadata(&file).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o600);
        std::fs::set_permissions(&file, perm).unwrap();
        let setup = livemig_tls::TlsSetup::load(&livemig_tls::Auth::Psk { file }).unwrap();
        Transport::Tls(Arc::new(setup))
    }

    /// What a real sender does: the transport's handshake, the magic, a hello; then it waits
    /// for the welcome (reads until the receiver closes).
    fn sender(addr: SocketAddr, t: &Transport) -> Result<(), String> {
        let s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        let Channel { mut reader, mut writer, .. } = transport::client(t, &s, "localhost").map_err(|e| e.chain())?;
        livemig_wire::write_magic(&mut writer).map_err(|e| e.to_string())?;
        livemig_wire::write_message(&mut writer, &hello()).map_err(|e| e.to_string())?;
        // Accepted: the receiver answers; refused: the connection just ends.
        let mut answer = Vec::new();
        let _ = reader.read_to_end(&mut answer);
        if answer == b"ok" { Ok(()) } else { Err(format!("refused ({} bytes of answer)", answer.len())) }
    }

    struct Run {
        /// The hello and the peer of the arrival.
        arrival: Result<(Message, String), AgentError>,
        refused: Vec<RefusedConnection>,
        total: u64,
        addr: SocketAddr,
    }

    /// Listens, runs `clients` against the address, waits for the sender with a short bound.
    fn run(t: &Transport, bound: Duration, accept_timeout: Duration, clients: impl FnOnce(SocketAddr) + Send + 'static) -> Run {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let c = std::thread::spawn(move || clients(addr));
        let cancel = AtomicBool::new(false);
        let w = Wait { transport: t, timeout: Duration::from_secs(5), accept_timeout, handshake_bound: bound, cancel: &cancel, peer_gone: None, who: "the sender" };
        let (mut refused, mut total) = (Vec::new(), 0);
        let arrival = accept_sender(&listener, &w, &mut crate::Quiet, &mut refused, &mut total).map(|mut a| {
            a.writer.write_all(b"ok").unwrap();
            a.writer.flush().unwrap();
            (a.hello, a.peer)
        });
        // The arrival's connection is closed: the sender's read ends, then its thread.
        c.join().expect("the clients ran as expected");
        Run { arrival, refused, total, addr }
    }

    fn reasons(r: &Run) -> String {
        r.refused.iter().map(|x| format!("{}: {}", x.peer, x.reason)).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn strays_are_refused_and_the_sender_after_them_is_accepted_then_the_port_closes() {
        let t = Transport::Insecure;
        let tc = t.clone();
        let r = run(&t, Duration::from_millis(500), Duration::from_secs(30), move |addr| {
            // A port scanner: connects and closes.
            drop(TcpStream::connect(addr).unwrap());
            // A garbage client.
            let mut g = TcpStream::connect(addr).unwrap();
            g.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            // One that connects and says nothing (held open past the bound).
            let silent = TcpStream::connect(addr).unwrap();
            // The right magic, then not a hello.
            let mut m = TcpStream::connect(addr).unwrap();
            livemig_wire::write_magic(&mut m).unwrap();
            livemig_wire::write_message(&mut m, &Message::Plan { snapshot: None, connections: 1 }).unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            sender(addr, &tc).unwrap();
            drop((g, silent, m));
        });
        let a = r.arrival.as_ref().map_err(|e| e.chain()).expect("the sender arrives");
        assert!(matches!(a.0, Message::Hello { .. }));
        assert_eq!(r.total, 4, "{}", reasons(&r));
        let all = reasons(&r);
        assert!(all.contains("not a livemig sender: the peer is not a livemig agent (bad magic"), "{all}");
        assert!(all.contains("its first message was `plan`, not hello"), "{all}");
        assert_eq!(r.refused.iter().filter(|x| x.reason.contains("no hello") || x.reason.contains("not a livemig sender: ")).count(), 4, "{all}");
        // The port is closed now: a second sender is refused by the kernel.
        let e = TcpStream::connect(r.addr).expect_err("nobody listens any more");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    #[test]
    fn a_failed_tls_handshake_is_refused_and_the_right_key_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let good = psk_transport(dir.path(), "good", 7);
        let wrong = psk_transport(dir.path(), "wrong", 8);
        let (g, w) = (good.clone(), wrong.clone());
        let r = run(&good, Duration::from_secs(5), Duration::from_secs(30), move |addr| {
            let e = sender(addr, &w).expect_err("the wrong key fails");
            assert!(e.contains("TLS handshake"), "{e}");
            // Plain TCP speaking to a TLS receiver.
            let _ = sender(addr, &Transport::Insecure);
            sender(addr, &g).unwrap();
        });
        let a = r.arrival.as_ref().map_err(|e| e.chain()).expect("the sender with the right key arrives");
        assert!(!a.1.is_empty());
        assert_eq!(r.total, 2, "{}", reasons(&r));
        assert!(r.refused.iter().all(|x| x.reason.contains("TLS handshake")), "{}", reasons(&r));
    }

    #[test]
    fn no_sender_in_time_is_a_timeout_that_names_the_refused() {
        let r = run(&Transport::Insecure, Duration::from_millis(300), Duration::from_secs(2), |addr| {
            let mut g = TcpStream::connect(addr).unwrap();
            let _ = g.write_all(&[0u8; 64]);
        });
        let e = r.arrival.expect_err("nobody arrived");
        assert!(matches!(e, AgentError::Timeout { .. }), "{e:?}");
        assert_eq!(r.total, 1);
    }

    #[test]
    fn a_flood_of_silent_connections_cannot_keep_the_sender_out_past_the_bound() {
        let r = run(&Transport::Insecure, Duration::from_millis(400), Duration::from_secs(30), |addr| {
            let held: Vec<TcpStream> = (0..MAX_PENDING + 4).filter_map(|_| TcpStream::connect(addr).ok()).collect();
            std::thread::sleep(Duration::from_millis(100));
            // Retried as a real sender does while it is refused.
            for _ in 0..50 {
                if sender(addr, &Transport::Insecure).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            drop(held);
        });
        r.arrival.as_ref().map_err(|e| e.chain()).expect("the sender arrives");
        assert!(r.refused.iter().any(|x| x.reason.contains("already in their handshake")), "{}", reasons(&r));
    }

    /// A data connection as `send --connections` opens one: the transport's handshake, the
    /// magic, a join. Returns its halves (kept open by the caller) once sent.
    fn join(addr: SocketAddr, t: &Transport, token: &str, index: u32) -> (TcpStream, Box<dyn Read + Send>, Box<dyn std::io::Write + Send>) {
        let s = TcpStream::connect(addr).unwrap();
        let Channel { reader, mut writer, .. } = transport::client(t, &s, "localhost").unwrap();
        livemig_wire::write_magic(&mut writer).unwrap();
        livemig_wire::write_message(&mut writer, &Message::Join { token: token.into(), index }).unwrap();
        writer.flush().unwrap();
        (s, reader, writer)
    }

    /// Waits until the receiver closed the connection (it refused it).
    fn refused(c: (TcpStream, Box<dyn Read + Send>, Box<dyn std::io::Write + Send>)) {
        let (_s, mut r, _w) = c;
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest);
    }

    #[test]
    fn data_connections_join_with_the_secret_and_everything_else_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = psk_transport(dir.path(), "good", 7);
        let wrong = psk_transport(dir.path(), "wrong", 8);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let token = "ab".repeat(16);
        let (tc, tok) = (t.clone(), token.clone());
        let (done_tx, done) = mpsc::channel::<()>();
        let clients = std::thread::spawn(move || {
            refused(join(addr, &tc, &"cd".repeat(16), 1));
            refused(join(addr, &tc, &tok[..30], 1));
            refused(join(addr, &tc, &tok, 0));
            refused(join(addr, &tc, &tok, 3));
            // The right secret under another key: the TLS handshake fails first.
            let s = TcpStream::connect(addr).unwrap();
            assert!(transport::client(&wrong, &s, "localhost").is_err());
            drop(s);
            let two = join(addr, &tc, &tok, 2);
            refused(join(addr, &tc, &tok, 2));
            let one = join(addr, &tc, &tok, 1);
            // Held open until the receiver has taken them.
            done.recv().unwrap();
            drop((one, two));
        });
        let cancel = AtomicBool::new(false);
        let w = Wait::new(&t, (Duration::from_secs(5), Duration::from_secs(30)), &cancel, "the sender");
        let mut report = crate::report::Report::default();
        let joined = accept_joins(&listener, &w, &token, 3, &mut crate::Quiet, &mut report).map_err(|e| e.chain()).unwrap();
        done_tx.send(()).unwrap();
        clients.join().unwrap();
        assert_eq!(joined.iter().map(|j| j.index).collect::<Vec<_>>(), [1, 2], "in connection order");
        let all = report.refused_connections.iter().map(|x| x.reason.clone()).collect::<Vec<_>>().join("\n");
        assert_eq!(report.refused_connections_total, 6, "{all}");
        assert_eq!(all.matches("a join with the wrong secret").count(), 2, "{all}");
        assert!(all.contains("a join as connection 0 (this migration has 3)"), "{all}");
        assert!(all.contains("a join as connection 3 (this migration has 3)"), "{all}");
        assert!(all.contains("TLS handshake"), "{all}");
        assert!(all.contains("a join as a connection that had already joined"), "{all}");
    }

    /// A sender's first connection (plain TCP): its writing end, and the receiver's reading half
    /// and socket.
    fn first_connection() -> (TcpStream, Counting<Box<dyn Read + Send>>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        let reader: Box<dyn Read + Send> = Box::new(server.try_clone().unwrap());
        (client, Counting { inner: reader, count: Arc::new(AtomicU64::new(0)) }, server)
    }

    fn watch(first: &mut Counting<Box<dyn Read + Send>>, socket: &TcpStream, listener: &TcpListener, timeout: Duration, n: u32) -> Result<Vec<Joined>, AgentError> {
        let cancel = AtomicBool::new(false);
        let t = Transport::Insecure;
        let w = Wait::new(&t, (timeout, Duration::from_secs(30)), &cancel, "the sender");
        let mut report = crate::report::Report::default();
        accept_joins_watching(listener, &w, ("ab", n), (first, socket), &mut crate::Quiet, &mut report)
    }

    /// While its data connections are awaited, the sender gives up and says so on its first
    /// connection: the wait ends with its reason (not at the 60 s the wait allows).
    #[test]
    fn an_abort_on_the_first_connection_ends_the_wait_for_the_data_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut client, mut first, socket) = first_connection();
        livemig_wire::write_message(&mut client, &Message::Abort { reason: "cannot open connection 2: refused".into() }).unwrap();
        let e = watch(&mut first, &socket, &listener, Duration::from_secs(60), 3).err().expect("the sender gave up");
        match e {
            AgentError::PeerAborted { peer, reason } => {
                assert_eq!(peer, "source");
                assert_eq!(reason, "cannot open connection 2: refused");
            }
            other => panic!("{other:?}"),
        }
        // The first connection closing ends it too.
        let (client, mut first, socket) = first_connection();
        drop(client);
        let e = watch(&mut first, &socket, &listener, Duration::from_secs(60), 3).err().expect("the sender is gone");
        assert!(matches!(e, AgentError::Wire(_)), "{e:?}");
    }

    /// The sender's first frame after its joins may come before the receiver has taken the last
    /// join: it is put back, and read next, byte for byte.
    #[test]
    fn a_frame_on_the_first_connection_while_the_joins_arrive_is_read_next() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (mut client, mut first, socket) = first_connection();
        let (done_tx, done) = mpsc::channel::<()>();
        let clients = std::thread::spawn(move || {
            livemig_wire::write_message(&mut client, &Message::StreamReady).unwrap();
            livemig_wire::write_message(&mut client, &Message::Loaded).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let one = join(addr, &Transport::Insecure, "ab", 1);
            done.recv().unwrap();
            drop((one, client));
        });
        let joined = watch(&mut first, &socket, &listener, Duration::from_secs(60), 2).map_err(|e| e.chain()).unwrap();
        assert_eq!(joined.len(), 1);
        assert_eq!(livemig_wire::read_message(&mut first).unwrap(), Message::StreamReady);
        assert_eq!(livemig_wire::read_message(&mut first).unwrap(), Message::Loaded);
        done_tx.send(()).unwrap();
        clients.join().unwrap();
    }

    /// No data connection comes and the first connection stays silent: the wait's own timeout,
    /// and the first connection's reader does not hold it up.
    #[test]
    fn a_silent_sender_without_data_connections_is_the_waits_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (client, mut first, socket) = first_connection();
        let e = watch(&mut first, &socket, &listener, Duration::from_millis(500), 2).err().expect("nobody joined");
        assert!(matches!(e, AgentError::Timeout { .. }), "{e:?}");
        drop(client);
    }

    #[test]
    fn a_sender_that_opens_no_data_connection_is_a_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let cancel = AtomicBool::new(false);
        let t = Transport::Insecure;
        let w = Wait::new(&t, (Duration::from_millis(500), Duration::from_secs(30)), &cancel, "the sender");
        let mut report = crate::report::Report::default();
        let e = accept_joins(&listener, &w, "ab", 2, &mut crate::Quiet, &mut report).err().expect("nobody joined");
        assert!(matches!(e, AgentError::Timeout { .. }), "{e:?}");
        assert!(e.to_string().contains("data connections"), "{e}");
    }
}
