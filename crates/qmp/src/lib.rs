//! livemig qmp: a small blocking QMP client (QEMU Machine Protocol) over a unix socket.
//!
//! One [`Qmp`] owns one connection. Commands are synchronous: [`Qmp::execute`] sends a command and
//! reads until its reply; asynchronous events that arrive meanwhile are queued and can be taken
//! with [`Qmp::take_events`] or awaited with [`Qmp::wait_event`].

mod peercred;

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

/// Longest single QMP message accepted, so a broken peer cannot make us allocate without bound.
pub const MAX_LINE: usize = 16 << 20;

/// Most events kept queued; beyond that the oldest are dropped, so a peer that floods events
/// cannot make the queue grow without bound.
pub const MAX_QUEUED_EVENTS: usize = 4096;

/// Interval between two `query-migrate` polls in [`Qmp::wait_migration`].
const MIGRATION_POLL: Duration = Duration::from_millis(20);

/// Everything that can go wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected.
    #[error("cannot connect to the QMP socket {}", path.display())]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("I/O error on the QMP connection")]
    Io(#[source] io::Error),
    /// End of file from QEMU.
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// Malformed JSON or a message that makes no sense at this point.
    #[error("QEMU sent an unexpected QMP message: {0}")]
    Protocol(String),
    /// QEMU answered a command with an error.
    #[error("QEMU refused `{command}`: {desc}")]
    Command {
        /// The command QEMU refused.
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// Nothing (or not the awaited thing) arrived in time.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
    },
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event name, e.g. `STOP`, `MIGRATION`.
    pub name: String,
    /// The event's `data` member; `Value::Null` when QEMU sent none.
    pub data: Value,
    /// QEMU's timestamp: (seconds, microseconds) since the epoch.
    pub timestamp: (u64, u64),
}

/// Reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RunStatus {
    /// Run state, e.g. `prelaunch`, `running`, `paused`, `inmigrate`, `postmigrate`.
    pub status: String,
    /// Whether the vCPUs run.
    pub running: bool,
}

/// One entry of `query-memdev`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Memdev {
    /// Object id (`-object memory-backend-*,id=...`).
    #[serde(default)]
    pub id: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Whether the memory is mapped shared (`share=on`).
    pub share: bool,
    /// KSM merging.
    #[serde(default)]
    pub merge: bool,
    /// Included in core dumps.
    #[serde(default)]
    pub dump: bool,
    /// Preallocated.
    #[serde(default)]
    pub prealloc: bool,
    /// Swap space reserved (absent on older QEMU).
    #[serde(default)]
    pub reserve: Option<bool>,
    /// NUMA policy.
    #[serde(default)]
    pub policy: String,
    /// NUMA host nodes.
    #[serde(default, rename = "host-nodes")]
    pub host_nodes: Vec<u32>,
}

/// Reply of `query-migrate`; every field is optional because QEMU fills them by state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrationInfo {
    /// `none`, `setup`, `active`, `completed`, `failed`, `cancelled`, ...
    pub status: Option<String>,
    /// QEMU's reason when `failed`.
    pub error_desc: Option<String>,
    /// Milliseconds since the migration started (or its total when done).
    pub total_time: Option<u64>,
    /// Downtime in ms (when completed).
    pub downtime: Option<u64>,
    /// Expected downtime in ms (while active).
    pub expected_downtime: Option<u64>,
    /// Setup time in ms.
    pub setup_time: Option<u64>,
    /// `ram.transferred` in bytes.
    pub transferred: Option<u64>,
    /// `ram.total` in bytes.
    pub total: Option<u64>,
    /// `ram.remaining` in bytes.
    pub remaining: Option<u64>,
    /// `ram.duplicate` (zero pages).
    pub duplicate: Option<u64>,
    /// `ram.normal` pages.
    pub normal: Option<u64>,
    /// `ram.dirty-pages-rate`.
    pub dirty_pages_rate: Option<u64>,
    /// `ram.dirty-sync-count`.
    pub dirty_sync_count: Option<u64>,
    /// `ram.mbps`.
    pub mbps: Option<f64>,
    /// The whole reply, for anything not above.
    pub raw: Value,
}

impl MigrationInfo {
    /// Whether the status is final: `completed`, `failed` or `cancelled`.
    pub fn is_finished(&self) -> bool {
        matches!(
            self.status.as_deref(),
            Some("completed" | "failed" | "cancelled")
        )
    }

    fn from_value(raw: Value) -> MigrationInfo {
        let top_u64 = |k: &str| raw.get(k).and_then(Value::as_u64);
        let ram = raw.get("ram");
        let ram_u64 = |k: &str| ram.and_then(|r| r.get(k)).and_then(Value::as_u64);
        MigrationInfo {
            status: raw.get("status").and_then(Value::as_str).map(str::to_owned),
            error_desc: raw
                .get("error-desc")
                .and_then(Value::as_str)
                .map(str::to_owned),
            total_time: top_u64("total-time"),
            downtime: top_u64("downtime"),
            expected_downtime: top_u64("expected-downtime"),
            setup_time: top_u64("setup-time"),
            transferred: ram_u64("transferred"),
            total: ram_u64("total"),
            remaining: ram_u64("remaining"),
            duplicate: ram_u64("duplicate"),
            normal: ram_u64("normal"),
            dirty_pages_rate: ram_u64("dirty-pages-rate"),
            dirty_sync_count: ram_u64("dirty-sync-count"),
            mbps: ram.and_then(|r| r.get("mbps")).and_then(Value::as_f64),
            raw,
        }
    }
}

/// One message read from QEMU.
enum Message {
    Event(Event),
    Return {
        id: Option<Value>,
        value: Value,
    },
    Error {
        id: Option<Value>,
        class: String,
        desc: String,
    },
}

/// A QMP connection to one QEMU process.
pub struct Qmp {
    stream: UnixStream,
    /// Bytes read but not yet consumed (at most one partial line after a call returns).
    rbuf: Vec<u8>,
    events: VecDeque<Event>,
    timeout: Duration,
    next_id: u64,
    greeting: Value,
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp")
            .field("stream", &self.stream)
            .field("buffered", &self.rbuf.len())
            .field("queued_events", &self.events.len())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn io_err(e: io::Error, what: &str) -> QmpError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => QmpError::Timeout {
            what: what.to_owned(),
        },
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::UnexpectedEof => QmpError::Closed,
        _ => QmpError::Io(e),
    }
}

fn preview(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(&line[..line.len().min(200)]);
    if line.len() > 200 {
        format!("{s}...")
    } else {
        s.into_owned()
    }
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and sends `qmp_capabilities`.
    /// Every read and write is bounded by `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Qmp::from_stream(stream, timeout)
    }

    /// Closes this connection and connects anew to `path` (QEMU serves one client per QMP
    /// socket at a time, so the old one must be gone first): for a connection that fell out of
    /// step, e.g. after a reply that never came. On error `self` stays closed.
    pub fn reconnect(&mut self, path: &Path) -> Result<(), QmpError> {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        *self = Qmp::connect(path, self.timeout)?;
        Ok(())
    }

    /// Same as [`Qmp::connect`] on an already connected stream (e.g. a socket pair or an fd
    /// handed over by a management layer).
    pub fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
        let mut qmp = Qmp {
            stream,
            rbuf: Vec::new(),
            events: VecDeque::new(),
            timeout: Duration::ZERO,
            next_id: 1,
            greeting: Value::Null,
        };
        qmp.set_timeout(timeout);
        let deadline = Instant::now() + qmp.timeout;
        let line = qmp.read_line(deadline, "the QMP greeting")?;
        let v: Value = serde_json::from_slice(&line).map_err(|e| {
            QmpError::Protocol(format!(
                "the greeting is not JSON ({e}): {}",
                preview(&line)
            ))
        })?;
        let Some(greeting) = v.get("QMP").cloned() else {
            return Err(QmpError::Protocol(format!(
                "expected the QMP greeting, got {}",
                preview(&line)
            )));
        };
        qmp.greeting = greeting;
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// The `QMP` member of QEMU's greeting (version and capabilities).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Sets the time limit of every later read and write (and of a whole command).
    /// A zero duration is raised to one millisecond.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t.max(Duration::from_millis(1));
    }

    /// The current time limit.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// PID of the QEMU process at the other end (`SO_PEERCRED`).
    pub fn peer_pid(&self) -> Result<u32, QmpError> {
        peercred::peer_pid(&self.stream).map_err(QmpError::Io)
    }

    /// Reads one line (without its newline) before `deadline`.
    fn read_line(&mut self, deadline: Instant, what: &str) -> Result<Vec<u8>, QmpError> {
        let mut scanned = 0;
        loop {
            if let Some(pos) = self.rbuf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + pos;
                let mut line: Vec<u8> = self.rbuf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            scanned = self.rbuf.len();
            if self.rbuf.len() > MAX_LINE {
                // The connection is out of step now; release the memory.
                self.rbuf = Vec::new();
                return Err(QmpError::Protocol(format!(
                    "a message is longer than {MAX_LINE} bytes"
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(QmpError::Timeout {
                    what: what.to_owned(),
                });
            }
            let left = (deadline - now).max(Duration::from_millis(1));
            self.stream
                .set_read_timeout(Some(left))
                .map_err(QmpError::Io)?;
            let mut chunk = [0u8; 64 * 1024];
            let n = match self.stream.read(&mut chunk) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(e, what)),
            };
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }

    fn read_message(&mut self, deadline: Instant, what: &str) -> Result<Message, QmpError> {
        loop {
            let line = self.read_line(deadline, what)?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v: Value = serde_json::from_slice(&line)
                .map_err(|e| QmpError::Protocol(format!("not JSON ({e}): {}", preview(&line))))?;
            let Value::Object(mut obj) = v else {
                return Err(QmpError::Protocol(format!(
                    "not a JSON object: {}",
                    preview(&line)
                )));
            };
            if let Some(name) = obj.get("event").and_then(Value::as_str) {
                let ts = obj.get("timestamp");
                let field = |k: &str| {
                    ts.and_then(|t| t.get(k))
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                };
                return Ok(Message::Event(Event {
                    name: name.to_owned(),
                    timestamp: (field("seconds"), field("microseconds")),
                    data: obj.remove("data").unwrap_or(Value::Null),
                }));
            }
            let id = obj.remove("id");
            if let Some(value) = obj.remove("return") {
                return Ok(Message::Return { id, value });
            }
            if let Some(err) = obj.remove("error") {
                let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                return Ok(Message::Error {
                    id,
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(QmpError::Protocol(format!(
                "neither an event nor a reply: {}",
                preview(&line)
            )));
        }
    }

    /// Runs `command` with optional `arguments` and returns QEMU's `return` value. Events that
    /// arrive meanwhile are queued. A reply to an earlier, timed-out command is skipped.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&msg)
            .map_err(|e| QmpError::Protocol(format!("cannot encode `{command}`: {e}")))?;
        bytes.push(b'\n');
        let what = format!("the reply to `{command}`");
        self.stream
            .set_write_timeout(Some(self.timeout))
            .map_err(QmpError::Io)?;
        self.stream
            .write_all(&bytes)
            .map_err(|e| io_err(e, &format!("sending `{command}`")))?;
        let deadline = Instant::now() + self.timeout;
        let ours = |rid: &Option<Value>| !matches!(rid, Some(r) if r.as_u64() != Some(id));
        loop {
            match self.read_message(deadline, &what)? {
                Message::Event(ev) => self.queue(ev),
                Message::Return { id: rid, value } if ours(&rid) => return Ok(value),
                Message::Error {
                    id: rid,
                    class,
                    desc,
                } if ours(&rid) => {
                    return Err(QmpError::Command {
                        command: command.to_owned(),
                        class,
                        desc,
                    })
                }
                // A late reply to a command that timed out before.
                Message::Return { .. } | Message::Error { .. } => {}
            }
        }
    }

    fn queue(&mut self, ev: Event) {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(ev);
    }

    /// Runs a command and deserializes its reply.
    fn execute_as<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T, QmpError> {
        let v = self.execute(command, arguments)?;
        serde_json::from_value(v)
            .map_err(|e| QmpError::Protocol(format!("unexpected reply to `{command}`: {e}")))
    }

    /// Takes every queued event, oldest first (at most [`MAX_QUEUED_EVENTS`], the newest).
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Waits up to `timeout` for the event `name` (a queued one counts). Other events that
    /// arrive meanwhile stay queued.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Event, QmpError> {
        if let Some(pos) = self.events.iter().position(|e| e.name == name) {
            if let Some(ev) = self.events.remove(pos) {
                return Ok(ev);
            }
        }
        let deadline = Instant::now() + timeout;
        let what = format!("the event {name}");
        loop {
            match self.read_message(deadline, &what)? {
                Message::Event(ev) if ev.name == name => return Ok(ev),
                Message::Event(ev) => self.queue(ev),
                Message::Return { .. } | Message::Error { .. } => {}
            }
        }
    }

    /// `stop`: pauses the vCPUs.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).map(drop)
    }

    /// `cont`: resumes the vCPUs.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).map(drop)
    }

    /// `query-status`.
    pub fn query_status(&mut self) -> Result<RunStatus, QmpError> {
        self.execute_as("query-status", None)
    }

    /// Where the main RAM block lives in the QEMU process: the host virtual address of guest
    /// physical address 0 (HMP `gpa2hva 0`, e.g. "Host virtual address for 0x0 (pc.ram) is
    /// 0x7f0437e00000") and its size (`query-memory-size-summary`'s `base-memory`).
    pub fn ram_location(&mut self) -> Result<(u64, u64), QmpError> {
        let sum = self.execute("query-memory-size-summary", None)?;
        let len = sum
            .get("base-memory")
            .and_then(Value::as_u64)
            .ok_or_else(|| QmpError::Protocol(format!("query-memory-size-summary has no base-memory: {sum}")))?;
        let out = self.execute("human-monitor-command", Some(json!({ "command-line": "gpa2hva 0" })))?;
        let s = out.as_str().unwrap_or("").trim();
        let hva = s
            .rsplit(' ')
            .next()
            .and_then(|w| w.strip_prefix("0x"))
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .ok_or_else(|| QmpError::Protocol(format!("unexpected gpa2hva answer {s:?}")))?;
        Ok((hva, len))
    }

    /// `query-memdev`: the memory backends.
    pub fn query_memdev(&mut self) -> Result<Vec<Memdev>, QmpError> {
        self.execute_as("query-memdev", None)
    }

    /// `qom-get path property`.
    pub fn qom_get(&mut self, path: &str, property: &str) -> Result<Value, QmpError> {
        self.execute(
            "qom-get",
            Some(json!({ "path": path, "property": property })),
        )
    }

    /// `migrate-set-capabilities` with (capability, state) pairs.
    pub fn migrate_set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, s)| json!({ "capability": c, "state": s }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .map(drop)
    }

    /// `migrate-set-parameters` with an object of parameters, e.g. `{"downtime-limit": 300}`.
    pub fn migrate_set_parameters(&mut self, params: Value) -> Result<(), QmpError> {
        self.execute("migrate-set-parameters", Some(params))
            .map(drop)
    }

    /// `migrate uri`: starts an outgoing migration (returns at once).
    pub fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// `migrate-incoming uri` on a QEMU started with `-incoming defer`.
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        let v = self.execute("query-migrate", None)?;
        if !v.is_object() {
            return Err(QmpError::Protocol(format!(
                "unexpected reply to `query-migrate`: {v}"
            )));
        }
        Ok(MigrationInfo::from_value(v))
    }

    /// Polls `query-migrate` until the status is `completed`, `failed` or `cancelled` and
    /// returns that last reply (check its status); [`QmpError::Timeout`] after `timeout`.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<MigrationInfo, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate()?;
            if info.is_finished() {
                return Ok(info);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(QmpError::Timeout {
                    what: format!(
                        "the migration to finish (status {})",
                        info.status.as_deref().unwrap_or("unknown")
                    ),
                });
            }
            std::thread::sleep(MIGRATION_POLL.min(deadline - now));
        }
    }

    /// `migrate_cancel`.
    pub fn migrate_cancel(&mut self) -> Result<(), QmpError> {
        self.execute("migrate_cancel", None).map(drop)
    }

    /// `quit`: QEMU exits. A connection closed before the reply counts as success.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
