//! Content digests in the OCI grammar (`algorithm:encoded`), checked once at the edge.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// A checked OCI content digest such as `sha256:<64 lower-case hex>`.
///
/// Registered algorithms (`sha256`, `sha512`) are held to their exact length and lower-case hex;
/// other algorithms must follow the OCI grammar only.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    text: String,
    colon: usize,
}

impl Digest {
    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Digest::from_sha256(Sha256::digest(bytes).into())
    }

    /// A sha256 digest from its 32 raw bytes.
    pub fn from_sha256(raw: [u8; 32]) -> Digest {
        Digest {
            text: format!("sha256:{}", hex::encode(raw)),
            colon: 6,
        }
    }

    /// The algorithm part (`sha256`).
    pub fn algorithm(&self) -> &str {
        &self.text[..self.colon]
    }

    /// The encoded part (the hex).
    pub fn encoded(&self) -> &str {
        &self.text[self.colon + 1..]
    }

    /// The whole digest as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True for `sha256` digests, the only algorithm this implementation computes.
    pub fn is_sha256(&self) -> bool {
        self.algorithm() == "sha256"
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.text)
    }
}

fn invalid(digest: &str, reason: &'static str) -> Error {
    Error::InvalidDigest {
        digest: digest.to_owned(),
        reason,
    }
}

impl FromStr for Digest {
    type Err = Error;

    /// Parses `algorithm:encoded` per the OCI image spec's descriptor grammar.
    fn from_str(s: &str) -> Result<Self> {
        let colon = s.find(':').ok_or_else(|| invalid(s, "missing ':'"))?;
        let (algorithm, encoded) = (&s[..colon], &s[colon + 1..]);
        if algorithm.is_empty() {
            return Err(invalid(s, "empty algorithm"));
        }
        // algorithm-component ::= [a-z0-9]+, separated by one of + . _ -
        let mut prev_sep = true;
        for c in algorithm.chars() {
            let is_sep = matches!(c, '+' | '.' | '_' | '-');
            if is_sep && prev_sep {
                return Err(invalid(s, "malformed algorithm"));
            }
            if !(is_sep || c.is_ascii_lowercase() || c.is_ascii_digit()) {
                return Err(invalid(s, "malformed algorithm"));
            }
            prev_sep = is_sep;
        }
        if prev_sep {
            return Err(invalid(s, "malformed algorithm"));
        }
        if encoded.is_empty()
            || !encoded
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '=' | '_' | '-'))
        {
            return Err(invalid(s, "malformed encoded part"));
        }
        let expected_len = match algorithm {
            "sha256" => Some(64),
            "sha512" => Some(128),
            _ => None,
        };
        if let Some(len) = expected_len {
            if encoded.len() != len {
                return Err(invalid(s, "wrong length for its algorithm"));
            }
            if !encoded
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
            {
                return Err(invalid(s, "encoded part is not lower-case hex"));
            }
        }
        Ok(Digest {
            text: s.to_owned(),
            colon,
        })
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good() {
        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().expect("valid");
        assert_eq!(d.algorithm(), "sha256");
        assert_eq!(d.encoded().len(), 64);
        assert!("sha512:".to_owned().parse::<Digest>().is_err());
        assert!(
            "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8"
                .parse::<Digest>()
                .is_ok()
        );
    }

    #[test]
    fn rejects_bad() {
        for bad in [
            "",
            "sha256",
            ":abc",
            "sha256:abc",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}", "a".repeat(63)),
            &format!("SHA256:{}", "a".repeat(64)),
            &format!("sha512:{}", "a".repeat(64)),
            "sha256+:aaaa",
            "md5:zz zz",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sha256_of_empty() {
        assert_eq!(
            Digest::sha256_of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
