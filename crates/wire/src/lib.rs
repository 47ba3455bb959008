//! livemig's wire protocol between the `send` and `receive` agents.
//!
//! Every message is a frame: a fixed 16-byte little-endian header followed by `len` bytes of
//! payload. The header carries the frame kind (`Invalid = 0` is reserved and rejected, unknown
//! kinds are rejected), the payload length (capped at [`MAX_PAYLOAD`] *before* anything is
//! allocated) and a 64-bit xxh3 checksum of the payload seeded with the kind and length, so a
//! corrupted header or payload is detected.
//!
//! Control messages travel as JSON payloads ([`Message`]); page batches and QEMU's device-state
//! stream travel as raw bytes and never go through serde.
//!
//! **Peer text.** Every string of a control message read from the wire (abort reasons, software
//! versions, names and ids) goes through [`sanitize_peer_text`] when it is decoded
//! ([`Frame::message`]), and so do the parser's complaints about a malformed message: control
//! characters come out escaped and the length is capped, so nothing a peer sends can move the
//! cursor, clear or retitle the operator's terminal, or forge lines of a log.

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Version of the protocol spoken by this build. Bumped on any incompatible change.
///
/// 4: page hashes, reference fingerprints and digests are keyed per migration (the key from
/// the TLS session's exporter, or on a plain link from [`Message::Welcome`]'s `page_key`); a
/// version-3 peer checks unkeyed fingerprints, so it is not spoken any more.
///
/// 5: a `disk_ref` record addresses its 4 KiB by the 512-byte sector they start at (any
/// alignment), not by 4 KiB block number, and may end the page with zeros instead of the disk's
/// next sectors (`livemig_compact::DiskRef`); a version-4 peer would read the wrong bytes (and
/// resend every such page after its fingerprint check), so it is not spoken any more.
///
/// 6: several connections (shared engine): [`Message::Welcome`]'s `join` token,
/// [`Message::Plan`]'s `connections`, the data connections' [`Message::Join`] and
/// [`Message::Fence`]; the destination applies the batches of one iteration in any order and
/// resolves its `dup` records once the iteration is applied, so the sender names as a `dup`
/// source no page the iteration sends later. A version-5 peer is still spoken with (one
/// connection, applied in order).
///
/// 7: the stream engine (and the tunnel) over several connections: a stream welcome carries
/// the `join` secret too, `Stream` chunks go over any connection, and every control message of
/// the sender's relay is preceded on the first connection by a [`Message::StreamOrder`] that
/// gives it its place among the chunks; the destination restores that order by the sequence
/// numbers. A version-6 peer is still spoken with (the stream engine then uses one connection).
pub const PROTOCOL_VERSION: u32 = 7;
/// Oldest peer version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 5;
/// Largest payload accepted from the wire (a batch of pages plus its record headers).
pub const MAX_PAYLOAD: u32 = 4 * 1024 * 1024;
/// Largest JSON control message accepted.
pub const MAX_CONTROL_PAYLOAD: u32 = 1024 * 1024;
/// Magic of the first 8 bytes a sender writes, before the first frame.
pub const MAGIC: [u8; 8] = *b"LIVEMIG\0";

/// Kind of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameKind {
    /// Reserved: never sent, always rejected.
    Invalid = 0,
    /// A JSON [`Message`].
    Control = 1,
    /// A batch of encoded pages (format owned by `livemig-compact`).
    Pages = 2,
    /// A chunk of QEMU's device-state migration stream.
    DeviceState = 3,
    /// Stream engine: a chunk of QEMU's own migration stream, its page records compacted
    /// (format owned by `livemig-agent`'s stream engine).
    Stream = 4,
    /// Stream engine: bytes of the destination QEMU's return path, verbatim.
    ReturnPath = 5,
}

impl FrameKind {
    fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::Control),
            2 => Some(Self::Pages),
            3 => Some(Self::DeviceState),
            4 => Some(Self::Stream),
            5 => Some(Self::ReturnPath),
            _ => None,
        }
    }
}

/// The fixed frame header as it is on the wire.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FrameHeader {
    kind: U16,
    flags: U16,
    len: U32,
    checksum: U64,
}

/// Size of [`FrameHeader`] on the wire.
pub const HEADER_LEN: usize = 16;
const _: () = assert!(std::mem::size_of::<FrameHeader>() == HEADER_LEN);

fn checksum(kind: u16, len: u32, payload: &[u8]) -> u64 {
    let seed = (u64::from(kind) << 32) | u64::from(len);
    xxhash_rust::xxh3::xxh3_64_with_seed(payload, seed)
}

/// Errors of the wire layer.
#[derive(Debug, Error)]
pub enum WireError {
    /// The connection failed or timed out.
    #[error("connection failed while {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// The socket made no progress within its timeout (nothing arrived, or the peer took
    /// nothing).
    #[error("no progress within the timeout while {what} (the peer hangs, or the network is down)")]
    TimedOut {
        /// What was being done.
        what: &'static str,
    },
    /// The peer is not a livemig agent.
    #[error("the peer is not a livemig agent (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// Unknown or reserved frame kind.
    #[error("received a frame of unknown kind {0}")]
    UnknownKind(u16),
    /// Reserved flags set.
    #[error("received a frame with unknown flags {0:#x}")]
    UnknownFlags(u16),
    /// Length beyond the cap.
    #[error("received a frame of {len} bytes, more than the limit of {max}")]
    TooLong {
        /// Announced length.
        len: u32,
        /// Cap for that kind.
        max: u32,
    },
    /// Checksum mismatch.
    #[error("received a corrupted {kind:?} frame of {len} bytes (checksum mismatch)")]
    Corrupt {
        /// Kind of the frame.
        kind: FrameKind,
        /// Its length.
        len: u32,
    },
    /// A control message that does not parse (or, when writing, does not serialise): the
    /// parser's complaint, passed through [`sanitize_peer_text`] (it may quote the peer's text).
    #[error("received a malformed control message: {0}")]
    BadMessage(String),
    /// A frame of another kind than expected.
    #[error("expected {expected} but received {got}")]
    Unexpected {
        /// What the protocol state expected.
        expected: &'static str,
        /// What arrived.
        got: String,
    },
}

impl WireError {
    fn io(what: &'static str, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Closed
        } else if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            WireError::TimedOut { what }
        } else {
            WireError::Io { what, source }
        }
    }
}

/// A frame read from the wire, payload checked.
#[derive(Debug)]
pub struct Frame {
    /// Its kind.
    pub kind: FrameKind,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// Parses the payload of a control frame.
    pub fn message(&self) -> Result<Message, WireError> {
        if self.kind != FrameKind::Control {
            return Err(WireError::Unexpected {
                expected: "a control message",
                got: format!("a {:?} frame", self.kind),
            });
        }
        serde_json::from_slice::<Message>(&self.payload).map(Message::sanitized).map_err(bad_message)
    }
}

/// A JSON error as [`WireError::BadMessage`], its text sanitised (serde quotes unknown variants
/// and fields as the peer sent them).
fn bad_message(e: serde_json::Error) -> WireError {
    WireError::BadMessage(sanitize_peer_text(&e.to_string()))
}

/// Most characters of peer text kept by [`sanitize_peer_text`] (escapes included); longer text
/// is cut and ends with `…`.
pub const MAX_PEER_TEXT: usize = 1024;

/// Whether `c` must not reach a terminal as it is: C0 and C1 control characters (ESC, CR, LF, TAB,
/// BEL, DEL, CSI...), the line and paragraph separators, and the bidirectional formatting
/// characters (which reorder what is displayed).
fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// Makes text that came from the peer safe to print on one line of a terminal or a log: control
/// characters (ESC, CR, LF, TAB, DEL, C1, line separators, bidirectional overrides) are replaced by
/// escapes (`\n`, `\r`, `\t`, else `\u{1b}`-style); printable Unicode, backslashes included, is
/// kept. The result has at most [`MAX_PEER_TEXT`] characters: longer text is cut (never inside an
/// escape) and ends with `…`.
pub fn sanitize_peer_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_PEER_TEXT));
    let mut chars = 0usize;
    // Where `out` is cut if the text turns out too long: the last boundary with room for `…`.
    let mut cut = None;
    for c in text.chars() {
        let before = out.len();
        chars += if is_unsafe_char(c) {
            let escape = match c {
                '\n' => "\\n".to_string(),
                '\r' => "\\r".to_string(),
                '\t' => "\\t".to_string(),
                c => format!("\\u{{{:x}}}", u32::from(c)),
            };
            out.push_str(&escape);
            escape.len()
        } else {
            out.push(c);
            1
        };
        if chars >= MAX_PEER_TEXT && cut.is_none() {
            cut = Some(before);
        }
        if chars > MAX_PEER_TEXT {
            out.truncate(cut.unwrap_or(before));
            out.push('…');
            return out;
        }
    }
    out
}

/// Sanitises a peer string in place (no allocation when it is clean and short).
fn clean(s: &mut String) {
    if s.len() > MAX_PEER_TEXT || s.chars().any(is_unsafe_char) {
        *s = sanitize_peer_text(s);
    }
}

/// Writes one frame.
pub fn write_frame<W: Write + ?Sized>(w: &mut W, kind: FrameKind, payload: &[u8]) -> Result<(), WireError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_PAYLOAD)
        .ok_or(WireError::TooLong {
            len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            max: MAX_PAYLOAD,
        })?;
    let kind16 = kind as u16;
    let header = FrameHeader {
        kind: U16::new(kind16),
        flags: U16::new(0),
        len: U32::new(len),
        checksum: U64::new(checksum(kind16, len, payload)),
    };
    w.write_all(header.as_bytes()).map_err(|e| WireError::io("sending a frame", e))?;
    w.write_all(payload).map_err(|e| WireError::io("sending a frame", e))?;
    Ok(())
}

/// Serialises and writes a control message.
pub fn write_message<W: Write + ?Sized>(w: &mut W, msg: &Message) -> Result<(), WireError> {
    let payload = serde_json::to_vec(msg).map_err(bad_message)?;
    write_frame(w, FrameKind::Control, &payload)?;
    w.flush().map_err(|e| WireError::io("sending a frame", e))
}

/// Reads one frame; the length is checked against the cap of its kind before any allocation.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Frame, WireError> {
    let mut raw = [0u8; HEADER_LEN];
    r.read_exact(&mut raw).map_err(|e| WireError::io("receiving a frame", e))?;
    let header = FrameHeader::read_from_bytes(&raw).map_err(|_| WireError::UnknownKind(0))?;
    let kind_raw = header.kind.get();
    let kind = FrameKind::from_u16(kind_raw).ok_or(WireError::UnknownKind(kind_raw))?;
    if header.flags.get() != 0 {
        return Err(WireError::UnknownFlags(header.flags.get()));
    }
    let len = header.len.get();
    let max = if kind == FrameKind::Control { MAX_CONTROL_PAYLOAD } else { MAX_PAYLOAD };
    if len > max {
        return Err(WireError::TooLong { len, max });
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(|e| WireError::io("receiving a frame", e))?;
    if checksum(kind_raw, len, &payload) != header.checksum.get() {
        return Err(WireError::Corrupt { kind, len });
    }
    Ok(Frame { kind, payload })
}

/// Reads a frame that must be a control message.
pub fn read_message<R: Read + ?Sized>(r: &mut R) -> Result<Message, WireError> {
    read_frame(r)?.message()
}

/// Writes the connection magic.
pub fn write_magic<W: Write + ?Sized>(w: &mut W) -> Result<(), WireError> {
    w.write_all(&MAGIC).map_err(|e| WireError::io("sending the greeting", e))
}

/// Reads and checks the connection magic.
pub fn read_magic<R: Read + ?Sized>(r: &mut R) -> Result<(), WireError> {
    let mut m = [0u8; 8];
    r.read_exact(&mut m).map_err(|e| WireError::io("receiving the greeting", e))?;
    if m != MAGIC {
        return Err(WireError::BadMagic(m));
    }
    Ok(())
}

/// One RAM region as both sides must have it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    /// QEMU memdev id.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
}

/// A disk image the sender can reference, identified by its index (see `livemig-index`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskOffer {
    /// Id used in references.
    pub id: u16,
    /// Image size in bytes.
    pub size: u64,
    /// Hash of the image's whole fingerprint index (32 hex digits).
    pub index_hash: String,
}

/// What the destination holds, in the handshake: a few ids, never a list of fingerprints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Holdings {
    /// Offered disk ids it has an image for: `same` true when its index hash is equal (every
    /// reference resolves), false when only the size matches (each reference is checked and a
    /// changed block is resent).
    pub disks: Vec<DiskHeld>,
    /// Ids of the memory snapshots of the VM it holds (32 hex digits each), newest first.
    pub snapshots: Vec<String>,
}

/// One offered disk image the destination has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskHeld {
    /// The offer's id.
    pub id: u16,
    /// Same index hash as offered.
    pub same: bool,
}

/// Most pages in one `Resend`.
pub const MAX_RESEND_PAGES: usize = 16 * 1024;
/// Most disk images offered, and snapshot ids listed, in a handshake.
pub const MAX_HANDSHAKE_ITEMS: usize = 64;
/// Most connections one migration may use (`Plan`'s `connections`).
pub const MAX_CONNECTIONS: u32 = 16;
/// The first protocol version with several connections.
pub const CONNECTIONS_PROTOCOL_VERSION: u32 = 6;
/// The first protocol version with the stream engine (and the tunnel) over several connections.
pub const STREAM_CONNECTIONS_PROTOCOL_VERSION: u32 = 7;

fn one() -> u32 {
    1
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_one(n: &u32) -> bool {
    *n == 1
}

/// The control messages. Each is tagged by `type` in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// Source -> destination, first message.
    Hello {
        /// Highest protocol version the sender speaks.
        version: u32,
        /// Lowest version it still speaks.
        min_version: u32,
        /// livemig version string, for error messages.
        software: String,
        /// Page size in bytes.
        page_size: u32,
        /// The source VM's RAM regions.
        regions: Vec<RegionInfo>,
        /// Identity of the VM, for memory snapshots (none: no snapshot is used or kept).
        #[serde(default)]
        vm: Option<String>,
        /// Disk images the sender can reference blocks of.
        #[serde(default)]
        disks: Vec<DiskOffer>,
        /// How the RAM travels: [`ENGINE_SHARED`] (livemig reads the shared RAM),
        /// [`ENGINE_STREAM`] (QEMU's own stream, relayed; protocol version 3) or
        /// [`ENGINE_TUNNEL`] (the same relay between two QEMU unix sockets, no QMP; version 3).
        /// A receiver refuses a value it does not serve (see [`ENGINE_TUNNEL`]).
        #[serde(default = "engine_shared")]
        engine: String,
    },
    /// Destination -> source: accepted, with the version both speak.
    Welcome {
        /// Negotiated version.
        version: u32,
        /// livemig version string.
        software: String,
        /// What the destination holds: the offered disk images it has, and its snapshots of the VM.
        #[serde(default)]
        holds: Holdings,
        /// On a plain link only (`--insecure`): the migration's page key, 64 hex digits, chosen
        /// at random by the destination (over TLS both sides export it from the session and
        /// this is absent). It keys the page hashes, fingerprints and digests; sent in the
        /// clear, it is secret from the guest but not from the network.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        page_key: Option<String>,
        /// From version 6 on: the secret a data connection of this migration presents in its
        /// [`Message::Join`] (32 hex digits, random per migration; absent towards an older sender).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        join: Option<String>,
    },
    /// Source -> destination, after `Welcome`: the memory snapshot references will name.
    Plan {
        /// Snapshot id (32 hex digits), if any.
        snapshot: Option<String>,
        /// Connections the pages go over (version 6; 1 to [`MAX_CONNECTIONS`]): this one and
        /// `connections - 1` data connections the sender opens next, each its own TLS session,
        /// each starting with a [`Message::Join`]. Absent: 1.
        #[serde(default = "one", skip_serializing_if = "is_one")]
        connections: u32,
    },
    /// Source -> destination, the first message of a data connection (after the magic): which
    /// migration (the `Welcome`'s `join` secret) and which connection (1 to `connections - 1`).
    /// A data connection then carries `Pages` frames and [`Message::Fence`]s only.
    Join {
        /// The `Welcome`'s `join`.
        token: String,
        /// This connection's number.
        index: u32,
    },
    /// Source -> destination, on every data connection after the last `Pages` frame of an
    /// iteration (before the `IterationEnd` on the first connection): the destination applies
    /// the iteration's batches from all connections before it acknowledges the iteration.
    Fence {
        /// Iteration index.
        index: u32,
    },
    /// Destination -> source: pages it could not resolve (a reference or delta that did not
    /// match); the sender sends them whole again.
    Resend {
        /// Guest pages, at most [`MAX_RESEND_PAGES`].
        pages: Vec<u64>,
    },
    /// Destination -> source: everything up to the end of the given final iteration is applied;
    /// any `Resend` for it came before.
    EndAck {
        /// Iteration index.
        index: u32,
    },
    /// End of one pre-copy iteration (or the final one).
    IterationEnd {
        /// Iteration index.
        index: u32,
        /// Pages sent in it.
        pages: u64,
        /// True for the last iteration, sent with the source paused.
        last: bool,
    },
    /// Source -> destination: all pages sent, source paused; digest of the source memory.
    Switchover {
        /// Digest of the source memory at switchover (see `livemig-track`).
        digest: String,
        /// Number of pages the digest covers.
        pages: u64,
    },
    /// Destination -> source: result of the memory verification.
    Verified {
        /// True when the destination digest equals the source digest.
        ok: bool,
        /// The destination's digest.
        digest: String,
    },
    /// Source -> destination: the device-state stream is complete.
    DeviceStateEnd {
        /// Bytes of the stream.
        bytes: u64,
    },
    /// Destination -> source: QEMU loaded the device state; the destination is paused and ready.
    Loaded,
    /// Source -> destination: resume the destination. After this the source never resumes.
    Commit,
    /// Destination -> source: the destination VM runs.
    Resumed,
    /// Stream engine, source -> destination after `Plan`: the migration capabilities the source
    /// QEMU migrates with (the destination must set the same), then the destination starts its
    /// incoming migration and answers [`Message::StreamReady`].
    StreamSetup {
        /// (capability, state) pairs.
        capabilities: Vec<(String, bool)>,
    },
    /// Stream engine, destination -> source: the destination QEMU listens and the receiver is
    /// connected to it.
    StreamReady,
    /// Stream engine, source -> destination: QEMU's RAM blocks (from the stream), the page index
    /// space of the records that follow, and the slots of the page cache both sides mirror.
    StreamBlocks {
        /// (block name, bytes) in stream order.
        blocks: Vec<(String, u64)>,
        /// Slots of the direct-mapped page cache (pages).
        cache_pages: u64,
    },
    /// Stream engine, destination -> source: chunks up to this sequence number are written to
    /// the destination QEMU.
    StreamAck {
        /// Chunk sequence number.
        seq: u64,
    },
    /// Stream engine, destination -> source: a page of a chunk did not resolve; send it whole.
    StreamResend {
        /// Chunk sequence number.
        seq: u64,
        /// Item index in the chunk.
        item: u32,
    },
    /// Stream engine, source -> destination: the digest of every byte of QEMU's stream up to
    /// here (the RAM is done, or the parser fell back to passing bytes verbatim). The destination
    /// compares it with what it wrote before it writes one more byte.
    StreamCheckpoint {
        /// Bytes of the stream so far.
        bytes: u64,
        /// xxh3-128 of them keyed with the migration's page key, 32 hex digits.
        digest: String,
        /// Why here: `ram-done` or the fallback's reason.
        at: String,
    },
    /// Stream engine, destination -> source: the checkpoint's digest matched.
    StreamVerified {
        /// Bytes covered.
        bytes: u64,
    },
    /// Stream engine, source -> destination: the source QEMU's stream ended (EOF) after `bytes`.
    StreamEnd {
        /// Bytes of the whole stream.
        bytes: u64,
    },
    /// Stream engine over several connections (version 7), source -> destination, on the first
    /// connection only: the control message that follows it on this connection takes number
    /// `seq` of the chunks' sequence (no chunk has it): it comes after every chunk below, which
    /// may travel on any connection, and before every chunk above. The destination acts on it
    /// in that place.
    StreamOrder {
        /// Its place in the chunks' sequence.
        seq: u64,
    },
    /// Either side: the migration is abandoned, with the reason.
    Abort {
        /// Why, one sentence.
        reason: String,
    },
}

impl Message {
    /// The message with every string passed through [`sanitize_peer_text`]: what
    /// [`Frame::message`] returns. Legitimate values (versions, hex digests, QEMU's names) have
    /// no control characters and stay as they are.
    pub fn sanitized(mut self) -> Message {
        // No wildcard: a new variant with text must be looked at here.
        match &mut self {
            Message::Hello { software, regions, vm, disks, engine, version: _, min_version: _, page_size: _ } => {
                clean(software);
                regions.iter_mut().for_each(|r| clean(&mut r.id));
                if let Some(vm) = vm {
                    clean(vm);
                }
                disks.iter_mut().for_each(|d| clean(&mut d.index_hash));
                clean(engine);
            }
            Message::Welcome { software, holds, page_key, join, version: _ } => {
                clean(software);
                holds.snapshots.iter_mut().for_each(clean);
                if let Some(k) = page_key {
                    clean(k);
                }
                if let Some(j) = join {
                    clean(j);
                }
            }
            Message::Plan { snapshot, connections: _ } => {
                if let Some(s) = snapshot {
                    clean(s);
                }
            }
            Message::Join { token, index: _ } => clean(token),
            Message::Switchover { digest, pages: _ } | Message::Verified { digest, ok: _ } => clean(digest),
            Message::StreamSetup { capabilities } => capabilities.iter_mut().for_each(|(c, _)| clean(c)),
            Message::StreamBlocks { blocks, cache_pages: _ } => blocks.iter_mut().for_each(|(b, _)| clean(b)),
            Message::StreamCheckpoint { digest, at, bytes: _ } => {
                clean(digest);
                clean(at);
            }
            Message::Abort { reason } => clean(reason),
            Message::Resend { .. }
            | Message::EndAck { .. }
            | Message::IterationEnd { .. }
            | Message::Fence { .. }
            | Message::DeviceStateEnd { .. }
            | Message::Loaded
            | Message::Commit
            | Message::Resumed
            | Message::StreamReady
            | Message::StreamAck { .. }
            | Message::StreamResend { .. }
            | Message::StreamVerified { .. }
            | Message::StreamEnd { .. }
            | Message::StreamOrder { .. } => {}
        }
        self
    }

    /// Short name for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Welcome { .. } => "welcome",
            Message::Plan { .. } => "plan",
            Message::Join { .. } => "join",
            Message::Fence { .. } => "fence",
            Message::Resend { .. } => "resend",
            Message::EndAck { .. } => "end-ack",
            Message::IterationEnd { .. } => "iteration-end",
            Message::Switchover { .. } => "switchover",
            Message::Verified { .. } => "verified",
            Message::DeviceStateEnd { .. } => "device-state-end",
            Message::Loaded => "loaded",
            Message::Commit => "commit",
            Message::Resumed => "resumed",
            Message::StreamSetup { .. } => "stream-setup",
            Message::StreamReady => "stream-ready",
            Message::StreamBlocks { .. } => "stream-blocks",
            Message::StreamAck { .. } => "stream-ack",
            Message::StreamResend { .. } => "stream-resend",
            Message::StreamCheckpoint { .. } => "stream-checkpoint",
            Message::StreamVerified { .. } => "stream-verified",
            Message::StreamEnd { .. } => "stream-end",
            Message::StreamOrder { .. } => "stream-order",
            Message::Abort { .. } => "abort",
        }
    }
}

/// [`Message::Hello`]'s `engine` for the shared-memory engine.
pub const ENGINE_SHARED: &str = "shared";
/// [`Message::Hello`]'s `engine` for the stream engine.
pub const ENGINE_STREAM: &str = "stream";
/// [`Message::Hello`]'s `engine` of `livemig tunnel send`: the stream engine's relay between two
/// QEMU unix sockets, without QMP (protocol version 3, as the stream engine). Only a `livemig
/// tunnel receive` accepts it, and a tunnel receiver accepts nothing else: each side refuses the
/// other role, and any engine it does not know, with an `Abort` that says so.
pub const ENGINE_TUNNEL: &str = "tunnel";
/// The first protocol version with the stream engine.
pub const STREAM_PROTOCOL_VERSION: u32 = 3;

fn engine_shared() -> String {
    ENGINE_SHARED.to_string()
}

/// Parses a JSON value into a type, for callers with their own message structures (the parser's
/// complaints are sanitised; the strings of `T` are the caller's to pass through
/// [`sanitize_peer_text`]).
pub fn from_json<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(payload).map_err(bad_message)
}

/// Negotiates the protocol version from a peer's range: the highest both speak.
pub fn negotiate(peer_min: u32, peer_max: u32) -> Option<u32> {
    let v = peer_max.min(PROTOCOL_VERSION);
    (v >= peer_min.max(MIN_PROTOCOL_VERSION)).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn roundtrip(kind: FrameKind, payload: &[u8]) -> Frame {
        let mut buf = Vec::new();
        write_frame(&mut buf, kind, payload).unwrap();
        assert_eq!(buf.len(), HEADER_LEN + payload.len());
        read_frame(&mut Cursor::new(buf)).unwrap()
    }

    #[test]
    fn a_plan_of_one_connection_is_what_a_version_5_peer_sends_and_reads() {
        // Version-5 peers deny unknown fields: one connection must not add any.
        let mut buf = Vec::new();
        write_message(&mut buf, &Message::Plan { snapshot: None, connections: 1 }).unwrap();
        assert!(!String::from_utf8_lossy(&buf).contains("connections"));
        let mut buf = Vec::new();
        let welcome = Message::Welcome { version: 5, software: "x".into(), holds: Holdings::default(), page_key: None, join: None };
        write_message(&mut buf, &welcome).unwrap();
        assert!(!String::from_utf8_lossy(&buf).contains("join"));
        // And a version-5 plan (no field) reads as one connection.
        let v5 = br#"{"type":"plan","snapshot":null}"#;
        assert_eq!(from_json::<Message>(v5).unwrap(), Message::Plan { snapshot: None, connections: 1 });
    }

    #[test]
    fn message_roundtrip() {
        let msgs = vec![
            Message::Hello {
                version: 1,
                min_version: 1,
                software: "x".into(),
                page_size: 4096,
                regions: vec![RegionInfo { id: "mem0".into(), size: 1 << 29 }],
                vm: Some("vm1".into()),
                disks: vec![DiskOffer { id: 0, size: 1 << 30, index_hash: "00ff".into() }],
                engine: ENGINE_STREAM.into(),
            },
            Message::Welcome {
                version: 2,
                software: "y".into(),
                holds: Holdings { disks: vec![DiskHeld { id: 0, same: false }], snapshots: vec!["ab".into()] },
                page_key: None,
                join: None,
            },
            Message::Welcome { version: 4, software: "y".into(), holds: Holdings::default(), page_key: Some("ab".repeat(32)), join: None },
            Message::Welcome { version: 6, software: "y".into(), holds: Holdings::default(), page_key: None, join: Some("cd".repeat(16)) },
            Message::Plan { snapshot: None, connections: 1 },
            Message::Plan { snapshot: None, connections: 4 },
            Message::Join { token: "cd".repeat(16), index: 3 },
            Message::Fence { index: 7 },
            Message::Resend { pages: vec![1, 2, 3] },
            Message::EndAck { index: 4 },
            Message::Commit,
            Message::Abort { reason: "because".into() },
            Message::Switchover { digest: "ab".into(), pages: 3 },
            Message::StreamSetup { capabilities: vec![("return-path".into(), true)] },
            Message::StreamReady,
            Message::StreamBlocks { blocks: vec![("pc.ram".into(), 1 << 29)], cache_pages: 16384 },
            Message::StreamAck { seq: 7 },
            Message::StreamResend { seq: 7, item: 3 },
            Message::StreamCheckpoint { bytes: 9, digest: "00".into(), at: "ram-done".into() },
            Message::StreamVerified { bytes: 9 },
            Message::StreamEnd { bytes: 10 },
            Message::StreamOrder { seq: 11 },
        ];
        for m in msgs {
            let mut buf = Vec::new();
            write_message(&mut buf, &m).unwrap();
            assert_eq!(read_message(&mut Cursor::new(buf)).unwrap(), m);
        }
    }

    #[test]
    fn rejects_invalid_and_unknown_kinds() {
        for k in [0u16, 6, 0xffff] {
            let mut buf = Vec::new();
            write_frame(&mut buf, FrameKind::Pages, b"abc").unwrap();
            buf[0..2].copy_from_slice(&k.to_le_bytes());
            assert!(matches!(read_frame(&mut Cursor::new(buf)), Err(WireError::UnknownKind(x)) if x == k));
        }
    }

    #[test]
    fn rejects_oversized_length_before_allocating() {
        let mut buf = Vec::new();
        write_frame(&mut buf, FrameKind::Pages, b"").unwrap();
        buf[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        match read_frame(&mut Cursor::new(buf)) {
            Err(WireError::TooLong { len, max }) => {
                assert_eq!(len, u32::MAX);
                assert_eq!(max, MAX_PAYLOAD);
            }
            other => panic!("unexpected {other:?}"),
        }
        // control frames have a smaller cap
        let mut buf = Vec::new();
        write_frame(&mut buf, FrameKind::Control, b"").unwrap();
        buf[4..8].copy_from_slice(&(MAX_CONTROL_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(read_frame(&mut Cursor::new(buf)), Err(WireError::TooLong { .. })));
    }

    #[test]
    fn truncated_frame_is_closed() {
        let mut buf = Vec::new();
        write_frame(&mut buf, FrameKind::DeviceState, &[7u8; 100]).unwrap();
        buf.truncate(50);
        assert!(matches!(read_frame(&mut Cursor::new(buf)), Err(WireError::Closed)));
    }

    #[test]
    fn bad_magic_and_json() {
        assert!(matches!(read_magic(&mut Cursor::new(b"GET / HT".to_vec())), Err(WireError::BadMagic(_))));
        let mut buf = Vec::new();
        write_frame(&mut buf, FrameKind::Control, br#"{"type":"nonsense"}"#).unwrap();
        assert!(matches!(read_message(&mut Cursor::new(buf)), Err(WireError::BadMessage(_))));
    }

    #[test]
    fn peer_text_is_escaped_and_capped() {
        assert_eq!(sanitize_peer_text("plain text, ünïcödé ✓ \\ 日本"), "plain text, ünïcödé ✓ \\ 日本");
        assert_eq!(sanitize_peer_text("\x1b[2J\r\nfake: ok\t."), "\\u{1b}[2J\\r\\nfake: ok\\t.");
        assert_eq!(sanitize_peer_text("\x07\x7f\u{9b}\0"), "\\u{7}\\u{7f}\\u{9b}\\u{0}");
        assert_eq!(sanitize_peer_text("a\u{202e}b\u{2028}c\u{2066}"), "a\\u{202e}b\\u{2028}c\\u{2066}");
        assert_eq!(sanitize_peer_text(""), "");

        let exact = "x".repeat(MAX_PEER_TEXT);
        assert_eq!(sanitize_peer_text(&exact), exact, "text of exactly the cap is kept whole");
        let long = sanitize_peer_text(&"é".repeat(5000));
        assert_eq!(long.chars().count(), MAX_PEER_TEXT);
        assert!(long.ends_with('…') && long.starts_with("éé"), "{long}");
        // Escapes are never cut in the middle.
        let esc = sanitize_peer_text(&"\x1b".repeat(1000));
        assert!(esc.chars().count() <= MAX_PEER_TEXT);
        assert!(esc.ends_with("\\u{1b}…"), "{}", &esc[esc.len() - 20..]);
    }

    proptest! {
        #[test]
        fn sanitized_text_has_no_control_characters(text in "(?s).{0,2000}") {
            let s = sanitize_peer_text(&text);
            prop_assert!(!s.chars().any(is_unsafe_char), "{:?}", s);
            prop_assert!(s.chars().count() <= MAX_PEER_TEXT);
            if text.chars().count() < MAX_PEER_TEXT / 8 {
                prop_assert!(!s.ends_with('…') || text.ends_with('…'));
            }
        }
    }

    #[test]
    fn decoded_messages_carry_sanitized_text() {
        let decode = |m: &Message| {
            let mut buf = Vec::new();
            write_message(&mut buf, m).unwrap();
            read_message(&mut Cursor::new(buf)).unwrap()
        };
        let got = decode(&Message::Abort { reason: "boom\x1b[2J\r\nlivemig: completed".into() });
        assert_eq!(got, Message::Abort { reason: "boom\\u{1b}[2J\\r\\nlivemig: completed".into() });
        let got = decode(&Message::Welcome {
            version: 3,
            software: "livemig\x1b]0;owned\x07 1.0".into(),
            holds: Holdings { disks: vec![], snapshots: vec!["a\nb".into()] },
            page_key: None,
            join: None,
        });
        let Message::Welcome { software, holds, .. } = got else { panic!("{got:?}") };
        assert_eq!(software, "livemig\\u{1b}]0;owned\\u{7} 1.0");
        assert_eq!(holds.snapshots, ["a\\nb"]);
        // Clean messages come through unchanged.
        let clean = Message::StreamCheckpoint { bytes: 1, digest: "00ff".into(), at: "ram-done".into() };
        assert_eq!(decode(&clean), clean);
        // A malformed message quoting the peer's text (serde names an unknown variant as sent).
        let mut buf = Vec::new();
        write_frame(&mut buf, FrameKind::Control, b"{\"type\":\"x\\u001b[2J\\r\\n\"}").unwrap();
        let e = read_message(&mut Cursor::new(buf)).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, WireError::BadMessage(_)), "{e:?}");
        assert!(!text.chars().any(char::is_control) && text.contains("\\u{1b}[2J\\r\\n"), "{text}");
    }

    #[test]
    fn socket_timeout_is_a_timeout_error() {
        let (mut a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_read_timeout(Some(std::time::Duration::from_millis(20))).unwrap();
        assert!(matches!(read_frame(&mut a), Err(WireError::TimedOut { .. })));
    }

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(1, 7), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate(5, 5), Some(5));
        // a version-4 peer addresses disk references by 4 KiB block: refused
        assert_eq!(negotiate(4, 4), None, "a version-4 peer (disk references by block) is refused");
        // a version-1 peer (before compaction references) is refused
        assert_eq!(negotiate(1, 1), None);
        // version 2 and 3 peers check unkeyed fingerprints: refused
        assert_eq!(negotiate(2, 2), None);
        assert_eq!(negotiate(2, 3), None, "a version-3 peer (unkeyed fingerprints) is refused");
        assert_eq!(negotiate(3, 9), Some(7), "a peer that speaks 7 too is spoken with at 7");
        assert_eq!(negotiate(3, 6), Some(6), "a version-6 peer is still spoken with (the stream engine on one connection)");
        assert_eq!(negotiate(3, 5), Some(5), "a version-5 peer is still spoken with (one connection)");
        assert_eq!(negotiate(8, 9), None);
        assert_eq!(negotiate(0, 0), None);
    }

    /// A welcome without a page key (a TLS link) leaves the field out rather than send `null`.
    #[test]
    fn a_welcome_without_a_key_has_no_key_field() {
        let m = Message::Welcome { version: 4, software: "x".into(), holds: Holdings::default(), page_key: None, join: None };
        let json = serde_json::to_string(&m).unwrap();
        assert!(!json.contains("page_key"), "{json}");
    }

    proptest! {
        #[test]
        fn frames_roundtrip(kind in 1u16..=5, payload in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let kind = FrameKind::from_u16(kind).unwrap();
            let f = roundtrip(kind, &payload);
            prop_assert_eq!(f.kind, kind);
            prop_assert_eq!(f.payload, payload);
        }

        #[test]
        fn any_corruption_is_detected(payload in proptest::collection::vec(any::<u8>(), 1..2000), pos in any::<usize>(), bit in 0u8..8) {
            let mut buf = Vec::new();
            write_frame(&mut buf, FrameKind::Pages, &payload).unwrap();
            let pos = pos % buf.len();
            buf[pos] ^= 1 << bit;
            // Must be an error (never a panic, never the wrong payload accepted).
            if let Ok(f) = read_frame(&mut Cursor::new(buf)) {
                prop_assert!(false, "corruption accepted: kind {:?} len {}", f.kind, f.payload.len());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut c = Cursor::new(bytes);
            for _ in 0..4 {
                if read_frame(&mut c).is_err() { break; }
            }
        }
    }
}
