//! The server key and what it protects: sealed secrets (XChaCha20-Poly1305), signed tokens
//! (HMAC-SHA256), and hashes of high-entropy one-time secrets.
//!
//! The key is 32 bytes given as 64 hex digits in `CONTROL_API_SECRET`. Two sub-keys are derived
//! from it (HMAC-SHA256 over a label), one for sealing and one for signing, so a token signature
//! can never be confused with a sealed value.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Why the server key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("CONTROL_API_SECRET is not set: give 64 hex digits (e.g. `openssl rand -hex 32`)")]
    Missing,
    #[error("CONTROL_API_SECRET must be 64 hex digits (32 bytes)")]
    Malformed,
}

/// The server's secret key. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct ServerKey {
    seal: [u8; 32],
    sign: [u8; 32],
}

impl std::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerKey(<redacted>)")
    }
}

fn derive(master: &[u8; 32], label: &str) -> [u8; 32] {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(master).expect("HMAC takes any key length");
    mac.update(label.as_bytes());
    mac.finalize().into_bytes().into()
}

impl ServerKey {
    pub fn from_bytes(master: [u8; 32]) -> Self {
        ServerKey {
            seal: derive(&master, "metering/seal/v1"),
            sign: derive(&master, "metering/sign/v1"),
        }
    }

    /// Parses 64 hex digits.
    pub fn from_hex(hex_key: &str) -> Result<Self, KeyError> {
        let bytes = hex::decode(hex_key.trim()).map_err(|_| KeyError::Malformed)?;
        let master: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Malformed)?;
        Ok(Self::from_bytes(master))
    }

    /// From `CONTROL_API_SECRET`.
    pub fn from_env() -> Result<Self, KeyError> {
        match std::env::var("CONTROL_API_SECRET") {
            Ok(v) if !v.trim().is_empty() => Self::from_hex(&v),
            _ => Err(KeyError::Missing),
        }
    }

    /// A random key that lives as long as the process (tests and throw-away servers).
    pub fn ephemeral() -> Self {
        Self::from_bytes(random_bytes())
    }

    /// Encrypts and authenticates `plain`: 24-byte random nonce followed by the ciphertext.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let cipher = XChaCha20Poly1305::new((&self.seal).into());
        let nonce: [u8; 24] = random_bytes();
        let mut out = nonce.to_vec();
        out.extend(
            cipher
                .encrypt(XNonce::from_slice(&nonce), plain)
                .expect("XChaCha20-Poly1305 encrypts any length we store"),
        );
        out
    }

    /// Decrypts what [`seal`](Self::seal) made with this key; `None` if it was altered or sealed
    /// with another key.
    pub fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 24 {
            return None;
        }
        let (nonce, body) = sealed.split_at(24);
        XChaCha20Poly1305::new((&self.seal).into())
            .decrypt(XNonce::from_slice(nonce), body)
            .ok()
    }

    /// `payload.signature`, both base64url: a token only this server can have made.
    pub fn sign_token(&self, payload: &[u8]) -> String {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.sign).expect("any key length");
        mac.update(payload);
        format!(
            "{}.{}",
            B64.encode(payload),
            B64.encode(mac.finalize().into_bytes())
        )
    }

    /// The payload of a token made by [`sign_token`](Self::sign_token), if its signature holds
    /// (compared in constant time).
    pub fn verify_token(&self, token: &str) -> Option<Vec<u8>> {
        let (p, s) = token.split_once('.')?;
        let payload = B64.decode(p).ok()?;
        let sig = B64.decode(s).ok()?;
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.sign).expect("any key length");
        mac.update(&payload);
        mac.verify_slice(&sig).ok()?;
        Some(payload)
    }

    /// HMAC-SHA256 of `data` under the signing key (keyed hashes of webhook bodies and the like).
    pub fn mac(&self, data: &[u8]) -> [u8; 32] {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.sign).expect("any key length");
        mac.update(data);
        mac.finalize().into_bytes().into()
    }
}

/// `N` bytes from the operating system's random source.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    b
}

/// A 256-bit random secret as text, with a recognisable prefix (`mrt_` refresh token, …).
pub fn random_secret(prefix: &str) -> String {
    format!("{prefix}{}", B64.encode(random_bytes::<32>()))
}

/// SHA-256: what is stored of a high-entropy secret (refresh tokens, one-time tokens, codes).
pub fn sha256(text: &str) -> Vec<u8> {
    Sha256::digest(text.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_unaltered_and_with_the_same_key() {
        let k = ServerKey::ephemeral();
        let s = k.seal(b"totp secret");
        assert_eq!(k.open(&s).as_deref(), Some(&b"totp secret"[..]));
        assert_ne!(k.seal(b"totp secret"), s, "nonces differ");
        let mut bad = s.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(k.open(&bad), None);
        assert_eq!(ServerKey::ephemeral().open(&s), None);
        assert_eq!(k.open(&s[..10]), None);
    }

    #[test]
    fn signed_tokens_refuse_tampering_and_other_keys() {
        let k = ServerKey::ephemeral();
        let t = k.sign_token(br#"{"sid":"x"}"#);
        assert_eq!(k.verify_token(&t).as_deref(), Some(&br#"{"sid":"x"}"#[..]));
        let (p, s) = t.split_once('.').expect("dot");
        let forged = format!("{}.{s}", B64.encode(br#"{"sid":"y"}"#));
        assert_eq!(k.verify_token(&forged), None);
        assert_eq!(k.verify_token(&format!("{p}.")), None);
        assert_eq!(k.verify_token("garbage"), None);
        assert_eq!(ServerKey::ephemeral().verify_token(&t), None);
    }

    #[test]
    fn keys_parse_from_hex_and_never_print() {
        let k = ServerKey::from_hex(&"ab".repeat(32)).expect("valid");
        assert_eq!(format!("{k:?}"), "ServerKey(<redacted>)");
        assert!(ServerKey::from_hex("abcd").is_err());
        assert!(ServerKey::from_hex(&"zz".repeat(32)).is_err());
    }
}
