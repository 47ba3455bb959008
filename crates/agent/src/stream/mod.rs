//! The stream engine: QEMU migrates any VM (any RAM: plain `-m`, memfd, file) with its own
//! pre-copy and dirty tracking into a socket `send` owns; livemig parses that stream, compacts
//! its page records, carries it over its connection (TLS), and `receive` rebuilds the exact
//! bytes for the destination QEMU. See `../shared/ARCHITECTURE.md` and `crates/stream`.
//!
//! - [`chunk`]: the frame payload (opaque spans, page records) and its codec (in `livemig-stream`,
//!   beside QEMU's stream codec, so the fuzzer reaches it without the agent);
//! - [`conns`]: over several connections, the sender's spread of chunks and the receiver's
//!   reorder;
//! - [`cache`]: the receiver's bounded page cache, mirrored with the sender's encoder;
//! - [`source`]: the source half of the relay (QEMU socket -> frames), no QMP;
//! - [`send`] / [`receive`]: the two agents' QMP-driven phases;
//! - [`tunnel`]: the relay alone between two QEMU unix sockets, no QMP (`livemig tunnel`).

pub mod cache;
pub mod conns;
pub mod keep;
pub use livemig_stream::chunk;
pub mod receive;
pub mod send;
pub mod source;
pub mod tunnel;

use serde::Serialize;

/// What the stream engine did, in the report (`stream`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamReport {
    /// Bytes of QEMU's migration stream (what QEMU wrote, what the destination QEMU read).
    pub raw_bytes: u64,
    /// PAGE records compacted.
    pub pages: u64,
    /// ZERO records (passed verbatim).
    pub zero_records: u64,
    /// PAGE records passed verbatim (after a fallback).
    pub verbatim_pages: u64,
    /// `ram` sections QEMU wrote.
    pub ram_sections: u64,
    /// Where and why the parser fell back to passing the rest verbatim, if it did.
    pub fallback: Option<String>,
    /// Slots of the page cache both sides mirror.
    pub cache_pages: u64,
    /// Whether the switchover-ack gate was used (QEMU >= 8.1).
    pub switchover_ack_held: bool,
    /// QEMU's own downtime figure (source `query-migrate`).
    pub qemu_downtime_ms: Option<f64>,
}
