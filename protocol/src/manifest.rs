//! The manifest: what the indexer stores for one piece of evidence.
//!
//! It is split the way the index stores it, so a 1 TiB video never needs one huge
//! value: a small [`ManifestHeader`] (who, what, when, the content roots, the code)
//! and one [`StripeRecord`] per stripe (where each shard lives and its hash). Both
//! are versioned: a leading version byte, then a postcard body; old versions stay
//! decodable forever.

use crate::code::ErasureCode;
use crate::ids::{Blake3Hash, EvidenceId, NodeId, Sha256Hash};
use crate::wire::DecodeError;
use serde::{Deserialize, Serialize};

/// Version byte of the header encoding this code writes.
pub const MANIFEST_HEADER_V1: u8 = 1;
/// Version byte of the stripe-record encoding this code writes.
pub const STRIPE_RECORD_V1: u8 = 1;

/// The filing itself: one small value, written last, that makes evidence visible.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ManifestHeader {
    pub evidence: EvidenceId,
    pub tenant: String,
    pub case: Option<String>,
    pub blake3: Blake3Hash,
    pub sha256: Sha256Hash,
    pub size: u64,
    pub media_type: Option<String>,
    pub file_name: Option<String>,
    pub submitter: Option<String>,
    /// Filing time by the operator's clock, milliseconds since the Unix epoch.
    pub filed_at_ms: u64,
    pub code: ErasureCode,
    pub stripes: u64,
    /// COMPLIANCE retention: no deletion before this time.
    pub retain_until_ms: Option<u64>,
    pub legal_hold: bool,
}

/// Where one shard of a stripe lives and what it hashes to.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ShardPlacement {
    /// The node holding it; `None` when a degraded write left it unplaced and the
    /// stripe waits for repair.
    pub node: Option<NodeId>,
    pub blake3: Blake3Hash,
}

impl ShardPlacement {
    /// The hash of a shard nobody could read when its record was written
    /// (`recover-index` of a stripe short of k shards): all zeros.
    pub const UNKNOWN_HASH: Blake3Hash = Blake3Hash([0; 32]);
}

/// One stripe: its shards in index order (`k` data then `m` parity).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct StripeRecord {
    /// Bumped by every placement change; repair and drain compare-and-set on it.
    pub version: u64,
    /// Bytes per shard in this stripe.
    pub shard_len: u32,
    pub shards: Vec<ShardPlacement>,
}

impl StripeRecord {
    /// Shards without a node: a degraded stripe waiting for repair.
    pub fn missing(&self) -> usize {
        self.shards.iter().filter(|s| s.node.is_none()).count()
    }
}

impl ManifestHeader {
    pub fn encode(&self) -> Vec<u8> {
        crate::wire::encode_versioned(MANIFEST_HEADER_V1, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        crate::wire::decode_versioned(MANIFEST_HEADER_V1, bytes)
    }
}

impl StripeRecord {
    pub fn encode(&self) -> Vec<u8> {
        crate::wire::encode_versioned(STRIPE_RECORD_V1, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        crate::wire::decode_versioned(STRIPE_RECORD_V1, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample_header() -> ManifestHeader {
        ManifestHeader {
            evidence: EvidenceId([0x11; 16]),
            tenant: "court".into(),
            case: Some("C-1".into()),
            blake3: Blake3Hash([0xaa; 32]),
            sha256: Sha256Hash([0xbb; 32]),
            size: 5,
            media_type: None,
            file_name: Some("a.mp4".into()),
            submitter: None,
            filed_at_ms: 1,
            code: ErasureCode {
                k: 4,
                m: 2,
                shard_size: 1 << 20,
            },
            stripes: 1,
            retain_until_ms: None,
            legal_hold: false,
        }
    }

    /// Pins the v1 header encoding: changing it breaks every stored manifest.
    #[test]
    fn header_v1_golden_bytes() {
        let bytes = sample_header().encode();
        let expected = concat!(
            "01",                               // version
            "11111111111111111111111111111111", // evidence id (16 bytes)
            "05",
            "636f757274", // tenant "court"
            "01",
            "03",
            "432d31", // case Some("C-1")
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", // blake3
            "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", // sha256
            "05",     // size varint
            "00",     // media type None
            "01",
            "05",
            "612e6d7034", // file name Some("a.mp4")
            "00",         // submitter None
            "01",         // filed_at_ms
            "04",
            "02",
            "808040", // code k, m, shard_size varint(1 MiB)
            "01",     // stripes
            "00",     // retain_until None
            "00",     // legal hold false
        );
        assert_eq!(hex::encode(&bytes), expected);
        assert_eq!(ManifestHeader::decode(&bytes).unwrap(), sample_header());
    }

    #[test]
    fn stripe_record_v1_golden_bytes() {
        let rec = StripeRecord {
            version: 3,
            shard_len: 4096,
            shards: vec![
                ShardPlacement {
                    node: Some(NodeId(7)),
                    blake3: Blake3Hash([1; 32]),
                },
                ShardPlacement {
                    node: None,
                    blake3: Blake3Hash([2; 32]),
                },
            ],
        };
        let bytes = rec.encode();
        let expected = concat!(
            "01",
            "03",
            "8020",
            "02",
            "01",
            "07",
            "0101010101010101010101010101010101010101010101010101010101010101",
            "00",
            "0202020202020202020202020202020202020202020202020202020202020202",
        );
        assert_eq!(hex::encode(&bytes), expected);
        assert_eq!(StripeRecord::decode(&bytes).unwrap(), rec);
        assert_eq!(rec.missing(), 1);
    }

    #[test]
    fn unknown_versions_and_trailing_bytes_are_refused() {
        let mut bytes = sample_header().encode();
        bytes[0] = 9;
        assert_eq!(
            ManifestHeader::decode(&bytes),
            Err(DecodeError::UnknownVersion(9))
        );
        let mut bytes = sample_header().encode();
        bytes.push(0);
        assert_eq!(
            ManifestHeader::decode(&bytes),
            Err(DecodeError::TrailingBytes)
        );
        assert_eq!(ManifestHeader::decode(&[]), Err(DecodeError::Truncated));
    }

    proptest! {
        #[test]
        fn header_round_trips(tenant in ".{0,40}", case in proptest::option::of(".{0,40}"),
                              size in any::<u64>(), t in any::<u64>(), id in any::<[u8; 16]>(),
                              hold in any::<bool>(), retain in proptest::option::of(any::<u64>())) {
            let mut h = sample_header();
            h.tenant = tenant; h.case = case; h.size = size; h.filed_at_ms = t;
            h.evidence = EvidenceId(id); h.legal_hold = hold; h.retain_until_ms = retain;
            prop_assert_eq!(ManifestHeader::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn header_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = ManifestHeader::decode(&bytes);
            let _ = StripeRecord::decode(&bytes);
        }
    }
}
