//! Signed, expiring image URLs that work without an API key: `?expires=UNIX&token=HMAC(hash|expires)`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone)]
pub struct ShareSigner {
    key: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ShareCheck {
    Valid,
    Expired,
    Invalid,
}

impl ShareSigner {
    pub fn new(key: Vec<u8>) -> Self {
        Self { key }
    }

    /// Loads `path` or creates it with 32 random bytes (kept so links survive restarts).
    pub fn load_or_create(path: &std::path::Path) -> std::io::Result<Self> {
        match std::fs::read(path) {
            Ok(k) if k.len() >= 32 => Ok(Self::new(k)),
            _ => {
                let key: Vec<u8> = (0..2)
                    .flat_map(|_| *uuid::Uuid::new_v4().as_bytes())
                    .collect();
                crate::util::write_file_atomic(path, &key)?;
                Ok(Self::new(key))
            }
        }
    }

    fn mac(&self, hash: &str, expires: i64) -> HmacSha256 {
        // new_from_slice only fails for fixed-size MACs; HMAC takes any key length.
        let mut mac = HmacSha256::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(hash.as_bytes());
        mac.update(b"|");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    pub fn sign(&self, hash: &str, expires: i64) -> String {
        hex::encode(self.mac(hash, expires).finalize().into_bytes())
    }

    /// Constant-time check of `token` for `hash` at `now` (Unix seconds).
    pub fn verify(&self, hash: &str, expires: i64, token: &str, now: i64) -> ShareCheck {
        let Ok(raw) = hex::decode(token) else {
            return ShareCheck::Invalid;
        };
        if self.mac(hash, expires).verify_slice(&raw).is_err() {
            return ShareCheck::Invalid;
        }
        if now > expires {
            ShareCheck::Expired
        } else {
            ShareCheck::Valid
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify() {
        let s = ShareSigner::new(b"k".repeat(32));
        let h = "a".repeat(64);
        let t = s.sign(&h, 1000);
        assert_eq!(s.verify(&h, 1000, &t, 999), ShareCheck::Valid);
        assert_eq!(s.verify(&h, 1000, &t, 1001), ShareCheck::Expired);
        assert_eq!(s.verify(&h, 1001, &t, 999), ShareCheck::Invalid);
        assert_eq!(
            s.verify(&"b".repeat(64), 1000, &t, 999),
            ShareCheck::Invalid
        );
        assert_eq!(s.verify(&h, 1000, "zz", 999), ShareCheck::Invalid);
    }
}
