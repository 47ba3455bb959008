//! Self-checking page format.
//!
//! ```text
//! offset  0  u64 LE  MAGIC
//! offset  8  u64 LE  page index
//! offset 16  u64 LE  generation (1 = first write, +1 per rewrite)
//! offset 24  u64 LE  checksum over the whole page, computed with this field as zero
//! offset 32  ...     pseudo-random bytes derived from (index, generation)
//! ```

pub const PAGE_SIZE: usize = 4096;
pub const MAGIC: u64 = 0x4c4d_5047_5041_4745; // "LMPGPAGE"
const HEADER: usize = 32;

/// Why a page failed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    Magic,
    Index,
    Checksum,
    Generation,
}

impl Bad {
    pub fn as_str(self) -> &'static str {
        match self {
            Bad::Magic => "magic",
            Bad::Index => "index",
            Bad::Checksum => "checksum",
            Bad::Generation => "generation",
        }
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn word(page: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&page[i * 8..i * 8 + 8]);
    u64::from_le_bytes(b)
}

fn checksum(page: &[u8]) -> u64 {
    let mut h: u64 = 0x243f_6a88_85a3_08d3;
    for (i, c) in page.chunks_exact(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        let w = if i == 3 { 0 } else { u64::from_le_bytes(b) };
        h = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
    splitmix(h)
}

/// Fills `page` (PAGE_SIZE bytes) for (index, generation).
pub fn write(page: &mut [u8], index: u64, generation: u64) {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    page[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    page[8..16].copy_from_slice(&index.to_le_bytes());
    page[16..24].copy_from_slice(&generation.to_le_bytes());
    page[24..32].copy_from_slice(&0u64.to_le_bytes());
    let mut s = splitmix(index ^ generation.rotate_left(40) ^ MAGIC);
    for c in page[HEADER..].chunks_exact_mut(8) {
        // xorshift64*
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        c.copy_from_slice(&s.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    let sum = checksum(page);
    page[24..32].copy_from_slice(&sum.to_le_bytes());
}

/// Generation stored in the page header (meaningful only if the page is otherwise valid).
pub fn generation(page: &[u8]) -> u64 {
    word(page, 2)
}

/// Checks a page: magic, index, checksum, then generation == `expected_gen`.
pub fn verify(page: &[u8], index: u64, expected_gen: u64) -> Result<(), Bad> {
    if word(page, 0) != MAGIC {
        return Err(Bad::Magic);
    }
    if word(page, 1) != index {
        return Err(Bad::Index);
    }
    if word(page, 3) != checksum(page) {
        return Err(Bad::Checksum);
    }
    if word(page, 2) != expected_gen {
        return Err(Bad::Generation);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_page_verifies() {
        let mut p = vec![0u8; PAGE_SIZE];
        write(&mut p, 7, 3);
        assert_eq!(verify(&p, 7, 3), Ok(()));
        assert_eq!(generation(&p), 3);
    }

    #[test]
    fn flipped_byte_fails_checksum() {
        let mut p = vec![0u8; PAGE_SIZE];
        write(&mut p, 7, 3);
        for off in [32, 100, 2048, PAGE_SIZE - 1] {
            let mut q = p.clone();
            q[off] ^= 0x01;
            assert_eq!(verify(&q, 7, 3), Err(Bad::Checksum), "offset {off}");
        }
        let mut q = p.clone();
        q[16] ^= 0x80; // generation field itself
        assert_eq!(verify(&q, 7, 3), Err(Bad::Checksum));
    }

    #[test]
    fn older_generation_fails_generation() {
        let mut p = vec![0u8; PAGE_SIZE];
        write(&mut p, 9, 4);
        assert_eq!(verify(&p, 9, 5), Err(Bad::Generation));
    }

    #[test]
    fn wrong_index_and_magic() {
        let mut p = vec![0u8; PAGE_SIZE];
        write(&mut p, 9, 1);
        assert_eq!(verify(&p, 10, 1), Err(Bad::Index));
        let z = vec![0u8; PAGE_SIZE];
        assert_eq!(verify(&z, 0, 1), Err(Bad::Magic));
    }

    #[test]
    fn content_differs_between_generations_and_pages() {
        let mut a = vec![0u8; PAGE_SIZE];
        let mut b = vec![0u8; PAGE_SIZE];
        write(&mut a, 1, 1);
        write(&mut b, 1, 2);
        assert_ne!(a[HEADER..], b[HEADER..]);
        write(&mut b, 2, 1);
        assert_ne!(a[HEADER..], b[HEADER..]);
        // Not trivially compressible: few repeated words.
        let mut words: Vec<u64> = (4..PAGE_SIZE / 8).map(|i| word(&a, i)).collect();
        words.sort_unstable();
        words.dedup();
        assert!(words.len() > 500);
    }
}
