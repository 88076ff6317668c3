//! The API key contract shared by control-api (which issues keys) and the ingest edge (which
//! verifies them): a key is `mk_` followed by 64 hex digits (256 random bits); only its SHA-256
//! is stored. With that much entropy a fast hash is as safe as a slow one and lets the edge verify
//! keys at line rate.

use sha2::{Digest, Sha256};

/// Every key starts with this, so leaked keys are easy to recognise (secret scanners).
pub const KEY_PREFIX: &str = "mk_";
/// How many leading characters of a key are stored and shown, to tell keys apart.
pub const DISPLAY_PREFIX_LEN: usize = 11;

/// A new random key. Shown to its owner once, never stored.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

/// SHA-256 of the key's text: what the database stores and the edge looks up.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The first characters of a key, safe to store and display.
pub fn display_prefix(key: &str) -> &str {
    let end = key
        .char_indices()
        .nth(DISPLAY_PREFIX_LEN)
        .map_or(key.len(), |(i, _)| i);
    &key[..end]
}

/// Whether `key` has the shape of one of our keys (cheap check before any lookup).
pub fn well_formed(key: &str) -> bool {
    key.len() == KEY_PREFIX.len() + 64
        && key.starts_with(KEY_PREFIX)
        && key[KEY_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_well_formed_distinct_and_hash_stably() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert!(well_formed(&a) && well_formed(&b));
        assert_eq!(hash(&a), hash(&a));
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(display_prefix(&a), &a[..DISPLAY_PREFIX_LEN]);
        assert!(!well_formed("mk_xyz"));
        assert!(!well_formed(&a.to_uppercase()));
    }
}
