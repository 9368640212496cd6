//! The self-describing header every stored shard carries.
//!
//! A shard file is `MAGIC | u16 LE header length | versioned header | body`. The
//! header names the evidence, stripe, index, code and the body's BLAKE3, so a node
//! can scrub itself without the indexer and the index can be rebuilt from the nodes.

use crate::code::ErasureCode;
use crate::ids::{Blake3Hash, ShardKey};
use crate::wire::DecodeError;
use serde::{Deserialize, Serialize};

/// First bytes of every shard file.
pub const MAGIC: &[u8; 8] = b"CSTDSHRD";
/// Version byte of the header encoding this code writes.
pub const SHARD_HEADER_V1: u8 = 1;
/// Largest encoded header accepted: names and hashes only, never content.
pub const MAX_HEADER_LEN: usize = 1024;

/// What a shard is: sent with every put, stored in front of every body.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ShardHeader {
    pub key: ShardKey,
    pub code: ErasureCode,
    /// Content bytes in this shard's stripe (the rest of the shards is padding),
    /// so an index rebuilt from the nodes knows where the content ends.
    pub stripe_len: u64,
    /// Length of the body that follows.
    pub len: u32,
    /// BLAKE3 of the body.
    pub blake3: Blake3Hash,
}

impl ShardHeader {
    /// Whether the header could describe a shard of its code: a valid code,
    /// an index within it, a body within the shard size, and a stripe whose
    /// content fits the k data shards of that length. A node refuses a put
    /// of any other (a gateway's bug stored quietly would mislead
    /// `recover-index`, which reads these headers back).
    pub fn is_well_formed(&self) -> bool {
        self.code.validate().is_ok()
            && usize::from(self.key.index) < self.code.total()
            && self.len <= self.code.shard_size
            && self.stripe_len <= u64::from(self.len) * self.code.data_shards() as u64
    }

    pub fn encode(&self) -> Vec<u8> {
        crate::wire::encode_versioned(SHARD_HEADER_V1, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        crate::wire::decode_versioned(SHARD_HEADER_V1, bytes)
    }

    /// The bytes that precede the body in a shard file.
    pub fn file_prefix(&self) -> Vec<u8> {
        let header = self.encode();
        let mut out = Vec::with_capacity(MAGIC.len() + 2 + header.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(&header);
        out
    }

    /// Parses the prefix of a shard file; returns the header and where the body
    /// starts. Needs at least `MAGIC.len() + 2 + header length` bytes.
    pub fn parse_file_prefix(bytes: &[u8]) -> Result<(Self, usize), DecodeError> {
        let fixed = MAGIC.len() + 2;
        if bytes.len() < fixed {
            return Err(DecodeError::Truncated);
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        if len > MAX_HEADER_LEN {
            return Err(DecodeError::TooLarge(len));
        }
        let header_bytes = bytes
            .get(fixed..fixed + len)
            .ok_or(DecodeError::Truncated)?;
        Ok((Self::decode(header_bytes)?, fixed + len))
    }

    /// Checks that `body` is what this header describes.
    pub fn matches(&self, body: &[u8]) -> bool {
        body.len() == self.len as usize && Blake3Hash::of(body) == self.blake3
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::EvidenceId;
    use proptest::prelude::*;

    fn header() -> ShardHeader {
        ShardHeader {
            key: ShardKey {
                evidence: EvidenceId([0x22; 16]),
                stripe: 300,
                index: 5,
            },
            code: ErasureCode {
                k: 4,
                m: 2,
                shard_size: 4096,
            },
            stripe_len: 1,
            len: 3,
            blake3: Blake3Hash::of(b"abc"),
        }
    }

    #[test]
    fn shard_file_prefix_golden_bytes() {
        let prefix = header().file_prefix();
        let hex = hex::encode(&prefix);
        // MAGIC "CSTDSHRD", header length 58 (0x3a) little-endian, version 1,
        // evidence id, stripe varint(300) = ac 02, index 5, k 4, m 2,
        // shard size varint(4096) = 80 20, stripe length 1, len 3, BLAKE3("abc").
        let golden = concat!(
            "4353544453485244",
            "3a00",
            "01",
            "22222222222222222222222222222222",
            "ac02",
            "05",
            "04",
            "02",
            "8020",
            "01",
            "03",
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85",
        );
        assert_eq!(hex, golden);
        let (parsed, body_at) = ShardHeader::parse_file_prefix(&prefix).unwrap();
        assert_eq!(parsed, header());
        assert_eq!(body_at, prefix.len());
        assert!(parsed.matches(b"abc"));
        assert!(!parsed.matches(b"abd"));
    }

    #[test]
    fn bad_prefixes_are_refused() {
        let prefix = header().file_prefix();
        assert_eq!(
            ShardHeader::parse_file_prefix(&prefix[..5]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            ShardHeader::parse_file_prefix(&prefix[..20]),
            Err(DecodeError::Truncated)
        );
        let mut bad = prefix.clone();
        bad[0] = b'X';
        assert_eq!(
            ShardHeader::parse_file_prefix(&bad),
            Err(DecodeError::BadMagic)
        );
    }

    /// A header no shard of its code could have is not well formed: an
    /// index past k+m, a body past the shard size, a stripe longer than
    /// its k data shards hold, an invalid code.
    #[test]
    fn impossible_headers_are_not_well_formed() {
        assert!(header().is_well_formed());
        let empty = ShardHeader {
            stripe_len: 0,
            len: 0,
            ..header()
        };
        assert!(empty.is_well_formed());
        let mut h = header();
        h.key.index = 6;
        assert!(!h.is_well_formed(), "index past k+m");
        let mut h = header();
        h.len = 4097;
        assert!(!h.is_well_formed(), "longer than a shard");
        let mut h = header();
        h.stripe_len = 13;
        assert!(!h.is_well_formed(), "a stripe past its data shards");
        h.stripe_len = 12;
        assert!(h.is_well_formed());
        let mut h = header();
        h.code.k = 0;
        assert!(!h.is_well_formed(), "an invalid code");
    }

    proptest! {
        #[test]
        fn prefix_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ShardHeader::parse_file_prefix(&bytes);
        }
    }
}
