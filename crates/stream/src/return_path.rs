//! The return path: messages the destination QEMU writes back to the source on the same
//! connection (`migrate_send_rp_message`): be16 type, be16 len, len bytes.

use std::mem;

use crate::StreamError;

/// Longest message accepted: the source reads messages into a 512-byte buffer and fails on a
/// longer one (`source_return_path_thread`).
pub const RP_MAX_LEN: u16 = 512;

const RP_SHUT: u16 = 1;
const RP_PONG: u16 = 2;
const RP_SWITCHOVER_ACK: u16 = 7;

/// What a return-path message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RpKind {
    /// `MIG_RP_MSG_SHUT` (1) with its be32 status: the destination is done (0 = success).
    Shut,
    /// `MIG_RP_MSG_PONG` (2) with its be32 value: the answer to a PING command.
    Pong,
    /// `MIG_RP_MSG_SWITCHOVER_ACK` (7, QEMU >= 8.1), no data: the destination agrees to
    /// switchover. Withholding it keeps the source iterating (with `switchover-ack` on).
    SwitchoverAck,
    /// Any other type, or a known type with a length QEMU does not use.
    Other(u16),
}

/// One return-path message, with its raw bytes (header included) for forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpMessage {
    raw: Vec<u8>,
}

impl RpMessage {
    /// The message type (first be16).
    pub fn msg_type(&self) -> u16 {
        u16::from_be_bytes([self.raw[0], self.raw[1]])
    }

    /// The message's data (after the 4-byte header).
    pub fn payload(&self) -> &[u8] {
        &self.raw[4..]
    }

    /// The message's bytes as they were on the connection.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// What the message is. A known type is recognised only with the length QEMU sends.
    pub fn kind(&self) -> RpKind {
        match (self.msg_type(), self.payload().len()) {
            (RP_SHUT, 4) => RpKind::Shut,
            (RP_PONG, 4) => RpKind::Pong,
            (RP_SWITCHOVER_ACK, 0) => RpKind::SwitchoverAck,
            (t, _) => RpKind::Other(t),
        }
    }

    /// The be32 of a SHUT (status) or PONG (value) message.
    pub fn value(&self) -> Option<u32> {
        match self.kind() {
            RpKind::Shut | RpKind::Pong => self.payload().try_into().ok().map(u32::from_be_bytes),
            _ => None,
        }
    }

    /// Appends the message's bytes.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.raw);
    }
}

/// One piece of the return path. Writing all of them in order gives the input back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpEvent {
    /// A whole message.
    Message(RpMessage),
    /// The parser met a length over [`RP_MAX_LEN`] (the source will fail on it); every later
    /// byte is [`RpEvent::Opaque`]. No bytes.
    Fallback {
        /// Why.
        reason: String,
    },
    /// Bytes after a fallback.
    Opaque(Vec<u8>),
}

impl RpEvent {
    /// Appends the event's bytes.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            RpEvent::Message(m) => m.write_to(out),
            RpEvent::Opaque(b) => out.extend_from_slice(b),
            RpEvent::Fallback { .. } => {}
        }
    }
}

/// Counts of what the return-path parser saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RpStats {
    /// Messages.
    pub messages: u64,
    /// SHUT messages.
    pub shut: u64,
    /// PONG messages.
    pub pong: u64,
    /// SWITCHOVER_ACK messages.
    pub switchover_ack: u64,
    /// Bytes fed.
    pub bytes_in: u64,
}

/// Incremental parser of the return path; holds at most one incomplete message
/// (4 + [`RP_MAX_LEN`] bytes).
#[derive(Debug, Default)]
pub struct ReturnPathParser {
    held: Vec<u8>,
    opaque: bool,
    stats: RpStats,
}

impl ReturnPathParser {
    /// A parser at the start of the return path.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts so far.
    pub fn stats(&self) -> &RpStats {
        &self.stats
    }

    /// Bytes of an incomplete message held back.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Feeds the next bytes; events go to `out` in order.
    pub fn feed(&mut self, mut input: &[u8], out: &mut impl FnMut(RpEvent)) {
        self.stats.bytes_in += input.len() as u64;
        loop {
            if self.opaque {
                let mut b = mem::take(&mut self.held);
                b.extend_from_slice(input);
                if !b.is_empty() {
                    out(RpEvent::Opaque(b));
                }
                return;
            }
            let want = if self.held.len() < 4 {
                4
            } else {
                let len = self.header_len();
                if len > RP_MAX_LEN {
                    let t = u16::from_be_bytes([self.held[0], self.held[1]]);
                    self.opaque = true;
                    out(RpEvent::Fallback {
                        reason: format!("return-path message of type {t} with {len} bytes (over {RP_MAX_LEN})"),
                    });
                    continue;
                }
                4 + usize::from(len)
            };
            if self.held.len() == want {
                self.emit(out);
                continue;
            }
            if input.is_empty() {
                return;
            }
            let take = (want - self.held.len()).min(input.len());
            self.held.extend_from_slice(&input[..take]);
            input = &input[take..];
        }
    }

    fn header_len(&self) -> u16 {
        u16::from_be_bytes([self.held[2], self.held[3]])
    }

    fn emit(&mut self, out: &mut impl FnMut(RpEvent)) {
        let m = RpMessage { raw: mem::take(&mut self.held) };
        self.stats.messages += 1;
        match m.kind() {
            RpKind::Shut => self.stats.shut += 1,
            RpKind::Pong => self.stats.pong += 1,
            RpKind::SwitchoverAck => self.stats.switchover_ack += 1,
            RpKind::Other(_) => {}
        }
        out(RpEvent::Message(m));
    }

    /// The return path ended: hands out an incomplete message's bytes as opaque and says
    /// whether it ended between messages.
    pub fn finish(&mut self, out: &mut impl FnMut(RpEvent)) -> Result<(), StreamError> {
        let held = mem::take(&mut self.held);
        let n = held.len();
        self.opaque = true;
        if n > 0 {
            out(RpEvent::Opaque(held));
            return Err(StreamError::Truncated { state: "a return-path message", held: n });
        }
        Ok(())
    }
}
