//! Identifiers: [`EvidenceId`] (time-ordered UUIDv7), [`NodeId`], [`ShardKey`]
//! and the two content hashes, [`Blake3Hash`] and [`Sha256Hash`].

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A piece of evidence: a UUIDv7, so ids sort by filing time. Two filings of the
/// same bytes are two pieces of evidence with one content root.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EvidenceId(pub [u8; 16]);

impl EvidenceId {
    /// Mints an id from the filing time and 10 random bytes supplied by the caller
    /// (this crate does no I/O, so it neither reads the clock nor draws randomness).
    pub fn new(unix_millis: u64, random: [u8; 10]) -> Self {
        let id = uuid::Builder::from_unix_timestamp_millis(unix_millis, &random).into_uuid();
        EvidenceId(*id.as_bytes())
    }

    /// Milliseconds since the Unix epoch embedded in the id.
    pub fn unix_millis(&self) -> u64 {
        let b = &self.0;
        u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for EvidenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        uuid::Uuid::from_bytes(self.0).hyphenated().fmt(f)
    }
}

impl fmt::Debug for EvidenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EvidenceId({self})")
    }
}

/// Why a textual id or hash was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseIdError {
    /// Not a UUID in any of the usual spellings.
    #[error("not a valid evidence id (expected a UUID)")]
    BadUuid,
    /// Not 64 hexadecimal digits.
    #[error("not a valid hash (expected 64 hex digits)")]
    BadHash,
}

impl FromStr for EvidenceId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let id = uuid::Uuid::parse_str(s).map_err(|_| ParseIdError::BadUuid)?;
        Ok(EvidenceId(*id.as_bytes()))
    }
}

/// A storage node's identity within a cluster, assigned when the node is added.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

macro_rules! hash_type {
    ($name:ident, $what:literal) => {
        #[doc = $what]
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s.trim(), &mut out).map_err(|_| ParseIdError::BadHash)?;
                Ok($name(out))
            }
        }
    };
}

hash_type!(
    Blake3Hash,
    "A BLAKE3-256 digest: content roots and shard hashes."
);
hash_type!(
    Sha256Hash,
    "A SHA-256 digest: the content hash forensic tools speak."
);

impl From<blake3::Hash> for Blake3Hash {
    fn from(h: blake3::Hash) -> Self {
        Blake3Hash(*h.as_bytes())
    }
}

impl Blake3Hash {
    /// The BLAKE3 hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        blake3::hash(bytes).into()
    }
}

/// Where one shard lives logically: evidence, stripe number, shard index within
/// the stripe (`0..k` data, `k..k+m` parity).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct ShardKey {
    pub evidence: EvidenceId,
    pub stripe: u64,
    pub index: u8,
}

impl fmt::Display for ShardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.evidence, self.stripe, self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_ids_sort_by_time_and_round_trip_as_text() {
        let a = EvidenceId::new(1_700_000_000_000, [0xff; 10]);
        let b = EvidenceId::new(1_700_000_000_001, [0x00; 10]);
        assert!(a < b, "a later id must sort after an earlier one");
        assert_eq!(a.unix_millis(), 1_700_000_000_000);
        let text = a.to_string();
        assert_eq!(text.len(), 36);
        assert_eq!(text.as_bytes()[14], b'7', "UUID version nibble must be 7");
        assert_eq!(text.parse::<EvidenceId>(), Ok(a));
        assert_eq!("nope".parse::<EvidenceId>(), Err(ParseIdError::BadUuid));
    }

    #[test]
    fn hashes_parse_only_64_hex_digits() {
        let h = Blake3Hash::of(b"abc");
        assert_eq!(h.to_hex().parse::<Blake3Hash>(), Ok(h));
        assert!("abc".parse::<Blake3Hash>().is_err());
        assert!("zz".repeat(32).parse::<Sha256Hash>().is_err());
    }
}
