//! OCI content digests (`sha256:<64 lower-case hex>`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A sha256 content digest. Other algorithms are rejected: sha256 is the one every OCI
/// implementation must support, and a store accepting more would need more hashing.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// The raw 32 bytes.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 hex characters, without the algorithm.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub(crate) fn from_hasher(h: Sha256) -> Digest {
        Digest(h.finalize().into())
    }
}

/// A string that is not a `sha256:<64 hex>` digest. Converts into the crate's
/// [`Error::InvalidInput`](crate::Error::InvalidInput).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {value:?}: {reason}")]
pub struct InvalidDigest {
    /// The string given.
    pub value: String,
    /// Why it is not a digest.
    pub reason: &'static str,
}

impl FromStr for Digest {
    type Err = InvalidDigest;
    fn from_str(s: &str) -> Result<Digest, InvalidDigest> {
        let bad = |reason: &'static str| InvalidDigest { value: s.to_owned(), reason };
        let hex_part = s.strip_prefix("sha256:").ok_or_else(|| bad("must start with \"sha256:\""))?;
        if hex_part.len() != 64 || !hex_part.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(bad("must have 64 lower-case hex characters after \"sha256:\""));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| bad("invalid hex"))?;
        Ok(Digest(out))
    }
}

impl TryFrom<String> for Digest {
    type Error = InvalidDigest;
    fn try_from(s: String) -> Result<Digest, InvalidDigest> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let d = Digest::of(b"");
        assert_eq!(d.to_string(), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(d.to_string().parse::<Digest>().expect("parses"), d);
    }

    #[test]
    fn rejects_malformed_digests_naming_them() {
        for bad in
            ["", "sha256:", "sha512:abcd", "sha256:ABCDEF", &format!("sha256:{}", "0".repeat(63)), &format!("sha256:{}g", "0".repeat(63))]
        {
            let err = bad.parse::<Digest>().expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }
}
