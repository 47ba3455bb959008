//! The per-migration page key: what makes page hashes, reference fingerprints and memory
//! digests unpredictable to the guest.
//!
//! Unkeyed xxh3 is public: a guest can compute it, so it could craft two page contents with the
//! same hash and have a write go unnoticed (the content tracker sees no change) or a reference
//! accepted for the wrong content. Keyed with a secret the guest never sees, the same function
//! leaves the guest nothing to search offline: it does not know which of its pages collide.
//!
//! The key is 32 bytes agreed per migration (over TLS from the session's keying-material
//! exporter; on a plain link picked by the receiver and sent in its `welcome`). It is expanded
//! once, with blake3 in key-derivation mode, into a 192-byte xxh3 secret; hashing then runs
//! xxh3 with that secret, at the speed of unkeyed xxh3 (same code, another secret).
//!
//! **What it is not:** keyed xxh3 is not a cryptographic MAC. Its output over chosen inputs can
//! leak information about the secret to someone who sees both, so it is no defence against a
//! party that sees the hashes (the network on a plain link: integrity against the network is
//! TLS's job). What it gives: an attacker that controls page contents but never sees the key or
//! a keyed hash (the guest) cannot choose contents that collide except by chance.

use std::fmt;

use xxhash_rust::xxh3::{xxh3_128_with_secret, xxh3_64_with_secret, Xxh3};

use crate::PAGE_SIZE;

/// Bytes of a page key.
pub const PAGE_KEY_LEN: usize = 32;

/// Bytes of the xxh3 secret expanded from a key (xxh3's default secret size: same block
/// structure, so the same speed).
const SECRET_LEN: usize = 192;

/// blake3 key-derivation context of the xxh3 secret.
const DERIVE_CONTEXT: &str = "livemig page key xxh3 secret v1";

/// A per-migration page key and the xxh3 secret expanded from it.
#[derive(Clone)]
pub struct PageKey {
    key: [u8; PAGE_KEY_LEN],
    secret: [u8; SECRET_LEN],
    zero_hash: u64,
    zero_fp: u128,
}

impl fmt::Debug for PageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key itself: reports and logs may print a Debug.
        f.write_str("PageKey(..)")
    }
}

impl PartialEq for PageKey {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for PageKey {}

impl PageKey {
    /// The key of these 32 bytes.
    pub fn from_bytes(key: [u8; PAGE_KEY_LEN]) -> PageKey {
        let mut secret = [0u8; SECRET_LEN];
        blake3::Hasher::new_derive_key(DERIVE_CONTEXT).update(&key).finalize_xof().fill(&mut secret);
        let zero = [0u8; PAGE_SIZE];
        let zero_hash = xxh3_64_with_secret(&zero, &secret);
        let zero_fp = xxh3_128_with_secret(&zero, &secret);
        PageKey { key, secret, zero_hash, zero_fp }
    }

    /// The key as 64 lowercase hex digits (what a plain link's `welcome` carries).
    pub fn to_hex(&self) -> String {
        self.key.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The key from exactly 64 hex digits.
    pub fn from_hex(hex: &str) -> Option<PageKey> {
        if hex.len() != 2 * PAGE_KEY_LEN || !hex.is_ascii() {
            return None;
        }
        let mut key = [0u8; PAGE_KEY_LEN];
        for (i, b) in key.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(PageKey::from_bytes(key))
    }

    /// Keyed 64-bit hash of a page: the content tracker's ledger and the memory digests. It is
    /// the low 64 bits of [`PageKey::fingerprint`] (for inputs above 240 bytes xxh3-64 and the
    /// low half of xxh3-128 merge the same accumulators with the same secret words; tested), so
    /// a caller that has the fingerprint gets it for free with [`PageKey::hash_of`]; this
    /// computes only the 64 bits, for the tracker, which needs no more.
    #[inline]
    pub fn hash_page(&self, page: &[u8; PAGE_SIZE]) -> u64 {
        xxh3_64_with_secret(page, &self.secret)
    }

    /// [`PageKey::hash_page`] of a page whose [`PageKey::fingerprint`] is `fp`: one hash of the
    /// page serves the ledger, the digests and the records' fingerprint.
    #[inline]
    #[allow(clippy::cast_possible_truncation)] // the low half, on purpose
    pub fn hash_of(fp: u128) -> u64 {
        fp as u64
    }

    /// Keyed 128-bit fingerprint of a page: what a reference or delta record carries and the
    /// receiver checks (see [`crate::decode_batch`]).
    #[inline]
    pub fn fingerprint(&self, page: &[u8; PAGE_SIZE]) -> u128 {
        xxh3_128_with_secret(page, &self.secret)
    }

    /// [`PageKey::hash_page`] of the zero page.
    pub fn zero_hash(&self) -> u64 {
        self.zero_hash
    }

    /// [`PageKey::fingerprint`] of the zero page.
    pub fn zero_fingerprint(&self) -> u128 {
        self.zero_fp
    }

    /// A streaming keyed xxh3 (128-bit digest): the stream engine's end-to-end digest.
    pub fn stream_hasher(&self) -> Xxh3 {
        Xxh3::with_secret(self.secret)
    }
}

/// Two different pages with the same **unkeyed** xxh3-64 and xxh3-128 (hence the same lookup
/// [`crate::fingerprint`]), made the way a guest could make them: xxh3 adds every 8-byte word
/// of the input to one accumulator lane and the product of the two halves of (word XOR secret
/// word) to the neighbouring lane. A word equal to its secret word adds a product of 0, and so
/// does that word plus 2^32 (same low half); moving 2^32 from one such word to another of the
/// same lane in the same block leaves every accumulator, so the hash, unchanged. The secret of
/// unkeyed xxh3 is public. With a secret derived from the migration's [`PageKey`] the words to
/// use are unknown, and the two pages hash differently. For tests (of the tracker and the codec)
/// and to show why the keys exist.
pub fn unkeyed_collision() -> ([u8; PAGE_SIZE], [u8; PAGE_SIZE]) {
    // The first 16 bytes of xxh3's public default secret (kSecret).
    const S0: u64 = u64::from_le_bytes([0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe]);
    const S1: u64 = u64::from_le_bytes([0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c]);
    let mut a = [0u8; PAGE_SIZE];
    for (i, b) in a.iter_mut().enumerate() {
        *b = u8::try_from((i * 131 + i / 256) % 256).expect("below 256");
    }
    let mut b = a;
    // Lane 0 of stripes 0 and 1 (bytes 0..8 and 64..72) use secret words 0 and 1.
    a[..8].copy_from_slice(&S0.to_le_bytes());
    a[64..72].copy_from_slice(&S1.to_le_bytes());
    b[..8].copy_from_slice(&S0.wrapping_add(1 << 32).to_le_bytes());
    b[64..72].copy_from_slice(&S1.wrapping_sub(1 << 32).to_le_bytes());
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8) -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        for (i, b) in p.iter_mut().enumerate() {
            *b = u8::try_from(i % 251).expect("small") ^ seed;
        }
        p
    }

    #[test]
    fn same_data_different_keys_different_hashes() {
        let a = PageKey::from_bytes([1; PAGE_KEY_LEN]);
        let b = PageKey::from_bytes([2; PAGE_KEY_LEN]);
        for s in [0u8, 1, 77] {
            let p = page(s);
            assert_ne!(a.fingerprint(&p), b.fingerprint(&p));
            assert_ne!(a.hash_page(&p), b.hash_page(&p));
            // Neither is the public, unkeyed hash a guest can compute.
            assert_ne!(a.fingerprint(&p), crate::fingerprint(&p));
            assert_ne!(a.hash_page(&p), xxhash_rust::xxh3::xxh3_64(&p));
        }
        assert_ne!(a.zero_fingerprint(), b.zero_fingerprint());
        // One bit of key changes the hashes.
        let mut k = [1; PAGE_KEY_LEN];
        k[31] ^= 1;
        assert_ne!(PageKey::from_bytes(k).fingerprint(&page(3)), a.fingerprint(&page(3)));
    }

    proptest::proptest! {
        /// The ledger hash is the low half of the fingerprint, for any key and page (zero, a
        /// pattern, or noise), so one hash of a page can serve both.
        #[test]
        fn the_page_hash_is_the_low_half_of_the_fingerprint(
            k in proptest::array::uniform32(proptest::num::u8::ANY),
            fill in proptest::num::u8::ANY,
            noise in proptest::collection::vec(proptest::num::u8::ANY, 0..PAGE_SIZE),
        ) {
            let key = PageKey::from_bytes(k);
            let mut p = [fill; PAGE_SIZE];
            p[..noise.len()].copy_from_slice(&noise);
            proptest::prop_assert_eq!(key.hash_page(&p), PageKey::hash_of(key.fingerprint(&p)));
            // A one-bit change moves both.
            let mut q = p;
            q[PAGE_SIZE - 1] ^= 1;
            proptest::prop_assert_ne!(key.hash_page(&q), key.hash_page(&p));
        }
    }

    #[test]
    fn a_guest_can_collide_unkeyed_xxh3_but_not_keyed() {
        let (a, b) = unkeyed_collision();
        assert_ne!(a, b);
        assert_eq!(xxhash_rust::xxh3::xxh3_64(&a), xxhash_rust::xxh3::xxh3_64(&b), "unkeyed 64-bit collision");
        assert_eq!(crate::fingerprint(&a), crate::fingerprint(&b), "unkeyed 128-bit collision");
        for k in [[0u8; PAGE_KEY_LEN], [1; PAGE_KEY_LEN], [0xa5; PAGE_KEY_LEN]] {
            let key = PageKey::from_bytes(k);
            assert_ne!(key.hash_page(&a), key.hash_page(&b));
            assert_ne!(key.fingerprint(&a), key.fingerprint(&b));
        }
    }

    #[test]
    fn same_key_same_hashes_and_hex_roundtrip() {
        let a = PageKey::from_bytes([9; PAGE_KEY_LEN]);
        let b = PageKey::from_hex(&a.to_hex()).expect("hex");
        assert_eq!(a, b);
        assert_eq!(a.fingerprint(&page(5)), b.fingerprint(&page(5)));
        assert_eq!(a.zero_hash(), a.hash_page(&[0; PAGE_SIZE]));
        assert_eq!(a.zero_fingerprint(), a.fingerprint(&[0; PAGE_SIZE]));
        let mut h = a.stream_hasher();
        h.update(&page(5)[..100]);
        h.update(&page(5)[100..]);
        assert_eq!(h.digest128(), a.fingerprint(&page(5)), "streaming and one-shot agree");
        assert_eq!(PageKey::hash_of(a.zero_fingerprint()), a.zero_hash());
        assert!(PageKey::from_hex("00").is_none());
        assert!(PageKey::from_hex(&"zz".repeat(32)).is_none());
        assert!(PageKey::from_hex(&"é".repeat(32)).is_none());
        assert_eq!(format!("{a:?}"), "PageKey(..)", "Debug never shows the key");
    }
}
