//! The page pipeline of the shared engine's sender, as one function: read the pages, record them
//! in the ledger, encode them, hand full batches to the writer. `send` runs it every iteration;
//! the developer benchmark (`livemig-dev pipeline`, crate `livemig-dev`) runs the same function
//! over a synthetic guest memory, so what it measures is this code.

use livemig_compact::{Encoder, PageRef};
use livemig_memory::{GuestMemory, PageBuf};
use livemig_track::Ledger;
use livemig_wire::FrameKind;

use crate::error::AgentError;
use crate::link::{Out, Writer};

/// Pages read and encoded together (prepared on `threads` threads).
pub const CHUNK_PAGES: usize = 256;

/// Sends the pages of `list` (page, whole), which must be ascending, and records in the ledger
/// the hash of exactly the bytes sent: a write racing with the copy shows up as a changed page
/// in the next scan. After every batch handed to the writer, `after_batch(pages sent so far,
/// writer)` runs (progress, cancellation); its error stops the sending. Returns the pages sent.
pub fn send_pages(
    mem: &GuestMemory,
    list: &[(u64, bool)],
    ledger: &mut Ledger,
    encoder: &mut Encoder,
    writer: &mut Writer,
    threads: usize,
    mut after_batch: impl FnMut(u64, &Writer) -> Result<(), AgentError>,
) -> Result<u64, AgentError> {
    let mut bufs: Vec<PageBuf> = (0..CHUNK_PAGES.min(list.len())).map(|_| PageBuf::zeroed()).collect();
    let mut sent = 0u64;
    for chunk in list.chunks(CHUNK_PAGES) {
        for (&(page, _), buf) in chunk.iter().zip(bufs.iter_mut()) {
            mem.read_page(page, buf)?;
            ledger.record_page(page, &buf.0);
        }
        let items: Vec<PageRef<'_>> =
            chunk.iter().zip(bufs.iter()).map(|(&(page, whole), buf)| PageRef { page, data: &buf.0, whole }).collect();
        encoder.push_many(&items, threads);
        sent += chunk.len() as u64;
        if encoder.is_full() {
            writer.send(Out::Frame(FrameKind::Pages, encoder.take()))?;
            after_batch(sent, writer)?;
        }
    }
    if !encoder.is_empty() {
        writer.send(Out::Frame(FrameKind::Pages, encoder.take()))?;
    }
    Ok(sent)
}
