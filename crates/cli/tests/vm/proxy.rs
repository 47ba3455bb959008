//! A TCP fault proxy between `livemig send` and `livemig receive`.
//!
//! It accepts the sender's connection, connects to the receiver, and copies both
//! directions on threads while parsing livemig's frames (plain TCP, `--insecure`: sender ->
//! receiver after the 8-byte magic, receiver -> sender from the start). When its trigger fires it
//! applies one fault, once: cut both connections, flip one byte inside the triggering frame's
//! payload, or run a hook before or after forwarding the frame (to kill a process at an exact
//! protocol step).
//!
//! [`Proxy::raw`] parses nothing, for TLS between the agents (issue 14 item 9): it cuts or
//! stalls the connection after a number of bytes from the sender. Every connection the sender
//! opens (`send --connections`) is forwarded; the fault is on the first, or with
//! [`Proxy::raw_on`] on the one it names (its two sockets cut, the others left as they are).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig_wire::HEADER_LEN;

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// `send` -> `receive`.
    FromSender,
    /// `receive` -> `send`.
    FromReceiver,
}

/// When the fault fires.
#[derive(Debug, Clone)]
pub enum Trigger {
    /// Once this many bytes (magic included) came from the sender: exactly that many are
    /// forwarded (the cut may fall inside a frame). Only for [`Action::Cut`].
    SenderBytes(u64),
    /// At the first control message of this `type` (e.g. `switchover`, `loaded`) going that way.
    Control(Dir, &'static str),
    /// At the first Pages frame after the sender's `iteration_end` of iteration `k`; `None`: at
    /// the very first Pages frame.
    PagesAfterIterationEnd(Option<u32>),
    /// At the frame number `nth` (from 0) of this kind (`livemig_wire::FrameKind as u16`, e.g.
    /// 4 for the stream engine's Stream frames) going that way.
    Frame(Dir, u16, u32),
}

/// What happens when the trigger fires.
pub enum Action {
    /// Shut both connections down; the triggering frame is not forwarded.
    Cut,
    /// Flip one byte in the middle of the triggering frame's payload, then forward it.
    Flip,
    /// Run the hook, then forward the frame.
    Before(Box<dyn FnOnce() + Send>),
    /// Forward the frame, then run the hook.
    After(Box<dyn FnOnce() + Send>),
    /// Run the hook, then cut as [`Action::Cut`] (the triggering frame is not forwarded).
    HookThenCut(Box<dyn FnOnce() + Send>),
    /// Stop forwarding either way and hold both connections open, reading nothing more: a link
    /// that went silent (only with [`Proxy::raw`] and [`Trigger::SenderBytes`]).
    Stall,
}

struct Shared {
    fault: Mutex<Option<(Trigger, Action)>>,
    /// What fired, once it did.
    fired: Mutex<Option<String>>,
    cv: Condvar,
    /// Control messages seen, for failure messages.
    trace: Mutex<Vec<String>>,
    /// Handles on both sockets, for a cut.
    sockets: Mutex<Vec<TcpStream>>,
    /// Directions that ended (both pumps).
    ended: Mutex<u32>,
    ended_cv: Condvar,
    /// Parse nothing (TLS between the agents).
    raw: bool,
    /// The link is stalled: nothing more goes either way.
    stalled: std::sync::atomic::AtomicBool,
    /// The proxy cut both connections (or is dropped): a stalled pump may end.
    closed: std::sync::atomic::AtomicBool,
    /// Forward every connection the sender opens, the fault only on this one (0: the first).
    only_conn: Option<usize>,
}

impl Shared {
    fn fire(&self, what: String) {
        *self.fired.lock().unwrap() = Some(what);
        self.cv.notify_all();
    }

    fn cut(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// A running proxy. It forwards to the address given by [`Proxy::forward_to`].
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    target: Mutex<Option<mpsc::Sender<String>>>,
    handle: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 with one fault armed.
    pub fn new(trigger: Trigger, action: Action) -> Proxy {
        if matches!(trigger, Trigger::SenderBytes(_)) {
            assert!(matches!(action, Action::Cut), "a byte-count trigger only cuts");
        }
        assert!(!matches!(action, Action::Stall), "only a raw proxy stalls");
        Self::start(Some((trigger, action)), false)
    }

    /// A proxy that parses nothing (the agents speak TLS), with a fault after `bytes` from the
    /// sender: [`Action::Cut`] or [`Action::Stall`].
    pub fn raw(bytes: u64, action: Action) -> Proxy {
        assert!(matches!(action, Action::Cut | Action::Stall), "a raw proxy cuts or stalls");
        Self::start(Some((Trigger::SenderBytes(bytes), action)), true)
    }

    /// A proxy that parses nothing and forwards every connection the sender opens, in the
    /// order they arrive (the first is the migration's first connection, the next ones its data
    /// connections); connection `conn` alone is cut after `bytes` from the sender (its two
    /// sockets shut, the other connections left as they are).
    pub fn raw_on(conn: usize, bytes: u64) -> Proxy {
        Self::start_with(Some((Trigger::SenderBytes(bytes), Action::Cut)), true, Some(conn))
    }

    fn start(fault: Option<(Trigger, Action)>, raw: bool) -> Proxy {
        Self::start_with(fault, raw, None)
    }

    fn start_with(fault: Option<(Trigger, Action)>, raw: bool, only_conn: Option<usize>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listens");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            fault: Mutex::new(fault),
            fired: Mutex::new(None),
            cv: Condvar::new(),
            trace: Mutex::new(Vec::new()),
            sockets: Mutex::new(Vec::new()),
            ended: Mutex::new(0),
            ended_cv: Condvar::new(),
            raw,
            stalled: std::sync::atomic::AtomicBool::new(false),
            closed: std::sync::atomic::AtomicBool::new(false),
            only_conn,
        });
        let (tx, rx) = mpsc::channel::<String>();
        let sh = Arc::clone(&shared);
        let handle = std::thread::spawn(move || serve(&listener, &rx, &sh));
        Proxy { addr, shared, target: Mutex::new(Some(tx)), handle: Some(handle) }
    }

    /// Sets the receiver's address and returns the proxy's, for the sender's `--to`.
    pub fn forward_to(&self, receiver: &str) -> String {
        let tx = self.target.lock().unwrap().take().expect("forward_to called once");
        tx.send(receiver.to_string()).unwrap();
        self.addr.to_string()
    }

    /// Waits until the fault fired; false after `timeout`.
    pub fn wait_fired(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut f = self.shared.fired.lock().unwrap();
        while f.is_none() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            f = self.shared.cv.wait_timeout(f, deadline - now).unwrap().0;
        }
        true
    }

    /// What fired, if it did.
    pub fn fired(&self) -> Option<String> {
        self.shared.fired.lock().unwrap().clone()
    }

    /// The control messages that went through, in order (`>` from the sender, `<` from the receiver).
    pub fn trace(&self) -> Vec<String> {
        self.shared.trace.lock().unwrap().clone()
    }

    /// Asserts the fault fired, naming what went through otherwise.
    pub fn assert_fired(&self) {
        assert!(self.fired().is_some(), "the proxy's fault never fired; messages seen: {:?}", self.trace());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.target.lock().unwrap().take();
        self.shared.cut();
        // Joined only when it has finished: a sender that never connected leaves the accept
        // loop waiting until its own deadline.
        if let Some(h) = self.handle.take().filter(JoinHandle::is_finished) {
            let _ = h.join();
        }
    }
}

fn serve(listener: &TcpListener, target: &mpsc::Receiver<String>, sh: &Arc<Shared>) {
    let Ok(to) = target.recv() else { return };
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut pumps = Vec::new();
    for conn in 0.. {
        let sender = loop {
            match listener.accept() {
                Ok((s, _)) => break Some(s),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && Instant::now() < deadline
                        && !sh.closed.load(std::sync::atomic::Ordering::SeqCst) =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => break None,
            }
        };
        let Some(sender) = sender else { break };
        sender.set_nonblocking(false).unwrap();
        // The receiver may not listen yet: it starts at the same time as the sender.
        let receiver = loop {
            match TcpStream::connect(&to) {
                Ok(s) => break Some(s),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => break None,
            }
        };
        let Some(receiver) = receiver else { break };
        let _ = sender.set_nodelay(true);
        let _ = receiver.set_nodelay(true);
        sh.sockets.lock().unwrap().extend([sender.try_clone().unwrap(), receiver.try_clone().unwrap()]);
        let (s2, r2) = (sender.try_clone().unwrap(), receiver.try_clone().unwrap());
        // The fault is on the first connection, or on the one `raw_on` names; any other
        // (`send --connections`) is forwarded as bytes, untouched.
        let faulty = sh.only_conn.map_or(conn == 0, |c| c == conn);
        let raw = sh.raw || !faulty;
        let up = {
            let sh = Arc::clone(sh);
            std::thread::spawn(move || if raw { pump_raw(sender, receiver, Dir::FromSender, &sh, faulty) } else { pump(sender, receiver, Dir::FromSender, &sh) })
        };
        let down = {
            let sh = Arc::clone(sh);
            std::thread::spawn(move || if raw { pump_raw(r2, s2, Dir::FromReceiver, &sh, faulty) } else { pump(r2, s2, Dir::FromReceiver, &sh) })
        };
        pumps.extend([up, down]);
    }
    for p in pumps {
        let _ = p.join();
    }
}

/// What the proxy decides for one frame.
enum Step {
    Forward,
    Cut { keep: usize, what: String },
    Flip(String),
    Before(Box<dyn FnOnce() + Send>, String),
    After(Box<dyn FnOnce() + Send>, String),
}

/// Copies `from` to `to`, frame by frame, applying the fault when its trigger matches.
fn pump(mut from: TcpStream, mut to: TcpStream, dir: Dir, sh: &Arc<Shared>) {
    let mut total: u64 = 0;
    // For PagesAfterIterationEnd: the iteration_end of k went by.
    let mut armed_after: Option<u32> = None;
    // Frames seen so far of each kind, this way (for `Trigger::Frame`).
    let mut kinds_seen = [0u32; 8];
    if dir == Dir::FromSender {
        let mut magic = [0u8; 8];
        if from.read_exact(&mut magic).is_err() {
            return done(sh, &from, &to, true);
        }
        total += 8;
        if let Some(keep) = byte_cut(sh, total, 8) {
            let _ = to.write_all(&magic[..keep]);
            sh.fire(format!("cut after {} bytes from the sender (in the magic)", total - 8 + keep as u64));
            return sh.cut();
        }
        if to.write_all(&magic).is_err() {
            return done(sh, &from, &to, false);
        }
    }
    loop {
        let mut frame = vec![0u8; HEADER_LEN];
        match from.read_exact(&mut frame) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return done(sh, &from, &to, true),
            Err(_) => return done(sh, &from, &to, false),
        }
        let kind = u16::from_le_bytes([frame[0], frame[1]]);
        let len = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]) as usize;
        if len > 8 << 20 {
            // Not a livemig frame: pass the rest through untouched.
            let _ = to.write_all(&frame);
            let _ = std::io::copy(&mut from, &mut to);
            return done(sh, &from, &to, true);
        }
        frame.resize(HEADER_LEN + len, 0);
        if from.read_exact(&mut frame[HEADER_LEN..]).is_err() {
            return done(sh, &from, &to, false);
        }
        total += frame.len() as u64;
        let msg_type = (kind == 1)
            .then(|| serde_json::from_slice::<serde_json::Value>(&frame[HEADER_LEN..]).ok())
            .flatten()
            .and_then(|v| {
                let t = v.get("type")?.as_str()?.to_string();
                Some((t, v.get("index").and_then(serde_json::Value::as_u64)))
            });
        if let Some((t, idx)) = &msg_type {
            let arrow = if dir == Dir::FromSender { ">" } else { "<" };
            sh.trace.lock().unwrap().push(match idx {
                Some(i) => format!("{arrow}{t}({i})"),
                None => format!("{arrow}{t}"),
            });
        }
        let nth = kinds_seen.get(usize::from(kind)).copied();
        if let Some(n) = kinds_seen.get_mut(usize::from(kind)) {
            *n += 1;
        }
        let step = decide(sh, dir, (kind, nth), msg_type.as_ref().map(|(t, _)| t.as_str()), armed_after, total, frame.len());
        if dir == Dir::FromSender {
            if let Some(("iteration_end", Some(i))) = msg_type.as_ref().map(|(t, i)| (t.as_str(), *i)) {
                armed_after = u32::try_from(i).ok();
            }
        }
        match step {
            Step::Forward => {}
            Step::Cut { keep, what } => {
                let _ = to.write_all(&frame[..keep]);
                let _ = to.flush();
                sh.fire(what);
                return sh.cut();
            }
            Step::Flip(what) => {
                let at = HEADER_LEN + len / 2;
                frame[at] ^= 0x20;
                sh.fire(what);
            }
            Step::Before(hook, what) => {
                hook();
                sh.fire(what);
            }
            Step::After(hook, what) => {
                let ok = to.write_all(&frame).is_ok();
                hook();
                sh.fire(what);
                if !ok {
                    return done(sh, &from, &to, false);
                }
                continue;
            }
        }
        if to.write_all(&frame).is_err() {
            return done(sh, &from, &to, false);
        }
    }
}

/// Copies `from` to `to` as bytes (TLS records), applying a byte-count cut or stall, or one the
/// test fired.
fn pump_raw(mut from: TcpStream, mut to: TcpStream, dir: Dir, sh: &Arc<Shared>, faulty: bool) {
    use std::sync::atomic::Ordering::SeqCst;
    let mut total: u64 = 0;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = from.read(&mut buf);
        // A stalled link carries nothing more, not even a close or a reset.
        if sh.stalled.load(SeqCst) {
            return hold(sh);
        }
        let n = match n {
            Ok(0) => return done(sh, &from, &to, true),
            Ok(n) => n,
            Err(_) if sh.closed.load(SeqCst) => return,
            Err(_) => return done(sh, &from, &to, false),
        };
        total += n as u64;
        let mut keep = n;
        let mut action = None;
        if dir == Dir::FromSender && faulty {
            let mut f = sh.fault.lock().unwrap();
            if let Some((Trigger::SenderBytes(at), _)) = f.as_ref() {
                if total >= *at {
                    keep = n - usize::try_from(total - *at).expect("within this read");
                    action = f.take().map(|(_, a)| a);
                }
            }
        }
        if to.write_all(&buf[..keep]).is_err() {
            return done(sh, &from, &to, false);
        }
        match action {
            None => {}
            Some(Action::Stall) => {
                sh.stalled.store(true, SeqCst);
                sh.fire(format!("stalled after {} bytes from the sender", total - (n - keep) as u64));
                return hold(sh);
            }
            Some(_) if sh.only_conn.is_some() => {
                // This connection only: its two sockets.
                let _ = to.flush();
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                let conn = sh.only_conn.unwrap_or(0);
                sh.fire(format!("connection {conn} cut after {} bytes from the sender", total - (n - keep) as u64));
                return;
            }
            Some(_) => {
                let _ = to.flush();
                sh.fire(format!("cut after {} bytes from the sender", total - (n - keep) as u64));
                return sh.cut();
            }
        }
    }
}

/// A stalled direction: reads and forwards nothing until the proxy is cut or dropped.
fn hold(sh: &Shared) {
    while !sh.closed.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The end of one direction. A clean close is passed on. An error (a peer died) breaks both
/// connections, but only once the other direction has delivered what that peer sent before (at
/// most 2 s): as over one TCP connection, a peer's last message (an `abort` with its reason)
/// stays readable after its reset.
fn done(sh: &Shared, from: &TcpStream, to: &TcpStream, clean: bool) {
    let mut ended = sh.ended.lock().unwrap();
    *ended += 1;
    sh.ended_cv.notify_all();
    if clean {
        let _ = to.shutdown(Shutdown::Write);
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while *ended < 2 && Instant::now() < deadline {
        ended = sh.ended_cv.wait_timeout(ended, Duration::from_millis(50)).unwrap().0;
    }
    drop(ended);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// A byte-count cut due within the last `len` bytes (ending at `total`): how many to forward.
fn byte_cut(sh: &Shared, total: u64, len: usize) -> Option<usize> {
    let mut f = sh.fault.lock().unwrap();
    if let Some((Trigger::SenderBytes(n), _)) = f.as_ref() {
        if total >= *n {
            let keep = len - usize::try_from(total - *n).expect("within the frame");
            f.take();
            return Some(keep);
        }
    }
    None
}

/// `kind`: the frame's kind and how many frames of that kind went this way before it.
fn decide(sh: &Shared, dir: Dir, kind: (u16, Option<u32>), msg: Option<&str>, armed_after: Option<u32>, total: u64, len: usize) -> Step {
    let (kind, nth) = kind;
    if dir == Dir::FromSender {
        if let Some(keep) = byte_cut(sh, total, len) {
            return Step::Cut { keep, what: format!("cut after {} bytes from the sender", total - (len - keep) as u64) };
        }
    }
    let mut f = sh.fault.lock().unwrap();
    let matched = match f.as_ref() {
        Some((Trigger::Control(d, t), _)) => *d == dir && msg == Some(*t),
        Some((Trigger::PagesAfterIterationEnd(k), _)) => {
            dir == Dir::FromSender && kind == 2 && k.is_none_or(|k| armed_after.is_some_and(|a| a >= k))
        }
        Some((Trigger::Frame(d, k, n), _)) => *d == dir && *k == kind && nth == Some(*n),
        _ => false,
    };
    if !matched {
        return Step::Forward;
    }
    let (trigger, action) = f.take().unwrap();
    let what = format!("{trigger:?} at byte {total} ({len}-byte frame)");
    match action {
        Action::Cut => Step::Cut { keep: 0, what: format!("cut: {what}") },
        Action::Flip => Step::Flip(format!("flipped a byte: {what}")),
        Action::Before(h) => Step::Before(h, format!("hook before forwarding: {what}")),
        Action::After(h) => Step::After(h, format!("hook after forwarding: {what}")),
        Action::HookThenCut(h) => {
            drop(f);
            h();
            Step::Cut { keep: 0, what: format!("hook, then cut: {what}") }
        }
        Action::Stall => unreachable!("Proxy::new does not take a stall"),
    }
}
