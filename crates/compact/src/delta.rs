//! Word-run delta of a page against its previous version.
//!
//! Runs of changed 8-byte words: `first word: u16 LE`, `words: u16 LE`, `8 x words` bytes.
//! Encoding compares 64-byte blocks first (memcmp speed) and looks at words only inside blocks
//! that differ, so a page with a few changed words costs little more than one compare.

use crate::PAGE_SIZE;

const WORDS: usize = PAGE_SIZE / 8;
const RUN_HEADER: usize = 4;

#[inline]
fn word(p: &[u8; PAGE_SIZE], i: usize) -> u64 {
    u64::from_ne_bytes(p[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

/// Appends the runs that turn `base` into `new` to `out`; returns false (leaving `out` with
/// partial data the caller discards) as soon as the runs would exceed `limit` bytes.
pub fn delta_encode(base: &[u8; PAGE_SIZE], new: &[u8; PAGE_SIZE], out: &mut Vec<u8>, limit: usize) -> bool {
    let start_len = out.len();
    let mut i = 0usize;
    while i < WORDS {
        if i & 7 == 0 && base[i * 8..i * 8 + 64] == new[i * 8..i * 8 + 64] {
            i += 8;
            continue;
        }
        if word(base, i) == word(new, i) {
            i += 1;
            continue;
        }
        let first = i;
        while i < WORDS && word(base, i) != word(new, i) {
            i += 1;
        }
        let n = i - first;
        if out.len() - start_len + RUN_HEADER + n * 8 > limit {
            return false;
        }
        out.extend_from_slice(&u16::try_from(first).expect("word index < 512").to_le_bytes());
        out.extend_from_slice(&u16::try_from(n).expect("run <= 512 words").to_le_bytes());
        out.extend_from_slice(&new[first * 8..i * 8]);
    }
    true
}

/// Applies runs to `page` (which holds the base); false if the runs are malformed (a run out of
/// the page, empty or cut short). `page` may be partly changed when false is returned.
pub fn delta_apply(page: &mut [u8; PAGE_SIZE], mut runs: &[u8]) -> bool {
    while !runs.is_empty() {
        let Some(head) = runs.get(..RUN_HEADER) else { return false };
        let first = usize::from(u16::from_le_bytes([head[0], head[1]]));
        let n = usize::from(u16::from_le_bytes([head[2], head[3]]));
        if n == 0 || first + n > WORDS {
            return false;
        }
        let Some(data) = runs.get(RUN_HEADER..RUN_HEADER + n * 8) else { return false };
        page[first * 8..(first + n) * 8].copy_from_slice(data);
        runs = &runs[RUN_HEADER + n * 8..];
    }
    true
}
