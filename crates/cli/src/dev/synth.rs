//! A synthetic guest memory: a deterministic mix of the page kinds a guest's RAM holds, and the
//! changes of a second pass (pages sent before, then written again).
//!
//! First pass, by page (a hash of the page index and the seed picks the kind):
//!
//! | share | kind | what it is like |
//! |---|---|---|
//! | 25 % | zero | never-used or freed memory |
//! | 20 % | text | English words, digits and punctuation (page cache of text files, logs) |
//! | 15 % | code | x86-64-like instruction sequences with random immediates and offsets |
//! | 15 % | random | incompressible (encrypted or compressed data, key material) |
//! | 10 % | duplicate | a copy of an earlier non-zero page (shared libraries, cloned buffers) |
//! | 15 % | sparse | zero but for 8-40 pointer-like words (heap metadata, page tables) |
//!
//! Second pass: a quarter of the non-zero pages are written again (previously-sent pages):
//! 60 % of them get 1-8 words changed (a delta), 20 % are rewritten with new text, 20 % are
//! rewritten with the same content (as a dirty-bit tracker reports them).

use livemig_compact::PAGE_SIZE;

/// A page kind of the first pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Zero,
    Text,
    Code,
    Random,
    Duplicate,
    Sparse,
}

/// What the second pass does to a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A few words changed.
    Words,
    /// New content (text).
    Rewrite,
    /// Written again with the same content.
    Same,
}

/// splitmix64: a small, fast, deterministic generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0; the bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    fn index(&mut self, n: usize) -> usize {
        usize::try_from(self.below(n as u64)).expect("below a usize")
    }
}

fn mix(seed: u64, page: u64, salt: u64) -> u64 {
    Rng::new(seed ^ page.wrapping_mul(0xa076_1d64_78bd_642f) ^ salt).next_u64()
}

/// The kind of `page` in the first pass.
pub fn kind(seed: u64, page: u64) -> Kind {
    match mix(seed, page, 1) % 100 {
        0..25 => Kind::Zero,
        25..45 => Kind::Text,
        45..60 => Kind::Code,
        60..75 => Kind::Random,
        75..85 if page > 0 => Kind::Duplicate,
        75..85 => Kind::Text,
        _ => Kind::Sparse,
    }
}

/// What the second pass does to `page` (a page that was zero is left alone).
pub fn change(seed: u64, page: u64) -> Option<Change> {
    if kind(seed, page) == Kind::Zero {
        return None;
    }
    match mix(seed, page, 2) % 100 {
        0..15 => Some(Change::Words),
        15..20 => Some(Change::Rewrite),
        20..25 => Some(Change::Same),
        _ => None,
    }
}

const WORDS: [&str; 48] = [
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be", "at", "by",
    "this", "had", "not", "are", "but", "from", "or", "have", "an", "they", "which", "one", "you", "were",
    "memory", "page", "kernel", "migration", "virtual", "machine", "network", "error", "request", "server",
    "value", "return", "function", "struct", "while", "process", "buffer", "system",
];

/// Fills `out` with text.
pub fn text(rng: &mut Rng, out: &mut [u8; PAGE_SIZE]) {
    let mut i = 0;
    while i < PAGE_SIZE {
        let r = rng.next_u64();
        let piece: &[u8] = match r % 16 {
            0 => b"\n",
            1 => b", ",
            2 => b". ",
            3 => {
                let n = (r >> 8) % 100_000;
                let s = format!("{n} ");
                let take = s.len().min(PAGE_SIZE - i);
                out[i..i + take].copy_from_slice(&s.as_bytes()[..take]);
                i += take;
                continue;
            }
            _ => WORDS[usize::try_from((r >> 8) % WORDS.len() as u64).expect("small")].as_bytes(),
        };
        let take = piece.len().min(PAGE_SIZE - i);
        out[i..i + take].copy_from_slice(&piece[..take]);
        i += take;
        if i < PAGE_SIZE && r % 16 > 3 {
            out[i] = b' ';
            i += 1;
        }
    }
}

/// Common x86-64 instruction encodings (opcode bytes; some are followed by an immediate or
/// displacement).
const OPS: [(&[u8], usize); 24] = [
    (&[0x55], 0),
    (&[0x48, 0x89, 0xe5], 0),
    (&[0x48, 0x83, 0xec], 1),
    (&[0x48, 0x8b, 0x45], 1),
    (&[0x48, 0x89, 0x45], 1),
    (&[0x8b, 0x45], 1),
    (&[0x89, 0x45], 1),
    (&[0xe8], 4),
    (&[0xe9], 4),
    (&[0x74], 1),
    (&[0x75], 1),
    (&[0x0f, 0x84], 4),
    (&[0x48, 0x8d, 0x05], 4),
    (&[0x48, 0x8b, 0x05], 4),
    (&[0xc3], 0),
    (&[0x5d], 0),
    (&[0x31, 0xc0], 0),
    (&[0x48, 0x85, 0xc0], 0),
    (&[0x41, 0x57], 0),
    (&[0x41, 0x56], 0),
    (&[0x48, 0x83, 0xc4], 1),
    (&[0xb8], 4),
    (&[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00], 0),
    (&[0x48, 0x39, 0xc7], 0),
];

/// Fills `out` with code-like bytes.
pub fn code(rng: &mut Rng, out: &mut [u8; PAGE_SIZE]) {
    let mut i = 0;
    while i < PAGE_SIZE {
        let (op, imm) = OPS[rng.index(OPS.len())];
        let imm_bytes = rng.next_u64().to_le_bytes();
        // Offsets and immediates are small more often than not.
        let imm_bytes = if imm == 4 && rng.below(2) == 0 { [imm_bytes[0], imm_bytes[1], 0, 0, 0, 0, 0, 0] } else { imm_bytes };
        for &b in op.iter().chain(imm_bytes[..imm].iter()) {
            if i == PAGE_SIZE {
                break;
            }
            out[i] = b;
            i += 1;
        }
    }
}

/// Fills `out` with random bytes.
pub fn random(rng: &mut Rng, out: &mut [u8; PAGE_SIZE]) {
    for w in out.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
}

/// Fills `out` with a sparse page: zero but for some pointer-like words.
pub fn sparse(rng: &mut Rng, out: &mut [u8; PAGE_SIZE]) {
    out.fill(0);
    let n = 8 + rng.below(33);
    for _ in 0..n {
        let w = rng.index(PAGE_SIZE / 8);
        let ptr = 0xffff_8880_0000_0000u64 | (rng.below(1 << 30) << 3);
        out[w * 8..w * 8 + 8].copy_from_slice(&ptr.to_le_bytes());
    }
}

/// The first-pass content of `page`; `earlier` reads an earlier page (for duplicates).
pub fn first(seed: u64, page: u64, out: &mut [u8; PAGE_SIZE], earlier: impl Fn(u64, &mut [u8; PAGE_SIZE])) {
    let mut rng = Rng::new(mix(seed, page, 3));
    match kind(seed, page) {
        Kind::Zero => out.fill(0),
        Kind::Text => text(&mut rng, out),
        Kind::Code => code(&mut rng, out),
        Kind::Random => random(&mut rng, out),
        Kind::Sparse => sparse(&mut rng, out),
        Kind::Duplicate => {
            // The nearest earlier page that is neither zero nor itself a duplicate.
            let mut q = rng.below(page);
            while q > 0 && matches!(kind(seed, q), Kind::Zero | Kind::Duplicate) {
                q -= 1;
            }
            if matches!(kind(seed, q), Kind::Zero | Kind::Duplicate) {
                text(&mut rng, out);
            } else {
                earlier(q, out);
            }
        }
    }
}

/// Applies the second-pass change of `page` to its content `data`.
pub fn apply(seed: u64, page: u64, c: Change, data: &mut [u8; PAGE_SIZE]) {
    let mut rng = Rng::new(mix(seed, page, 4));
    match c {
        Change::Same => {}
        Change::Rewrite => text(&mut rng, data),
        Change::Words => {
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let w = rng.index(PAGE_SIZE / 8);
                let v = rng.next_u64();
                data[w * 8..w * 8 + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_has_every_kind_near_its_share() {
        let n = 20_000u64;
        let mut counts = [0u64; 6];
        for p in 0..n {
            let i = match kind(7, p) {
                Kind::Zero => 0,
                Kind::Text => 1,
                Kind::Code => 2,
                Kind::Random => 3,
                Kind::Duplicate => 4,
                Kind::Sparse => 5,
            };
            counts[i] += 1;
        }
        // Shares in percent, each within 2 points of the table (20 000 draws).
        for (c, want) in counts.iter().zip([25u64, 20, 15, 15, 10, 15]) {
            assert!((c * 100 / n).abs_diff(want) <= 2, "{counts:?}");
        }
    }

    #[test]
    fn pages_are_deterministic_and_duplicates_copy_an_earlier_page() {
        let seed = 11;
        let pages = 400u64;
        let mut mem = vec![[0u8; PAGE_SIZE]; 400];
        for p in 0..pages {
            let (done, rest) = mem.split_at_mut(usize::try_from(p).unwrap());
            first(seed, p, &mut rest[0], |q, out| out.copy_from_slice(&done[usize::try_from(q).unwrap()]));
        }
        let mut again = [0u8; PAGE_SIZE];
        for p in 0..pages {
            first(seed, p, &mut again, |q, out| out.copy_from_slice(&mem[usize::try_from(q).unwrap()]));
            assert_eq!(again, mem[usize::try_from(p).unwrap()], "page {p}");
            let k = kind(seed, p);
            assert_eq!(k == Kind::Zero, mem[usize::try_from(p).unwrap()] == [0u8; PAGE_SIZE], "page {p} {k:?}");
            if k == Kind::Duplicate {
                assert!(mem[..usize::try_from(p).unwrap()].contains(&mem[usize::try_from(p).unwrap()]), "page {p}");
            }
        }
    }

    #[test]
    fn changes_other_than_same_change_the_page() {
        let mut changed = 0;
        for p in 0..2000u64 {
            let Some(c) = change(3, p) else { continue };
            let mut d = [0u8; PAGE_SIZE];
            first(3, p, &mut d, |_, out| out.fill(9));
            let before = d;
            apply(3, p, c, &mut d);
            assert_eq!(c == Change::Same, d == before, "page {p} {c:?}");
            changed += 1;
        }
        assert!(changed > 300, "a quarter of the non-zero pages: {changed}");
    }
}
