//! `livemig_compact::decode_batch` with arbitrary payloads against an in-memory destination
//! (64 guest pages, one disk image of 16 blocks, a snapshot of 16 pages; page 63 unreadable).
//! Input: `[mode][batch]`; mode bit 1 rewrites the fingerprints of references and deltas to what
//! they resolve to, so verified writes are reached too.
//!
//! Contract checked against an independent parse of the records: records are handled in order,
//! each either written or returned as a miss; a write is exactly the record's page and class,
//! with its record length, and its data is whole (zero: zeroes, raw: the bytes, lz4/zstd: the
//! decompressed page) or verified (references and deltas: the fingerprint the record carries,
//! keyed with the harness's page key);
//! only references and deltas miss; `Ok` means every record of the batch was handled.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livemig_compact::{decode_batch, PageClass, RECORD_HEADER};
use livemig_fuzz_common::{
    carried_fingerprint, decompress, fix_fingerprints, page_key, records, FakeDest, COMPACT_FIX_FINGERPRINTS, RAM_PAGES,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, batch)) = data.split_first() else { return };
    let mut batch = batch.to_vec();
    if mode & COMPACT_FIX_FINGERPRINTS != 0 {
        fix_fingerprints(&mut batch);
    }
    let mut dest = FakeDest::default();
    let result = decode_batch(&batch, RAM_PAGES, page_key(), &mut dest);
    let recs = records(&batch);

    let (written, misses) = match &result {
        Ok(s) => (s.pages_written as usize, s.misses.clone()),
        // On error the summary is lost: the writes made are still checked below.
        Err(_) => (dest.writes.len(), Vec::new()),
    };
    assert_eq!(written, dest.writes.len(), "pages_written differs from the writes made");
    let handled = written + misses.len();
    if result.is_ok() {
        assert_eq!(handled, recs.len(), "Ok, but not every record was handled");
        let end = recs.last().map_or(0, |r| r.at + RECORD_HEADER + r.len);
        assert_eq!(end, batch.len(), "Ok on a batch with trailing bytes");
    }
    let (mut w, mut m) = (dest.writes.iter().peekable(), misses.iter().peekable());
    for r in &recs {
        let Some(class) = PageClass::from_u8(r.class) else { break };
        let rec_data = &batch[r.at + RECORD_HEADER..r.at + RECORD_HEADER + r.len];
        let record_len = RECORD_HEADER + r.len;
        let verified = carried_fingerprint(class, rec_data);
        // A reference or delta is written only when what it resolves to has its fingerprint.
        // (Records with equal page, class and length are told apart by that alone.)
        let write_fits = w.peek().is_some_and(|(p, c, d, l)| {
            (*p, *c, *l) == (r.page, class, record_len) && verified.is_some_and(|(_, fp)| page_key().fingerprint(d) == fp)
        });
        if verified.is_some() && !write_fits {
            if result.is_ok() {
                let miss = m.next().expect("a reference or delta neither written nor missed");
                assert_eq!((miss.page, miss.class, miss.record_len), (r.page, class, record_len), "miss out of step");
            }
            // On an error the misses are not returned: this one is assumed missed, and a write of
            // it with data that does not verify shows up as a write out of step below.
            continue;
        }
        let Some((page, wclass, wdata, wlen)) = w.next() else { break };
        assert_eq!((*page, *wclass, *wlen), (r.page, class, record_len), "write out of step with the records");
        match class {
            PageClass::Zero => assert!(wdata.iter().all(|&b| b == 0), "zero page written with data"),
            PageClass::Raw => assert_eq!(&wdata[..], rec_data, "raw page written with other data"),
            PageClass::Lz4 | PageClass::Zstd => {
                assert_eq!(decompress(class, rec_data).as_ref(), Some(&**wdata), "{class:?} page is not its decompression")
            }
            _ => {} // verified: write_fits checked its fingerprint
        }
    }
    assert!(w.next().is_none(), "more writes than records");
    assert!(m.next().is_none(), "misses that match no record");
});
