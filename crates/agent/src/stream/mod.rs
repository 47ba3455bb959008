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
    /// What livemig told QEMU when it released the switchover-ack, and what QEMU then sent.
    pub switchover: Option<SwitchoverReport>,
}

/// The stream engine's switchover. QEMU switches over once its pending pages fit its
/// `downtime-limit` at its bandwidth; the stream the relay holds unacknowledged (QEMU wrote it,
/// it has not crossed the link) is not in QEMU's check, and goes first in the downtime.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SwitchoverReport {
    /// QEMU's `remaining` at the release: bytes of dirty pages left in its pass.
    pub qemu_remaining_bytes: u64,
    /// Raw stream bytes the relay held unacknowledged at the release.
    pub relay_queued_bytes: u64,
    /// Raw stream bytes per second of the final pass, given to QEMU as
    /// `avail-switchover-bandwidth`: the link's rate at the re-sent pages' raw/wire ratio, at most
    /// the relay's drain rate over the last 2 s; none measured yet: QEMU's own estimate stays.
    pub raw_bytes_per_s: Option<f64>,
    /// Wire bytes per re-sent page: what the controller's prediction priced QEMU's pending pages
    /// at (a whole page until 64 pages were re-sent).
    pub resent_bytes_per_page: f64,
    /// The stream the relay holds: its time on the link.
    pub queued_ms: f64,
    /// The estimated device state's time on the link.
    pub device_ms: f64,
    /// The `downtime-limit` given to QEMU: the maximum less the overhead, the device state and the
    /// queued stream (at least a quarter of the maximum).
    pub qemu_downtime_limit_ms: f64,
    /// Raw stream bytes QEMU wrote from its completion on: its final pass and the device state.
    pub final_raw_bytes: Option<u64>,
}
